"""Budgeted block selection: priorities -> padded, ascending key-block indices + counts.

The output format is shared by every attention path: ``indices [..., M, K]`` int32, ascending, padded with
-1 past ``counts [..., M]`` int32. FlexAttention's BlockMask and our Triton kernels both read it. Selection
runs through torch.topk / torch.sort, which are GPU kernels already, so this op has no Triton twin.
"""

from __future__ import annotations

import torch

from cab_vllm.ops.reference import causal_block_mask

PAD = -1


def forced_mask(m: int, sink_blocks: int, local_blocks: int, device=None) -> torch.Tensor:
    """[M, M] bool: sink blocks (j < sink) and the local window (i - local < j <= i), causal."""
    i = torch.arange(m, device=device)
    sink = i[None, :] < sink_blocks
    local = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - local_blocks)
    return (sink | local) & causal_block_mask(m, device)


def select_topk(priority: torch.Tensor, keep: torch.Tensor, kmax: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``keep[i]`` highest-priority key blocks of every row i.

    priority [..., M, Mk] float (higher first; -inf = never), keep [M] int64 with keep[i] <= number of
    finite-or-+inf entries of row i. Returns (indices [..., M, K] int32 ascending, padded with -1,
    counts [..., M] int32), K = kmax (default max(keep), which costs a device sync; pass it when known).
    """
    if priority.shape[-2] != keep.shape[0]:
        raise ValueError(f"keep has {keep.shape[0]} rows, priority {priority.shape[-2]}")
    if kmax is None:
        kmax = int(keep.max()) if keep.numel() else 0
    kmax = max(min(int(kmax), priority.shape[-1]), 1)
    top = priority.topk(kmax, dim=-1, sorted=True).indices
    live = torch.arange(kmax, device=priority.device) < keep.to(priority.device)[:, None]
    big = torch.iinfo(torch.int32).max
    idx = torch.where(live, top.to(torch.int32), big).sort(dim=-1).values
    idx = torch.where(idx == big, PAD, idx)
    counts = live.sum(-1, dtype=torch.int32).expand(*priority.shape[:-1]).contiguous()
    return idx.contiguous(), counts


def select_tiered(tiers: list[torch.Tensor], keep: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep every block of the tier masks, then the highest-scoring other blocks up to the budget.

    tiers: bool masks [..., M, Mk] whose union must fit the budget (sink/local, a curvature or recency
    share), followed by one float score [..., M, Mk] ordering the rest; allowed [M, Mk] bool (causal).
    Same return as select_topk.
    """
    *masks, score = tiers
    pri = torch.nan_to_num(score.float(), nan=0.0, posinf=3e38, neginf=-3e38)
    for m in masks:
        pri = pri.masked_fill(m, float("inf"))
    return select_topk(pri.masked_fill(~allowed, float("-inf")), keep)


# ----------------------------------------------------------------------------------------------------
# decode: Quest-style priorities of every key block for one query token per sequence
# ----------------------------------------------------------------------------------------------------
def decode_priority_ref(q: torch.Tensor, k_lo: torch.Tensor, k_hi: torch.Tensor, seq_lens: torch.Tensor,
                        block_size: int, sink_blocks: int, local_blocks: int) -> torch.Tensor:
    """Twin of decode_priority: [S, Hkv, Mmax] float32 = max over the group's heads of the upper bound
    sum_d max(q_d lo_d, q_d hi_d) / sqrt(D); +inf for sink/local blocks, -inf past the query's block."""
    s, hq, d = q.shape
    hkv, mmax = k_lo.shape[1], k_lo.shape[2]
    qf = q.float().view(s, hkv, hq // hkv, 1, d)
    ub = torch.maximum(qf * k_lo.float()[:, :, None], qf * k_hi.float()[:, :, None]).sum(-1)
    score = ub.amax(2) / d**0.5
    last = (seq_lens.long() - 1) // block_size
    jj = torch.arange(mmax, device=q.device)
    forced = (jj[None, :] < sink_blocks) | (jj[None, :] > last[:, None] - local_blocks)
    score = score.masked_fill(forced[:, None], float("inf"))
    return score.masked_fill((jj[None, :] > last[:, None])[:, None], float("-inf"))


try:
    import triton
    import triton.language as tl

    @triton.jit
    def _decode_priority_kernel(
        q_ptr, lo_ptr, hi_ptr, seqlen_ptr, out_ptr,
        scale, group, mmax, block_size, sink_blocks, local_blocks,
        stride_qs, stride_qh, stride_bs, stride_bh, stride_bm, stride_os, stride_oh,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_J: tl.constexpr,
    ):
        s = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1)
        j = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, BLOCK_D)
        g_ok = g < group
        d_ok = d < HEAD_DIM
        q = tl.load(q_ptr + s * stride_qs + (kvh * group + g)[:, None] * stride_qh + d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        last = (tl.load(seqlen_ptr + s) - 1) // block_size
        j_ok = (j < mmax) & (j <= last)
        boff = s * stride_bs + kvh * stride_bh + j[:, None] * stride_bm + d[None, :]
        bmask = j_ok[:, None] & d_ok[None, :]
        lo = tl.load(lo_ptr + boff, mask=bmask, other=0.0).to(tl.float32)
        hi = tl.load(hi_ptr + boff, mask=bmask, other=0.0).to(tl.float32)
        ub = tl.dot(tl.maximum(q, 0.0), tl.trans(hi), input_precision="ieee") + \
            tl.dot(tl.minimum(q, 0.0), tl.trans(lo), input_precision="ieee")
        score = tl.max(tl.where(g_ok[:, None], ub, float("-inf")), 0) * scale
        forced = (j < sink_blocks) | (j > last - local_blocks)
        score = tl.where(forced, float("inf"), score)
        score = tl.where(j <= last, score, float("-inf"))
        tl.store(out_ptr + s * stride_os + kvh * stride_oh + j, score, mask=j < mmax)

    _HAS_TRITON = True
except ImportError:
    _HAS_TRITON = False


def decode_priority(q: torch.Tensor, k_lo: torch.Tensor, k_hi: torch.Tensor, seq_lens: torch.Tensor,
                    block_size: int, sink_blocks: int, local_blocks: int, impl: str = "auto") -> torch.Tensor:
    """Priorities [S, Hkv, Mmax] float32 of the key blocks for decode queries q [S, Hq, D] from per-block
    key bounds k_lo, k_hi [S, Hkv, Mmax, D]; seq_lens [S] (the query sits at seq_lens - 1). One launch."""
    from cab_vllm.ops._triton import next_pow2, resolve_impl

    if resolve_impl(impl, q, k_lo) == "torch":
        return decode_priority_ref(q, k_lo, k_hi, seq_lens, block_size, sink_blocks, local_blocks)
    s, hq, d = q.shape
    hkv, mmax = k_lo.shape[1], k_lo.shape[2]
    k_lo, k_hi, seq_lens = k_lo.contiguous(), k_hi.contiguous(), seq_lens.contiguous()
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty(s, hkv, mmax, dtype=torch.float32, device=q.device)
    bj = 64
    _decode_priority_kernel[(s, hkv, triton.cdiv(mmax, bj))](
        q, k_lo, k_hi, seq_lens, out,
        1.0 / d**0.5, hq // hkv, mmax, block_size, sink_blocks, local_blocks,
        q.stride(0), q.stride(1), k_lo.stride(0), k_lo.stride(1), k_lo.stride(2), out.stride(0), out.stride(1),
        HEAD_DIM=d, BLOCK_D=max(16, next_pow2(d)), GROUP_PAD=max(16, next_pow2(hq // hkv)), BLOCK_J=bj,
        num_warps=4,
    )
    return out
