"""ops.select and the policies on top of it: budgets, output format, and what each policy picks.

Picks are checked by the scores of the chosen blocks against a brute-force top-k, never by raw indices, so
ties cannot fail a test falsely.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from conftest import block_mask_of
from cab_vllm.config import POLICIES, CABConfig
from cab_vllm.ops.reference import causal_block_mask
from cab_vllm.ops.select import decode_priority, decode_priority_ref, forced_mask, select_tiered, select_topk
from cab_vllm.policies import rows_only, select_decode_blocks, select_from_attention

SPARSITIES = [0.0, 0.5, 0.9, 0.99]
SINK_LOCAL = [pytest.param(1, 1, id="sink1-local1"), pytest.param(0, 1, id="sink0-local1"),
              pytest.param(2, 3, id="sink2-local3")]


def graphs(b: int, hkv: int, m: int, seed: int = 0, ties: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal row-stochastic (a_max, a_mean) [B, Hkv, M, M]; ties=True quantizes a_max to create many ties."""
    gen = torch.Generator().manual_seed(seed)
    causal = causal_block_mask(m)
    z = torch.randn(b, hkv, m, m, generator=gen).masked_fill(~causal, float("-inf"))
    a_mean = torch.softmax(z, -1)
    a_max = torch.softmax(z + 0.5 * torch.randn(b, hkv, m, m, generator=gen), -1)
    if ties:
        a_max = (a_max * 8).round() / 8
    return a_max, a_mean


def check_format(idx: torch.Tensor, cnt: torch.Tensor, keep: torch.Tensor, sink: int, local: int) -> torch.Tensor:
    """Assert the shared selection format; returns the bool block mask [..., M, M]."""
    m = idx.shape[-2]
    assert idx.dtype == torch.int32 and cnt.dtype == torch.int32
    assert idx.shape[:-1] == cnt.shape
    assert torch.equal(cnt, keep.to(torch.int32).expand_as(cnt)), "counts differ from CABConfig.keep_counts"
    assert idx.shape[-1] == int(keep.max())
    live = torch.arange(idx.shape[-1]) < cnt[..., None]
    assert (idx[~live] == -1).all(), "padding must be -1"
    assert (idx[live] >= 0).all()
    rows = torch.arange(m)[:, None].expand(m, idx.shape[-1])
    assert (idx <= rows).all(), "a non-causal block was selected"
    assert ((idx[..., 1:] > idx[..., :-1]) | ~live[..., 1:]).all(), "indices must be strictly ascending"
    mask = block_mask_of(idx, cnt, m)
    forced = forced_mask(m, sink, local)
    assert (mask | ~forced).all(), "a sink or local block is missing"
    # the hand-written forced pattern: j < sink, or i - local < j <= i
    i, j = torch.arange(m)[:, None], torch.arange(m)[None, :]
    assert torch.equal(forced, ((j < sink) | ((j > i - local) & (j <= i))) & (j <= i))
    return mask


def assert_rest_is_topk(mask: torch.Tensor, must: torch.Tensor, score: torch.Tensor, allowed: torch.Tensor,
                        atol: float = 0.0) -> None:
    """Every row keeps all of `must`, and its other picks have the highest `score` among allowed & ~must
    (compared as sorted score lists, so ties are free)."""
    must = must.expand_as(mask)
    assert (mask | ~must).all(), "a block of a mandatory tier is missing"
    cand = allowed.expand_as(mask) & ~must
    extra = mask & ~must
    assert (extra <= cand).all()
    for r in range(mask.reshape(-1, mask.shape[-1]).shape[0]):
        e = extra.reshape(-1, mask.shape[-1])[r]
        c = cand.reshape(-1, mask.shape[-1])[r]
        s = score.reshape(-1, mask.shape[-1])[r].double()
        got = s[e].sort(descending=True).values
        want = s[c].sort(descending=True).values[: int(e.sum())]
        torch.testing.assert_close(got, want, rtol=0, atol=atol)


# ----------------------------------------------------------------------------------------------------
# budgets
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99])
@pytest.mark.parametrize("sink,local", SINK_LOCAL)
def test_keep_counts_exact_formula(sparsity, sink, local):
    """keep_counts == min(m+1, max(min(m+1, sink+local), ceil((1-s)(m+1)))) in exact rational arithmetic."""
    cfg = CABConfig(sparsity=sparsity, sink_blocks=sink, local_blocks=local)
    m_total = 300
    got = cfg.keep_counts(m_total).tolist()
    dens = 1 - Fraction(str(sparsity))
    for m in range(m_total):
        want = min(m + 1, max(min(m + 1, sink + local), math.ceil(dens * (m + 1))))
        assert got[m] == want, (m, got[m], want)


