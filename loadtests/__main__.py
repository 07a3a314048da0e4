"""CLI: ``python -m loadtests run ...`` (scenarios through ``vllm bench serve``) and ``python -m loadtests compare``.

Exit status of ``run``: 0 every request of every scenario completed; 1 some failed (results are written and the
failures counted); 2 bad command line; 3 a run could not start or bench serve stopped (server unreachable, no
tokenizer, the warm-up failed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import sys
from pathlib import Path

import httpx

from cab_vllm import argtypes
from loadtests import bench
from loadtests import report

_positive_int = argtypes.positive_int
_nonneg_int = argtypes.nonneg_int
_rate = argtypes.checked(float, lambda x: x > 0, "requests/s > 0, or inf for a closed loop")
_sparsity = argtypes.checked(float, lambda x: 0 <= x < 1, "a sparsity in [0, 1)")
_json_object = argtypes.json_object('{"vllm_xargs": {"cab_policy": "cab"}}')


def _label(s: str) -> str:
    if not s or any(c in s for c in "/\\\0") or s.startswith("."):
        raise argparse.ArgumentTypeError(f"{s!r} cannot name a file (no slashes, no leading dot)")
    return s


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the scenarios with vllm bench serve",
                       description="One `vllm bench serve` run per scenario (each prompt length x each concurrency x "
                                   "each sparsity) against a running OpenAI-compatible server; each writes bench "
                                   "serve's result JSON, LABEL_WORKLOAD.json, into --out-dir. Arguments after `--` go "
                                   "to bench serve as they are (e.g. -- --burstiness 0.5).")
    r.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root or .../v1")
    r.add_argument("--model", help="served model name (default: the first of GET /v1/models)")
    r.add_argument("--tokenizer", help="the model's tokenizer on this machine (Hugging Face folder or hub id; "
                                       "default --model): bench serve draws the prompts' token ids from it")
    r.add_argument("--endpoint", choices=sorted(bench.BACKENDS), default="completions",
                   help="completions sends the prompt as is (exact length); chat wraps it in the chat template")
    r.add_argument("--prompt-tokens", type=_positive_int, nargs="+", default=[1024], help="prompt lengths")
    r.add_argument("--output-tokens", type=_positive_int, default=128, help="tokens generated per request "
                                                                             "(ignore_eos)")
    r.add_argument("--num-requests", type=_positive_int, default=16, help="requests per scenario")
    r.add_argument("--concurrency", type=_positive_int, nargs="+", default=None,
                   help="most requests in flight, one scenario each (default 1; no cap with --rate)")
    r.add_argument("--rate", type=_rate, default=math.inf,
                   help="Poisson arrivals, requests/s (default inf: all at once, paced by --concurrency)")
    r.add_argument("--sparsity", type=_sparsity, nargs="+", default=None,
                   help="per-request CAB sparsity, one scenario each: sent as vllm_xargs.cab_sparsity, the run "
                        "labelled LABEL-SPARSITY (default: no CAB field, the server's default)")
    r.add_argument("--extra-body", type=_json_object, default={},
                   help='JSON object merged into every request (bench serve --extra-body), e.g. '
                        '\'{"attention_policy": "dense"}\' (cab-serve) or \'{"vllm_xargs": {"cab_policy": "dense"}}\'')
    r.add_argument("--ignore-eos", action="store_true", help="accepted for old command lines: bench serve's random "
                                                              "prompts always send ignore_eos")
    r.add_argument("--goodput", nargs="+", metavar="METRIC:MS", help="SLOs for bench serve's request_goodput, "
                                                                      "e.g. ttft:2000 tpot:100")
    r.add_argument("--seed", type=int, default=None,
                   help="first seed of the prompts (scenario i uses SEED+1+i, the warm-up SEED); default random, "
                        "so no prompt repeats an earlier run's and a prefix cache cannot serve it")
    r.add_argument("--warmup", type=_nonneg_int, default=1,
                   help="untimed requests (prompts of their own) sent before the first scenario (default 1)")
    r.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="bearer token (default $OPENAI_API_KEY, which bench serve reads)")
    r.add_argument("--label", type=_label, default="run",
                   help="what is being measured, e.g. dense or cab; compare matches runs by label and workload")
    r.add_argument("--out-dir", type=Path, default=Path("loadtests/results"))
    r.add_argument("--save-text", action="store_true", help="keep the generated texts in the JSON")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.add_argument("bench_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    c = sub.add_parser("compare", help="markdown table of two or more runs with ratios",
                       description="Compare `vllm bench serve` result JSONs (run writes them; so does bench serve "
                                   "--save-result); ratios are to the baseline run of the same workload.")
    c.add_argument("results", nargs="+", type=Path, help="result .json files")
    c.add_argument("--baseline", help="label of the reference run (default: the first file's)")
    c.add_argument("--out", type=Path, help="also write the table to this file")
    return p


class SetupError(RuntimeError):
    pass


def server_root(base_url: str) -> str:
    """http://host:port from http://host:port or http://host:port/v1 (with or without a trailing slash)."""
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _first_model(root: str, headers: dict) -> str:
    url = root + "/v1/models"
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


