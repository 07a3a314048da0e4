"""The per-row budget: the fixed rule (unchanged) and the adaptive top-p rule (config.adaptive_keep_counts) as
select_from_attention, select_blocks and the backend's prefill selection use it.

Adaptive counts are checked against their contract: each window of budget_window query blocks keeps exactly the
fixed rule's total, every row stays within [max(forced, ceil(floor * fixed)), min(m + 1, floor(cap * fixed))], a
row's count depends on its window's rows alone (so chunks of whole windows select as the whole prompt does), the
selection keeps the forced blocks and stays causal, and a head whose estimated mass is concentrated keeps fewer
blocks than a flat one.
"""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

import cab_vllm
from conftest import KERNEL_FP32_TOL, block_mask_of, masked_attention_oracle, rel_err
from cab_vllm.config import ESTIMATED_POLICIES, POLICIES, CABConfig, adaptive_keep_counts
from cab_vllm.ops.reference import causal_block_mask
from cab_vllm.ops.select import forced_mask, select_topk
from cab_vllm.policies import select_from_attention
from test_select import SINK_LOCAL, assert_rest_is_topk, graphs

SIZES = [pytest.param(1, id="M1"), pytest.param(3, id="M3"), pytest.param(37, id="M37")]
SPARSITIES = [0.0, 0.5, 0.8, 0.9, 0.99]