# ----------------------------------------------------------------------------------------------------
# every policy: format, budget, forced blocks
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sink,local", SINK_LOCAL)
@pytest.mark.parametrize("sparsity", SPARSITIES, ids=lambda s: f"s{s}")
@pytest.mark.parametrize("policy", POLICIES)
def test_policy_format_and_budget(policy, sparsity, sink, local):
    m = 37
    cfg = CABConfig(policy=policy, sparsity=sparsity, sink_blocks=sink, local_blocks=local, curvature_share=0.5)
    a_max, a_mean = graphs(2, 2, m, seed=1)
    idx, cnt = select_from_attention(a_max, a_mean, cfg, impl="torch")
    keep = cfg.replace(sparsity=0.0).keep_counts(m) if policy == "dense" else cfg.keep_counts(m)
    assert idx.shape[:3] == (2, 2, m)
    check_format(idx, cnt, keep, sink, local)


@pytest.mark.parametrize("policy", POLICIES)
def test_sparsity_zero_is_dense(policy):
    m = 23
    a_max, a_mean = graphs(1, 3, m, seed=2)
    cfg = CABConfig(policy=policy, sparsity=0.0, curvature_share=0.5)
    idx, cnt = select_from_attention(a_max, a_mean, cfg, impl="torch")
    mask = block_mask_of(idx, cnt, m)
    assert torch.equal(mask, causal_block_mask(m).expand_as(mask))
    d_idx, d_cnt = select_from_attention(a_max, a_mean, cfg.replace(policy="dense"), impl="torch")
    assert torch.equal(idx, d_idx) and torch.equal(cnt, d_cnt)


def test_dense_ignores_sparsity():
    a_max, a_mean = graphs(1, 1, 10)
    idx, cnt = select_from_attention(a_max, a_mean, CABConfig(policy="dense", sparsity=0.9))
    assert cnt[0, 0].tolist() == list(range(1, 11))


@pytest.mark.parametrize("policy", ["curvature", "cab"])
def test_triton_curvature_gives_same_selection_scores(policy, device):
    """Curvature through the Triton kernel picks blocks with the same -F scores as through the twin."""
    from cab_vllm.ops.curvature import curvature

    m = 45
    a_max, a_mean = graphs(2, 2, m, seed=3)
    cfg = CABConfig(policy=policy, sparsity=0.8, curvature_share=0.5)
    i1, c1 = (x.cpu() for x in select_from_attention(a_max.to(device), a_mean.to(device), cfg, impl="triton"))
    i2, c2 = select_from_attention(a_max, a_mean, cfg, impl="torch")
    assert torch.equal(c1, c2)
    score = -curvature(a_mean, impl="torch")
    m1, m2 = block_mask_of(i1, c1, m), block_mask_of(i2, c2, m)
    for r in range(m1.reshape(-1, m).shape[0]):
        s = score.reshape(-1, m)[r].double()
        fin = torch.isfinite(s)
        a = s[m1.reshape(-1, m)[r] & fin].sort().values
        b = s[m2.reshape(-1, m)[r] & fin].sort().values
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# what each policy picks (scores of the chosen blocks vs brute-force top-k)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ties", [False, True], ids=["no-ties", "ties"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9], ids=lambda s: f"s{s}")
def test_magnitude_keeps_top_estimated_mass(sparsity, ties):
    m = 40
    a_max, a_mean = graphs(2, 2, m, seed=4, ties=ties)
    cfg = CABConfig(policy="magnitude", sparsity=sparsity, sink_blocks=1, local_blocks=2)
    idx, cnt = select_from_attention(a_max, a_mean, cfg)
    mask = check_format(idx, cnt, cfg.keep_counts(m), 1, 2)
    assert_rest_is_topk(mask, forced_mask(m, 1, 2), a_max, causal_block_mask(m))


def test_cab_without_curvature_share_is_magnitude():
    """Default cab (curvature_share=0) on the same estimate ranks exactly like magnitude."""
    m = 40
    a_max, a_mean = graphs(2, 2, m, seed=5, ties=True)
    cfg = CABConfig(policy="cab", sparsity=0.85, curvature_share=0.0)
    mask = block_mask_of(*select_from_attention(a_max, a_mean, cfg), m)
    assert_rest_is_topk(mask, forced_mask(m, 1, 1), a_max, causal_block_mask(m))


