"""The FastAPI app: vLLM's own OpenAI app (routes, protocol models, serving, streaming, usage, length checks,
error schema, /health, /metrics) with what CAB adds around it.

  build_cab_app(engine_client, args)   vLLM's build_app + init_app_state, then:
    CABFieldsMiddleware   every JSON POST body is checked (no nesting past MAX_JSON_DEPTH, no lone surrogates:
                          400 instead of vLLM's 500); top-level ``sparsity`` / ``attention_policy`` on
                          /v1/chat/completions, /v1/completions and /invocations -> vllm_xargs {cab_sparsity,
                          cab_policy} (server/fields.py), refused on other endpoints; a bad value is a 400 in the
                          OpenAI error schema naming the field.
    APIKeyMiddleware      with --api-key: every path except OPEN_PATHS needs ``Authorization: Bearer KEY``; a
                          missing or wrong key is a 401 in the OpenAI error schema (vLLM's own middleware answers
                          {"error": "Unauthorized"} and leaves e.g. /invocations and /tokenize open).
    aborted-request count the engine client's abort() is wrapped to count cab_server_aborted_requests_total
                          (vLLM aborts a request when its client disconnects).

/metrics is vLLM's (prometheus_client registry; in multiprocess mode it also reads the CAB figures the worker
writes, see cab_vllm/backend/stats.py).
"""

from __future__ import annotations

import json
from argparse import Namespace
from http import HTTPStatus

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.fields import FIELDS, CABFieldError, apply_cab_fields

CAB_PATHS = ("/v1/chat/completions", "/v1/completions")
HONOURED_PATHS = (*CAB_PATHS, "/invocations")  # /invocations dispatches to the two above by the body's shape
OPEN_PATHS = ("/health", "/ping", "/metrics", "/version")  # answered without a key (probes, scrapers)
MAX_JSON_DEPTH = 64  # deeper request bodies are refused (Python's json recursion and vLLM's models break first)


def error_body(message: str, err_type: str, code: int, param: str | None = None) -> bytes:
    """The OpenAI error schema: {"error": {"message", "type", "param", "code"}}."""
    return json.dumps({"error": {"message": message, "type": err_type, "param": param, "code": code}}).encode()


async def send_json(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def _path(scope: Scope) -> str:
    return scope["path"].removeprefix(scope.get("root_path", "") or "")


class BodyError(ValueError):
    """A request body refused before vLLM sees it; ``param`` names the offending field (OpenAI error schema)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def check_body(data: object) -> None:
    """Refuse what a JSON body can carry that vLLM answers with a 500 (seen through cab-serve): nesting deeper
    than MAX_JSON_DEPTH, and lone UTF-16 surrogates (e.g. "\\udfff") in any string or key, which break the
    tokenizer and the response encoder. Iterative, so a deep body cannot exhaust the stack here."""
    stack: list[tuple[object, str, int]] = [(data, "", 0)]
    while stack:
        obj, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise BodyError(f"the request body nests deeper than {MAX_JSON_DEPTH} levels", _top(path))
        if isinstance(obj, dict):
            for k, v in obj.items():
                sub = f"{path}.{k}" if path else str(k)
                if isinstance(k, str) and _has_surrogate(k):
                    raise BodyError(f"field name {k!r} holds a lone UTF-16 surrogate", path or None)
                stack.append((v, sub, depth + 1))
        elif isinstance(obj, list):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(obj))
        elif isinstance(obj, str) and _has_surrogate(obj):
            raise BodyError(f"{path or 'the body'} holds a lone UTF-16 surrogate (not valid Unicode text)", _top(path))


def _top(path: str) -> str | None:
    """The top-level field of a body path like 'messages[0].content'."""
    return path.split("[")[0].split(".")[0] or None


def _has_surrogate(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_fields(path: str, data: dict) -> dict:
    """Per-endpoint checks and the CAB fields. On HONOURED_PATHS the top-level ``sparsity`` /
    ``attention_policy`` become vllm_xargs (validated), and cab_* keys already in vllm_xargs are validated
    (400 naming vllm_xargs). On any other path the two fields are refused: they would be silently ignored.
    ``structured_outputs`` must be an object (vLLM answers other JSON values with a 500)."""
    from cab_vllm.backend.plan import validate_request_args

    if path not in HONOURED_PATHS:
        for field in FIELDS:
            if field in data:
                raise BodyError(f"{field} is not supported on {path}: send it to /v1/chat/completions or "
                                f"/v1/completions", field)
        return data
    so = data.get("structured_outputs")
    if so is not None and not isinstance(so, dict):
        raise BodyError(f"structured_outputs must be an object, got {type(so).__name__}", "structured_outputs")
    xargs = data.get("vllm_xargs")
    if isinstance(xargs, dict):
        try:
            validate_request_args(xargs)
        except ValueError as e:
            raise BodyError(f"vllm_xargs: {e}", "vllm_xargs") from None
    try:
        return apply_cab_fields(data)
    except CABFieldError as e:
        raise BodyError(str(e), e.param) from None


class CABFieldsMiddleware:
    """Check the JSON body of every POST (check_body, check_fields) and rewrite the top-level sparsity /
    attention_policy of /v1/chat/completions, /v1/completions and /invocations into vllm_xargs. A refused body
    is a 400 in the OpenAI error schema naming the field. Bodies that are not JSON objects pass unchanged (vLLM
    answers them). After the body, ``receive`` is the client's own, so a disconnect still reaches vLLM."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or not _is_json(scope):
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        body = b"".join(chunks)
        try:
            data = json.loads(body)
        except RecursionError:
            await send_json(send, HTTPStatus.BAD_REQUEST, error_body(
                f"the request body nests deeper than {MAX_JSON_DEPTH} levels", "BadRequestError", 400))
            return
        except (UnicodeDecodeError, json.JSONDecodeError):
            data = None
        if data is not None:
            try:
                check_body(data)
                new = check_fields(_path(scope), data) if isinstance(data, dict) else data
            except BodyError as e:
                await send_json(send, HTTPStatus.BAD_REQUEST, error_body(str(e), "BadRequestError", 400, e.param))
                return
            if new is not data:
                body = json.dumps(new).encode()
                headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
                scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}

        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _is_json(scope: Scope) -> bool:
    """JSON bodies (or no content type: vLLM's routes parse them as JSON); not multipart uploads."""
    for k, v in scope["headers"]:
        if k.lower() == b"content-type":
            return b"json" in v.lower()
    return True


