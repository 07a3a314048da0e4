"""Token-sparse decode over vLLM's paged KV cache: each query head attends to its own ``keep`` highest-scoring keys,
ranked by their exact scores (decode_rule="tokens"). Three launches:

  1. logits     one program per (row, KV head, chunk of CHUNK tokens): the group's queries against every key of the
                chunk, read in place from the paged cache; base-2 logits (scale x log2 e folded in) into a scratch
                [rows, Hq, NPAD] float32.
  2. threshold  one program per (row, query head): a radix select of the keep-th largest logit over two digits of
                an order-preserving integer key of the float (order_key): its top 8 bits, whose histogram launch 1
                counted per chunk, then LO_BITS more in one scan of the head's logits. The head keeps every key whose
                key's top 8 + LO_BITS bits are at least the keep-th largest's: the keep best, and the keys that tie
                with the keep-th within that bucket (2^-11 relative: the scores' own bf16 rounding is coarser); with
                the count each head kept.
  3. attention  one program per (row, KV head, split of the row's 64-token tiles): the stored logits of the group's
                heads, each head's kept keys only (a tile no head of the group keeps is skipped; only the kept keys'
                values are loaded), online softmax over the kept keys; the last split of a (row, KV head) merges the
                partials (ops.decode's merge).

What it reads per layer and row: every key once (launch 1; what a selector that scores every key exactly must read),
the logits twice (once by launch 2, once by launch 3; with fp32 logits and 32/8 heads of dimension 128 each read
is 6% of the keys' bytes), and the kept keys' values. A cheaper scorer (a compressed or
dimension-major copy of K) would replace launch 1; the rest stays.

CUDA-graph safe: fixed grids (the rows and the engine's longest context, NPAD), every count read on the device; rows
with keep 0 return at once and are not written. Twin: token_decode_torch (the same rule in PyTorch: the CPU path and
the reference of the tests).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from cab_vllm.ops._triton import HAS_TRITON, check, next_pow2, resolve_impl
from cab_vllm.ops.prefill import _check_common

LOG2E = 1.4426950408889634
TILE = 64  # tokens per step of the logits and attention loops
CHUNK = 4096  # tokens per program of the logits launch
LO_BITS = 12  # the threshold's key: order_key's top 8 bits (counted by the logits launch) + LO_BITS (one scan)
SHIFT = 24 - LO_BITS  # the threshold compares order_key >> SHIFT
RADIX_TILE = 2048  # logits per histogram step of the threshold launch
TARGET_PROGRAMS = 264  # attention programs a step aims for (split over the row's tiles)
MAX_SPLITS = 64
MIN_TILES_PER_SPLIT = 8  # a split reads at least this many tiles' logits
SCRATCH_BYTES = 256 << 20  # logits held at once: more rows than fit run in groups of launches
TAKE_ALL = -(1 << 30)  # a threshold below every key >> SHIFT: the head keeps every key


def order_key(x: torch.Tensor) -> torch.Tensor:
    """int32 keys of float32 ``x`` that order as the floats do (for finite values and infinities)."""
    b = x.float().contiguous().view(torch.int32)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


def kept_keys(logits: torch.Tensor, keep: int) -> torch.Tensor:
    """The selection rule, [..., n] float32 logits -> [..., n] bool: the ``keep`` largest of each row and every key
    whose order_key's top bits (>> SHIFT) tie with the keep-th largest's; all of them when keep >= n."""
    n = logits.shape[-1]
    if keep >= n:
        return torch.ones_like(logits, dtype=torch.bool)
    kth = logits.float().topk(keep, dim=-1).values[..., -1:]
    return (order_key(logits) >> SHIFT) >= (order_key(kth) >> SHIFT)


def _check(q, key_cache, value_cache, block_table, seq_lens, keep, out):
    hq, hkv, d = _check_common(q, key_cache, value_cache, block_table, seq_lens, 16)
    check(q.dim() == 3, f"q must be [S, Hq, D], got {tuple(q.shape)}")
    ns = q.shape[0]
    check(block_table.shape[0] >= ns and seq_lens.shape[0] >= ns, "block_table and seq_lens must cover every row of q")
    check(keep.dim() == 1 and keep.shape[0] >= ns and keep.dtype == torch.int32 and keep.device == q.device,
          f"keep must be an int32 [S] tensor on q's device, got {tuple(keep.shape)} {keep.dtype} on {keep.device}")
    check(out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1,
          f"out must be like q {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")
    return hq, hkv, d


def token_decode_torch(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_table: torch.Tensor,
                       seq_lens: torch.Tensor, keep: torch.Tensor, scale: float, out: torch.Tensor,
                       counts: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch twin of token_decode (float32; one host read of the rows' lengths and budgets)."""
    from cab_vllm.ops.blocks import gather_paged

    hq, hkv, d = _check(q, key_cache, value_cache, block_table, seq_lens, keep, out)
    ns, g = q.shape[0], hq // hkv
    for s, (n, kt) in enumerate(zip(seq_lens[:ns].tolist(), keep[:ns].tolist())):
        if kt <= 0:
            continue
        k = gather_paged(key_cache, block_table[s], n).float()  # [Hkv, n, D]
        v = gather_paged(value_cache, block_table[s], n).float()
        z = torch.einsum("hgd,hnd->hgn", q[s].float().view(hkv, g, d), k) * (scale * LOG2E)
        sel = kept_keys(z, kt)
        z = z.masked_fill(~sel, float("-inf"))
        p = torch.exp2(z - z.amax(-1, keepdim=True))
        o = torch.einsum("hgn,hnd->hgd", p, v) / p.sum(-1, keepdim=True)
        out[s] = o.reshape(hq, d).to(out.dtype)
        if counts is not None:
            counts[s] = sel.sum(-1).reshape(hq).to(counts.dtype)
    return out


