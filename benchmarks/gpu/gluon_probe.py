"""Does this machine's Triton run Gluon kernels (triton.experimental.gluon: explicit register layouts, mma_v2 on
operands loaded straight into the tensor cores' layouts)? One 16x64 @ 64x128 product whose right operand is 4-bit
codes made float16 in registers (the bit trick 0x6400 | nibble = 1024 + nibble), checked against PyTorch.

    python benchmarks/gpu/gluon_probe.py      (a CUDA GPU; exit status 0 when it matches)
"""
import sys
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2


@gluon.jit
def mm(a_ptr, b_ptr, c_ptr):
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 4], instr_shape=[16, 8])
    AL: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    BL: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    am = gl.arange(0, 16, layout=gl.SliceLayout(1, AL))
    ak = gl.arange(0, 64, layout=gl.SliceLayout(0, AL))
    a = gl.load(a_ptr + am[:, None] * 64 + ak[None, :])
    bk = gl.arange(0, 64, layout=gl.SliceLayout(1, BL))
    bn = gl.arange(0, 128, layout=gl.SliceLayout(0, BL))
    byte = gl.load(b_ptr + bk[:, None] * 128 + bn[None, :])
    b = ((byte & 15).to(gl.int16) | 0x6400).to(gl.float16, bitcast=True) - 1024.0
    acc = gl.zeros([16, 128], gl.float32, MMA)
    acc = mma_v2(a, b, acc)
    cm = gl.arange(0, 16, layout=gl.SliceLayout(1, MMA))
    cn = gl.arange(0, 128, layout=gl.SliceLayout(0, MMA))
    gl.store(c_ptr + cm[:, None] * 128 + cn[None, :], acc)


def main():
    print("triton", triton.__version__, "torch", torch.__version__)
    a = torch.randn(16, 64, device="cuda", dtype=torch.float16)
    codes = torch.randint(0, 256, (64, 128), device="cuda", dtype=torch.uint8)
    c = torch.empty(16, 128, device="cuda", dtype=torch.float32)
    mm[(1,)](a, codes, c, num_warps=4)
    ref = a.float() @ (codes & 15).float()
    err = (c - ref).abs().max().item()
    print("gluon mma_v2 max err", err)
    sys.exit(0 if err < 1e-2 else 1)


if __name__ == "__main__":
    main()
