"""What the token-level oracle would cost a tiled kernel: the key blocks its choices touch.

The adapter's ``oracle=token`` ablation lets every query token keep its own highest-scoring keys, as many as the
blocks its policy kept hold (cab_vllm.hf.token_oracle_scores). A block-sparse kernel computes whole (query tile x
key block) tiles: to run the oracle's choices it must compute every tile in which some query of the tile (and of
the KV head's group, which shares the KV head's tiles) keeps some key. ``union_density`` counts those tiles over
the causal ones; ``run`` does it for every layer of one real prompt (its post-RoPE queries and keys from a dense
prefill) at each sparsity and query-tile size.
"""

from __future__ import annotations

import math

import torch


def union_density(q: torch.Tensor, k: torch.Tensor, keep: torch.Tensor, scale: float, tiles, block_size: int,
                  rows: int = 256, per_head: bool = False) -> list[float]:
    """For each query tile size in ``tiles``: the fraction of the causal (query tile of that many rows, key block of
    ``block_size``) pairs, per KV head, in which some query row of the tile, of some head of the group, keeps a key
    (cab_vllm.hf.token_oracle_scores with ``keep``, scored once for every tile size); per_head: per query head
    instead (a kernel whose heads of a group choose their own blocks). q [B, Hq, N, D], k [B, Hkv, N, D] (a prefill:
    queries and keys of the same N positions)."""
    from cab_vllm import hf

    b, n = q.shape[0], q.shape[2]
    if k.shape[2] != n:
        raise ValueError(f"a prefill is expected: {n} queries, {k.shape[2]} keys")
    for tile in tiles:
        if tile < 1 or rows % tile:
            raise ValueError(f"tile={tile} must be >= 1 and divide rows={rows}")
    m = math.ceil(n / block_size)
    touched, causal = [0] * len(tiles), [0] * len(tiles)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        kept = torch.isfinite(hf.token_oracle_scores(q, k, keep, scale, r0, r1))  # [B, Hkv, G, R, N]
        kept = kept.flatten(1, 2) if per_head else kept.any(2)  # [B, H, R, N]
        h = kept.shape[1]
        kept = torch.nn.functional.pad(kept, (0, m * block_size - n))
        blocks = kept.view(b, h, r1 - r0, m, block_size).any(-1)  # [B, H, R, M]
        for i, tile in enumerate(tiles):
            t = math.ceil((r1 - r0) / tile)
            padded = torch.nn.functional.pad(blocks, (0, 0, 0, t * tile - (r1 - r0)))
            touched[i] += int(padded.view(b, h, t, tile, m).any(3).sum())
            last = torch.clamp(torch.arange(r0, r1, tile) + tile - 1, max=r1 - 1) // block_size  # each tile's last
            causal[i] += b * h * int((last + 1).sum())
    return [x / c for x, c in zip(touched, causal)]


def _captures(model_name: str, lengths, task: str, depth: float, device: str, dtype: torch.dtype):
    """(length, layer, q [1, Hq, N, D], k [1, Hkv, N, D]) of one ``task`` prompt per length through the dense model
    (post-RoPE, every layer)."""
    from cab_experiments.common import load_model
    from cab_experiments.tasks import build_items
    from cab_vllm import hf

    model, tok, _ = load_model(model_name, device, dtype)
    for n in lengths:
        item = build_items(tok, task, n, [depth], 1)[0]
        ids = torch.tensor([item["input_ids"]], device=device)
        with torch.no_grad(), hf.capture() as caps:
            model(ids)
        for layer, q, k in caps:
            yield n, layer, q, k


def run(model_name: str, lengths, sparsities, tiles, task: str = "multikey", depth: float = 0.5,
        device: str = "cpu", dtype: torch.dtype = torch.float32, block_size: int = 64,
        per_head: bool = False) -> list[dict]:
    """One ``task`` prompt per length through the dense model; for every layer, sparsity and query tile: the
    block selection's density (cab), the oracle's kept keys over the causal ones, and union_density (per KV head,
    or per query head with per_head)."""
    from cab_vllm import hf
    from cab_vllm.api import select_blocks
    from cab_vllm.config import CABConfig

    out = []
    for n, layer, q, k in _captures(model_name, lengths, task, depth, device, dtype):
        scale = 1.0 / math.sqrt(q.shape[-1])
        nt = q.shape[2]
        for sp in sparsities:
            sel = select_blocks(q, k, CABConfig(policy="cab", sparsity=sp, block_size=block_size))
            keep = hf.kept_tokens(sel)
            row = dict(model=model_name, length=n, n_tokens=nt, task=task, depth=depth, layer=layer, sparsity=sp,
                       block_size=block_size, per_head=per_head, block_density=round(sel.density(), 5),
                       token_density=round(float(keep.double().sum() / (keep.shape[0] * keep.shape[1]
                                                                        * nt * (nt + 1) / 2)), 5))
            dens = union_density(q, k, keep, scale, tiles, block_size, per_head=per_head)
            out += [{**row, "tile": t, "union_density": round(u, 5)} for t, u in zip(tiles, dens)]
    return out