def _curvature64(a: torch.Tensor) -> torch.Tensor:
    """F = 4A - rowsum - colsum + 3 A.A in float64 (independent of the library)."""
    a = a.double()
    return 4 * a - a.sum(-1, keepdim=True) - a.sum(-2, keepdim=True) + 3 * (a @ a)


@pytest.mark.parametrize("sparsity", [0.5, 0.9], ids=lambda s: f"s{s}")
def test_curvature_keeps_most_negative_f(sparsity):
    m = 40
    a_max, a_mean = graphs(2, 2, m, seed=6)
    cfg = CABConfig(policy="curvature", sparsity=sparsity)
    idx, cnt = select_from_attention(a_max, a_mean, cfg)
    mask = check_format(idx, cnt, cfg.keep_counts(m), 1, 1)
    assert_rest_is_topk(mask, forced_mask(m, 1, 1), -_curvature64(a_mean), causal_block_mask(m), atol=1e-5)


def test_cab_curvature_share_then_magnitude():
    """cab with curvature_share: round(free * share) most-negative-F blocks first, then the highest a_max."""
    m, share = 40, 0.5
    a_max, a_mean = graphs(1, 2, m, seed=7)
    cfg = CABConfig(policy="cab", sparsity=0.8, curvature_share=share)
    idx, cnt = select_from_attention(a_max, a_mean, cfg)
    mask = check_format(idx, cnt, cfg.keep_counts(m), 1, 1)
    forced = forced_mask(m, 1, 1)
    allowed = causal_block_mask(m)
    keep = cfg.keep_counts(m)
    neg_f = -_curvature64(a_mean)
    curv_pick = torch.zeros_like(mask)
    for h in range(2):
        for i in range(m):
            free = max(0, int(keep[i]) - int(forced[i].sum()))
            n_curv = round(free * share)
            cand = (allowed[i] & ~forced[i]).nonzero().flatten()
            top = cand[neg_f[0, h, i, cand].argsort(descending=True)[:n_curv]]
            curv_pick[0, h, i, top] = True
    # continuous random inputs: the curvature picks are unique, so they must be kept as such
    assert_rest_is_topk(mask, forced | curv_pick, a_max, allowed)


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0], ids=lambda s: f"recent{s}")
def test_h2o_recent_window_then_heavy_hitters(share):
    m = 40
    a_max, a_mean = graphs(1, 2, m, seed=8)
    cfg = CABConfig(policy="h2o", sparsity=0.8, sink_blocks=1, local_blocks=2, h2o_recent_share=share)
    idx, cnt = select_from_attention(a_max, a_mean, cfg)
    mask = check_format(idx, cnt, cfg.keep_counts(m), 1, 2)
    forced = forced_mask(m, 1, 2)
    keep = cfg.keep_counts(m)
    recent = torch.zeros(m, m, dtype=torch.bool)
    for i in range(m):
        n_recent = round(max(0, int(keep[i]) - int(forced[i].sum())) * share)
        recent[i, max(0, i - 2 + 1 - n_recent): i + 1] = True
    acc = a_mean.double().cumsum(-2)  # attention each key block collected from query blocks <= i
    assert_rest_is_topk(mask, forced | recent, acc, causal_block_mask(m), atol=1e-6)


@pytest.mark.parametrize("sink,local", SINK_LOCAL)
def test_streaming_keeps_sink_and_most_recent(sink, local):
    m = 30
    a_max, a_mean = graphs(1, 1, m)
    cfg = CABConfig(policy="streaming", sparsity=0.8, sink_blocks=sink, local_blocks=local)
    idx, cnt = select_from_attention(a_max, a_mean, cfg)
    keep = cfg.keep_counts(m)
    for i in range(m):
        want = set(range(min(sink, i + 1)))
        j = i
        while len(want) < int(keep[i]):
            want.add(j)
            j -= 1
        assert idx[0, 0, i, : cnt[0, 0, i]].tolist() == sorted(want), i


def test_random_is_deterministic_given_seed():
    m = 50
    a_max, a_mean = graphs(2, 2, m)
    cfg = CABConfig(policy="random", sparsity=0.8, seed=123)
    i1, c1 = select_from_attention(a_max, a_mean, cfg)
    i2, c2 = select_from_attention(a_max, a_mean, cfg)
    assert torch.equal(i1, i2) and torch.equal(c1, c2)
    check_format(i1, c1, cfg.keep_counts(m), 1, 1)
    i3, _ = select_from_attention(a_max, a_mean, cfg.replace(seed=124))
    assert not torch.equal(i1, i3), "a different seed should change some pick"
    # the choice ignores the scores
    i4, _ = select_from_attention(a_max.flip(-1), a_mean, cfg)
    assert torch.equal(i1, i4)


