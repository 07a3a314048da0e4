"""The FastAPI app: vLLM's own OpenAI app (routes, protocol models, serving, streaming, usage, length checks,
error schema, /health, /metrics) with what CAB adds around it.

  build_cab_app(engine_client, args)   vLLM's build_app + init_app_state, then:
    CABFieldsMiddleware   top-level ``sparsity`` / ``attention_policy`` on /v1/chat/completions and
                          /v1/completions -> vllm_xargs {cab_sparsity, cab_policy} (server/fields.py); a bad value
                          is a 400 in the OpenAI error schema naming the field.
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

from server.fields import CABFieldError, apply_cab_fields

CAB_PATHS = ("/v1/chat/completions", "/v1/completions")
OPEN_PATHS = ("/health", "/ping", "/metrics", "/version")  # answered without a key (probes, scrapers)


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


class CABFieldsMiddleware:
    """Rewrite the JSON body of POST /v1/chat/completions and /v1/completions: top-level sparsity /
    attention_policy -> vllm_xargs (validated). Bodies that are not a JSON object pass unchanged (vLLM answers
    them). After the body, ``receive`` is the client's own, so a disconnect still reaches vLLM."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or _path(scope) not in CAB_PATHS:
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
        except (UnicodeDecodeError, json.JSONDecodeError):
            data = None
        if isinstance(data, dict):
            try:
                new = apply_cab_fields(data)
            except CABFieldError as e:
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
    app.user_middleware[:0] = [*outer, Middleware(CABFieldsMiddleware)]
    app.middleware_stack = app.build_middleware_stack()
    return app
