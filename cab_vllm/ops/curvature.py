"""Forman-style curvature of the causal coarse block graph, F = 4A - D_i - D_j + 3 A.A.

Choices (the seed leaves them open):
- A is the row-stochastic estimated block attention (coarsen.estimate_block_attention), so a weight is the
  share of query block i's attention that goes to key block j. Causal: A[i, j] = 0 for j > i.
- D_i is the out-degree of query block i (row sum; 1 for a softmaxed row) and D_j the in-degree of key
  block j (column sum: how much attention the block collects from all later queries).
- T = A.A weights two-hop paths i -> k -> j (only j <= k <= i contribute for a causal A).
- GQA: the policies build one graph per KV head from the mean of its query heads' A (still row-stochastic).
- Most-negative F marks "bridges": weak direct links between well-connected blocks with few shared paths.
  Note: with D_i = 1, F = 4A + 3T - 1 - colsum_j, which on real models ranks like the column degree
  (../shared/FACTS.md): most-negative F then selects coarse heavy hitters.

The Triton kernel is a tiled product that skips the zero half (tiles above the diagonal and the k-range
outside [j, i]) and applies the epilogue in registers. Twin: reference.curvature_ref.
"""

from __future__ import annotations

import torch

from cab_vllm.ops._triton import HAS_TRITON, check, resolve_impl
from cab_vllm.ops.reference import curvature_ref

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _curvature_kernel(
        a_ptr, f_ptr, rowdeg_ptr, coldeg_ptr, m,
        stride_ab, stride_ai, stride_fb, stride_fi, stride_db,
        TILE: tl.constexpr,
    ):
        bh = tl.program_id(0).to(tl.int64)
        ti = tl.program_id(1)
        tj = tl.program_id(2)
        i = ti * TILE + tl.arange(0, TILE)
        j = tj * TILE + tl.arange(0, TILE)
        i_ok = i < m
        j_ok = j < m
        fbase = f_ptr + bh * stride_fb
        if tj > ti:  # strictly above the diagonal: nothing causal here
            tl.store(fbase + i[:, None] * stride_fi + j[None, :], tl.full([TILE, TILE], float("inf"), tl.float32),
                     mask=i_ok[:, None] & j_ok[None, :])
        else:
            abase = a_ptr + bh * stride_ab
            acc = tl.zeros([TILE, TILE], dtype=tl.float32)
            for tk in range(tj, ti + 1):  # A[i, k] = 0 for k > i and A[k, j] = 0 for k < j
                kk = tk * TILE + tl.arange(0, TILE)
                k_ok = kk < m
                a_ik = tl.load(abase + i[:, None] * stride_ai + kk[None, :], mask=i_ok[:, None] & k_ok[None, :],
                               other=0.0)
                a_kj = tl.load(abase + kk[:, None] * stride_ai + j[None, :], mask=k_ok[:, None] & j_ok[None, :],
                               other=0.0)
                acc += tl.dot(a_ik, a_kj, input_precision="ieee")
            a_ij = tl.load(abase + i[:, None] * stride_ai + j[None, :], mask=i_ok[:, None] & j_ok[None, :], other=0.0)
            di = tl.load(rowdeg_ptr + bh * stride_db + i, mask=i_ok, other=0.0)
            dj = tl.load(coldeg_ptr + bh * stride_db + j, mask=j_ok, other=0.0)
            f = 4.0 * a_ij - di[:, None] - dj[None, :] + 3.0 * acc
            f = tl.where(j[None, :] <= i[:, None], f, float("inf"))
            tl.store(fbase + i[:, None] * stride_fi + j[None, :], f, mask=i_ok[:, None] & j_ok[None, :])


def curvature(a: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Curvature of causal block graphs.

    a [..., M, M] float32, zero above the diagonal. Returns F [..., M, M] float32 with +inf above the
    diagonal (so "most negative" never picks a non-causal block).
    """
    check(a.dim() >= 2 and a.shape[-1] == a.shape[-2], f"a must be [..., M, M], got {tuple(a.shape)}")
    if resolve_impl(impl, a) == "torch":
        return curvature_ref(a)
    m = a.shape[-1]
    lead = a.shape[:-2]
    a3 = a.float().reshape(-1, m, m).contiguous()
    rowdeg = a3.sum(-1).contiguous()
    coldeg = a3.sum(-2).contiguous()
    f = torch.empty_like(a3)
    tile = 64 if m >= 64 else 16
    nt = triton.cdiv(m, tile)
    _curvature_kernel[(a3.shape[0], nt, nt)](
        a3, f, rowdeg, coldeg, m,
        a3.stride(0), a3.stride(1), f.stride(0), f.stride(1), rowdeg.stride(0),
        TILE=tile, num_warps=4,
    )
    return f.reshape(*lead, m, m)
