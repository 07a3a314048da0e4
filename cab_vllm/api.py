"""Public API on dense [B, H, N, D] tensors: select_blocks -> Selection -> sparse_attention."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cab_vllm.config import ESTIMATED_POLICIES, CABConfig
from cab_vllm.ops._triton import check, resolve_impl
from cab_vllm.ops.prefill import PrefillTiles, dense_sparse_prefill
from cab_vllm.ops.blocks import num_blocks
from cab_vllm.ops import gathered
from cab_vllm.policies import estimate, select_from_attention



@dataclass(frozen=True)
class Selection:
    """Key blocks kept for every (sequence, KV head, query block).

    indices [B, Hkv, M, K] int32: absolute key-block ids, ascending, -1 past counts (Hsel = Hkv: the query
        heads of a GQA group share their KV head's selection).
    counts  [B, Hkv, M] int32: valid entries per row; exactly CABConfig.keep_counts(M) with the fixed budget;
        with budget="adaptive" per (sequence, KV head) row, summing to the fixed total per sequence.
    block_size, seq_len: the geometry the selection was made for (M = ceil(seq_len / block_size)).
    """

    indices: torch.Tensor
    counts: torch.Tensor
    block_size: int
    seq_len: int

    @property
    def num_blocks(self) -> int:
        return self.indices.shape[2]

    def density(self) -> float:
        """Kept blocks over causal blocks (1.0 = dense)."""
        m = self.num_blocks
        return float(self.counts.double().sum() / (self.counts[..., 0].numel() * m * (m + 1) / 2))

    def to_tiles(self) -> PrefillTiles:
        """The (sequence, query block) tiles our prefill kernel runs on."""
        b, h, m, k = self.indices.shape
        dev = self.indices.device
        seq = torch.arange(b, device=dev, dtype=torch.int32).repeat_interleave(m)
        qb = torch.arange(m, device=dev, dtype=torch.int32).repeat(b)
        return PrefillTiles(seq, qb, self.indices.permute(0, 2, 1, 3).reshape(b * m, h, k).contiguous(),
                            self.counts.permute(0, 2, 1).reshape(b * m, h).contiguous())


def _check_qk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None) -> None:
    check(q.dim() == 4 and k.dim() == 4, f"q and k must be [B, H, N, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    check(q.shape[0] == k.shape[0] and q.shape[2] == k.shape[2] and q.shape[3] == k.shape[3],
          f"q {tuple(q.shape)} and k {tuple(k.shape)} must share B, N and D")
    check(q.shape[1] % k.shape[1] == 0, f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[1]})")
    check(q.shape[2] >= 1, "sequences must hold at least one token")
    check(q.dtype == k.dtype, f"q ({q.dtype}) and k ({k.dtype}) must share a dtype")
    check(q.device == k.device, f"q ({q.device}) and k ({k.device}) must be on one device")
    if v is not None:
        check(v.shape == k.shape and v.dtype == k.dtype and v.device == k.device,
              f"v {tuple(v.shape)} must match k {tuple(k.shape)} in shape, dtype and device")


def select_blocks(q: torch.Tensor, k: torch.Tensor, cfg: CABConfig | None = None, impl: str = "auto") -> Selection:
    """Choose the key blocks every query block attends to.

    q [B, Hq, N, D], k [B, Hkv, N, D] (post-RoPE; fp16/bf16/fp32) -> Selection with Hsel = Hkv. The sequence is a
    whole prompt: its last query block produces the answer and keeps at least cfg.answer_blocks.
    impl: 'auto' (Triton on GPU, PyTorch on CPU), 'triton' or 'torch'.
    """
    cfg = CABConfig() if cfg is None else cfg
    _check_qk(q, k)
    m = num_blocks(q.shape[2], cfg.block_size)
    hkv = k.shape[1]
    if cfg.policy in ESTIMATED_POLICIES:
        a_max, a_mean = estimate(q, k, cfg, impl=impl)
    else:
        a_max = a_mean = torch.zeros(q.shape[0], hkv, m, m, device=q.device)
    idx, cnt = select_from_attention(a_max, a_mean, cfg, impl=impl, answer=True)
    return Selection(idx, cnt, cfg.block_size, q.shape[2])


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sel: Selection, scale: float | None = None,
                     impl: str = "auto") -> torch.Tensor:
    """Causal attention restricted to ``sel``: out [B, Hq, N, D] in q.dtype.

    Equals dense causal attention with every (query, key) pair outside the selected blocks masked out.
    impl: 'auto' (Triton on GPU, PyTorch on CPU), 'triton', 'torch' or 'flex' (FlexAttention BlockMask).
    """
    _check_qk(q, k, v)
    b, hq, n, d = q.shape
    check(sel.seq_len == n, f"selection was made for {sel.seq_len} tokens, q has {n}")
    check(sel.indices.shape[:2] == (b, k.shape[1]), f"selection is for [B, Hkv] = {tuple(sel.indices.shape[:2])}, "
          f"inputs are [{b}, {k.shape[1]}]")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if impl == "flex":
        from cab_vllm.ops.flex import flex_sparse_attention

        return flex_sparse_attention(q, k, v, sel.indices, sel.counts, sel.block_size, scale)
    if resolve_impl(impl, q, k) == "torch":
        return gathered.sparse_attention(q, k, v, sel.indices, sel.counts, sel.block_size, scale)
    return dense_sparse_prefill(q, k, v, sel.to_tiles(), sel.block_size, scale)
