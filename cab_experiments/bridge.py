"""The bridge experiments: does most-negative curvature keep what the last query reaches only by a bridge?

1. ``seed_graph_rows``: the seed's 100-block synthetic block graph (two communities, a sink, the last row
   reaching a needle block in the other community through one weak bridge edge); every policy selects on it.
2. ``synthetic_retrieval``: random Q/K/V at 16k-128k tokens with one planted needle key per KV head whose norm is
   *below* the typical key norm but whose direction matches the last query block's queries, so dense attention
   retrieves it while max-L2 pooling cannot see it. Per policy and sparsity: is the needle's block kept for the
   last query block, and how far is the last block's output from dense.
"""

from __future__ import annotations

import math

import torch

from cab_vllm.api import select_blocks, sparse_attention
from cab_vllm.config import POLICIES, CABConfig
from cab_experiments.common import Variant
from cab_vllm.ops.reference import dense_attention_ref
from cab_vllm.policies import select_from_attention

M, SPLIT, NEEDLE, SINK, BRIDGE = 100, 50, 10, 0.1, 0.01


def bridge_graph() -> torch.Tensor:
    """[M, M] float64 causal row-stochastic block graph (see module docstring)."""
    a = torch.zeros(M, M, dtype=torch.float64)
    a[0, 0] = 1.0
    for i in range(1, M):
        lo = 1 if i < SPLIT else SPLIT
        a[i, 0] = SINK
        a[i, lo: i + 1] = (1 - SINK) / (i + 1 - lo)
    a[M - 1, SPLIT:] = (1 - SINK - BRIDGE) / (M - SPLIT)
    a[M - 1, NEEDLE] = BRIDGE
    return a


def curvature64(a: torch.Tensor) -> torch.Tensor:
    """F = 4A - D_i (row sum) - D_j (column sum) + 3 A.A, float64, as documented in ops/curvature.py."""
    return 4 * a - a.sum(-1, keepdim=True) - a.sum(-2, keepdim=True) + 3 * (a @ a)


def seed_graph_rows(sparsities=(0.8, 0.9, 0.95)) -> list[dict]:
    """One row per (policy variant, sparsity): does the last row keep the needle block, and which blocks."""
    a64 = bridge_graph()
    a = a64.float()[None, None]
    f = curvature64(a64)[M - 1]
    cand = list(range(1, M - 1))
    ranks = {"curvature": sorted(cand, key=lambda j: f[j].item()).index(NEEDLE) + 1,
             "attention_mass": sorted(cand, key=lambda j: -a64[M - 1, j].item()).index(NEEDLE) + 1,
             "column_sum": sorted(cand, key=lambda j: -a64[:, j].sum().item()).index(NEEDLE) + 1}
    variants = [p for p in POLICIES] + ["cab:curvature_share=0.5", "cab:curvature_share=1.0"]
    rows = []
    for sp in sparsities:
        for spec in variants:
            v = Variant.parse(spec)
            cfg = v.config(sp) or CABConfig(policy="dense", sparsity=sp)
            if v.is_dense:
                last = list(range(M))
            else:
                idx, cnt = select_from_attention(a, a, cfg, impl="torch")
                last = idx[0, 0, -1, : int(cnt[0, 0, -1])].tolist()
            rows.append({"experiment": "seed_graph", "variant": spec, "sparsity": sp, "keeps_needle": NEEDLE in last,
                         "last_row_blocks": len(last), "needle_rank": ranks})
    return rows


def planted_needle(n: int, hq: int = 8, hkv: int = 2, d: int = 64, block_size: int = 64, seed: int = 0,
                   device="cpu", dtype=torch.float32, align: float = 40.0, needle_norm: float = 4.0):
    """(q, k, v [B=1, H, n, d], needle positions [hkv], needle values [hkv, d]) with one needle per KV head."""
    g = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(hkv, d, generator=g, dtype=torch.float64), dim=-1)
    k = torch.randn(hkv, n, d, generator=g, dtype=torch.float64)
    k = k - (k @ u[:, :, None]) * u[:, None, :] + 0.5 * torch.randn(hkv, n, 1, generator=g, dtype=torch.float64) * u[:, None]
    q = torch.randn(hq, n, d, generator=g, dtype=torch.float64)
    grp = hq // hkv
    last = max(0, n - block_size * (math.ceil(n / block_size) - 1))  # rows of the last query block
    q[:, n - last:] += align * u.repeat_interleave(grp, 0)[:, None, :]
    v = torch.randn(hkv, n, d, generator=g, dtype=torch.float64)
    lo, hi = 2 * block_size, n - 2 * block_size  # not a sink or local block
    if hi <= lo:
        raise ValueError(f"n={n} is too short for a needle away from the sink and local blocks")
    pos = torch.randint(lo, hi, (hkv,), generator=g)
    vals = torch.randn(hkv, d, generator=g, dtype=torch.float64) * 3
    for h in range(hkv):
        k[h, pos[h]] = needle_norm * u[h]
        v[h, pos[h]] = vals[h]
    cast = dict(device=device, dtype=dtype)
    return q[None].to(**cast), k[None].to(**cast), v[None].to(**cast), pos, vals


@torch.no_grad()
def synthetic_retrieval(lengths, variants: list[Variant], sparsities, seeds: int = 3, device="cpu",
                        dtype=torch.float32, impl: str = "auto") -> list[dict]:
    rows = []
    for n in lengths:
        for s in range(seeds):
            q, k, v, pos, vals = planted_needle(n, seed=s, device=device, dtype=dtype)
            hkv, grp, bs = k.shape[1], q.shape[1] // k.shape[1], 64
            m = math.ceil(n / bs)
            last = n - bs * (m - 1)
            ref = dense_attention_ref(q[:, :, -last:].double(), k.double(), v.double())
            key_norms = k[0].float().norm(dim=-1)
            rank_in_block = [int((key_norms[h, (pos[h] // bs) * bs: (pos[h] // bs + 1) * bs]
                                  > key_norms[h, pos[h]]).sum()) for h in range(hkv)]
            for spec in variants:
                for sp in ([0.0] if spec.is_dense else sparsities):
                    cfg = spec.config(sp)
                    if cfg is None:
                        kept = [True] * hkv
                        out = ref
                    else:
                        sel = select_blocks(q, k, cfg, impl=impl)
                        row = sel.indices[0, :, -1]
                        kept = [bool((row[h, : int(sel.counts[0, h, -1])] == pos[h] // bs).any()) for h in range(hkv)]
                        out = sparse_attention(q, k, v, sel, impl=impl)[:, :, -last:].double()
                    err = ((out - ref).norm() / ref.norm()).item()
                    # retrieval: the last block's mean output per KV group against the planted value
                    o = out[0].reshape(hkv, grp, last, -1).mean((1, 2))
                    cos = torch.nn.functional.cosine_similarity(o, vals.to(o), dim=-1).mean().item()
                    rows.append({"experiment": "synthetic_retrieval", "length": n, "seed": s, "variant": spec.spec,
                                 "sparsity": sp, "needle_kept": sum(kept) / hkv, "rel_err_last_block": err,
                                 "needle_cosine": cos, "needle_norm_rank_in_block": rank_in_block})
    return rows
