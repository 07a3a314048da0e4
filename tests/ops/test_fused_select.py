"""ops.fused_select.estimate_select (estimate + select in one Triton kernel, for cab without a curvature share and
magnitude at the fixed budget) selects what policies.estimate + select_from_attention select, row block by row
block, chunk rows included, with and without cab's exact last rows."""

from __future__ import annotations

import os

import pytest
import torch

from cab_vllm.config import CABConfig
from cab_vllm.ops.coarsen import key_summary
from cab_vllm.policies import estimate, estimate_and_select, fused_select_ok, select_from_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="Triton on CPU tensors needs TRITON_INTERPRET=1")


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _case(n, hq, hkv, d, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, n, d, generator=gen).to(_dev())
    k = torch.randn(1, hkv, n, d, generator=gen).to(_dev())
    return q, k


@pytest.mark.parametrize("policy", ["cab", "magnitude"])
@pytest.mark.parametrize("estimator", ["bounds", "mean", "max_l2"])
@pytest.mark.parametrize("n, first, heads", [(1000, 0, (4, 2)), (1337, 9, (4, 2)), (2100, 20, (14, 2)),
                                             (640, 9, (8, 8))], ids=["square", "chunk", "gqa7", "mha-last"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_fused_selection_equals_estimate_then_select(policy, estimator, n, first, heads, sparsity):
    hq, hkv = heads
    d = 32
    q, k = _case(n, hq, hkv, d, seed=n + first)
    cfg = CABConfig(policy=policy, estimator=estimator, sparsity=sparsity, exact_rows=16)
    assert fused_select_ok(cfg)
    bs = cfg.block_size
    qr = q[:, :, first * bs:]
    summ = key_summary(k, bs, estimator, impl="torch")
    a_max, a_mean = estimate(qr, k, cfg, impl="torch", q_block_offset=first, summary=summ, n_keys=n)
    want_idx, want_cnt = select_from_attention(a_max, a_mean, cfg, impl="torch", q_block_offset=first)
    idx, cnt = estimate_and_select(qr, k, cfg, first, summ, n, impl="torch")
    assert torch.equal(cnt, want_cnt)
    assert idx.shape == want_idx.shape and idx.dtype == torch.int32
    assert torch.equal(idx, want_idx)


def test_fused_selection_without_exact_rows_and_its_errors():
    q, k = _case(900, 4, 2, 32, seed=3)
    cfg = CABConfig(sparsity=0.8)
    summ = key_summary(k, 64, cfg.estimator, impl="torch")
    a_max, a_mean = estimate(q, None, cfg, impl="torch", summary=summ, n_keys=900, exact=False)
    want = select_from_attention(a_max, a_mean, cfg, impl="torch")
    got = estimate_and_select(q, None, cfg, 0, summ, 900, exact=False, impl="torch")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match="exact rows need the keys"):
        estimate_and_select(q, None, cfg, 0, summ, 900, exact=True)
    for bad in (CABConfig(policy="h2o"), CABConfig(budget="adaptive"), CABConfig(curvature_share=0.5),
                CABConfig(estimator="topr")):
        assert not fused_select_ok(bad)
        with pytest.raises(ValueError, match="cannot select"):
            estimate_and_select(q, k, bad, 0, summ, 900)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n, first", [(32768 + 37, 0), (131072, 1792)], ids=["32k", "128k-last-chunk"])
def test_fused_selection_on_the_gpu(n, first):
    """bf16, 32/8 heads, head dim 128: the same counts, and the same blocks in all but near-tied rows (the fused
    kernel's TF32 logits and the unfused path's differ in the last bits)."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 32, n, 128, generator=gen).to("cuda", torch.bfloat16)
    k = torch.randn(1, 8, n, 128, generator=gen).to("cuda", torch.bfloat16)
    cfg = CABConfig(sparsity=0.95)
    qr = q[:, :, first * 64:]
    summ = key_summary(k, 64, cfg.estimator, impl="triton")
    a_max, a_mean = estimate(qr, k, cfg, impl="triton", q_block_offset=first, summary=summ, n_keys=n)
    want_idx, want_cnt = select_from_attention(a_max, a_mean, cfg, impl="triton", q_block_offset=first)
    idx, cnt = estimate_and_select(qr, k, cfg, first, summ, n, impl="triton")
    assert torch.equal(cnt, want_cnt)
    same = (idx == want_idx).all(-1).float().mean().item()
    assert same > 0.98, same


def test_warm_up_compiles_every_fused_variant(monkeypatch):
    """With CAB_FUSED_SELECT the engine start launches the one-kernel predictor for every power of two of the
    key blocks up to the engine's longest context, with and without exact rows (its compiled variants)."""
    import cab_vllm.backend.warmup as warmup

    seen = []
    real = warmup.estimate_select
    monkeypatch.setattr(warmup, "estimate_select",
                        lambda q, s, n, *a: seen.append((s.shape[2], a[-1] is not None)) or real(q, s, n, *a))
    cfg = CABConfig()
    n = warmup.warm_fused_select(4, 2, 32, torch.float32, _dev(), cfg, 40)
    # 40 blocks at most: rows of 33-40 blocks pad to 64
    assert n == 6 and sorted(seen) == [(p, e) for p in (16, 32, 64) for e in (False, True)]
    assert seen[0][0] * 64 == 1024  # 16 blocks: from 1024 tokens, as the softmax's warm-up
