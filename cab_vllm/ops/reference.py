"""Pure-PyTorch twins of every CAB kernel: the oracle the Triton kernels are tested against, and the PyTorch
implementation the public ops run with impl="torch" (on a CPU, or where Triton is missing): written for clarity,
not speed. The CPU backend's prefill attention has its own tiled implementation (backend/attention.py).

Shapes: B batch, Hq query heads, Hkv key/value heads (G = Hq // Hkv query heads share one KV head),
N tokens, D head dim, bs block size, M = ceil(N / bs) blocks, K selected key blocks per query block.
Every function here is written for clarity, computes in float32 (or the input's wider dtype) and returns
float32 unless stated.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cab_vllm.config import SUMMARY_ESTIMATORS
from cab_vllm.ops.blocks import (block_lengths, causal_block_mask, gather_paged, num_blocks,  # noqa: F401
                                 selection_to_block_mask)

NEG_INF = float("-inf")


def _blocked(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, H, N, D] -> zero-padded [B, H, M, bs, D] and the validity mask [M, bs]."""
    b, h, n, d = x.shape
    m = num_blocks(n, block_size)
    pad = m * block_size - n
    xb = F.pad(x, (0, 0, 0, pad)).view(b, h, m, block_size, d)
    valid = (torch.arange(m * block_size, device=x.device) < n).view(m, block_size)
    return xb, valid


# ----------------------------------------------------------------------------------------------------
# coarsen: per-block pooling of Q or K
# ----------------------------------------------------------------------------------------------------
def coarsen_ref(x: torch.Tensor, block_size: int, method: str) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Pool each block of ``bs`` tokens of x [B, H, N, D] into one vector per block.

    method="max_l2": the token of largest L2 norm (first on ties) -> [B, H, M, D] in x.dtype.
    method="mean":   mean of the block's valid tokens             -> [B, H, M, D] float32.
    method="bounds": elementwise (min, max) over valid tokens     -> two [B, H, M, D] in x.dtype.
    A partial last block pools only its valid tokens.
    """
    xb, valid = _blocked(x, block_size)
    if method == "max_l2":
        norms = xb.float().pow(2).sum(-1).masked_fill(~valid, -1.0)
        idx = norms.argmax(-1)  # first maximum
        return torch.gather(xb, 3, idx[..., None, None].expand(*idx.shape, 1, xb.shape[-1])).squeeze(3)
    if method == "mean":
        cnt = valid.sum(-1).clamp(min=1).to(torch.float32)
        return (xb.float() * valid[..., None]).sum(3) / cnt[:, None]
    if method == "bounds":
        lo = xb.masked_fill(~valid[..., None], float("inf")).amin(3)
        hi = xb.masked_fill(~valid[..., None], float("-inf")).amax(3)
        return lo, hi
    raise ValueError(f"unknown coarsen method {method!r}: expected max_l2, mean or bounds")


def topr_ref(x: torch.Tensor, block_size: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The r tokens of largest L2 norm per block: reps [B, H, M, r, D] and their validity [B, H, M, r]."""
    xb, valid = _blocked(x, block_size)
    norms = xb.float().pow(2).sum(-1).masked_fill(~valid, -1.0)
    top = norms.topk(r, dim=-1)
    reps = torch.gather(xb, 3, top.indices[..., None].expand(*top.indices.shape, xb.shape[-1]))
    return reps, top.values >= 0


