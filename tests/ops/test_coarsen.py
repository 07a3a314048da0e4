"""ops.coarsen: pooling and block-score estimators, Triton (interpreted on CPU) vs the PyTorch twin vs float64
brute force."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import KERNEL_FP32_TOL, TOL, interpreting, make_paged_cache, rel_err, skip_if_interpreted_bf16_dot
from cab_vllm.ops import reference as ref
from cab_vllm.ops.coarsen import (block_logits, estimate_block_attention, estimate_grouped, group_reduce, pool,
                                  sampled_block_attention)

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]

# (N, Hq, Hkv, D, block_size): awkward lengths, GQA ratios 1 / 4 / 7, head dims 64 / 128
SHAPES = [
    pytest.param(1, 2, 2, 64, 64, id="N1-g1-d64"),
    pytest.param(63, 4, 1, 128, 16, id="N63-g4-d128-bs16"),
    pytest.param(97, 7, 1, 64, 64, id="N97-g7-d64"),
    pytest.param(97, 8, 2, 128, 32, id="N97-g4-d128-bs32"),
    pytest.param(70, 4, 2, 80, 16, id="N70-g2-d80-bs16"),
    pytest.param(1000, 2, 1, 64, 64, id="N1000-g2-d64"),
]


def _qk(n, hq, hkv, d, dtype, seed=0, b=1, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n, d, generator=gen).to(device, dtype)
    k = torch.randn(b, hkv, n, d, generator=gen).to(device, dtype)
    return q, k


def _blocks64(x: torch.Tensor, block_size: int) -> list[torch.Tensor]:
    """x [B, H, N, D] -> per-block float64 slices [B, H, len_m, D] (valid tokens only)."""
    return [x[:, :, s: s + block_size].cpu().double() for s in range(0, x.shape[2], block_size)]


# ----------------------------------------------------------------------------------------------------
# pool: Triton vs torch
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,hq,hkv,d,bs", SHAPES)
def test_pool_triton_matches_torch(n, hq, hkv, d, bs, dtype, device):
    _, k = _qk(n, hq, hkv, d, dtype, device=device)
    got = pool(k, bs, max_l2=True, mean=True, bounds=True, impl="triton")
    want = pool(k, bs, max_l2=True, mean=True, bounds=True, impl="torch")
    m = ref.num_blocks(n, bs)
    assert set(got) == {"max_l2", "mean", "lo", "hi"}
    for name in ("max_l2", "lo", "hi"):  # pure selections: bit-exact, in the input dtype
        assert got[name].dtype == dtype and got[name].shape == (1, hkv, m, d)
        assert torch.equal(got[name], want[name]), name
    assert got["mean"].dtype == torch.float32
    torch.testing.assert_close(got["mean"], want["mean"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("estimator", ["bounds", "max_l2", "mean"])
@pytest.mark.parametrize("n,first,page,layout,hkv,d,bs,dtype", [
    pytest.param(200, 0, 16, "plain", 2, 64, 64, torch.float32, id="n200-from0-page16"),
    pytest.param(200, 2, 16, "kv_pair", 2, 64, 64, torch.bfloat16, id="n200-from2-page16-kvpair-bf16"),
    pytest.param(97, 1, 64, "kv_interleaved", 1, 80, 32, torch.float32, id="n97-from1-page64-d80-bs32"),
    pytest.param(1000, 5, 128, "head_major", 2, 64, 64, torch.bfloat16, id="n1000-from5-page128-headmajor"),
    pytest.param(63, 3, 16, "plain", 1, 128, 16, torch.float32, id="n63-last-block-bs16"),
])
def test_key_summary_paged_equals_the_summary_of_the_gathered_keys(estimator, n, first, page, layout, hkv, d, bs,
                                                                   dtype, device):
    """key_summary_paged reads one sequence's keys straight from a paged cache (random page order, NaN in every
    slot holding no token, several cache layouts, pages shorter or longer than a block, a partial last block) and
    writes blocks first .. M-1 into a view of a larger store: the same values as key_summary_ref of those keys
    (bit-exact for the max / min / largest-norm token, fp32-close for the mean), nothing outside the view
    touched."""
    from cab_vllm.ops.coarsen import key_summary_paged

    gen = torch.Generator().manual_seed(n + first)
    k = torch.randn(1, hkv, n, d, generator=gen).to(device, dtype)
    kc, _, bt = make_paged_cache(k, k.clone(), page, layout=layout, seed=first)
    m = ref.num_blocks(n, bs)
    width = 2 * d if estimator == "bounds" else d
    sdt = torch.float32 if estimator == "mean" else dtype
    store = torch.full((2, hkv, m + 2, width), 7.0, dtype=sdt, device=device)  # a slot of a wider store
    view = store[1, :, first:m]
    key_summary_paged(kc, bt[0], n, first, bs, estimator, view, impl="triton")
    want = ref.key_summary_ref(k, bs, estimator)[0, :, first:]
    if estimator == "mean":
        torch.testing.assert_close(view, want, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(view, want.to(sdt))
    untouched = torch.ones_like(store, dtype=torch.bool)
    untouched[1, :, first:m] = False
    assert (store[untouched] == 7.0).all()
    twin = torch.full_like(view, 7.0)
    key_summary_paged(kc, bt[0], n, first, bs, estimator, twin, impl="torch")
    torch.testing.assert_close(twin, view, rtol=1e-6, atol=1e-6)


def test_key_summary_paged_refuses_bad_input(device):
    from cab_vllm.ops.coarsen import key_summary_paged

    k = torch.randn(1, 2, 100, 64).to(device)
    kc, _, bt = make_paged_cache(k, k.clone(), 16)
    out = torch.empty(2, 2, 128, device=device)
    with pytest.raises(ValueError, match="first_block=2 outside the 2 key blocks"):
        key_summary_paged(kc, bt[0], 100, 2, 64, "bounds", out, impl="triton")
    with pytest.raises(ValueError, match=r"out must be \[2, 2, 128\]"):
        key_summary_paged(kc, bt[0], 100, 0, 64, "bounds", out[:, :1], impl="triton")
    with pytest.raises(ValueError, match="contiguous int32 row"):
        key_summary_paged(kc, bt[0].long(), 100, 0, 64, "bounds", out, impl="triton")
    with pytest.raises(ValueError, match="has no key summary"):
        key_summary_paged(kc, bt[0], 100, 0, 64, "topr", out, impl="triton")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,hq,hkv,d,bs", SHAPES)
def test_query_features_of_the_bounds_estimator_in_one_launch(n, hq, hkv, d, bs, dtype, device):
    """The bounds estimator's query features [q+ | q-] of each block's mean come out of the pooling kernel in one
    launch (no clamp or concatenation afterwards): equal to the PyTorch twin's, the positive part never negative,
    the negative part never positive, and their sum the block mean."""
    from cab_vllm.ops.coarsen import query_features

    q, _ = _qk(n, hq, hkv, d, dtype, seed=21, device=device)
    got = query_features(q, bs, "bounds", impl="triton")
    want = query_features(q, bs, "bounds", impl="torch")
    m = ref.num_blocks(n, bs)
    assert got.shape == (1, hq, m, 2 * d) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert (got[..., :d] >= 0).all() and (got[..., d:] <= 0).all()
    torch.testing.assert_close(got[..., :d] + got[..., d:], ref.coarsen_ref(q, bs, "mean"), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("which", ["max_l2", "mean", "bounds"])
def test_pool_single_statistic(which, device):
    """Asking for one statistic returns exactly that one (the kernel's unused outputs are aliased)."""
    _, k = _qk(97, 2, 2, 64, torch.float32, device=device)
    got = pool(k, 64, **{which: True}, impl="triton")
    want = pool(k, 64, **{which: True}, impl="torch")
    assert set(got) == set(want) == ({"lo", "hi"} if which == "bounds" else {which})
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-6)