class ModelsRootMiddleware:
    """GET /v1/models: vLLM reports each model's ``root`` as the folder it was loaded from, which tells clients
    the server's file layout. A root that is a local path is replaced by the model's served id."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "GET" or _path(scope) != "/v1/models":
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def capture(msg: Message) -> None:
            nonlocal start
            if msg["type"] == "http.response.start":
                start = msg
                return
            chunks.append(msg.get("body", b""))
            if msg.get("more_body", False):
                return
            body = b"".join(chunks)
            try:
                data = json.loads(body)
                for card in data.get("data", []):
                    root = card.get("root")
                    if isinstance(root, str) and (root.startswith(("/", "~", ".")) or "\\" in root):
                        card["root"] = card.get("id")
                body = json.dumps(data).encode()
            except (ValueError, AttributeError, TypeError):
                pass  # not the JSON model list (an error page): pass it on unchanged
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, capture)


class APIKeyMiddleware:
    """Bearer-token check on every HTTP path except OPEN_PATHS (and OPTIONS preflights); 401 in the OpenAI
    error schema. Keys are compared as SHA-256 digests in constant time."""

    def __init__(self, app: ASGIApp, keys: list[str]) -> None:
        import hashlib

        self.app = app
        self._hash = lambda s: hashlib.sha256(s.encode()).digest()
        self.keys = [self._hash(k) for k in keys]

    def _ok(self, scope: Scope) -> bool | None:
        import secrets

        auth = None
        for k, v in scope["headers"]:
            if k.lower() == b"authorization":
                auth = v.decode("latin-1")
                break
        if not auth:
            return None
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer":
            return False
        h = self._hash(token.strip())
        ok = False
        for key in self.keys:
            ok |= secrets.compare_digest(h, key)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope.get("method") == "OPTIONS" \
                or _path(scope) in OPEN_PATHS or _path(scope).startswith("/metrics/"):
            await self.app(scope, receive, send)
            return
        ok = self._ok(scope)
        if ok:
            await self.app(scope, receive, send)
            return
        msg = ("Missing API key: send 'Authorization: Bearer <key>'" if ok is None else "Incorrect API key provided")
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send_json(send, HTTPStatus.UNAUTHORIZED, error_body(msg, "AuthenticationError", 401),
                        [(b"www-authenticate", b"Bearer")])


def count_aborts(engine_client) -> None:
    """Wrap engine_client.abort so every abort (a client that went away) increments
    cab_server_aborted_requests_total (one per aborted request id)."""
    from prometheus_client import Counter

    try:
        counter = Counter("cab_server_aborted_requests", "Requests aborted in the engine by the API server "
                          "(client disconnected)")
    except ValueError:  # second app in one process (tests)
        from prometheus_client import REGISTRY

        counter = REGISTRY._names_to_collectors["cab_server_aborted_requests"]
    orig = engine_client.abort
    if getattr(orig, "_cab_counted", False):
        return

    async def abort(request_id, *args, **kwargs):
        n = 1 if isinstance(request_id, str) else len(list(request_id))
        counter.inc(n)
        return await orig(request_id, *args, **kwargs)

    abort._cab_counted = True
    engine_client.abort = abort


def document_cab_fields(app) -> None:
    """Add ``sparsity`` / ``attention_policy`` to the request schemas of the two CAB paths in /openapi.json."""
    from server.fields import CABFields

    props = CABFields.model_json_schema()["properties"]
    orig = app.openapi

    def openapi():
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = orig()
        for path in CAB_PATHS:
            body = schema.get("paths", {}).get(path, {}).get("post", {}).get("requestBody", {})
            ref = body.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref", "")
            comp = schema.get("components", {}).get("schemas", {}).get(ref.rsplit("/", 1)[-1])
            if comp is not None:
                comp.setdefault("properties", {}).update(props)
        return schema

    app.openapi = openapi


async def build_cab_app(engine_client, args: Namespace, api_keys: list[str] | None = None):
    """vLLM's OpenAI app over ``engine_client`` (args: the parsed cab-serve / vLLM serve namespace, with
    args.api_key None: keys go to ``api_keys``), plus the CAB layers above. Returns the FastAPI app."""
    from server import vllm_api

    build_app, init_app_state = vllm_api.build_app(), vllm_api.init_app_state()
    supported_tasks = await engine_client.get_supported_tasks()
    app = build_app(args, supported_tasks, engine_client.model_config)
    await init_app_state(engine_client, app.state, args, supported_tasks)
    count_aborts(engine_client)
    document_cab_fields(app)
    from starlette.middleware import Middleware

    # outermost first: the key check, then the CAB fields, then vLLM's own middleware. vLLM's build_app has
    # already built the middleware stack (SageMaker bootstrap), so insert and rebuild it as that bootstrap does.
    outer = [Middleware(APIKeyMiddleware, keys=api_keys)] if api_keys else []
    app.user_middleware[:0] = [*outer, Middleware(CABFieldsMiddleware), Middleware(ModelsRootMiddleware)]
    app.middleware_stack = app.build_middleware_stack()
    return app
