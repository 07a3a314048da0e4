"""Coarse block geometry: per-block pooling of Q/K and the block-score estimators built on it.

Estimators (CABConfig.estimator) give a row-stochastic estimate A [B, Hq, M, M] of how much attention the
queries of block i pay to the keys of block j (causal, zero above the diagonal):

  max_l2   the seed's choice: one representative per block, the token of largest L2 norm; A = causal
           softmax of q_c . k_c / sqrt(D) (+ log of the key block's token count).
  mean     same with mean-pooled representatives.
  topr     r representatives per block by norm; logit = max over the r x r pairs.
  bounds   Quest-style: the mean query of the block against per-dimension key min/max, an upper bound of
           q . k over the key block: sum_d max(q_d lo_d, q_d hi_d) = q+ . hi + q- . lo (two matmuls).
  sampled  exact: the last ``sample_rows`` real query rows of each query block against every key, softmax
           per row, attention mass summed per key block and averaged over the rows (MInference/XAttention
           style). Never materialises the M x N scores (fused Triton kernel: one read of the keys that keeps each
           row's per-key-block log-sum-exp, then a small kernel for the masses; or two reads of the keys where the
           kept values would be large, SAMPLED_ONE_PASS_BYTES).

Row subsets: given the queries of query blocks first .. M-1 only (q_block_offset = first; a chunk of a
prompt, zero-padded in front to the start of its first block) and all N keys, every estimator returns the
rows first .. M-1 of the square, A [B, Hq, M - first, M], at O((M - first) M) cost.

Pooling reads Q and K once (Triton kernel; twin: reference.coarsen_ref).
"""

from __future__ import annotations

import contextlib
import math

import torch

from cab_vllm.ops._triton import HAS_TRITON, check, next_pow2, resolve_impl
from cab_vllm.ops import reference as ref
from cab_vllm.ops.blocks import PagedKeys, gather_paged
from cab_vllm.config import SUMMARY_ESTIMATORS

