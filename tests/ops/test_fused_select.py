"""ops.fused_select.estimate_select (estimate, then a top-k per row, in two Triton launches, for cab without a curvature share and
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


@pytest.mark.parametrize("tile_rows, key_tile, key_split, scratch", [
    (16, 16, 16, 1 << 30),  # a split per key tile
    (32, 16, 40, 9000),  # splits of 32 blocks (whole tiles), the rows in slices of a few query blocks
    (128, 128, 256, 1 << 30)])  # fewer rows than a group, a key tile past the last key block
@pytest.mark.parametrize("n, first, heads", [(1337, 9, (4, 2)), (2100, 20, (14, 2))], ids=["chunk", "gqa7"])
def test_fused_selection_for_any_tile(tile_rows, key_tile, key_split, scratch, n, first, heads, monkeypatch):
    """The estimate kernels' tiles (query rows per program, key blocks per loop step, key blocks per split of
    the logits launch, the logits held at once: speed options) leave the selection as the unfused path makes it:
    fewer rows than a group, key tiles past the last key block, several splits, rows in slices."""
    from cab_vllm.ops import fused_select as fs

    monkeypatch.setattr(fs, "TILE_ROWS", tile_rows)
    monkeypatch.setattr(fs, "KEY_TILE", key_tile)
    monkeypatch.setattr(fs, "KEY_SPLIT", key_split)
    monkeypatch.setattr(fs, "SCRATCH_BYTES", scratch)
    hq, hkv = heads
    q, k = _case(n, hq, hkv, 32, seed=n + tile_rows)
    cfg = CABConfig(sparsity=0.8, exact_rows=16)
    qr = q[:, :, first * cfg.block_size:]
    summ = key_summary(k, cfg.block_size, cfg.estimator, impl="torch")
    a_max, a_mean = estimate(qr, k, cfg, impl="torch", q_block_offset=first, summary=summ, n_keys=n)
    want_idx, want_cnt = select_from_attention(a_max, a_mean, cfg, impl="torch", q_block_offset=first)
    idx, cnt = estimate_and_select(qr, k, cfg, first, summ, n, impl="torch")
    assert torch.equal(cnt, want_cnt) and torch.equal(idx, want_idx)


@pytest.mark.parametrize("exact", [True, False], ids=["prompt-end", "earlier-chunk"])
@pytest.mark.parametrize("n, first, heads", [(1337, 9, (4, 2)), (2100, 20, (14, 2)), (1000, 0, (4, 2))],
                         ids=["chunk", "gqa7", "square"])
def test_fused_vertical_blocks_equal_estimate_then_select(n, first, heads, exact):
    """vertical_blocks: every row ranks by the larger of its estimate and the chunk end's exact scores, in the kernel
    as in policies.estimate, whether the chunk ends the prompt (its last row then takes the exact scores) or not."""
    hq, hkv = heads
    q, k = _case(n, hq, hkv, 32, seed=7 * n + first)
    probe = torch.randn(32, generator=torch.Generator().manual_seed(n)).to(q.device)
    k[:, :, 3 * 64 + 5] = probe * 2  # a key of block 3 that the last rows (the exact rows) attend to
    q[:, :, -16:] = probe * 2
    cfg = CABConfig(sparsity=0.8, exact_rows=16, vertical_blocks=True)
    qr = q[:, :, first * cfg.block_size:]
    summ = key_summary(k, cfg.block_size, cfg.estimator, impl="torch")
    a_max, a_mean = estimate(qr, k, cfg, impl="torch", q_block_offset=first, summary=summ, n_keys=n, exact=exact)
    want_idx, want_cnt = select_from_attention(a_max, a_mean, cfg, impl="torch", q_block_offset=first, answer=exact)
    idx, cnt = estimate_and_select(qr, k, cfg, first, summ, n, exact=exact, impl="torch")
    assert torch.equal(cnt, want_cnt) and torch.equal(idx, want_idx)
    plain = estimate_and_select(qr, k, cfg.replace(vertical_blocks=False), first, summ, n, exact=exact, impl="torch")
    assert not torch.equal(plain[0], idx)  # the blend changes some rows' blocks on these inputs
    with pytest.raises(ValueError, match="blend needs the exact scores"):
        from cab_vllm.ops.fused_select import estimate_select

        estimate_select(qr, summ, n, torch.ones(a_max.shape[-2], dtype=torch.int32), 4, 64, cfg.estimator, 1, 1,
                        first, None, blend=True)


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


def _check_near_ties(a_max, cfg, first, idx, cnt, want_idx, want_cnt):
    """Both selections keep every forced (sink and local) block and the same counts, and where their blocks
    differ they trade blocks of equal estimated mass: each row's kept mass (a_max summed over the kept
    blocks) agrees within rounding. Returns the share of rows with identical blocks."""
    from cab_vllm.policies import forced_mask

    assert torch.equal(cnt, want_cnt)
    mq, m = a_max.shape[-2], a_max.shape[-1]
    forced = forced_mask(m, cfg.sink_blocks, cfg.local_blocks, a_max.device, first, mq)
    for sel in (idx, want_idx):
        kept = torch.zeros(*sel.shape[:-1], m + 1, dtype=torch.bool, device=sel.device)
        kept.scatter_(-1, torch.where(sel >= 0, sel.long(), m), True)
        assert not (forced & ~kept[..., :m]).any(), "a forced block is missing"
    mass = [(a_max.gather(-1, sel.clamp_min(0).long()) * (sel >= 0)).sum(-1) for sel in (idx, want_idx)]
    # the two paths' logits differ in the last bits (TF32 vs bf16 products): a near-tied block may swap
    assert torch.allclose(mass[0], mass[1], rtol=2e-3, atol=1e-6), (mass[0] - mass[1]).abs().max().item()
    return (idx == want_idx).all(-1).float().mean().item()


@pytest.mark.parametrize("n, first", [(4096 + 37, 0), (6000, 40)], ids=["square", "chunk"])
def test_near_tie_check_accepts_swaps_of_equal_mass_and_rejects_worse_blocks(n, first):
    """The GPU test's check: a selection that swaps tied blocks passes; one that drops a forced block or swaps a
    kept block for a much lighter one fails."""
    q, k = _case(n, 4, 2, 32, seed=7)
    cfg = CABConfig(sparsity=0.9)
    qr = q[:, :, first * 64:]
    summ = key_summary(k, 64, cfg.estimator, impl="torch")
    a_max, a_mean = estimate(qr, k, cfg, impl="torch", q_block_offset=first, summary=summ, n_keys=n)
    idx, cnt = select_from_attention(a_max, a_mean, cfg, impl="torch", q_block_offset=first)
    assert _check_near_ties(a_max, cfg, first, idx, cnt, idx, cnt) == 1.0
    # make two blocks of one row tie exactly, then swap which of them is kept
    r = a_max.shape[-2] - 1
    row_idx = idx[0, 0, r, : cnt[0, 0, r]].long()
    forced = torch.tensor(sorted({0} | set(range(first + r - cfg.local_blocks + 1, first + r + 1))))
    free = [int(b) for b in row_idx if int(b) not in forced.tolist()]
    dropped = sorted(set(range(first + r + 1)) - set(row_idx.tolist()))
    kept_b, out_b = free[0], dropped[0]
    tied = a_max.clone()
    tied[0, 0, r, out_b] = tied[0, 0, r, kept_b]
    swapped = idx.clone()
    swapped[0, 0, r, : cnt[0, 0, r]] = torch.tensor(sorted(set(row_idx.tolist()) - {kept_b} | {out_b}),
                                                    dtype=idx.dtype)
    assert _check_near_ties(tied, cfg, first, swapped, cnt, idx, cnt) < 1.0
    lighter = a_max.clone()
    lighter[0, 0, r, out_b] = 0.0
    lighter[0, 0, r, kept_b] = 0.5
    with pytest.raises(AssertionError):
        _check_near_ties(lighter, cfg, first, swapped, cnt, idx, cnt)
    no_sink = idx.clone()
    no_sink[0, 0, r, : cnt[0, 0, r]] = torch.tensor(sorted(set(row_idx.tolist()) - {0} | {out_b}),
                                                    dtype=idx.dtype)
    with pytest.raises(AssertionError, match="forced block"):
        _check_near_ties(a_max, cfg, first, no_sink, cnt, idx, cnt)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n, first", [(32768 + 37, 0), (131072, 1792)], ids=["32k", "128k-last-chunk"])
def test_fused_selection_on_the_gpu(n, first):
    """bf16, 32/8 heads, head dim 128: the same counts and forced blocks, and where the blocks differ the same
    estimated mass (random keys make every block's score nearly equal at 128k: on the H200 5.6% of the rows of
    the 128k case swapped near-tied blocks)."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 32, n, 128, generator=gen).to("cuda", torch.bfloat16)
    k = torch.randn(1, 8, n, 128, generator=gen).to("cuda", torch.bfloat16)
    cfg = CABConfig(sparsity=0.95)
    qr = q[:, :, first * 64:]
    summ = key_summary(k, 64, cfg.estimator, impl="triton")
    a_max, a_mean = estimate(qr, k, cfg, impl="triton", q_block_offset=first, summary=summ, n_keys=n)
    want_idx, want_cnt = select_from_attention(a_max, a_mean, cfg, impl="triton", q_block_offset=first)
    idx, cnt = estimate_and_select(qr, k, cfg, first, summ, n, impl="triton")
    same = _check_near_ties(a_max, cfg, first, idx, cnt, want_idx, want_cnt)
    assert same > 0.5, same


def test_warm_up_compiles_every_fused_variant(monkeypatch):
    """With CAB_FUSED_SELECT (the default) the engine start launches the fused predictor for every power of two of
    the key blocks up to the engine's longest context, with and without exact rows (its compiled variants)."""
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
    # with a dense threshold (CUDA's 16384 tokens = 256 blocks) the sizes no sparse row can have are not made
    seen.clear()
    assert warmup.warm_fused_select(4, 2, 32, torch.float32, _dev(), cfg, 40, least=33) == 2
    assert sorted(seen) == [(64, False), (64, True)]
    assert warmup._block_counts(2048, 256) == [256, 512, 1024, 2048]
    assert warmup._block_counts(2048, 300) == [512, 1024, 2048]
    assert warmup._block_counts(2048) == warmup._block_counts(2048, 16) == [16 << i for i in range(8)]
    assert warmup._block_counts(300, 256) == [256, 512] and warmup._block_counts(200, 256) == []