def _step_shapes(q: torch.Tensor, k: torch.Tensor, keep: int) -> tuple[int, int, int, int]:
    """(Hq, Hkv, D, N) of one decode step's queries q [Hq, D] and keys k [Hkv, N, D]; ValueError unless they match
    and 1 <= keep <= N."""
    hq, d = q.shape
    hkv, n, _ = k.shape
    if hq % hkv or k.shape[2] != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} do not match (heads, head dim)")
    if not 1 <= keep <= n:
        raise ValueError(f"keep={keep} must be in [1, {n}]")
    return hq, hkv, d, n


def bound_prunable(q: torch.Tensor, k: torch.Tensor, keep: int, block_size: int = 64) -> dict:
    """Could an exact token-sparse decode skip key blocks by their box bounds? q [Hq, D] one decode step's queries,
    k [Hkv, N, D] its keys; each query head keeps its ``keep`` highest-scoring keys. A block whose bound
    sum_d max(q_d lo_d, q_d hi_d) (lo, hi: the block's per-dimension key minima and maxima) lies below the head's
    keep-th score holds none of them, so skipping it changes nothing. Returns the fraction of (query head, block)
    pairs so bounded with the exact keep-th score (head), of (KV head, block) pairs where every head of the group's
    is (group: a kernel reads K per KV head), and the same with the threshold a kernel could know before reading
    every key: the keep-th score among the blocks of the 2 keep / block_size highest bounds, a lower bound of the
    exact one (group_kernel)."""
    hq, hkv, d, n = _step_shapes(q, k, keep)
    g, m = hq // hkv, math.ceil(n / block_size)
    q, k = q.double(), k.double()
    pad = m * block_size - n
    kf = torch.nn.functional.pad(k, (0, 0, 0, pad)).view(hkv, m, block_size, d)
    valid = (torch.arange(m * block_size) < n).view(1, m, block_size, 1)
    lo = torch.where(valid, kf, float("inf")).amin(2).repeat_interleave(g, 0)  # [Hq, M, D]
    hi = torch.where(valid, kf, float("-inf")).amax(2).repeat_interleave(g, 0)
    bound = torch.maximum(q[:, None] * lo, q[:, None] * hi).sum(-1)  # [Hq, M]
    z = torch.einsum("hd,hnd->hn", q, k.repeat_interleave(g, 0))  # [Hq, N]
    tau = z.topk(keep, -1).values[:, -1:]
    zb = torch.nn.functional.pad(z, (0, pad), value=float("-inf")).view(hq, m, block_size)
    top = bound.topk(min(m, math.ceil(2 * keep / block_size)), -1).indices
    seen = zb.gather(1, top[..., None].expand(-1, -1, block_size)).flatten(1)
    tau_kernel = seen.topk(min(keep, seen.shape[1]), -1).values[:, -1:]
    head = bound < tau
    return dict(head=float(head.double().mean()), group=float(head.view(hkv, g, m).all(1).double().mean()),
                group_kernel=float((bound < tau_kernel).view(hkv, g, m).all(1).double().mean()))


