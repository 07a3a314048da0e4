"""Sweep launch parameters of the Triton sparse prefill (heads per program, warps, stages, the launch options) on
one GPU.

    python benchmarks/tune_prefill.py --n 32768 --sparsity 0 0.95 [--heads 4] [--warps 8 16] [--stages 2]
        [--lazy 0 1] [--reverse 0 1] [--tma 0 1]
Prints ms and TFLOP/s per setting, FA2 (SDPA flash) timed in the same run.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton.testing
from triton.runtime.errors import OutOfResources
from torch.nn.attention import SDPBackend, sdpa_kernel

import cab_vllm
from cab_vllm.ops import prefill


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.0, 0.95])
    ap.add_argument("--heads", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3, 4])
    # the launch options' defaults are the kernel's (prefill.LAUNCH_OPTIONS)
    dflt = prefill.LAUNCH_OPTIONS
    ap.add_argument("--lazy", type=int, nargs="+", default=[dflt["lazy_rescale"]], choices=[0, 1],
                    help="rescale the accumulator only when a row's maximum grows by more than 2**8 (launch option)")
    ap.add_argument("--reverse", type=int, nargs="+", default=[dflt["reverse_tiles"]], choices=[0, 1],
                    help="programs take the tiles last to first: longest selections first (launch option)")
    ap.add_argument("--tma", type=int, nargs="+", default=[dflt["tma"]], choices=[0, 1],
                    help="key and value blocks as tensor-descriptor boxes (bulk copies; launch option)")
    a = ap.parse_args()
    n, hq, hkv, d = a.n, 32, 8, 128
    q = torch.randn(1, hq, n, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16)
    flops = 4.0 * hq * d * n * n / 2
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        kx, vx = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
        fa2 = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, kx, vx, is_causal=True),
                                      return_mode="median")
    print(f"fa2 {fa2:.3f} ms {flops / fa2 / 1e9:.0f} TFLOP/s")
    for s in a.sparsity:
        sel = cab_vllm.select_blocks(q, k, cab_vllm.CABConfig(sparsity=s, policy="random"))
        dens = sel.density()
        ref = cab_vllm.sparse_attention(q, k, v, sel)
        for heads, warps, stages, lazy, rev, tma in itertools.product(a.heads, a.warps, a.stages, a.lazy, a.reverse,
                                                                      a.tma):
            prefill.LAUNCH_OVERRIDE.update(heads=heads, num_warps=warps, num_stages=stages, lazy_rescale=lazy,
                                           reverse_tiles=rev, tma=tma)
            tag = f"s={s} heads={heads} warps={warps} stages={stages} lazy={lazy} reverse={rev} tma={tma}"
            try:
                out = cab_vllm.sparse_attention(q, k, v, sel)
                err = float((out.float() - ref.float()).norm() / ref.float().norm())
                ms = triton.testing.do_bench(lambda: cab_vllm.sparse_attention(q, k, v, sel), return_mode="median")
                print(f"{tag}: {ms:.3f} ms "
                      f"{flops * dens / ms / 1e9:.0f} TFLOP/s err={err:.1e}", flush=True)
            except (OutOfResources, RuntimeError, ValueError) as e:  # an infeasible config is reported, not fatal
                print(f"{tag}: failed {type(e).__name__}: {str(e)[:80]}")
        prefill.LAUNCH_OVERRIDE.clear()


if __name__ == "__main__":
    main()
