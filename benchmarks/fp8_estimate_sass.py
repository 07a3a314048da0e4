"""Would a float8 copy of the keys score them in fewer instructions than exact bf16 scores? Compiled here, on any
machine (no GPU needed).

    python benchmarks/fp8_estimate_sass.py [--group-pad 16,64]

A minimal logits loop (a chunk of 1,024 contiguous keys in 128-key steps, one KV head, the group's queries padded
to --group-pad rows; no paging, no counting) compiled for sm_90 with Triton's own compiler and ptxas
(benchmarks/decode_sass.py), three ways: bf16 keys (what the token decode reads today), float8 e4m3 keys with the
queries made float8 too (the tensor cores' float8 dot), and float8 keys made bf16 in registers before a bf16 dot.
Prints shared memory, the SASS instruction count of the kernel and of its main loop (the backward branch whose body
holds the tensor-core instruction), and the loop's most frequent opcodes. With 16 query rows Triton issues HMMA
(mma.sync) and converts float8 operands to half precision first (F2FP); from 64 rows it issues HGMMA, which takes
float8 operands as they are. Run without TRITON_INTERPRET; counts are this machine's Triton's.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import decode_sass  # noqa: E402  (beside this script)

MODES = {0: ("bf16 keys", torch.bfloat16), 1: ("fp8 keys, fp8 queries", torch.float8_e4m3fn),
         2: ("fp8 keys made bf16", torch.float8_e4m3fn)}


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def estimate(q_ptr, k_ptr, z_ptr, n, MODE: tl.constexpr, G: tl.constexpr, D: tl.constexpr, T: tl.constexpr,
                 CH: tl.constexpr):
        g = tl.arange(0, G)
        d = tl.arange(0, D)
        q = tl.load(q_ptr + g[:, None] * D + d[None, :])
        t0 = tl.program_id(0) * CH
        for p0 in range(t0, t0 + CH, T):
            pos = p0 + tl.arange(0, T)
            k = tl.load(k_ptr + pos[:, None].to(tl.int64) * D + d[None, :], mask=(pos < n)[:, None], other=0.0)
            if MODE == 0:
                z = tl.dot(q.to(tl.bfloat16), tl.trans(k))
            elif MODE == 1:
                z = tl.dot(q.to(tl.float8e4nv), tl.trans(k))
            else:
                z = tl.dot(q.to(tl.bfloat16), tl.trans(k.to(tl.bfloat16)))
            tl.store(z_ptr + g[:, None] * n + pos[None, :], z, mask=(pos < n)[None, :])

    return estimate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group-pad", default="16,64", help="query rows per dot (comma list; powers of two >= 16)")
    a = ap.parse_args()
    pads = [int(x) for x in a.group_pad.split(",")]
    if any(p < 16 or p & (p - 1) for p in pads):
        ap.error(f"--group-pad {a.group_pad!r}: each a power of two >= 16")
    decode_sass.PTR.setdefault(torch.float8_e4m3fn, "*fp8e4nv")
    fn = _kernel()
    for gp in pads:
        for mode, (name, dt) in MODES.items():
            q, k, z = torch.zeros(gp, 128), torch.zeros(16, 128, dtype=dt), torch.zeros(16, 16)
            sass = decode_sass.compile_sass((q, k, z, 131072), dict(MODE=mode, G=gp, D=128, T=128, CH=1024,
                                                                     num_warps=4, num_stages=3), None, fn=fn)
            r = decode_sass.analyse(sass, mma="MMA")  # (HMMA, or Hopper's HGMMA)
            shared = decode_sass.last_compiled().metadata.shared
            print(f"{gp:3d} rows  {name:22s}  shared {shared:6d} B  instructions {r['instructions']:4d}  loop (128 "
                  f"keys) {r['loop_instructions']:4d}  {', '.join(f'{o} {c}' for o, c in r['loop_opcodes'][:8])}")


if __name__ == "__main__":
    main()
