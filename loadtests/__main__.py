"""CLI: ``python -m loadtests run ...`` and ``python -m loadtests compare RUN.json RUN.json ...``.

Exit status of ``run``: 0 all requests succeeded; 1 some failed (files are written and the failures counted);
2 bad command line; 3 the run could not start (server unreachable, no model, the warm-up request failed).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import secrets
import sys
from pathlib import Path

import httpx

from cab_vllm import argtypes
from loadtests import client as lc
from loadtests import prompts as lp
from loadtests import report


_positive_int = argtypes.positive_int
_nonneg_int = argtypes.nonneg_int
_positive_float = argtypes.positive_float
_rate = argtypes.checked(float, lambda x: x > 0, "requests/s > 0, or inf for a closed loop")
_json_object = argtypes.json_object('{"sparsity": 0.9}')


def _nonce(s: str) -> str:
    if not s or not all(c.isalnum() for c in s):
        raise argparse.ArgumentTypeError(f"{s!r} must be letters and digits")
    return s


def _label(s: str) -> str:
    if not s or any(c in s for c in "/\\\0") or s.startswith("."):
        raise argparse.ArgumentTypeError(f"{s!r} cannot name a file (no slashes, no leading dot)")
    return s


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="send a load and record it",
                       description="Send streamed requests to an OpenAI-compatible server; write one JSON line "
                                   "per request (LABEL_WORKLOAD.jsonl) and a summary (LABEL_WORKLOAD.json) into --out-dir.")
    r.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root or .../v1")
    r.add_argument("--model", help="model name to send (default: the first of GET /v1/models)")
    r.add_argument("--endpoint", choices=sorted(lc.ENDPOINTS), default="completions",
                   help="completions sends the prompt as is (exact length); chat wraps it in a user message")
    r.add_argument("--prompt-tokens", type=_positive_int, default=1024, help="prompt length in tokens")
    r.add_argument("--output-tokens", type=_positive_int, default=128, help="max_tokens of each request")
    r.add_argument("--num-requests", type=_positive_int, default=16)
    r.add_argument("--concurrency", type=_positive_int,
                   help="most requests in flight (default 1 in a closed loop, no cap with --rate)")
    r.add_argument("--rate", type=_rate, default=math.inf,
                   help="Poisson arrivals, requests/s (default inf: a closed loop of --concurrency workers)")
    r.add_argument("--extra-body", type=_json_object, default={},
                   help='JSON object merged into every request, e.g. \'{"sparsity": 0.9}\' (cab-serve) or '
                        '\'{"vllm_xargs": {"cab_sparsity": 0.9}}\' (vLLM)')
    r.add_argument("--ignore-eos", action="store_true",
                   help="send ignore_eos (vLLM extension) so every request generates --output-tokens")
    r.add_argument("--tokenizer", help="Hugging Face tokenizer for exact prompt lengths (default: the server's "
                                       "/tokenize, else 4 characters a token)")
    r.add_argument("--text", choices=lp.TEXTS, default="auto", help="prompt text (auto: Austen if available)")
    r.add_argument("--seed", type=int, default=0, help="prompt text and arrival times")
    r.add_argument("--prompt-nonce", type=_nonce, default=None,
                   help="tag that makes this run's prompts unique (default: random), so a prefix cache filled "
                        "by an earlier run cannot serve them")
    r.add_argument("--warmup", type=_nonneg_int, default=1, help="untimed requests sent first (default 1)")
    r.add_argument("--timeout", type=_positive_float, default=600.0, help="seconds per request")
    r.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="bearer token (default $OPENAI_API_KEY)")
    r.add_argument("--label", type=_label, default=None,
                   help="what is being measured, e.g. dense or cab-0.9 (default 'run'); compare matches runs "
                        "by label and workload; files are LABEL_WORKLOAD.jsonl/.json")
    r.add_argument("--out-dir", type=Path, default=Path("loadtests/results"))
    r.add_argument("--save-text", action="store_true", help="keep generated text in the JSONL")
    r.add_argument("--quiet", action="store_true", help="no per-request lines on stderr")

    c = sub.add_parser("compare", help="markdown table of two or more runs with ratios",
                       description="Compare run summaries (the .json files `run` writes); ratios are to the "
                                   "baseline run of the same workload.")
    c.add_argument("summaries", nargs="+", type=Path, help="summary .json files")
    c.add_argument("--baseline", help="label of the reference run (default: the first file's)")
    c.add_argument("--out", type=Path, help="also write the table to this file")
    return p


class SetupError(RuntimeError):
    pass


def _first_model(base_url: str, headers: dict) -> str:
    url = lp.server_root(base_url) + "/v1/models"
    try:
        r = httpx.get(url, headers=headers, timeout=30)
    except httpx.HTTPError as e:
        raise SetupError(f"cannot reach {url}: {type(e).__name__}: {e}") from None
    if r.status_code != 200:
        raise SetupError(f"GET {url}: HTTP {r.status_code}: {r.text[:300]}")
    data = r.json().get("data") or []
    if not data:
        raise SetupError(f"GET {url} lists no model; pass --model")
    return data[0]["id"]


async def _run(args, headers: dict, model: str, prompts: list[lp.Prompt], warm: list[lp.Prompt]):
    url = lp.server_root(args.base_url) + lc.ENDPOINTS[args.endpoint]
    bodies = [lc.payload(args.endpoint, model, p.text, args.output_tokens, args.extra_body, args.ignore_eos)
              for p in prompts]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(args.timeout, connect=30.0)
    async with httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits) as client:
        for w in warm:
            body = lc.payload(args.endpoint, model, w.text, args.output_tokens, args.extra_body, args.ignore_eos)
            rec = await lc.send(client, url, body, lc.RequestRecord(-1, w.tokens), args.endpoint, 0.0)
            if not rec.ok:
                raise SetupError(f"warm-up request failed ({rec.error_kind}): {rec.error}")

        def progress(rec: lc.RequestRecord) -> None:
            if args.quiet:
                return
            if rec.ok:
                print(f"  #{rec.index}: ttft {1000 * rec.ttft:.0f} ms, e2e {1000 * rec.e2e:.0f} ms, "
                      f"{rec.output_tokens} tokens", file=sys.stderr)
            else:
                print(f"  #{rec.index}: FAILED ({rec.error_kind}) {rec.error[:200]}", file=sys.stderr)

        conc = args.concurrency if args.concurrency or not math.isinf(args.rate) else 1
        return await lc.run_requests(client, url, bodies, [p.tokens for p in prompts], args.endpoint,
                                     rate=args.rate, concurrency=conc, seed=args.seed, progress=progress), conc


def cmd_run(args) -> int:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        model = args.model or _first_model(args.base_url, headers)
        if args.tokenizer:
            counter = lp.hf_counter(args.tokenizer)
        else:
            counter = lp.server_counter(args.base_url, model, headers) or lp.heuristic_counter()
        if not counter.exact:
            print("loadtests: no tokenizer (--tokenizer) and no /tokenize on the server: prompt lengths are "
                  "estimated at 4 characters a token; the server's usage counts are recorded", file=sys.stderr)
        nonce = args.prompt_nonce or secrets.token_hex(4)
        allp, source = lp.build_prompts(args.num_requests + args.warmup, args.prompt_tokens, counter,
                                        args.text, args.seed, nonce)
    except (SetupError, ValueError, RuntimeError, OSError) as e:
        print(f"loadtests run: {e}", file=sys.stderr)
        return 3
    warm, prompts = allp[args.num_requests:], allp[: args.num_requests]
    label = args.label or "run"
    workload = (f"{args.endpoint}-p{args.prompt_tokens}-o{args.output_tokens}-"
                + (f"c{args.concurrency or 1}" if math.isinf(args.rate) else f"r{args.rate:g}"))
    stem = f"{label}_{workload}"
    print(f"loadtests: {args.num_requests} requests x {args.prompt_tokens} prompt tokens ({source} text, counted "
          f"by {counter.name}) -> {args.output_tokens} tokens, model {model!r}, label {label!r}", file=sys.stderr)
    try:
        (records, duration), conc = asyncio.run(_run(args, headers, model, prompts, warm))
    except SetupError as e:
        print(f"loadtests run: {e}", file=sys.stderr)
        return 3
    config = {
        "base_url": args.base_url, "model": model, "endpoint": args.endpoint,
        "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens,
        "num_requests": args.num_requests, "concurrency": conc,
        "rate": None if math.isinf(args.rate) else args.rate, "extra_body": args.extra_body,
        "ignore_eos": args.ignore_eos, "text": source, "token_counter": counter.name, "seed": args.seed,
        "prompt_nonce": nonce,
        "warmup": args.warmup, "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    summary = report.summarize(records, duration, label, config)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    jsonl, js = args.out_dir / f"{stem}.jsonl", args.out_dir / f"{stem}.json"
    if js.exists():
        print(f"loadtests: overwriting {js}", file=sys.stderr)
    with open(jsonl, "w") as f:
        for rec in records:
            f.write(json.dumps(rec.to_json(keep_text=args.save_text)) + "\n")
    js.write_text(json.dumps(summary, indent=1) + "\n")
    _print_summary(summary)
    print(f"loadtests: wrote {jsonl} and {js}", file=sys.stderr)
    return 0 if summary["requests"]["failed"] == 0 else 1


def _print_summary(s: dict) -> None:
    q = s["requests"]
    print(f"{s['label']}: {q['ok']}/{q['total']} ok" + (f", failed {q['errors']}" if q["failed"] else ""))
    for m in report.METRICS:
        d = s[m]
        if d["n"]:
            print(f"  {m:8s} mean {d['mean']:9.1f}  p50 {d['p50']:9.1f}  p90 {d['p90']:9.1f}  p99 {d['p99']:9.1f}")
    t = s["throughput"]
    if t["output_tokens_per_s"] is not None:
        print(f"  {t['requests_per_s']:.3f} req/s, {t['output_tokens_per_s']:.1f} output tok/s, "
              f"{t['total_tokens_per_s']:.1f} total tok/s over {s['duration_s']:.1f} s")


def cmd_compare(args) -> int:
    try:
        table = report.compare_table([report.load_summary(p) for p in args.summaries], args.baseline)
    except ValueError as e:
        print(f"loadtests compare: {e}", file=sys.stderr)
        return 2
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return cmd_run(args) if args.command == "run" else cmd_compare(args)


if __name__ == "__main__":
    sys.exit(main())
