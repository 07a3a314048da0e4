"""The prefill predictor of the row-local policies in two launches: estimate and select without the [M, M] matrices.

estimate_select(q, summary, n_keys, cfg, q_block_offset, exact) gives what
    select_from_attention(*estimate(q, None, cfg, summary=summary, ...), cfg, q_block_offset=...)
gives for cab without a curvature share and for magnitude, with the fixed budget (policies.fused_select_ok).
The first launch (_logits_kernel) computes the pooled queries' logits against the keys' block summaries
(coarsen.query_features against coarsen.key_summary) once: each program takes RB query blocks of one KV head (the
group's heads as rows) and one split of KEY_SPLIT key blocks, writes the causal logits to a scratch. The second
(_select_rows_kernel), one program per (query block, KV head) row, loads each head's row of logits whole, turns it
into probabilities (its own softmax), takes the max over the GQA group, forces the sink and local blocks and keeps
the top ``keep`` blocks (ops.select's radix-threshold top-k, ties to the lower block). The unfused path writes
[Hq, Mq, M] logits, [Hkv, Mq, M] probabilities and sorts them.
With ``exact`` ([Hkv, M] float32: the exact scores' group max of the prompt's last query block, cab's exact rows)
that row's scores are those. Selections agree with the unfused path's except among blocks whose scores tie
(torch.topk breaks ties its own way) or nearly tie (the summaries' bf16 products here, TF32 there).
"""

from __future__ import annotations

import math

import torch

from cab_vllm.ops._triton import HAS_TRITON, check, next_pow2

TILE_ROWS = 64  # (query block, head) rows per program: 64 // the group's padded size query blocks share the key
# summaries a program reads (more rows exceed an H100's shared memory at 128k with GQA 8: tests/ops/hopper_compile;
# 128 rows were slower on the H200 at 128k: benchmarks/results/profiles_h200_2026-12-02e/)
KEY_TILE = 64  # key blocks per step of a program's loop
KEY_SPLIT = 256  # key blocks per program of the logits launch (rounded to whole key tiles)
# Warps and stages of the two launches: on the H200 at 128k (16k chunks, 95%) 8 warps took the logits from 0.535 to
# 0.92 ms and the selection from 0.545 to 0.597; 3 stages changed nothing
# (benchmarks/results/profiles_h200_2026-12-03d/)
LOGITS_WARPS = 4  # warps per program of the logits launch
LOGITS_STAGES = 2  # key tiles in flight per logits program for 16-bit summaries (fp32 ones: 1, see below)
SELECT_WARPS = 4  # warps per program of the selection launch (one (query block, KV head) row)
SCRATCH_BYTES = 128 << 20  # the logits held at once (fp32); a longer chunk's rows go in slices
# One pass over the summaries, then a launch per row, rather than one program per row tile that computed the logits
# twice (log-sum-exp, then probabilities) and a top-k launch over its scores: on the H200 (prefill_profile.py, 128k
# in 16384-token chunks, one layer, bf16 products in both) the two kernels took 1.13 ms against 1.35 and the
# selection 2.20 ms against 2.44 (benchmarks/results/profiles_h200_2026-12-02e/). The warm-up compiles one logits
# kernel and one selection kernel per power of two of the key blocks a sparse row can have (from the engine's dense
# threshold up) and exact-rows flag.

