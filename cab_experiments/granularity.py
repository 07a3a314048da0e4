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


def run(model_name: str, lengths, sparsities, tiles, task: str = "multikey", depth: float = 0.5,
        device: str = "cpu", dtype: torch.dtype = torch.float32, block_size: int = 64,
        per_head: bool = False) -> list[dict]:
    """One ``task`` prompt per length through the dense model; for every layer, sparsity and query tile: the
    block selection's density (cab), the oracle's kept keys over the causal ones, and union_density (per KV head,
    or per query head with per_head)."""
    from cab_experiments.common import load_model
    from cab_experiments.tasks import build_items
    from cab_vllm import hf
    from cab_vllm.api import select_blocks
    from cab_vllm.config import CABConfig

    model, tok, _ = load_model(model_name, device, dtype)
    out = []
    for n in lengths:
        item = build_items(tok, task, n, [depth], 1)[0]
        ids = torch.tensor([item["input_ids"]], device=device)
        with torch.no_grad(), hf.capture() as caps:
            model(ids)
        for layer, q, k in caps:
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
