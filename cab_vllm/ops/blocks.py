"""Block arithmetic and paged-cache access shared by the kernels' launchers, their PyTorch twins
(ops/reference.py) and the PyTorch execution path (impl="torch", what runs on a CPU)."""

from __future__ import annotations

from typing import NamedTuple

import torch


def num_blocks(n: int, block_size: int) -> int:
    return (n + block_size - 1) // block_size


def causal_block_mask(m: int, device=None, first: int = 0, rows: int | None = None) -> torch.Tensor:
    """[rows, M] bool, True where key block j <= query block i, for the query blocks i = first .. first+rows-1
    (default: first .. M-1; first = 0 gives the [M, M] square)."""
    rows = m - first if rows is None else rows
    i = torch.arange(first, first + rows, device=device)
    return torch.arange(m, device=device)[None, :] <= i[:, None]


def block_lengths(n: int, block_size: int, device=None) -> torch.Tensor:
    """Valid tokens per block [M] (the last block may be partial)."""
    m = num_blocks(n, block_size)
    starts = torch.arange(m, device=device) * block_size
    return torch.clamp(n - starts, max=block_size)


def selection_to_block_mask(indices: torch.Tensor, counts: torch.Tensor, num_k_blocks: int) -> torch.Tensor:
    """indices [.., M, K] (ascending, padded), counts [.., M] -> bool block mask [.., M, num_k_blocks]."""
    kk = indices.shape[-1]
    live = torch.arange(kk, device=indices.device) < counts[..., None]
    mask = torch.zeros(*indices.shape[:-1], num_k_blocks + 1, dtype=torch.bool, device=indices.device)
    idx = torch.where(live, indices.long(), num_k_blocks)
    mask.scatter_(-1, idx, True)
    return mask[..., :num_k_blocks]


def gather_paged(cache: torch.Tensor, block_table_row: torch.Tensor, seq_len: int, start: int = 0) -> torch.Tensor:
    """[Hkv, seq_len - start, D] copy of one sequence's keys or values at positions start .. seq_len-1 from a
    paged cache."""
    page = cache.shape[1]
    p0, p1 = start // page, -(-seq_len // page)
    # whole pages (page x Hkv x D contiguous runs) rather than one token at a time: several times faster on a GPU
    rows = cache.index_select(0, block_table_row[p0:p1].long()).reshape(-1, *cache.shape[2:])
    return rows[start - p0 * page: seq_len - p0 * page].transpose(0, 1)


class PagedKeys(NamedTuple):
    """The keys of B sequences as they sit in a paged cache, for kernels that read them in place (no gathered copy):
    cache [pages, page_size, Hkv, D] (any strides, contiguous last dim), block_table [B, max_pages] int32, and n keys
    per sequence. ``shape`` is that of the gathered keys, [B, Hkv, n, D]."""

    cache: torch.Tensor
    block_table: torch.Tensor
    n: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.block_table.shape[0], self.cache.shape[2], self.n, self.cache.shape[3])

    @property
    def device(self) -> torch.device:
        return self.cache.device

    def gather(self) -> torch.Tensor:
        """The keys as one tensor [B, Hkv, n, D] (a copy)."""
        return torch.stack([gather_paged(self.cache, row, self.n) for row in self.block_table])
