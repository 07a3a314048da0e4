"""The CAB request fields and the two ASGI layers of server.app, without an engine: a small Starlette app
echoes what reaches it."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("starlette")

from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from cab_vllm.backend.plan import validate_request_args  # noqa: E402
from server.app import MAX_JSON_DEPTH, APIKeyMiddleware, CABFieldsMiddleware  # noqa: E402
from server.fields import CABFieldError, apply_cab_fields  # noqa: E402

BASE = {"model": "m", "prompt": "hi", "max_tokens": 4}


@pytest.mark.parametrize("extra, xargs", [
    ({"sparsity": 0.7}, {"cab_sparsity": 0.7}),
    ({"sparsity": 0}, {"cab_sparsity": 0.0}),
    ({"attention_policy": "streaming"}, {"cab_policy": "streaming"}),
    ({"sparsity": 0.95, "attention_policy": "cab"}, {"cab_sparsity": 0.95, "cab_policy": "cab"}),
    ({"sparsity": 0.5, "vllm_xargs": {"other": 1}}, {"other": 1, "cab_sparsity": 0.5}),
    ({"sparsity": 0.5, "vllm_xargs": {"cab_sparsity": 0.5}}, {"cab_sparsity": 0.5}),  # same value twice
    ({"sparsity": 0.5, "vllm_xargs": {"cab_sparsity": "0.5"}}, {"cab_sparsity": 0.5}),
], ids=["sparsity", "sparsity-int-zero", "policy", "both", "merge-xargs", "same-twice", "same-as-string"])
def test_fields_map_to_vllm_xargs(extra, xargs):
    body = {**BASE, **extra}
    out = apply_cab_fields(body)
    assert out == {**BASE, "vllm_xargs": xargs}
    assert "sparsity" not in out and "attention_policy" not in out
    validate_request_args(out["vllm_xargs"])  # what the engine's admission hook accepts
    assert body == {**BASE, **extra}  # the input is not modified


def test_absent_or_null_fields_leave_the_body():
    assert apply_cab_fields(dict(BASE)) == BASE
    assert apply_cab_fields({**BASE, "sparsity": None, "attention_policy": None}) == BASE


@pytest.mark.parametrize("extra, param, text", [
    ({"sparsity": 1.0}, "sparsity", "sparsity=1.0 is invalid: expected a number in [0, 1)"),
    ({"sparsity": 1.5}, "sparsity", "sparsity=1.5 is invalid"),
    ({"sparsity": -0.1}, "sparsity", "sparsity=-0.1 is invalid"),
    ({"sparsity": float("nan")}, "sparsity", "is invalid"),
    ({"sparsity": "0.5"}, "sparsity", "sparsity='0.5' is invalid"),
    ({"sparsity": True}, "sparsity", "sparsity=True is invalid"),
    ({"sparsity": [0.5]}, "sparsity", "is invalid"),
    ({"attention_policy": "bridges"}, "attention_policy", "expected one of cab, curvature, magnitude, h2o"),
    ({"attention_policy": 3}, "attention_policy", "attention_policy=3 is invalid"),
    ({"sparsity": 0.5, "vllm_xargs": {"cab_sparsity": 0.7}}, "sparsity", "conflicts with vllm_xargs.cab_sparsity"),
    ({"attention_policy": "cab", "vllm_xargs": {"cab_policy": "h2o"}}, "attention_policy", "conflicts"),
    ({"sparsity": 0.5, "vllm_xargs": "x"}, "vllm_xargs", "vllm_xargs must be an object"),
], ids=["one", "above-one", "negative", "nan", "string", "bool", "list", "policy-unknown", "policy-int",
        "conflict-sparsity", "conflict-policy", "xargs-not-object"])
def test_bad_fields_name_the_field(extra, param, text):
    with pytest.raises(CABFieldError) as e:
        apply_cab_fields({**BASE, **extra})
    assert e.value.param == param
    assert text in str(e.value)


# -- the ASGI layers ---------------------------------------------------------------------------------------------
async def echo(request: Request):
    raw = await request.body()
    try:
        body = json.loads(raw)
    except json.JSONDecodeError:
        body = raw.decode()
    return JSONResponse({"body": body, "length": request.headers.get("content-length"), "raw_length": len(raw)})


def make_client(keys=None) -> TestClient:
    app = Starlette(routes=[Route(p, echo, methods=["GET", "POST"]) for p in
                            ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/health", "/metrics",
                             "/invocations")])
    app.add_middleware(CABFieldsMiddleware)
    if keys:
        app.add_middleware(APIKeyMiddleware, keys=keys)
    return TestClient(app)


def assert_openai_error(r, status: int, param=None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == status and err["param"] == param and err["message"]
    return err


def test_middleware_rewrites_the_body_and_its_length():
    c = make_client()
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = c.post(path, json={**BASE, "sparsity": 0.7, "attention_policy": "streaming"})
        got = r.json()
        assert got["body"] == {**BASE, "vllm_xargs": {"cab_sparsity": 0.7, "cab_policy": "streaming"}}
        assert int(got["length"]) == got["raw_length"]


def test_middleware_leaves_other_requests_alone():
    c = make_client()
    assert c.post("/v1/embeddings", json=BASE).json()["body"] == BASE  # nothing of CAB's in it
    raw = b'{"model": "m", "sparsity": '  # not JSON: vLLM answers it
    r = c.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.json()["body"] == raw.decode() and r.json()["raw_length"] == len(raw)
    assert c.post("/v1/completions", json=[1, 2]).json()["body"] == [1, 2]


def test_middleware_rejects_bad_fields_with_openai_errors():
    c = make_client()
    err = assert_openai_error(c.post("/v1/chat/completions", json={**BASE, "sparsity": 2}), 400, "sparsity")
    assert err["type"] == "BadRequestError" and "sparsity=2 is invalid" in err["message"]
    assert_openai_error(c.post("/v1/completions", json={**BASE, "attention_policy": "x"}), 400, "attention_policy")


def test_api_key_guards_everything_but_probes():
    c = make_client(keys=["k1", "k2"])
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic k1"}, {"Authorization": "k1"}):
        for path in ("/v1/completions", "/invocations"):
            err = assert_openai_error(c.post(path, json=BASE, headers=headers), 401)
            assert err["type"] == "AuthenticationError"
    assert "Missing API key" in c.post("/v1/completions", json=BASE).json()["error"]["message"]
    assert "Incorrect API key" in c.post("/v1/completions", json=BASE,
                                         headers={"Authorization": "Bearer x"}).json()["error"]["message"]
    for key in ("k1", "k2"):
        r = c.post("/v1/completions", json={**BASE, "sparsity": 0.5}, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and r.json()["body"]["vllm_xargs"] == {"cab_sparsity": 0.5}
    # auth runs before the field check: a bad key never learns whether its body was valid
    assert c.post("/v1/completions", json={**BASE, "sparsity": 5}).status_code == 401
    for path in ("/health", "/metrics"):
        assert c.get(path).status_code == 200


def test_cab_fields_honoured_on_invocations_and_refused_elsewhere():
    """/invocations dispatches to the completion endpoints: the fields are honoured there. On any other endpoint
    they would be silently ignored, so they are refused, naming the field."""
    c = make_client()
    got = c.post("/invocations", json={**BASE, "sparsity": 0.5}).json()["body"]
    assert got["vllm_xargs"] == {"cab_sparsity": 0.5} and "sparsity" not in got
    for field, value in (("sparsity", 5), ("sparsity", 0.5), ("attention_policy", "cab")):
        err = assert_openai_error(c.post("/v1/embeddings", json={**BASE, field: value}), 400, field)
        assert "/v1/embeddings" in err["message"] and "/v1/chat/completions" in err["message"]


def test_vllm_xargs_errors_name_vllm_xargs():
    c = make_client()
    for bad in ({"cab_sparsity": 1.5}, {"cab_sparsity": "lots"}, {"cab_policy": "fastest"}):
        err = assert_openai_error(c.post("/v1/completions", json={**BASE, "vllm_xargs": bad}), 400, "vllm_xargs")
        assert "cab_" in err["message"]
    ok = c.post("/v1/completions", json={**BASE, "vllm_xargs": {"cab_sparsity": "0.5", "other": 1}})
    assert ok.status_code == 200


def test_deeply_nested_body_is_a_400_not_a_500():
    c = make_client()
    for depth in (MAX_JSON_DEPTH + 5, 1000, 100_000):
        raw = '{"model": "m", "prompt": "hi", "x": ' + "[" * depth + "]" * depth + "}"
        for path in ("/v1/completions", "/v1/chat/completions", "/v1/embeddings"):
            r = c.post(path, content=raw.encode(), headers={"content-type": "application/json"})
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] in (None, "x") and "nests deeper" in err["message"] and err["code"] == 400
    shallow = {**BASE, "x": [[[1]]]}
    assert c.post("/v1/completions", json=shallow).json()["body"] == shallow


@pytest.mark.parametrize("field", ["stop", "bad_words", "prompt"])
def test_lone_surrogates_are_a_400(field):
    c = make_client()
    raw = ('{"model": "m", "prompt": "hi", "%s": ["ok", "\\udfff"]}' % field).encode()
    if field == "prompt":
        raw = b'{"model": "m", "prompt": "a\\ud800b"}'
    r = c.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    err = assert_openai_error(r, 400, field)
    assert "surrogate" in err["message"]
    ok = c.post("/v1/completions", json={**BASE, "stop": ["\u00e9\U0001F600"]})  # real non-ASCII text is fine
    assert ok.status_code == 200


def test_structured_outputs_must_be_an_object():
    c = make_client()
    for bad in (1.5, "json", [1]):
        assert_openai_error(c.post("/v1/chat/completions", json={**BASE, "structured_outputs": bad}), 400,
                            "structured_outputs")
    for good in (None, {"json": {"type": "object"}}):
        assert c.post("/v1/chat/completions", json={**BASE, "structured_outputs": good}).status_code == 200


def test_models_root_does_not_leak_local_paths():
    from server.app import ModelsRootMiddleware

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [
            {"id": "m", "root": "/home/srv/models/m", "object": "model"},
            {"id": "hub", "root": "Org/hub-model", "object": "model"}]})

    app = Starlette(routes=[Route("/v1/models", models)])
    app.add_middleware(ModelsRootMiddleware)
    r = TestClient(app).get("/v1/models")
    assert r.status_code == 200 and int(r.headers["content-length"]) == len(r.content)
    assert [m["root"] for m in r.json()["data"]] == ["m", "Org/hub-model"]