# ----------------------------------------------------------------------------------------------------
# row subsets (a chunk's query blocks first .. M-1): row-local policies only
# ----------------------------------------------------------------------------------------------------
ROW_POLICIES = [pytest.param(CABConfig(policy=p, sparsity=0.7), id=p) for p in ("dense", "streaming", "magnitude")] + [
    pytest.param(CABConfig(policy="cab", sparsity=0.7), id="cab")]
SQUARE_POLICIES = [pytest.param(CABConfig(policy=p, sparsity=0.7), id=p) for p in ("curvature", "h2o", "random")] + [
    pytest.param(CABConfig(policy="cab", sparsity=0.7, curvature_share=0.25), id="cab-curvature")]


def test_rows_only_policies():
    assert [rows_only(p.values[0]) for p in ROW_POLICIES] == [True] * len(ROW_POLICIES)
    assert [rows_only(p.values[0]) for p in SQUARE_POLICIES] == [False] * len(SQUARE_POLICIES)


@pytest.mark.parametrize("sink,local", SINK_LOCAL)
@pytest.mark.parametrize("first", [0, 1, 17, 36], ids=lambda f: f"first{f}")
@pytest.mark.parametrize("cfg", ROW_POLICIES)
def test_row_subset_equals_rows_of_the_square(cfg, first, sink, local):
    """select_from_attention on rows first .. M-1 of the estimate gives exactly those rows of the square's
    selection (same indices, counts and K): budgets keep_counts(M)[first:], forced and causal masks sliced."""
    m = 37
    cfg = cfg.replace(sink_blocks=sink, local_blocks=local)
    a_max, a_mean = graphs(2, 3, m, seed=5)
    idx, cnt = select_from_attention(a_max, a_mean, cfg, impl="torch")
    ri, rc = select_from_attention(a_max[:, :, first:].contiguous(), a_mean[:, :, first:].contiguous(), cfg,
                                   impl="torch", q_block_offset=first)
    assert ri.shape == (2, 3, m - first, idx.shape[-1])
    assert torch.equal(ri, idx[:, :, first:]) and torch.equal(rc, cnt[:, :, first:])
    # the format checks of the square hold row by row: causal up to query block first + r, forced blocks kept
    live = torch.arange(ri.shape[-1]) < rc[..., None]
    assert ((ri <= torch.arange(first, m)[:, None]) | ~live).all(), "a non-causal block was selected"
    mask = block_mask_of(ri, rc, m)
    assert (mask | ~forced_mask(m, sink, local, first=first)).all()


def test_row_subset_of_a_row_subset():
    """Rows first .. first + R - 1 that stop short of M - 1 (a general window) are the square's rows too."""
    m, cfg = 20, CABConfig(policy="magnitude", sparsity=0.6, sink_blocks=2, local_blocks=2)
    a_max, a_mean = graphs(1, 2, m, seed=6)
    idx, cnt = select_from_attention(a_max, a_mean, cfg)
    ri, rc = select_from_attention(a_max[:, :, 5:9], a_mean[:, :, 5:9], cfg, q_block_offset=5)
    k = int(cfg.keep_counts(9)[-1])
    assert torch.equal(rc, cnt[:, :, 5:9]) and torch.equal(ri, idx[:, :, 5:9, :k])


@pytest.mark.parametrize("cfg", SQUARE_POLICIES)
def test_row_subset_refused_by_policies_that_need_the_square(cfg):
    a_max, a_mean = graphs(1, 2, 12, seed=7)
    select_from_attention(a_max, a_mean, cfg, impl="torch")  # the square is fine
    with pytest.raises(ValueError, match="full"):
        select_from_attention(a_max[:, :, 4:], a_mean[:, :, 4:], cfg, impl="torch", q_block_offset=4)
    with pytest.raises(ValueError, match="full"):
        select_from_attention(a_max[:, :, :4], a_mean[:, :, :4], cfg, impl="torch")


def test_row_subset_must_fit_the_key_blocks():
    a_max, a_mean = graphs(1, 1, 12, seed=8)
    with pytest.raises(ValueError, match="do not fit"):
        select_from_attention(a_max[:, :, 4:], a_mean[:, :, 4:], CABConfig(), q_block_offset=5)


