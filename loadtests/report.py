"""The comparison of ``vllm bench serve`` results (its saved JSON), in its own metric names.

A result is the JSON that ``vllm bench serve --save-result`` writes (by ``python -m loadtests run`` or by hand):
``completed``, ``failed``, ``{mean,median,std,p50,p90,p99}_{ttft,tpot,itl,e2el}_ms``, ``request_throughput``,
``output_throughput``, ``total_token_throughput``, ``request_goodput`` (with ``--goodput``), ``max_concurrency``,
``request_rate``, ``label``. Runs are matched by workload (endpoint, prompt tokens, output tokens, concurrency,
rate) and compared with the baseline label's run of the same workload (e.g. CAB / FLASH_ATTN).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

METRICS = ("ttft", "tpot", "itl", "e2el")
COLUMNS = ("median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "median_itl_ms", "p99_itl_ms", "median_e2el_ms",
           "p99_e2el_ms", "request_throughput", "output_throughput", "request_goodput")
RATIOS = ("median_ttft_ms", "median_tpot_ms", "median_itl_ms", "median_e2el_ms", "output_throughput")


def load_result(path: str | Path) -> dict:
    """Read a bench serve result JSON; ValueError naming the path when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        r = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(r, dict) or not {"completed", "mean_ttft_ms", "request_throughput"} <= set(r):
        raise ValueError(f"{path}: not a `vllm bench serve` result (expected the JSON of --save-result)")
    r.setdefault("label", None)
    r["label"] = r["label"] or r.get("backend") or path.stem
    return r


def workload(r: dict) -> tuple:
    """(endpoint, prompt tokens, output tokens, concurrency, rate or None): from the scenario that
    ``python -m loadtests run`` records, else from bench serve's own fields (mean tokens per completed request)."""
    s = r.get("loadtests", {}).get("scenario")
    rate = r.get("request_rate")
    rate = None if rate in (None, "inf") or (isinstance(rate, float) and math.isinf(rate)) else float(rate)
    if s:
        return (s["endpoint"], s["prompt_tokens"], s["output_tokens"], s["concurrency"], rate)
    n = r["completed"] or 1
    return (r.get("backend", "?"), round(r.get("total_input_tokens", 0) / n), round(r.get("total_output_tokens", 0) / n),
            r.get("max_concurrency"), rate)


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.3g}"


def _ratio(x, base) -> str:
    if x is None or base is None or not base:
        return "—"
    return f"{x / base:.2f}×"


def compare_table(results: Sequence[dict], baseline: str | None = None) -> str:
    """Markdown table of two or more bench serve results with ratios to the baseline run of the same workload.
    baseline: a run label (default: the first run's)."""
    if len(results) < 2:
        raise ValueError(f"compare needs two or more runs (got {len(results)})")
    labels = [r["label"] for r in results]
    baseline = labels[0] if baseline is None else baseline
    if baseline not in labels:
        raise ValueError(f"baseline {baseline!r} is none of the runs' labels {labels}")
    bases: dict[tuple, dict] = {}
    for r in results:
        if r["label"] == baseline:
            if workload(r) in bases:
                raise ValueError(f"two runs labelled {baseline!r} have the same workload {workload(r)}")
            bases[workload(r)] = r

    def key(i: int) -> tuple:
        endpoint, prompt, out, conc, rate = workload(results[i])
        return (prompt, out, conc or 0, -1.0 if rate is None else rate, endpoint, results[i]["label"] != baseline, i)

    head = ["run", "prompt tok", "conc", "ok/total", *COLUMNS, *(f"{c} ×{baseline}" for c in RATIOS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i in sorted(range(len(results)), key=key):
        r = results[i]
        _, prompt, _, conc, rate = workload(r)
        base = bases.get(workload(r))
        load = str(conc) if rate is None else f"{conc or '∞'} @ {rate:g}/s"
        total = r["completed"] + r.get("failed", 0)
        row = [r["label"], str(prompt), load, f"{r['completed']}/{total}", *(_fmt(r.get(c)) for c in COLUMNS)]
        row += [_ratio(r.get(c), base.get(c)) if base is not None else "—" for c in RATIOS]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append(f"`vllm bench serve` metrics (ms; throughput per s). Ratios are run / `{baseline}` on the same "
                 f"workload: below 1.00× a latency is lower, above 1.00× throughput is higher. ok/total counts failed "
                 f"requests; latencies are over completed ones.")
    return "\n".join(lines)
