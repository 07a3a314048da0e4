"""Percentiles, the summary of one run, and the markdown comparison of several runs.

Percentiles interpolate linearly between order statistics (numpy's default), over successful requests only;
ITL percentiles pool the gaps of every successful request (as vLLM's benchmark does). Failed requests are
counted by kind and never enter a latency distribution.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from loadtests.client import RequestRecord

PERCENTILES = (50, 90, 99)
SUMMARY_VERSION = 1
METRICS = ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms")


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100) of ``values`` with linear interpolation; NaN for no values."""
    if not 0 <= p <= 100:
        raise ValueError(f"p={p} must be in [0, 100]")
    xs = sorted(values)
    if not xs:
        return math.nan
    rank = p / 100 * (len(xs) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def distribution(seconds: Sequence[float]) -> dict:
    """{n, mean, min, max, p50, p90, p99} in milliseconds (None when there are no values)."""
    ms = [1000.0 * s for s in seconds]
    out: dict = {"n": len(ms)}
    if not ms:
        return out | {k: None for k in ("mean", "min", "max", *(f"p{p}" for p in PERCENTILES))}
    out |= {"mean": sum(ms) / len(ms), "min": min(ms), "max": max(ms)}
    out |= {f"p{p}": percentile(ms, p) for p in PERCENTILES}
    return out


def summarize(records: Sequence[RequestRecord], duration: float, label: str, config: dict) -> dict:
    """The JSON summary of a run: counts (failures by kind, first messages), throughput over ``duration``
    (first send to last end, failed requests included), latency distributions of the successful requests."""
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = [r.prompt_tokens if r.prompt_tokens is not None else r.prompt_tokens_target for r in ok]
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: None)
    return {
        "version": SUMMARY_VERSION,
        "label": label,
        "config": config,
        "requests": {
            "total": len(records),
            "ok": len(ok),
            "failed": len(failed),
            "errors": dict(Counter(r.error_kind for r in failed)),
            "first_errors": [{"index": r.index, "kind": r.error_kind, "error": r.error} for r in failed[:5]],
        },
        "duration_s": duration,
        "prompt_tokens_mean": sum(prompt_tokens) / len(prompt_tokens) if prompt_tokens else None,
        "prompt_tokens_from_server": all(r.prompt_tokens is not None for r in ok) if ok else None,
        "output_tokens_total": out_tokens,
        "output_tokens_mean": out_tokens / len(ok) if ok else None,
        "throughput": {
            "requests_per_s": per_s(len(ok)),
            "output_tokens_per_s": per_s(out_tokens),
            "total_tokens_per_s": per_s(out_tokens + sum(prompt_tokens)),
        },
        "ttft_ms": distribution([r.ttft for r in ok]),
        "itl_ms": distribution([g for r in ok for g in r.itl]),
        "tpot_ms": distribution([r.tpot for r in ok if r.tpot is not None]),
        "e2e_ms": distribution([r.e2e for r in ok]),
    }


def load_summary(path: str | Path) -> dict:
    """Read a summary written by ``run``; ValueError with the path when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        s = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(s, dict) or s.get("version") != SUMMARY_VERSION or "label" not in s:
        raise ValueError(f"{path}: not a load-test summary (expected the .json that `run` writes, "
                         f"not the per-request .jsonl)")
    return s


def _group(s: dict) -> tuple:
    """The workload of a run (config["rate"] is None for a closed loop)."""
    c = s["config"]
    return (c["endpoint"], c["prompt_tokens"], c["output_tokens"], c["concurrency"], c["rate"])


def _fmt(x: float | None, nd: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.{nd}f}"


def _ratio(x: float | None, base: float | None) -> str:
    if x is None or base is None or not base:
        return "—"
    return f"{x / base:.2f}×"


COLUMNS = (  # (header, getter)
    ("TTFT p50 ms", lambda s: s["ttft_ms"]["p50"]),
    ("TTFT p90", lambda s: s["ttft_ms"]["p90"]),
    ("TTFT p99", lambda s: s["ttft_ms"]["p99"]),
    ("ITL p50 ms", lambda s: s["itl_ms"]["p50"]),
    ("ITL p90", lambda s: s["itl_ms"]["p90"]),
    ("ITL p99", lambda s: s["itl_ms"]["p99"]),
    ("E2E p50 ms", lambda s: s["e2e_ms"]["p50"]),
    ("E2E p99", lambda s: s["e2e_ms"]["p99"]),
    ("out tok/s", lambda s: s["throughput"]["output_tokens_per_s"]),
)
RATIOS = (  # (header, getter): run / baseline
    ("TTFT p50", lambda s: s["ttft_ms"]["p50"]),
    ("ITL p50", lambda s: s["itl_ms"]["p50"]),
    ("E2E p50", lambda s: s["e2e_ms"]["p50"]),
    ("out tok/s", lambda s: s["throughput"]["output_tokens_per_s"]),
)


def compare_table(summaries: Sequence[dict], baseline: str | None = None) -> str:
    """Markdown table of two or more runs with ratios to the baseline run of the same workload (endpoint,
    prompt tokens, output tokens, concurrency, rate). baseline: a run label (default: the first run's)."""
    if len(summaries) < 2:
        raise ValueError(f"compare needs two or more runs (got {len(summaries)})")
    labels = [s["label"] for s in summaries]
    baseline = labels[0] if baseline is None else baseline
    if baseline not in labels:
        raise ValueError(f"baseline {baseline!r} is none of the runs' labels {labels}")
    bases: dict[tuple, dict] = {}
    for s in summaries:
        if s["label"] == baseline:
            if _group(s) in bases:
                raise ValueError(f"two runs labelled {baseline!r} have the same workload {_group(s)}")
            bases[_group(s)] = s
    def key(i: int) -> tuple:
        endpoint, prompt, out, conc, rate = _group(summaries[i])
        return (prompt, out, conc or 0, -1.0 if rate is None else rate, endpoint, i)

    order = sorted(range(len(summaries)), key=key)
    head = (["run", "prompt tok", "conc", "ok/total", *(h for h, _ in COLUMNS)]
            + [f"{h} ×{baseline}" for h, _ in RATIOS])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i in order:
        s = summaries[i]
        c, base = s["config"], bases.get(_group(s))
        conc = c["concurrency"] if c["rate"] is None else f"{c['concurrency'] or '∞'} @ {c['rate']}/s"
        row = [s["label"], f"{_fmt(s['prompt_tokens_mean'], 0)}", str(conc),
               f"{s['requests']['ok']}/{s['requests']['total']}"]
        row += [_fmt(get(s)) for _, get in COLUMNS]
        row += [_ratio(get(s), get(base)) if base is not None else "—" for _, get in RATIOS]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append(f"Ratios are run / `{baseline}` on the same workload: below 1.00× a latency is lower, above "
                 f"1.00× throughput is higher. Percentiles over successful requests; ok/total counts failures.")
    return "\n".join(lines)