def test_masks_row_subsets():
    for m, first in [(9, 0), (9, 4), (9, 8)]:
        assert torch.equal(causal_block_mask(m, first=first), causal_block_mask(m)[first:])
        assert torch.equal(forced_mask(m, 2, 3, first=first), forced_mask(m, 2, 3)[first:])
        assert torch.equal(forced_mask(m, 1, 2, first=first, rows=1), forced_mask(m, 1, 2)[first:first + 1])


# ----------------------------------------------------------------------------------------------------
# select_topk / select_tiered directly
# ----------------------------------------------------------------------------------------------------
def test_select_topk_never_picks_minus_inf_and_pads():
    pri = torch.tensor([[[0.5, float("-inf"), float("-inf")],
                         [0.1, 0.9, float("-inf")],
                         [0.3, 0.2, 0.7]]])
    idx, cnt = select_topk(pri, torch.tensor([1, 2, 2]), kmax=3)
    assert idx.tolist() == [[[0, -1, -1], [0, 1, -1], [0, 2, -1]]]
    assert cnt.tolist() == [[1, 2, 2]]
    with pytest.raises(ValueError):
        select_topk(pri, torch.tensor([1, 2]))


def test_select_tiered_masks_win_over_scores():
    m = 6
    score = torch.arange(m, dtype=torch.float32).flip(0).expand(m, m).clone()  # prefers low j
    must = torch.zeros(m, m, dtype=torch.bool)
    must[:, 0] = True
    must[5, 4] = True
    keep = torch.full((m,), 2).clamp(max=torch.arange(1, m + 1))  # never more than the causal blocks
    idx, cnt = select_tiered([must, score], keep, causal_block_mask(m))
    assert idx[5, :2].tolist() == [0, 4]
    assert idx[3, :2].tolist() == [0, 1]
    assert idx[0].tolist() == [0, -1]


def test_select_tiered_nan_scores_do_not_break_causality():
    m = 8
    score = torch.full((m, m), float("nan"))
    idx, cnt = select_tiered([score], torch.full((m,), 3).clamp(max=torch.arange(1, m + 1)), causal_block_mask(m))
    live = torch.arange(idx.shape[-1]) < cnt[..., None]
    assert (idx <= torch.arange(m)[:, None]).all() and (idx[live] >= 0).all()


# ----------------------------------------------------------------------------------------------------
# decode-time selection
# ----------------------------------------------------------------------------------------------------
DECODE_CASES = [pytest.param(8, 2, 64, id="g4-d64"), pytest.param(7, 1, 128, id="g7-d128"),
                pytest.param(3, 3, 64, id="g1-d64")]
SEQ_LENS = [1, 64, 65, 200, 1000]


