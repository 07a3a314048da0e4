"""The prefill predictor of the row-local policies in two launches: estimate and select without the [M, M] matrices.

estimate_select(q, summary, n_keys, cfg, q_block_offset, exact) gives what
    select_from_attention(*estimate(q, None, cfg, summary=summary, ...), cfg, q_block_offset=...)
gives for cab without a curvature share and for magnitude, with the fixed budget (policies.fused_select_ok):
each program takes RB query blocks of one KV head, computes their pooled queries' logits against the keys' block
summaries (coarsen.query_features against coarsen.key_summary), the causal softmax of every query head (two passes over the key
blocks: log-sum-exp, then probabilities), the max over the GQA group and forces the sink and local blocks; it
writes one row of scores per (query block, KV head), and a second launch keeps the top ``keep`` blocks of each
row (ops.select's radix-threshold top-k, ties to the lower block). The unfused path writes [Hq, Mq, M] logits,
[Hkv, Mq, M] probabilities and sorts them.
With ``exact`` ([Hkv, M] float32: the exact scores' group max of the prompt's last query block, cab's exact rows)
that row's scores are those. Selections agree with the unfused path's except among blocks whose scores tie
(torch.topk breaks ties its own way).
"""

from __future__ import annotations

import math

import torch

from cab_vllm.ops._triton import HAS_TRITON, check, next_pow2

TILE_ROWS = 64  # (query block, head) rows per program: 64 // the group's padded size query blocks share the key
# summaries a program reads (more rows exceed an H100's shared memory at 128k with GQA 8: tests/ops/hopper_compile)
KEY_TILE = 64  # key blocks per step of a program's loop
# The top-k runs in a launch of its own, one program per (query block, KV head) row (_topk_rows_kernel), not in the
# estimate programs one row after another: on the H200 (prefill_profile.py, 128k in 16384-token chunks, one layer)
# the selection took 2.58 vs 3.17 ms at 95% and 2.85 vs 3.60 at 99% (benchmarks/results/profiles_h200_2026-12-01d/),
# and the estimate kernel need not specialize on the key-block count, so the warm-up compiles one estimate kernel
# per exact-rows flag and one top-k per power of two of the key blocks.