def _digest(*ts: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in ts:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _bounds(cfg: CABConfig, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fixed, lo, hi) [M] int64 of the adaptive rule's documented bounds."""
    fixed = cfg.keep_counts(m)
    m1 = torch.arange(1, m + 1)
    n_forced = torch.clamp(m1, max=cfg.sink_blocks + cfg.local_blocks)
    lo = torch.maximum(n_forced, torch.tensor([math.ceil(f * cfg.budget_floor - 1e-9) for f in fixed.tolist()]))
    hi = torch.minimum(m1, torch.tensor([math.floor(f * cfg.budget_cap + 1e-9) for f in fixed.tolist()]))
    return fixed, lo, hi


def _adaptive(a: torch.Tensor, cfg: CABConfig) -> torch.Tensor:
    m = a.shape[-1]
    forced = forced_mask(m, cfg.sink_blocks, cfg.local_blocks)
    return adaptive_keep_counts(a, causal_block_mask(m), forced, cfg.keep_counts(m), cfg.top_p, cfg.budget_floor,
                                cfg.budget_cap, 0, cfg.budget_window)


def _window_totals(cnt: torch.Tensor, window: int, first: int = 0) -> torch.Tensor:
    """cnt [..., H, R] (rows first .. first + R - 1) summed over heads and each window's rows: [..., windows]."""
    w = (torch.arange(first, first + cnt.shape[-1]) // window) - first // window
    out = torch.zeros(*cnt.shape[:-2], int(w.max()) + 1, dtype=torch.int64)
    return out.index_add_(-1, w, cnt.sum(-2).long())


def _concentrated_and_flat(m: int) -> torch.Tensor:
    """[1, 2, M, M] row-stochastic causal mass: head 0 puts ~all of it on block 0 (streaming-like), head 1 is flat
    (retrieval-like)."""
    allowed = causal_block_mask(m)
    flat = allowed.double() / allowed.sum(-1, keepdim=True)
    conc = torch.full((m, m), 1e-5, dtype=torch.float64).masked_fill(~allowed, 0.0)
    conc[:, 0] = 1.0
    conc = conc / conc.sum(-1, keepdim=True)
    return torch.stack([conc, flat])[None].float()


# ----------------------------------------------------------------------------------------------------
# (a) the fixed budget is unchanged
# ----------------------------------------------------------------------------------------------------
# sha256 of (indices, counts) recorded before the adaptive budget existed (commit 77f9672)
FIXED_DIGESTS = {
    ("cab", 0.5): "ad3c49f8b22fbfee", ("cab", 0.9): "58950c58da75d196",
    ("magnitude", 0.5): "b4f7bed3cf05b6e6", ("magnitude", 0.9): "fbecd8d065ea42bf",
    ("h2o", 0.5): "b8136be505541c93", ("h2o", 0.9): "38182cc9fe420ba2",
    ("curvature", 0.5): "35ad408d4d6388fa", ("curvature", 0.9): "203ad8e44d4cfc06",
    ("streaming", 0.5): "33508af1dd45161e", ("streaming", 0.9): "289b031f75a882b5",
    ("random", 0.5): "c5882178649a987e", ("random", 0.9): "e16bc92e9cdb0b30",
    ("dense", 0.5): "58d5769f5f47d895", ("dense", 0.9): "58d5769f5f47d895",
}


@pytest.mark.parametrize("policy,sparsity", list(FIXED_DIGESTS), ids=[f"{p}-s{s}" for p, s in FIXED_DIGESTS])
def test_fixed_budget_selection_is_byte_identical(policy, sparsity):
    a_max, a_mean = graphs(2, 3, 37, seed=37)
    cfg = CABConfig(policy=policy, sparsity=sparsity, curvature_share=0.3 if policy == "cab" else 0.0)
    assert cfg.budget == "fixed"
    assert _digest(*select_from_attention(a_max, a_mean, cfg, impl="torch")) == FIXED_DIGESTS[(policy, sparsity)]


def test_fixed_budget_select_blocks_is_byte_identical():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 300, 32, generator=gen), torch.randn(1, 2, 300, 32, generator=gen)
    sel = cab_vllm.select_blocks(q, k, CABConfig(block_size=16, sparsity=0.8), impl="torch")
    assert _digest(sel.indices, sel.counts) == "97dda21b0f2273f5"


@pytest.mark.parametrize("policy", [p for p in POLICIES if p not in ESTIMATED_POLICIES])
def test_adaptive_leaves_streaming_random_dense_fixed(policy):
    a_max, a_mean = graphs(2, 2, 37, seed=3)
    cfg = CABConfig(policy=policy, sparsity=0.8)
    assert not cfg.replace(budget="adaptive").adaptive
    i1, c1 = select_from_attention(a_max, a_mean, cfg, impl="torch")
    i2, c2 = select_from_attention(a_max, a_mean, cfg.replace(budget="adaptive"), impl="torch")
    assert torch.equal(i1, i2) and torch.equal(c1, c2)


def test_select_topk_per_row_counts_match_per_query_block_counts():
    """keep [M] and the same counts broadcast to [B, H, M] give the same selection."""
    a_max, _ = graphs(2, 3, 19, seed=4)
    pri = a_max.masked_fill(~causal_block_mask(19), float("-inf"))
    keep = CABConfig(sparsity=0.6).keep_counts(19)
    i1, c1 = select_topk(pri, keep)
    i2, c2 = select_topk(pri, keep.expand(2, 3, 19).contiguous())
    assert torch.equal(i1, i2) and torch.equal(c1, c2)
    with pytest.raises(ValueError, match="keep"):
        select_topk(pri, keep[:5])


# ----------------------------------------------------------------------------------------------------
# (b) the total is the fixed rule's; (c) floor, cap, forced, causal
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sink,local", SINK_LOCAL)
@pytest.mark.parametrize("m", SIZES)
@pytest.mark.parametrize("sparsity", SPARSITIES, ids=lambda s: f"s{s}")
@pytest.mark.parametrize("top_p,floor,cap", [(0.95, 0.25, 4.0), (0.5, 0.0, 8.0), (0.99, 0.5, 1.5), (1.0, 1.0, 1.0)],
                         ids=["p95-f.25-c4", "p50-f0-c8", "p99-f.5-c1.5", "p100-f1-c1"])
@pytest.mark.parametrize("window", [1, 4, 64])
def test_adaptive_counts_total_and_bounds(sparsity, m, sink, local, top_p, floor, cap, window):
    cfg = CABConfig(sparsity=sparsity, sink_blocks=sink, local_blocks=local, budget="adaptive", top_p=top_p,
                    budget_floor=floor, budget_cap=cap, budget_window=window)
    a_max, _ = graphs(3, 4, m, seed=m)
    a_max[1] = _concentrated_and_flat(m).repeat(1, 2, 1, 1)[0]  # sequence 1: two streaming-like, two flat heads
    cnt = _adaptive(a_max, cfg)
    fixed, lo, hi = _bounds(cfg, m)
    assert cnt.dtype == torch.int64 and cnt.shape == (3, 4, m)
    want = _window_totals(4 * fixed[None, None], window)[0]  # the fixed rule's total of each window, 4 heads
    assert torch.equal(_window_totals(cnt, window), want.expand(3, -1)), "each window keeps the fixed total"
    assert (cnt >= lo).all() and (cnt <= hi).all(), "a row left [floor, cap]"
    if floor == cap == 1.0:
        assert torch.equal(cnt, fixed.expand_as(cnt)), "floor = cap = 1 is the fixed rule"


@pytest.mark.parametrize("sink,local", SINK_LOCAL)
@pytest.mark.parametrize("m", SIZES)
@pytest.mark.parametrize("sparsity", [0.5, 0.9], ids=lambda s: f"s{s}")
@pytest.mark.parametrize("policy", ESTIMATED_POLICIES)
def test_adaptive_selection_total_forced_causal(policy, sparsity, m, sink, local):
    cfg = CABConfig(policy=policy, sparsity=sparsity, sink_blocks=sink, local_blocks=local, budget="adaptive",
                    curvature_share=0.3 if policy == "cab" else 0.0)
    a_max, a_mean = graphs(2, 3, m, seed=5 + m)
    idx, cnt = select_from_attention(a_max, a_mean, cfg, impl="torch")
    fixed, lo, hi = _bounds(cfg, m)
    assert idx.dtype == torch.int32 and cnt.dtype == torch.int32 and cnt.shape == (2, 3, m)
    assert torch.equal(cnt.long(), _adaptive(a_max, cfg)), "the selection keeps adaptive_keep_counts on a_max"
    assert torch.equal(cnt.sum(1).long(), 3 * fixed.expand(2, -1)), "each query block keeps the fixed total"
    assert (cnt >= lo).all() and (cnt <= hi).all()
    live = torch.arange(idx.shape[-1]) < cnt[..., None]
    assert (idx[~live] == -1).all() and (idx[live] >= 0).all()
    assert ((idx[..., 1:] > idx[..., :-1]) | ~live[..., 1:]).all(), "indices must be strictly ascending"
    mask = block_mask_of(idx, cnt, m)
    assert torch.equal(mask.sum(-1), cnt.long()), "counts and indices disagree"
    assert (mask <= causal_block_mask(m)).all(), "a non-causal block was selected"
    assert (mask | ~forced_mask(m, sink, local)).all(), "a sink or local block is missing"
    if policy == "magnitude":  # the free picks are still the highest-mass blocks, at the adaptive count
        assert_rest_is_topk(mask, forced_mask(m, sink, local), a_max, causal_block_mask(m))


def test_adaptive_total_per_sequence_not_shared_across_the_batch():
    """A batch of a concentrated and a flat sequence: each keeps its own fixed total (no budget moves across)."""
    m = 37
    cfg = CABConfig(sparsity=0.8, budget="adaptive", policy="magnitude")
    a = _concentrated_and_flat(m).transpose(0, 1)  # [2 sequences, 1 head, M, M]
    _, cnt = select_from_attention(a, a, cfg, impl="torch")
    assert cnt.sum((1, 2)).tolist() == [int(cfg.keep_counts(m).sum())] * 2


# ----------------------------------------------------------------------------------------------------
# (d) concentrated heads keep fewer blocks than flat ones
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9], ids=lambda s: f"s{s}")
@pytest.mark.parametrize("policy", ESTIMATED_POLICIES)
def test_concentrated_head_keeps_fewer_blocks_than_flat_head(policy, sparsity):
    m = 37
    cfg = CABConfig(policy=policy, sparsity=sparsity, budget="adaptive")
    a = _concentrated_and_flat(m)
    _, cnt = select_from_attention(a, a, cfg, impl="torch")
    conc, flat = cnt[0, 0].long(), cnt[0, 1].long()
    fixed, lo, _ = _bounds(cfg, m)
    assert conc.sum() < fixed.sum() < flat.sum()
    assert (conc <= flat).all()
    assert torch.equal(conc, lo), "the concentrated head sits on its floor (its mass is in the sink block)"


