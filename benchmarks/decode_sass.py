"""How long is the decode step's instruction stream on a Hopper GPU? Compiled here, on any machine (no GPU needed).

    python benchmarks/decode_sass.py [--n 131072] [--page 16] [--warps 4] [--maxnreg 128] [--json OUT]

On the H200 the decode launch is bound by the instructions each warp issues (Nsight Compute: one instruction per
~12 cycles per warp, DRAM at 20% of its peak; BENCHMARKS.md), so the instructions of its loop over key blocks are a
figure to watch. This compiles the engine's one-launch decode step (ops.decode.step_launch, prompt rule, one row,
the Llama-3.1-8B attention geometry: 32/8 heads, D=128, bf16, a paged cache of `--page`-token pages, 95%) with
Triton's own compiler for sm_90 and the ptxas it ships, disassembles it with the cuobjdump it ships, and prints the
kernel's SASS instruction count and those of the loop over key blocks (the backward branch whose body holds the
tensor-core instructions), with its most frequent opcodes. Run without TRITON_INTERPRET. Counts come from this
machine's Triton (the GPU machine's may differ by a few percent); compare variants with the same one.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import subprocess
import tempfile

import torch

HQ, HKV, D, BS = 32, 8, 128, 64
PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int32: "*i32",
       torch.int16: "*i16", torch.int64: "*i64", torch.uint8: "*u8", torch.float8_e4m3fn: "*fp8e4nv"}


def capture_launch(n: int, page: int) -> tuple[tuple, dict]:
    """The positional arguments and keywords ops.decode.step_launch passes its kernel for one prompt-rule row of n
    tokens (CPU tensors: nothing runs)."""
    import cab_vllm.ops.decode as dec
    from cab_vllm.backend.attention import DecodeWorkspace, PromptTable
    from cab_vllm.config import CABConfig

    got = {}

    class Recorder:
        def __getitem__(self, grid):
            return lambda *a, **kw: got.update(args=a, kw=kw)

    real, dec._decode_step_kernel = dec._decode_step_kernel, Recorder()
    try:
        pages = math.ceil(n / page)
        kv = torch.empty(2, pages + 1, page, HKV, D, dtype=torch.bfloat16)  # vLLM's [2, pages, ...] KV tensor
        bt = torch.zeros(1, pages, dtype=torch.int32)
        sl = torch.full((1,), n, dtype=torch.int32)
        q = torch.empty(1, HQ, D, dtype=torch.bfloat16)
        m = math.ceil(n / BS)
        cfg = CABConfig(sparsity=0.95)
        ws, table = DecodeWorkspace(1, HQ, HKV, D, m, "cpu"), PromptTable(1, HKV, m, "cpu")
        one = torch.ones(1, dtype=torch.int32)
        sel = dec.Selection(one * int(cfg.keep_counts(m)[-1]), ws.scores[:1], cfg.sink_blocks, cfg.local_blocks,
                            cfg.seed)
        routes = dec.DecodeRoutes(one * dec.MODE_PROMPT, one * 0, table.idx, table.cnt, one * m, ws.sel_idx[:1],
                                  ws.sel_cnt[:1], one * 0)
        dec.step_launch(q, kv[0], kv[1], bt, sl, routes.sel_idx, routes.sel_cnt, block_size=BS, routes=routes,
                        select=sel, scale=1 / math.sqrt(D), num_splits=ws.splits(1), out=torch.empty_like(q),
                        lse=ws.lse[:1], scratch=ws.partials(1))
    finally:
        dec._decode_step_kernel = real
    return got["args"], got["kw"]


def compile_sass(args: tuple, kw: dict, maxnreg: int | None, fn=None) -> str:
    """SASS of the decode kernel (or another @triton.jit kernel ``fn``) compiled for sm_90 with these launch
    arguments, specialized as a launch on a GPU would be (pointers and integers divisible by 16 marked so, integers
    equal to 1 made constants)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import cab_vllm.ops.decode as dec

    fn = dec._decode_step_kernel if fn is None else fn
    kw = dict(kw)
    opts = {"num_warps": kw.pop("num_warps", 4), "num_stages": kw.pop("num_stages", 3)}  # (Triton's defaults)
    if maxnreg:
        opts["maxnreg"] = maxnreg
    kw.pop("maxnreg", None)
    names = [a for a in fn.arg_names if a not in kw]
    sig, attrs, consts = {}, {}, dict(kw)
    for name, a in zip(names, args, strict=True):
        i = fn.arg_names.index(name)
        if isinstance(a, torch.Tensor):
            sig[name], attrs[(i,)] = PTR[a.dtype], [["tt.divisibility", 16]]
        elif isinstance(a, bool):
            sig[name] = "i1"
        elif isinstance(a, int):
            if a == 1 and i not in fn.do_not_specialize:
                sig[name], consts[name] = "constexpr", 1
                continue
            sig[name] = "i64" if abs(a) >= 2**31 else "i32"
            if a % 16 == 0 and i not in fn.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32"
    sig.update({k: "constexpr" for k in kw})
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    _LAST[0] = k
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout


