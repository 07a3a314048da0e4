"""The adapter's ablation that adds the dropped key blocks back as block means (cab_vllm.hf.with_dropped_blocks):
exact where a block's mean stands for it exactly, plain sparse attention where nothing is dropped."""

from __future__ import annotations

import math

import pytest
import torch

from cab_vllm import hf
from cab_vllm.api import select_blocks, sparse_attention
from cab_vllm.config import CABConfig
from cab_vllm.ops.reference import dense_attention_ref


def _blockwise_constant(x: torch.Tensor, bs: int) -> torch.Tensor:
    """x with every block of bs tokens replaced by its first token (the last block may be short)."""
    n = x.shape[2]
    idx = (torch.arange(n) // bs) * bs
    return x[:, :, idx]


@pytest.mark.parametrize("n", [97, 200, 256], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("mode", hf.COMPENSATIONS)
def test_blocks_that_their_mean_stands_for_give_dense_attention(n, mode):
    """Keys and values constant within each block: a dropped block is exactly one token repeated, so the mean
    ("mean") and the exact mass ("mass") both restore dense attention, whatever was dropped (GQA 2)."""
    torch.manual_seed(n)
    bs = 32
    q = torch.randn(1, 4, n, 16)
    k = _blockwise_constant(torch.randn(1, 2, n, 16), bs)
    v = _blockwise_constant(torch.randn(1, 2, n, 16), bs)
    cfg = CABConfig(block_size=bs, sparsity=0.7, policy="random")
    sel = select_blocks(q, k, cfg, impl="torch")
    assert sel.density() < 0.9  # blocks were dropped
    scale = 1 / math.sqrt(16)
    got = hf.with_dropped_blocks(q, k, v, sel, scale, mode)
    want = dense_attention_ref(q, k, v, scale).float()
    sparse = sparse_attention(q, k, v, sel, scale=scale, impl="torch")
    assert (sparse - want).abs().max() > 1e-2  # without the blocks' share the rows differ
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", hf.COMPENSATIONS)
def test_values_constant_per_block_make_the_exact_mass_exact(mode):
    """Keys free, values constant within each block: "mass" weighs each dropped block by its exact softmax mass and is
    dense attention; "mean" (exp of the mean key's score, a lower bound of the block's mass) differs."""
    torch.manual_seed(1)
    bs, n = 16, 150
    q, k = torch.randn(1, 2, n, 8) * 2, torch.randn(1, 2, n, 8) * 2
    v = _blockwise_constant(torch.randn(1, 2, n, 8), bs)
    sel = select_blocks(q, k, CABConfig(block_size=bs, sparsity=0.8, policy="random"), impl="torch")
    got = hf.with_dropped_blocks(q, k, v, sel, 0.5, mode)
    want = dense_attention_ref(q, k, v, 0.5).float()
    if mode == "mass":
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        assert (got - want).abs().max() > 1e-3


def test_nothing_dropped_is_sparse_attention():
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 2, 130, 8), torch.randn(1, 1, 130, 8), torch.randn(1, 1, 130, 8)
    sel = select_blocks(q, k, CABConfig(block_size=64, sparsity=0.0, policy="random"), impl="torch")
    for mode in hf.COMPENSATIONS:
        torch.testing.assert_close(hf.with_dropped_blocks(q, k, v, sel, 0.3, mode),
                                   sparse_attention(q, k, v, sel, scale=0.3, impl="torch"))


def test_bad_compensation_is_refused():
    with pytest.raises(ValueError, match="compensate="):
        with hf.using(CABConfig(), compensate="median"):
            pass