@pytest.mark.parametrize("window", [4, 37])
def test_peaked_rows_keep_fewer_blocks_than_flat_rows_of_one_head(window):
    """Within one head and window: query blocks whose mass sits on one block give budget to the flat query blocks
    (with budget_window=1 a single head keeps the fixed count in every block: nothing to move it to)."""
    m = 37
    allowed = causal_block_mask(m)
    a = allowed.float() / allowed.sum(-1, keepdim=True)
    peaked = torch.arange(m) % 2 == 0
    a[peaked] = torch.eye(m)[peaked] * 0.999 + a[peaked] * 0.001  # all mass on the diagonal (local) block
    cfg = CABConfig(sparsity=0.8, budget="adaptive", policy="magnitude", budget_window=window)
    cnt = _adaptive(a[None, None], cfg)[0, 0]
    fixed = cfg.keep_counts(m)
    rows = torch.arange(m) >= 12  # past the first rows, where floor = fixed = forced
    if window == 4:
        rows &= torch.arange(m) < 36  # the last window holds one peaked row alone
    assert (cnt[peaked & rows] < fixed[peaked & rows]).all() and (cnt[~peaked & rows] > fixed[~peaked & rows]).all()
    assert torch.equal(_adaptive(a[None, None], cfg.replace(budget_window=1))[0, 0], fixed)


