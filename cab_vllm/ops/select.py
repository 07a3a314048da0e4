"""Budgeted block selection: priorities -> padded, ascending key-block indices + counts.

The output format is shared by every attention path: ``indices [..., M, K]`` int32, ascending, padded with
-1 past ``counts [..., M]`` int32. FlexAttention's BlockMask and our Triton kernels both read it. Selection
runs through torch.topk / torch.sort, which are GPU kernels already, so this op has no Triton twin.
"""

from __future__ import annotations

import torch

from cab_vllm.ops.blocks import causal_block_mask

PAD = -1


def is_forced(j, last, sink_blocks: int, local_blocks: int):
    """The sink/local guarantee: key block j is always kept by a query in block ``last`` when it is a sink block
    (j < sink_blocks) or in the local window (j > last - local_blocks; causality is checked apart). Tensors
    broadcast. Its Triton twin is _forced, used by the decode kernels."""
    return (j < sink_blocks) | (j > last - local_blocks)


def forced_mask(m: int, sink_blocks: int, local_blocks: int, device=None, first: int = 0,
                rows: int | None = None) -> torch.Tensor:
    """[rows, M] bool: sink blocks (j < sink) and the local window (i - local < j <= i), causal, for the query
    blocks i = first .. first+rows-1 (default: first .. M-1; first = 0 gives the [M, M] square)."""
    causal = causal_block_mask(m, device, first, rows)
    i = torch.arange(first, first + causal.shape[0], device=device)
    j = torch.arange(m, device=device)
    return is_forced(j[None, :], i[:, None], sink_blocks, local_blocks) & causal