def scenarios(args) -> list[bench.Scenario]:
    concs = args.concurrency or ([1] if math.isinf(args.rate) else [None])
    out = []
    for p in args.prompt_tokens:
        for c in concs:
            for s in args.sparsity or [None]:
                label = args.label if s is None else f"{args.label}-{s:g}"
                out.append(bench.Scenario(label, p, args.output_tokens, c, args.rate, args.endpoint,
                                          bench.with_sparsity(args.extra_body, s)))
    return out


def cmd_run(args) -> int:
    extra = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    if args.api_key:
        os.environ["OPENAI_API_KEY"] = args.api_key  # bench serve's request functions read it
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    root = server_root(args.base_url)
    seed = secrets.randbelow(2**31) if args.seed is None else args.seed
    runs = scenarios(args)
    failed = 0
    try:
        model = args.model or _first_model(root, headers)
        common = dict(base_url=root, model=model, tokenizer=args.tokenizer or model, quiet=args.quiet)
        if args.warmup:
            warm = bench.Scenario("warmup", runs[0].prompt_tokens, args.output_tokens, 1, math.inf, args.endpoint,
                                  runs[0].extra_body)
            out = bench.run_bench(bench.bench_argv(warm, num_requests=args.warmup, seed=seed, **common))
            if out.get("failed"):
                raise SetupError(f"warm-up failed: {[e for e in out.get('errors', []) if e][:1]}")
        args.out_dir.mkdir(parents=True, exist_ok=True)
        for i, s in enumerate(runs):
            argv = bench.bench_argv(s, num_requests=args.num_requests, seed=seed + 1 + i,
                                    result_dir=str(args.out_dir), goodput=args.goodput, extra=extra, **common)
            print(f"loadtests: {s.stem}: vllm bench serve {' '.join(argv)}", file=sys.stderr)
            bench.run_bench(argv)
            path = args.out_dir / f"{s.stem}.json"
            result = json.loads(path.read_text())
            if not args.save_text:
                result.pop("generated_texts", None)
            result["loadtests"] = {"scenario": {"endpoint": s.endpoint, "prompt_tokens": s.prompt_tokens,
                                                "output_tokens": s.output_tokens, "concurrency": s.concurrency,
                                                "rate": None if math.isinf(s.rate) else s.rate,
                                                "extra_body": s.extra_body},
                                   "bench_serve_argv": argv, "seed": seed + 1 + i}
            path.write_text(json.dumps(result, indent=1) + "\n")
            failed += result.get("failed", 0)
            print(f"loadtests: wrote {path}", file=sys.stderr)
    except (SetupError, ValueError, RuntimeError, OSError) as e:  # bench serve raises these for setup problems
        print(f"loadtests run: {type(e).__name__}: {e}", file=sys.stderr)
        return 3
    return 0 if failed == 0 else 1


def cmd_compare(args) -> int:
    try:
        table = report.compare_table([report.load_result(p) for p in args.results], args.baseline)
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
