"""Block-sparse decode over vLLM's paged KV cache: split-K over the selected blocks + log-sum-exp merge.

One program handles one (sequence, KV head, split): the G query heads of the group are packed as the rows
of one tile, so each selected key block is read once per group. Partial outputs and their base-2 LSE go to
a scratch buffer; a second kernel merges the splits. Twin: ops.reference.paged_decode_ref.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from cab_vllm.ops._triton import HAS_TRITON, check, next_pow2, resolve_impl
from cab_vllm.ops.prefill import _check_common
from cab_vllm.ops.reference import paged_decode_ref

LOG2E = 1.4426950408889634

# Decode row modes (DecodeRoutes.modes): where a row's key blocks come from.
MODE_SKIP = 0  # another kernel (vLLM's FlashAttention) handles the row; not written here
MODE_PROMPT = 1  # the request's stored prompt selection + every block after the prompt (decode_rule="prompt")
MODE_ALL = 2  # every causal block (dense through this kernel: the CPU path)
MODE_BOUNDS = 3  # the step's top-k by key-bounds upper bound with the real query (Quest; decode_rule="bounds")
MODE_RECENT = 4  # the step's top-k by recency (streaming)
MODE_RANDOM = 5  # the step's top-k by a seeded hash (random)
SELECTED_MODES = (MODE_BOUNDS, MODE_RECENT, MODE_RANDOM)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from cab_vllm.ops._triton import paged_coords

    @triton.jit
    def _sparse_decode_kernel(
        q_ptr, k_ptr, v_ptr, po_ptr, plse_ptr,
        bt_ptr, seqlen_ptr, idx_ptr, cnt_ptr,
        mode_ptr, slot_ptr, tab_idx_ptr, tab_cnt_ptr, tab_blocks_ptr,
        scale_log2,
        stride_qs, stride_qh,
        stride_kpage, stride_kpos, stride_kh,
        stride_vpage, stride_vpos, stride_vh,
        stride_bt, stride_is, stride_ih, stride_cs,
        stride_ts, stride_th, stride_tcs,
        stride_pos, stride_poh, stride_pok,
        page_size, group, num_splits,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, GROUP_PAD: tl.constexpr,
        ROUTED: tl.constexpr,
    ):
        # ROUTED: each row's mode says where its key blocks come from (MODE_* in this module): SKIP rows are
        # left to another kernel, PROMPT rows read their request's stored prompt selection (tab_*) plus every
        # block after the prompt, ALL rows read every causal block, the others read the step's selection
        # (idx/cnt). Not ROUTED: every row reads idx/cnt.
        s = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(seqlen_ptr + s)
        mode = 3
        if ROUTED:
            mode = tl.load(mode_ptr + s)
        if mode != 0:
            nb = (seq_len + BLOCK - 1) // BLOCK
            c1 = nb * 0
            pb = nb
            tab_base = tab_idx_ptr
            if mode == 1:
                slot = tl.load(slot_ptr + s).to(tl.int64)
                c1 = tl.load(tab_cnt_ptr + slot * stride_tcs + kvh)
                pb = tl.load(tab_blocks_ptr + s)
                tab_base = tab_idx_ptr + slot * stride_ts + kvh * stride_th
                cnt = c1 + tl.maximum(nb - pb, 0)
            elif mode == 2:
                cnt = nb
            else:
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
                if mode == 1:
                    if i < c1:
                        kb = tl.load(tab_base + i).to(tl.int32)
                    else:
                        kb = pb + (i - c1)
                elif mode == 2:
                    kb = i
                else:
                    kb = tl.load(idx_base + i)
                kpos = kb * BLOCK + tl.arange(0, BLOCK)
                k_ok = kpos < seq_len
                page, slot_in = paged_coords(bt_ptr, stride_bt, s, kpos, k_ok, page_size)
                kv_mask = k_ok[:, None] & d_ok[None, :]
                k = tl.load(k_ptr + (page * stride_kpage + slot_in * stride_kpos + kvh * stride_kh)[:, None]
                            + d[None, :], mask=kv_mask, other=0.0)
                qk = tl.dot(q, tl.trans(k)) * scale_log2
                qk = tl.where(k_ok[None, :], qk, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(qk, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(qk - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                v = tl.load(v_ptr + (page * stride_vpage + slot_in * stride_vpos + kvh * stride_vh)[:, None]
                            + d[None, :], mask=kv_mask, other=0.0)
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
        po_ptr, plse_ptr, o_ptr, lse_ptr, mode_ptr,
        stride_pos, stride_poh, stride_pok, stride_os, stride_oh,
        num_heads, num_splits,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_PAD: tl.constexpr, ROUTED: tl.constexpr,
    ):
        s = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        live = h >= 0
        if ROUTED:
            live = tl.load(mode_ptr + s) != 0  # SKIP rows are another kernel's
        k = tl.arange(0, SPLIT_PAD)
        k_ok = tl.where(live, k < num_splits, False)
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
        tl.store(o_ptr + s * stride_os + h * stride_oh + d, out.to(o_ptr.dtype.element_ty), mask=tl.where(live, d_ok, False))
        total = tl.where(tot > 0.0, (m_safe + tl.log2(tl.where(tot > 0.0, tot, 1.0))) / 1.4426950408889634,
                         float("-inf"))
        tl.store(lse_ptr + s * num_heads + h + k * 0, total + k * 0.0, mask=tl.where(live, k == 0, False))


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
    if out is None:
        out = torch.empty_like(q)
    lse = torch.empty(ns, hq, dtype=torch.float32, device=q.device)
    _decode_launch(q, key_cache, value_cache, block_table, seq_lens, indices.contiguous(), counts.contiguous(),
                   None, block_size, scale, num_splits, out, lse, None)
    return out, lse


class DecodeRoutes(NamedTuple):
    """Where each decode row's key blocks come from (routed_decode; all device tensors, CUDA-graph safe).

    modes [S] int32 (MODE_*); slots [S] int32: the row's request slot in the prompt table (MODE_PROMPT);
    tab_idx [slots, Hkv, Kt] int16/int32 and tab_cnt [slots, Hkv] int32: each slot's stored prompt selection
    (ascending, for this layer); tab_blocks [S] int32: per row, its prompt's block count (blocks from there on
    are all kept); sel_idx [S, Hkv, K] int32 / sel_cnt [S, Hkv] int32: the step's selection for MODE_BOUNDS,
    MODE_RECENT and MODE_RANDOM rows (decode_select)."""

    modes: torch.Tensor
    slots: torch.Tensor
    tab_idx: torch.Tensor
    tab_cnt: torch.Tensor
    tab_blocks: torch.Tensor
    sel_idx: torch.Tensor
    sel_cnt: torch.Tensor


def routed_decode(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    routes: DecodeRoutes,
    block_size: int,
    scale: float,
    out: torch.Tensor,
    num_splits: int,
    workspace: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Decode attention for rows routed by ``routes`` (DecodeRoutes): one query per row at seq_lens - 1;
    rows in MODE_SKIP are not written. q [S, Hq, D]; out [S, Hq, D] (written in place, returned).
    num_splits must not depend on the step's data (a CUDA graph replays it); workspace: preallocated
    (part_o [>=S, Hq, num_splits, D] fp32, part_lse [>=S, Hq, num_splits] fp32, lse [>=S, Hq] fp32)."""
    hq, hkv, d = _check_common(q, key_cache, value_cache, block_table, seq_lens, block_size)
    ns = q.shape[0]
    check(routes.modes.shape[0] >= ns and routes.slots.shape[0] >= ns, "routes must cover every row of q")
    check(routes.sel_idx.shape[1] == hkv and routes.tab_idx.shape[1] == hkv, "routes are not for this layer's heads")
    if resolve_impl(impl, q, key_cache) == "torch":
        idx, cnt = routed_indices(routes, seq_lens, block_size, ns)
        o, _ = paged_decode_ref(q, key_cache, value_cache, block_table, seq_lens, idx, cnt, block_size, scale)
        live = routes.modes[:ns] != MODE_SKIP
        out[live] = o[live]
        return out
    lse = torch.empty(ns, hq, dtype=torch.float32, device=q.device) if workspace is None else workspace[2][:ns]
    _decode_launch(q, key_cache, value_cache, block_table, seq_lens, routes.sel_idx, routes.sel_cnt, routes,
                   block_size, scale, num_splits, out, lse, workspace)
    return out