def run_bounds(model_name: str, lengths, sparsities, task: str = "multikey", depth: float = 0.5,
               device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[dict]:
    """One ``task`` prompt per length through the dense model; for every layer and sparsity, bound_prunable of the
    prompt's last query token over its keys, each head keeping CABConfig.decode_tokens keys (the engine's token
    decode budget)."""
    from cab_vllm.config import CABConfig

    out = []
    for n, layer, q, k in _captures(model_name, lengths, task, depth, device, dtype):
        nt = k.shape[2]
        for sp in sparsities:
            cfg = CABConfig(policy="cab", sparsity=sp)
            keep = cfg.decode_tokens(nt)
            r = bound_prunable(q[0, :, -1], k[0], keep, cfg.block_size)
            out.append(dict(model=model_name, length=n, n_tokens=nt, task=task, depth=depth, layer=layer,
                            sparsity=sp, block_size=cfg.block_size, keep=keep,
                            **{f"prunable_{key}": round(v, 5) for key, v in r.items()}))
    return out


def _top(z: torch.Tensor, m: int) -> torch.Tensor:
    """Each row's m highest entries of z, as a mask."""
    return torch.zeros_like(z, dtype=torch.bool).scatter_(-1, z.topk(m, -1).indices, True)


def _recall_mass(z: torch.Tensor, cand: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of exact scores z [H, N] with candidates cand [H, N] (mask): the fraction of the keep best keys among
    the candidates (recall), and the softmax mass of the keep best candidates over that of the keep best (mass)."""
    best = _top(z, keep)
    kept = _top(z.masked_fill(~cand, float("-inf")), keep)
    p = torch.softmax(z, -1)
    return (best & cand).sum(-1).double() / keep, (p * kept).sum(-1) / (p * best).sum(-1)


RERANK_QUANTS = ("channel", "token", "fp8", "fp8qk", "fp8c")


def fp8_round(x: torch.Tensor) -> torch.Tensor:
    """x rounded to float8 e4m3 with one scale per row of its last dimension (the row's largest magnitude at e4m3's
    448), back in x's dtype: what a float8 copy of the keys (or queries) would hold."""
    s = x.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 448.0
    return ((x / s).to(torch.float8_e4m3fn).to(x.dtype)) * s


def fp8_round_centered(k: torch.Tensor, group: int = 16) -> torch.Tensor:
    """k [..., N, D] as a centered float8 copy would hold it: each channel's mid-range over groups of ``group``
    consecutive tokens (a cache page; the last group may be short) kept in float16 and subtracted, the rest rounded
    by fp8_round (a scale per token). Post-RoPE keys carry channels of large, nearly constant value: rounded
    uncentered, their relative error swamps the differences between tokens."""
    *lead, n, d = k.shape
    pad = (-n) % group
    kp = torch.cat([k, k[..., -1:, :].expand(*lead, pad, d)], -2) if pad else k
    g = kp.reshape(*lead, -1, group, d)
    mid = ((g.amax(-2, keepdim=True) + g.amin(-2, keepdim=True)) / 2).half().to(k.dtype)
    out = fp8_round((g - mid).reshape(*lead, -1, d)).reshape(g.shape) + mid
    return out.reshape(*lead, -1, d)[..., :n, :]


def rerank_recall(q: torch.Tensor, k: torch.Tensor, keep: int, bits: int, factors, quant: str = "channel",
                  center_group: int = 16) -> dict:
    """Could a decode score a quantized copy of K, then only its candidates exactly? q [Hq, D] one step's queries,
    k [Hkv, N, D] its keys; each query head keeps its ``keep`` highest-scoring keys. For each factor F: candidates are
    the F x keep best by the keys rounded to ``bits`` bits (quant "token": hf.quantize_keys, a scale per token and 32
    dimensions; "channel": hf.quantize_keys_channel, each channel's range per 16-token page) or to float8 e4m3 with a
    scale per token (fp8_round; "fp8qk": the queries too, as a float8 x float8 tensor-core dot would take them;
    "fp8c": centered per channel over groups of center_group tokens first, fp8_round_centered; bits unused); kept,
    the keep best of them by exact score. Returns, averaged over query heads, the fraction of the exact best keep in
    the candidates (recall_F) and the softmax mass of the kept keys over that of the exact best keep (mass_F), and
    each one's smallest over the heads (recall_min_F, mass_min_F)."""
    from cab_vllm.hf import quantize_keys, quantize_keys_channel

    if quant not in RERANK_QUANTS:
        raise ValueError(f"quant={quant!r} must be one of {', '.join(RERANK_QUANTS)}")
    hq, hkv, d, n = _step_shapes(q, k, keep)
    g = hq // hkv
    q = q.double()
    z = torch.einsum("hd,hnd->hn", q, k.double().repeat_interleave(g, 0)) / math.sqrt(d)  # [Hq, N]
    if quant in ("fp8", "fp8qk"):
        kq = fp8_round(k.float())
    elif quant == "fp8c":
        kq = fp8_round_centered(k.float(), center_group)
    else:
        kq = quantize_keys(k, bits) if quant == "token" else quantize_keys_channel(k, bits)
    qe = fp8_round(q.float()).double() if quant == "fp8qk" else q
    zq = torch.einsum("hd,hnd->hn", qe, kq.double().repeat_interleave(g, 0))
    out = {}
    for f in factors:
        recall, mass = _recall_mass(z, _top(zq, min(n, f * keep)), keep)
        out.update({f"recall_{f}": float(recall.mean()), f"mass_{f}": float(mass.mean()),
                    f"recall_min_{f}": float(recall.min()), f"mass_min_{f}": float(mass.min())})
    return out


def run_rerank(model_name: str, lengths, sparsities, bits=(4,), factors=(1, 2, 4, 8), quants=("channel",),
               task: str = "multikey", depth: float = 0.5, device: str = "cpu",
               dtype: torch.dtype = torch.float32, center_groups=(16,)) -> list[dict]:
    """One ``task`` prompt per length through the dense model; for every layer, sparsity, bit width and quantizer,
    rerank_recall of the prompt's last query token over its keys, each head keeping CABConfig.decode_tokens keys."""
    from cab_vllm.config import CABConfig

    out = []
    for n, layer, q, k in _captures(model_name, lengths, task, depth, device, dtype):
        nt = k.shape[2]
        for sp in sparsities:
            keep = CABConfig(policy="cab", sparsity=sp).decode_tokens(nt)
            runs = [(b, qn, None) for b in bits for qn in quants if not qn.startswith("fp8")]
            runs += [(8, qn, None) for qn in quants if qn in ("fp8", "fp8qk")]  # (float8: one row, bits 8)
            runs += [(8, qn, cg) for qn in quants if qn == "fp8c" for cg in center_groups]
            for b, quant, cg in runs:
                r = rerank_recall(q[0, :, -1], k[0], keep, b, factors, quant, cg or 16)
                out.append(dict(model=model_name, length=n, n_tokens=nt, task=task, depth=depth, layer=layer,
                                sparsity=sp, keep=keep, bits=b, quant=quant,
                                **({"center_group": cg} if cg else {}), **{key: round(v, 5) for key, v in r.items()}))
    return out


def reuse_recall(q: torch.Tensor, k: torch.Tensor, p0: int, lags, factors, keep_of) -> dict:
    """Could a decode choose its keys once and keep them for the next steps? q [Hq, N, D], k [Hkv, N, D]: the queries
    and keys of positions 0..N-1 (a prompt of p0 + 1 tokens followed by its generated tokens); each query head at
    position p keeps its keep_of(p + 1) highest-scoring keys of positions 0..p. At step p0 the candidates are each
    head's F x keep_of(p0 + 1) best keys; at p0 + r (r in lags) they are those plus the r keys written since, and the
    keep best of them by exact score are kept. Returns {(r, F): {recall, mass, recall_min, mass_min}}: the fraction of
    step p0 + r's exact best keep among the candidates and the softmax mass of the kept over that of the exact best,
    the mean over heads and the smallest head's."""
    hq, n, d = q.shape
    hkv = k.shape[0]
    if hq % hkv or tuple(k.shape[1:]) != (n, d):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} do not match (heads, positions, head dim)")
    if not 0 <= p0 < n or any(r < 1 or p0 + r >= n for r in lags):
        raise ValueError(f"p0={p0} and lags {list(lags)}: every step p0 + lag must be one of the {n} positions")
    kk = k.double().repeat_interleave(hq // hkv, 0)

    def scores(p):
        return torch.einsum("hd,hnd->hn", q[:, p].double(), kk[:, :p + 1]) / math.sqrt(d)

    z0 = scores(p0)
    cand0 = {f: _top(z0, min(p0 + 1, f * keep_of(p0 + 1))) for f in factors}
    out = {}
    for r in lags:
        z = scores(p0 + r)  # (once per step, for every factor)
        for f in factors:
            cand = torch.cat([cand0[f], torch.ones(hq, r, dtype=torch.bool)], 1)
            recall, mass = _recall_mass(z, cand, keep_of(p0 + r + 1))
            out[(r, f)] = {"recall": float(recall.mean()), "mass": float(mass.mean()),
                           "recall_min": float(recall.min()), "mass_min": float(mass.min())}
    return out


def run_reuse(model_name: str, lengths, sparsities, lags=(1, 2, 4, 8), factors=(2, 4), task: str = "multikey",
              depth: float = 0.5, device: str = "cpu", dtype: torch.dtype = torch.float32,
              new_tokens: int = 16) -> list[dict]:
    """One ``task`` prompt per length: the dense model generates up to new_tokens greedily, then prompt and answer
    run through it once more (a prefill, captured); for every layer and sparsity, reuse_recall of the prompt's last
    query token's selection at each lag the answer reaches, each head keeping CABConfig.decode_tokens keys."""
    from cab_experiments.common import load_model
    from cab_experiments.tasks import build_items
    from cab_vllm import hf
    from cab_vllm.config import CABConfig

    model, tok, _ = load_model(model_name, device, dtype)
    out = []
    for n in lengths:
        item = build_items(tok, task, n, [depth], 1)[0]
        ids = torch.tensor([item["input_ids"]], device=device)
        with torch.no_grad():
            seq = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
            with hf.capture() as caps:
                model(seq)
        p0 = ids.shape[1] - 1
        reach = [r for r in lags if p0 + r < seq.shape[1]]
        for layer, q, k in caps:
            for sp in sparsities:
                cfg = CABConfig(policy="cab", sparsity=sp)
                for (r, f), v in reuse_recall(q[0], k[0], p0, reach, factors, cfg.decode_tokens).items():
                    out.append(dict(model=model_name, length=n, n_tokens=p0 + 1, task=task, depth=depth, layer=layer,
                                    sparsity=sp, lag=r, factor=f, keep=cfg.decode_tokens(p0 + r + 1),
                                    generated=seq.shape[1] - p0 - 1, **{key: round(x, 5) for key, x in v.items()}))
    return out


def passes_mass(q: torch.Tensor, k: torch.Tensor, keep: int) -> dict:
    """What the token decode's one-pass rule keeps against its two-pass rule (ops.token_decode.kept_keys with
    passes 1 and 2), for one query per head: q [Hq, D], k [Hkv, N, D] (post-RoPE), each head keeping keep keys.
    Returns the softmax mass the two-pass rule keeps (mean over heads, smallest), the mass the one-pass rule loses
    against it (mean, largest; negative: it kept more), how far each rule's kept count is from keep at most, and how
    many heads the two-pass rule's tie cap cut; the same loss and count for the sampled threshold (passes 0,
    ops.token_decode.sampled_rule), with its kept count over keep (mean, smallest, largest over heads)."""
    from cab_vllm.ops import token_decode as td

    hq, d = q.shape
    hkv = k.shape[0]
    if hq % hkv or k.shape[2] != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} do not match (heads, head dim)")
    z = torch.einsum("hd,hnd->hn", q.float(), k.float().repeat_interleave(hq // hkv, 0)) * (td.LOG2E / math.sqrt(d))
    p = torch.softmax(z.double() * math.log(2.0), -1)
    two, cut = td._rule(z, keep, passes=2)
    one = td.kept_keys(z, keep, passes=1)
    zero = td.kept_keys(z, keep, passes=0)
    m2, m1, m0 = (p * two).sum(-1), (p * one).sum(-1), (p * zero).sum(-1)
    lost, lost0 = m2 - m1, m2 - m0
    ratio0 = zero.sum(-1).double() / min(keep, z.shape[-1])
    return {"mass_two": float(m2.mean()), "mass_two_min": float(m2.min()), "lost_one": float(lost.mean()),
            "lost_one_max": float(lost.max()), "count_two_dev": int((two.sum(-1) - keep).abs().max()),
            "count_one_dev": int((one.sum(-1) - keep).abs().max()), "tie_cuts": int(cut.sum()),
            "lost_sampled": float(lost0.mean()), "lost_sampled_max": float(lost0.max()),
            "count_sampled_dev": int((zero.sum(-1) - keep).abs().max()), "count_sampled_ratio": float(ratio0.mean()),
            "count_sampled_ratio_min": float(ratio0.min()), "count_sampled_ratio_max": float(ratio0.max())}


def run_passes(model_name: str, lengths, sparsities, task: str = "multikey", depth: float = 0.5, device: str = "cpu",
               dtype: torch.dtype = torch.float32) -> list[dict]:
    """One ``task`` prompt per length through the dense model; for every layer and sparsity, passes_mass of the
    prompt's last query token over its keys, each head keeping CABConfig.decode_tokens keys."""
    from cab_vllm.config import CABConfig

    out = []
    for n, layer, q, k in _captures(model_name, lengths, task, depth, device, dtype):
        nt = k.shape[2]
        for sp in sparsities:
            keep = CABConfig(policy="cab", sparsity=sp).decode_tokens(nt)
            r = passes_mass(q[0, :, -1], k[0], keep)
            out.append(dict(model=model_name, length=n, n_tokens=nt, task=task, depth=depth, layer=layer, sparsity=sp,
                            keep=keep, **{key: round(v, 6) if isinstance(v, float) else v for key, v in r.items()}))
    return out


def prefill_mass(q: torch.Tensor, k: torch.Tensor, sel, scale: float, chunks, sample: int = 128,
                 others: dict | None = None, rank_rows=None, within: dict | None = None, pooled_rows=()) -> dict:
    """What share of prompt rows' exact attention mass each prefill selection keeps, at the same count of keys per
    row (cab's kept blocks' tokens, hf.kept_tokens of ``sel``), for ``sample`` rows spread evenly over the prompt
    past its first two blocks. q [1, Hq, N, D], k [1, Hkv, N, D] (post-RoPE, a prefill); sel: cab's BlockSelection
    of the same q, k. Each query head's softmax over its causal keys; per selection the mean over rows and heads of
    the mass its kept keys hold:
      "blocks": cab's kept 64-token blocks (one set per KV head and query block);
      "vertical@C" for C in ``chunks`` (0: the whole prompt): hf.vertical_kept, the row's VERTICAL_LOCAL most recent
        keys, then the keys the last VERTICAL_ROWS rows of its chunk of C rows attend to most (one ranking per KV
        head), as hf.chunked_vertical_attention keeps them; with "early@C" the same over the rows in the first half
        of their chunk (the farthest from the rows that ranked); for each R in ``rank_rows`` other than
        VERTICAL_ROWS, "vertical@C/R" and "early@C/R" ranked by the chunk's last R rows instead (C = the block size
        with R < C: each query block's keys chosen by a few of its own rows' exact scores); for each name and wider
        selection W of ``within`` (BlockSelection of the same q, k: more blocks per row than sel), "NAME@C/R" ranked
        the same way among the tokens of the row's query block's blocks in W first (the keys a kernel would score:
        only W's), the others after them; for each R in ``pooled_rows``, "pooled@C/R": ranked by the mean query of
        the chunk's last R rows (one row per head, hf.vertical_rank with pooled);
      "oracle": each row's and head's own highest-probability keys;
      and for each name: selection of ``others`` (selections with sel's counts), its kept blocks as for "blocks"."""
    from cab_vllm import hf
    from cab_vllm.ops.blocks import selection_to_block_mask

    b, hq, n, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    if b != 1 or k.shape[2] != n or hq % hkv:
        raise ValueError(f"one prefill expected: q {tuple(q.shape)}, k {tuple(k.shape)}")
    bs = sel.block_size
    first = min(2 * bs, n - 1)
    sample = max(1, min(sample, n - first))
    pos = torch.linspace(first, n - 1, sample, device=q.device).round().long().unique()
    keep = hf.kept_tokens(sel)[:, :, pos]  # [1, Hkv, R]
    z = scale * torch.einsum("hrd,hnd->hrn", q[0, :, pos].float(), k[0].float().repeat_interleave(g, 0))
    j = torch.arange(n, device=q.device)
    causal = j[None, :] <= pos[:, None]
    p = torch.softmax(z.masked_fill(~causal, float("-inf")), -1).view(hkv, g, pos.numel(), n)
    mass = lambda kept: (p * kept[0][:, None]).sum(-1)  # noqa: E731  kept [1, Hkv, R, N] -> [Hkv, G, R]
    m = sel.num_blocks
    qb = pos // bs

    def block_mass(s) -> float:
        if not torch.equal(s.counts, sel.counts):
            raise ValueError("every selection must keep sel's counts")
        blk = selection_to_block_mask(s.indices[0][:, qb], s.counts[0][:, qb], m)  # [Hkv, R, M]
        return float(mass((blk.repeat_interleave(bs, -1)[..., :n] & causal)[None]).mean())

    out = {"blocks": block_mass(sel), **{name: block_mass(s) for name, s in (others or {}).items()}}
    plans = [(c, r, False) for c in chunks for r in (rank_rows or (hf.VERTICAL_ROWS,))]
    plans += [(c, r, True) for c in chunks for r in pooled_rows]
    for c, r, pooled in plans:
        if r < 1:
            raise ValueError(f"rank_rows and pooled_rows must be >= 1, got {r}")
        name = f"@{c}" if r == hf.VERTICAL_ROWS and not pooled else f"@{c}/{r}"
        kind = "pooled" if pooled else "vertical"
        step = n if c == 0 else c
        ends = torch.clamp((pos // step + 1) * step, max=n)
        got = torch.empty(hkv, g, pos.numel(), device=q.device)
        wgot = {wname: torch.empty_like(got) for wname in within or {}}
        early = torch.zeros(pos.numel(), dtype=torch.bool, device=q.device)
        for e in ends.unique().tolist():
            rows = (ends == e).nonzero().flatten()
            rank = hf.vertical_rank(q[:, :, :e], k[:, :, :e], scale, rows=r, pooled=pooled)  # [1, Hkv, e]
            kept = hf.vertical_kept(rank, pos[rows], keep[:, :, rows])  # [1, Hkv, R', e]
            got[:, :, rows] = (p[:, :, rows, :e] * kept[0][:, None]).sum(-1)
            for wname, wide in (within or {}).items():
                kw = _kept_within(rank, pos[rows], keep[:, :, rows], wide, qb[rows], bs)
                wgot[wname][:, :, rows] = (p[:, :, rows, :e] * kw[:, None]).sum(-1)
            start = max(0, e - step) if c else 0
            early[rows] = pos[rows] < start + (e - start) // 2
        out[f"{kind}{name}"] = float(got.mean())
        if c and early.any() and not pooled:
            out[f"early{name}"] = float(got[:, :, early].mean())
        for wname in within or {}:
            out[f"{wname}{'_pooled' if pooled else ''}{name}"] = float(wgot[wname].mean())
    oracle = hf._top_mask(p, keep[0][:, None].expand(hkv, g, -1))
    out["oracle"] = float((p * oracle).sum(-1).mean())
    return out


def _kept_within(rank: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor, wide, qb: torch.Tensor,
                 bs: int) -> torch.Tensor:
    """[Hkv, R, e] bool: hf.vertical_kept's keys for rows ``pos`` (keep [1, Hkv, R]), ``rank`` [1, Hkv, e] read
    first among the tokens of the blocks ``wide`` (a BlockSelection, or a [1, Hkv, M, M] block mask) keeps for each
    row's query block ``qb``, the other keys ranked after every one of those."""
    from cab_vllm import hf
    from cab_vllm.ops.blocks import selection_to_block_mask

    e = rank.shape[-1]
    if isinstance(wide, torch.Tensor):  # a block mask [1, Hkv, M, M] (hf.row_bound_candidates)
        blk = wide[0][:, qb]
    else:
        blk = selection_to_block_mask(wide.indices[0][:, qb], wide.counts[0][:, qb], wide.num_blocks)  # [Hkv, R, M]
    cand = blk.repeat_interleave(bs, -1)[None, ..., :e]  # [1, Hkv, R, e]
    lifted = rank[:, :, None, :] - (~cand) * (float(rank.max()) + 2.0)  # candidates above every other key
    return hf.vertical_kept(lifted, pos, keep)[0]


def run_prefill_mass(model_name: str, lengths, sparsities, chunks, task: str = "multikey", depth: float = 0.5,
                     device: str = "cpu", dtype: torch.dtype = torch.float32, sample: int = 128, rank_rows=None,
                     block_oracle: bool = True, within=(), pooled_rows=(), within_rowbounds: bool = False
                     ) -> list[dict]:
    """One ``task`` prompt per length through the dense model; for every layer and sparsity, prefill_mass of cab's
    selection against vertical lines ranked chunk by chunk (by the last R rows of each chunk, R in ``rank_rows``),
    the per-row oracle and, with block_oracle, "block_oracle": the blocks of highest exact mass for each query block
    (all its rows scored against every key: estimator="sampled" with sample_rows=block_size; what no block estimate
    beats at this budget); for each F in ``within``, "within{F}": those rankings among the tokens of cab's blocks at F
    times the budget (sparsity 1 - F (1 - s)) first, and with within_rowbounds "withinrb{F}": among as many blocks
    per query block ranked by every row's box bounds (hf.row_bound_candidates); for each R in ``pooled_rows`` the
    rankings by the mean query of the last R rows."""
    from cab_vllm.api import select_blocks
    from cab_vllm.config import CABConfig

    out = []
    for n, layer, q, k in _captures(model_name, lengths, task, depth, device, dtype):
        for sp in sparsities:
            cfg = CABConfig(policy="cab", sparsity=sp)
            sel = select_blocks(q, k, cfg)
            others = {}
            if block_oracle:
                others["block_oracle"] = select_blocks(q, k, cfg.replace(estimator="sampled",
                                                                         sample_rows=cfg.block_size))
            wide = {f"within{f:g}": select_blocks(q, k, cfg.replace(sparsity=max(0.0, 1 - f * (1 - sp))))
                    for f in within}
            if within_rowbounds:
                from cab_vllm import hf

                wide.update({f"withinrb{f:g}": hf.row_bound_candidates(
                    q, k, wide[f"within{f:g}"].counts, cfg.block_size, cfg.sink_blocks, cfg.local_blocks)
                    for f in within})
            r = prefill_mass(q, k, sel, 1.0 / math.sqrt(q.shape[-1]), chunks, sample, others, rank_rows, wide,
                             pooled_rows)
            out.append(dict(model=model_name, length=n, n_tokens=q.shape[2], task=task, depth=depth, layer=layer,
                            sparsity=sp, sample=sample, **{key: round(v, 5) for key, v in r.items()}))
    return out


def prefill_mass_markdown(rows: list[dict]) -> str:
    """Per (task, length, sparsity): each selection's kept mass, averaged over layers."""
    names = ("blocks", "block_oracle", "oracle")
    kinds = ("vertical@", "early@", "within", "pooled@")
    keys = [k for k in rows[0] if k in names or k.startswith(kinds)] if rows else []
    lines = ["| task | length | sparsity | layers | " + " | ".join(keys) + " |", "|---" * (4 + len(keys)) + "|"]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["task"], r["length"], r["sparsity"]), []).append(r)
    for (task, n, sp), rs in groups.items():
        vals = [sum(r[k] for r in rs) / len(rs) for k in keys]
        lines.append(f"| {task} | {n} | {sp} | {len(rs)} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    return "\n".join(lines)


def passes_markdown(rows: list[dict]) -> str:
    """Per (task, length, sparsity): over layers, the two-pass rule's mass (mean / smallest head), the one-pass rule's
    loss against it (mean / largest), the counts' largest distance from the budget and the tie cap's cuts."""
    acc: dict = {}
    for r in rows:
        acc.setdefault((r["task"], r["length"], r["sparsity"]), []).append(r)
    lines = ["| task | length | sparsity | mass kept, two passes (mean / smallest head) | mass one pass loses (mean / "
             "largest) | count - budget, two / one pass (largest) | heads the tie cap cut | mass a sampled threshold "
             "loses (mean / largest) | its kept count / budget (mean, smallest - largest head) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (task, n, sp), rs in sorted(acc.items()):
        m = sum(r["mass_two"] for r in rs) / len(rs)
        lo = sum(r["lost_one"] for r in rs) / len(rs)
        line = (f"| {task} | {n} | {sp:g} | {m:.4f} / {min(r['mass_two_min'] for r in rs):.4f} | {lo:.5f} / "
                f"{max(r['lost_one_max'] for r in rs):.4f} | {max(r['count_two_dev'] for r in rs)} / "
                f"{max(r['count_one_dev'] for r in rs)} | {sum(r['tie_cuts'] for r in rs)} |")
        if all("lost_sampled" in r for r in rs):  # (rows written before the sampled threshold have none)
            ls = sum(r["lost_sampled"] for r in rs) / len(rs)
            cr = sum(r["count_sampled_ratio"] for r in rs) / len(rs)
            line += (f" {ls:.5f} / {max(r['lost_sampled_max'] for r in rs):.4f} | {cr:.3f}, "
                     f"{min(r['count_sampled_ratio_min'] for r in rs):.3f} - "
                     f"{max(r['count_sampled_ratio_max'] for r in rs):.3f} |")
        else:
            line += " - | - |"
        lines.append(line)
    return "\n".join(lines)


def reuse_markdown(rows: list[dict]) -> str:
    """Per (task, length, sparsity, factor, lag): over layers, the mean recall and mass and the smallest head's."""
    acc: dict = {}
    for r in rows:
        acc.setdefault((r["task"], r["length"], r["sparsity"], r["factor"], r["lag"]), []).append(r)
    lines = ["| task | length | sparsity | candidates (x keep) | steps later | recall (mean / smallest head) | mass (mean "
             "/ smallest head) |", "|---|---|---|---|---|---|---|"]
    for (task, n, sp, f, lag), rs in sorted(acc.items()):
        def cell(m):
            return f"{sum(r[m] for r in rs) / len(rs):.3f} / {min(r[m + '_min'] for r in rs):.3f}"
        lines.append(f"| {task} | {n} | {sp:g} | {f} | {lag} | {cell('recall')} | {cell('mass')} |")
    return "\n".join(lines)


def rerank_markdown(rows: list[dict]) -> str:
    """Per (length, sparsity, quantizer, bits): over layers, the mean of each factor's recall and mass, and the
    smallest of any head (rows written before the quantizer was recorded: "token")."""
    factors = sorted({int(key.split("_")[1]) for r in rows for key in r if key.startswith("recall_")
                      and key.split("_")[1].isdigit()})
    acc: dict = {}
    for r in rows:
        quant = r.get("quant", "token") + (f"/{r['center_group']}" if "center_group" in r else "")
        acc.setdefault((r["length"], r["sparsity"], quant, r["bits"], r["keep"]), []).append(r)
    head = "| length | sparsity | keys kept per head | quantizer | bits | " + " | ".join(
        f"recall x{f} (mean / min) | mass x{f} (mean / min)" for f in factors) + " |"
    lines = [head, "|" + "---|" * (5 + 2 * len(factors))]
    for (n, sp, quant, bits, keep), rs in sorted(acc.items()):
        cells = []
        for f in factors:
            for m in ("recall", "mass"):
                v = [r[f"{m}_{f}"] for r in rs]
                low = min(r.get(f"{m}_min_{f}", r[f"{m}_{f}"]) for r in rs)
                cells.append(f"{sum(v) / len(v):.3f} / {low:.3f}")
        lines.append(f"| {n} | {sp} | {keep} | {quant} | {bits} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bounds_markdown(rows: list[dict]) -> str:
    """Per (length, sparsity): the mean over layers of bound_prunable's three fractions, and the largest."""
    acc: dict = {}
    for r in rows:
        acc.setdefault((r["length"], r["sparsity"]), []).append(r)
    lines = ["| length | sparsity | keys kept per head | blocks a bound rules out, per head | per KV group | per KV "
             "group, a kernel's threshold | largest over layers (per KV group) |", "|---|---|---|---|---|---|---|"]
    for (n, sp), rs in sorted(acc.items()):
        def mean(key):
            return sum(r[key] for r in rs) / len(rs)
        lines.append(f"| {n} | {sp:g} | {rs[0]['keep']} | {mean('prunable_head'):.3f} | {mean('prunable_group'):.3f} | "
                     f"{mean('prunable_group_kernel'):.3f} | {max(r['prunable_group'] for r in rs):.3f} |")
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    """Per (length, sparsity, tile): the mean over layers of the three densities, and the range of union_density."""
    acc: dict = {}
    for r in rows:
        acc.setdefault((r["length"], r["sparsity"], r["tile"], r.get("per_head", False)), []).append(r)
    lines = ["| length | sparsity | query tile | block selection | oracle's keys | tiles the oracle touches (mean; "
             "min-max over layers) |", "|---|---|---|---|---|---|"]
    for (n, sp, t, ph), rs in sorted(acc.items()):
        u = [r["union_density"] for r in rs]
        blocks = sum(r["block_density"] for r in rs) / len(rs)
        tokens = sum(r["token_density"] for r in rs) / len(rs)
        lines.append(f"| {n} | {sp:g} | {t}{' per head' if ph else ''} | {blocks:.3f} | {tokens:.3f} | "
                     f"{sum(u) / len(u):.3f} ({min(u):.3f}-{max(u):.3f}) |")
    return "\n".join(lines)