if HAS_TRITON:
    import triton
    import triton.language as tl

    from cab_vllm.ops.select import _topk_values

    @triton.jit
    def _tile_logits(qf, kbase, j, w, w_ok, m, n_tokens, scale, stride_km, BLOCK: tl.constexpr):
        """Block logits of the tile rows' pooled queries qf [ROWS, WPAD] against key blocks j: the summaries'
        dot product, scaled, plus the log of each block's token count (as coarsen.softmax_group weights it).
        qf comes in the summaries' dtype: bf16 / fp16 products (the engine's summaries are in the model's dtype)
        with fp32 sums; fp32 summaries multiply in TF32."""
        kt = tl.load(kbase + j[:, None].to(tl.int64) * stride_km + w[None, :],
                     mask=(j < m)[:, None] & w_ok[None, :], other=0.0)
        loglen = tl.log(tl.maximum(tl.minimum(n_tokens - j * BLOCK, BLOCK), 1).to(tl.float32))
        return tl.dot(qf, tl.trans(kt)) * scale + loglen[None, :]

    @triton.jit(do_not_specialize=["n_tokens", "first", "rows", "m", "stride_qh", "stride_qr", "stride_kh",
                                   "stride_km", "stride_zr", "stride_zh", "stride_zg"])
    def _logits_kernel(
        qf_ptr, ks_ptr, z_ptr,
        n_tokens, first, rows, m, scale, group,
        stride_qh, stride_qr, stride_kh, stride_km, stride_zr, stride_zh, stride_zg,
        W: tl.constexpr, WPAD: tl.constexpr, GPAD: tl.constexpr, RB: tl.constexpr, BJ: tl.constexpr,
        BLOCK: tl.constexpr, SPLIT: tl.constexpr,
    ):
        """The logits of RB query blocks x the group's heads (tile rows) of one KV head against the key blocks of
        one split (SPLIT blocks), each written once to z [rows, Hkv, group, MPAD] (causal entries only; int32
        offsets: estimate_select keeps z under 2**31 entries). Nothing else per entry: the selection launch takes
        each head's softmax over the row it loads whole."""
        pid = tl.program_id(0)
        kvh = tl.program_id(1)
        sp = tl.program_id(2)
        rr = tl.arange(0, RB * GPAD)  # tile rows: (query block, head of the group)
        r = pid * RB + rr // GPAD
        g = rr % GPAD
        row_ok = (r < rows) & (g < group)
        b = first + r  # the row's query block: it sees key blocks 0..b
        w = tl.arange(0, WPAD)
        w_ok = w < W
        top = first + tl.minimum(pid * RB + RB, rows) - 1  # the last key block any row here sees
        j_lo = sp * SPLIT
        j_hi = tl.minimum(j_lo + SPLIT, top + 1)
        zrow = r * stride_zr + kvh * stride_zh + g * stride_zg
        if j_lo < j_hi:
            qf = tl.load(qf_ptr + (kvh.to(tl.int64) * group + g)[:, None] * stride_qh
                         + r[:, None].to(tl.int64) * stride_qr + w[None, :],
                         mask=row_ok[:, None] & w_ok[None, :], other=0.0).to(ks_ptr.dtype.element_ty)
            kbase = ks_ptr + kvh.to(tl.int64) * stride_kh
            for j0 in range(j_lo, j_hi, BJ):
                j = j0 + tl.arange(0, BJ)
                z = _tile_logits(qf, kbase, j, w, w_ok, m, n_tokens, scale, stride_km, BLOCK)
                ok = (j[None, :] <= b[:, None]) & (j[None, :] < j_hi) & row_ok[:, None]
                tl.store(z_ptr + (zrow[:, None] + j[None, :]), z, mask=ok)

    # m (the key blocks) moves with every chunk too: specialized, a chunk whose block count is not a multiple of 16
    # compiled a variant of its own during serving (vLLM's JIT monitor, 128k at 4 users: a 1.7 s token gap)
    @triton.jit(do_not_specialize=["first", "kmax", "exact_row", "blend", "m", "stride_zr", "stride_zh",
                                   "stride_zg", "stride_ir", "stride_ih", "stride_cr"])
    def _select_rows_kernel(z_ptr, ex_ptr, keep_ptr, idx_ptr, cnt_ptr,
                            first, kmax, exact_row, blend, group, m, sink_blocks, local_blocks,
                            stride_zr, stride_zh, stride_zg, stride_ir, stride_ih, stride_cr,
                            GPAD: tl.constexpr, MPAD: tl.constexpr, KPAD: tl.constexpr, HAS_EXACT: tl.constexpr):
        """One (query block, KV head) row: each head's softmax over its causal logits (the row _logits_kernel wrote,
        loaded whole), the max over the group, the forced blocks, then the top-k.
        With exact scores (HAS_EXACT): row exact_row (-1: none) takes them instead of its estimate, and with blend != 0
        every row takes the larger of the two per key block (CABConfig.vertical_blocks; runtime flags: no compile of
        their own)."""
        row = tl.program_id(0)
        kvh = tl.program_id(1).to(tl.int64)
        b = first + row
        jj = tl.arange(0, MPAD)
        causal = jj <= b
        zbase = z_ptr + row.to(tl.int64) * stride_zr + kvh * stride_zh
        a = tl.zeros([MPAD], dtype=tl.float32)
        for gi in tl.static_range(GPAD):  # one head of the group at a time: one [MPAD] row in registers
            if gi < group:
                z = tl.load(zbase + gi * stride_zg + jj, mask=causal, other=float("-inf"))
                e = tl.exp(z - tl.max(z, 0))  # block 0 is always causal: the max is finite
                a = tl.maximum(a, e * (1.0 / tl.sum(e, 0)))
        if HAS_EXACT:
            ex = tl.load(ex_ptr + kvh * m + jj, mask=jj < m, other=0.0)
            a = tl.where(blend != 0, tl.maximum(a, ex), a)
            a = tl.where(row == exact_row, ex, a)
        a = tl.where((jj < sink_blocks) | (jj > b - local_blocks), float("inf"), a)
        a = tl.where(causal, a, float("-inf"))
        k = tl.minimum(tl.load(keep_ptr + row), b + 1)
        _topk_values(a, jj, k, idx_ptr + row * stride_ir + kvh * stride_ih, cnt_ptr + row * stride_cr + kvh, kmax,
                     KPAD)