if HAS_TRITON:
    import triton
    import triton.language as tl

    from cab_vllm.ops.select import _topk_blocks

    @triton.jit
    def _tile_logits(qf, kbase, j, w, w_ok, m, n_tokens, scale, stride_km, BLOCK: tl.constexpr):
        """Block logits of the tile rows' pooled queries qf [ROWS, WPAD] against key blocks j: the summaries'
        dot product, scaled, plus the log of each block's token count (as coarsen.softmax_group weights it)."""
        kt = tl.load(kbase + j[:, None].to(tl.int64) * stride_km + w[None, :],
                     mask=(j < m)[:, None] & w_ok[None, :], other=0.0).to(tl.float32)
        loglen = tl.log(tl.maximum(tl.minimum(n_tokens - j * BLOCK, BLOCK), 1).to(tl.float32))
        return tl.dot(qf, tl.trans(kt)) * scale + loglen[None, :]

    @triton.jit(do_not_specialize=["n_tokens", "first", "rows", "m", "exact_row", "stride_qh", "stride_qr",
                                   "stride_kh", "stride_km", "stride_sr", "stride_sh"])
    def _estimate_select_kernel(
        qf_ptr, ks_ptr, ex_ptr, sc_ptr,
        n_tokens, first, rows, m, exact_row, scale, group, sink_blocks, local_blocks,
        stride_qh, stride_qr, stride_kh, stride_km, stride_sr, stride_sh,
        W: tl.constexpr, WPAD: tl.constexpr, GPAD: tl.constexpr, RB: tl.constexpr, BJ: tl.constexpr,
        BLOCK: tl.constexpr, HAS_EXACT: tl.constexpr,
    ):
        pid = tl.program_id(0)
        kvh = tl.program_id(1).to(tl.int64)
        rr = tl.arange(0, RB * GPAD)  # tile rows: (query block, head of the group)
        r = pid * RB + rr // GPAD
        g = rr % GPAD
        row_ok = (r < rows) & (g < group)
        b = first + r  # the row's query block: it sees key blocks 0..b
        w = tl.arange(0, WPAD)
        w_ok = w < W
        qf = tl.load(qf_ptr + (kvh * group + g)[:, None] * stride_qh + r[:, None].to(tl.int64) * stride_qr
                     + w[None, :], mask=row_ok[:, None] & w_ok[None, :], other=0.0).to(tl.float32)
        top = first + tl.minimum(pid * RB + RB, rows) - 1  # the last key block any row here sees
        kbase = ks_ptr + kvh * stride_kh
        # pass 1: each (query block, head) row's log-sum-exp over its causal key blocks
        m_i = tl.full([RB * GPAD], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([RB * GPAD], dtype=tl.float32)
        for j0 in range(0, top + 1, BJ):
            j = j0 + tl.arange(0, BJ)
            z = _tile_logits(qf, kbase, j, w, w_ok, m, n_tokens, scale, stride_km, BLOCK)
            z = tl.where((j[None, :] <= b[:, None]) & row_ok[:, None], z, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(z, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), 1)
            m_i = m_new
        lse = tl.where(l_i > 0.0, m_i + tl.log(tl.where(l_i > 0.0, l_i, 1.0)), 0.0)
        # pass 2: probabilities, the group's max, forced blocks first; one row of scores per query block
        rb = pid * RB + tl.arange(0, RB)
        bb = first + rb
        for j0 in range(0, top + 1, BJ):
            j = j0 + tl.arange(0, BJ)
            z = _tile_logits(qf, kbase, j, w, w_ok, m, n_tokens, scale, stride_km, BLOCK)
            ok = (j[None, :] <= b[:, None]) & row_ok[:, None]
            p = tl.where(ok, tl.exp(z - lse[:, None]), 0.0)
            a = tl.max(tl.reshape(p, [RB, GPAD, BJ]), 1)
            if HAS_EXACT:
                ex = tl.load(ex_ptr + kvh * m + j, mask=j < m, other=0.0)
                a = tl.where((rb == exact_row)[:, None], ex[None, :], a)
            forced = (j[None, :] < sink_blocks) | (j[None, :] > bb[:, None] - local_blocks)
            a = tl.where(forced, float("inf"), a)
            tl.store(sc_ptr + rb[:, None].to(tl.int64) * stride_sr + kvh * stride_sh + j[None, :], a,
                     mask=(rb < rows)[:, None] & (j[None, :] <= bb[:, None]))

    @triton.jit(do_not_specialize=["first", "kmax", "stride_sr", "stride_sh", "stride_ir", "stride_ih",
                                   "stride_cr"])
    def _topk_rows_kernel(sc_ptr, keep_ptr, idx_ptr, cnt_ptr, first, kmax,
                          stride_sr, stride_sh, stride_ir, stride_ih, stride_cr,
                          MPAD: tl.constexpr, KPAD: tl.constexpr):
        """The top-k of one (query block, KV head) row of the scores _estimate_select_kernel wrote."""
        row = tl.program_id(0)
        kvh = tl.program_id(1).to(tl.int64)
        _topk_blocks(sc_ptr, keep_ptr, idx_ptr, cnt_ptr, row, kvh, first + row, kmax,
                     stride_sr, stride_sh, stride_ir, stride_ih, stride_cr, MPAD, KPAD)


def estimate_select(q: torch.Tensor, summary: torch.Tensor, n_keys: int, keep: torch.Tensor, kmax: int,
                    block_size: int, estimator: str, sink_blocks: int, local_blocks: int, q_block_offset: int = 0,
                    exact: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Selection of the query blocks q_block_offset .. M-1 that q [1, Hq, N - q_block_offset * bs, D] holds,
    from the key summaries summary [1, Hkv, M, W] of n_keys keys: keep [Mq] int (each row's count, the fixed
    budget), kmax >= max(keep) (the width of the indices). exact: [Hkv, M] float32 scores for the last query
    block (cab's exact rows) or None. Returns (indices [1, Hkv, Mq, kmax] int32 ascending, -1 padded,
    counts [1, Hkv, Mq] int32), as policies.select_from_attention returns them. Triton (CUDA, or interpreted)."""
    check(HAS_TRITON, "estimate_select needs Triton")
    check(q.dim() == 4 and summary.dim() == 4 and q.shape[0] == 1 and summary.shape[0] == 1,
          "q [1, Hq, N, D] and summary [1, Hkv, M, W] expected")
    hq, hkv, d = q.shape[1], summary.shape[1], q.shape[-1]
    check(hq % hkv == 0, f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    m = summary.shape[2]
    check(m == -(-n_keys // block_size), f"key summary of {m} blocks does not fit {n_keys} keys")
    check(q_block_offset * block_size + q.shape[2] == n_keys,
          f"q of {q.shape[2]} tokens from query block {q_block_offset} must end with the {n_keys} keys")
    mq = m - q_block_offset
    check(keep.shape == (mq,), f"keep must be [{mq}], got {tuple(keep.shape)}")
    check(isinstance(kmax, int) and 1 <= kmax, f"kmax={kmax!r} must be an int >= 1")
    from cab_vllm.ops.coarsen import query_features

    qf = query_features(q, block_size, estimator)[0]  # [Hq, Mq, W]
    check(qf.shape[-1] == summary.shape[-1],
          f"key summary of width {summary.shape[-1]} does not fit estimator {estimator!r} at head dim {d}")
    ks = summary[0]
    dev = q.device
    group = hq // hkv
    kk = min(kmax, m)
    scores = torch.empty(mq, hkv, next_pow2(m), dtype=torch.float32, device=dev)
    idx = torch.empty(mq, hkv, kk, dtype=torch.int32, device=dev)
    cnt = torch.empty(mq, hkv, dtype=torch.int32, device=dev)
    if exact is not None:
        check(exact.shape == (hkv, m), f"exact must be [{hkv}, {m}], got {tuple(exact.shape)}")
        exact = exact.float().contiguous()
    width = qf.shape[-1]
    gpad = max(1, next_pow2(group))
    rb = max(1, TILE_ROWS // gpad)
    keep = keep.to(torch.int32).contiguous()
    mpad = next_pow2(m)
    _estimate_select_kernel[(triton.cdiv(mq, rb), hkv)](
        qf, ks, exact if exact is not None else scores, scores,
        n_keys, q_block_offset, mq, m, mq - 1, 1.0 / math.sqrt(d), group, sink_blocks, local_blocks,
        qf.stride(0), qf.stride(1), ks.stride(0), ks.stride(1), scores.stride(0), scores.stride(1),
        W=width, WPAD=next_pow2(width), GPAD=gpad, RB=rb, BJ=KEY_TILE, BLOCK=block_size,
        HAS_EXACT=exact is not None, num_warps=4,
        num_stages=1,  # no pipelined key tiles: fp32 summaries would take 264 KB of shared memory (> an H100's)
    )
    _topk_rows_kernel[(mq, hkv)](scores, keep, idx, cnt, q_block_offset, kk, scores.stride(0), scores.stride(1),
                                 idx.stride(0), idx.stride(1), cnt.stride(0), MPAD=mpad, KPAD=mpad, num_warps=4)
    # KPAD = MPAD: one compiled top-k per power of two of the key blocks, whatever the budget (the warm-up makes
    # them all: backend.warmup.warm_fused_select)
    return idx.permute(1, 0, 2)[None].contiguous(), cnt.t()[None].contiguous()