# ----------------------------------------------------------------------------------------------------
# estimators: row-stochastic estimated block attention A [B, Hq, M, M] (causal, zero above diagonal), or its
# rows q_block_offset .. M-1 from the queries of those blocks only
# ----------------------------------------------------------------------------------------------------
def _gqa_expand(k: torch.Tensor, hq: int) -> torch.Tensor:
    hkv = k.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    return k.repeat_interleave(hq // hkv, dim=1)


def logits_to_block_attention(logits: torch.Tensor, n: int, block_size: int, q_block_offset: int = 0) -> torch.Tensor:
    """Causal row softmax of block logits [.., Mq, Mk], weighting each key block by its token count.

    n: key tokens (Mk = ceil(n / bs) key blocks); row r is query block q_block_offset + r, so it sees key
    blocks j <= q_block_offset + r (q_block_offset = 0 with Mq = Mk: the full square)."""
    mq, mk = logits.shape[-2], logits.shape[-1]
    if mk != num_blocks(n, block_size) or q_block_offset + mq > mk:
        raise ValueError(f"logits [.., {mq}, {mk}] at query block {q_block_offset} do not fit {n} key tokens "
                         f"in blocks of {block_size}")
    lens = block_lengths(n, block_size, logits.device).to(torch.float32)
    z = logits.float() + lens.log()
    z = z.masked_fill(~causal_block_mask(mk, logits.device, q_block_offset, mq), NEG_INF)
    return torch.softmax(z, dim=-1)


def block_logits_ref(q: torch.Tensor, k: torch.Tensor, block_size: int, estimator: str, num_reps: int = 4) -> torch.Tensor:
    """Estimated logit of every (query block, key block) pair, [B, Hq, Mq, Mk] float32 (1/sqrt(D) scaled), for
    q [B, Hq, Nq, D] and k [B, Hkv, Nk, D] pooled separately (Mq = ceil(Nq / bs), Mk = ceil(Nk / bs)).

    max_l2 / mean: one representative per block, q_c . k_c.
    topr:          max over the r x r representative pairs.
    bounds:        Quest-style upper bound: mean query of the block against per-dim key min/max.
    """
    hq, d = q.shape[1], q.shape[-1]
    scale = 1.0 / math.sqrt(d)
    if estimator in SUMMARY_ESTIMATORS:
        return logits_from_summary_ref(q, key_summary_ref(k, block_size, estimator), block_size, estimator)
    if estimator == "topr":
        qr, qv = topr_ref(q, block_size, num_reps)
        kr, kv = topr_ref(k, block_size, num_reps)
        kr, kv = _gqa_expand(kr, hq), _gqa_expand(kv, hq)
        s = torch.einsum("bhird,bhjsd->bhijrs", qr.float(), kr.float()) * scale
        ok = qv[:, :, :, None, :, None] & kv[:, :, None, :, None, :]
        return s.masked_fill(~ok, NEG_INF).amax(dim=(-1, -2))
    raise ValueError(f"estimator {estimator!r} has no logits; expected max_l2, mean, topr or bounds")


def key_summary_ref(k: torch.Tensor, block_size: int, estimator: str) -> torch.Tensor:
    """What an estimator keeps of each key block, [B, Hkv, Mk, W]: max_l2 the block's token of largest L2 norm
    (W = D, k.dtype), mean its mean (W = D, float32), bounds its elementwise max then min (W = 2D, k.dtype).
    Blocks are pooled independently, so the summaries of a prefix's full blocks never change as keys are
    appended: the engine keeps them across a prompt's chunks."""
    if estimator == "bounds":
        lo, hi = coarsen_ref(k, block_size, "bounds")
        return torch.cat([hi, lo], -1)
    if estimator in ("max_l2", "mean"):
        return coarsen_ref(k, block_size, estimator)
    raise ValueError(f"estimator {estimator!r} has no key summary; expected one of {SUMMARY_ESTIMATORS}")


def logits_from_summary_ref(q: torch.Tensor, ks: torch.Tensor, block_size: int, estimator: str) -> torch.Tensor:
    """block_logits_ref from the keys' summaries ks [B, Hkv, Mk, W] (key_summary_ref): [B, Hq, Mq, Mk] float32."""
    hq, d = q.shape[1], q.shape[-1]
    scale = 1.0 / math.sqrt(d)
    if estimator == "bounds":
        qm = coarsen_ref(q, block_size, "mean")
        hi, lo = _gqa_expand(ks[..., :d].float(), hq), _gqa_expand(ks[..., d:].float(), hq)
        s = torch.maximum(qm[:, :, :, None, :] * lo[:, :, None], qm[:, :, :, None, :] * hi[:, :, None])
        return s.sum(-1) * scale
    if estimator in ("max_l2", "mean"):
        qc = coarsen_ref(q, block_size, estimator).float()
        return qc @ _gqa_expand(ks.float(), hq).transpose(-1, -2) * scale
    raise ValueError(f"estimator {estimator!r} has no key summary; expected one of {SUMMARY_ESTIMATORS}")


def sampled_block_attention_ref(
    q: torch.Tensor, k: torch.Tensor, block_size: int, rows: int, q_blocks: torch.Tensor | None = None,
    q_offset: int = 0,
) -> torch.Tensor:
    """Exact block attention mass of the last ``rows`` valid query tokens of each query block.

    k [B, Hkv, N, D]; q [B, Hq, N - q_offset, D] holds the queries at token positions q_offset .. N-1 (query
    positions before q_offset count as zero queries: a chunk's cached prefix). For query block m, rows t in
    [end - rows, end), end = min((m+1) bs, N), clipped to the block: each row's causal softmax over all keys
    is summed per key block and averaged over the rows. Returns A [B, Hq, Mq, M] float32 for the absolute
    query blocks ``q_blocks`` (default: q_offset // bs .. M-1, the blocks q reaches), row-stochastic.
    """
    b, hq, nq, d = q.shape
    n = k.shape[2]
    if q_offset < 0 or q_offset + nq != n:
        raise ValueError(f"q ({nq} rows at position {q_offset}) must end with the keys ({n})")
    m = num_blocks(n, block_size)
    if q_blocks is None:
        q_blocks = torch.arange(q_offset // block_size, m, device=q.device)
    kx = _gqa_expand(k, hq).float()
    pos = torch.arange(n, device=q.device)
    out = torch.zeros(b, hq, len(q_blocks), m, device=q.device)
    for i, mb in enumerate(q_blocks.tolist()):
        start, end = mb * block_size, min((mb + 1) * block_size, n)
        r0 = max(start, end - rows)
        qs = q.new_zeros(b, hq, end - r0, d, dtype=torch.float32)
        lo = max(r0, q_offset)
        if lo < end:
            qs[:, :, lo - r0:] = q[:, :, lo - q_offset:end - q_offset].float()
        s = qs @ kx.transpose(-1, -2) / math.sqrt(d)
        s = s.masked_fill(pos[None, :] > pos[r0:end, None], NEG_INF)
        p = torch.softmax(s, dim=-1)
        p = F.pad(p, (0, m * block_size - n)).view(b, hq, end - r0, m, block_size).sum(-1)
        out[:, :, i] = p.mean(2)
    return out


# ----------------------------------------------------------------------------------------------------
# curvature on the block graph
# ----------------------------------------------------------------------------------------------------
def curvature_ref(a: torch.Tensor) -> torch.Tensor:
    """Forman-style curvature F = 4A - D_i - D_j + 3 A.A of a causal block graph a [.., M, M].

    D_i is the out-degree (row sum) of query block i, D_j the in-degree (column sum) of key block j;
    T = A.A counts weighted two-hop paths i -> k -> j (k between j and i for a causal A).
    Returns float32 [.., M, M]; entries above the diagonal are +inf (never selected as most negative).
    """
    a = a.float()
    m = a.shape[-1]
    t = a @ a
    f = 4 * a - a.sum(-1, keepdim=True) - a.sum(-2, keepdim=True) + 3 * t
    return f.masked_fill(~causal_block_mask(m, a.device), float("inf"))


# ----------------------------------------------------------------------------------------------------
# sparse attention (dense layout)
# ----------------------------------------------------------------------------------------------------
def sparse_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    counts: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    q_offset: int = 0,
    chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention restricted to the selected key blocks.

    q [B, Hq, Nq, D] holds the queries at absolute positions q_offset .. q_offset+Nq-1; k, v [B, Hkv, Nk, D]
    with Nk = q_offset + Nq. indices [B, Hs, Mq_abs, K] / counts [B, Hs, Mq_abs] index absolute query blocks
    (Hs = Hkv, or Hq for per-query-head selections). Returns (out [B, Hq, Nq, D] in q.dtype, lse [B, Hq, Nq]
    float32 natural-log sum-exp of the scaled scores; -inf and a zero output for a row with no key).
    """
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    if nk != q_offset + nq:
        raise ValueError(f"keys ({nk}) must cover the prefix ({q_offset}) plus the queries ({nq})")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    mk = num_blocks(nk, block_size)
    bm = selection_to_block_mask(indices, counts, mk)
    if bm.shape[1] == hkv:
        bm = bm.repeat_interleave(hq // hkv, dim=1)
    kx, vx = _gqa_expand(k, hq).float(), _gqa_expand(v, hq).float()
    kpos = torch.arange(nk, device=q.device)
    out = torch.empty(b, hq, nq, d, device=q.device, dtype=torch.float32)
    lse = torch.empty(b, hq, nq, device=q.device, dtype=torch.float32)
    for c0 in range(0, nq, chunk):
        c1 = min(nq, c0 + chunk)
        qpos = torch.arange(c0, c1, device=q.device) + q_offset
        s = q[:, :, c0:c1].float() @ kx.transpose(-1, -2) * scale
        allowed = bm[:, :, qpos // block_size][..., kpos // block_size] & (kpos[None, :] <= qpos[:, None])
        s = s.masked_fill(~allowed, NEG_INF)
        row_lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - row_lse.nan_to_num(neginf=0.0)[..., None]).masked_fill(~allowed, 0.0)
        out[:, :, c0:c1] = p @ vx
        lse[:, :, c0:c1] = row_lse
    return out.to(q.dtype), lse


def dense_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Causal dense attention in float64 (the oracle of the oracles), GQA-aware; returns float64."""
    hq, n, d = q.shape[1], q.shape[2], q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    kx, vx = _gqa_expand(k, hq).double(), _gqa_expand(v, hq).double()
    s = q.double() @ kx.transpose(-1, -2) * scale
    nk = k.shape[2]
    qpos = torch.arange(n, device=q.device) + (nk - n)
    s = s.masked_fill(torch.arange(nk, device=q.device)[None, :] > qpos[:, None], NEG_INF)
    return torch.softmax(s, dim=-1) @ vx


# ----------------------------------------------------------------------------------------------------
# paged KV cache (vLLM layout: key_cache/value_cache [num_pages, page_size, Hkv, D], any strides)
# ----------------------------------------------------------------------------------------------------
def paged_prefill_ref(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    tile_seq: torch.Tensor,
    tile_qblock: torch.Tensor,
    tile_indices: torch.Tensor,
    tile_counts: torch.Tensor,
    block_size: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Twin of ops.prefill.paged_sparse_prefill: varlen block-sparse causal attention over a paged cache.

    q [T, Hq, D] packs the new tokens of each sequence (query_start_loc [S+1]); sequence s has seq_lens[s]
    tokens in the cache, its last q_len_s of them are the queries. A tile t covers absolute query block
    tile_qblock[t] of sequence tile_seq[t] with its selected key blocks tile_indices[t] [Hkv, K] and
    tile_counts[t] [Hkv]. Rows not covered by any tile are left zero. Returns [T, Hq, D] in q.dtype.
    """
    tq, hq, d = q.shape
    out = torch.zeros(tq, hq, d, dtype=q.dtype, device=q.device)
    qsl, sl = query_start_loc.tolist(), seq_lens.tolist()
    for t in range(tile_seq.shape[0]):
        s, mb = int(tile_seq[t]), int(tile_qblock[t])
        seq_len, q_len = sl[s], qsl[s + 1] - qsl[s]
        ctx = seq_len - q_len
        r0, r1 = max(mb * block_size, ctx), min((mb + 1) * block_size, seq_len)
        if r1 <= r0:
            continue
        kx = gather_paged(key_cache, block_table[s], r1)[None]
        vx = gather_paged(value_cache, block_table[s], r1)[None]
        qx = q[qsl[s] + r0 - ctx : qsl[s] + r1 - ctx].transpose(0, 1)[None]
        idx = torch.zeros(1, tile_indices.shape[1], mb + 1, tile_indices.shape[2], dtype=torch.int32, device=q.device)
        cnt = torch.zeros(1, tile_indices.shape[1], mb + 1, dtype=torch.int32, device=q.device)
        idx[0, :, mb], cnt[0, :, mb] = tile_indices[t], tile_counts[t]
        o, _ = sparse_attention_ref(qx, kx, vx, idx, cnt, block_size, scale, q_offset=r0)
        out[qsl[s] + r0 - ctx : qsl[s] + r1 - ctx] = o[0].transpose(0, 1)
    return out


def paged_decode_ref(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    indices: torch.Tensor,
    counts: torch.Tensor,
    block_size: int,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of ops.decode.paged_sparse_decode: one query token per sequence at position seq_lens[s]-1.

    q [S, Hq, D]; indices [S, Hkv, K] / counts [S, Hkv] select key blocks of the sequence. Returns
    (out [S, Hq, D] in q.dtype, lse [S, Hq] float32).
    """
    s_, hq, d = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(s_, hq, dtype=torch.float32, device=q.device)
    for s in range(s_):
        n = int(seq_lens[s])
        mb = (n - 1) // block_size
        kx = gather_paged(key_cache, block_table[s], n)[None]
        vx = gather_paged(value_cache, block_table[s], n)[None]
        idx = torch.zeros(1, indices.shape[1], mb + 1, indices.shape[2], dtype=torch.int32, device=q.device)
        cnt = torch.zeros(1, indices.shape[1], mb + 1, dtype=torch.int32, device=q.device)
        idx[0, :, mb], cnt[0, :, mb] = indices[s], counts[s]
        o, l = sparse_attention_ref(q[s][None, :, None], kx, vx, idx, cnt, block_size, scale, q_offset=n - 1)
        out[s], lse[s] = o[0, :, 0], l[0, :, 0]
    return out, lse