_LAST: list = [None]


def last_compiled():
    """The kernel compile_sass compiled last (its cubin for cuobjdump -res-usage, its metadata's shared memory)."""
    return _LAST[0]


def analyse(sass: str, mma: str = "HMMA") -> dict:
    """Instruction count of the kernel and of its loop over key blocks (the longest backward branch whose body holds
    tensor-core instructions: opcodes containing ``mma``; "MMA" also counts Hopper's HGMMA), with the loop's opcodes
    by frequency."""
    lines = [ln for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", ln)]
    addr = {int(re.match(r"\s+/\*([0-9a-f]+)\*/", ln).group(1), 16): i for i, ln in enumerate(lines)}
    loops = []
    for i, ln in enumerate(lines):
        t = re.search(r"BRA\s+(?:\S+\s+)?`?\(?0x([0-9a-f]+)", ln)
        if t and int(t.group(1), 16) in addr and addr[int(t.group(1), 16)] < i:
            body = lines[addr[int(t.group(1), 16)]: i + 1]
            if any(mma in b for b in body):
                loops.append(body)
    if not loops:
        raise RuntimeError("no loop with tensor-core instructions found in the decode kernel's SASS")

    def opcode(ln: str) -> str:
        text = re.sub(r"^@!?U?P\w+\s+", "", ln.split("*/")[1].strip())
        return text.split(" ")[0].split(".")[0]

    body = max(loops, key=len)
    return {"instructions": len(lines), "loop_instructions": len(body),
            "loop_opcodes": collections.Counter(opcode(b) for b in body).most_common(12)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=131072, help="the row's context length in tokens")
    ap.add_argument("--page", type=int, default=16, help="tokens per page of the KV cache (vLLM's block size)")
    ap.add_argument("--warps", type=int, default=None, help="warps per program (ops.decode.DECODE_WARPS)")
    ap.add_argument("--maxnreg", type=int, default=None, help="registers per thread at most")
    ap.add_argument("--json", default=None, help="also write the result here")
    a = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("decode_sass.py compiles for a GPU: run it without TRITON_INTERPRET")
    if a.n < 1 or a.page < 1:
        ap.error("--n and --page must be >= 1")
    import cab_vllm.ops.decode as dec

    if a.warps is not None:
        dec.DECODE_WARPS = a.warps
    args, kw = capture_launch(a.n, a.page)
    res = {"n": a.n, "page": a.page, "warps": kw["num_warps"], "maxnreg": a.maxnreg,
           **analyse(compile_sass(args, kw, a.maxnreg))}
    print(f"n={a.n} page={a.page} warps={res['warps']} maxnreg={a.maxnreg or '-'}: {res['instructions']} SASS "
          f"instructions, {res['loop_instructions']} in the loop over key blocks; loop opcodes: "
          + ", ".join(f"{op} {c}" for op, c in res["loop_opcodes"]))
    if a.json:
        json.dump(res, open(a.json, "w"))


if __name__ == "__main__":
    main()
