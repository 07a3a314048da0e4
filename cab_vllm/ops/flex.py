"""FlexAttention path: a BlockMask built from a block selection, never an N x N mask.

Compiled FlexAttention wants kernel tiles of 128 tokens, while selections are made on ``block_size``-token
blocks (64 by default). A 128 x 128 tile is listed when any of its selection sub-blocks is kept; it is a
*full* tile (no mask_mod evaluated) only when all its sub-blocks are kept, it lies strictly below the
diagonal and inside the sequence. Partial tiles evaluate a mask_mod that looks the exact selection up in an
[B, Hkv, M, M] bool table (M = N / block_size, so 4 M entries per KV head at 128k: cheap).
"""

from __future__ import annotations

import functools
import math

import torch

from cab_vllm.ops._triton import check
from cab_vllm.ops.blocks import num_blocks, selection_to_block_mask

KERNEL_BLOCK = 128


def _pool_tiles(mask: torch.Tensor, f: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[.., M, M] bool -> (any, all) over f x f groups, [.., M2, M2]; out-of-range sub-blocks count as missing."""
    m = mask.shape[-1]
    m2 = -(-m // f)
    pad = m2 * f - m
    x = torch.nn.functional.pad(mask, (0, pad, 0, pad)).view(*mask.shape[:-2], m2, f, m2, f)
    return x.any(-1).any(-2), x.all(-1).all(-2)


def _indices_from_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [.., M2, M2] -> (num [.., M2] int32, indices [.., M2, M2] int32 listing True columns first)."""
    num = mask.sum(-1, dtype=torch.int32)
    idx = torch.sort(mask.to(torch.int8), dim=-1, descending=True, stable=True).indices.to(torch.int32)
    return num, idx


def build_block_mask(indices: torch.Tensor, counts: torch.Tensor, block_size: int, seq_len: int, num_q_heads: int):
    """BlockMask for flex_attention from a selection (indices [B, Hkv, M, K], counts [B, Hkv, M])."""
    from torch.nn.attention.flex_attention import BlockMask

    b, hkv, m, _ = indices.shape
    check(m == num_blocks(seq_len, block_size), f"selection has {m} query blocks, seq_len {seq_len} needs "
          f"{num_blocks(seq_len, block_size)}")
    check(KERNEL_BLOCK % block_size == 0 or block_size % KERNEL_BLOCK == 0,
          f"block_size {block_size} must divide or be a multiple of {KERNEL_BLOCK}")
    check(num_q_heads % hkv == 0, f"query heads ({num_q_heads}) must be a multiple of KV heads ({hkv})")
    group = num_q_heads // hkv
    table = selection_to_block_mask(indices, counts, m)  # [B, Hkv, M, M]
    kb = max(KERNEL_BLOCK, block_size)
    f = kb // block_size
    any_t, all_t = _pool_tiles(table, f)
    m2 = any_t.shape[-1]
    ti = torch.arange(m2, device=indices.device)
    strictly_below = ti[None, :] < ti[:, None]
    inside = ((ti + 1) * kb <= seq_len)
    full = all_t & strictly_below & inside[None, :] & inside[:, None]
    partial = any_t & ~full
    if group > 1:
        partial, full = partial.repeat_interleave(group, 1), full.repeat_interleave(group, 1)
    kv_num, kv_idx = _indices_from_mask(partial)
    full_num, full_idx = _indices_from_mask(full)

    def mask_mod(bi, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & table[bi, h // group, q_idx // block_size, kv_idx // block_size]

    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=kb, mask_mod=mask_mod,
                                    seq_lengths=(seq_len, seq_len))


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor,
                          counts: torch.Tensor, block_size: int, scale: float | None = None,
                          block_mask=None, compiled: bool | None = None) -> torch.Tensor:
    """FlexAttention over a selection. q [B, Hq, N, D], k/v [B, Hkv, N, D] -> [B, Hq, N, D] in q.dtype.

    compiled: torch.compile the kernel (default: on CUDA; eager elsewhere). Pass a prebuilt ``block_mask``
    (build_block_mask) to time the attention alone.
    """
    from torch.nn.attention.flex_attention import flex_attention

    n, d = q.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if block_mask is None:
        block_mask = build_block_mask(indices, counts, block_size, n, q.shape[1])
    compiled = q.is_cuda if compiled is None else compiled
    fn = _compiled_flex() if compiled else flex_attention
    gqa = q.shape[1] != k.shape[1]
    return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