def select_topk(priority: torch.Tensor, keep: torch.Tensor, kmax: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``keep[..., i]`` highest-priority key blocks of every row i.

    priority [..., M, Mk] float (higher first; -inf = never); keep int64 [M] (one count per query block, the
    fixed budget) or [..., M] broadcastable to priority.shape[:-1] (per (KV head, query block) counts, the
    adaptive budget), each <= the number of finite-or-+inf entries of its row. Returns (indices [..., M, K]
    int32 ascending, padded with -1, counts [..., M] int32), K = kmax (default max(keep), which costs a device
    sync; pass it when known). A kmax below max(keep) is an error, not a silent truncation (checked where
    keep is on the host).
    """
    if keep.dim() == 0 or keep.dim() >= priority.dim() or keep.shape[-1] != priority.shape[-2]:
        raise ValueError(f"keep {tuple(keep.shape)} must be [M] or [..., M] with M = {priority.shape[-2]} rows "
                         f"of priority {tuple(priority.shape)}")
    if kmax is None:
        kmax = int(keep.max()) if keep.numel() else 0
    elif keep.device.type == "cpu" and keep.numel() and keep.numpy().max() > kmax:  # a host array: no sync
        raise ValueError(f"kmax={kmax} is below the largest count {keep.numpy().max()}")
    kmax = max(min(int(kmax), priority.shape[-1]), 1)
    top = priority.topk(kmax, dim=-1, sorted=True).indices
    live = torch.arange(kmax, device=priority.device) < keep.to(priority.device)[..., None]
    big = torch.iinfo(torch.int32).max
    idx = torch.where(live, top.to(torch.int32), big).sort(dim=-1).values
    idx = torch.where(idx == big, PAD, idx)
    counts = live.sum(-1, dtype=torch.int32).expand(*priority.shape[:-1]).contiguous()
    return idx.contiguous(), counts


def select_tiered(tiers: list[torch.Tensor], keep: torch.Tensor, allowed: torch.Tensor, kmax: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep every block of the tier masks, then the highest-scoring other blocks up to the budget.

    tiers: bool masks [..., M, Mk] whose union must fit the budget (sink/local, a curvature or recency
    share), followed by one float score [..., M, Mk] ordering the rest; keep [M] or [..., M] (see select_topk);
    allowed [M, Mk] bool (causal); kmax: as in select_topk (pass it to avoid a device sync).
    Same return as select_topk.
    """
    *masks, score = tiers
    pri = torch.nan_to_num(score.float(), nan=0.0, posinf=3e38, neginf=-3e38)
    for m in masks:
        pri = pri.masked_fill(m, float("inf"))
    return select_topk(pri.masked_fill(~allowed, float("-inf")), keep, kmax)


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
    forced = is_forced(jj[None, :], last[:, None], sink_blocks, local_blocks)
    score = score.masked_fill(forced[:, None], float("inf"))
    return score.masked_fill((jj[None, :] > last[:, None])[:, None], float("-inf"))


try:
    import triton
    import triton.language as tl

    @triton.jit
    def _group_query(q_ptr, s, kvh, group, stride_qs, stride_qh,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_PAD: tl.constexpr):
        """The decode queries of KV head kvh's group, [GROUP_PAD, BLOCK_D] float32, with the row and column masks."""
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, BLOCK_D)
        g_ok = g < group
        d_ok = d < HEAD_DIM
        q = tl.load(q_ptr + s * stride_qs + (kvh * group + g)[:, None] * stride_qh + d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        return q, g_ok, d, d_ok

    @triton.jit
    def _forced(j, last, sink_blocks, local_blocks):
        """Triton twin of is_forced (the sink/local guarantee)."""
        return (j < sink_blocks) | (j > last - local_blocks)

    @triton.jit
    def _quest_bound(q, lo, hi, g_ok, scale):
        """Per key block, max over the group's heads of sum_d max(q_d lo_d, q_d hi_d), times scale: q [G, D];
        lo, hi [J, D] float32 -> [J]."""
        ub = tl.dot(tl.maximum(q, 0.0), tl.trans(hi), input_precision="ieee") + \
            tl.dot(tl.minimum(q, 0.0), tl.trans(lo), input_precision="ieee")
        return tl.max(tl.where(g_ok[:, None], ub, float("-inf")), 0) * scale

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
        q, g_ok, d, d_ok = _group_query(q_ptr, s, kvh, group, stride_qs, stride_qh, HEAD_DIM, BLOCK_D, GROUP_PAD)
        last = (tl.load(seqlen_ptr + s) - 1) // block_size
        j_ok = (j < mmax) & (j <= last)
        boff = s * stride_bs + kvh * stride_bh + j[:, None] * stride_bm + d[None, :]
        bmask = j_ok[:, None] & d_ok[None, :]
        lo = tl.load(lo_ptr + boff, mask=bmask, other=0.0).to(tl.float32)
        hi = tl.load(hi_ptr + boff, mask=bmask, other=0.0).to(tl.float32)
        score = _quest_bound(q, lo, hi, g_ok, scale)
        score = tl.where(_forced(j, last, sink_blocks, local_blocks), float("inf"), score)
        score = tl.where(j <= last, score, float("-inf"))
        tl.store(out_ptr + s * stride_os + kvh * stride_oh + j, score, mask=j < mmax)

    _HAS_TRITON = True
except ImportError:
    _HAS_TRITON = False
    triton = tl = None


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


# ----------------------------------------------------------------------------------------------------
# decode, CUDA-graph safe: per-row routed selection from the paged cache (scores and top-k in the step's selection
# launch, ops.decode.routed_decode)
# ----------------------------------------------------------------------------------------------------
def hash_score(j: torch.Tensor, h: int | torch.Tensor, n: int | torch.Tensor, seed: int) -> torch.Tensor:
    """Seeded integer hash in [0, 2^24) of (key block j, KV head h, context length n): the random decode
    policy's per-step scores (int64 arithmetic; the Triton kernel computes the same numbers)."""
    x = (j * 1000003 + h * 7919 + n * 104729 + seed * 15485863) & 0x7FFFFFFF
    x = ((x ^ (x >> 13)) * 1274126177) & 0x7FFFFFFF
    x = x ^ (x >> 16)
    return x & 0xFFFFFF


def _bounds_scores(q: torch.Tensor, key_cache: torch.Tensor, bt_row: torch.Tensor, n: int, block_size: int
                   ) -> torch.Tensor:
    """[Hkv, m] Quest upper bounds (max over the group's heads, / sqrt(D)) of q [Hq, D] against the m key blocks of
    one sequence of n tokens, from the elementwise min/max of each block's keys, read from the paged cache."""
    from cab_vllm.ops.blocks import gather_paged
    from cab_vllm.ops.reference import coarsen_ref

    k = gather_paged(key_cache, bt_row, n).float()  # [Hkv, n, D]
    hkv, _, d = k.shape
    lo, hi = (x[0] for x in coarsen_ref(k[None], block_size, "bounds"))  # [Hkv, m, D] each
    qf = q.float().view(hkv, q.shape[0] // hkv, 1, d)
    ub = torch.maximum(qf * lo[:, None], qf * hi[:, None]).sum(-1)  # [Hkv, G, m]
    return ub.amax(1) / d**0.5


def decode_scores_ref(q, key_cache, block_table, seq_lens, modes, block_size, sink_blocks, local_blocks, seed, mpad):
    """Twin of decode_select's scores: [S, Hkv, mpad] float32 priorities of rows in MODE_BOUNDS (Quest upper
    bound from each block's key min/max), MODE_RECENT (block index) and MODE_RANDOM (hash_score); +inf for
    sink/local blocks, -inf past the query's block. Rows in other modes stay -inf."""
    from cab_vllm.ops.decode import MODE_BOUNDS, MODE_RANDOM, MODE_RECENT

    hkv = key_cache.shape[2]
    out = torch.full((q.shape[0], hkv, mpad), float("-inf"), dtype=torch.float32, device=q.device)
    jj = torch.arange(mpad, device=q.device)
    for s in range(q.shape[0]):
        mode, n = int(modes[s]), int(seq_lens[s])
        if mode not in (MODE_BOUNDS, MODE_RECENT, MODE_RANDOM):
            continue
        last = (n - 1) // block_size
        j = jj[: last + 1]
        if mode == MODE_BOUNDS:
            sc = _bounds_scores(q[s], key_cache, block_table[s], n, block_size)
        elif mode == MODE_RECENT:
            sc = j.float().expand(hkv, -1)
        else:
            sc = torch.stack([hash_score(j, h, n, seed) for h in range(hkv)]).float()
        out[s, :, : last + 1] = sc.masked_fill(is_forced(j, last, sink_blocks, local_blocks), float("inf"))
    return out


def check_selection(ns: int, hkv: int, scores: torch.Tensor, out_idx: torch.Tensor, out_cnt: torch.Tensor) -> None:
    """decode_select's buffers fit ns rows of hkv KV heads: scores [>=ns, Hkv, Mpad] float32 (Mpad a power of two
    >= K), out_idx [>=ns, Hkv, K] int32, out_cnt [>=ns, Hkv] int32."""
    from cab_vllm.ops._triton import next_pow2

    mpad = scores.shape[-1]
    ok = (scores.dim() == 3 and scores.dtype == torch.float32 and mpad == next_pow2(mpad)
          and scores.shape[:2] == (scores.shape[0], hkv) and scores.shape[0] >= ns
          and out_idx.dim() == 3 and out_idx.dtype == torch.int32 and out_idx.shape[-1] <= mpad
          and out_idx.shape[:2] == (out_idx.shape[0], hkv) and out_idx.shape[0] >= ns
          and out_cnt.dtype == torch.int32 and out_cnt.shape[1:] == (hkv,) and out_cnt.shape[0] >= ns)
    if not ok:
        raise ValueError(f"decode selection: inconsistent buffers (scores {tuple(scores.shape)} {scores.dtype}, "
                         f"out_idx {tuple(out_idx.shape)} {out_idx.dtype}, out_cnt {tuple(out_cnt.shape)}) for "
                         f"{ns} rows of {hkv} KV heads")


def decode_select(q: torch.Tensor, key_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                  modes: torch.Tensor, keep: torch.Tensor, block_size: int, sink_blocks: int, local_blocks: int,
                  seed: int, out_idx: torch.Tensor, out_cnt: torch.Tensor, scores: torch.Tensor, impl: str = "auto"
                  ) -> None:
    """One decode step's block selection for every row, CUDA-graph safe (one launch, no host sync; routed_decode
    can make it in its own launch).

    q [S, Hq, D]; key_cache [pages, page_size, Hkv, D] (any strides); block_table [S, P] int32; seq_lens [S]
    int32; modes [S] int32 (MODE_*: rows in MODE_BOUNDS / MODE_RECENT / MODE_RANDOM are selected, the others are
    left alone); keep [S] int32: blocks each selected row keeps. MODE_BOUNDS scores every key block by the Quest
    upper bound of the real query against the block's key min/max, computed from the cache on the fly (one read
    of the row's keys: no bounds cache to keep or to fit in memory). Writes out_idx [S, Hkv, K] int32 (ascending,
    -1 padded) and out_cnt [S, Hkv] int32 for the selected rows; scores [S, Hkv, Mpad] float32 is scratch (Mpad a
    power of two >= every row's block count)."""
    from cab_vllm.ops._triton import resolve_impl
    from cab_vllm.ops.decode import SELECTED_MODES

    ns = q.shape[0]
    check_selection(ns, key_cache.shape[2], scores, out_idx, out_cnt)
    mpad = scores.shape[-1]
    if ns == 0:
        return
    if resolve_impl(impl, q, key_cache) == "torch":
        pri = decode_scores_ref(q, key_cache, block_table, seq_lens, modes, block_size, sink_blocks, local_blocks,
                                seed, mpad)
        kk = out_idx.shape[-1]
        for s in range(ns):
            if int(modes[s]) not in SELECTED_MODES:
                continue
            m = (int(seq_lens[s]) - 1) // block_size + 1
            idx, cnt = select_topk(pri[s][:, None], keep[s: s + 1].long().clamp(max=m), kmax=kk)  # rows = Hkv
            out_idx[s] = PAD
            out_idx[s, :, : idx.shape[-1]] = idx[:, 0]
            out_cnt[s] = cnt[:, 0]
        return
    from cab_vllm.ops.decode import Selection, step_launch

    step_launch(q, key_cache, None, block_table, seq_lens, out_idx, out_cnt, block_size=block_size, modes=modes,
                select=Selection(keep, scores, sink_blocks, local_blocks, seed), attend=False)


if _HAS_TRITON:

    SCORE_TILE = 16  # key blocks a selection program scores at a time
    MAX_SCORE_PROGRAMS = 16  # programs per (row, KV head) that score its blocks (each loops over its tiles)
    SCORE_TOKENS = tl.constexpr(4)  # tokens of each block a bounds-scoring step loads at once (BLOCK / this dependent steps)

    @triton.jit
    def _score_blocks(q_ptr, k_ptr, bt_ptr, sc_ptr, s, kvh, first, stride, mode, n,
                      scale, group, page_size, sink_blocks, local_blocks, seed,
                      stride_qs, stride_qh, stride_kp, stride_kpos, stride_kh, stride_bt, stride_ss, stride_sh,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_J: tl.constexpr,
                      BLOCK: tl.constexpr, TOK_STEP: tl.constexpr):
        """Priorities of key blocks first, first + stride, ... (tiles of BLOCK_J) of row s, KV head kvh, into
        sc[s, kvh, :]: mode 3 the Quest bound of the group's queries against each block's key min/max (read from
        the paged cache), 4 the block index (recency), 5 hash_score; +inf for sink/local blocks."""
        last = (n - 1) // BLOCK
        q, g_ok, d, d_ok = _group_query(q_ptr, s, kvh, group, stride_qs, stride_qh, HEAD_DIM, BLOCK_D, GROUP_PAD)
        for j0 in range(first * BLOCK_J, last + 1, stride * BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            j_ok = j <= last
            if mode == 3:
                blo = tl.full([BLOCK_J, BLOCK_D], float("inf"), dtype=tl.float32)
                bhi = tl.full([BLOCK_J, BLOCK_D], float("-inf"), dtype=tl.float32)
                tt = tl.arange(0, TOK_STEP)
                for t0 in range(0, BLOCK, TOK_STEP):  # TOK_STEP tokens of every block in flight at once
                    tok = j[:, None] * BLOCK + t0 + tt[None, :]  # [BLOCK_J, TOK_STEP]
                    t_ok = j_ok[:, None] & (tok < n)  # tokens past the sequence's end have no page
                    page = tl.load(bt_ptr + s * stride_bt + tok // page_size, mask=t_ok, other=0).to(tl.int64)
                    slot = (tok % page_size).to(tl.int64)
                    m3 = t_ok[:, :, None] & d_ok[None, None, :]
                    k = tl.load(k_ptr + (page * stride_kp + slot * stride_kpos + kvh * stride_kh)[:, :, None]
                                + d[None, None, :], mask=m3, other=0.0).to(tl.float32)
                    blo = tl.minimum(blo, tl.min(tl.where(m3, k, float("inf")), 1))
                    bhi = tl.maximum(bhi, tl.max(tl.where(m3, k, float("-inf")), 1))
                blo = tl.where(blo == float("inf"), 0.0, blo)
                bhi = tl.where(bhi == float("-inf"), 0.0, bhi)
                score = _quest_bound(q, blo, bhi, g_ok, scale)
            elif mode == 4:
                score = j.to(tl.float32)
            else:
                x = (j.to(tl.int64) * 1000003 + kvh * 7919 + n.to(tl.int64) * 104729 + seed * 15485863) & 0x7FFFFFFF
                x = ((x ^ (x >> 13)) * 1274126177) & 0x7FFFFFFF
                x = x ^ (x >> 16)
                score = (x & 0xFFFFFF).to(tl.float32)
            score = tl.where(_forced(j, last, sink_blocks, local_blocks), float("inf"), score)
            tl.store(sc_ptr + s * stride_ss + kvh * stride_sh + j, score, mask=j_ok)

    @triton.jit
    def _topk_blocks(sc_ptr, keep_ptr, idx_ptr, cnt_ptr, s, kvh, last, kmax,
                     stride_ss, stride_sh, stride_is, stride_ih, stride_cs,
                     MPAD: tl.constexpr, KPAD: tl.constexpr):
        """Keep the keep[s] highest of blocks 0..last's priorities (another program's writes: read from L2):
        idx[s, kvh, :] ascending, -1 padded to kmax, cnt[s, kvh]. Exact bitwise threshold search, ties by index."""
        jj = tl.arange(0, MPAD)
        sc = tl.load(sc_ptr + s * stride_ss + kvh * stride_sh + jj, mask=jj <= last, other=float("-inf"),
                     cache_modifier=".cg")
        k = tl.minimum(tl.load(keep_ptr + s), last + 1)
        _topk_values(sc, jj, k, idx_ptr + s * stride_is + kvh * stride_ih, cnt_ptr + s * stride_cs + kvh, kmax,
                     KPAD)

    @triton.jit
    def _topk_values(sc, jj, k, base, cnt_at, kmax, KPAD: tl.constexpr):
        """Keep the k highest of the priorities sc [MPAD] (blocks jj; -inf past the row's last block): their
        indices ascending at base[0..k-1], -1 padded to kmax, the count at cnt_at. Exact bitwise threshold search
        (most significant bit first), ties by index."""
        # order-preserving unsigned integer key of each float (32-bit compares in the passes below, not 64-bit)
        b = sc.to(tl.int32, bitcast=True)
        b = b ^ ((b >> 31) & 0x7FFFFFFF)
        key = b.to(tl.uint32, bitcast=True) ^ 0x80000000
        # 1-D tiles for the scans: Triton 3.6 fails to lower a cumsum over a [1, 512+] tile in this kernel (an
        # assertion in its scan lowering on the H200), while 1-D scans lower at every width.
        # thr: the largest key prefix with >= k keys at or above it; n_ge: how many. The search stops as soon as
        # exactly k keys are at or above thr (they are the top k, ties included): fewer passes than the key's 32 bits
        # for most rows, the same selection. On the H200 (prefill_profile.py, 128k in 16k chunks, 95%) the prefill
        # selection kernel took 0.546 ms against 0.559 with all 32 passes; deciding 2 or 4 bits per pass (comparing
        # every key with 4 or 16 candidates) took 0.599 and 1.272 ms (benchmarks/results/profiles_h200_2026-12-03d/)
        thr = tl.full([], 0, dtype=tl.uint32)
        n_ge = tl.sum(tl.full(jj.shape, 1, dtype=tl.int32), 0)
        shift = 32
        while (shift > 0) & (n_ge > k):
            shift -= 1
            cand = thr | (tl.full([], 1, dtype=tl.uint32) << shift)  # thr with the next bit set
            c = tl.sum((key >= cand).to(tl.int32), 0)
            thr = tl.where(c >= k, cand, thr)
            n_ge = tl.where(c >= k, c, n_ge)
        gt = key > thr
        tie = key == thr
        n_gt = tl.sum(gt.to(tl.int32), 0)
        tie_rank = tl.cumsum(tie.to(tl.int32), 0)
        take = gt | (tie & (tie_rank <= k - n_gt))
        pos = tl.cumsum(take.to(tl.int32), 0) - 1
        tl.store(base + pos, jj.to(tl.int32), mask=take)
        cnt = tl.sum(take.to(tl.int32), 0)
        kp = tl.arange(0, KPAD)
        tl.store(base + kp, tl.full([KPAD], -1, dtype=tl.int32), mask=(kp >= cnt) & (kp < kmax))
        tl.store(cnt_at, cnt)
