"""Compile captured Triton launches for a Hopper GPU (sm_90) without one: Triton's code generator, its GPU passes
and ptxas run on any machine, so a kernel that the interpreter runs but the GPU compiler rejects (a global that
is not constexpr, a shape the lowering refuses, too much shared memory) fails here.

    python hopper_compile.py launches.json     (in a process without TRITON_INTERPRET)

launches.json: [{"module": ..., "kernel": ..., "args": [["tensor", "bf16"] | ["int", 5] | ["float", 0.1] |
["bool", true] | ["none"] | ["tensordesc", "bf16", [1, 64, 1, 128]], ...], "constexprs": {...}, "num_warps": 4,
"num_stages": 2}, ...]. Prints one line per launch
(with the registers per thread and spill stores ptxas reports) and exits non-zero when one fails."""

from __future__ import annotations

import importlib
import json
import os
import sys

PTR = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16", "int32": "*i32", "int64": "*i64", "int16": "*i16",
       "uint8": "*u8", "bool": "*i1"}


def none_args(fn, args, constexprs) -> dict:
    """The launch's None arguments (an unused optional input), which Triton compiles as constexpr None."""
    names = [n for n in fn.arg_names if n not in constexprs]
    return {n: None for n, (kind, *_) in zip(names, args) if kind == "none"}
SMEM_LIMIT = 232448  # bytes of shared memory a block may use on an H100 / H200


def signature(fn, args, constexprs) -> dict:
    sig, it = {}, iter(args)
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        kind, *rest = next(it)
        v = rest[0] if rest else None
        if kind == "none":
            sig[name] = "constexpr"
        elif kind == "tensordesc":  # a host tensor descriptor: element type and box
            sig[name] = f"tensordesc<{PTR[v][1:]}[{','.join(str(b) for b in rest[1])}]>"
        elif kind == "tensor":
            sig[name] = PTR[v]
        elif kind == "bool":
            sig[name] = "i1"
        elif kind == "int":
            sig[name] = "i64" if abs(v) >= 2**31 else "i32"
        else:
            sig[name] = "fp32"
    return sig


def registers(ptx: str) -> str:
    """"regs=N spill_stores=B" of the kernel, from the ptxas Triton uses for sm_90 run again with -v (register
    pressure: 255 registers with spills means the tile does not fit a thread's registers)."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    arch = "sm_90a" if ".target sm_90a" in ptx else "sm_90"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        p = subprocess.run([get_ptxas(90).path, f"-arch={arch}", "-v", f.name, "-o", os.devnull], capture_output=True,
                           text=True)
    log = p.stdout + p.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores", log)
    return f"regs={regs.group(1) if regs else '?'} spill_stores={spill.group(1) if spill else '?'}"


def main(path: str) -> int:
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failed = 0
    for job in json.load(open(path)):
        fn = getattr(importlib.import_module(job["module"]), job["kernel"])
        label = f"{job['kernel']} {sorted(job['constexprs'].items())}"
        cx = {**job["constexprs"], **none_args(fn, job["args"], job["constexprs"])}
        try:
            src = ASTSource(fn=fn, signature=signature(fn, job["args"], job["constexprs"]),
                            constexprs={(fn.arg_names.index(k),): v for k, v in cx.items()})
            opts = {"num_warps": job.get("num_warps", 4)}
            if job.get("num_stages") is not None:
                opts["num_stages"] = job["num_stages"]
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
            smem = k.metadata.shared
            if smem > SMEM_LIMIT:
                raise RuntimeError(f"{smem} bytes of shared memory > {SMEM_LIMIT}")
            print(f"ok {label} shared={smem} {registers(k.asm['ptx'])}")
        except Exception as e:  # noqa: BLE001 - report every launch, then fail
            failed += 1
            print(f"FAILED {label}: {type(e).__name__}: {str(e)[:2000]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