# (head, row) pairs per program of the exact-row scorer at most: a GQA group of more heads is split over programs
# (64 query heads of one KV head x 16 rows in one tile needed 304 KiB of shared memory on the H200, 227 KiB there).
SAMPLED_TILE_ROWS = 128
# The exact rows in one read of the keys when each scored row's per-key-block log-sum-exp fits this many bytes (the
# prompt's last query block: 32 heads x 16 rows x 2048 blocks at 128k = 4 MiB); the sampled estimator over every query
# block would need [rows x M x M] and keeps the two passes (the second reads the keys again)
SAMPLED_ONE_PASS_BYTES = 64 << 20
SAMPLED_MASS_TILE = 128  # key blocks per step of the mass kernel
SAMPLED_MASS_SPLITS = 16  # pass 1's split partials the mass kernel merges per load (a fixed tile: one compile)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from cab_vllm.ops._triton import paged_coords

    # sizes that follow the context length stay unspecialized (Triton would compile again for every value that is
    # 1 or a multiple of 16): one compile per kernel serves every chunk of every prompt. Token strides are
    # multiples of the head dim, so their specialization never changes and keeps the loads vectorized.
    # first_block too: it moves with every chunk of a prompt
    @triton.jit(do_not_specialize=["n_tokens", "first_block"])
    def _pool_kernel(
        x_ptr, rep_ptr, mean_ptr, lo_ptr, hi_ptr, neg_ptr, bt_ptr,
        n_tokens, first_block, page_size,
        stride_xb, stride_xh, stride_xn,
        stride_ob, stride_oh, stride_om,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
        DO_REP: tl.constexpr, DO_MEAN: tl.constexpr, DO_BOUNDS: tl.constexpr, PAGED: tl.constexpr,
        SIGN_SPLIT: tl.constexpr,
    ):
        """Program (b, h, m) pools block first_block + m of x into output block m. PAGED: x is a paged cache
        [pages, page_size, H, D] (strides: page, head, slot) of one sequence whose pages bt_ptr lists, b is 0.
        SIGN_SPLIT: the mean goes out as its positive part (mean_ptr) and its negative part (neg_ptr), the bounds
        estimator's query features."""
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        m = tl.program_id(2).to(tl.int64)
        pos = (first_block + m) * BLOCK + tl.arange(0, BLOCK)
        ok = pos < n_tokens
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        mask = ok[:, None] & d_ok[None, :]
        if PAGED:  # bt_ptr is the sequence's own row of the block table
            page, slot = paged_coords(bt_ptr, 0, b, pos, ok, page_size)
            row = page * stride_xb + slot * stride_xn
        else:
            row = b * stride_xb + pos * stride_xn
        x = tl.load(x_ptr + h * stride_xh + row[:, None] + d[None, :], mask=mask, other=0.0)
        xf = x.to(tl.float32)
        obase = b * stride_ob + h * stride_oh + m * stride_om
        if DO_REP:
            norms = tl.where(ok, tl.sum(xf * xf, 1), -1.0)
            best = tl.max(norms, 0)
            # first token reaching the maximum norm
            first = tl.min(tl.where(norms == best, tl.arange(0, BLOCK), BLOCK), 0)
            rep = tl.sum(tl.where((tl.arange(0, BLOCK) == first)[:, None], x, 0.0), 0)
            tl.store(rep_ptr + obase + d, rep.to(rep_ptr.dtype.element_ty), mask=d_ok)
        if DO_MEAN:
            cnt = tl.sum(ok.to(tl.float32), 0)
            mean = tl.sum(xf, 0) / cnt
            if SIGN_SPLIT:
                tl.store(mean_ptr + obase + d, tl.maximum(mean, 0.0), mask=d_ok)
                tl.store(neg_ptr + obase + d, tl.minimum(mean, 0.0), mask=d_ok)
            else:
                tl.store(mean_ptr + obase + d, mean, mask=d_ok)
        if DO_BOUNDS:
            lo = tl.min(tl.where(mask, x, float("inf")), 0)
            hi = tl.max(tl.where(mask, x, float("-inf")), 0)
            tl.store(lo_ptr + obase + d, lo.to(lo_ptr.dtype.element_ty), mask=d_ok)
            tl.store(hi_ptr + obase + d, hi.to(hi_ptr.dtype.element_ty), mask=d_ok)

    # rows too (the scored rows of a query block: fewer in a prompt's last, partial block): vLLM's JIT monitor saw this
    # kernel compile during serving in several H200 runs
    @triton.jit(do_not_specialize=["n_tokens", "q_offset", "rows", "num_splits", "m_blocks", "stride_ab", "stride_ah",
                                   "stride_ai", "stride_bt"])
    def _sampled_kernel(
        q_ptr, k_ptr, qblk_ptr, part_ptr, lse_ptr, a_ptr, bt_ptr, blse_ptr,
        n_tokens, q_offset, rows, scale_log2, group, group_chunks, num_splits, page_size, m_blocks,
        stride_qb, stride_qh, stride_qn,
        stride_kb, stride_kh, stride_kn,
        stride_ab, stride_ah, stride_ai, stride_bt,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, ROWS_PAD: tl.constexpr,
        GPAD: tl.constexpr, MASS_PASS: tl.constexpr, PAGED: tl.constexpr, BLOCK_LSE: tl.constexpr,
    ):
        """Program (b, kvh * group_chunks + c, i * num_splits + split) scores the sampled rows of query block
        qblk[i], for GPAD query heads of KV head kvh's group at once (heads c * GPAD ...; tile rows = (head,
        row) pairs: each key block is loaded once per GPAD heads, i.e. once per group of up to GPAD), against key
        blocks split, split + num_splits, ... q row 0 is token position q_offset (earlier positions are zero
        queries). Pass 1 (MASS_PASS=False) writes each row's partial max and sum to part [B, Hq, Mq, splits, 2,
        ROWS_PAD]; pass 2 reads the merged lse [B, Hq, Mq, ROWS_PAD] (base 2) and writes the per-key-block mass
        averaged over the rows of each head. BLOCK_LSE (pass 1 only): each row's log-sum-exp (base 2) over each key
        block is also written, to blse [B, Hq, Mq, ROWS_PAD, m_blocks], and _sampled_mass_kernel turns them into the
        masses instead of pass 2 (one read of the keys, not two). PAGED: k is a paged cache [pages, page_size, Hkv, D]
        (strides: page, head, slot) read through sequence b's row of the block table bt_ptr."""
        b = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1).to(tl.int64) // group_chunks
        g0 = (tl.program_id(1) % group_chunks) * GPAD  # this program's first head of the group
        num_heads = (tl.num_programs(1) // group_chunks) * group
        mq = tl.num_programs(2) // num_splits
        i = tl.program_id(2) // num_splits
        split = tl.program_id(2) % num_splits
        mb = tl.load(qblk_ptr + i)
        end = tl.minimum((mb + 1) * BLOCK, n_tokens)
        r0 = tl.maximum(mb * BLOCK, end - rows)
        t = tl.arange(0, GPAD * ROWS_PAD)
        g = g0 + t // ROWS_PAD
        r = t % ROWS_PAD
        h = kvh * group + g
        g_ok = g < group
        rpos = (r0 + r).to(tl.int64)  # offsets past 2**31 elements at long contexts
        r_ok = (rpos < end) & g_ok
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q_ok = r_ok & (rpos >= q_offset)  # rows before q_offset: zero queries (a chunk's cached prefix)
        q = tl.load(q_ptr + b * stride_qb + h[:, None] * stride_qh + (rpos - q_offset)[:, None] * stride_qn
                    + d[None, :], mask=q_ok[:, None] & d_ok[None, :], other=0.0)
        if PAGED:
            kbase = k_ptr + kvh * stride_kh
        else:
            kbase = k_ptr + b * stride_kb + kvh * stride_kh
        row_id = (b * num_heads + h) * mq + i  # per (head, row): [GPAD * ROWS_PAD]
        if MASS_PASS:
            lse = tl.load(lse_ptr + row_id * ROWS_PAD + r, mask=g_ok, other=0.0)
            nrows = (end - r0).to(tl.float32)
            gg = g0 + tl.arange(0, GPAD)
            hh = kvh * group + gg
            abase = a_ptr + b * stride_ab + hh * stride_ah + i * stride_ai
        else:
            m_i = tl.full([GPAD * ROWS_PAD], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([GPAD * ROWS_PAD], dtype=tl.float32)
        for j in range(split, mb + 1, num_splits):
            kpos = (j * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
            if PAGED:
                page, slot = paged_coords(bt_ptr, stride_bt, b, kpos, kpos < n_tokens, page_size)
                krow = page * stride_kb + slot * stride_kn
            else:
                krow = kpos * stride_kn
            k = tl.load(kbase + krow[:, None] + d[None, :], mask=(kpos < n_tokens)[:, None] & d_ok[None, :],
                        other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale_log2
            ok = (kpos[None, :] <= rpos[:, None]) & r_ok[:, None]
            if MASS_PASS:
                p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
                mass = tl.sum(tl.sum(tl.reshape(p, [GPAD, ROWS_PAD, BLOCK]), 2), 1)  # per head of the group
                tl.store(abase + j, mass / nrows, mask=gg < group)
            else:
                s = tl.where(ok, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                l_blk = tl.sum(tl.exp2(s - m_safe[:, None]), 1)
                l_i = l_i * tl.exp2(m_i - m_safe) + l_blk
                m_i = m_new
                if BLOCK_LSE:  # the block's share relative to the running max: no extra exponential
                    bl = tl.where(l_blk > 0.0, m_safe + tl.log2(tl.where(l_blk > 0.0, l_blk, 1.0)), float("-inf"))
                    tl.store(blse_ptr + (row_id * ROWS_PAD + r) * m_blocks + j, bl, mask=g_ok)
        if not MASS_PASS:
            pbase = part_ptr + (row_id * num_splits + split) * 2 * ROWS_PAD
            tl.store(pbase + r, m_i, mask=g_ok)
            tl.store(pbase + ROWS_PAD + r, l_i, mask=g_ok)

    @triton.jit(do_not_specialize=["n_tokens", "rows", "num_splits", "m_blocks", "stride_ab", "stride_ah",
                                   "stride_ai"])
    def _sampled_mass_kernel(qblk_ptr, part_ptr, blse_ptr, a_ptr, n_tokens, rows, num_splits, m_blocks,
                             stride_ab, stride_ah, stride_ai,
                             BLOCK: tl.constexpr, ROWS_PAD: tl.constexpr, SPAD: tl.constexpr, JT: tl.constexpr):
        """Program (b, h, i): the rows' log-sum-exp from pass 1's split partials, then each key block's mass
        (exp2(block lse - row lse), averaged over the block's scored rows) from the block lse pass 1 wrote."""
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        i = tl.program_id(2)
        num_heads = tl.num_programs(1)
        mq = tl.num_programs(2)
        mb = tl.load(qblk_ptr + i)
        end = tl.minimum((mb + 1) * BLOCK, n_tokens)
        r0 = tl.maximum(mb * BLOCK, end - rows)
        nrows = end - r0
        row_id = (b * num_heads + h) * mq + i
        r = tl.arange(0, ROWS_PAD)
        mx = tl.full([ROWS_PAD], float("-inf"), dtype=tl.float32)
        tot = tl.zeros([ROWS_PAD], dtype=tl.float32)
        for s0 in range(0, num_splits, SPAD):  # SPAD splits' partials per load (fixed: no compile per split count)
            sp = s0 + tl.arange(0, SPAD)
            pbase = part_ptr + (row_id * num_splits + sp[:, None]) * 2 * ROWS_PAD + r[None, :]
            s_ok = (sp < num_splits)[:, None]
            pm = tl.load(pbase, mask=s_ok, other=float("-inf"))
            pl = tl.load(pbase + ROWS_PAD, mask=s_ok, other=0.0)
            m_new = tl.maximum(mx, tl.max(pm, 0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            tot = tot * tl.exp2(mx - m_safe) + tl.sum(tl.where(pm == float("-inf"), 0.0,
                                                                pl * tl.exp2(pm - m_safe[None, :])), 0)
            mx = m_new
        mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
        lse = tl.where(tot > 0.0, mx_safe + tl.log2(tl.where(tot > 0.0, tot, 1.0)), 0.0)
        r_ok = r < nrows
        bbase = blse_ptr + (row_id * ROWS_PAD + r[:, None]) * m_blocks
        abase = a_ptr + b * stride_ab + h * stride_ah + i * stride_ai
        for j0 in range(0, mb + 1, JT):
            j = j0 + tl.arange(0, JT)
            j_ok = j <= mb
            bl = tl.load(bbase + j[None, :], mask=r_ok[:, None] & j_ok[None, :], other=float("-inf"))
            mass = tl.sum(tl.exp2(bl - lse[:, None]), 0)
            tl.store(abase + j, mass / nrows.to(tl.float32), mask=j_ok)

    @triton.jit(do_not_specialize=["n_tokens", "m", "q_block_offset", "stride_lb", "stride_lh", "stride_li",
                                   "stride_ob", "stride_oh", "stride_oi"])
    def _softmax_group_kernel(
        logit_ptr, amax_ptr, amean_ptr, n_tokens, m, q_block_offset, group,
        stride_lb, stride_lh, stride_li, stride_ob, stride_oh, stride_oi,
        BLOCK: tl.constexpr, COLS: tl.constexpr,
    ):
        """Row i (query block q_block_offset + i) of every query head of one GQA group: causal softmax over
        the m key blocks of logit + log(block length of n_tokens keys), then the max and the mean over the
        group's heads. Never writes the per-head probabilities."""
        b = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1).to(tl.int64)
        i = tl.program_id(2).to(tl.int64)
        j = tl.arange(0, COLS)
        ok = j <= q_block_offset + i
        loglen = tl.log(tl.maximum(tl.minimum(n_tokens - j * BLOCK, BLOCK), 1).to(tl.float32))
        amax = tl.zeros([COLS], dtype=tl.float32)
        asum = tl.zeros([COLS], dtype=tl.float32)
        for g in range(0, group):
            h = kvh * group + g
            z = tl.load(logit_ptr + b * stride_lb + h * stride_lh + i * stride_li + j, mask=ok, other=float("-inf"))
            z = tl.where(ok, z + loglen, float("-inf"))
            e = tl.exp(z - tl.max(z, 0))
            p = e / tl.sum(e, 0)
            amax = tl.maximum(amax, p)
            asum += p
        obase = b * stride_ob + kvh * stride_oh + i * stride_oi
        tl.store(amax_ptr + obase + j, amax, mask=j < m)
        tl.store(amean_ptr + obase + j, asum / group, mask=j < m)



def pool(x: torch.Tensor, block_size: int, max_l2: bool = False, mean: bool = False, bounds: bool = False,
         impl: str = "auto") -> dict[str, torch.Tensor]:
    """One pass over x [B, H, N, D] giving the requested per-block statistics, each [B, H, M, D]:
    'max_l2' (x.dtype), 'mean' (float32), 'lo' and 'hi' (x.dtype). A partial last block pools its valid tokens."""
    check(x.dim() == 4, f"x must be [B, H, N, D], got {tuple(x.shape)}")
    check(x.shape[2] >= 1, "x has no tokens")
    if resolve_impl(impl, x) == "torch":
        out = {}
        if max_l2:
            out["max_l2"] = ref.coarsen_ref(x, block_size, "max_l2")
        if mean:
            out["mean"] = ref.coarsen_ref(x, block_size, "mean")
        if bounds:
            out["lo"], out["hi"] = ref.coarsen_ref(x, block_size, "bounds")
        return out
    b, h, n, d = x.shape
    check(x.stride(-1) == 1, "x must have a contiguous last dim")
    m = ref.num_blocks(n, block_size)
    shape = (b, h, m, d)
    rep = torch.empty(shape, dtype=x.dtype, device=x.device) if max_l2 else None
    mn = torch.empty(shape, dtype=torch.float32, device=x.device) if mean else None
    lo = torch.empty(shape, dtype=x.dtype, device=x.device) if bounds else None
    hi = torch.empty(shape, dtype=x.dtype, device=x.device) if bounds else None
    _pool_launch(x, None, n, 0, (x.stride(0), x.stride(1), x.stride(2)), (b, h, m), block_size,
                 rep=rep, mean=mn, lo=lo, hi=hi)
    out = {}
    if max_l2:
        out["max_l2"] = rep
    if mean:
        out["mean"] = mn
    if bounds:
        out["lo"], out["hi"] = lo, hi
    return out


POOL_WARPS = 2  # warps per pooling program (one block of one head): 2 pooled at 128k in 0.50 ms against 0.66 with 4
# and 1.08 with 8 (H200, benchmarks/gpu/prefill_profile.py --pool-warps)
POOL_BOUNDS_WARPS = 2  # the same for the bounds' per-dimension minima and maxima (the keys' summaries), which hold
# the whole block in registers (167 a thread with 2 warps, 44% of the DRAM peak under Nsight Compute); yet 4 and 8
# warps took the 128k key summaries from 0.213 to 0.233 and 0.381 ms (H100, BENCHMARKS.md, thirty-sixth run)


def _pool_launch(x, bt, n, first_block, x_strides, grid, block_size, rep=None, mean=None, lo=None, hi=None,
                 neg=None):
    """_pool_kernel over grid (b, h, blocks) into the given outputs (views with a contiguous last dim and equal
    strides); x_strides: (per sequence or page, per head, per token or slot); bt: a paged x's page list or None;
    neg: with mean, the mean's negative part goes there and its positive part to mean."""
    check(neg is None or mean is not None, "neg needs mean")
    outs = (rep, mean, lo, hi, neg)
    any_out = next(t for t in outs if t is not None)
    check(all(t is None or (t.stride() == any_out.stride() and t.stride(-1) == 1) for t in outs),
          "the pooled outputs must share their strides and have a contiguous last dim")
    d = x.shape[-1]
    _pool_kernel[grid](
        x, *(t if t is not None else any_out for t in outs), bt if bt is not None else any_out,
        n, first_block, x.shape[1] if bt is not None else 1, *x_strides,
        any_out.stride(0), any_out.stride(1), any_out.stride(2),
        HEAD_DIM=d, BLOCK_D=max(16, next_pow2(d)), BLOCK=block_size,
        DO_REP=rep is not None, DO_MEAN=mean is not None, DO_BOUNDS=lo is not None, PAGED=bt is not None,
        SIGN_SPLIT=neg is not None, num_warps=POOL_BOUNDS_WARPS if lo is not None else POOL_WARPS,
    )


def _pooled_pair(x: torch.Tensor, block_size: int, dtype: torch.dtype, left: str, right: str) -> torch.Tensor:
    """Two of _pool_launch's outputs side by side from one launch over x [B, H, N, D]: [B, H, M, 2D] in dtype,
    ``left`` in the first D columns and ``right`` in the last (e.g. the bounds' key summary [hi | lo])."""
    check(x.dim() == 4 and x.shape[2] >= 1 and x.stride(-1) == 1,
          f"x must be [B, H, N, D] with tokens and a contiguous last dim, got {tuple(x.shape)}")
    b, h, n, d = x.shape
    m = ref.num_blocks(n, block_size)
    out = torch.empty(b, h, m, 2 * d, dtype=dtype, device=x.device)
    _pool_launch(x, None, n, 0, (x.stride(0), x.stride(1), x.stride(2)), (b, h, m), block_size,
                 **{left: out[..., :d], right: out[..., d:]})
    return out


def key_summary_paged(key_cache: torch.Tensor, block_table_row: torch.Tensor, n: int, first_block: int,
                      block_size: int, estimator: str, out: torch.Tensor, impl: str = "auto") -> None:
    """Write the key summaries (key_summary) of blocks first_block .. M-1 of one sequence's n keys, read straight
    from the paged cache key_cache [pages, page_size, Hkv, D] through its pages block_table_row, into out [Hkv,
    M - first_block, W] (e.g. a view of a kept summary store): no gathered copy of the keys, no concatenation."""
    check(estimator in SUMMARY_ESTIMATORS, f"estimator {estimator!r} has no key summary; expected one of "
                                           f"{SUMMARY_ESTIMATORS}")
    check(key_cache.dim() == 4 and key_cache.stride(-1) == 1,
          f"key_cache must be [pages, page_size, Hkv, D] with a contiguous last dim, got {tuple(key_cache.shape)}")
    hkv, d = key_cache.shape[2], key_cache.shape[3]
    m = ref.num_blocks(n, block_size)
    width = 2 * d if estimator == "bounds" else d
    check(0 <= first_block < m, f"first_block={first_block} outside the {m} key blocks of {n} keys")
    check(tuple(out.shape) == (hkv, m - first_block, width) and out.stride(-1) == 1,
          f"out must be [{hkv}, {m - first_block}, {width}] with a contiguous last dim, got {tuple(out.shape)}")
    if resolve_impl(impl, key_cache) == "torch":
        k_new = gather_paged(key_cache, block_table_row, n, start=first_block * block_size)
        out.copy_(ref.key_summary_ref(k_new[None], block_size, estimator)[0])
        return
    check(block_table_row.dtype == torch.int32 and block_table_row.stride(-1) == 1,
          "block_table_row must be a contiguous int32 row")
    o = out[None]
    x_strides = (key_cache.stride(0), key_cache.stride(2), key_cache.stride(1))
    grid = (1, hkv, m - first_block)
    kw = dict(bounds=dict(hi=o[..., :d], lo=o[..., d:]), mean=dict(mean=o), max_l2=dict(rep=o))[estimator]
    _pool_launch(key_cache, block_table_row, n, first_block, x_strides, grid, block_size, **kw)


def sampled_block_attention(q: torch.Tensor, k: torch.Tensor | PagedKeys, block_size: int, rows: int,
                            q_blocks: torch.Tensor | None = None, impl: str = "auto", q_offset: int = 0
                            ) -> torch.Tensor:
    """Exact block attention mass of the last ``rows`` query tokens of each query block in ``q_blocks``.

    k [B, Hkv, N, D], or PagedKeys (the keys read in place from a paged cache); q [B, Hq, N - q_offset, D]: the
    queries at token positions q_offset .. N-1 (earlier positions count as zero queries, as a chunk's cached prefix
    does in a zero-padded q; q_offset = 0: q holds every position). q_blocks [Mq] int: absolute query blocks
    (default: q_offset // bs .. M-1). Returns A [B, Hq, Mq, M] float32, row-stochastic over the causal key blocks.
    """
    b, hq, nq, d = q.shape
    n = k.shape[2]
    paged = isinstance(k, PagedKeys)
    if paged:
        check(k.cache.dim() == 4 and k.cache.stride(-1) == 1 and k.block_table.dim() == 2
              and k.block_table.shape[0] == b and k.block_table.dtype == torch.int32
              and k.block_table.stride(-1) == 1 and k.cache.shape[3] == d,
              f"paged keys must be a [pages, page_size, Hkv, {d}] cache with a contiguous last dim and a [{b}, pages] "
              f"int32 block table with contiguous rows")
    check(0 <= q_offset and q_offset + nq == n, f"q ({nq} rows at position {q_offset}) must end with the keys ({n})")
    m = ref.num_blocks(n, block_size)
    if q_blocks is None:
        q_blocks = torch.arange(q_offset // block_size, m, device=q.device)
    check(1 <= rows <= block_size, f"rows={rows} must be in [1, block_size={block_size}]")
    if resolve_impl(impl, q, k.cache if paged else k) == "torch":
        return ref.sampled_block_attention_ref(q, k.gather() if paged else k, block_size, rows, q_blocks, q_offset)
    check(q.stride(-1) == 1 and (paged or k.stride(-1) == 1), "q and k must have a contiguous last dim")
    qb = q_blocks.to(device=q.device, dtype=torch.int32).contiguous()
    mq = qb.numel()
    a = torch.zeros(b, hq, mq, m, dtype=torch.float32, device=q.device)
    if mq == 0:
        return a
    # split the key blocks over programs when there are few query blocks (the exact last rows at 128k)
    hkv = k.shape[1]
    splits = int(max(1, min(-(-m // 8), -(-1024 // (b * hkv * mq)))))
    rp = max(16, next_pow2(rows))
    part = torch.empty(b, hq, mq, splits, 2, rp, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, hq, mq, rp, dtype=torch.float32, device=q.device)
    group = hq // hkv
    gpad = min(next_pow2(group), 1 << (max(1, SAMPLED_TILE_ROWS // rp).bit_length() - 1))  # heads per program
    chunks = -(-group // gpad)
    args = dict(HEAD_DIM=d, BLOCK_D=max(16, next_pow2(d)), BLOCK=block_size, ROWS_PAD=rp, GPAD=gpad,
                num_warps=8 if gpad * rp >= 128 else 4)
    if paged:  # (page, head, slot) strides and the block table
        kt, bt = k.cache, k.block_table
        k_strides, page_size = (kt.stride(0), kt.stride(2), kt.stride(1)), kt.shape[1]
    else:
        kt, bt = k, qb  # bt unused
        k_strides, page_size = (k.stride(0), k.stride(1), k.stride(2)), 1
    one_pass = b * hq * mq * rp * m * 4 <= SAMPLED_ONE_PASS_BYTES
    blse = torch.empty(b, hq, mq, rp, m if one_pass else 1, dtype=torch.float32, device=q.device)
    common = (n, q_offset, rows, 1.4426950408889634 / math.sqrt(d), group, chunks, splits, page_size, m,
              q.stride(0), q.stride(1), q.stride(2), *k_strides,
              a.stride(0), a.stride(1), a.stride(2), bt.stride(0) if paged else 0)
    grid = (b, hkv * chunks, mq * splits)
    args["PAGED"] = paged
    _sampled_kernel[grid](q, kt, qb, part, lse, a, bt, blse, *common, MASS_PASS=False, BLOCK_LSE=one_pass, **args)
    if one_pass:
        _sampled_mass_kernel[(b, hq, mq)](qb, part, blse, a, n, rows, splits, m, a.stride(0), a.stride(1),
                                          a.stride(2), BLOCK=block_size, ROWS_PAD=rp, SPAD=SAMPLED_MASS_SPLITS,
                                          JT=SAMPLED_MASS_TILE, num_warps=4)
        return a
    pm, pl = part[..., 0, :], part[..., 1, :]
    mx = pm.amax(3, keepdim=True)
    mx_safe = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)
    tot = (pl * torch.exp2(pm - mx_safe)).sum(3)
    lse.copy_(torch.where(tot > 0, mx_safe.squeeze(3) + torch.log2(tot.clamp(min=1e-30)), torch.zeros_like(tot)))
    _sampled_kernel[grid](q, kt, qb, part, lse, a, bt, blse, *common, MASS_PASS=True, BLOCK_LSE=False, **args)
    return a


@contextlib.contextmanager
def _tf32_matmul(enabled: bool):
    """TF32 tensor cores for the fp32 estimator matmuls (rel. error ~5e-4, ~8x faster on Hopper)."""
    if not enabled:
        yield
        return
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def block_logits(q: torch.Tensor, k: torch.Tensor, block_size: int, estimator: str, num_reps: int = 4,
                 impl: str = "auto") -> torch.Tensor:
    """Estimated logits [B, Hq, Mq, Mk] float32 for the one-pass estimators (max_l2, mean, topr, bounds):
    q [B, Hq, Nq, D] and k [B, Hkv, Nk, D] are pooled in blocks separately (Mq = ceil(Nq / bs), Mk = ceil(Nk /
    bs)); Nq = Nk gives the square, a block-aligned tail of q the rows of its query blocks."""
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[-1]
    check(hq % hkv == 0, f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if estimator == "topr" or resolve_impl(impl, q, k) == "torch":
        return ref.block_logits_ref(q, k, block_size, estimator, num_reps)
    if estimator not in SUMMARY_ESTIMATORS:
        raise ValueError(f"estimator {estimator!r} has no logits")
    return logits_from_summary(q, key_summary(k, block_size, estimator, impl=impl), block_size, estimator,
                               impl=impl)


def key_summary(k: torch.Tensor, block_size: int, estimator: str, impl: str = "auto") -> torch.Tensor:
    """Each key block's summary for a one-pass estimator, [B, Hkv, Mk, W] (see reference.key_summary_ref: bounds
    = [max | min], W = 2D; max_l2 / mean, W = D). One pass over k."""
    check(estimator in SUMMARY_ESTIMATORS, f"estimator {estimator!r} has no key summary; expected one of "
                                           f"{SUMMARY_ESTIMATORS}")
    if resolve_impl(impl, k) == "torch":
        return ref.key_summary_ref(k, block_size, estimator)
    if estimator == "bounds":
        return _pooled_pair(k, block_size, k.dtype, "hi", "lo")
    return pool(k, block_size, **{estimator: True}, impl=impl)[estimator]


def query_features(q: torch.Tensor, block_size: int, estimator: str, impl: str = "auto") -> torch.Tensor:
    """The pooled queries whose dot product with the keys' block summaries (key_summary) is the block logit
    before scaling: q [B, Hq, N, D] -> [B, Hq, Mq, W] float32 (bounds: [q+, q-] of the block mean, W = 2D, since
    sum_d max(q lo, q hi) = [q+, q-] . [hi, lo]; mean / max_l2: the block's mean / largest-norm query, W = D)."""
    if estimator in ("max_l2", "mean"):
        return pool(q, block_size, **{estimator: True}, impl=impl)[estimator].float()
    check(estimator == "bounds", f"estimator {estimator!r} has no key summary")
    if resolve_impl(impl, q) == "torch":
        qg = pool(q, block_size, mean=True, impl=impl)["mean"].float()
        return torch.cat([qg.clamp(min=0), qg.clamp(max=0)], -1)
    return _pooled_pair(q, block_size, torch.float32, "mean", "neg")  # [q+ | q-]


def logits_from_summary(q: torch.Tensor, ks: torch.Tensor, block_size: int, estimator: str, impl: str = "auto"
                        ) -> torch.Tensor:
    """block_logits from the keys' summaries ks [B, Hkv, Mk, W] (key_summary): [B, Hq, Mq, Mk] float32."""
    hq, hkv, d = q.shape[1], ks.shape[1], q.shape[-1]
    check(hq % hkv == 0, f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    check(ks.shape[-1] == (2 * d if estimator == "bounds" else d),
          f"key summary of width {ks.shape[-1]} does not fit estimator {estimator!r} at head dim {d}")
    if resolve_impl(impl, q) == "torch":
        return ref.logits_from_summary_ref(q, ks, block_size, estimator)
    scale = 1.0 / math.sqrt(d)
    g = hq // hkv
    b, mq, mk = q.shape[0], ref.num_blocks(q.shape[2], block_size), ks.shape[2]

    qf = query_features(q, block_size, estimator, impl=impl)
    with _tf32_matmul(q.is_cuda):  # [B, Hkv, G*Mq, W]: one matmul serves the whole group
        out = qf.reshape(b, hkv, g * mq, qf.shape[-1]) @ ks.float().transpose(-1, -2)
    return (out * scale).view(b, hq, mq, mk)


def _check_rows(q: torch.Tensor, n_keys: int, block_size: int, q_block_offset: int) -> None:
    """q holds the query positions q_block_offset * bs .. N-1 of the N = n_keys keys."""
    check(q_block_offset >= 0 and q_block_offset * block_size + q.shape[2] == n_keys,
          f"q of {q.shape[2]} tokens from query block {q_block_offset} (block size {block_size}) must end with "
          f"the {n_keys} keys")


def estimate_block_attention(q: torch.Tensor, k: torch.Tensor, block_size: int, estimator: str,
                             num_reps: int = 4, sample_rows: int = 4, impl: str = "auto",
                             q_block_offset: int = 0) -> torch.Tensor:
    """Row-stochastic estimated block attention A [B, Hq, Mq, M] float32 (see the module docstring).

    k [B, Hkv, N, D]; q [B, Hq, N - q_block_offset * bs, D] holds the queries of query blocks
    q_block_offset .. M-1 (Mq = M - q_block_offset rows; 0: the full square). A chunk of a longer prompt
    passes its queries zero-padded in front to the start of its first block."""
    _check_rows(q, k.shape[2], block_size, q_block_offset)
    if estimator == "sampled":
        return sampled_block_attention(q, k, block_size, sample_rows, impl=impl, q_offset=q_block_offset * block_size)
    logits = block_logits(q, k, block_size, estimator, num_reps, impl=impl)
    return ref.logits_to_block_attention(logits, k.shape[2], block_size, q_block_offset)


def group_reduce(a: torch.Tensor, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query-head A [B, Hq, Mq, Mk] -> (max over each GQA group, mean over it), each [B, Hkv, Mq, Mk]."""
    b, hq, mq, mk = a.shape
    ag = a.view(b, num_kv_heads, hq // num_kv_heads, mq, mk)
    return ag.amax(2), ag.mean(2)


def estimate_grouped(q: torch.Tensor, k: torch.Tensor | None, block_size: int, estimator: str, num_reps: int = 4,
                     sample_rows: int = 4, impl: str = "auto", q_block_offset: int = 0,
                     summary: torch.Tensor | None = None, n_keys: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimated block attention reduced over each GQA group: (max, mean), each [B, Hkv, Mq, M] float32 for
    the query blocks q_block_offset .. M-1 that q holds (see estimate_block_attention; 0: the [M, M] square).

    With ``summary`` (key_summary of the n_keys keys, [B, Hkv, M, W]) the keys are not read: k may be None.
    On the Triton path the logit estimators go through one fused causal-softmax + group-reduce kernel that
    never writes the per-head probabilities."""
    if summary is not None:
        check(n_keys is not None and summary.shape[2] == ref.num_blocks(n_keys, block_size),
              f"key summary of {summary.shape[2]} blocks does not fit {n_keys} keys (block size {block_size})")
        _check_rows(q, n_keys, block_size, q_block_offset)
        hkv = summary.shape[1]
        logits = logits_from_summary(q, summary, block_size, estimator, impl=impl)
        if resolve_impl(impl, q) == "torch":
            return group_reduce(ref.logits_to_block_attention(logits, n_keys, block_size, q_block_offset), hkv)
        return softmax_group(logits, n_keys, hkv, block_size, q_block_offset)
    hkv = k.shape[1]
    if estimator == "sampled" or resolve_impl(impl, q, k) == "torch":
        return group_reduce(estimate_block_attention(q, k, block_size, estimator, num_reps, sample_rows, impl,
                                                     q_block_offset), hkv)
    _check_rows(q, k.shape[2], block_size, q_block_offset)
    logits = block_logits(q, k, block_size, estimator, num_reps, impl=impl)
    return softmax_group(logits, k.shape[2], hkv, block_size, q_block_offset)


def softmax_group(logits: torch.Tensor, n_tokens: int, num_kv_heads: int, block_size: int, q_block_offset: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton: causal softmax of block logits [B, Hq, Mq, Mk] (row r = query block q_block_offset + r; key block
    j weighted by its token count out of n_tokens), reduced over each GQA group -> (max, mean) [B, Hkv, Mq, Mk].
    One compile per power of two of Mk (the engine's warm-up makes them all)."""
    b, hq, mq, mk = logits.shape
    amax = torch.empty(b, num_kv_heads, mq, mk, dtype=torch.float32, device=logits.device)
    amean = torch.empty_like(amax)
    _softmax_group_kernel[(b, num_kv_heads, mq)](
        logits, amax, amean, n_tokens, mk, q_block_offset, hq // num_kv_heads,
        logits.stride(0), logits.stride(1), logits.stride(2), amax.stride(0), amax.stride(1), amax.stride(2),
        BLOCK=block_size, COLS=next_pow2(mk), num_warps=4 if mk <= 1024 else 8,
    )
    return amax, amean