def test_pool_max_l2_first_on_ties(device):
    """Two tokens of equal norm: the first one is the representative, in both implementations."""
    x = torch.zeros(1, 1, 64, 64, device=device)
    x[0, 0, 5, 0] = 3.0
    x[0, 0, 9, 1] = -3.0  # same norm, later
    x[0, 0, 12, 2] = 1.0
    for impl in ("triton", "torch"):
        rep = pool(x, 64, max_l2=True, impl=impl)["max_l2"][0, 0, 0]
        assert torch.equal(rep, x[0, 0, 5]), impl


# ----------------------------------------------------------------------------------------------------
# reference twins vs float64 brute force
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,bs", [(1, 16), (63, 16), (97, 64), (130, 32)], ids=["N1", "N63", "N97", "N130"])
def test_coarsen_ref_matches_brute_force(n, bs, dtype):
    _, k = _qk(n, 3, 3, 64, dtype, seed=1)
    rep = ref.coarsen_ref(k, bs, "max_l2")
    mean = ref.coarsen_ref(k, bs, "mean")
    lo, hi = ref.coarsen_ref(k, bs, "bounds")
    for m, blk in enumerate(_blocks64(k, bs)):
        norms = blk.pow(2).sum(-1)  # [B, H, len]
        # the representative is a token of the block with the largest norm
        best = norms.amax(-1)
        rn = rep[:, :, m].double().pow(2).sum(-1)
        torch.testing.assert_close(rn, best, rtol=1e-12, atol=0)
        assert ((blk - rep[:, :, m, None].double()).abs().amax(-1) == 0).any(-1).all()
        torch.testing.assert_close(mean[:, :, m].double(), blk.mean(2), rtol=1e-6, atol=1e-6)
        # bounds: elementwise min/max over the valid tokens only (a partial block ignores its padding)
        assert torch.equal(lo[:, :, m].double(), blk.amin(2))
        assert torch.equal(hi[:, :, m].double(), blk.amax(2))