def routed_indices(routes: "DecodeRoutes", seq_lens: torch.Tensor, block_size: int, ns: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The key blocks routed_decode reads, materialized: (indices [S, Hkv, K] int32 ascending -1 padded,
    counts [S, Hkv] int32); MODE_SKIP rows get count 0. Host loop: for tests and the PyTorch path."""
    ns = routes.modes.shape[0] if ns is None else ns
    hkv = routes.sel_idx.shape[1]
    dev = seq_lens.device
    rows = []
    for s in range(ns):
        mode, n = int(routes.modes[s]), int(seq_lens[s])
        nb = -(-n // block_size)
        if mode == MODE_SKIP:
            rows.append([[] for _ in range(hkv)])
        elif mode == MODE_ALL:
            rows.append([list(range(nb)) for _ in range(hkv)])
        elif mode == MODE_PROMPT:
            slot = int(routes.slots[s])
            pb = int(routes.tab_blocks[s])
            rows.append([sorted(routes.tab_idx[slot, h, : int(routes.tab_cnt[slot, h])].tolist()
                                + list(range(pb, nb))) for h in range(hkv)])
        else:
            rows.append([routes.sel_idx[s, h, : int(routes.sel_cnt[s, h])].tolist() for h in range(hkv)])
    k = max([1] + [len(r) for row in rows for r in row])
    idx = torch.full((ns, hkv, k), -1, dtype=torch.int32)
    cnt = torch.zeros(ns, hkv, dtype=torch.int32)
    for s, row in enumerate(rows):
        for h, r in enumerate(row):
            idx[s, h, : len(r)] = torch.tensor(r, dtype=torch.int32)
            cnt[s, h] = len(r)
    return idx.to(dev), cnt.to(dev)


def _decode_launch(q, key_cache, value_cache, block_table, seq_lens, indices, counts, routes, block_size, scale,
                   num_splits, out, lse, workspace):
    check(isinstance(num_splits, int) and num_splits >= 1, f"num_splits={num_splits!r} must be an int >= 1")
    ns, hq, d = q.shape
    hkv = key_cache.shape[2]
    if ns == 0:
        return
    group = hq // hkv
    if workspace is None:
        part_o = torch.empty(ns, hq, num_splits, d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(ns, hq, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_o, part_lse = workspace[0], workspace[1]
        check(part_o.shape[0] >= ns and part_o.shape[1:] == (hq, num_splits, d) and part_o.is_contiguous()
              and part_lse.shape[1:] == (hq, num_splits) and part_lse.is_contiguous(),
              "decode workspace does not match (rows, heads, splits, head dim)")
    block_d = max(16, next_pow2(d))
    routed = routes is not None
    if routed:
        modes, slots, tab_idx, tab_cnt, tab_blocks = (routes.modes, routes.slots, routes.tab_idx, routes.tab_cnt,
                                                      routes.tab_blocks)
        check(tab_idx.stride(-1) == 1 and tab_cnt.stride(-1) == 1, "prompt table rows must be contiguous")
    else:
        modes = slots = tab_blocks = seq_lens
        tab_idx, tab_cnt = indices, counts
    _sparse_decode_kernel[(ns, hkv, num_splits)](
        q, key_cache, value_cache, part_o, part_lse,
        block_table, seq_lens, indices, counts,
        modes, slots, tab_idx, tab_cnt, tab_blocks,
        scale * LOG2E,
        q.stride(0), q.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_table.stride(0), indices.stride(0), indices.stride(1), counts.stride(0),
        tab_idx.stride(0), tab_idx.stride(1), tab_cnt.stride(0),
        part_o.stride(0), part_o.stride(1), part_o.stride(2),
        key_cache.shape[1], group, num_splits,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK=block_size, GROUP_PAD=max(16, next_pow2(group)), ROUTED=routed,
        num_warps=4, num_stages=2,
    )
    _merge_splits_kernel[(ns, hq)](
        part_o, part_lse, out, lse, modes,
        part_o.stride(0), part_o.stride(1), part_o.stride(2), out.stride(0), out.stride(1),
        hq, num_splits,
        HEAD_DIM=d, BLOCK_D=block_d, SPLIT_PAD=max(2, next_pow2(num_splits)), ROUTED=routed,
        num_warps=4,
    )
