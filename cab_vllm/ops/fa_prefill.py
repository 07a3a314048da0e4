"""Block-sparse prefill through FlashAttention's paged varlen kernel (vLLM's ``flash_attn_varlen_func``).

CAB keeps key blocks per (query block, KV head), ascending, and always the query's own block (the diagonal, config
local_blocks >= 1), which is then the last. Seen by FlashAttention, a query block's tokens (its KV head's group of
query heads) are one sequence, and the pages of its kept key blocks, in order, are that sequence's page table: with
bottom-right causal alignment (FlashAttention's, for a query shorter than its keys) query i of the block sees the kept
keys up to its own position, which is exactly CAB's block-sparse causal attention. One launch per KV head over the
head's strided view of the cache [pages, page_size, 1, D], so no copy of the cache, the queries or the output.

Measured on an H200 (benchmarks/gpu/fa_prefill_profile.py, 128k tokens in 16k chunks, 32/8 heads, D=128, bf16, one
layer, the same random selections, one split per launch): 95% 13.8 ms against 19.2 ms for CAB's Triton kernel, 99%
4.2 against 5.7 (benchmarks/results/profiles_h200_2026-12-03f/). Needs pages that tile a key block (block_size a
multiple of the cache's page size) and 16-bit tensors; ops.prefill.paged_sparse_prefill (Triton) runs the rest.

    fa_tables          the launch's tables from PrefillTiles (device tensors, no host sync): one Triton launch
                       (_fa_tables_kernel) on a GPU, a PyTorch twin of ~20 small ops otherwise
    fa_sparse_prefill  the attention: Hkv launches of ``varlen`` (flash_attn_varlen_func or a twin with its call),
                       on FA_STREAMS CUDA streams in turn
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from cab_vllm.ops._triton import HAS_TRITON, check, resolve_impl
from cab_vllm.ops.prefill import PrefillTiles, _check_common, _check_tiles

FA_DTYPES = (torch.float16, torch.bfloat16)
# FlashAttention's num_splits for each launch: 1, no split. Its own heuristic (0) split the keys in every launch of a
# 128k prompt (0.8 ms of combines in 13.6 ms at 95%); on an H200 at 128k in 16k chunks one split took 13.82 against
# 14.74 ms at 95% and 4.17 against 5.02 ms at 99% (a launch holds 256 query blocks: tiles enough for every SM)
# (benchmarks/results/profiles_h200_2026-12-03f/)
NUM_SPLITS = 1
TABLE_WIDTH = 512  # page-table entries a program of _fa_tables_kernel writes per step
# CUDA streams the Hkv launches of one call take turns on (1: all on the caller's stream). Each launch's last wave
# leaves SMs idle until the next launch starts; on a second stream the next head's tiles fill them. The caller's
# stream waits for every launch before the call returns, so nothing after it (and no reuse of the tables' memory)
# can overtake a launch. On an H100 (one 128k layer in 16k chunks, two sweeps in opposite orders) the attention took
# 11.82 / 11.85 ms on 2 streams against 12.48 / 12.47 on 1 at 95% (12.38 / 15.14 on 4), 6.19 / 6.17 against
# 6.38 / 6.50 at 99%; in the 8B engine at 128k 0.465 against 0.491 s a prompt at 95%, 0.147 against 0.164 s at 99%
# (benchmarks/results/fa_streams_2026-12-06/); on an H200 12.30 / 12.34 -> 11.68 / 11.69 ms at 95%, 99% unchanged
# (5.00 / 5.05 against 5.16 / 4.97; benchmarks/results/engine_diag_h200_2026-12-06/). The H100 run's one engine whose
# 2,000-token probe parted from the others at the 11th token was a tie: that token's margin over the runner-up is 0
# in the CAB engines of the H200 run, whose ids and margins are the same with 1 and 2 streams.
FA_STREAMS = 2
_SIDE_STREAMS: dict = {}  # (device index, i) -> the i-th side stream of that device, made once


class FATables(NamedTuple):
    """One launch's tables: tile t is FlashAttention sequence t.

    cu_seqlens_q [T+1] int32  packed query rows of each tile (tiles in packed order, as prefill_tiles makes them)
    seqused_k [Hkv, T] int32  kept keys of each (KV head, tile): full blocks, then the own block up to the tile's end
    pages [Hkv, T, K * block_size / page_size] int32  the cache pages of the kept blocks, in order (unused tail: 0)
    max_seqlen_k              an upper bound of seqused_k (K * block_size: host-known, no sync)
    """

    cu_seqlens_q: torch.Tensor
    seqused_k: torch.Tensor
    pages: torch.Tensor
    max_seqlen_k: int


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["ntiles", "pages_per_seq", "width", "stride_it", "stride_ih", "stride_ct",
                                   "stride_bt", "stride_uh", "stride_ph", "stride_pt"])
    def _fa_tables_kernel(seq_ptr, qb_ptr, idx_ptr, cnt_ptr, bt_ptr, qsl_ptr, sl_ptr, cu_ptr, used_ptr, pages_ptr,
                          ntiles, pages_per_seq, width, stride_it, stride_ih, stride_ct, stride_bt, stride_uh,
                          stride_ph, stride_pt, BLOCK: tl.constexpr, PER: tl.constexpr, BW: tl.constexpr):
        """Tile t, KV head h (one program): the tile's packed rows (cu_seqlens_q, written by head 0), its kept keys
        (seqused_k) and the pages of its kept blocks in order, -1 entries as block 0 (fa_tables' twin)."""
        t = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.load(seq_ptr + t).to(tl.int64)
        qb = tl.load(qb_ptr + t).to(tl.int64)
        q0 = tl.load(qsl_ptr + s).to(tl.int64)
        n = tl.load(sl_ptr + s).to(tl.int64)
        p0 = n - (tl.load(qsl_ptr + s + 1).to(tl.int64) - q0)  # position of the sequence's first new token
        lo = tl.maximum(qb * BLOCK, p0)
        hi = tl.minimum((qb + 1) * BLOCK, n)
        start = q0 + lo - p0
        if h == 0:
            tl.store(cu_ptr + t, start.to(tl.int32))
            if t == ntiles - 1:
                tl.store(cu_ptr + ntiles, (start + hi - lo).to(tl.int32))
        cnt = tl.load(cnt_ptr + t * stride_ct + h).to(tl.int64)
        tl.store(used_ptr + h * stride_uh + t, ((cnt - 1) * BLOCK + hi - qb * BLOCK).to(tl.int32))
        ibase = idx_ptr + t.to(tl.int64) * stride_it + h * stride_ih
        pbase = pages_ptr + h.to(tl.int64) * stride_ph + t.to(tl.int64) * stride_pt
        for w0 in range(0, width, BW):
            w = w0 + tl.arange(0, BW)
            ok = w < width
            blk = tl.maximum(tl.load(ibase + w // PER, mask=ok, other=0), 0).to(tl.int64)
            col = tl.minimum(blk * PER + w % PER, pages_per_seq - 1)
            page = tl.load(bt_ptr + s * stride_bt + col, mask=ok, other=0)
            tl.store(pbase + w, page, mask=ok)


def fa_tables(tiles: PrefillTiles, block_table: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
              block_size: int, page_size: int, impl: str = "auto") -> FATables:
    """FlashAttention's tables for PrefillTiles that cover the packed rows in order (every row in exactly one tile,
    tiles by sequence, then query block: what backend.attention.prefill_tiles gives), each tile's selection
    ascending with its own block last. block_table [S, P] int32 (pages of page_size tokens), query_start_loc [S+1],
    seq_lens [S] int32 (the cache holds the new tokens). impl: "triton" one launch (auto on a GPU), "torch" the
    PyTorch twin; the same tables."""
    check(page_size >= 1 and block_size % page_size == 0,
          f"FlashAttention's sparse prefill needs pages that tile a key block: block_size {block_size} is not a "
          f"multiple of the cache's page size {page_size}")
    ntiles = tiles.seq.shape[0]
    check(ntiles > 0, "fa_tables needs at least one tile")
    per_block = block_size // page_size
    dev = tiles.indices.device
    if resolve_impl(impl, tiles.indices, block_table) == "triton":
        hkv, kmax = tiles.indices.shape[1], tiles.indices.shape[2]
        idx, cnt = tiles.indices.contiguous(), tiles.counts.contiguous()
        check(idx.dtype == torch.int32 and cnt.dtype == torch.int32, "tiles' indices and counts must be int32")
        check(block_table.stride(-1) == 1, "block_table's rows must be contiguous")
        cu = torch.empty(ntiles + 1, dtype=torch.int32, device=dev)
        used = torch.empty(hkv, ntiles, dtype=torch.int32, device=dev)
        width = kmax * per_block
        pages = torch.empty(hkv, ntiles, width, dtype=block_table.dtype, device=dev)
        _fa_tables_kernel[(ntiles, hkv)](
            tiles.seq.contiguous(), tiles.qblock.contiguous(), idx, cnt, block_table, query_start_loc.contiguous(),
            seq_lens.contiguous(), cu, used, pages, ntiles, block_table.shape[1], width, idx.stride(0), idx.stride(1),
            cnt.stride(0), block_table.stride(0), used.stride(0), pages.stride(0), pages.stride(1),
            BLOCK=block_size, PER=per_block, BW=TABLE_WIDTH)  # one compiled variant per engine (block, page)
        return FATables(cu, used, pages, kmax * block_size)
    seq, qb = tiles.seq.long(), tiles.qblock.long()
    qsl = query_start_loc.long()
    n = seq_lens.long()[seq]
    p0 = n - (qsl[1:] - qsl[:-1])[seq]  # position of the sequence's first new token
    lo = torch.maximum(qb * block_size, p0)
    hi = torch.minimum((qb + 1) * block_size, n)
    start = qsl[seq] + lo - p0  # packed row of the tile's first token
    cu = torch.cat([start, start[-1:] + (hi - lo)[-1:]]).to(torch.int32)
    cnt = tiles.counts.long()
    used = ((cnt - 1) * block_size + (hi - qb * block_size)[:, None]).t().to(torch.int32).contiguous()
    idx = tiles.indices.long().clamp(min=0)
    cols = (idx[..., None] * per_block + torch.arange(per_block, device=dev)).clamp(max=block_table.shape[1] - 1)
    pages = block_table[seq[:, None, None, None], cols]  # [T, Hkv, K, per_block]
    pages = pages.flatten(2).transpose(0, 1).contiguous()
    return FATables(cu, used, pages, tiles.indices.shape[-1] * block_size)


def fa_sparse_prefill(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_table: torch.Tensor,
                      query_start_loc: torch.Tensor, seq_lens: torch.Tensor, tiles: PrefillTiles, block_size: int,
                      scale: float | None, out: torch.Tensor, varlen: Callable, fa_version: int,
                      num_splits: int | None = None, streams: int | None = None) -> torch.Tensor:
    """What ops.prefill.paged_sparse_prefill computes (same arguments; tiles as fa_tables wants them), through
    ``varlen``: vLLM's flash_attn_varlen_func (fa_version: its FlashAttention version) or a twin with its call;
    num_splits: FlashAttention's (None: NUM_SPLITS); streams: the CUDA streams the KV heads' launches take turns on
    (None: FA_STREAMS; ignored off CUDA). Writes and returns out [T, Hq, D]."""
    hq, hkv, d = _check_common(q, key_cache, value_cache, block_table, seq_lens, block_size)
    check(q.dtype in FA_DTYPES, f"FlashAttention's sparse prefill needs fp16/bf16, got {q.dtype}")
    check(q.dim() == 3 and out.shape == q.shape and out.stride(-1) == 1,
          f"q and out must be [T, Hq, D] with a contiguous last dim, got {tuple(q.shape)} and {tuple(out.shape)}")
    _check_tiles(tiles, hkv)
    if tiles.seq.shape[0] == 0:
        return out
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    num_splits = NUM_SPLITS if num_splits is None else num_splits
    check(isinstance(num_splits, int) and num_splits >= 0, f"num_splits={num_splits!r} must be an integer >= 0")
    streams = FA_STREAMS if streams is None else streams
    check(isinstance(streams, int) and streams >= 1, f"streams={streams!r} must be an integer >= 1")
    t = fa_tables(tiles, block_table, query_start_loc, seq_lens, block_size, key_cache.shape[1])
    g = hq // hkv
    lanes = _streams(q.device, min(streams, hkv))
    for h in range(hkv):
        hs = slice(h * g, (h + 1) * g)
        with torch.cuda.stream(lanes[h % len(lanes)]):  # None: the caller's stream
            varlen(q=q[:, hs], k=key_cache[:, :, h:h + 1], v=value_cache[:, :, h:h + 1], max_seqlen_q=block_size,
                   cu_seqlens_q=t.cu_seqlens_q, max_seqlen_k=t.max_seqlen_k, seqused_k=t.seqused_k[h],
                   softmax_scale=scale, causal=True, block_table=t.pages[h], out=out[:, hs], fa_version=fa_version,
                   num_splits=num_splits)
    _join(lanes)
    return out


def _streams(device: torch.device, n: int) -> list:
    """n lanes for the launches: None (the caller's stream), then n - 1 side streams of the device, each made to
    wait for the work the caller's stream has queued so far (the tables, q). One lane off CUDA or for n = 1."""
    if n <= 1 or device.type != "cuda":
        return [None]
    cur = torch.cuda.current_stream(device)
    lanes = [None]
    for i in range(1, n):
        key = (device.index, i)
        if key not in _SIDE_STREAMS:
            _SIDE_STREAMS[key] = torch.cuda.Stream(device=device)
        side = _SIDE_STREAMS[key]
        side.wait_stream(cur)
        lanes.append(side)
    return lanes


def _join(lanes: list) -> None:
    """The caller's stream waits for every side lane's launches."""
    side = [lane for lane in lanes if lane is not None]
    if side:
        cur = torch.cuda.current_stream(side[0].device)
        for s in side:
            cur.wait_stream(s)
