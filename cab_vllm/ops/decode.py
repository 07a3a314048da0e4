"""Block-sparse decode over vLLM's paged KV cache: split-K over the selected blocks + log-sum-exp merge, and
(routed decode) the step's own block selection: one launch for the selection, one for attention and merge.

One attention program handles one (sequence, KV head, split): the G query heads of the group are packed as the
rows of one tile, so each selected key block is read once per group. Partial outputs and their base-2 LSE go to
a scratch buffer; the last split of each (sequence, KV head) to finish merges them. In a CUDA graph every
launch costs microseconds even when it has nothing to do (short prompts run on vLLM's FlashAttention), so the
attention and the merge share one launch, and the selection's programs return at once when no row selects. The
kernel can also run selection and attention in one launch (programs take roles from a start-order ticket); with
the split-by-split merge that cost the attention role 1.5x at 8 rows of 128k on the H200 (with the tiled merge it
no longer does for the prompt rule, but rows selecting by key bounds are slower in one), so routed_decode uses two,
except for a single row (ONE_LAUNCH_MAX_ROWS), where one launch halves what a short request pays per layer, in
engines whose selection rows are at most ONE_LAUNCH_MAX_MPAD blocks wide (max_model_len up to 131,072 with 64-token
blocks; wider, the one launch's attention runs slower).
Twins: ops.reference.paged_decode_ref (the oracle) and ops.select.decode_select's PyTorch path; without Triton
(CPU) the attention runs ops.gathered.paged_decode, which reads only the kept blocks.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from cab_vllm.ops._triton import HAS_TRITON, check, next_pow2, resolve_impl
from cab_vllm.ops.prefill import _check_common
from cab_vllm.ops import gathered

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
    from cab_vllm.ops.select import (MAX_SCORE_PROGRAMS, SCORE_TILE, SCORE_TOKENS, _group_query, _score_blocks,
                                     _topk_blocks)

    @triton.jit
    def _block_offsets(bt_ptr, stride_bt, s, kb, k_ok, kvh, stride_page, stride_pos, stride_h, d,
                       BLOCK: tl.constexpr, PAGE_SIZE: tl.constexpr):
        """Element offsets [BLOCK, BLOCK_D] (int64) of key block kb's tokens, head kvh, in row s's pages. A page of
        whole blocks (PAGE_SIZE a multiple of BLOCK): one page-table read for the block; else one per token (masked
        by k_ok). Only page * stride_page needs 64 bits; the in-page part is int32. One read per page for a block
        of whole pages (a [pages, tokens] tile reshaped to [BLOCK]) was tried: fewer instructions, but the step took
        1.5-5x as long on an H200 (BENCHMARKS.md, eleventh run; the reshape's layout change is the likely cause)."""
        t = tl.arange(0, BLOCK)
        if PAGE_SIZE % BLOCK == 0:
            pos0 = kb * BLOCK
            page = tl.load(bt_ptr + s * stride_bt + pos0 // PAGE_SIZE).to(tl.int64)
            base = page * stride_page + ((pos0 % PAGE_SIZE) * stride_pos + kvh * stride_h)
            return base + (t * stride_pos)[:, None] + d[None, :]
        else:
            page, slot = paged_coords(bt_ptr, stride_bt, s, kb * BLOCK + t, k_ok, PAGE_SIZE)
            inner = slot.to(tl.int32) * stride_pos + kvh * stride_h
            return (page * stride_page + inner)[:, None] + d[None, :]

    @triton.jit
    def _attend_keys(q, k_ptr, v_ptr, bt_ptr, kb, seq_len, s, kvh, scale_log2,
                     stride_kpage, stride_kpos, stride_kh, stride_vpage, stride_vpos, stride_vh, stride_bt,
                     m_i, l_i, acc, d, d_ok, BLOCK: tl.constexpr, PAGE_SIZE: tl.constexpr, KV_SAME: tl.constexpr):
        """Online-softmax step of the group's queries q [G, D] over key block kb of row s (paged; its tokens at
        or past seq_len masked): new (m, l, acc). KV_SAME: the value cache has the key cache's strides (vLLM's
        [2, pages, ...] KV tensor), so one offset tile addresses both."""
        kpos = kb * BLOCK + tl.arange(0, BLOCK)
        k_ok = kpos < seq_len
        kv_mask = k_ok[:, None] & d_ok[None, :]
        off = _block_offsets(bt_ptr, stride_bt, s, kb, k_ok, kvh, stride_kpage, stride_kpos, stride_kh, d,
                             BLOCK, PAGE_SIZE)
        k = tl.load(k_ptr + off, mask=kv_mask, other=0.0)
        m_new, l_i, p, alpha = _softmax_p(q, k, k_ok, scale_log2, m_i, l_i)
        if not KV_SAME:
            off = _block_offsets(bt_ptr, stride_bt, s, kb, k_ok, kvh, stride_vpage, stride_vpos, stride_vh, d,
                                 BLOCK, PAGE_SIZE)
        v = tl.load(v_ptr + off, mask=kv_mask, other=0.0)  # issued after the scores
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc

    @triton.jit
    def _softmax_p(q, k, k_ok, scale_log2, m_i, l_i):
        """The online softmax's scores step for keys k [T, D] (where k_ok): (m, l, p [G, T], the rescale alpha)."""
        qk = tl.dot(q, tl.trans(k)) * scale_log2
        qk = tl.where(k_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(qk - m_safe[:, None])
        return m_new, l_i * alpha + tl.sum(p, 1), p, alpha

    @triton.jit
    def _attend_split(q_ptr, k_ptr, v_ptr, po_ptr, plse_ptr, bt_ptr, idx_ptr, cnt_ptr,
                      tab_idx_ptr, tab_cnt_ptr, slot, prompt_blocks,
                      s, kvh, split, mode, seq_len, scale_log2, num_heads, group, num_splits, min_per,
                      stride_qs, stride_qh, stride_kpage, stride_kpos, stride_kh, stride_vpage, stride_vpos, stride_vh,
                      stride_bt, stride_is, stride_ih, stride_cs, stride_ts, stride_th, stride_tcs,
                      stride_pos, stride_poh, stride_pok,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, GROUP_PAD: tl.constexpr,
                      PAGE_SIZE: tl.constexpr, KV_SAME: tl.constexpr):
        """Split `split` of row s, KV head kvh: the group's queries over their share of the row's key blocks
        (mode 1: the stored prompt selection + every block after the prompt; 2: every causal block; else the
        step's idx/cnt) -> normalized partial output and base-2 LSE in po/plse. A split takes at least min_per
        blocks, so a short selection uses fewer splits than were launched (the rest return at once and the merge
        reads fewer partials). slot, prompt_blocks: the row's prompt-table slot and prompt block count (mode 1),
        loaded by the caller beside the mode (one memory round trip less before the first key block).
        Returns the number of splits the (row, KV head) uses."""
        # the query first: its load is in flight while the block range is worked out
        q, g_ok, d, d_ok = _group_query(q_ptr, s, kvh, group, stride_qs, stride_qh, HEAD_DIM, BLOCK_D, GROUP_PAD)
        nb = (seq_len + BLOCK - 1) // BLOCK
        c1 = nb * 0
        pb = nb
        tab_base = tab_idx_ptr
        if mode == 1:
            slot64 = slot.to(tl.int64)
            c1 = tl.load(tab_cnt_ptr + slot64 * stride_tcs + kvh)
            pb = prompt_blocks
            tab_base = tab_idx_ptr + slot64 * stride_ts + kvh * stride_th
            cnt = c1 + tl.maximum(nb - pb, 0)
        elif mode == 2:
            cnt = nb
        else:
            cnt = tl.load(cnt_ptr + s * stride_cs + kvh, cache_modifier=".cg")
        per = tl.maximum(tl.cdiv(cnt, num_splits), min_per)
        used = tl.cdiv(cnt, per)
        i0 = split * per
        i1 = tl.minimum(i0 + per, cnt)  # <= i0 for a split past `used`: no iterations, nothing stored

        q = q.to(k_ptr.dtype.element_ty)
        heads = kvh * group + tl.arange(0, GROUP_PAD)
        live = g_ok & (tl.arange(0, GROUP_PAD) * 0 + split < used)  # the group's heads, in a split that is used
        m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD, BLOCK_D], dtype=tl.float32)
        idx_base = idx_ptr + s * stride_is + kvh * stride_ih
        # One loop with the block's source chosen inside it: on the H200 (8 rows at 128k, attention launch alone)
        # this loop ran 1.6x faster than one loop per source, each under its own `if mode`.
        for i in range(i0, i1):
            if mode == 1:
                if i < c1:
                    kb = tl.load(tab_base + i).to(tl.int32)
                else:
                    kb = pb + (i - c1)
            elif mode == 2:
                kb = i
            else:
                kb = tl.load(idx_base + i, cache_modifier=".cg")
            m_i, l_i, acc = _attend_keys(q, k_ptr, v_ptr, bt_ptr, kb, seq_len, s, kvh, scale_log2,
                                         stride_kpage, stride_kpos, stride_kh, stride_vpage, stride_vpos, stride_vh,
                                         stride_bt, m_i, l_i, acc, d, d_ok, BLOCK, PAGE_SIZE, KV_SAME)
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
        tl.store(po_ptr + s * stride_pos + heads[:, None] * stride_poh + split * stride_pok + d[None, :],
                 out, mask=live[:, None] & d_ok[None, :])
        # part_lse is a contiguous [S, Hq, num_splits] buffer
        tl.store(plse_ptr + (s * num_heads + heads) * num_splits + split, lse, mask=live)
        return used

    @triton.jit
    def _store_merged(acc, tot, m, o_ptr, lse_ptr, s, heads, g_ok, d, d_ok, num_heads, stride_os, stride_oh):
        """Write a merge's result: out = acc / tot into o [S, Hq, D], its LSE (natural log; -inf where nothing
        was attended) into lse [S, Hq]."""
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        out = acc / tl.where(tot > 0.0, tot, 1.0)[:, None]
        tl.store(o_ptr + s * stride_os + heads[:, None] * stride_oh + d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=g_ok[:, None] & d_ok[None, :])
        total = tl.where(tot > 0.0, (m_safe + tl.log2(tl.where(tot > 0.0, tot, 1.0))) / 1.4426950408889634,
                         float("-inf"))
        tl.store(lse_ptr + s * num_heads + heads, total, mask=g_ok)

    @triton.jit
    def _merge_group(po_ptr, plse_ptr, o_ptr, lse_ptr, s, kvh, num_heads, group, num_splits, used,
                     stride_pos, stride_poh, stride_pok, stride_os, stride_oh,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MERGE_G: tl.constexpr,
                     MERGE_SPLITS: tl.constexpr):
        """Log-sum-exp merge of the group's split partials (written by other programs: read from L2) into o
        [S, Hq, D] and lse [S, Hq] (natural log): the first `used` splits, MERGE_SPLITS per load (the group's
        partials [MERGE_G, MERGE_SPLITS, D] and their LSEs in one round trip; MERGE_SPLITS 1: split by split).
        With 16 splits per load a decode step took 25.1 us per layer at 128k, one row, against 29.5 split by split
        (H200, L2 flushed), which waits for each split's load in turn (26 dependent L2 reads). (An engine run with
        a head-by-head merge, all splits in one [64, D] tile, decoded at 128k in 7.7 ms per token against 6.2 with
        the split-by-split merge on the H200; other changes lay between the two runs: BENCHMARKS.md.)"""
        g = tl.arange(0, MERGE_G)
        g_ok = g < group
        heads = kvh * group + g
        kk = tl.arange(0, MERGE_SPLITS)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        m = tl.full([MERGE_G], float("-inf"), dtype=tl.float32)
        tot = tl.zeros([MERGE_G], dtype=tl.float32)
        acc = tl.zeros([MERGE_G, BLOCK_D], dtype=tl.float32)
        for k0 in range(0, used, MERGE_SPLITS):
            k = k0 + kk
            ok = g_ok[:, None] & (k < used)[None, :]
            lse_k = tl.load(plse_ptr + (s * num_heads + heads)[:, None] * num_splits + k[None, :], mask=ok,
                            other=float("-inf"), cache_modifier=".cg")
            o_k = tl.load(po_ptr + s * stride_pos + heads[:, None, None] * stride_poh + k[None, :, None] * stride_pok
                          + d[None, None, :], mask=ok[:, :, None] & d_ok[None, None, :], other=0.0,
                          cache_modifier=".cg")
            m_new = tl.maximum(m, tl.max(lse_k, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m - m_safe)
            w = tl.exp2(lse_k - m_safe[:, None])
            acc = acc * alpha[:, None] + tl.sum(o_k * w[:, :, None], 1)
            tot = tot * alpha + tl.sum(w, 1)
            m = m_new
        _store_merged(acc, tot, m, o_ptr, lse_ptr, s, heads, g_ok, d, d_ok, num_heads, stride_os, stride_oh)

    # The counts that change with the batch stay runtime values (no Triton specialization on == 1 or % 16): a decode
    # step compiles once per engine, not once per CUDA-graph batch size.
    @triton.jit(do_not_specialize=["num_splits", "n_tiles", "n_score", "n_total", "sync_rows", "min_per"])
    def _decode_step_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, seqlen_ptr,
        mode_ptr, slot_ptr, tab_idx_ptr, tab_cnt_ptr, tab_blocks_ptr, idx_ptr, cnt_ptr,
        keep_ptr, sc_ptr, need_ptr, po_ptr, plse_ptr, o_ptr, lse_ptr, sync_ptr,
        scale_log2, sel_scale,
        num_heads, num_kv_heads, num_splits, n_tiles, n_score, n_total, sync_rows, min_per,
        sink_blocks, local_blocks, seed, kmax,
        stride_qs, stride_qh,
        stride_kpage, stride_kpos, stride_kh,
        stride_vpage, stride_vpos, stride_vh,
        stride_bt, stride_is, stride_ih, stride_cs,
        stride_ts, stride_th, stride_tcs,
        stride_ss, stride_sh,
        stride_pos, stride_poh, stride_pok,
        stride_os, stride_oh,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, GROUP_PAD: tl.constexpr,
        BLOCK_J: tl.constexpr, MPAD: tl.constexpr, KPAD: tl.constexpr,
        ROUTED: tl.constexpr, SELECT: tl.constexpr, ATTEND: tl.constexpr, MERGE_G: tl.constexpr,
        MERGE_SPLITS: tl.constexpr, PAGE_SIZE: tl.constexpr, KV_SAME: tl.constexpr,
    ):
        # The step is bound by the length of its instruction stream (Nsight Compute on the H200: one instruction
        # per 11.7 cycles per warp, DRAM at 20% of peak), so the loop over key blocks is kept short. PAGE_SIZE (the
        # cache's tokens per page, one value per engine) is a compile-time constant: a key's page and slot come
        # from shifts instead of an integer division per key row (loop 705 -> 586 sm_90 instructions, the step
        # 3-6% faster on the H200). One offset tile for keys and values when their strides match (KV_SAME), the
        # in-page part in 32 bits, one page-table read per block when a page holds whole blocks: 453 instructions
        # with 16-token pages, 379 with 64 (6-10% faster on the H200 than the 586-instruction loop, tenth run).
        # One launch for a whole decode step. Programs [0, n_score) select (SELECT: rows in MODE_BOUNDS /
        # MODE_RECENT / MODE_RANDOM; n_tiles programs per (row, KV head) score its blocks, the last to finish
        # keeps the top keep[s]); programs [n_score, n_total) attend (ATTEND: one per (row, KV head, split);
        # the last split of a (row, KV head) merges the group's partials). sync_ptr (int32, zero between
        # launches; every counter is reset by the program that reads it last): [0] ticket, then per (row, KV
        # head) [scored tiles | selection ready | finished splits], sync_rows rows each.
        # ROUTED: each row's mode says where its key blocks come from (MODE_* in this module), else every row
        # reads idx/cnt. Attention programs of selected rows wait for their selection: programs take their role
        # from a ticket in the order they started, so every selection program a waiter needs is running or done.
        t = tl.program_id(0)
        if SELECT:
            if tl.load(need_ptr) != 0:  # some row selects: waits ahead, so roles come from tickets
                t = tl.atomic_add(sync_ptr, 1)
                if t == n_total - 1:
                    tl.atomic_xchg(sync_ptr, 0)  # every program has its ticket: ready for the next launch
        group = num_heads // num_kv_heads
        scored = sync_ptr + 1
        ready = scored + sync_rows * num_kv_heads
        finished = ready + sync_rows * num_kv_heads
        if t < n_score:
            per = num_kv_heads * n_tiles
            s = (t // per).to(tl.int64)
            kvh = (t % per) // n_tiles
            mode = tl.load(mode_ptr + s)
            if mode >= 3:
                n = tl.load(seqlen_ptr + s)
                _score_blocks(q_ptr, k_ptr, bt_ptr, sc_ptr, s, kvh, t % n_tiles, n_tiles, mode, n,
                              sel_scale, group, PAGE_SIZE, sink_blocks, local_blocks, seed,
                              stride_qs, stride_qh, stride_kpage, stride_kpos, stride_kh, stride_bt, stride_ss,
                              stride_sh, HEAD_DIM, BLOCK_D, GROUP_PAD, BLOCK_J, BLOCK, SCORE_TOKENS)
                tl.debug_barrier()
                c = tl.atomic_add(scored + s * num_kv_heads + kvh, 1, sem="acq_rel")
                if c == n_tiles - 1:
                    tl.atomic_xchg(scored + s * num_kv_heads + kvh, 0)
                    _topk_blocks(sc_ptr, keep_ptr, idx_ptr, cnt_ptr, s, kvh, (n - 1) // BLOCK, kmax,
                                 stride_ss, stride_sh, stride_is, stride_ih, stride_cs, MPAD, KPAD)
                    if ATTEND:
                        tl.debug_barrier()
                        tl.atomic_xchg(ready + s * num_kv_heads + kvh, 1, sem="release")
        else:
            u = t - n_score
            per = num_kv_heads * num_splits
            s = (u // per).to(tl.int64)
            kvh = (u % per) // num_splits
            split = u % num_splits
            mode = 3
            slot = u * 0  # int32, as the routed path's loads are (Triton needs one type on both sides of an if)
            prompt_blocks = slot
            if ROUTED:  # the row's routing, all in one round trip
                mode = tl.load(mode_ptr + s)
                slot = tl.load(slot_ptr + s)
                prompt_blocks = tl.load(tab_blocks_ptr + s)
            seq_len = tl.load(seqlen_ptr + s)
            if mode != 0:
                if SELECT:
                    if mode >= 3:
                        r = tl.atomic_add(ready + s * num_kv_heads + kvh, 0, sem="acquire")
                        while r == 0:
                            r = tl.atomic_add(ready + s * num_kv_heads + kvh, 0, sem="acquire")
                used = _attend_split(q_ptr, k_ptr, v_ptr, po_ptr, plse_ptr, bt_ptr, idx_ptr, cnt_ptr,
                                     tab_idx_ptr, tab_cnt_ptr, slot, prompt_blocks,
                                     s, kvh, split, mode, seq_len, scale_log2, num_heads, group,
                                     num_splits, min_per,
                                     stride_qs, stride_qh, stride_kpage, stride_kpos, stride_kh, stride_vpage,
                                     stride_vpos, stride_vh, stride_bt, stride_is, stride_ih, stride_cs, stride_ts,
                                     stride_th, stride_tcs, stride_pos, stride_poh, stride_pok,
                                     HEAD_DIM, BLOCK_D, BLOCK, GROUP_PAD, PAGE_SIZE, KV_SAME)
                tl.debug_barrier()
                c = tl.atomic_add(finished + s * num_kv_heads + kvh, 1, sem="acq_rel")
                if c == num_splits - 1:
                    tl.atomic_xchg(finished + s * num_kv_heads + kvh, 0)
                    if SELECT:
                        tl.atomic_xchg(ready + s * num_kv_heads + kvh, 0)  # every split is past its wait
                    _merge_group(po_ptr, plse_ptr, o_ptr, lse_ptr, s, kvh, num_heads, group, num_splits, used,
                                 stride_pos, stride_poh, stride_pok, stride_os, stride_oh,
                                 HEAD_DIM, BLOCK_D, MERGE_G, MERGE_SPLITS)


MAX_SPLITS = 64  # split-K partials per (row, head), at most
# A (row, KV head) with fewer than num_splits * this many blocks uses fewer splits. H200, L2 flushed, prompt rule at
# 95%, one row: 1 against 4 blocks per split 14.0 vs 20.5 us per layer at 16k, 16.0 vs 20.5 at 32k, 24.4 vs 25.1 at
# 128k; equal at 8 rows (benchmarks/results/profiles_h200_2026-12-01d/).
MIN_BLOCKS_PER_SPLIT = 1
# Split partials the merge reads per load (a power of two; 1: split by split; merge_tile caps it). H200, one row
# at 128k, L2 flushed: a decode step of 25.1 us per layer with 16, 29.5 split by split
# (benchmarks/gpu/decode_profile.py --merge-splits; BENCHMARKS.md).
MERGE_SPLITS = 16
MERGE_TILE = 64  # at most this many (group head, split) partials per merge load (registers: 64 x D fp32)
# Warps per decode program: 8 ran 1.5x slower than 4 at 8 rows of 128k on the H200, 2 slower at every shape timed
# (up to 1.7x; BENCHMARKS.md).
DECODE_WARPS = 4
# Registers per thread the decode kernel may use (None: as many as it needs, 166 for sm_90 with 16-token pages and
# D=128: three 4-warp programs per SM). 128 lets four run at once, at the cost of spills in the merge and the
# selection role; timed on the H200 (decode_profile.py --maxnreg) it lost at the default 264 programs (BENCHMARKS.md).
DECODE_MAXNREG: int | None = None
TARGET_PROGRAMS = 264  # attention programs a decode step aims for (split-K), before MAX_SPLITS caps it
# Decode batches of at most this many rows run selection and attention in one launch. Measured on the H200 with
# L2 flushed (benchmarks/results/decode_profile_h200_2026-11-30/profile_l2_flushed.txt), one row: one launch
# 2.2-2.5 us per layer when every row is left to FlashAttention (two launches: 4.0-4.7: what short requests pay
# per layer) and as fast with the prompt rule (28.9 vs 30.3 us at 128k); eight rows of 128k: 1.5x slower with
# the prompt rule and the split-by-split merge, as fast with the tiled merge (80.8 vs 81.6 us, 2026-12-01; 32k x 8
# rows 33.5 vs 35.1 us, 2026-12-01d). Rows that select by key bounds are slower in one launch (618 vs 486 us at 128k,
# one row), so larger batches keep two launches.
ONE_LAUNCH_MAX_ROWS = 1
# ... and only while the selection's score rows are at most this wide (Selection.scores' last dim: the engine's
# longest context in key blocks, to the next power of two). The selection role's code grows with the width (its
# vectors span the row: 32 values a thread at 4,096), and past 2,048 the one launch runs its attention slower when
# other kernels ran on the SMs before it, as a layer's GEMMs do in the engine: H200, a 4k dense row after a decode
# layer's four GEMMs (decode_profile.py --between gemm), one launch 14.7 / 15.3 / 15.7 / 19.4 us for widths 512 /
# 1,024 / 2,048 / 4,096 (max_model_len 32,768 / 65,536 / 131,072 / 131,584), two launches 16.0-16.5 us; a 128k row
# with the prompt rule 20.8 / 24.0 us (2,048 / 4,096) in one launch, 20.1 / 20.4 in two. Inside the engine
# (max_model_len 131,584) the one launch took 19.7 us a layer against 15.9 at 32,768 (BENCHMARKS.md).
ONE_LAUNCH_MAX_MPAD = 2048


def one_launch_default(rows: int, score_width: int) -> bool:
    """Whether a decode step of `rows` rows whose selection scores rows of `score_width` blocks runs selection and
    attention in one launch by default (ONE_LAUNCH_MAX_ROWS, ONE_LAUNCH_MAX_MPAD)."""
    return rows <= ONE_LAUNCH_MAX_ROWS and score_width <= ONE_LAUNCH_MAX_MPAD


def default_num_splits(num_seqs: int, num_kv_heads: int, max_blocks: int, target_programs: int | None = None) -> int:
    """Enough splits to fill ~2 waves of an H100 (132 SMs) while keeping >= MIN_BLOCKS_PER_SPLIT blocks per split."""
    target_programs = TARGET_PROGRAMS if target_programs is None else target_programs
    want = max(1, -(-target_programs // max(1, num_seqs * num_kv_heads)))
    return int(max(1, min(want, -(-max_blocks // MIN_BLOCKS_PER_SPLIT), MAX_SPLITS)))


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
        o, lse = gathered.paged_decode(q, key_cache, value_cache, block_table, seq_lens, indices, counts, block_size,
                                       scale)
        if out is not None:
            out.copy_(o)
            o = out
        return o, lse
    if num_splits is None:
        num_splits = default_num_splits(ns, hkv, indices.shape[-1])
    if out is None:
        out = torch.empty_like(q)
    lse = torch.empty(ns, hq, dtype=torch.float32, device=q.device)
    step_launch(q, key_cache, value_cache, block_table, seq_lens, indices.contiguous(), counts.contiguous(),
                block_size=block_size, scale=scale, num_splits=num_splits, out=out, lse=lse)
    return out, lse


class DecodeRoutes(NamedTuple):
    """Where each decode row's key blocks come from (routed_decode; all device tensors, CUDA-graph safe).

    modes [S] int32 (MODE_*); slots [S] int32: the row's request slot in the prompt table (MODE_PROMPT);
    tab_idx [slots, Hkv, Kt] int16/int32 and tab_cnt [slots, Hkv] int32: each slot's stored prompt selection
    (ascending, for this layer); tab_blocks [S] int32: per row, its prompt's block count (blocks from there on
    are all kept); sel_idx [S, Hkv, K] int32 / sel_cnt [S, Hkv] int32: the step's selection for MODE_BOUNDS,
    MODE_RECENT and MODE_RANDOM rows (decode_select); selecting [1] int32: nonzero when some row is in one of those
    modes (known to the metadata builder; None: routed_decode derives it on the device)."""

    modes: torch.Tensor
    slots: torch.Tensor
    tab_idx: torch.Tensor
    tab_cnt: torch.Tensor
    tab_blocks: torch.Tensor
    sel_idx: torch.Tensor
    sel_cnt: torch.Tensor
    selecting: torch.Tensor | None = None


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
    workspace: DecodeScratch | None = None,
    impl: str = "auto",
    select: Selection | None = None,
    min_blocks_per_split: int = MIN_BLOCKS_PER_SPLIT,
    one_launch: bool | None = None,
    merge_splits: int | None = None,
) -> torch.Tensor:
    """Decode attention for rows routed by ``routes`` (DecodeRoutes): one query per row at seq_lens - 1;
    rows in MODE_SKIP are not written. q [S, Hq, D]; out [S, Hq, D] (written in place, returned).
    With ``select``, rows in SELECTED_MODES first get the step's selection into routes.sel_idx/sel_cnt
    (ops.select.decode_select's rule): in a launch of its own just before the attention's, or with
    ``one_launch`` in the attention's launch (default: one_launch_default: one launch for at most
    ONE_LAUNCH_MAX_ROWS rows, the batch size being fixed per CUDA graph, whose score rows are at most
    ONE_LAUNCH_MAX_MPAD wide). num_splits must not depend on the step's data (a CUDA graph replays
    it); workspace: DecodeScratch. merge_splits: split partials the merge reads per load, a speed option (module
    MERGE_SPLITS when None; see there)."""
    from cab_vllm.ops.select import check_selection, decode_select

    hq, hkv, d = _check_common(q, key_cache, value_cache, block_table, seq_lens, block_size)
    ns = q.shape[0]
    check(routes.modes.shape[0] >= ns and routes.slots.shape[0] >= ns and routes.tab_blocks.shape[0] >= ns,
          "routes must cover every row of q (modes, slots and tab_blocks: one entry per row)")
    check(routes.sel_idx.shape[1] == hkv and routes.tab_idx.shape[1] == hkv, "routes are not for this layer's heads")
    if select is not None:
        check_selection(ns, hkv, select.scores, routes.sel_idx, routes.sel_cnt)
    if resolve_impl(impl, q, key_cache) == "torch":
        if select is not None:
            decode_select(q, key_cache, block_table, seq_lens, routes.modes, select.keep, block_size,
                          select.sink_blocks, select.local_blocks, select.seed, routes.sel_idx, routes.sel_cnt,
                          select.scores, impl="torch")
        idx, cnt = routed_indices(routes, seq_lens, block_size, ns)
        o, _ = gathered.paged_decode(q, key_cache, value_cache, block_table, seq_lens, idx, cnt, block_size, scale)
        live = routes.modes[:ns] != MODE_SKIP
        out[live] = o[live]
        return out
    lse = torch.empty(ns, hq, dtype=torch.float32, device=q.device) if workspace is None else workspace.lse[:ns]
    if one_launch is None:
        one_launch = one_launch_default(ns, select.scores.shape[-1] if select is not None else 1)
    if select is not None and not one_launch:
        # The selection in a launch of its own (its programs return at once when no row selects): sharing one
        # launch with the attention cost the attention 1.5x at 8 rows of 128k on the H200 with the split-by-split
        # merge (BENCHMARKS.md; ONE_LAUNCH_MAX_ROWS).
        step_launch(q, key_cache, value_cache, block_table, seq_lens, routes.sel_idx, routes.sel_cnt,
                    block_size=block_size, routes=routes, select=select, attend=False, scratch=workspace)
    step_launch(q, key_cache, value_cache, block_table, seq_lens, routes.sel_idx, routes.sel_cnt,
                block_size=block_size, routes=routes, select=select if one_launch else None, scale=scale,
                num_splits=num_splits, out=out, lse=lse, scratch=workspace,
                min_blocks_per_split=min_blocks_per_split, merge_splits=merge_splits)
    return out


def routed_indices(routes: "DecodeRoutes", seq_lens: torch.Tensor, block_size: int, ns: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The key blocks routed_decode reads, materialized on the rows' device: (indices [S, Hkv, K] int32 ascending,
    -1 padded, K = max(1, the largest count), counts [S, Hkv] int32); MODE_SKIP rows get count 0. A MODE_PROMPT row
    reads its slot's stored blocks and every block from its prompt's block count on, MODE_ALL every causal block,
    the selecting modes the step's selection. One host read (K); for the PyTorch path, tests and traces."""
    ns = routes.modes.shape[0] if ns is None else ns
    hkv = routes.sel_idx.shape[1]
    dev = seq_lens.device
    modes = routes.modes[:ns].long().to(dev)[:, None, None]
    nb = (seq_lens[:ns].long() + block_size - 1) // block_size
    m = max(1, int(nb.max())) if ns else 1
    blk = torch.arange(m, device=dev)
    inside = (blk[None, :] < nb[:, None])[:, None, :]  # [S, 1, M]

    # blocks.selection_to_block_mask, but out-of-range entries dropped: a row's slot or selection may hold another
    # (longer) request's blocks where the row's mode does not read them
    def listed(idx: torch.Tensor, cnt: torch.Tensor) -> torch.Tensor:  # [S, Hkv, K] + counts -> [S, Hkv, M] bool
        idx = idx.long().to(dev)
        ok = (torch.arange(idx.shape[-1], device=dev) < cnt.to(dev)[..., None]) & (idx >= 0) & (idx < m)
        mask = torch.zeros(ns, hkv, m + 1, dtype=torch.bool, device=dev)
        return mask.scatter_(-1, torch.where(ok, idx, m), True)[..., :m]

    slots = torch.where(modes[:, 0, 0] == MODE_PROMPT, routes.slots[:ns].long().to(dev), 0)  # others: any value
    prompt = listed(routes.tab_idx[slots], routes.tab_cnt[slots]) | (
        (blk[None, :] >= routes.tab_blocks[:ns].long().to(dev)[:, None])[:, None, :] & inside)
    picked = listed(routes.sel_idx[:ns], routes.sel_cnt[:ns])
    mask = torch.where(modes == MODE_PROMPT, prompt, torch.where(modes == MODE_ALL, inside.expand_as(picked),
                                                                 picked))
    mask &= modes != MODE_SKIP
    cnt = mask.sum(-1, dtype=torch.int32)
    k = max(1, int(cnt.max())) if ns else 1
    # the kept blocks first, in ascending order (a stable sort of "not kept")
    idx = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[..., :k].to(torch.int32)
    idx = idx.masked_fill(torch.arange(k, device=dev) >= cnt[..., None], -1)
    return idx, cnt


class DecodeScratch(NamedTuple):
    """Preallocated buffers of one decode launch (fixed addresses for CUDA graphs): part_o [>=S, Hq, splits, D]
    and part_lse [>=S, Hq, splits] fp32 split partials, lse [>=S, Hq] fp32, sync int32 zeros of at least
    sync_size(S, Hkv) (the launch leaves it zero)."""

    part_o: torch.Tensor
    part_lse: torch.Tensor
    lse: torch.Tensor
    sync: torch.Tensor


class Selection(NamedTuple):
    """The step's own selection, made in the decode launch for rows in SELECTED_MODES: keep [S] int32 blocks per
    row; scores [>=S, Hkv, Mpad] float32 scratch (Mpad a power of two >= every row's block count); the sink and
    local blocks every selection keeps and the random policy's seed. Whether any row selects at all comes with
    the routes (DecodeRoutes.selecting)."""

    keep: torch.Tensor
    scores: torch.Tensor
    sink_blocks: int
    local_blocks: int
    seed: int


def merge_tile(merge_splits: int, group: int, num_splits: int) -> int:
    """Split partials the merge reads per load: merge_splits, at most MERGE_TILE // (group rounded up to a power of
    two) and no more than the splits there are (rounded up); 1 means split by split."""
    cap = max(1, MERGE_TILE // next_pow2(group))
    return max(1, min(merge_splits, cap, next_pow2(num_splits)))


def sync_size(rows: int, num_kv_heads: int) -> int:
    """int32 counters a decode launch of `rows` rows needs (DecodeScratch.sync)."""
    return 1 + 3 * rows * num_kv_heads


def step_launch(q, key_cache, value_cache, block_table, seq_lens, indices, counts, *, block_size, modes=None,
                routes=None, select=None, attend=True, scale=1.0, num_splits=1, out=None, lse=None, scratch=None,
                min_blocks_per_split=MIN_BLOCKS_PER_SPLIT, merge_splits=None):
    """One Triton launch for a decode step (see _decode_step_kernel): with ``select`` the rows in
    SELECTED_MODES (by ``modes``, or routes.modes) first get their top-``keep`` blocks into indices/counts;
    with ``attend`` every row (routed by ``routes`` when given, else by indices/counts) attends into out/lse."""
    check(isinstance(num_splits, int) and 1 <= num_splits <= MAX_SPLITS,
          f"num_splits={num_splits!r} must be an int in [1, {MAX_SPLITS}]")
    check(isinstance(min_blocks_per_split, int) and min_blocks_per_split >= 1,
          f"min_blocks_per_split={min_blocks_per_split!r} must be an int >= 1")
    merge_splits = MERGE_SPLITS if merge_splits is None else merge_splits
    check(isinstance(merge_splits, int) and 1 <= merge_splits <= MAX_SPLITS and next_pow2(merge_splits) == merge_splits,
          f"merge_splits={merge_splits!r} must be a power of two in [1, {MAX_SPLITS}]")
    ns, hq, d = q.shape
    hkv = key_cache.shape[2]
    if ns == 0:
        return
    group = hq // hkv
    dev = q.device
    if scratch is None:
        part_o = torch.empty(ns, hq, num_splits, d, dtype=torch.float32, device=dev) if attend else q
        part_lse = torch.empty(ns, hq, num_splits, dtype=torch.float32, device=dev) if attend else q
        sync = torch.zeros(sync_size(ns, hkv), dtype=torch.int32, device=dev)
    else:
        part_o, part_lse, _, sync = scratch
        check(not attend or (part_o.shape[0] >= ns and part_o.shape[1:] == (hq, num_splits, d)
                             and part_o.is_contiguous() and part_lse.shape[1:] == (hq, num_splits)
                             and part_lse.is_contiguous()),
              "decode workspace does not match (rows, heads, splits, head dim)")
        check(sync.dtype == torch.int32 and sync.numel() >= sync_size(ns, hkv), "decode sync buffer is too small")
    sync_rows = (sync.numel() - 1) // (3 * hkv)
    block_d = max(16, next_pow2(d))
    routed = routes is not None
    if routed:
        modes, slots, tab_idx, tab_cnt, tab_blocks = (routes.modes, routes.slots, routes.tab_idx, routes.tab_cnt,
                                                      routes.tab_blocks)
        check(tab_idx.stride(-1) == 1 and tab_cnt.stride(-1) == 1, "prompt table rows must be contiguous")
    else:
        slots = tab_blocks = seq_lens
        tab_idx, tab_cnt = indices, counts
        modes = seq_lens if modes is None else modes
    if select is not None:
        keep, scores = select.keep, select.scores
        mpad = scores.shape[-1]
        n_tiles = min(triton.cdiv(mpad, SCORE_TILE), MAX_SCORE_PROGRAMS)
        flag = routes.selecting if routed else None
        need = flag if flag is not None else (modes[:ns] >= MODE_BOUNDS).any().to(torch.int32)
    else:
        keep, scores, mpad, n_tiles, need = seq_lens, part_lse, 1, 0, seq_lens
    n_score = ns * hkv * n_tiles
    n_total = n_score + (ns * hkv * num_splits if attend else 0)
    v = value_cache if value_cache is not None else key_cache
    o = out if out is not None else q
    lse_t = lse if lse is not None else part_lse
    kk = indices.shape[-1]
    _decode_step_kernel[(n_total,)](
        q, key_cache, v, block_table, seq_lens,
        modes, slots, tab_idx, tab_cnt, tab_blocks, indices, counts,
        keep, scores, need, part_o, part_lse, o, lse_t, sync,
        scale * LOG2E, 1.0 / math.sqrt(d),
        hq, hkv, num_splits, n_tiles, n_score, n_total, sync_rows, min_blocks_per_split,
        select.sink_blocks if select else 0, select.local_blocks if select else 0, select.seed if select else 0, kk,
        q.stride(0), q.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        block_table.stride(0), indices.stride(0), indices.stride(1), counts.stride(0),
        tab_idx.stride(0), tab_idx.stride(1), tab_cnt.stride(0),
        scores.stride(0), scores.stride(1) if scores.dim() > 1 else 0,
        part_o.stride(0), part_o.stride(1) if part_o.dim() > 1 else 0, part_o.stride(2) if part_o.dim() > 2 else 0,
        o.stride(0), o.stride(1),
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK=block_size, GROUP_PAD=max(16, next_pow2(group)),
        BLOCK_J=SCORE_TILE, MPAD=mpad, KPAD=next_pow2(kk), ROUTED=routed, SELECT=select is not None,
        ATTEND=attend, MERGE_G=next_pow2(group), MERGE_SPLITS=merge_tile(merge_splits, group, num_splits),
        PAGE_SIZE=key_cache.shape[1], KV_SAME=v.stride()[:3] == key_cache.stride()[:3],
        num_warps=DECODE_WARPS, num_stages=2, **({} if DECODE_MAXNREG is None else {"maxnreg": DECODE_MAXNREG}),
    )
