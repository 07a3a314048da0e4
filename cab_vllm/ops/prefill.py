"""Block-sparse causal prefill over vLLM's paged KV cache (varlen batch, GQA), Triton.

One program handles one query tile (a block-aligned run of up to ``block_size`` query rows of one sequence)
for one query head, and streams only the key blocks selected for that tile's KV head, with an online
softmax (FlashAttention-2 style, base-2 exponent). Causality inside the diagonal block is applied per token.
Twin: ops.reference.paged_prefill_ref.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from cab_vllm.ops._triton import HAS_TRITON, check, next_pow2, resolve_impl
from cab_vllm.ops.reference import paged_prefill_ref

if HAS_TRITON:
    import triton
    import triton.language as tl

    from cab_vllm.ops._triton import paged_coords

    # _softmax_step's LAZY: how far (log2 units) a row's block maximum may pass its running maximum before the
    # accumulator is rescaled
    LAZY_TAU = tl.constexpr(8.0)

    @triton.jit
    def _load_v(v_ptr, v_desc, page, slot, kvh, d, v_mask, stride_vpage, stride_vpos, stride_vh,
                BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr):
        """One key block's values [BLOCK, BLOCK_D]: rows (page, slot) of the paged v_ptr under v_mask, or (TMA) the
        box of v_desc at (page, slot) (scalars: the block's page and first slot)."""
        if TMA:
            v = v_desc.load([page, slot, kvh, 0]).reshape([BLOCK, BLOCK_D])
        else:
            v = tl.load(v_ptr + (page * stride_vpage + slot * stride_vpos + kvh * stride_vh)[:, None] + d[None, :],
                        mask=v_mask, other=0.0)
        return v

    @triton.jit
    def _softmax_step(qk, m_i, l_i, acc, v_ptr, v_desc, page, slot, kvh, d, v_mask, stride_vpage, stride_vpos,
                      stride_vh, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, LAZY: tl.constexpr, TMA: tl.constexpr):
        """The online softmax over one key block's scores qk [R, BLOCK] (log2 units) and its values, loaded after
        the probabilities (as the loop always did; _load_v). LAZY (a launch option,
        prefill.LAUNCH_OVERRIDE["lazy_rescale"]): the accumulator is
        rescaled only when a row's block maximum passes its running maximum by more than LAZY_TAU; otherwise the
        stale maximum stays (p <= 2**LAZY_TAU, exact after the final division; the rescale is skipped for the whole
        tile in most steps). Returns (m_i, l_i, acc)."""
        m_blk = tl.max(qk, 1)
        if LAZY:
            if tl.max((m_blk > m_i + LAZY_TAU).to(tl.int32), 0) > 0:
                m_new = tl.maximum(m_i, m_blk)
                alpha = tl.exp2(m_i - tl.where(m_new == float("-inf"), 0.0, m_new))
                l_i = l_i * alpha
                acc = acc * alpha[:, None]
                m_i = m_new
            p = tl.exp2(qk - tl.where(m_i == float("-inf"), 0.0, m_i)[:, None])
            l_i = l_i + tl.sum(p, 1)
            v = _load_v(v_ptr, v_desc, page, slot, kvh, d, v_mask, stride_vpage, stride_vpos, stride_vh, BLOCK,
                        BLOCK_D, TMA)
            acc = acc + tl.dot(p.to(v.dtype), v)
        else:
            m_new = tl.maximum(m_i, m_blk)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(qk - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _load_v(v_ptr, v_desc, page, slot, kvh, d, v_mask, stride_vpage, stride_vpos, stride_vh, BLOCK,
                        BLOCK_D, TMA)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        return m_i, l_i, acc

    # the selection's strides follow its per-chunk width K: left unspecialized so K's value (1, a multiple of 16 or
    # not) does not decide which compile a chunk needs
    # stride_bt unspecialized too: the engine's block table is [max_num_seqs, cdiv(max_model_len, page)] (its row
    # stride often a multiple of 16) while the warm-up's is as wide as its own prompt (129 pages): the likely reason
    # vLLM's JIT monitor saw this kernel compile on the first long request of every H200 engine run.
    @triton.jit(do_not_specialize=["stride_ti_t", "stride_ti_h", "stride_bt"])
    def _sparse_prefill_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, k_desc, v_desc,
        bt_ptr, qsl_ptr, seqlen_ptr,
        tseq_ptr, tqb_ptr, tidx_ptr, tcnt_ptr,
        scale_log2,
        stride_qs, stride_qt, stride_qh,
        stride_os, stride_ot, stride_oh,
        stride_kpage, stride_kpos, stride_kh,
        stride_vpage, stride_vpos, stride_vh,
        stride_bt, stride_ti_t, stride_ti_h, stride_tc_t,
        page_size, group,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, HEADS: tl.constexpr,
        LAZY: tl.constexpr = False, REVERSE: tl.constexpr = False, TMA: tl.constexpr = False,
    ):
        # HEADS query heads of one GQA group share the program: the rows of the tile are (head, position)
        # pairs, so every selected key block is loaded once for all of them and the MMA is HEADS x taller.
        t = tl.program_id(0)
        if REVERSE:  # the tiles last to first: a chunk's later query blocks (the most selected blocks) start first
            t = tl.num_programs(0) - 1 - t
        h0 = tl.program_id(1) * HEADS
        kvh = h0 // group
        s = tl.load(tseq_ptr + t).to(tl.int64)
        mb = tl.load(tqb_ptr + t)
        q0 = tl.load(qsl_ptr + s)
        q1 = tl.load(qsl_ptr + s + 1)
        seq_len = tl.load(seqlen_ptr + s)
        ctx = seq_len - (q1 - q0)

        r = tl.arange(0, HEADS * BLOCK)
        heads = h0 + r // BLOCK
        rows = mb * BLOCK + r % BLOCK
        row_ok = (rows >= ctx) & (rows < seq_len)
        tok = (q0 + rows - ctx).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q_off = s * stride_qs + tok * stride_qt + heads * stride_qh
        q = tl.load(q_ptr + q_off[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)

        m_i = tl.full([HEADS * BLOCK], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([HEADS * BLOCK], dtype=tl.float32)
        acc = tl.zeros([HEADS * BLOCK, BLOCK_D], dtype=tl.float32)
        cnt = tl.load(tcnt_ptr + t * stride_tc_t + kvh)
        idx_base = tidx_ptr + t.to(tl.int64) * stride_ti_t + kvh * stride_ti_h
        first = 0
        if TMA:  # (a launch option) every selected block but the last, unmasked: one box of its page each for
            # its keys and values through the bulk tensor copy engine (pages of a multiple of BLOCK tokens)
            for i in range(0, cnt - 1):
                pos0 = tl.load(idx_base + i) * BLOCK
                page0 = tl.load(bt_ptr + s * stride_bt + pos0 // page_size)  # int32, as the box coordinates must
                slot0 = pos0 % page_size
                k = k_desc.load([page0, slot0, kvh, 0]).reshape([BLOCK, BLOCK_D])
                m_i, l_i, acc = _softmax_step(tl.dot(q, tl.trans(k)) * scale_log2, m_i, l_i, acc, None, v_desc,
                                              page0, slot0, kvh, None, None, 0, 0, 0, BLOCK, BLOCK_D, LAZY, True)
            first = tl.maximum(cnt - 1, 0)  # the last (the diagonal block, where masks apply) as below
        for i in range(first, cnt):
            kb = tl.load(idx_base + i)
            kpos = kb * BLOCK + tl.arange(0, BLOCK)
            k_ok = kpos < seq_len
            page, slot = paged_coords(bt_ptr, stride_bt, s, kpos, k_ok, page_size)
            kv_mask = k_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + (page * stride_kpage + slot * stride_kpos + kvh * stride_kh)[:, None] + d[None, :],
                        mask=kv_mask, other=0.0)
            qk = tl.dot(q, tl.trans(k)) * scale_log2
            # A block before the tile's own holds no key past a row nor past the sequence: only the diagonal block
            # (the tile's own, always the last selected) is masked. Less work per key block than masking every
            # block; H200, 128k, 95%, 4 heads: 22.9 -> 20.3 ms at 8 warps, 21.8 -> 18.1 ms at 16 warps
            # (benchmarks/tune_prefill.py; BENCHMARKS.md). Neither two selected blocks per loop step (a [256 x 128]
            # score tile: 1.3-8x slower at 4 heads per program) nor the diagonal's step peeled out of the loop so the
            # others run without this branch (0.3-4% slower) paid on the H200 (BENCHMARKS.md, thirteenth run).
            if kb >= mb:
                qk = tl.where(k_ok[None, :] & (kpos[None, :] <= rows[:, None]), qk, float("-inf"))
            m_i, l_i, acc = _softmax_step(qk, m_i, l_i, acc, v_ptr, None, page, slot, kvh, d, kv_mask, stride_vpage,
                                          stride_vpos, stride_vh, BLOCK, BLOCK_D, LAZY, False)
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        o_off = s * stride_os + tok * stride_ot + heads * stride_oh
        tl.store(o_ptr + o_off[:, None] + d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])


class PrefillTiles(NamedTuple):
    """Query tiles of a varlen batch and their key-block selection.

    seq [T] int32        sequence of each tile
    qblock [T] int32     absolute query block (position // block_size) of each tile
    indices [T, Hkv, K]  int32 selected key blocks (absolute), ascending, -1 padded
    counts [T, Hkv]      int32 number of valid entries in indices
    """

    seq: torch.Tensor
    qblock: torch.Tensor
    indices: torch.Tensor
    counts: torch.Tensor


def _check_common(q, key_cache, value_cache, block_table, seq_lens, block_size):
    check(q.dtype in (torch.float16, torch.bfloat16, torch.float32), f"q dtype {q.dtype} unsupported: fp16/bf16/fp32")
    check(key_cache.dtype == q.dtype and value_cache.dtype == q.dtype,
          f"q ({q.dtype}), key_cache ({key_cache.dtype}) and value_cache ({value_cache.dtype}) must share a dtype")
    check(key_cache.dim() == 4 and value_cache.shape == key_cache.shape,
          f"key_cache/value_cache must both be [num_pages, page_size, Hkv, D], got {tuple(key_cache.shape)} "
          f"and {tuple(value_cache.shape)}")
    hq, d = q.shape[-2], q.shape[-1]
    hkv = key_cache.shape[2]
    check(key_cache.shape[3] == d, f"head dim of q ({d}) and cache ({key_cache.shape[3]}) differ")
    check(d >= 16, f"head dim {d} < 16 is not supported")
    check(hq % hkv == 0, f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    check(block_size >= 16 and block_size & (block_size - 1) == 0, f"block_size {block_size} must be a power of two >= 16")
    check(q.stride(-1) == 1 and key_cache.stride(-1) == 1 and value_cache.stride(-1) == 1,
          "the head dimension of q and the caches must be contiguous (stride 1)")
    check(block_table.dtype == torch.int32 and seq_lens.dtype == torch.int32, "block_table and seq_lens must be int32")
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache), ("block_table", block_table),
                    ("seq_lens", seq_lens)):
        check(t.device == q.device, f"{name} is on {t.device}, q on {q.device}")
    check(block_table.dim() == 2 and block_table.stride(-1) == 1,
          f"block_table must be [S, max_pages] with contiguous rows, got shape {tuple(block_table.shape)} "
          f"strides {block_table.stride()}")
    check(seq_lens.dim() == 1 and seq_lens.stride(0) == 1, "seq_lens must be a contiguous 1-D tensor")
    return hq, hkv, d


def _check_tiles(tiles: PrefillTiles, hkv: int) -> None:
    check(tiles.indices.dim() == 3 and tiles.indices.shape[1] == hkv and tiles.counts.shape == tiles.indices.shape[:2],
          f"tiles.indices must be [T, Hkv={hkv}, K] and tiles.counts [T, Hkv]")


def paged_sparse_prefill(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    tiles: PrefillTiles,
    block_size: int,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Block-sparse causal attention of a varlen batch of new tokens over a paged KV cache.

    q [T, Hq, D] fp16/bf16/fp32: new tokens, sequences packed by query_start_loc [S+1] int32.
    key_cache, value_cache [num_pages, page_size, Hkv, D]: any strides with a contiguous last dim (pass
        vLLM's kv_cache[0] / kv_cache[1] views as they are). The cache already holds the new tokens.
    block_table [S, max_pages] int32; seq_lens [S] int32: tokens in the cache, new ones included.
    tiles: PrefillTiles; every query row should be covered by exactly one tile (rows of no tile are not
        written). block_size: tokens per selection block (a power of two, not tied to page_size).
    Returns out [T, Hq, D] in q.dtype.
    """
    hq, hkv, d = _check_common(q, key_cache, value_cache, block_table, seq_lens, block_size)
    check(q.dim() == 3, f"q must be [T, Hq, D], got {tuple(q.shape)}")
    check(query_start_loc.dtype == torch.int32 and query_start_loc.dim() == 1
          and query_start_loc.numel() == seq_lens.numel() + 1 and query_start_loc.stride(0) == 1,
          "query_start_loc must be a contiguous int32 [S+1]")
    _check_tiles(tiles, hkv)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if resolve_impl(impl, q, key_cache) == "torch":
        res = paged_prefill_ref(q, key_cache, value_cache, block_table, query_start_loc, seq_lens, *tiles,
                                block_size, scale)
        if out is None:
            return res
        out.copy_(res)
        return out
    if out is None:
        out = torch.zeros_like(q)
    _sparse_prefill_launch(q, key_cache, value_cache, out, block_table, query_start_loc, seq_lens, tiles,
                           block_size, scale, (0, q.stride(0), q.stride(1)), (0, out.stride(0), out.stride(1)), hq)
    return out


# benchmarks/tune_prefill.py sets these to sweep launch parameters (heads, num_warps, num_stages and the options
# below); empty in normal use
LAUNCH_OVERRIDE: dict[str, int] = {}
# the launch options (0/1) and their defaults, measured on an H200 at 128k (BENCHMARKS.md, fifteenth run):
# reverse_tiles -1.8% at 95% in 16k chunks, -2.5% in one launch, level (+0.7%) at 99%: on; lazy_rescale (+8-11%) and
# tma (+1-4%) lost: off
LAUNCH_OPTIONS: dict[str, int] = {"lazy_rescale": 0, "reverse_tiles": 1, "tma": 0}


def heads_per_program(group: int, block_size: int, head_dim: int, elem_size: int = 2) -> int:
    """Query heads packed into one prefill program: the largest power of two dividing the group size
    that keeps the tile at <= 256 rows and the query tile at <= 64 KiB (fp32 at D=128: 128 rows; more runs out
    of shared memory). Each selected key block is then loaded once for all of them."""
    h = 1
    while (group % (2 * h) == 0 and 2 * h * block_size <= 256
           and 2 * h * block_size * head_dim * elem_size <= 64 * 1024):
        h *= 2
    return h


def dense_sparse_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tiles: PrefillTiles, block_size: int,
                         scale: float) -> torch.Tensor:
    """The sparse prefill kernel on dense inputs: q [B, Hq, N, D], k, v [B, Hkv, N, D] (contiguous last dim) seen as
    a paged cache of one N-token page per sequence; tiles cover every query block. Returns out [B, Hq, N, D]."""
    check(q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, "q, k, v need a contiguous last dim")
    b, hq, n, _ = q.shape
    out = torch.empty_like(q)
    dev = q.device
    block_table = torch.arange(b, device=dev, dtype=torch.int32)[:, None]  # page b holds sequence b
    seq_lens = torch.full((b,), n, device=dev, dtype=torch.int32)
    qsl = torch.arange(b + 1, device=dev, dtype=torch.int32) * n
    kc, vc = k.transpose(1, 2), v.transpose(1, 2)  # [B, N, Hkv, D] views: (page, slot, head, dim)
    q_str = (q.stride(0) - n * q.stride(2), q.stride(2), q.stride(1))
    o_str = (out.stride(0) - n * out.stride(2), out.stride(2), out.stride(1))
    _sparse_prefill_launch(q, kc, vc, out, block_table, qsl, seq_lens, tiles, block_size, scale, q_str, o_str, hq)
    return out


def _tma_descriptors(key_cache: torch.Tensor, value_cache: torch.Tensor, block_size: int):
    """The key and value caches [pages, page_size, Hkv, D] as tensor descriptors whose box is one key block of one
    head, [1, block_size, 1, D] (the launch option LAUNCH_OVERRIDE["tma"]: a block is then one bulk copy). Needs
    pages of a multiple of block_size tokens (vLLM's --block-size 64 with CAB's 64-token blocks), a power-of-two
    head dim and 16-byte aligned strides (the copy engine's rule); anything else is refused by name."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    page, d = key_cache.shape[1], key_cache.shape[-1]
    check(page % block_size == 0, f"tma needs pages of a multiple of {block_size} tokens, got {page}")
    check(d == next_pow2(d) and d >= 16, f"tma needs a power-of-two head dim >= 16, got {d}")
    descs = []
    for c in (key_cache, value_cache):
        size = c.element_size()
        check(c.stride(-1) == 1 and all(st * size % 16 == 0 for st in c.stride()[:-1]) and c.data_ptr() % 16 == 0,
              f"tma needs 16-byte aligned cache strides and base, got strides {tuple(c.stride())}")
        descs.append(TensorDescriptor(c, list(c.shape), list(c.stride()), [1, block_size, 1, d]))
    return descs


def _sparse_prefill_launch(q, key_cache, value_cache, out, block_table, query_start_loc, seq_lens, tiles,
                           block_size, scale, q_strides, o_strides, num_q_heads):
    """Launch over T tiles x Hq heads. q_strides/o_strides = (per sequence, per token, per head): the address
    of row r of sequence s is s * per_sequence + (query_start_loc[s] + r - ctx_s) * per_token, so a packed
    varlen q passes per_sequence = 0 and a dense [B, Hq, N, D] q passes stride(0) - N * stride(2)."""
    d, hkv = q.shape[-1], key_cache.shape[2]
    ntiles = tiles.seq.shape[0]
    if ntiles == 0:
        return
    idx, cnt = tiles.indices, tiles.counts
    check(idx.dtype == torch.int32 and cnt.dtype == torch.int32, "tile indices/counts must be int32")
    check(tiles.seq.dtype == torch.int32 and tiles.qblock.dtype == torch.int32, "tile seq/qblock must be int32")
    check((idx.shape[-1] == 1 or idx.stride(-1) == 1) and (cnt.shape[-1] == 1 or cnt.stride(-1) == 1),
          "tile indices/counts must be contiguous in their last dim")
    group = num_q_heads // hkv
    heads = LAUNCH_OVERRIDE.get("heads") or heads_per_program(group, block_size, d, q.element_size())
    rows = heads * block_size
    # measured on an H200 (D=128; benchmarks/results/tune_prefill_h200_2026-11-28.log at N=32k, and with diagonal-only
    # masking at 128k, 95%/99%, in BENCHMARKS.md): 256 rows: 16 warps, 2 stages (390 TFLOP/s at 95% against 350 with 8);
    # 128 rows: 4 warps, 1 stage; 64 rows: 4 warps, 3 stages
    num_warps = LAUNCH_OVERRIDE.get("num_warps") or (16 if rows >= 256 else 4)
    num_stages = LAUNCH_OVERRIDE.get("num_stages") or {64: 3, 128: 1}.get(rows, 2)
    opts = {name: LAUNCH_OVERRIDE.get(name, default) for name, default in LAUNCH_OPTIONS.items()}
    for name, value in opts.items():
        check(value in (0, 1), f"{name} must be 0 or 1, got {value!r}")
    lazy, reverse, tma = opts["lazy_rescale"], opts["reverse_tiles"], opts["tma"]
    k_desc, v_desc = _tma_descriptors(key_cache, value_cache, block_size) if tma else (None, None)
    _sparse_prefill_kernel[(ntiles, num_q_heads // heads)](
        q, key_cache, value_cache, out, k_desc, v_desc,
        block_table, query_start_loc, seq_lens,
        tiles.seq, tiles.qblock, idx, cnt,
        scale * 1.4426950408889634,
        *q_strides, *o_strides,
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_table.stride(0), idx.stride(0), idx.stride(1), cnt.stride(0),
        key_cache.shape[1], group,
        HEAD_DIM=d, BLOCK_D=max(16, next_pow2(d)), BLOCK=block_size, HEADS=heads, LAZY=bool(lazy),
        REVERSE=bool(reverse), TMA=k_desc is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