@pytest.mark.parametrize("window", [1, 3, 8])
@pytest.mark.parametrize("sparsity", [0.5, 0.9], ids=lambda s: f"s{s}")
def test_adaptive_counts_of_whole_windows_do_not_depend_on_the_chunks(window, sparsity):
    """Rows given in chunks of whole windows (what CABScheduler cuts) get the counts the whole prompt's rows get; a
    chunk that ends inside a window splits that window's total over the rows it holds instead."""
    m = 40
    cfg = CABConfig(sparsity=sparsity, budget="adaptive", budget_window=window)
    a_max, _ = graphs(2, 4, m, seed=window)
    allowed = causal_block_mask(m)
    peaked = torch.arange(m) % 2 == 0  # sequence 1: peaked and flat query blocks in turn
    a_max[1] = allowed.float() / allowed.sum(-1, keepdim=True)
    a_max[1, :, peaked] = torch.eye(m)[peaked] * 0.999 + a_max[1, :, peaked] * 0.001
    whole = _adaptive(a_max, cfg)
    forced = forced_mask(m, cfg.sink_blocks, cfg.local_blocks)

    def chunked(ends):
        out, start = [], 0
        for end in ends:
            fixed = cfg.keep_counts(end)[start:]
            out.append(adaptive_keep_counts(a_max[..., start:end, :], allowed[start:end], forced[start:end], fixed,
                                            cfg.top_p, cfg.budget_floor, cfg.budget_cap, start, window))
            start = end
        return torch.cat(out, -1)

    aligned = [e for e in range(window * 2, m, window * 2)] + [m]
    assert torch.equal(chunked(aligned), whole)
    if window > 1:  # cut one row into the last whole window, where the rows keep several blocks each
        cut = (m // window - 1) * window + 1
        assert not torch.equal(chunked([cut, m]), whole), "a cut inside a window moved no block"


# ----------------------------------------------------------------------------------------------------
# end to end: the public API and the backend's prefill selection carry per-head counts
# ----------------------------------------------------------------------------------------------------
def test_select_blocks_adaptive_attention_triton_vs_torch_vs_oracle(device):
    b, hq, hkv, n, d, bs = 1, 4, 2, 200, 32, 16
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(b, h, n, d, generator=gen).to(device) for h in (hq, hkv, hkv))
    cfg = CABConfig(block_size=bs, sparsity=0.7, budget="adaptive", exact_rows=8)
    sel = cab_vllm.select_blocks(q, k, cfg, impl="torch")
    m = sel.num_blocks
    assert int(sel.counts.sum()) == hkv * int(cfg.keep_counts(m).sum())
    assert abs(sel.density() - cfg.replace(budget="fixed").keep_counts(m).sum().item() / (m * (m + 1) / 2)) < 1e-12
    o_tri = cab_vllm.sparse_attention(q, k, v, sel, impl="triton")
    o_ref = cab_vllm.sparse_attention(q, k, v, sel, impl="torch")
    bm = block_mask_of(sel.indices.cpu(), sel.counts.cpu(), m)[0]
    pos = torch.arange(n)
    allowed = bm[:, pos // bs][:, :, pos // bs] & (pos[None, :] <= pos[:, None])
    oracle, _ = masked_attention_oracle(q[0], k[0], v[0], allowed.repeat_interleave(hq // hkv, 0), 1 / math.sqrt(d))
    assert rel_err(o_tri[0], oracle) < KERNEL_FP32_TOL and rel_err(o_ref[0], oracle) < 1e-5


def test_backend_prefill_selection_adaptive_keeps_the_fixed_total():
    from cab_vllm.backend.attention import prefill_selection

    hq, hkv, n, d, bs = 4, 2, 300, 32, 16
    gen = torch.Generator().manual_seed(8)
    q, k = torch.randn(hq, n, d, generator=gen), torch.randn(hkv, n, d, generator=gen)
    cfg = CABConfig(block_size=bs, sparsity=0.8, budget="adaptive")
    idx, cnt, first = prefill_selection(q, k, cfg, impl="torch")
    m = -(-n // bs)
    assert first == 0 and cnt.shape == (m, hkv)
    assert int(cnt.sum()) == hkv * int(cfg.keep_counts(m).sum())
    # a chunk (rows_only policy): its rows keep the fixed total of those rows
    idx_c, cnt_c, first_c = prefill_selection(q[:, 200:], k, cfg, impl="torch")
    assert first_c == 200 // bs and cnt_c.shape == (m - first_c, hkv)
    assert int(cnt_c.sum()) == hkv * int(cfg.keep_counts(m)[first_c:].sum())


# ----------------------------------------------------------------------------------------------------
# (e) bad values
# ----------------------------------------------------------------------------------------------------
BAD_FIELDS = [
    ("budget", "topp"), ("budget", None), ("budget", ""),
    ("top_p", 0.0), ("top_p", -0.1), ("top_p", 1.5), ("top_p", float("nan")), ("top_p", True), ("top_p", "0.9"),
    ("budget_floor", -0.1), ("budget_floor", 1.5), ("budget_floor", float("inf")), ("budget_floor", None),
    ("budget_cap", 0.5), ("budget_cap", float("inf")), ("budget_cap", False), ("budget_cap", "4"),
    ("budget_window", 0), ("budget_window", -2), ("budget_window", 1.0), ("budget_window", True),
]


@pytest.mark.parametrize("field,value", BAD_FIELDS, ids=[f"{f}={v!r}" for f, v in BAD_FIELDS])
def test_config_rejects_bad_budget_field(field, value):
    with pytest.raises(ValueError, match=rf"CABConfig\.{field}="):
        CABConfig(**{field: value})
    with pytest.raises(ValueError, match=rf"CABConfig\.{field}="):
        CABConfig(budget="adaptive").replace(**{field: value})


def test_adaptive_keep_counts_rejects_mismatched_shapes():
    m = 5
    forced = forced_mask(m, 1, 1)
    with pytest.raises(ValueError, match="adaptive_keep_counts"):
        adaptive_keep_counts(torch.rand(2, m, m + 1), causal_block_mask(m), forced, torch.ones(m, dtype=torch.long),
                             0.9, 0.25, 4.0)
    with pytest.raises(ValueError, match="adaptive_keep_counts"):
        adaptive_keep_counts(torch.rand(2, m, m), causal_block_mask(m), forced, torch.ones(m - 1, dtype=torch.long),
                             0.9, 0.25, 4.0)


def test_adaptive_keep_counts_rejects_a_bad_window():
    m = 5
    args = (torch.rand(2, m, m), causal_block_mask(m), forced_mask(m, 1, 1), torch.ones(m, dtype=torch.long), 0.9,
            0.25, 4.0)
    for first, window in [(0, 0), (0, -1), (0, True), (0, 2.0), (-1, 1)]:
        with pytest.raises(ValueError, match="window must be an integer >= 1"):
            adaptive_keep_counts(*args, first, window)


def test_adaptive_keep_counts_empty_rows_and_heads():
    m = 4
    allowed, forced = causal_block_mask(m), forced_mask(m, 1, 1)
    fixed = CABConfig(sparsity=0.5).keep_counts(m)
    assert adaptive_keep_counts(torch.rand(1, 0, m, m), allowed, forced, fixed, 0.9, 0.25, 4.0).shape == (1, 0, m)
    empty = torch.zeros(0, m, dtype=torch.bool)
    got = adaptive_keep_counts(torch.rand(1, 2, 0, m), empty, empty, fixed[:0], 0.9, 0.25, 4.0)
    assert got.shape == (1, 2, 0) and got.dtype == torch.int64


@pytest.mark.parametrize("n", [1, 2, 7, 64, 300])
def test_budget_multiplier_is_the_smallest_that_meets_the_total(n):
    """_budget_multiplier solves sum(clamp(lam * c, lo, hi)) >= total exactly: the sum at lam reaches the total and
    any smaller multiplier falls short (or every row is already at its floor)."""
    from cab_vllm.config import _budget_multiplier

    gen = torch.Generator().manual_seed(n)
    for _ in range(20):
        c = torch.randint(1, 40, (3, n), generator=gen).double()
        lo = torch.randint(0, 5, (n,), generator=gen).double()
        hi = lo + torch.randint(0, 30, (n,), generator=gen).double()
        w = torch.rand(3, generator=gen).double()
        total = lo.sum() + w * (hi.sum() - lo.sum())  # feasible: sum(lo) <= total <= sum(hi)
        lam = _budget_multiplier(c, lo, hi, total)

        def f(x):
            return torch.minimum(torch.maximum(x[:, None] * c, lo), hi).sum(-1)

        assert (f(lam) >= total - 1e-6).all()
        below = f(lam * (1 - 1e-7) - 1e-12)
        assert ((below < total) | (f(torch.zeros(3, dtype=torch.float64)) >= total - 1e-9)).all()


@pytest.mark.parametrize("sink,local", SINK_LOCAL)
@pytest.mark.parametrize("sparsity", SPARSITIES, ids=lambda s: f"s{s}")
@pytest.mark.parametrize("cap", [1.0, 1.5, 4.0, 8.0])
def test_max_keep_bounds_every_count_from_the_host(sparsity, sink, local, cap):
    """policies.max_keep (the selection's top-k width, known without a device sync) is the fixed rule's largest
    count of the rows, and never below an adaptive count: a narrower top-k would drop blocks silently."""
    from cab_vllm.policies import max_keep

    m = 37
    for budget in ("fixed", "adaptive"):
        cfg = CABConfig(sparsity=sparsity, sink_blocks=sink, local_blocks=local, budget=budget, budget_cap=cap)
        a_max, _ = graphs(2, 4, m, seed=int(cap * 10) + sink)
        a_max[1] = _concentrated_and_flat(m).repeat(1, 2, 1, 1)[0]
        for first, mq in [(0, m), (0, 1), (5, 9), (20, 17), (36, 1)]:
            rows = slice(first, first + mq)
            fixed = cfg.keep_counts(first + mq)[first:]
            if budget == "fixed":
                assert max_keep(cfg, first, mq) == int(fixed.max())
                continue
            allowed = causal_block_mask(m, "cpu")[rows]
            forced = forced_mask(m, sink, local, "cpu", first, mq)
            for window in (1, 4, m):
                cnt = adaptive_keep_counts(a_max[:, :, rows], allowed, forced, fixed, cfg.top_p, cfg.budget_floor,
                                           cap, first, window)
                assert int(cnt.max()) <= max_keep(cfg, first, mq) <= first + mq
    assert max_keep(CABConfig(), 3, 0) == 0


def test_select_topk_refuses_a_width_below_a_host_count():
    pri = torch.randn(2, 5)
    with pytest.raises(ValueError, match="kmax=2 is below the largest count 3"):
        select_topk(pri, torch.tensor([3, 1]), kmax=2)
    idx, cnt = select_topk(pri, torch.tensor([3, 1]), kmax=4)  # wider than needed: the same blocks
    ref_idx, ref_cnt = select_topk(pri, torch.tensor([3, 1]))
    assert torch.equal(cnt, ref_cnt) and torch.equal(idx[:, :3], ref_idx) and (idx[:, 3] == -1).all()
