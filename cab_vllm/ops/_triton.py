"""Shared Triton plumbing: availability, dispatch, and the paged-address helper every kernel uses."""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the library still works on its PyTorch twins
    triton = None
    tl = None
    HAS_TRITON = False

IMPLS = ("auto", "triton", "torch")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str, *tensors: torch.Tensor) -> str:
    """'auto' -> 'triton' when the tensors live on a GPU, else 'torch' (PyTorch: the reference twins, or for the
    attention itself ops.gathered, which reads only the kept blocks).

    'triton' on CPU tensors needs TRITON_INTERPRET=1 set before cab_vllm is imported.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is invalid: expected one of {IMPLS}")
    on_gpu = all(t.is_cuda for t in tensors)
    if impl == "auto":
        return "triton" if (on_gpu and HAS_TRITON) else "torch"
    if impl == "triton":
        if not HAS_TRITON:
            raise RuntimeError("impl='triton' needs the triton package")
        if not on_gpu and not interpreting():
            raise RuntimeError("impl='triton' on CPU tensors needs TRITON_INTERPRET=1 set before importing cab_vllm")
    return impl


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


if HAS_TRITON:

    @triton.jit
    def paged_coords(bt_ptr, stride_bt, seq, pos, mask, page_size):
        """(page id, slot in page) of tokens ``pos`` (where ``mask``) of sequence ``seq``, both int64."""
        page = tl.load(bt_ptr + seq.to(tl.int64) * stride_bt + pos // page_size, mask=mask, other=0)
        return page.to(tl.int64), (pos % page_size).to(tl.int64)
