"""Does the traffic around a long prompt move its chunks, and its answer? One engine (8B geometry, weights drawn as a
fresh model's, greedy) runs a long prompt alone, then the same prompt behind short requests that decode while it is
prefilled (they take tokens of every step's budget), and prints, as one JSON line, the long prompt's prefill chunk ends
in both runs (from CAB's step trace) and whether its generated tokens agree.

    python3 benchmarks/gpu/chunk_invariance.py --backend CUSTOM --scheduler cab --out OUT.jsonl
    python3 benchmarks/gpu/chunk_invariance.py --backend CUSTOM --scheduler vllm --out OUT.jsonl
    CAB_BUDGET_WINDOW=4 python3 benchmarks/gpu/chunk_invariance.py --cab-budget adaptive --out OUT.jsonl

With --scheduler cab every chunk but the last ends on a multiple of 64 tokens; with vLLM's scheduler the short
requests' tokens move the ends inside 64-token blocks. --cab-budget adaptive sends the long prompt under the adaptive
budget, whose windows (CAB_BUDGET_WINDOW blocks) CABScheduler's chunks end on (off_window: the ends that do not).
The generated tokens can still differ for reasons that are not CAB's (vLLM's GEMMs are not batch-invariant: the same
row computed beside other rows rounds differently); --backend FLASH_ATTN runs the same requests as that control (no
trace there).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def chunk_ends(trace_dir: str, long_len: int) -> list[list[int]]:
    """The prefill chunk ends of the long prompt (rows with more than one query token and a context past the short
    prompts'), split at each time it reaches its full length."""
    runs: list[list[int]] = [[]]
    for f in sorted(Path(trace_dir).glob("*.log")):
        for line in f.read_text().splitlines():
            _pid, ev = line.split(" ", 1)
            if not ev.startswith("plan "):
                continue
            for q_len, seq_len, *_ in json.loads(ev[5:]):
                if q_len > 1 and seq_len > 4096:
                    runs[-1].append(seq_len)
                    if seq_len == long_len:
                        runs.append([])
    return [r for r in runs if r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=("CUSTOM", "FLASH_ATTN"), default="CUSTOM")
    ap.add_argument("--scheduler", choices=("vllm", "cab"), default="cab")
    ap.add_argument("--long", type=int, default=40_000, help="tokens of the long prompt")
    ap.add_argument("--shorts", type=int, default=12, help="short requests beside it (300 tokens, 400 generated)")
    ap.add_argument("--budget", type=int, default=4096, help="max_num_batched_tokens")
    ap.add_argument("--sparsity", type=float, default=0.95)
    ap.add_argument("--cab-budget", choices=("fixed", "adaptive"), default="fixed",
                    help="the long prompt's cab_budget (adaptive: windows of CAB_BUDGET_WINDOW blocks)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if a.long <= 4096:
        ap.error("--long must be more than 4096 tokens")
    trace = tempfile.mkdtemp()
    if a.backend == "CUSTOM":
        os.environ["CAB_TRACE_DIR"] = trace
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    from engine_bench import LLAMA_8B, redraw_weights
    from vllm import LLM, SamplingParams

    from cab_vllm.backend.plan import EngineSettings
    from cab_vllm.backend.scheduler import QUALNAME

    d = tempfile.mkdtemp()
    json.dump(LLAMA_8B, open(os.path.join(d, "config.json"), "w"))
    t0 = time.time()
    llm = LLM(d, load_format="dummy", attention_backend=a.backend, max_model_len=a.long + 1024,
              max_num_batched_tokens=a.budget, enable_prefix_caching=False, skip_tokenizer_init=True, seed=0,
              gpu_memory_utilization=0.9,
              **({"scheduler_cls": QUALNAME} if a.scheduler == "cab" else {}))
    llm.apply_model(redraw_weights)
    init_s = time.time() - t0
    rng = random.Random(0)
    long_ids = [rng.randrange(3, 49152) for _ in range(a.long)]
    shorts = [[rng.randrange(3, 49152) for _ in range(300)] for _ in range(a.shorts)]
    extra = {"cab_sparsity": a.sparsity, "cab_budget": a.cab_budget} if a.backend == "CUSTOM" else None
    cfg = EngineSettings.from_env().cfg  # the engine's CAB_* values, as the backend and CABScheduler read them
    window = cfg.block_size * (cfg.budget_window if a.cab_budget == "adaptive" else 1)
    p_long = SamplingParams(max_tokens=32, temperature=0.0, extra_args=extra)
    p_short = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    alone = llm.generate([{"prompt_token_ids": long_ids}], [p_long], use_tqdm=False)[0].outputs[0].token_ids
    outs = llm.generate([{"prompt_token_ids": s} for s in shorts] + [{"prompt_token_ids": long_ids}],
                        [p_short] * len(shorts) + [p_long], use_tqdm=False)
    beside = outs[-1].outputs[0].token_ids
    ends = chunk_ends(trace, a.long) if a.backend == "CUSTOM" else []
    row = dict(backend=a.backend, scheduler=a.scheduler, long=a.long, shorts=a.shorts, budget=a.budget,
               sparsity=a.sparsity if a.backend == "CUSTOM" else None, init_s=round(init_s, 1),
               cab_budget=a.cab_budget if a.backend == "CUSTOM" else None, window_tokens=window,
               chunk_ends=ends, off_block=[[e for e in r[:-1] if e % cfg.block_size] for r in ends],
               off_window=[[e for e in r[:-1] if e % window] for r in ends],
               alone=list(alone), beside=list(beside), same=list(alone) == list(beside),
               first_difference=next((i for i, (x, y) in enumerate(zip(alone, beside)) if x != y), None))
    print("INVARIANCE", json.dumps({k: v for k, v in row.items() if k not in ("alone", "beside")}),
          flush=True)
    with open(a.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