def _bounds(s, hkv, mmax, d, seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(s, hkv, mmax, d, generator=gen)
    b = torch.randn(s, hkv, mmax, d, generator=gen)
    return torch.minimum(a, b), torch.maximum(a, b)


@pytest.mark.parametrize("hq,hkv,d", DECODE_CASES)
def test_decode_priority_triton_matches_torch(hq, hkv, d, device):
    bs = 64
    mmax = -(-max(SEQ_LENS) // bs)
    q = torch.randn(len(SEQ_LENS), hq, d)
    lo, hi = _bounds(len(SEQ_LENS), hkv, mmax, d, seed=hq)
    sl = torch.tensor(SEQ_LENS, dtype=torch.int32)
    got = decode_priority(q.to(device), lo.to(device), hi.to(device), sl.to(device), bs, 1, 2, impl="triton").cpu()
    want = decode_priority_ref(q, lo, hi, sl, bs, 1, 2)
    assert got.shape == (len(SEQ_LENS), hkv, mmax)
    assert torch.equal(torch.isposinf(got), torch.isposinf(want))
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-5, atol=1e-5)
    # brute force in float64: max over the group of sum_d max(q lo, q hi) / sqrt(D)
    g = hq // hkv
    ub = torch.maximum(q.double().view(-1, hkv, g, 1, d) * lo.double()[:, :, None],
                       q.double().view(-1, hkv, g, 1, d) * hi.double()[:, :, None]).sum(-1).amax(2) / math.sqrt(d)
    torch.testing.assert_close(got[fin].double(), ub[fin], rtol=1e-5, atol=1e-5)
    for s, n in enumerate(SEQ_LENS):  # forced: sink 1 and local 2; nothing past the query's block
        last = (n - 1) // bs
        assert torch.isneginf(got[s, :, last + 1:]).all()
        assert torch.isposinf(got[s, :, 0]).all() and torch.isposinf(got[s, :, max(0, last - 1): last + 1]).all()


@pytest.mark.parametrize("policy", ["cab", "magnitude", "streaming", "random", "dense"])
def test_select_decode_blocks(policy, device):
    bs, hq, hkv, d = 64, 8, 2, 64
    mmax = -(-max(SEQ_LENS) // bs)
    q = torch.randn(len(SEQ_LENS), hq, d)
    lo, hi = _bounds(len(SEQ_LENS), hkv, mmax, d, seed=11)
    sl = torch.tensor(SEQ_LENS, dtype=torch.int32)
    cfg = CABConfig(policy=policy, sparsity=0.7, sink_blocks=1, local_blocks=2)
    dev_args = (q.to(device), lo.to(device), hi.to(device), sl.to(device))
    idx, cnt = (x.cpu() for x in select_decode_blocks(*dev_args, cfg, impl="triton"))
    i2, c2 = select_decode_blocks(q, lo, hi, sl, cfg, impl="torch")
    assert torch.equal(cnt, c2)
    kcfg = cfg.replace(sparsity=0.0) if policy == "dense" else cfg
    pri = decode_priority_ref(q, lo, hi, sl, bs, 1, 2)
    for s, n in enumerate(SEQ_LENS):
        last = (n - 1) // bs
        want_keep = int(kcfg.keep_counts(last + 1)[-1])
        assert cnt[s].tolist() == [want_keep] * hkv
        for h in range(hkv):
            row = idx[s, h, : want_keep].tolist()
            assert row == sorted(set(row)) and all(0 <= j <= last for j in row)
            assert (idx[s, h, want_keep:] == -1).all()
            forced = {0} | {j for j in range(last - 1, last + 1) if j >= 0}
            assert forced <= set(row)
            if policy in ("cab", "magnitude"):
                sc = pri[s, h].double()
                for ii in (idx[s, h, :want_keep], i2[s, h, :want_keep]):
                    got = sc[ii.long()].sort(descending=True).values
                    want = sc[: last + 1].sort(descending=True).values[:want_keep]
                    torch.testing.assert_close(got[torch.isfinite(got)], want[torch.isfinite(want)], rtol=0, atol=1e-5)
            elif policy == "streaming":
                assert row == sorted({0} | set(range(last - want_keep + 2, last + 1))) or want_keep == last + 1
            elif policy == "dense":
                assert row == list(range(last + 1))


@pytest.mark.parametrize("policy", ["h2o", "curvature"])
def test_prefill_only_policies_decode_by_the_bounds_like_cab(policy):
    """CABConfig.decode_scoring: h2o and curvature have no decode rule of their own; off the prompt rule they
    score blocks by the Quest bound, exactly as cab does (the engine routes them to MODE_BOUNDS)."""
    q = torch.randn(3, 4, 64)
    lo, hi = _bounds(3, 2, 6, 64, seed=4)
    sl = torch.tensor([300, 64, 350], dtype=torch.int32)
    cfg = CABConfig(policy=policy, sparsity=0.6, decode_rule="bounds")
    assert cfg.decode_scoring == "bounds" and CABConfig(policy=policy).decode_scoring == "prompt"
    got = select_decode_blocks(q, lo, hi, sl, cfg, impl="torch")
    want = select_decode_blocks(q, lo, hi, sl, cfg.replace(policy="cab"), impl="torch")
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert {CABConfig(policy=p, decode_rule="bounds").decode_scoring for p in POLICIES} == \
        {"all", "recent", "random", "bounds"}


def test_decode_priority_strided_seq_lens_rejected_or_honoured(device):
    """The kernel reads seq_lens with unit stride: a strided view must raise ValueError or be honoured."""
    q = torch.randn(3, 4, 64, device=device)
    lo, hi = (x.to(device) for x in _bounds(3, 2, 5, 64, seed=12))
    sl = torch.tensor([100, 300, 20], dtype=torch.int32, device=device)
    strided = torch.stack([sl, torch.zeros_like(sl)], -1)[:, 0]
    assert torch.equal(strided, sl) and not strided.is_contiguous()
    want = decode_priority_ref(q, lo, hi, sl, 64, 1, 1)
    try:
        got = decode_priority(q, lo, hi, strided, 64, 1, 1, impl="triton")
    except ValueError:
        return
    assert torch.equal(torch.isinf(got), torch.isinf(want)), "strided seq_lens accepted but read wrongly"