class TokenScratch(NamedTuple):
    """Buffers of the token decode launches (fixed addresses for CUDA graphs), for up to ``rows`` rows at once:
    logits [rows, Hq, NPAD] float32 (NPAD >= the longest context), chist [rows, NPAD / CHUNK, Hq, 256] int32 (per
    chunk and head, the histogram of the logits' first radix digit), thr / cnt [rows, Hq] int32 (each head's threshold
    and kept count), part_o / part_lse flat float32 split partials for rows x Hq x max_splits (x D) (a launch of r rows
    views them as [r, Hq, splits(, D)], splits = num_splits(r, ...): fewer rows, more splits), lse [rows, Hq], sync
    [rows * Hkv] int32 zeros (the launch leaves them zero)."""

    logits: torch.Tensor
    chist: torch.Tensor
    thr: torch.Tensor
    cnt: torch.Tensor
    part_o: torch.Tensor
    part_lse: torch.Tensor
    lse: torch.Tensor
    sync: torch.Tensor

    @property
    def rows(self) -> int:
        return self.logits.shape[0]

    @property
    def max_splits(self) -> int:
        return self.part_lse.numel() // (self.rows * self.logits.shape[1])

    def partials(self, rows: int, splits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """part_o [rows, Hq, splits, D] and part_lse [rows, Hq, splits] views (contiguous)."""
        hq, d = self.logits.shape[1], self.part_o.numel() // self.part_lse.numel()
        n = rows * hq * splits
        return self.part_o[: n * d].view(rows, hq, splits, d), self.part_lse[:n].view(rows, hq, splits)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self)


