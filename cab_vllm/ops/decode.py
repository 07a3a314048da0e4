"""Block-sparse decode over vLLM's paged KV cache: split-K over the selected blocks + log-sum-exp merge.

One program handles one (sequence, KV head, split): the G query heads of the group are packed as the rows
of one tile, so each selected key block is read once per group. Partial outputs and their base-2 LSE go to
a scratch buffer; a second kernel merges the splits. Twin: ops.reference.paged_decode_ref.
"""

from __future__ import annotations

import math

import torch

from cab_vllm.ops._triton import HAS_TRITON, check, next_pow2, resolve_impl
from cab_vllm.ops.prefill import _check_common
from cab_vllm.ops.reference import paged_decode_ref

LOG2E = 1.4426950408889634

if HAS_TRITON:
    import triton
    import triton.language as tl

    from cab_vllm.ops._triton import paged_coords

    @triton.jit
    def _sparse_decode_kernel(
        q_ptr, k_ptr, v_ptr, po_ptr, plse_ptr,
        bt_ptr, seqlen_ptr, idx_ptr, cnt_ptr,
        scale_log2,
        stride_qs, stride_qh,
        stride_kpage, stride_kpos, stride_kh,
        stride_vpage, stride_vpos, stride_vh,
        stride_bt, stride_is, stride_ih, stride_cs,
        stride_pos, stride_poh, stride_pok,
        page_size, group, num_splits,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, GROUP_PAD: tl.constexpr,
    ):
        s = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(seqlen_ptr + s)
        cnt = tl.load(cnt_ptr + s * stride_cs + kvh)
        per = tl.cdiv(cnt, num_splits)
        i0 = split * per
        i1 = tl.minimum(i0 + per, cnt)

        g = tl.arange(0, GROUP_PAD)
        g_ok = g < group
        heads = kvh * group + g
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q = tl.load(q_ptr + s * stride_qs + heads[:, None] * stride_qh + d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)

        m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD, BLOCK_D], dtype=tl.float32)
        idx_base = idx_ptr + s * stride_is + kvh * stride_ih
        for i in range(i0, i1):
            kb = tl.load(idx_base + i)
            kpos = kb * BLOCK + tl.arange(0, BLOCK)
            k_ok = kpos < seq_len
            page, slot = paged_coords(bt_ptr, stride_bt, s, kpos, k_ok, page_size)
            kv_mask = k_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + (page * stride_kpage + slot * stride_kpos + kvh * stride_kh)[:, None] + d[None, :],
                        mask=kv_mask, other=0.0)
            qk = tl.dot(q, tl.trans(k)) * scale_log2
            qk = tl.where(k_ok[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(qk - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + (page * stride_vpage + slot * stride_vpos + kvh * stride_vh)[:, None] + d[None, :],
                        mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
        tl.store(po_ptr + s * stride_pos + heads[:, None] * stride_poh + split * stride_pok + d[None, :],
                 out, mask=g_ok[:, None] & d_ok[None, :])
        # part_lse is a contiguous [S, Hq, num_splits] buffer
        tl.store(plse_ptr + (s * tl.num_programs(1) * group + heads) * num_splits + split, lse, mask=g_ok)

    @triton.jit
    def _merge_splits_kernel(
        po_ptr, plse_ptr, o_ptr, lse_ptr,
        stride_pos, stride_poh, stride_pok, stride_os, stride_oh,
        num_heads, num_splits,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_PAD: tl.constexpr,
    ):
        s = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        k = tl.arange(0, SPLIT_PAD)
        k_ok = k < num_splits
        lse = tl.load(plse_ptr + (s * num_heads + h) * num_splits + k, mask=k_ok, other=float("-inf"))
        m = tl.max(lse, 0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        w = tl.exp2(lse - m_safe)
        tot = tl.sum(w, 0)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        po = tl.load(po_ptr + s * stride_pos + h * stride_poh + k[:, None] * stride_pok + d[None, :],
                     mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        out = tl.sum(po * w[:, None], 0) / tl.where(tot > 0.0, tot, 1.0)
        tl.store(o_ptr + s * stride_os + h * stride_oh + d, out.to(o_ptr.dtype.element_ty), mask=d_ok)
        total = tl.where(tot > 0.0, (m_safe + tl.log2(tl.where(tot > 0.0, tot, 1.0))) / 1.4426950408889634,
                         float("-inf"))
        tl.store(lse_ptr + s * num_heads + h, total)


def default_num_splits(num_seqs: int, num_kv_heads: int, max_blocks: int, target_programs: int = 264) -> int:
    """Enough splits to fill ~2 waves of an H100 (132 SMs) while keeping >= 4 blocks per split."""
    want = max(1, -(-target_programs // max(1, num_seqs * num_kv_heads)))
    return int(max(1, min(want, -(-max_blocks // 4), 64)))


def paged_sparse_decode(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    indices: torch.Tensor,
    counts: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one new token per sequence (at position seq_lens[s] - 1) over its selected key blocks.

    q [S, Hq, D] fp16/bf16/fp32; key_cache, value_cache [num_pages, page_size, Hkv, D] (any strides, last
    dim contiguous); block_table [S, max_pages] int32; seq_lens [S] int32 (cache length incl. the new token);
    indices [S, Hkv, K] int32 ascending key blocks, counts [S, Hkv] int32.
    Returns (out [S, Hq, D] in q.dtype, lse [S, Hq] float32, natural log; -inf for an empty selection).
    """
    hq, hkv, d = _check_common(q, key_cache, value_cache, block_table, seq_lens, block_size)
    check(q.dim() == 3, f"q must be [S, Hq, D], got {tuple(q.shape)}")
    ns = q.shape[0]
    check(indices.dim() == 3 and indices.shape[:2] == (ns, hkv) and counts.shape == (ns, hkv),
          f"indices must be [S={ns}, Hkv={hkv}, K] and counts [S, Hkv], got {tuple(indices.shape)}, "
          f"{tuple(counts.shape)}")
    check(indices.dtype == torch.int32 and counts.dtype == torch.int32, "indices/counts must be int32")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if resolve_impl(impl, q, key_cache) == "torch":
        o, lse = paged_decode_ref(q, key_cache, value_cache, block_table, seq_lens, indices, counts, block_size, scale)
        if out is not None:
            out.copy_(o)
            o = out
        return o, lse
    if num_splits is None:
        num_splits = default_num_splits(ns, hkv, indices.shape[-1])
    check(isinstance(num_splits, int) and num_splits >= 1, f"num_splits={num_splits!r} must be an int >= 1")
    if out is None:
        out = torch.empty_like(q)
    lse = torch.empty(ns, hq, dtype=torch.float32, device=q.device)
    if ns == 0:
        return out, lse
    indices, counts = indices.contiguous(), counts.contiguous()
    group = hq // hkv
    part_o = torch.empty(ns, hq, num_splits, d, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(ns, hq, num_splits, dtype=torch.float32, device=q.device)
    block_d = max(16, next_pow2(d))
    _sparse_decode_kernel[(ns, hkv, num_splits)](
        q, key_cache, value_cache, part_o, part_lse,
        block_table, seq_lens, indices, counts,
        scale * LOG2E,
        q.stride(0), q.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_table.stride(0), indices.stride(0), indices.stride(1), counts.stride(0),
        part_o.stride(0), part_o.stride(1), part_o.stride(2),
        key_cache.shape[1], group, num_splits,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK=block_size, GROUP_PAD=max(16, next_pow2(group)),
        num_warps=4, num_stages=2,
    )
    _merge_splits_kernel[(ns, hq)](
        part_o, part_lse, out, lse,
        part_o.stride(0), part_o.stride(1), part_o.stride(2), out.stride(0), out.stride(1),
        hq, num_splits,
        HEAD_DIM=d, BLOCK_D=block_d, SPLIT_PAD=max(2, next_pow2(num_splits)),
        num_warps=4,
    )
    return out, lse
