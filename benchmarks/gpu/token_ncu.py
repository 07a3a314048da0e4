"""The token decode's launches, once warm, for a profiler: one row of the Llama-3.1-8B attention geometry (32/8 heads,
D=128, bf16, 16-token pages handed out in order, as decode_profile.py lays them out by default), 98%, with the
counting rule (passes 1) and the sampled threshold (passes 0), each run twice (the first compiles). Under Nsight
Compute, e.g.

    ncu --clock-control none --kernel-name _logits_kernel --launch-skip 1 --launch-count 1 \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \\
        python benchmarks/gpu/token_ncu.py [--n 131072] [--rows 1]
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=131072, help="context length in tokens")
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--sparsity", type=float, default=0.98)
    a = ap.parse_args(argv)
    if a.n < 1 or a.rows < 1 or not 0.0 <= a.sparsity < 1.0:
        raise SystemExit(f"--n {a.n} and --rows {a.rows} must be >= 1 and --sparsity {a.sparsity} in [0, 1)")
    if not torch.cuda.is_available():
        raise SystemExit("token_ncu.py runs CUDA kernels for a profiler: no CUDA device here")
    import decode_profile as dp
    from cab_vllm.ops import token_decode as td

    per_row = -(-a.n // 16)
    bt = dp.page_ids(a.rows * per_row, a.rows * per_row + 1, "asc").view(a.rows, per_row).cuda()
    kv = torch.randn(2, a.rows * per_row + 1, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(a.rows, 32, 128, device="cuda", dtype=torch.bfloat16) * 2.0
    sl = torch.full((a.rows,), a.n, dtype=torch.int32, device="cuda")
    kp = torch.full((a.rows,), max(1, round(a.n * (1 - a.sparsity))), dtype=torch.int32, device="cuda")
    scratch = td.token_scratch(a.rows, 32, 8, 128, a.n, "cuda", passes=0)  # (partials for either rule)
    out = torch.empty_like(q)
    for passes in (1, 0):
        for _ in range(2):
            td.token_decode(q, kv[0], kv[1], bt, sl, kp, 1 / math.sqrt(128), out, scratch=scratch, passes=passes)
    torch.cuda.synchronize()
    print("ran passes 1 and 0 twice each", flush=True)


if __name__ == "__main__":
    main()