def estimate_select(q: torch.Tensor, summary: torch.Tensor, n_keys: int, keep: torch.Tensor, kmax: int,
                    block_size: int, estimator: str, sink_blocks: int, local_blocks: int, q_block_offset: int = 0,
                    exact: torch.Tensor | None = None, rows_first: bool = False, exact_last: bool = True,
                    blend: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Selection of the query blocks q_block_offset .. M-1 that q [1, Hq, N - q_block_offset * bs, D] holds,
    from the key summaries summary [1, Hkv, M, W] of n_keys keys: keep [Mq] int (each row's count, the fixed
    budget), kmax >= max(keep) (the width of the indices). exact: [Hkv, M] float32 scores for the last query
    block (cab's exact rows) or None; exact_last: the last row takes them (the prompt's end); blend: every row ranks
    each key block by the larger of its estimate and them (CABConfig.vertical_blocks). Returns (indices [1, Hkv, Mq,
    kmax] int32 ascending, -1 padded, counts [1, Hkv, Mq] int32), as policies.select_from_attention returns them;
    rows_first: (indices [Mq, Hkv, kmax], counts [Mq, Hkv]), the layout the kernels write and the backend's prefill
    tiles read (no copies). Triton (CUDA, or interpreted)."""
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
    idx = torch.empty(mq, hkv, kk, dtype=torch.int32, device=dev)
    cnt = torch.empty(mq, hkv, dtype=torch.int32, device=dev)
    if exact is not None:
        check(exact.shape == (hkv, m), f"exact must be [{hkv}, {m}], got {tuple(exact.shape)}")
        exact = exact.float().contiguous()
    else:
        check(not blend, "blend needs the exact scores (exact is None)")
    width = qf.shape[-1]
    gpad = max(1, next_pow2(group))
    rb = max(1, TILE_ROWS // gpad)
    keep = keep.to(torch.int32).contiguous()
    mpad = next_pow2(m)
    split = max(KEY_TILE, KEY_SPLIT // KEY_TILE * KEY_TILE)  # a whole number of key tiles per split
    splits = triton.cdiv(m, split)
    rs = max(1, min(mq, SCRATCH_BYTES // (hq * mpad * 4)))  # query blocks per slice
    check(rs * hq * mpad < 2 ** 31, "the logits scratch must hold fewer than 2**31 entries (int32 offsets)")
    z = torch.empty(rs, hkv, group, mpad, dtype=torch.float32, device=dev)
    for r0 in range(0, mq, rs):
        rows = min(rs, mq - r0)
        first = q_block_offset + r0
        _logits_kernel[(triton.cdiv(rows, rb), hkv, splits)](
            qf[:, r0:], ks, z,
            n_keys, first, rows, m, 1.0 / math.sqrt(d), group,
            qf.stride(0), qf.stride(1), ks.stride(0), ks.stride(1), z.stride(0), z.stride(1), z.stride(2),
            W=width, WPAD=next_pow2(width), GPAD=gpad, RB=rb, BJ=KEY_TILE, BLOCK=block_size, SPLIT=split,
            num_warps=LOGITS_WARPS,
            # one key tile in flight for fp32 summaries, whose pipelined tiles would take 264 KB of shared memory
            # (more than an H100 has)
            num_stages=1 if ks.element_size() == 4 else LOGITS_STAGES,
        )
        # MPAD = KPAD: one compiled selection per power of two of the key blocks, whatever the budget (the warm-up
        # makes them all: backend.warmup.warm_fused_select)
        _select_rows_kernel[(rows, hkv)](
            z, exact if exact is not None else z, keep[r0:], idx[r0:], cnt[r0:],
            first, kk, mq - 1 - r0 if exact_last else -1, int(blend), group, m, sink_blocks, local_blocks,
            z.stride(0), z.stride(1), z.stride(2), idx.stride(0), idx.stride(1), cnt.stride(0),
            GPAD=gpad, MPAD=mpad, KPAD=mpad, HAS_EXACT=exact is not None, num_warps=SELECT_WARPS,
        )
    if rows_first:
        return idx, cnt
    return idx.permute(1, 0, 2)[None].contiguous(), cnt.t()[None].contiguous()
