"""A small OpenAI-compatible SSE server with deterministic delays, for testing the load tests (vllm bench serve).

Each request may carry ``"fake": {...}`` (--extra-body puts it there):
    ttft      seconds before the first token chunk (default 0.2)
    itl       seconds between token chunks (default 0.05)
    mode      what to do: ok | http400 | drop (close the connection mid-stream) | no_done (end without [DONE]) |
              error_event (an error object mid-stream) | role_first (chat: a role-only chunk before the delay)
    fail_every  apply ``mode`` only to requests whose prompt tag index i has i % fail_every == 0; others are ok
A prompt tag ``[request NONCE-I]`` gives I (prompts without one: I = -1). /tokenize counts whitespace-separated
words (plus one, like a BOS token). Every request body is kept in ``app.state.bodies``;
``app.state.max_in_flight`` is the most streams open at once.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

TAG = re.compile(r"\[request \w+-(\d+)\]")


class DropConnection(Exception):
    pass


def make_app() -> FastAPI:
    app = FastAPI()
    app.state.bodies = []
    app.state.in_flight = 0
    app.state.max_in_flight = 0

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await request.json()
        return {"count": len(body["prompt"].split()) + 1}

    async def handle(request: Request, chat: bool):
        body = await request.json()
        app.state.bodies.append(body)
        fake = body.get("fake", {})
        ttft, itl = fake.get("ttft", 0.2), fake.get("itl", 0.05)
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        m = TAG.search(prompt)
        idx = int(m.group(1)) if m else -1
        every = fake.get("fail_every")
        mode = fake.get("mode", "ok") if (every is None or idx % every == 0) else "ok"
        n = body["max_tokens"]
        if mode == "http400":
            return JSONResponse({"error": {"message": "bad sparsity", "type": "BadRequestError", "code": 400}},
                                status_code=400)

        def chunk(i: int, last: bool) -> str:
            if chat:
                choice = {"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": "length" if last else None}
            else:
                choice = {"index": 0, "text": f"t{i} ", "finish_reason": "length" if last else None}
            return f"data: {json.dumps({'id': 'x', 'choices': [choice]})}\n\n"

        async def stream():
            app.state.in_flight += 1
            app.state.max_in_flight = max(app.state.max_in_flight, app.state.in_flight)
            try:
                async for piece in body_stream():
                    yield piece
            finally:
                app.state.in_flight -= 1

        async def body_stream():
            if chat and mode == "role_first":
                yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'role': 'assistant'}}]})}\n\n"
            await asyncio.sleep(ttft)
            for i in range(n):
                if i:
                    await asyncio.sleep(itl)
                yield chunk(i, i == n - 1)
                if i == n // 2:
                    if mode == "drop":
                        raise DropConnection("fake server drops the connection")
                    if mode == "error_event":
                        yield f"data: {json.dumps({'error': {'message': 'engine died', 'code': 500}})}\n\n"
                        return
            usage = {"prompt_tokens": len(prompt.split()) + 1, "completion_tokens": n,
                     "total_tokens": len(prompt.split()) + 1 + n}
            yield f"data: {json.dumps({'id': 'x', 'choices': [], 'usage': usage})}\n\n"
            if mode != "no_done":
                yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(request, chat=True)

    return app


class FakeServer:
    """Run the app with uvicorn in a background thread on 127.0.0.1 and a free port."""

    def __init__(self):
        self.app = make_app()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="critical", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "FakeServer":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("fake server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