def test_topr_ref_picks_largest_norms():
    _, k = _qk(97, 2, 2, 64, torch.float32, seed=2)
    reps, valid = ref.topr_ref(k, 64, 4)
    assert reps.shape == (1, 2, 2, 4, 64) and valid.all()
    for m, blk in enumerate(_blocks64(k, 64)):
        want = blk.pow(2).sum(-1).topk(4, dim=-1).values  # [B, H, 4] descending
        got = reps[:, :, m].double().pow(2).sum(-1)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    # a block with fewer tokens than r marks the missing representatives invalid
    reps, valid = ref.topr_ref(k[:, :, :66], 64, 4)
    assert valid[:, :, 1].sum(-1).eq(2).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 1), (7, 1)], ids=["g1", "g4", "g7"])
def test_bounds_logits_upper_bound_every_token_score(hq, hkv, dtype):
    """Quest bound: the bounds logit of (i, j) >= q_mean_i . k_t / sqrt(D) for every token t of key block j,
    and it is attained when the key block has one token."""
    n, bs, d = 97, 16, 64
    q, k = _qk(n, hq, hkv, d, dtype, seed=3)
    logits = ref.block_logits_ref(q, k, bs, "bounds").double()
    qm = torch.stack([b.mean(2) for b in _blocks64(q, bs)], 2)  # [B, Hq, M, D] float64
    kx = k.double().repeat_interleave(hq // hkv, 1)
    true = qm @ kx.transpose(-1, -2) / math.sqrt(d)  # [B, Hq, M, N]
    m = ref.num_blocks(n, bs)
    true_max = torch.stack([true[..., j * bs: (j + 1) * bs].amax(-1) for j in range(m)], -1)
    slack = TOL[dtype] * true_max.abs().amax()
    assert (logits >= true_max - slack).all()
    # the last key block has a single token (97 = 6 * 16 + 1): the bound is tight there
    torch.testing.assert_close(logits[..., -1], true_max[..., -1], rtol=TOL[dtype], atol=float(slack))


@pytest.mark.parametrize("estimator", ["max_l2", "mean"])
def test_representative_logits_are_dot_products(estimator):
    q, k = _qk(97, 8, 2, 128, torch.float32, seed=4)
    logits = ref.block_logits_ref(q, k, 32, estimator).double()
    qc = ref.coarsen_ref(q, 32, estimator).double()
    kc = ref.coarsen_ref(k, 32, estimator).double().repeat_interleave(4, 1)
    torch.testing.assert_close(logits, qc @ kc.transpose(-1, -2) / math.sqrt(128), rtol=1e-5, atol=1e-5)


def test_topr_logits_max_over_pairs():
    q, k = _qk(80, 4, 2, 64, torch.float32, seed=5)
    logits = ref.block_logits_ref(q, k, 32, "topr", num_reps=3).double()
    qr, _ = ref.topr_ref(q, 32, 3)
    kr, kv = ref.topr_ref(k, 32, 3)
    for h in range(4):
        for i in range(3):
            for j in range(3):
                kk = kr[0, h // 2, j][kv[0, h // 2, j]].double()
                want = (qr[0, h, i].double() @ kk.T).amax() / 8.0
                assert abs(float(logits[0, h, i, j]) - float(want)) < 1e-5


def test_logits_to_block_attention_weights_by_block_length():
    """Equal logits: each causal key block gets attention proportional to its token count."""
    n, bs = 100, 32  # blocks of 32, 32, 32, 4 tokens
    a = ref.logits_to_block_attention(torch.zeros(1, 1, 4, 4), n, bs)[0, 0].double()
    lens = torch.tensor([32.0, 32, 32, 4], dtype=torch.float64)
    for i in range(4):
        torch.testing.assert_close(a[i, : i + 1], lens[: i + 1] / lens[: i + 1].sum())
        assert (a[i, i + 1:] == 0).all()


# ----------------------------------------------------------------------------------------------------
# block_logits / estimate: Triton vs torch vs float64
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("estimator", ["max_l2", "mean", "bounds"])
@pytest.mark.parametrize("n,hq,hkv,d,bs", SHAPES)
def test_block_logits_triton_matches_torch(n, hq, hkv, d, bs, estimator, dtype, device):
    q, k = _qk(n, hq, hkv, d, dtype, seed=6, device=device)
    got = block_logits(q, k, bs, estimator, impl="triton")
    want = block_logits(q, k, bs, estimator, impl="torch")
    m = ref.num_blocks(n, bs)
    assert got.shape == want.shape == (1, hq, m, m) and got.dtype == torch.float32
    # both compute in fp32 from identical pooled inputs: only summation order (and TF32 on a GPU) differs
    assert rel_err(got, want) < KERNEL_FP32_TOL
    # and both agree with the float64 brute force up to the input dtype's precision
    qd, kd = q.cpu().double(), k.cpu().double()
    if estimator == "bounds":
        qm = torch.stack([b.mean(2) for b in _blocks64(qd, bs)], 2)
        lo = torch.stack([b.amin(2) for b in _blocks64(kd, bs)], 2).repeat_interleave(hq // hkv, 1)
        hi = torch.stack([b.amax(2) for b in _blocks64(kd, bs)], 2).repeat_interleave(hq // hkv, 1)
        brute = torch.maximum(qm[:, :, :, None] * lo[:, :, None], qm[:, :, :, None] * hi[:, :, None]).sum(-1)
    else:
        qc = ref.coarsen_ref(qd, bs, estimator)
        kc = ref.coarsen_ref(kd, bs, estimator).repeat_interleave(hq // hkv, 1)
        brute = qc @ kc.transpose(-1, -2)
    assert rel_err(got, brute / math.sqrt(d)) < max(TOL[dtype], KERNEL_FP32_TOL)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("estimator", ["max_l2", "mean", "bounds", "topr", "sampled"])
@pytest.mark.parametrize("n,hq,hkv,d,bs", [SHAPES[0], SHAPES[2], SHAPES[3]])
def test_estimate_grouped_triton_matches_torch(n, hq, hkv, d, bs, estimator, dtype, device):
    """The fused causal-softmax + group-reduce kernel equals group_reduce of the twin's per-head estimate."""
    if estimator == "sampled":
        skip_if_interpreted_bf16_dot(dtype)
    q, k = _qk(n, hq, hkv, d, dtype, seed=7, device=device)
    gmax, gmean = estimate_grouped(q, k, bs, estimator, impl="triton")
    per_head = estimate_block_attention(q, k, bs, estimator, impl="torch")
    wmax, wmean = group_reduce(per_head, hkv)
    m = ref.num_blocks(n, bs)
    assert gmax.shape == gmean.shape == (1, hkv, m, m)
    tol = 1e-5 if device == "cpu" else 1e-2  # TF32 logits on a GPU, and bf16 dots for sampled there
    torch.testing.assert_close(gmax, wmax, rtol=tol, atol=tol / 10)
    torch.testing.assert_close(gmean, wmean, rtol=tol, atol=tol / 10)
    causal = ref.causal_block_mask(m, device)
    assert (gmean[..., ~causal] == 0).all() and (gmax[..., ~causal] == 0).all()
    torch.testing.assert_close(gmean.sum(-1), torch.ones(1, hkv, m, device=device), rtol=0, atol=1e-5)
    assert (gmax >= gmean - 1e-7).all() and (gmax <= 1 + 1e-6).all()


def test_group_reduce_is_max_and_mean_over_each_group():
    a = torch.rand(2, 6, 5, 5)
    amax, amean = group_reduce(a, 2)
    for kvh in range(2):
        torch.testing.assert_close(amax[:, kvh], a[:, 3 * kvh: 3 * kvh + 3].amax(1))
        torch.testing.assert_close(amean[:, kvh], a[:, 3 * kvh: 3 * kvh + 3].mean(1))


# ----------------------------------------------------------------------------------------------------
# sampled_block_attention: Triton vs torch vs float64
# ----------------------------------------------------------------------------------------------------
def _sampled_brute(q, k, bs, rows, q_blocks):
    """Float64: the last `rows` rows of each listed query block, causal softmax over all keys, mass per key
    block, mean over the rows."""
    b, hq, n, d = q.shape
    kx = k.double().repeat_interleave(hq // k.shape[1], 1)
    m = ref.num_blocks(n, bs)
    out = torch.zeros(b, hq, len(q_blocks), m, dtype=torch.float64)
    for ii, mb in enumerate(q_blocks):
        end = min((mb + 1) * bs, n)
        r0 = max(mb * bs, end - rows)
        for t in range(r0, end):
            s = q[:, :, t].double()[:, :, None] @ kx[:, :, : t + 1].transpose(-1, -2) / math.sqrt(d)
            p = torch.softmax(s[:, :, 0], -1)
            for j in range(m):
                out[:, :, ii, j] += p[..., j * bs: (j + 1) * bs].sum(-1)
        out[:, :, ii] /= end - r0
    return out


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
                                   pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("rows", [1, 4, 16], ids=lambda r: f"rows{r}")
@pytest.mark.parametrize("n,hq,hkv,d,bs", SHAPES)
@pytest.mark.parametrize("one_pass", [True, False], ids=["one_pass", "two_passes"])
def test_sampled_block_attention(n, hq, hkv, d, bs, rows, dtype, one_pass, monkeypatch, device):
    skip_if_interpreted_bf16_dot(dtype)
    _passes(monkeypatch, one_pass)
    q, k = _qk(n, hq, hkv, d, dtype, seed=8, device=device)
    got = sampled_block_attention(q, k, bs, rows, impl="triton")
    want = sampled_block_attention(q, k, bs, rows, impl="torch")
    m = ref.num_blocks(n, bs)
    assert got.shape == (1, hq, m, m)
    atol = TOL[dtype] if dtype != torch.float32 else KERNEL_FP32_TOL
    torch.testing.assert_close(got, want, rtol=0, atol=atol)
    torch.testing.assert_close(got.sum(-1), torch.ones(1, hq, m, device=device), rtol=0, atol=1e-5)
    assert (got[..., ~ref.causal_block_mask(m, device)] == 0).all()
    if n <= 100:  # float64 brute force is a Python loop over rows
        brute = _sampled_brute(q.cpu(), k.cpu(), bs, rows, list(range(m)))
        torch.testing.assert_close(want.cpu().double(), brute, rtol=0, atol=2 * atol)


def _passes(monkeypatch, one_pass: bool, mass_splits: int | None = None) -> None:
    """The exact rows' two ways: one read of the keys (each row's block log-sum-exp kept, then the mass kernel) or
    two (the second pass reads the keys again), chosen by the size of the kept log-sum-exps. mass_splits: the
    split partials the mass kernel merges per load (fewer than the launch's splits: several loads, the last one
    partly empty)."""
    import cab_vllm.ops.coarsen as coarsen

    monkeypatch.setattr(coarsen, "SAMPLED_ONE_PASS_BYTES", 1 << 40 if one_pass else 0)
    if mass_splits is not None:
        monkeypatch.setattr(coarsen, "SAMPLED_MASS_SPLITS", mass_splits)


@pytest.mark.parametrize("tile_rows", [128, 48], ids=lambda t: f"tile{t}")
@pytest.mark.parametrize("one_pass", [True, False], ids=["one_pass", "two_passes"])
def test_sampled_block_attention_splits_a_large_group(tile_rows, one_pass, monkeypatch, device):
    """A GQA group of more (head, row) pairs than one program's tile holds (20 query heads of one KV head x 16
    rows; 64 x 16 overflowed the H200's shared memory) is split over programs, the last one partly empty (20
    heads in programs of 8, or of 2 when the cap, 48 rows, is not a power of two): the same mass as the
    reference, for every head."""
    import cab_vllm.ops.coarsen as coarsen

    monkeypatch.setattr(coarsen, "SAMPLED_TILE_ROWS", tile_rows)
    _passes(monkeypatch, one_pass)
    q, k = _qk(200, 20, 1, 32, torch.float32, seed=10, device=device)
    for rows, qb in ((16, None), (5, torch.tensor([1, 3], device=device))):
        got = sampled_block_attention(q, k, 16, rows, qb, impl="triton")
        want = sampled_block_attention(q, k, 16, rows, qb, impl="torch")
        torch.testing.assert_close(got, want, rtol=0, atol=KERNEL_FP32_TOL)
        assert (got.sum(-1) - 1).abs().max() < 1e-5


@pytest.mark.parametrize("q_blocks", [[62], [0, 31, 62], [5, 5]], ids=["last", "three", "repeated"])
@pytest.mark.parametrize("one_pass", [True, False], ids=["one_pass", "two_passes"])
def test_sampled_block_attention_subset_of_query_blocks(q_blocks, one_pass, monkeypatch, device):
    """A few query blocks over many key blocks: the kernel splits the key range over programs (the exact last
    rows of the cab policy); the result must not depend on the split."""
    _passes(monkeypatch, one_pass, mass_splits=2)
    q, k = _qk(1000, 2, 1, 64, torch.float32, seed=9, device=device)
    qb = torch.tensor(q_blocks, device=device)
    got = sampled_block_attention(q, k, 16, 8, qb, impl="triton")
    want = sampled_block_attention(q, k, 16, 8, qb, impl="torch")
    assert got.shape == (1, 2, len(q_blocks), 63)
    torch.testing.assert_close(got, want, rtol=0, atol=KERNEL_FP32_TOL)
    brute = _sampled_brute(q.cpu(), k.cpu(), 16, 8, q_blocks)
    torch.testing.assert_close(got.cpu().double(), brute, rtol=0, atol=KERNEL_FP32_TOL)


@pytest.mark.parametrize("n,page,layout,q_offset,q_blocks", [
    pytest.param(200, 16, "plain", 0, None, id="n200-page16-all-blocks"),
    pytest.param(1000, 64, "kv_interleaved", 0, [62], id="n1000-page64-last-block"),
    pytest.param(333, 128, "head_major", 250, None, id="n333-page128-chunk-after-prefix"),
    pytest.param(97, 16, "kv_pair", 64, [5, 6], id="n97-kvpair-two-blocks"),
    pytest.param(150, 16, "plain", 0, None, id="n150-two-sequences"),
])
@pytest.mark.parametrize("one_pass", [True, False], ids=["one_pass", "two_passes"])
def test_sampled_block_attention_reads_paged_keys_in_place(n, page, layout, q_offset, q_blocks, one_pass,
                                                           monkeypatch, device):
    """PagedKeys (the keys in a paged cache: random page order, NaN in every slot holding no token, several cache
    layouts, pages shorter and longer than a block, two sequences with their own pages) give the mass the gathered
    keys give, bit for bit (the same products in the same order), for the last rows of every query block, of a
    chunk after a cached prefix and of a few blocks whose key range is split over programs."""
    from cab_vllm.ops.blocks import PagedKeys

    _passes(monkeypatch, one_pass, mass_splits=2)
    gen = torch.Generator().manual_seed(n)
    b = 2 if n == 150 else 1
    q = torch.randn(b, 8, n - q_offset, 64, generator=gen).to(device)
    k = torch.randn(b, 2, n, 64, generator=gen).to(device)
    kc, _, bt = make_paged_cache(k, k.clone(), page, layout=layout, seed=n)
    qb = None if q_blocks is None else torch.tensor(q_blocks, device=device)
    paged = PagedKeys(kc, bt, n)
    assert paged.shape == tuple(k.shape)
    assert torch.equal(paged.gather(), k)
    got = sampled_block_attention(q, paged, 16, 8, qb, impl="triton", q_offset=q_offset)
    want = sampled_block_attention(q, k, 16, 8, qb, impl="triton", q_offset=q_offset)
    assert torch.equal(got, want)
    twin = sampled_block_attention(q, paged, 16, 8, qb, impl="torch", q_offset=q_offset)
    torch.testing.assert_close(twin, want, rtol=0, atol=KERNEL_FP32_TOL)


def test_sampled_block_attention_refuses_bad_paged_keys(device):
    from cab_vllm.ops.blocks import PagedKeys

    q, k = _qk(100, 4, 2, 64, torch.float32, device=device)
    kc, _, bt = make_paged_cache(k, k.clone(), 16)
    for bad in (PagedKeys(kc, bt.long(), 100), PagedKeys(kc, torch.cat([bt, bt]), 100),
                PagedKeys(kc[..., :32], bt, 100)):
        with pytest.raises(ValueError, match="paged keys must be"):
            sampled_block_attention(q, bad, 16, 8, impl="triton")


def test_sampled_rejects_rows_out_of_range():
    q, k = _qk(40, 2, 2, 64, torch.float32)
    for rows in (0, 17):
        with pytest.raises(ValueError, match="rows"):
            sampled_block_attention(q, k, 16, rows, impl="torch")


_OFFSETS_SCRIPT = """
import math, sys, torch
from cab_vllm.ops.coarsen import sampled_block_attention
n, hq, d, bs, rows = 300032, 64, 128, 64, 16
gen = torch.Generator(device="cuda").manual_seed(0)
bnhd = sys.argv[1] == "bnhd"
q = torch.randn((1, n, hq, d) if bnhd else (1, hq, n, d), device="cuda", dtype=torch.bfloat16, generator=gen)
q = q.transpose(1, 2) if bnhd else q
k = torch.randn(1, 1, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
m = n // bs
got = sampled_block_attention(q, k, bs, rows, torch.tensor([m - 1], device="cuda"))[0, :, 0]
s = (q[:, :, n - rows:].float() @ k.float().transpose(-1, -2)) / math.sqrt(d)
pos = torch.arange(n, device="cuda")
s = s.masked_fill(pos[None, :] > pos[n - rows:, None], float("-inf"))
want = torch.softmax(s, -1).view(1, hq, rows, m, bs).sum(-1).mean(2)[0]
print("REL_ERR", float((got - want).norm() / want.norm()), "ROWSUM", float((got.sum(-1) - 1).abs().max()))
"""


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_sampled_block_attention_offsets_past_int32(layout):
    """q with > 2^31 elements (64 heads x 300k tokens x 128, 4.9 GB bf16): the head offset h * stride_h
    (BHND) and the row offset pos * stride_n (BNHD) pass 2^31 and must be computed in int64 (habit 3). The
    last block's exact mass is checked against a direct computation. Runs in a subprocess: an illegal
    address would poison the CUDA context of every later test."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _OFFSETS_SCRIPT, layout], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    fields = res.stdout.split()
    rel, rowsum = float(fields[fields.index("REL_ERR") + 1]), float(fields[fields.index("ROWSUM") + 1])
    assert rel < 1e-2 and rowsum < 1e-3, res.stdout


# ----------------------------------------------------------------------------------------------------
# row subsets: a chunk's query blocks first .. M-1 against all N keys (chunked prefill)
# ----------------------------------------------------------------------------------------------------
ROW_IMPLS = ["torch", "triton"]
# (N, nq): the chunk holds the last nq of N tokens, block size 16. The whole prompt (first chunk), a chunk
# starting mid-block, at a block start, one token, a few tokens inside the last block, a last block of one
# token (385 = 24 * 16 + 1)
CHUNKS = [pytest.param(150, 150, id="first"), pytest.param(300, 150, id="mid-block"),
          pytest.param(397, 97, id="last"), pytest.param(397, 237, id="block-start"),
          pytest.param(397, 1, id="nq1"), pytest.param(397, 5, id="nq5"), pytest.param(385, 40, id="tail1")]
GQA = [pytest.param(2, 2, id="g1"), pytest.param(4, 1, id="g4")]


def _chunk(n, nq, hq, hkv, d=32, bs=16, seed=0, device="cpu"):
    """(q_full [1, Hq, N, D]: zero rows for the prefix then the chunk's queries, q_rows: its rows from the start
    of the chunk's first query block, k [1, Hkv, N, D], first)."""
    gen = torch.Generator().manual_seed(seed)
    q_new = torch.randn(1, hq, nq, d, generator=gen)
    k = torch.randn(1, hkv, n, d, generator=gen).to(device)
    q_full = torch.nn.functional.pad(q_new, (0, 0, n - nq, 0)).to(device)
    first = (n - nq) // bs
    return q_full, q_full[:, :, first * bs:].contiguous(), k, first


@pytest.mark.parametrize("impl", ROW_IMPLS)
@pytest.mark.parametrize("hq,hkv", GQA)
@pytest.mark.parametrize("n,nq", CHUNKS)
@pytest.mark.parametrize("estimator", ["max_l2", "mean", "topr", "bounds", "sampled"])
def test_row_estimate_equals_rows_of_the_square(estimator, n, nq, hq, hkv, impl, device):
    """estimate_grouped of the chunk's query blocks (q zero-padded in front to block `first`) equals rows
    first .. M-1 of the full square's estimate (q zero-padded over the whole prefix), same impl (the sampled
    square through the twin: the interpreted kernel is slow on it; test_sampled_block_attention ties the two)."""
    if estimator == "sampled" and impl == "triton" and interpreting() and (n, hq) != (300, 4):
        pytest.skip("interpreted: test_sampled_q_offset_equals_zero_padded_q covers the kernel, one chunk the call")
    bs = 16
    q_full, q_rows, k, first = _chunk(n, nq, hq, hkv, device=device)
    m = ref.num_blocks(n, bs)
    amax, amean = estimate_grouped(q_rows, k, bs, estimator, num_reps=3, sample_rows=5, impl=impl,
                                   q_block_offset=first)
    square_impl = "torch" if estimator == "sampled" and interpreting() else impl
    wmax, wmean = estimate_grouped(q_full, k, bs, estimator, num_reps=3, sample_rows=5, impl=square_impl)
    assert amax.shape == amean.shape == (1, hkv, m - first, m)
    torch.testing.assert_close(amax, wmax[:, :, first:], rtol=KERNEL_FP32_TOL, atol=KERNEL_FP32_TOL / 10)
    torch.testing.assert_close(amean, wmean[:, :, first:], rtol=KERNEL_FP32_TOL, atol=KERNEL_FP32_TOL / 10)
    # causal within the rows: row r sees key blocks 0 .. first + r, and sums to one
    causal = ref.causal_block_mask(m, device, first)
    assert (amean[..., ~causal] == 0).all() and (amean[..., causal] > 0).all()
    torch.testing.assert_close(amean.sum(-1), torch.ones_like(amean[..., 0]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("impl", ROW_IMPLS)
@pytest.mark.parametrize("estimator", ["max_l2", "mean", "topr", "bounds"])
def test_block_logits_rectangular(estimator, impl, device):
    """Logits of Mq query blocks against Mk key blocks: the rows of the square for a block-aligned tail of q."""
    q_full, q_rows, k, first = _chunk(300, 150, 8, 2, device=device)
    got = block_logits(q_rows, k, 16, estimator, num_reps=3, impl=impl)
    want = block_logits(q_full, k, 16, estimator, num_reps=3, impl=impl)
    assert got.shape == (1, 8, 19 - first, 19)
    torch.testing.assert_close(got, want[:, :, first:], rtol=KERNEL_FP32_TOL, atol=KERNEL_FP32_TOL)


def test_logits_to_block_attention_rows():
    """Row r of a row subset is query block first + r: causal up to it, key blocks weighted by the token
    count of the n keys; a shape that does not fit the keys is refused."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 7, 7, generator=gen)
    full = ref.logits_to_block_attention(logits, 100, 16)
    rows = ref.logits_to_block_attention(logits[:, :, 4:], 100, 16, q_block_offset=4)
    torch.testing.assert_close(rows, full[:, :, 4:], rtol=0, atol=0)
    assert (rows[..., 0, 5:] == 0).all() and (rows[..., 0, :5] > 0).all()
    with pytest.raises(ValueError):
        ref.logits_to_block_attention(logits[:, :, 4:], 100, 16, q_block_offset=5)
    with pytest.raises(ValueError):
        ref.logits_to_block_attention(logits, 120, 16)


@pytest.mark.parametrize("impl", ROW_IMPLS)
@pytest.mark.parametrize("hq,hkv", GQA)
@pytest.mark.parametrize("n,nq", [c for c in CHUNKS if c.id not in ("first", "block-start")])  # both: the test above
def test_sampled_q_offset_equals_zero_padded_q(n, nq, hq, hkv, impl, device):
    """sampled_block_attention with q row 0 at position q_offset equals the zero-padded q, also where the
    sampled rows reach into the prefix (zero queries: uniform over their causal keys): the chunk's raw queries
    (q_offset = N - nq, the cab exact rows) and its block-aligned rows (q_offset = first * bs)."""
    if impl == "triton" and interpreting() and hq == hkv:
        pytest.skip("interpreted (slow): GQA 4 covers the kernel")
    bs, rows = 16, 16
    q_full, q_rows, k, first = _chunk(n, nq, hq, hkv, device=device)
    m = ref.num_blocks(n, bs)
    qb = torch.arange(first, m, device=device)
    want = sampled_block_attention(q_full, k, bs, rows, qb, impl="torch" if interpreting() else impl)
    got_rows = sampled_block_attention(q_rows, k, bs, rows, qb, impl=impl, q_offset=first * bs)
    assert got_rows.shape == (1, hq, m - first, m)
    torch.testing.assert_close(got_rows, want, rtol=0, atol=KERNEL_FP32_TOL)
    last = torch.tensor([m - 1], device=device)
    # the raw queries as a view into a NaN-prefixed buffer: a kernel that reads before q_offset poisons its output
    buf = torch.full_like(q_full, float("nan"))
    buf[:, :, n - nq:] = q_full[:, :, n - nq:]
    got_raw = sampled_block_attention(buf[:, :, n - nq:], k, bs, rows, last, impl=impl, q_offset=n - nq)
    torch.testing.assert_close(got_raw, want[:, :, -1:], rtol=0, atol=KERNEL_FP32_TOL)
    # the default query blocks are the ones q reaches
    torch.testing.assert_close(sampled_block_attention(q_rows, k, bs, rows, impl="torch", q_offset=first * bs),
                               want, rtol=0, atol=KERNEL_FP32_TOL)


def test_sampled_q_offset_brute_force():
    """The twin against float64 brute force on the zero-padded q (zero rows inside the sampled rows)."""
    q_full, _, k, _ = _chunk(100, 3, 4, 2, seed=4)
    got = ref.sampled_block_attention_ref(q_full[:, :, 97:], k, 16, 8, torch.tensor([6]), q_offset=97)
    torch.testing.assert_close(got.double(), _sampled_brute(q_full, k, 16, 8, [6]), rtol=0, atol=1e-6)


def test_row_estimate_rejects_misaligned_q():
    q_full, q_rows, k, first = _chunk(300, 150, 2, 2)
    for est in ("bounds", "sampled"):
        with pytest.raises(ValueError, match="must end with"):
            estimate_grouped(q_rows[:, :, 1:], k, 16, est, impl="torch", q_block_offset=first)
        with pytest.raises(ValueError, match="must end with"):
            estimate_grouped(q_rows, k, 16, est, impl="torch", q_block_offset=first + 1)
    with pytest.raises(ValueError, match="must end with"):
        sampled_block_attention(q_rows, k, 16, 4, impl="torch", q_offset=first * 16 + 1)
