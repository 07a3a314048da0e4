"""One streamed request, timed; and the arrival schedule of a run (closed loop or Poisson).

Timing follows vLLM's own benchmark client (vllm/benchmarks/lib/endpoint_request_func.py) so numbers compare
with ``vllm bench serve``: TTFT = request sent -> first SSE chunk that carries a token; ITL = the gaps between
successive token chunks; TPOT = (last token - TTFT) / (output tokens - 1). E2E here is request sent -> end of
the stream. Where this client is stricter: a stream that ends without ``data: [DONE]``, an error event inside
the stream, a non-200 status (its body is kept), a dropped connection or a timeout each mark the request failed
with a kind and a message; nothing is dropped from the count.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field

import httpx

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
ERROR_KINDS = ("http", "connection", "timeout", "stream", "protocol")


@dataclass
class RequestRecord:
    """What one request did. Times in seconds; *_at are offsets from the start of the run."""

    index: int
    prompt_tokens_target: int
    scheduled_at: float = 0.0  # when the arrival process released it
    sent_at: float = 0.0  # when it was sent (later than scheduled_at when the concurrency cap held it)
    ok: bool = False
    status: int | None = None
    error_kind: str | None = None  # one of ERROR_KINDS when not ok
    error: str | None = None
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    last_token: float | None = None  # sent -> last token chunk
    e2e: float | None = None  # sent -> end of stream (failed: sent -> the failure; never in the percentiles)
    output_tokens: int | None = None
    output_tokens_from: str | None = None  # 'usage' (server's count) or 'chunks' (token chunks seen)
    prompt_tokens: int | None = None  # the server's usage.prompt_tokens
    chunks: int = 0  # token chunks received
    text: str | None = None

    @property
    def tpot(self) -> float | None:
        if not self.ok or not self.output_tokens or self.output_tokens < 2:
            return None
        return (self.last_token - self.ttft) / (self.output_tokens - 1)

    def to_json(self, keep_text: bool = False) -> dict:
        d = asdict(self)
        d["tpot"] = self.tpot
        if not keep_text:
            d.pop("text")
        return d


def payload(endpoint: str, model: str, prompt: str, max_tokens: int, extra_body: dict | None = None,
            ignore_eos: bool = False) -> dict:
    """The JSON body of a streamed request; extra_body keys are merged last (they win)."""
    body: dict = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
                  "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    elif endpoint == "completions":
        body["prompt"] = prompt
    else:
        raise ValueError(f"endpoint={endpoint!r} must be one of {sorted(ENDPOINTS)}")
    if ignore_eos:
        body["ignore_eos"] = True
    body.update(extra_body or {})
    return body


def _chunk_text(endpoint: str, choice: dict) -> str:
    if endpoint == "chat":
        delta = choice.get("delta") or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or delta.get("reasoning") or "")
    return choice.get("text") or ""


async def send(client: httpx.AsyncClient, url: str, body: dict, rec: RequestRecord, endpoint: str,
               t0: float) -> RequestRecord:
    """POST ``body`` to ``url`` and read the SSE stream into ``rec``; never raises for server-side failures."""
    st = time.perf_counter()
    rec.sent_at = st - t0
    pieces: list[str] = []
    last = st
    done = False

    def event(data: str) -> None:
        nonlocal last, done
        if data == "[DONE]":
            done = True
            return
        try:
            obj = json.loads(data)
        except json.JSONDecodeError:
            raise _Fail("protocol", f"SSE data is not JSON: {data[:200]!r}") from None
        if not isinstance(obj, dict):
            raise _Fail("protocol", f"SSE data is not a JSON object: {data[:200]!r}")
        if obj.get("error") is not None:  # vLLM reports errors raised mid-generation as an event
            raise _Fail("stream", f"error event: {json.dumps(obj['error'])[:500]}")
        now = time.perf_counter()
        choices = obj.get("choices") or []
        if choices:
            text = _chunk_text(endpoint, choices[0])
            # a chunk counts as a token when it carries text; a bare finish chunk counts only if it is the first
            # (the model stopped at once), a bare role chunk never does
            if text or (rec.chunks == 0 and choices[0].get("finish_reason")):
                if rec.chunks == 0:
                    rec.ttft = now - st
                else:
                    rec.itl.append(now - last)
                rec.chunks += 1
                last = now
                pieces.append(text)
        usage = obj.get("usage")
        if usage:
            if usage.get("completion_tokens") is not None:
                rec.output_tokens, rec.output_tokens_from = int(usage["completion_tokens"]), "usage"
            if usage.get("prompt_tokens") is not None:
                rec.prompt_tokens = int(usage["prompt_tokens"])

    try:
        async with client.stream("POST", url, json=body) as resp:
            rec.status = resp.status_code
            if resp.status_code != 200:
                raw = await resp.aread()
                raise _Fail("http", f"HTTP {resp.status_code}: {raw.decode('utf-8', 'replace')[:1000]}")
            data_lines: list[str] = []
            async for line in resp.aiter_lines():
                if line == "":  # blank line: dispatch the event
                    if data_lines:
                        event("\n".join(data_lines))
                        data_lines = []
                elif line.startswith("data:"):
                    data_lines.append(line[5:].removeprefix(" "))
                # comments (":" pings) and other fields (event:, id:, retry:) carry no payload here
            if data_lines:
                event("\n".join(data_lines))
        end = time.perf_counter()
        if not done:
            raise _Fail("stream", f"stream ended before data: [DONE] after {rec.chunks} token chunks")
        if rec.chunks == 0:
            raise _Fail("stream", "stream finished without a single token")
        rec.ok = True
        rec.e2e = end - st
        rec.last_token = last - st
        if rec.output_tokens is None:
            rec.output_tokens, rec.output_tokens_from = rec.chunks, "chunks"
    except _Fail as f:
        rec.error_kind, rec.error = f.kind, f.message
    except httpx.TimeoutException as e:
        rec.error_kind, rec.error = "timeout", f"{type(e).__name__}: {e}"
    except httpx.TransportError as e:  # refused, reset, incomplete chunked body, ...
        rec.error_kind, rec.error = "connection", f"{type(e).__name__}: {e}"
    except httpx.HTTPError as e:  # undecodable body, ...
        rec.error_kind, rec.error = "protocol", f"{type(e).__name__}: {e}"
    rec.text = "".join(pieces)
    if not rec.ok:  # latencies of a failed request would bias the percentiles; keep what arrived for debugging
        rec.e2e = time.perf_counter() - st
    return rec


class _Fail(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message


def arrival_times(n: int, rate: float, seed: int = 0) -> list[float]:
    """Offsets (s) at which ``n`` requests are released: all at 0 for rate = inf (closed loop, the concurrency
    cap paces them), else a Poisson process (exponential gaps of mean 1/rate), the first at 0."""
    if not rate > 0:
        raise ValueError(f"rate={rate} must be > 0 (inf for a closed loop)")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


async def run_requests(client: httpx.AsyncClient, url: str, bodies: list[dict], targets: list[int],
                       endpoint: str, rate: float = math.inf, concurrency: int | None = None,
                       seed: int = 0, progress=None) -> tuple[list[RequestRecord], float]:
    """Send ``bodies`` on the arrival schedule with at most ``concurrency`` in flight (None: no cap; needs a
    finite rate). Returns (records in request order, wall time from the first send to the last end)."""
    if concurrency is None and math.isinf(rate):
        raise ValueError("a closed loop (rate = inf) needs a concurrency")
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency={concurrency} must be >= 1")
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    arrivals = arrival_times(len(bodies), rate, seed)
    t0 = time.perf_counter()
    records = [RequestRecord(i, targets[i]) for i in range(len(bodies))]

    async def one(i: int) -> None:
        await asyncio.sleep(max(0.0, arrivals[i] - (time.perf_counter() - t0)))
        records[i].scheduled_at = time.perf_counter() - t0
        if sem is None:
            await send(client, url, bodies[i], records[i], endpoint, t0)
        else:
            async with sem:
                await send(client, url, bodies[i], records[i], endpoint, t0)
        if progress is not None:
            progress(records[i])

    await asyncio.gather(*(one(i) for i in range(len(bodies))))
    start = min(r.sent_at for r in records)
    end = max(r.sent_at + (r.e2e or 0.0) for r in records)
    return records, end - start
