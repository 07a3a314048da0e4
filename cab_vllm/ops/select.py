"""Budgeted block selection: priorities -> padded, ascending key-block indices + counts.

The output format is shared by every attention path: ``indices [..., M, K]`` int32, ascending, padded with
-1 past ``counts [..., M]`` int32. FlexAttention's BlockMask and our Triton kernels both read it. Selection
runs through torch.topk / torch.sort, which are GPU kernels already, so this op has no Triton twin.
"""

from __future__ import annotations

import torch

from cab_vllm.ops.reference import causal_block_mask

PAD = -1


def forced_mask(m: int, sink_blocks: int, local_blocks: int, device=None) -> torch.Tensor:
    """[M, M] bool: sink blocks (j < sink) and the local window (i - local < j <= i), causal."""
    i = torch.arange(m, device=device)
    sink = i[None, :] < sink_blocks
    local = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - local_blocks)
    return (sink | local) & causal_block_mask(m, device)


def select_topk(priority: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``keep[i]`` highest-priority key blocks of every row i.

    priority [..., M, Mk] float (higher first; -inf = never), keep [M] int64 with keep[i] <= number of
    finite-or-+inf entries of row i. Returns (indices [..., M, K] int32 ascending, padded with -1,
    counts [..., M] int32), K = max(keep).
    """
    if priority.shape[-2] != keep.shape[0]:
        raise ValueError(f"keep has {keep.shape[0]} rows, priority {priority.shape[-2]}")
    kmax = int(keep.max()) if keep.numel() else 0
    kmax = max(kmax, 1)
    top = priority.topk(kmax, dim=-1, sorted=True).indices
    live = torch.arange(kmax, device=priority.device) < keep.to(priority.device)[:, None]
    big = torch.iinfo(torch.int32).max
    idx = torch.where(live, top.to(torch.int32), big).sort(dim=-1).values
    idx = torch.where(idx == big, PAD, idx)
    counts = live.sum(-1, dtype=torch.int32).expand(*priority.shape[:-1]).contiguous()
    return idx.contiguous(), counts


def select_tiered(tiers: list[torch.Tensor], keep: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lexicographic selection: a block chosen by an earlier tier always beats any later one.

    tiers: list of bool masks [..., M, Mk] (earlier = stronger) followed by one float score [..., M, Mk]
    that orders everything else; allowed [M, Mk] bool (causal). Same return as select_topk.
    """
    *masks, score = tiers
    # A monotone squash into (0, 1) keeps the score order while tier offsets (2, 4, ...) dominate.
    pri = 0.5 + torch.atan(torch.nan_to_num(score.to(torch.float64), nan=0.0)) / torch.pi
    for w, m in enumerate(reversed(masks)):
        pri = pri + m.to(torch.float64) * float(2 ** (w + 1))
    pri = pri.masked_fill(~allowed, float("-inf"))
    return select_topk(pri, keep)
