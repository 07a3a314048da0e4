"""How long are the token decode's instruction streams on a Hopper GPU? Compiled here, on any machine (no GPU needed).

    python benchmarks/token_sass.py [--n 131072] [--page 16] [--kernels _logits_kernel,_rescore_kernel] [--json OUT]

Records the launches ops.token_decode makes for one row of the Llama-3.1-8B attention geometry (32/8 heads, D=128,
bf16, a paged cache of `--page`-token pages, 98%), exactly scored, with the 4-bit key copy (codes=, with the
copy's nibbles made float16 in Triton and with CODE_ASM's inline PTX), with the float8 one, and with a sampled threshold
(passes=0: its sampling, threshold and one-pass launches), compiles each kernel
for sm_90 with Triton's own compiler and the ptxas it ships (benchmarks/decode_sass.py), and prints per kernel and
variant its registers, shared memory, SASS instruction count and those of its main loop (the backward branch whose
body holds tensor-core instructions; none for kernels without one), with the loop's most frequent opcodes. Run without
TRITON_INTERPRET.
Counts come from this machine's Triton (the GPU machine's may differ by a few percent); compare variants with the
same one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import decode_sass  # noqa: E402  (beside this script)

HQ, HKV, D = 32, 8, 128
KERNELS = ("_logits_kernel", "_select_kernel", "_count_kernel", "_rescore_kernel", "_attend_list_kernel",
           "_sample_kernel", "_sample_select_kernel", "_fused_attend_kernel")


def record(n: int, page: int, codes: str | None, sparsity: float = 0.98, passes: int | None = None) -> dict:
    """{kernel name: (positional arguments, keywords)} of one token_decode call on CPU tensors (nothing runs)."""
    import cab_vllm.ops.token_decode as td
    from cab_vllm.ops.key_codes import key_codes

    got: dict = {}

    class Recorder:
        def __init__(self, name: str):
            self.name = name

        def __getitem__(self, grid):
            return lambda *a, **kw: got.setdefault(self.name, (a, kw))

    real = {k: getattr(td, k) for k in KERNELS}
    resolve = td.resolve_impl
    try:
        for k in KERNELS:
            setattr(td, k, Recorder(k))
        td.resolve_impl = lambda *a, **kw: "triton"  # (CPU tensors: the launcher's Triton path, recorded)
        pages = math.ceil(n / page) + 1
        kc = torch.empty(pages, page, HKV, D, dtype=torch.bfloat16)
        bt = torch.zeros(1, pages, dtype=torch.int32)
        q = torch.empty(1, HQ, D, dtype=torch.bfloat16)
        keep = torch.full((1,), max(1, round(n * (1 - sparsity))), dtype=torch.int32)
        td.token_decode(q, kc, kc, bt, torch.full((1,), n, dtype=torch.int32), keep, 1 / math.sqrt(D),
                        torch.empty_like(q), scratch=td.token_scratch(1, HQ, HKV, D, n, "cpu", passes),
                        codes=key_codes(pages, page, HKV, D, "cpu", codes) if codes else None, passes=passes)
    finally:
        for k, f in real.items():
            setattr(td, k, f)
        td.resolve_impl = resolve
    return {k: (a, kw, real[k]) for k, (a, kw) in got.items()}


def resources(args: tuple, kw: dict, fn) -> dict:
    """Registers (cuobjdump -res-usage) and shared memory (static and dynamic) of fn compiled for sm_90, with its SASS
    figures."""
    import triton

    sass = decode_sass.compile_sass(args, kw, None, fn=fn)
    try:
        figures = decode_sass.analyse(sass)
    except RuntimeError:  # no loop with tensor-core instructions (the counting and threshold kernels)
        lines = [ln for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", ln)]
        figures = {"instructions": len(lines), "loop_instructions": None, "loop_opcodes": None}
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    k = decode_sass.last_compiled()
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    regs = re.findall(r"REG:(\d+)", usage)
    return {"registers": int(regs[0]) if regs else None, "shared": int(k.metadata.shared), **figures}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=131072, help="the row's context length in tokens")
    ap.add_argument("--page", type=int, default=16, help="tokens per page of the KV cache (vLLM's block size)")
    ap.add_argument("--kernels", default=",".join(KERNELS), help=f"comma list of {', '.join(KERNELS)}")
    ap.add_argument("--json", default=None, help="write the figures here")
    a = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET: this compiles for a GPU")
    names = a.kernels.split(",")
    bad = [k for k in names if k not in KERNELS]
    if bad:
        ap.error(f"--kernels: unknown {', '.join(bad)} (expected some of {', '.join(KERNELS)})")
    out = {}
    for variant, codes, asm, passes in (("exact", None, False, None), ("int4", "int4", False, None),
                                        ("int4_asm", "int4", True, None), ("fp8", "fp8", False, None),
                                        ("sampled", None, False, 0)):
        launches = record(a.n, a.page, codes, passes=passes)
        for name in names:
            if name not in launches or (asm and name != "_logits_kernel"):
                continue
            args, kw, fn = launches[name]
            if "CODE_ASM_T" in kw:
                kw = dict(kw, CODE_ASM_T=asm)
            r = resources(args, kw, fn)
            out[f"{name}/{variant}"] = r
            print(f"{name:22s} {variant:9s} regs {r['registers']} smem {r['shared']} instructions {r['instructions']} "
                  f"loop {r['loop_instructions']} {r['loop_opcodes'] or ''}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