def scratch_rows(num_heads: int, max_len: int, rows: int) -> int:
    """Rows one group of launches takes: all ``rows``, or as many as SCRATCH_BYTES of logits hold."""
    npad = -(-max(1, max_len) // TILE) * TILE
    return max(1, min(rows, SCRATCH_BYTES // (num_heads * npad * 4)))


def num_splits(rows: int, num_kv_heads: int, max_len: int) -> int:
    """Splits per (row, KV head) of the attention launch: ~TARGET_PROGRAMS programs, at most MAX_SPLITS, at least
    MIN_TILES_PER_SPLIT tiles each at max_len."""
    want = -(-TARGET_PROGRAMS // max(1, rows * num_kv_heads))
    tiles = -(-max(1, max_len) // TILE)
    return int(max(1, min(want, MAX_SPLITS, -(-tiles // MIN_TILES_PER_SPLIT))))


def token_scratch(rows: int, num_heads: int, num_kv_heads: int, head_dim: int, max_len: int, device
                  ) -> TokenScratch:
    """A TokenScratch for launches of up to ``rows`` rows (scratch_rows: the engine's row cap) of contexts up to
    max_len, with partials for the most splits any launch of 1..rows rows takes (num_splits)."""
    check(rows >= 1 and max_len >= 1, f"token scratch needs rows >= 1 and max_len >= 1, got {rows}, {max_len}")
    npad = -(-max_len // TILE) * TILE
    cap = max(r * num_splits(r, num_kv_heads, max_len) for r in range(1, rows + 1))  # rows x splits, at most
    f32 = dict(dtype=torch.float32, device=device)
    return TokenScratch(torch.zeros(rows, num_heads, npad, **f32),
                        torch.zeros(rows, -(-npad // CHUNK), num_heads, 256, dtype=torch.int32, device=device),
                        torch.zeros(rows, num_heads, dtype=torch.int32, device=device),
                        torch.zeros(rows, num_heads, dtype=torch.int32, device=device),
                        torch.zeros(cap * num_heads * head_dim, **f32), torch.zeros(cap * num_heads, **f32),
                        torch.zeros(rows, num_heads, **f32), torch.zeros(rows * num_kv_heads, dtype=torch.int32,
                                                                         device=device))


if HAS_TRITON:
    import triton
    import triton.language as tl

    from cab_vllm.ops.decode import MERGE_SPLITS, _block_offsets, _merge_group, merge_tile
    from cab_vllm.ops.select import _group_query

    @triton.jit
    def _order_key(z):
        """order_key in Triton: int32 keys of float32 z that order as z does."""
        b = z.to(tl.int32, bitcast=True)
        return b ^ ((b >> 31) & 0x7FFFFFFF)

    @triton.jit(do_not_specialize=["n_chunks"])
    def _logits_kernel(q_ptr, k_ptr, bt_ptr, seqlen_ptr, keep_ptr, lg_ptr, ch_ptr, scale_log2, num_heads,
                       num_kv_heads, n_chunks, stride_qs, stride_qh, stride_kpage, stride_kpos, stride_kh, stride_bt,
                       stride_ls, stride_lh, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_PAD: tl.constexpr,
                       GROUP_P2: tl.constexpr, CHUNK_T: tl.constexpr, TILE_T: tl.constexpr,
                       PAGE_SIZE: tl.constexpr):
        """Base-2 logits of the group's queries against the keys of one chunk of one row, and per head the
        histogram of their keys' first digit (order_key >> 24, 256 buckets) over the chunk, into ch [rows, chunks,
        Hq, 256]: the threshold's first radix pass, counted while the logits are in registers."""
        pid = tl.program_id(0)
        per = num_kv_heads * n_chunks
        s = (pid // per).to(tl.int64)
        kvh = (pid % per) // n_chunks
        c = pid % n_chunks
        t0 = c * CHUNK_T
        n = tl.load(seqlen_ptr + s)
        kt = tl.load(keep_ptr + s)
        if (kt > 0) & (t0 < n):
            group = num_heads // num_kv_heads
            q, g_ok, d, d_ok = _group_query(q_ptr, s, kvh, group, stride_qs, stride_qh, HEAD_DIM, BLOCK_D, GROUP_PAD)
            q = q.to(k_ptr.dtype.element_ty)
            g = tl.arange(0, GROUP_PAD)
            heads = kvh * group + g
            row = lg_ptr + s * stride_ls + heads[:, None].to(tl.int64) * stride_lh
            hist = tl.zeros([2 * GROUP_P2 * 256], dtype=tl.int32)  # (head, digit); the upper half: not counted
            t1 = tl.minimum(t0 + CHUNK_T, n)
            for p0 in range(t0, t1, TILE_T):
                pos = p0 + tl.arange(0, TILE_T)
                k_ok = pos < n
                off = _block_offsets(bt_ptr, stride_bt, s, p0 // TILE_T, k_ok, kvh, stride_kpage, stride_kpos,
                                     stride_kh, d, TILE_T, PAGE_SIZE)
                k = tl.load(k_ptr + off, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
                z = tl.dot(q, tl.trans(k)) * scale_log2
                live = g_ok[:, None] & k_ok[None, :]
                tl.store(row + pos[None, :], z, mask=live)
                bucket = tl.where(live, g[:, None] * 256 + (_order_key(z) >> 24) + 128, GROUP_P2 * 256)
                hist += tl.histogram(tl.reshape(bucket, [GROUP_PAD * TILE_T]),
                                     2 * GROUP_P2 * 256)
            b = tl.arange(0, 2 * GROUP_P2 * 256)
            tl.store(ch_ptr + ((s * n_chunks + c) * num_heads + kvh * group) * 256 + b, hist, mask=b < group * 256)

    @triton.jit
    def _bucket(hist, bins, need):
        """The bucket of ``hist`` [B] (ascending buckets) holding the need-th largest key: (bucket, keys above it,
        keys in it)."""
        ge = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # keys in this bucket or above
        b = tl.max(tl.where(ge >= need, bins, -1), 0)
        here = tl.sum(tl.where(bins == b, hist, 0), 0)
        return b, tl.sum(tl.where(bins == b, ge, 0), 0) - here, here

    @triton.jit(do_not_specialize=["n_chunks"])
    def _threshold_kernel(lg_ptr, ch_ptr, seqlen_ptr, keep_ptr, thr_ptr, cnt_ptr, num_heads, n_chunks, stride_ls,
                          stride_lh, stride_ts, CHUNK_T: tl.constexpr, LO: tl.constexpr, RTILE: tl.constexpr,
                          TAKE: tl.constexpr):
        """One (row, query head): the threshold of its keep best keys, the keep-th largest key's top 8 + LO bits
        (order_key >> (24 - LO); TAKE when the head keeps every key), and how many keys reach it. The first digit's
        histogram is the logits launch's, summed over the row's chunks; the second is counted in one scan of the
        head's logits, over the keys in the first digit's bucket."""
        pid = tl.program_id(0)
        s = (pid // num_heads).to(tl.int64)
        h = pid % num_heads
        n = tl.load(seqlen_ptr + s)
        kt = tl.load(keep_ptr + s)
        if kt > 0:
            thr = n * 0 + TAKE
            count = n
            if kt < n:
                b1 = tl.arange(0, 256)
                h1 = tl.zeros([256], dtype=tl.int32)
                for c in range(0, tl.cdiv(n, CHUNK_T)):
                    h1 += tl.load(ch_ptr + ((s * n_chunks + c) * num_heads + h) * 256 + b1)
                top, above1, _ = _bucket(h1, b1, kt)
                hi = top - 128  # the keep-th largest key >> 24
                base = lg_ptr + s * stride_ls + h.to(tl.int64) * stride_lh
                b2 = tl.arange(0, 2 << LO)
                h2 = tl.zeros([2 << LO], dtype=tl.int32)
                for i0 in range(0, n, RTILE):
                    i = i0 + tl.arange(0, RTILE)
                    ok = i < n
                    key = _order_key(tl.load(base + i, mask=ok, other=0.0))
                    inside = ok & ((key >> 24) == hi)
                    h2 += tl.histogram(tl.where(inside, (key >> (24 - LO)) & ((1 << LO) - 1), 1 << LO), 2 << LO)
                h2 = tl.where(b2 < (1 << LO), h2, 0)  # the upper half: keys outside the bucket
                low, above2, here2 = _bucket(h2, b2, kt - above1)
                thr = hi * (1 << LO) + low
                count = above1 + above2 + here2
            tl.store(thr_ptr + s * stride_ts + h, thr)
            tl.store(cnt_ptr + s * stride_ts + h, count)

    @triton.jit(do_not_specialize=["num_splits"])
    def _attend_kernel(lg_ptr, v_ptr, bt_ptr, seqlen_ptr, keep_ptr, thr_ptr, po_ptr, plse_ptr, o_ptr, lse_ptr,
                       sync_ptr, num_heads, num_kv_heads, num_splits, min_per,
                       stride_ls, stride_lh, stride_ts, stride_vpage, stride_vpos, stride_vh, stride_bt,
                       stride_pos, stride_poh, stride_pok, stride_os, stride_oh,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_PAD: tl.constexpr, TILE_T: tl.constexpr,
                       PAGE_SIZE: tl.constexpr, SHIFT_T: tl.constexpr, MERGE_G: tl.constexpr,
                       MERGE_SPLITS_T: tl.constexpr):
        """Split `split` of (row, KV head): online softmax over the kept keys of its tiles (stored logits; values
        of kept keys only) -> normalized partial and base-2 LSE; the last split to finish merges the group's."""
        u = tl.program_id(0)
        per = num_kv_heads * num_splits
        s = (u // per).to(tl.int64)
        kvh = (u % per) // num_splits
        split = u % num_splits
        n = tl.load(seqlen_ptr + s)
        kt = tl.load(keep_ptr + s)
        if kt > 0:
            group = num_heads // num_kv_heads
            g = tl.arange(0, GROUP_PAD)
            g_ok = g < group
            heads = kvh * group + g
            d = tl.arange(0, BLOCK_D)
            d_ok = d < HEAD_DIM
            thr = tl.load(thr_ptr + s * stride_ts + heads, mask=g_ok, other=1 << 30)
            tiles = tl.cdiv(n, TILE_T)
            per_split = tl.maximum(tl.cdiv(tiles, num_splits), min_per)
            used = tl.cdiv(tiles, per_split)
            i0 = split * per_split
            i1 = tl.minimum(i0 + per_split, tiles)
            row = lg_ptr + s * stride_ls + heads[:, None].to(tl.int64) * stride_lh
            m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
            acc = tl.zeros([GROUP_PAD, BLOCK_D], dtype=tl.float32)
            for i in range(i0, i1):
                pos = i * TILE_T + tl.arange(0, TILE_T)
                ok = pos < n
                z = tl.load(row + pos[None, :], mask=g_ok[:, None] & ok[None, :], other=0.0)
                sel = ((_order_key(z) >> SHIFT_T) >= thr[:, None]) & ok[None, :] & g_ok[:, None]
                tok = tl.max(sel.to(tl.int32), 0) > 0  # some head of the group keeps the key
                if tl.max(tok.to(tl.int32), 0) > 0:
                    off = _block_offsets(bt_ptr, stride_bt, s, i, tok, kvh, stride_vpage, stride_vpos, stride_vh, d,
                                         TILE_T, PAGE_SIZE)
                    v = tl.load(v_ptr + off, mask=tok[:, None] & d_ok[None, :], other=0.0)
                    zs = tl.where(sel, z, float("-inf"))
                    m_new = tl.maximum(m_i, tl.max(zs, 1))
                    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                    alpha = tl.exp2(m_i - m_safe)
                    p = tl.exp2(zs - m_safe[:, None])
                    l_i = l_i * alpha + tl.sum(p, 1)
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                    m_i = m_new
            out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
            lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
            live = g_ok & (tl.arange(0, GROUP_PAD) * 0 + split < used)
            tl.store(po_ptr + s * stride_pos + heads[:, None] * stride_poh + split * stride_pok + d[None, :], out,
                     mask=live[:, None] & d_ok[None, :])
            tl.store(plse_ptr + (s * num_heads + heads) * num_splits + split, lse, mask=live)
            tl.debug_barrier()
            c = tl.atomic_add(sync_ptr + s * num_kv_heads + kvh, 1, sem="acq_rel")
            if c == num_splits - 1:
                tl.atomic_xchg(sync_ptr + s * num_kv_heads + kvh, 0)
                _merge_group(po_ptr, plse_ptr, o_ptr, lse_ptr, s, kvh, num_heads, group, num_splits, used,
                             stride_pos, stride_poh, stride_pok, stride_os, stride_oh,
                             HEAD_DIM, BLOCK_D, MERGE_G, MERGE_SPLITS_T)


def token_decode(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_table: torch.Tensor,
                 seq_lens: torch.Tensor, keep: torch.Tensor, scale: float, out: torch.Tensor,
                 scratch: TokenScratch | None = None, counts: torch.Tensor | None = None,
                 impl: str = "auto", stages: int = 3) -> torch.Tensor:
    """Decode attention of one new token per row (at position seq_lens[s] - 1) over each query head's own
    ``keep[s]`` highest-scoring keys (kept_keys' rule: ties with the keep-th within the threshold's bucket kept too;
    every key when keep[s] >= seq_lens[s]); rows with keep[s] <= 0 are not written.

    q [S, Hq, D]; key_cache, value_cache [num_pages, page_size, Hkv, D] (any strides, contiguous head dim);
    block_table [S, max_pages] int32; seq_lens [S] int32; keep [S] int32 (on the device: a CUDA graph replays it);
    out [S, Hq, D] (written in place, returned). scratch: a TokenScratch whose logits hold the longest context (on a
    GPU not checked: the engine sizes it for max_model_len; fixed addresses for CUDA graphs; made here when None,
    from one host read of seq_lens); rows beyond its row
    count run in further groups of launches. counts [S, Hq] int32: filled with the keys each head kept. stages: the
    launches run, for profiling (1: the logits, 2: and the threshold; 3: all, the only value that writes out)."""
    hq, hkv, d = _check(q, key_cache, value_cache, block_table, seq_lens, keep, out)
    check(stages in (1, 2, 3), f"stages={stages!r} must be 1, 2 or 3")
    ns = q.shape[0]
    if resolve_impl(impl, q, key_cache) == "torch":
        return token_decode_torch(q, key_cache, value_cache, block_table, seq_lens, keep, scale, out, counts)
    if ns == 0:
        return out
    if scratch is None:
        max_len = int(seq_lens[:ns].max())
        scratch = token_scratch(scratch_rows(hq, max_len, ns), hq, hkv, d, max_len, q.device)
    check(scratch.logits.shape[1] == hq and scratch.part_o.numel() == scratch.part_lse.numel() * d
          and scratch.sync.numel() >= scratch.rows * hkv
          and tuple(scratch.chist.shape[1:]) == (-(-scratch.logits.shape[-1] // CHUNK), hq, 256),
          "token decode scratch does not match (heads, head dim, KV heads)")
    npad = scratch.logits.shape[-1]
    if q.device.type == "cpu":  # (on a GPU this would be a host sync, and a CUDA graph cannot hold one)
        check(int(seq_lens[:ns].max()) <= npad, f"a row of {int(seq_lens[:ns].max())} tokens does not fit the "
                                                f"scratch's logits ({npad} tokens)")
    n_chunks = triton.cdiv(npad, CHUNK)
    block_d = max(16, next_pow2(d))
    gpad = max(16, next_pow2(hq // hkv))
    page = key_cache.shape[1]
    lg, chist, thr, cnt, _, _, lse, sync = scratch
    for r0 in range(0, ns, scratch.rows):
        r = min(scratch.rows, ns - r0)
        splits = num_splits(r, hkv, npad)
        po, plse = scratch.partials(r, splits)
        qs, bt, sl, kp, os_ = q[r0:r0 + r], block_table[r0:r0 + r], seq_lens[r0:r0 + r], keep[r0:r0 + r], out[r0:r0 + r]
        _logits_kernel[(r * hkv * n_chunks,)](
            qs, key_cache, bt, sl, kp, lg, chist, scale * LOG2E, hq, hkv, n_chunks,
            qs.stride(0), qs.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), bt.stride(0),
            lg.stride(0), lg.stride(1),
            HEAD_DIM=d, BLOCK_D=block_d, GROUP_PAD=gpad, GROUP_P2=next_pow2(hq // hkv), CHUNK_T=CHUNK, TILE_T=TILE,
            PAGE_SIZE=page, num_warps=4)
        if stages == 1:
            continue
        _threshold_kernel[(r * hq,)](
            lg, chist, sl, kp, thr, cnt, hq, n_chunks, lg.stride(0), lg.stride(1), thr.stride(0),
            CHUNK_T=CHUNK, LO=LO_BITS, RTILE=RADIX_TILE, TAKE=TAKE_ALL, num_warps=8)
        if stages == 2:
            continue
        _attend_kernel[(r * hkv * splits,)](
            lg, value_cache, bt, sl, kp, thr, po, plse, os_, lse, sync, hq, hkv, splits, MIN_TILES_PER_SPLIT,
            lg.stride(0), lg.stride(1), thr.stride(0), value_cache.stride(0), value_cache.stride(1),
            value_cache.stride(2), bt.stride(0), po.stride(0), po.stride(1), po.stride(2), os_.stride(0),
            os_.stride(1),
            HEAD_DIM=d, BLOCK_D=block_d, GROUP_PAD=gpad, TILE_T=TILE, PAGE_SIZE=page, SHIFT_T=SHIFT,
            MERGE_G=next_pow2(hq // hkv), MERGE_SPLITS_T=merge_tile(MERGE_SPLITS, hq // hkv, splits), num_warps=4)
        if counts is not None:
            live = kp > 0
            counts[r0:r0 + r] = torch.where(live[:, None], cnt[:r], counts[r0:r0 + r])
    return out
