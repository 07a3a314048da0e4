"""CPU tests of the backend's planning and kernel path, without vLLM (cab_vllm.backend.plan and .attention)."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

import cab_vllm.backend.attention as attention
from backend_harness import PagedSim, check_step, dense_rows, rel_err
from conftest import KERNEL_FP32_TOL, assert_same_selection
from cab_vllm.api import select_blocks
from cab_vllm.backend.plan import (METRICS, EngineSettings, plan_batch, request_config, route_rows,
                                   validate_request_args)
from cab_vllm.backend.attention import prefill_selection
from cab_vllm.config import CABConfig
from cab_vllm.ops.decode import MODE_ALL, MODE_BOUNDS, MODE_RANDOM, MODE_RECENT, MODE_SKIP
from cab_vllm.ops.reference import num_blocks
from cab_vllm.policies import estimate, select_from_attention


# -- knobs ----------------------------------------------------------------------------------------------------
def test_settings_from_env_defaults_and_overrides():
    s = EngineSettings.from_env({})
    assert s.cfg == CABConfig() and s.dense_threshold == 1024 and s.impl == "auto"
    s = EngineSettings.from_env({"CAB_SPARSITY": "0.5", "CAB_POLICY": "streaming", "CAB_BLOCK_SIZE": "32",
                                 "CAB_DENSE_THRESHOLD": "0", "CAB_IMPL": "torch"})
    assert (s.cfg.sparsity, s.cfg.policy, s.cfg.block_size, s.dense_threshold, s.impl) == \
        (0.5, "streaming", 32, 0, "torch")
    assert EngineSettings.from_env({"CAB_DENSE_LAYERS": "2"}).cfg.dense_layers == 2


def test_kernel_options_from_env():
    from cab_vllm.backend.plan import KernelOptions

    assert EngineSettings.from_env({}).kernels == KernelOptions() == KernelOptions(True, None)
    k = EngineSettings.from_env({"CAB_FUSED_SELECT": "1", "CAB_DECODE_ONE_LAUNCH_ROWS": "0"}).kernels
    assert k == KernelOptions(fused_select=True, one_launch_rows=0)
    k = EngineSettings.from_env({"CAB_FUSED_SELECT": "0", "CAB_DECODE_ONE_LAUNCH_ROWS": "8"}).kernels
    assert k == KernelOptions(fused_select=False, one_launch_rows=8)
    assert EngineSettings.from_env({"CAB_GRAPH_BRANCHES": "1"}).kernels == KernelOptions(graph_branches=True)
    assert EngineSettings.from_env({"CAB_GRAPH_BRANCHES": "1", "CAB_FUSED_SELECT": "0"}).kernels == \
        KernelOptions(fused_select=False, graph_branches=True)
    assert EngineSettings.from_env({"CAB_GRAPH_BRANCHES": "0"}).kernels == KernelOptions()
    assert EngineSettings.from_env({"CAB_DENSE_DECODE": "1"}).kernels == KernelOptions(dense_decode=True)
    # dense decode rows in CAB's kernel by default, unless the decode graph branches around FlashAttention
    assert KernelOptions().dense_decode is True and EngineSettings.from_env({}).kernels.dense_decode is True
    assert EngineSettings.from_env({"CAB_DENSE_DECODE": "0"}).kernels.dense_decode is False
    assert KernelOptions().fa_prefill is None  # where measured faster (backend.fa_prefill_launcher)
    assert EngineSettings.from_env({"CAB_FA_PREFILL": "1"}).kernels == KernelOptions(fa_prefill=True)
    assert EngineSettings.from_env({"CAB_FA_PREFILL": "0"}).kernels == KernelOptions(fa_prefill=False)
    assert KernelOptions().fa_streams is None  # ops.fa_prefill.FA_STREAMS
    assert EngineSettings.from_env({"CAB_FA_STREAMS": "2"}).kernels == KernelOptions(fa_streams=2)
    assert EngineSettings.from_env({"CAB_GRAPH_BRANCHES": "1"}).kernels.dense_decode is False
    assert KernelOptions(graph_branches=True).dense_decode is False
    with pytest.raises(ValueError, match="exclude each other"):
        EngineSettings.from_env({"CAB_DENSE_DECODE": "1", "CAB_GRAPH_BRANCHES": "1"})
    for bad in ({"one_launch_rows": -1}, {"one_launch_rows": True}, {"one_launch_rows": 1.0}, {"fused_select": None},
                {"fused_select": 1}, {"graph_branches": 1}, {"dense_decode": 1}, {"fa_prefill": 1}, {"fa_streams": 0},
                {"fa_streams": True}, {"fa_streams": 2.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            KernelOptions(**bad)
    with pytest.raises(ValueError, match="kernels"):
        EngineSettings(kernels={"fused_select": True})


@pytest.mark.parametrize("env, var", [
    ({"CAB_SPARSITY": "1.5"}, "CAB_SPARSITY"), ({"CAB_SPARSITY": "lots"}, "CAB_SPARSITY"),
    ({"CAB_POLICY": "nope"}, "CAB_POLICY"), ({"CAB_BLOCK_SIZE": "48"}, "CAB_BLOCK_SIZE"),
    ({"CAB_DENSE_THRESHOLD": "-1"}, "CAB_DENSE_THRESHOLD"), ({"CAB_IMPL": "cuda"}, "CAB_IMPL"),
    ({"CAB_FUSED_SELECT": "yes"}, "CAB_FUSED_SELECT"), ({"CAB_FUSED_SELECT": "2"}, "CAB_FUSED_SELECT"),
    ({"CAB_DECODE_ONE_LAUNCH_ROWS": "-2"}, "CAB_DECODE_ONE_LAUNCH_ROWS"),
    ({"CAB_DECODE_ONE_LAUNCH_ROWS": "many"}, "CAB_DECODE_ONE_LAUNCH_ROWS"),
    ({"CAB_GRAPH_BRANCHES": "on"}, "CAB_GRAPH_BRANCHES"), ({"CAB_DENSE_LAYERS": "-1"}, "CAB_DENSE_LAYERS"),
    ({"CAB_DENSE_LAYERS": "two"}, "CAB_DENSE_LAYERS"), ({"CAB_DENSE_DECODE": "yes"}, "CAB_DENSE_DECODE"),
    ({"CAB_FA_PREFILL": "auto"}, "CAB_FA_PREFILL"), ({"CAB_FA_STREAMS": "0"}, "CAB_FA_STREAMS"),
    ({"CAB_FA_STREAMS": "two"}, "CAB_FA_STREAMS"),
], ids=["sparsity-range", "sparsity-type", "policy", "block-size", "threshold", "impl", "fused-word", "fused-number",
        "one-launch-range", "one-launch-type", "graph-branches", "dense-layers-range", "dense-layers-type",
        "dense-decode", "fa-prefill", "fa-streams-range", "fa-streams-type"])
def test_settings_from_env_rejects_bad_values(env, var):
    with pytest.raises(ValueError, match=var):
        EngineSettings.from_env(env)


def test_request_config():
    base = CABConfig(sparsity=0.9)
    assert request_config(base, None) is base
    assert request_config(base, {"other": 1}) == base
    c = request_config(base, {"cab_sparsity": 0.5, "cab_policy": "streaming"})
    assert (c.sparsity, c.policy, c.block_size) == (0.5, "streaming", base.block_size)
    assert request_config(base, {"cab_sparsity": "0.25"}).sparsity == 0.25  # vllm_xargs strings
    for bad in ({"cab_sparsity": 1.0}, {"cab_sparsity": -0.1}, {"cab_sparsity": "half"}, {"cab_sparsity": True},
                {"cab_sparsity": float("nan")}, {"cab_policy": "fast"}, {"cab_policy": 3}):
        with pytest.raises(ValueError, match="cab_"):
            validate_request_args(bad)


def test_plan_batch_split_threshold_and_metrics():
    METRICS.clear()
    cfg = CABConfig(sparsity=0.8)
    # rows: decode at 100 tokens, decode at 5000, prefill of 300 new over 4000, prefill at 50, sparsity-0 prefill
    qsl = [0, 1, 2, 302, 352, 452]
    sl = [100, 5000, 4300, 50, 3000]
    cfgs = [cfg, cfg, cfg, cfg, cfg.replace(sparsity=0.0)]
    p = plan_batch(qsl, sl, cfgs, dense_threshold=1000)
    assert p.decode_rows == [0, 1] and p.prefill_rows == [2, 3, 4]
    assert p.dense == [True, False, False, True, True]
    assert [c.policy for c in p.cfgs] == ["dense", "cab", "cab", "dense", "dense"]
    assert METRICS["decode_dense"] == 1 and METRICS["decode_sparse"] == 1
    assert METRICS["prefill_sparse"] == 1 and METRICS["prefill_dense"] == 2


# -- selection ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["cab", "magnitude", "streaming", "h2o"])
def test_prefill_selection_full_prompt_equals_library(policy):
    torch.manual_seed(1)
    cfg = CABConfig(sparsity=0.7, policy=policy)
    q, k = torch.randn(1, 6, 700, 64), torch.randn(1, 2, 700, 64)
    idx, cnt, first = prefill_selection(q[0], k[0], cfg)
    sel = select_blocks(q, k, cfg)
    assert first == 0
    torch.testing.assert_close(cnt, sel.counts[0].t())
    torch.testing.assert_close(idx, sel.indices[0].transpose(0, 1))


def test_prefill_selection_chunk_rows():
    """A chunk over a cached prefix selects only its own query blocks, each with the configured budget."""
    torch.manual_seed(2)
    cfg = CABConfig(sparsity=0.5)
    k = torch.randn(2, 1000, 64)
    idx, cnt, first = prefill_selection(torch.randn(6, 300, 64), k, cfg)
    assert first == 700 // 64 and idx.shape[0] == 999 // 64 - first + 1
    keep = cfg.keep_counts(999 // 64 + 1)[first:]
    assert torch.equal(cnt.long(), keep[:, None].expand_as(cnt))
    assert bool(((idx <= torch.arange(first, first + idx.shape[0])[:, None, None]) | (idx < 0)).all())


# Triton on these CPU tensors runs interpreted (conftest sets TRITON_INTERPRET=1 when there is no GPU)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
IMPLS = ["torch", "triton"] if INTERPRETED else ["torch"]


# -- chunked prefill: the row path (policies.rows_only) against the full square -------------------------------
def _square_selection(q_new, k_all, cfg, impl):
    """What prefill_selection computed before the row path, for every policy: q zero-padded over the whole
    cached prefix, the [M, M] estimate and selection, rows first..last kept. Returns (indices, counts, first,
    the square's a_max rows [R, Hkv, M] for estimating policies, else None)."""
    nq, (hkv, n) = q_new.shape[1], k_all.shape[:2]
    bs = cfg.block_size
    first, last, m = (n - nq) // bs, (n - 1) // bs, num_blocks(n, bs)
    q = F.pad(q_new, (0, 0, n - nq, 0))[None]
    score = None
    if cfg.policy in ("cab", "curvature", "magnitude", "h2o"):
        a_max, a_mean = estimate(q, k_all[None], cfg, impl=impl)
        score = a_max[0, :, first:].transpose(0, 1)
    else:
        a_max = a_mean = torch.zeros(1, hkv, m, m)
    idx, cnt = select_from_attention(a_max, a_mean, cfg, impl=impl)
    rows = slice(first, last + 1)
    return idx[0, :, rows].transpose(0, 1), cnt[0, :, rows].t(), first, score


# (N, nq), block size 16: a 397-token prompt in chunks of 150 (first, mid-block start, last), a chunk at a block
# start, one token, a few tokens inside the last block, a last block of one token (385 = 24 * 16 + 1)
PREFILL_CHUNKS = [(150, 150), (300, 150), (397, 97), (397, 237), (397, 1), (397, 5), (385, 40)]
TRITON_CHUNKS = [(300, 150), (397, 97), (397, 5), (385, 40)]  # the interpreter is slow: the non-trivial ones
ROW_CFGS = [pytest.param(CABConfig(block_size=16, sparsity=0.7, policy=p, estimator=e), id=f"{p}-{e}")
            for p in ("cab", "magnitude") for e in ("max_l2", "mean", "topr", "bounds", "sampled")] + [
    pytest.param(CABConfig(block_size=16, sparsity=0.7, policy=p), id=p) for p in ("streaming", "dense")]
SQUARE_CFGS = [pytest.param(CABConfig(block_size=16, sparsity=0.7, policy=p), id=p)
               for p in ("curvature", "h2o", "random")] + [
    pytest.param(CABConfig(block_size=16, sparsity=0.7, curvature_share=0.3), id="cab-curvature")]


def _chunk_inputs(n, nq, hq, hkv, seed, d=32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(hq, nq, d, generator=gen), torch.randn(hkv, n, d, generator=gen)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 1)], ids=["g1", "g4"])
@pytest.mark.parametrize("cfg", ROW_CFGS)
def test_prefill_selection_rows_equal_the_square(cfg, hq, hkv, impl):
    """The row path (the chunk's query blocks only; cab with its exact last rows) selects what the full square
    did, chunk by chunk, for every estimator; near-ties of estimates summed in another order may swap (none
    on the CPU). Interpreted Triton (slow): GQA 4 only, fewer chunks, magnitude (cab's estimate without the
    exact rows) with one estimator, and the sampled square through the twin."""
    interpreted = impl == "triton" and INTERPRETED
    if interpreted and (hkv == hq or cfg.policy == "magnitude" and cfg.estimator != "bounds"):
        pytest.skip("interpreted Triton: the GQA-4 cab cases cover the estimators")
    square_impl = "torch" if interpreted and cfg.estimator == "sampled" else impl
    for c, (n, nq) in enumerate(TRITON_CHUNKS if interpreted else PREFILL_CHUNKS):
        q_new, k = _chunk_inputs(n, nq, hq, hkv, seed=c)
        idx, cnt, first = prefill_selection(q_new, k, cfg, impl=impl)
        widx, wcnt, wfirst, score = _square_selection(q_new, k, cfg, square_impl)
        assert first == wfirst == (n - nq) // 16 and idx.shape[0] == (n - 1) // 16 - first + 1
        assert_same_selection(idx, cnt, widx, wcnt, score, atol=KERNEL_FP32_TOL)


@pytest.mark.parametrize("cfg", ROW_CFGS[::5] + ROW_CFGS[-2:] + SQUARE_CFGS)
def test_prefill_selection_takes_the_row_path_only_when_the_policy_allows(cfg, monkeypatch):
    """Row-local policies estimate and select the chunk's R rows only (q padded back to the start of its first
    block); curvature, h2o, random and cab with a curvature share still go through the [M, M] square (q padded
    over the whole prefix) and select exactly what they did; dense needs neither."""
    seen = []

    def spy_estimate(q, k, cfg_, impl="auto", q_block_offset=0, **kw):
        seen.append(("estimate", q.shape[2], q_block_offset))
        return estimate(q, k, cfg_, impl=impl, q_block_offset=q_block_offset, **kw)

    def spy_select(a_max, a_mean, cfg_, impl="auto", q_block_offset=0, **kw):
        seen.append(("select", tuple(a_max.shape[-2:]), q_block_offset))
        return select_from_attention(a_max, a_mean, cfg_, impl=impl, q_block_offset=q_block_offset, **kw)

    monkeypatch.setattr(attention, "estimate", spy_estimate)
    monkeypatch.setattr(attention, "select_from_attention", spy_select)
    n, nq, m = 397, 100, 25
    first = (n - nq) // 16
    q_new, k = _chunk_inputs(n, nq, 4, 2, seed=9)
    idx, cnt, got_first = prefill_selection(q_new, k, cfg, impl="torch")
    estimates = cfg.policy in ("cab", "curvature", "magnitude", "h2o")
    if cfg.policy == "dense":
        want = []
    elif attention.rows_only(cfg):
        want = [("estimate", n - first * 16, first)] * estimates + [("select", (m - first, m), first)]
    else:
        want = [("estimate", n, 0)] * estimates + [("select", (m, m), 0)]
    assert seen == want
    widx, wcnt, wfirst, _ = _square_selection(q_new, k, cfg, "torch")
    assert got_first == wfirst == first
    assert_same_selection(idx, cnt, widx, wcnt)


# -- attention through the paged cache ------------------------------------------------------------------------


def _sim(lens, hq, hkv, d, dtype, page_size, cfg, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda h, n: torch.randn(h, n, d, generator=gen).to(dtype)  # noqa: E731
    return PagedSim([mk(hq, n) for n in lens], [mk(hkv, n) for n in lens], [mk(hkv, n) for n in lens], page_size,
                    cfg, seed=seed)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("page_size", [16, 128], ids=lambda p: f"page{p}")
def test_dense_mixed_batch_matches_reference(impl, page_size):
    """Sparsity 0 (and contexts under the threshold): prefills, a chunked prefill over a cached prefix, and
    decodes in one batch equal dense causal attention."""
    lens = [260, 97, 700, 130]
    hq, hkv, d = 6, 2, 64
    sim = _sim(lens, hq, hkv, d, torch.float32, page_size, CABConfig(sparsity=0.0))
    sim.step([(0, 259), (2, 400), (3, 130)])
    # decodes first (vLLM order), then a new prompt, then the rest of the chunked prefill
    out, _ = sim.step([(0, 1), (1, 97), (2, 300)], dense_threshold=0, impl=impl)
    ref = torch.cat([dense_rows(sim.q, sim.k, sim.v, 0, 259, 260), dense_rows(sim.q, sim.k, sim.v, 1, 0, 97),
                     dense_rows(sim.q, sim.k, sim.v, 2, 400, 700)])
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("page_size", [16, 128], ids=lambda p: f"page{p}")
@pytest.mark.parametrize("hq, hkv", [(6, 2), (4, 4)], ids=["gqa3", "mha"])
def test_attend_dense_is_dense_causal_attention(page_size, hq, hkv):
    """attend_dense (a CAB_DENSE_LAYERS layer without vLLM's FlashAttention): every row of a 90%-sparse step -
    decodes, a new prompt, a chunk over a cached prefix, a row with no new tokens - attends to all its causal keys."""
    lens = [260, 97, 700, 130, 75]
    sim = _sim(lens, hq, hkv, 64, torch.float32, page_size, CABConfig(sparsity=0.9), seed=3)
    sim.step([(0, 259), (2, 400), (3, 130), (4, 75)])
    rows = [(0, 1), (4, 0), (1, 97), (2, 300)]
    q = torch.cat([sim.q[s][:, sim.done[s]: sim.done[s] + n].transpose(0, 1) for s, n in rows])
    _, md = sim.step(rows, dense_threshold=0)
    assert not all(md["plan"].dense)
    out = torch.full_like(q, float("nan"))
    attention.attend_dense(q, sim.key_cache, sim.value_cache, md["block_table"], md["plan"], 0.125, out)
    ref = torch.cat([dense_rows(sim.q, sim.k, sim.v, s, a, b, 0.125) for s, a, b in ((0, 259, 260), (1, 0, 97),
                                                                                      (2, 400, 700))])
    assert rel_err(out, ref) < 1e-5


def test_dense_prefill_rows_on_cpu_run_dense_attention(monkeypatch):
    """On a CPU (no vLLM FlashAttention beside CAB) a step's dense prefill rows - sparsity 0, a context below the
    dense threshold, a chunk over a cached prefix - are plain causal attention (_dense_row), not the sparse path with
    every block kept; the sparse row beside them still goes through run_prefill, alone; the recorded selections
    still cover every prefill row."""
    lens = [700, 300, 900, 260]
    hq, hkv, d = 6, 2, 64
    cfg = CABConfig(sparsity=0.9)
    sim = _sim(lens, hq, hkv, d, torch.float32, 16, cfg, seed=7)
    sim.step([(0, 400)], cfgs=[cfg.replace(sparsity=0.0)], dense_threshold=0)
    ran, dense = [], []
    real_run, real_dense = attention.run_prefill, attention._dense_row
    monkeypatch.setattr(attention, "run_prefill", lambda qp, *a, **kw: (ran.append(qp.shape[0]),
                                                                       real_run(qp, *a, **kw))[1])
    monkeypatch.setattr(attention, "_dense_row", lambda *a: (dense.append(a[5] - a[4]), real_dense(*a))[1])
    rows = [(0, 300), (1, 300), (2, 900), (3, 260)]
    cfgs = [cfg.replace(sparsity=0.0), cfg, cfg, cfg.replace(policy="dense")]
    out, md = sim.step(rows, cfgs=cfgs, dense_threshold=512)
    assert md["plan"].dense == [True, True, False, True]
    assert sorted(dense) == [260, 300, 300] and ran == [900]  # the sparse row alone in the sparse path
    assert len(md["prefill"]) == 4
    ref = torch.cat([dense_rows(sim.q, sim.k, sim.v, s, a, b, 1 / math.sqrt(d))
                     for s, a, b in ((0, 400, 700), (1, 0, 300))])
    assert rel_err(out[:600], ref) < 1e-5
    assert rel_err(out[1500:], dense_rows(sim.q, sim.k, sim.v, 3, 0, 260, 1 / math.sqrt(d))) < 1e-5
    assert check_step(sim, out, md) < 1e-4  # every row, the sparse one against its recorded selection


def test_dense_decode_rows_on_cpu_run_dense_attention(monkeypatch):
    """On a CPU the dense decode rows of a step (sparsity 0, a context below the dense threshold) attend densely to
    their pages (_dense_row, one query each) and the routed decode skips them; the sparse decode row beside them
    still goes through it; the recorded decode selections still list every block of a dense row."""
    import cab_vllm.ops.decode as dec

    lens = [702, 302, 901]  # room for the decode steps below
    hq, hkv, d = 6, 2, 64
    cfg = CABConfig(sparsity=0.9)
    sim = _sim(lens, hq, hkv, d, torch.float32, 16, cfg, seed=8)
    sim.step([(0, 699), (1, 299), (2, 899)], dense_threshold=0)
    dense, routed = [], []
    real_dense, real_routed = attention._dense_row, dec.routed_decode
    monkeypatch.setattr(attention, "_dense_row", lambda *a: (dense.append((a[4], a[5], a[6])), real_dense(*a))[1])
    monkeypatch.setattr(dec, "routed_decode", lambda *a, **kw: (routed.append(a[5].modes[: a[0].shape[0]].tolist()),
                                                                 real_routed(*a, **kw))[1])
    cfgs = [cfg.replace(sparsity=0.0), cfg, cfg]
    out, md = sim.step([(0, 1), (1, 1), (2, 1)], cfgs=cfgs, dense_threshold=512)
    assert md["plan"].dense == [True, True, False]
    assert dense == [(0, 1, 700), (1, 2, 300)]  # one query each, over the whole context
    assert len(routed) == 1 and routed[0][:2] == [dec.MODE_SKIP, dec.MODE_SKIP] and routed[0][2] != dec.MODE_SKIP
    idx, cnt = md["decode"]
    assert cnt[0].tolist() == [num_blocks(700, 64)] * hkv and cnt[1].tolist() == [num_blocks(300, 64)] * hkv
    scale = 1 / math.sqrt(d)
    assert rel_err(out[0:1], dense_rows(sim.q, sim.k, sim.v, 0, 699, 700, scale)) < 1e-5
    assert rel_err(out[1:2], dense_rows(sim.q, sim.k, sim.v, 1, 299, 300, scale)) < 1e-5
    assert check_step(sim, out, md) < 1e-4  # the sparse row against its recorded selection
    dense.clear()
    routed.clear()
    out, md = sim.step([(0, 1), (1, 1)], cfgs=cfgs[:2], dense_threshold=512)  # only dense rows: no routed launch
    assert len(dense) == 2 and routed == []
    assert rel_err(out[1:2], dense_rows(sim.q, sim.k, sim.v, 1, 300, 301, scale)) < 1e-5


@pytest.mark.parametrize("page_size", [16, 64], ids=lambda p: f"page{p}")
def test_sparse_mixed_batch_triton_equals_torch(page_size):
    """Same plan and selection through the Triton tile kernels (interpreted) and the PyTorch path."""
    if not INTERPRETED:
        pytest.skip("needs TRITON_INTERPRET=1 (CPU tensors)")
    lens = [700, 1100, 300]
    hq, hkv, d = 4, 2, 64
    cfg = CABConfig(sparsity=0.5)
    outs = []
    for impl in IMPLS:
        sim = _sim(lens, hq, hkv, d, torch.float32, page_size, cfg, seed=5)
        sim.step([(0, 699), (1, 600)], dense_threshold=0, impl=impl)
        cfgs = [cfg, cfg.replace(sparsity=0.7), cfg.replace(policy="streaming")]
        out, _ = sim.step([(0, 1), (1, 500), (2, 300)], cfgs=cfgs, dense_threshold=0, impl=impl)
        outs.append(out)
    assert rel_err(outs[1], outs[0]) < 1e-5
    assert not torch.isnan(outs[0]).any()


@pytest.mark.parametrize("page_size", [16, 64], ids=lambda p: f"page{p}")
def test_sparse_prefill_through_flash_attention_equals_the_triton_kernel(page_size):
    """The same steps (prompts, a chunk that starts inside a key block, decodes, mixed sparsities and policies) with
    the sparse prefill rows through FlashAttention's paged varlen call (its PyTorch twin here) and through CAB's
    Triton kernel (interpreted): the same selections, the same outputs, and both the attention of the selection."""
    if not INTERPRETED:
        pytest.skip("needs TRITON_INTERPRET=1 (CPU tensors)")
    from conftest import varlen_twin

    lens = [700, 1100, 300]
    cfg = CABConfig(sparsity=0.5)
    outs, recs = [], []
    for fa in (None, (varlen_twin, 3)):
        sim = _sim(lens, 4, 2, 64, torch.float16, page_size, cfg, seed=5)
        sim.step([(0, 699), (1, 600)], dense_threshold=0, impl="triton", fa_prefill=fa)
        cfgs = [cfg, cfg.replace(sparsity=0.7), cfg.replace(policy="streaming")]
        out, md = sim.step([(0, 1), (1, 500), (2, 300)], cfgs=cfgs, dense_threshold=0, impl="triton", fa_prefill=fa)
        assert not torch.isnan(out).any()
        assert check_step(sim, out, md) < 5e-3
        outs.append(out)
        recs.append(md["prefill"])
    for (i0, c0, f0), (i1, c1, f1) in zip(*recs):
        assert f0 == f1 and torch.equal(c0, c1) and torch.equal(i0, i1)
    assert rel_err(outs[1], outs[0]) < 2e-3


def test_decode_equals_last_prefill_row():
    lens = [777]
    cfg = CABConfig(sparsity=0.6, policy="streaming")  # same rule at prefill and decode
    a = _sim(lens, 4, 2, 64, torch.float32, 16, cfg, seed=7)
    a.step([(0, 776)], dense_threshold=0)
    dec, _ = a.step([(0, 1)], dense_threshold=0)
    b = _sim(lens, 4, 2, 64, torch.float32, 16, cfg, seed=7)
    pre, _ = b.step([(0, 777)], dense_threshold=0)
    assert rel_err(dec[0], pre[-1]) < 1e-5


def test_bf16_sparsity_zero_within_dtype_tolerance():
    lens = [500, 90]
    sim = _sim(lens, 6, 2, 64, torch.bfloat16, 16, CABConfig(sparsity=0.0))
    sim.step([(0, 499)])
    out, _ = sim.step([(0, 1), (1, 90)], dense_threshold=0)
    ref = torch.cat([dense_rows(sim.q, sim.k, sim.v, 0, 499, 500), dense_rows(sim.q, sim.k, sim.v, 1, 0, 90)])
    assert rel_err(out, ref) < 2e-2


def test_settings_decode_rule_from_env():
    assert EngineSettings.from_env({"CAB_DECODE_RULE": "prompt"}).cfg.decode_rule == "prompt"
    assert EngineSettings.from_env({}).cfg.decode_rule == "auto"
    assert EngineSettings.from_env({}).cfg.decodes_from_prompt  # auto + cab -> the prompt rule
    assert not CABConfig(policy="magnitude").decodes_from_prompt  # auto + magnitude -> bounds
    assert not CABConfig(decode_rule="bounds").decodes_from_prompt
    with pytest.raises(ValueError, match="CAB_DECODE_RULE"):
        EngineSettings.from_env({"CAB_DECODE_RULE": "sometimes"})


def test_settings_budget_from_env():
    cfg = EngineSettings.from_env({}).cfg
    assert (cfg.budget, cfg.top_p, cfg.budget_floor, cfg.budget_cap, cfg.budget_window) == \
        ("fixed", 0.95, 0.25, 4.0, 1)
    cfg = EngineSettings.from_env({"CAB_BUDGET": "adaptive", "CAB_TOP_P": "0.9", "CAB_BUDGET_FLOOR": "0.5",
                                   "CAB_BUDGET_CAP": "2", "CAB_BUDGET_WINDOW": "16"}).cfg
    assert (cfg.budget, cfg.top_p, cfg.budget_floor, cfg.budget_cap, cfg.budget_window) == \
        ("adaptive", 0.9, 0.5, 2.0, 16) and cfg.adaptive
    for var, raw in [("CAB_BUDGET", "topp"), ("CAB_TOP_P", "0"), ("CAB_TOP_P", "high"), ("CAB_BUDGET_FLOOR", "2"),
                     ("CAB_BUDGET_CAP", "0.5"), ("CAB_BUDGET_WINDOW", "0"), ("CAB_BUDGET_WINDOW", "1.5")]:
        with pytest.raises(ValueError, match=var):
            EngineSettings.from_env({var: raw})


def test_request_config_budget():
    base = CABConfig(sparsity=0.9)
    c = request_config(base, {"cab_budget": "adaptive", "cab_sparsity": 0.8})
    assert (c.budget, c.sparsity, c.top_p) == ("adaptive", 0.8, base.top_p)
    assert request_config(c, {"cab_budget": "fixed"}).budget == "fixed"
    for bad in ({"cab_budget": "topp"}, {"cab_budget": 1}, {"cab_budget": True}):
        with pytest.raises(ValueError, match="cab_budget"):
            validate_request_args(bad)


def test_attention_salt_separates_the_adaptive_budget(monkeypatch):
    from cab_vllm.backend import attention_salt

    for var in ("CAB_BUDGET", "CAB_TOP_P", "CAB_SPARSITY", "CAB_POLICY", "CAB_BUDGET_WINDOW"):
        monkeypatch.delenv(var, raising=False)
    assert attention_salt({"cab_sparsity": 0.5}) == "cab:0.5:cab"  # the fixed budget's salt is unchanged
    assert attention_salt({"cab_budget": "adaptive"}) != attention_salt({"cab_budget": "fixed"})
    # streaming ignores the budget: its KV is the same either way
    assert attention_salt({"cab_budget": "adaptive", "cab_policy": "streaming"}) == \
        attention_salt({"cab_policy": "streaming"})
    monkeypatch.setenv("CAB_BUDGET", "adaptive")
    a = attention_salt(None)
    monkeypatch.setenv("CAB_TOP_P", "0.8")
    b = attention_salt(None)
    monkeypatch.setenv("CAB_BUDGET_WINDOW", "4")  # other windows split other totals: other KV
    assert len({a, b, attention_salt(None)}) == 3


def test_attention_salt_reads_the_engine_defaults_once_per_set_of_values(monkeypatch):
    """The engine's default config behind each request's salt is parsed once per set of CAB_* values: a changed
    value is seen at the next request, a bad one raises every time (nothing cached for it)."""
    import cab_vllm.backend as plugin
    from cab_vllm.backend.plan import EngineSettings

    monkeypatch.setenv("CAB_SPARSITY", "0.7")
    parsed = []
    real = EngineSettings.from_env.__func__
    monkeypatch.setattr(EngineSettings, "from_env", classmethod(lambda cls, *a: parsed.append(1) or real(cls, *a)))
    plugin._defaults.cache_clear()
    assert plugin.attention_salt(None) == plugin.attention_salt(None) == "cab:0.7:cab" and len(parsed) == 1
    monkeypatch.setenv("CAB_SPARSITY", "0.8")
    assert plugin.attention_salt(None) == "cab:0.8:cab" and len(parsed) == 2
    monkeypatch.setenv("CAB_SPARSITY", "lots")
    for _ in range(2):
        with pytest.raises(ValueError, match="CAB_SPARSITY"):
            plugin.attention_salt(None)


def test_the_default_salt_follows_the_variables_after_the_configs_are_dropped(monkeypatch):
    """The engine default's salt is cached per set of CAB_* values: dropping the parsed configs (their cache is
    bounded) and changing a value gives the new value's salt, never one cached for a config since freed."""
    import gc

    import cab_vllm.backend as plugin

    monkeypatch.setenv("CAB_BUDGET", "adaptive")
    monkeypatch.setenv("CAB_SPARSITY", "0.9")
    assert plugin.attention_salt(None).startswith("cab:0.9:cab:adaptive:")
    for value in ("0.7", "0.8", "0.7"):
        plugin._defaults.cache_clear()
        gc.collect()
        monkeypatch.delenv("CAB_BUDGET")
        monkeypatch.setenv("CAB_SPARSITY", value)
        assert plugin.attention_salt(None) == f"cab:{value}:cab"
        monkeypatch.setenv("CAB_BUDGET", "adaptive")
        assert plugin.attention_salt(None).startswith(f"cab:{value}:cab:adaptive:")


def test_attention_salt_separates_prompts_that_run_dense(monkeypatch):
    """A prompt shorter than the dense threshold runs dense, a longer one sparse from its first chunk: the two never
    share prefix-cache pages, whatever their sparsity. The threshold is read with the other CAB_* values."""
    import cab_vllm.backend as plugin

    monkeypatch.setenv("CAB_DENSE_THRESHOLD", "1000")
    monkeypatch.setenv("CAB_SPARSITY", "0.9")
    assert plugin.attention_salt(None, 999) == "cab:0.9:cab:dense-prompt"
    assert plugin.attention_salt(None, 1000) == plugin.attention_salt(None) == "cab:0.9:cab"
    assert plugin.attention_salt({"cab_sparsity": 0.5}, 10) == "cab:0.5:cab:dense-prompt"
    monkeypatch.setenv("CAB_DENSE_THRESHOLD", "0")
    assert plugin.attention_salt(None, 999) == "cab:0.9:cab"


def test_prompt_rows_run_dense_by_their_prompts_length_not_their_chunks():
    """A prompt row is dense when its request's prompt is shorter than the threshold, whatever the chunk's context:
    a long prompt's first chunk of 300 tokens runs sparse, a short prompt's last chunk dense; without the prompt
    length (no runner request ids) the chunk's context decides. Decode rows go by their context."""
    from cab_vllm.backend.stats import dense_reason

    cfg = CABConfig(sparsity=0.9)
    assert dense_reason(cfg, 300, 1000, prompt_len=5000) is None
    assert dense_reason(cfg, 900, 1000, prompt_len=900) == "below_threshold"
    assert dense_reason(cfg, 1000, 1000, prompt_len=1000) is None
    assert dense_reason(cfg, 300, 1000) == "below_threshold" and dense_reason(cfg, 1500, 1000) is None
    assert dense_reason(cfg, 999, 1000, prompt_len=5000, decode=True) == "below_threshold"
    assert dense_reason(cfg, 1200, 1000, prompt_len=900, decode=True) == "prompt_dense"
    p = plan_batch([0, 300, 600], [300, 900], [cfg, cfg], dense_threshold=1000, count=False, req_ids=["a", "b"],
                   prompt_lens=[5000, 900])
    assert p.dense == [False, True]


@pytest.mark.parametrize("policy, rule", [("cab", "prompt"), ("h2o", "prompt"), ("cab", "auto"), ("h2o", "auto")])
def test_prompt_decode_rule_reuses_the_prompts_last_block(policy, rule):
    """decode_rule="prompt": after a chunked prefill, every decode step attends to the blocks the prompt's last
    query block kept plus the blocks after the prompt; the output equals attention restricted to them."""
    torch.manual_seed(3)
    hq, hkv, d, n_prompt, n_dec = 4, 2, 32, 700, 80
    q = [torch.randn(hq, n_prompt + n_dec, d)]
    k = [torch.randn(hkv, n_prompt + n_dec, d)]
    v = [torch.randn(hkv, n_prompt + n_dec, d)]
    cfg = CABConfig(policy=policy, sparsity=0.8, decode_rule=rule)
    sim = PagedSim(q, k, v, page_size=16, cfg=cfg)
    sim.prompt_lens[0] = n_prompt
    _, md = sim.step([(0, 300)])
    assert md["plan"].store == [None]  # the first chunk does not hold the prompt's end: nothing stored
    _, md = sim.step([(0, n_prompt - 300)])  # the prompt's final chunk
    pidx, pcnt, _ = md["prefill"][0]
    last_idx, last_cnt = pidx[-1], pcnt[-1]  # [Hkv, K], [Hkv]: the prompt's last query block
    m_prompt = (n_prompt - 1) // 64 + 1
    assert sim.prompt_slots.stored["req-0"] == m_prompt
    for step in range(n_dec - 1):
        out, md = sim.step([(0, 1)])
        assert rel_err_of(sim, out, md) < 1e-5
        n = n_prompt + step + 1
        m = (n - 1) // 64 + 1
        idx, cnt = md["decode"][0][0], md["decode"][1][0]
        for h in range(hkv):
            got = idx[h, : int(cnt[h])].tolist()
            want = sorted(last_idx[h, : int(last_cnt[h])].tolist() + list(range(m_prompt, m)))
            assert got == want, (step, h)
    sim.finished = {0}  # the engine no longer holds req-0: its entry goes at the next step
    out, md = sim.step([(0, 1)])
    assert "req-0" not in sim.prompt_slots.of and "req-0" not in sim.prompt_slots.stored  # finished requests are dropped


def test_replay_selection_is_the_stored_selection_and_every_later_block():
    from cab_vllm.backend.attention import PromptTable, replay_selection

    t = PromptTable(2, 2, 6, "cpu")
    t.put(1, torch.tensor([[0, 3, 4, -1], [0, 1, 2, 4]]), torch.tensor([3, 4]))
    idx, cnt, first = replay_selection(t, 1, 5, 5, 7)
    assert first == 5 and idx.dtype == cnt.dtype == torch.int32
    got = [[idx[r, h, : cnt[r, h]].tolist() for h in range(2)] for r in range(3)]
    assert got == [[[0, 3, 4, 5], [0, 1, 2, 4, 5]], [[0, 3, 4, 5, 6], [0, 1, 2, 4, 5, 6]],
                   [[0, 3, 4, 5, 6, 7], [0, 1, 2, 4, 5, 6, 7]]]
    assert bool((idx[0, 0, 4:] == -1).all()) and bool((idx[2, 1, 7:] == -1).all())
    idx, cnt, _ = replay_selection(t, 1, 5, 4, 4)  # the prompt's last block, past its end: the stored selection
    assert [idx[0, h, : cnt[0, h]].tolist() for h in range(2)] == [[0, 3, 4], [0, 1, 2, 4]]
    with pytest.raises(ValueError, match="inside the prompt"):
        replay_selection(t, 1, 5, 3, 7)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_preempted_request_replays_its_decode_selections(impl):
    """A preempted request is prefilled again over its prompt and the tokens it had generated: under the prompt rule
    the chunk past the prompt's end keeps, row by row, what those rows kept as decode rows (the stored prompt
    selection and every later block), so its keys and values come out as they did; the same tokens decoded one by
    one and prefilled as one chunk give the same outputs (the prefill through the torch path or the Triton kernel)."""
    _check_replay(impl, "cpu", *((700, 140) if impl == "torch" else (330, 70)))


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_a_preempted_request_replays_its_decode_selections_on_the_gpu(impl):
    """The same on a CUDA device, float32, at a longer prompt, the decode steps through the same implementation as
    the replayed chunk: torch to 1e-4; the compiled Triton kernels multiply in TF32 (10-bit mantissas), so the
    one-row decode and the chunk's tiles round differently, to ~1e-3 (a wrong block would move outputs by ~0.1)."""
    _check_replay(impl, "cuda", 2000, 300, decode_impl=impl,
                  tol=dict(rtol=1e-4, atol=1e-5) if impl == "torch" else dict(rtol=2e-2, atol=5e-3))


def _prefilled_twins(cfg: CABConfig, dev: str, n_prompt: int, n_gen: int, seed: int, chunks: list[int],
                     impl: str, prompt_slots: int | None = None) -> tuple[PagedSim, PagedSim]:
    """Two PagedSims of one random request (4/2 heads, D 32, 16-token pages) with its n_prompt-token prompt prefilled
    in ``chunks`` (the last takes the rest): one to decode its next n_gen tokens, one to recompute them as a chunk.
    prompt_slots: the prompt table's slots (None: the harness's)."""
    from cab_vllm.backend.plan import PromptSlots

    torch.manual_seed(seed)
    hq, hkv, d = 4, 2, 32
    q = [torch.randn(hq, n_prompt + n_gen, d, device=dev)]
    k = [torch.randn(hkv, n_prompt + n_gen, d, device=dev)]
    v = [torch.randn(hkv, n_prompt + n_gen, d, device=dev)]
    twins = PagedSim(q, k, v, page_size=16, cfg=cfg), PagedSim(q, k, v, page_size=16, cfg=cfg)
    for sim in twins:
        if prompt_slots is not None:
            sim.prompt_slots = PromptSlots(prompt_slots)
        sim.prompt_lens[0] = n_prompt
        for c in chunks:
            sim.step([(0, c)], impl=impl)
        sim.step([(0, n_prompt - sum(chunks))], impl=impl)
    return twins


def _check_replay(impl: str, dev: str, n_prompt: int, n_gen: int, decode_impl: str = "auto",
                  tol: dict | None = None) -> None:
    cfg = CABConfig(sparsity=0.8)  # decode_rule "auto": the prompt rule for cab
    decoded, replayed = _prefilled_twins(cfg, dev, n_prompt, n_gen, 6, [128], impl)
    outs = [decoded.step([(0, 1)], impl=decode_impl)[0] for _ in range(n_gen)]
    out, md = replayed.step([(0, n_gen)], impl=impl)
    assert md["plan"].replay == [(replayed.prompt_slots.of["req-0"], (n_prompt - 1) // 64 + 1)]
    assert md["plan"].store == [None] and md["plan"].summary == [None]
    torch.testing.assert_close(out, torch.cat(outs), **(tol or dict(rtol=1e-4, atol=1e-5)))
    assert check_step(replayed, out, md) < (1e-5 if impl == "torch" or dev == "cpu" else 5e-3)


PER_STEP_RULES = [dict(decode_rule="bounds"), dict(decode_rule="tokens"), dict(policy="streaming"),
                  dict(policy="random"), dict(decode_rule="prompt")]  # the last with no free prompt-table slot


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rule", PER_STEP_RULES, ids=lambda kw: "-".join(kw.values()))
def test_a_preempted_request_recomputes_its_tokens_as_decode_rows_under_a_per_step_rule(monkeypatch, impl, rule):
    """Under a per-step decode rule (key bounds, tokens, streaming's recent blocks, random; the prompt rule without a
    stored selection, which decodes by bounds) a preempted request's chunk past its prompt runs row by row as the
    decode rows those tokens were: each row's selection is the one its decode step made and its output the same,
    whatever the chunk's size and where it starts (pieces of 50 rows here, the last one short)."""
    _check_as_decode(monkeypatch, impl, "cpu", rule, *((700, 140) if impl == "torch" else (330, 70)))


@pytest.mark.gpu
@pytest.mark.parametrize("rule", PER_STEP_RULES, ids=lambda kw: "-".join(kw.values()))
def test_a_preempted_request_recomputes_its_tokens_as_decode_rows_on_the_gpu(monkeypatch, rule):
    """The same through the CUDA kernels (Triton, float32), at a longer prompt: the decode steps and the recomputed
    rows run the same kernels, one row or 50 at a time, and select the same blocks head by head; the outputs agree to
    the kernels' TF32 products (10-bit mantissas; on an H200 they differed by up to 1.1e-4, while a wrong block would
    move them by ~0.1)."""
    _check_as_decode(monkeypatch, "auto", "cuda", rule, 3000, 140, tol=dict(rtol=2e-2, atol=2e-3))


def _check_as_decode(monkeypatch, impl: str, dev: str, rule: dict, n_prompt: int, n_gen: int,
                     tol: dict | None = None) -> None:
    monkeypatch.setattr("cab_vllm.backend.plan.AS_DECODE_ROWS", 50)
    cfg = CABConfig(sparsity=0.8, **rule)
    hkv = 2
    decoded, replayed = _prefilled_twins(cfg, dev, n_prompt, n_gen, 8, [], impl,
                                         prompt_slots=0 if cfg.decode_scoring == "prompt" else None)
    steps = [decoded.step([(0, 1)], impl=impl) for _ in range(n_gen)]
    out, md = replayed.step([(0, n_gen)], impl=impl)
    plan = md["plan"]
    pieces = plan.as_decode[0]
    assert [p.num_reqs for p in pieces] == [50] * (n_gen // 50) + [n_gen % 50]
    assert plan.replay == [None] and md["prefill"] == [None]
    mode = dict(tokens=MODE_SKIP, recent=MODE_RECENT, random=MODE_RANDOM).get(cfg.decode_scoring, MODE_BOUNDS)
    assert {m for _, s in steps for m in s["plan"].modes} == {mode}
    assert [p.modes for p in pieces] == [[m for _, s in steps[a:a + p.num_reqs] for m in s["plan"].modes]
                                         for a, p in zip(range(0, n_gen, 50), pieces)]
    assert [t for p in pieces for t in p.tkeep] == [s["plan"].tkeep[0] for _, s in steps]
    if cfg.decode_scoring != "tokens":  # the block rules: each row's blocks, head by head
        got = [(idx[i], cnt[i]) for idx, cnt in md["as_decode"][0] for i in range(idx.shape[0])]
        for (idx, cnt), (_, s) in zip(got, steps, strict=True):
            assert torch.equal(cnt, s["decode"][1][0])
            for h in range(hkv):
                assert torch.equal(idx[h, : cnt[h]], s["decode"][0][0, h, : cnt[h]])
    torch.testing.assert_close(out, torch.cat([o for o, _ in steps]), **(tol or dict(rtol=1e-5, atol=1e-6)))


def test_a_chunk_past_a_short_prompt_runs_its_rows_dense_or_sparse_by_their_own_contexts():
    """A per-step rule decides a decode row by its context, so a preempted request whose answer crossed the dense
    threshold has a recomputed chunk with dense rows, then sparse ones (the prompt rule: dense, by the prompt); a
    chunk wholly below the threshold stays a dense prefill row (vLLM's FlashAttention runs it)."""
    from cab_vllm.backend.stats import Stats

    bounds = CABConfig(sparsity=0.9, decode_rule="bounds")
    p = plan_batch([0, 300], [1200], [bounds], dense_threshold=1000, count=False, prompt_lens=[900])
    assert p.dense == [False]
    (piece,) = p.as_decode[0]
    assert piece.seq_lens == list(range(901, 1201)) and piece.dense == [n < 1000 for n in range(901, 1201)]
    assert plan_batch([0, 300], [1200], [CABConfig(sparsity=0.9)], dense_threshold=1000, count=False,
                      prompt_lens=[900]).dense == [True]  # the prompt rule
    p = plan_batch([0, 50], [950], [bounds], dense_threshold=1000, count=False, prompt_lens=[900])
    assert p.dense == [True] and p.as_decode == [None]
    p = plan_batch([0, 300], [1200], [bounds], dense_threshold=0, count=False, prompt_lens=[1000])  # spans the end
    assert p.as_decode == [None]
    # the metrics count the chunk's query blocks at its rows' share of their contexts' blocks
    p = plan_batch([0, 300], [1200], [bounds], dense_threshold=1000, count=False, prompt_lens=[900])
    route_rows(p, None, fa_dense=False)
    stats = Stats()
    stats.record_plan(p, [bounds], 64, 1000)
    rows = sum(s.keep[i] if not s.dense[i] else (s.seq_lens[i] - 1) // 64 + 1 for s in p.as_decode[0]
               for i in range(s.num_reqs))
    ctx = sum((n - 1) // 64 + 1 for n in range(901, 1201))
    causal = sum(b + 1 for b in range(900 // 64, 1199 // 64 + 1))
    assert stats.totals[("kept", "prefill", "0.90")] == pytest.approx(causal * rows / ctx)
    assert stats.totals[("causal", "prefill", "0.90")] == causal



def test_prompt_decode_rule_after_a_dense_prompt_of_unknown_length_selects_by_bounds():
    torch.manual_seed(4)
    hq, hkv, d = 2, 1, 16
    q, k, v = [torch.randn(hq, 400, d)], [torch.randn(hkv, 400, d)], [torch.randn(hkv, 400, d)]
    cfg = CABConfig(policy="cab", sparsity=0.9, decode_rule="prompt")
    sim = PagedSim(q, k, v, page_size=16, cfg=cfg)
    sim.step([(0, 390)], dense_threshold=391)  # the prompt runs dense (below the threshold)
    assert "req-0" not in sim.prompt_slots.stored
    out, md = sim.step([(0, 1)], dense_threshold=0)  # the decode row is sparse, with no stored prompt selection:
    assert md["plan"].modes == [MODE_BOUNDS]  # it selects by key bounds with its own query (Quest), at the budget
    assert md["decode"][1][0].tolist() == [cfg.keep_counts((391 - 1) // 64 + 1)[-1].item()]
    assert rel_err_of(sim, out, md) < 1e-5


@pytest.mark.parametrize("rule", ["prompt", "bounds"])
def test_a_prompt_below_the_threshold_keeps_decoding_dense_under_the_prompt_rule(rule):
    """The prompt rule keeps what the prompt's last row kept plus every later block; a prompt that ran dense kept
    every block, so its decode steps stay dense past the threshold (counted as prompt_dense). A per-step rule
    (bounds) selects as soon as the context reaches the threshold."""
    from cab_vllm.backend.stats import Stats

    torch.manual_seed(5)
    hq, hkv, d = 2, 1, 16
    q, k, v = [torch.randn(hq, 400, d)], [torch.randn(hkv, 400, d)], [torch.randn(hkv, 400, d)]
    cfg = CABConfig(policy="cab", sparsity=0.9, decode_rule=rule)
    sim = PagedSim(q, k, v, page_size=16, cfg=cfg)
    sim.prompt_lens[0] = 200
    sim.step([(0, 200)], dense_threshold=201)  # the prompt: 200 < 201, dense
    stats = Stats()
    for n in range(201, 205):  # decode contexts 201.. reach the threshold
        out, md = sim.step([(0, 1)], dense_threshold=201)
        plan = md["plan"]
        assert plan.dense == [rule == "prompt"], n
        assert plan.modes == [MODE_ALL if rule == "prompt" else MODE_BOUNDS]
        assert rel_err_of(sim, out, md) < 1e-5
        stats.record_plan(plan, [cfg], 64, 201)  # the requested configs, as the builder passes them
    assert stats.totals[("dense", "decode", "prompt_dense")] == (4 if rule == "prompt" else 0)


def test_plan_batch_decides_a_decode_row_by_its_prompt_only_under_the_prompt_rule():
    cfg = CABConfig(sparsity=0.9, decode_rule="prompt")
    # decode rows at 5000 tokens: prompts of 900 (below 1024), 2000, unknown; then the bounds rule with 900
    cfgs = [cfg, cfg, cfg, cfg.replace(decode_rule="bounds")]
    p = plan_batch([0, 1, 2, 3, 4], [5000] * 4, cfgs, dense_threshold=1024, count=False,
                   prompt_lens=[900, 2000, None, 900])
    assert p.dense == [True, False, False, False]
    # a prefill chunk is decided by its prompt's length, whatever its context: a request preempted after 600 tokens
    # of its answer to a 900-token prompt is prefilled again dense, as its prompt ran and its decode steps did
    p = plan_batch([0, 300], [1500], [cfg], dense_threshold=1024, count=False, prompt_lens=[900])
    assert p.dense == [True]
    with pytest.raises(ValueError, match="prompt lengths"):
        plan_batch([0, 1], [5000], [cfg], dense_threshold=1024, prompt_lens=[900, 900])


def rel_err_of(sim, out, md):
    from backend_harness import check_step

    return check_step(sim, out, md)


def test_without_request_ids_auto_runs_bounds_and_prompt_stops():
    """No request ids from the model runner (one the builder cannot read): the 'auto' default switches the engine to the
    bounds rule; an explicit CAB_DECODE_RULE=prompt stops the start with a message."""
    from types import SimpleNamespace

    from cab_vllm.backend.backend import CABMetadataBuilder

    b = SimpleNamespace(settings=EngineSettings.from_env({}))
    CABMetadataBuilder._no_request_ids(b)
    assert b.settings.cfg.decode_rule == "bounds" and not b.settings.cfg.decodes_from_prompt
    b = SimpleNamespace(settings=EngineSettings.from_env({"CAB_DECODE_RULE": "prompt"}))
    with pytest.raises(RuntimeError, match="VLLM_USE_V2_MODEL_RUNNER=0"):
        CABMetadataBuilder._no_request_ids(b)
    b = SimpleNamespace(settings=EngineSettings.from_env({"CAB_DECODE_RULE": "prompt", "CAB_POLICY": "streaming"}))
    CABMetadataBuilder._no_request_ids(b)  # streaming never uses the prompt rule: nothing to stop
    assert b.settings.cfg.decode_rule == "prompt"


def test_recompute_after_preemption_stores_the_prompts_own_block():
    """A preempted request is prefilled again over its prompt and the tokens it had generated: the stored
    selection is the query block holding the prompt's last token, not the chunk's last block; a full prefix-cache
    hit (a one-token 'prefill' that vLLM schedules as a decode) finds no stored selection and selects by bounds."""
    from cab_vllm.backend.plan import PromptSlots, route_rows
    from cab_vllm.ops.decode import MODE_BOUNDS, MODE_PROMPT

    cfg = CABConfig(sparsity=0.9)
    slots = PromptSlots(2)
    # recompute: prompt of 1000 tokens + 300 generated, in one chunk of 1300
    plan = plan_batch([0, 1300], [1300], [cfg], dense_threshold=0, count=False, req_ids=["r"], prompt_lens=[1000],
                      live=frozenset({"r"}))
    route_rows(plan, slots, fa_dense=True)
    assert plan.store == [(slots.of["r"], (1000 - 1) // 64)] and slots.stored["r"] == (1000 - 1) // 64 + 1
    dec = plan_batch([0, 1], [1301], [cfg], dense_threshold=0, count=False, req_ids=["r"], prompt_lens=[1000],
                     live=frozenset({"r"}))
    route_rows(dec, slots, fa_dense=True)
    assert dec.modes == [MODE_PROMPT] and dec.pblocks == [(1000 - 1) // 64 + 1]
    # a whole-prompt prefix-cache hit: its only computed prompt token arrives as a one-token row
    hit = plan_batch([0, 1], [1000], [cfg], dense_threshold=0, count=False, req_ids=["h"], prompt_lens=[1000],
                     live=frozenset({"r", "h"}))
    route_rows(hit, slots, fa_dense=True)
    assert hit.modes == [MODE_BOUNDS] and hit.keep == [int(cfg.keep_counts((1000 - 1) // 64 + 1)[-1])]


def test_features_the_backend_cannot_honour_stop_the_start():
    from types import SimpleNamespace

    from cab_vllm.backend.backend import _check_engine_features

    ok = SimpleNamespace(speculative_config=None, cache_config=SimpleNamespace(cache_dtype="auto"))
    _check_engine_features(ok)
    _check_engine_features(None)  # no config (unit use): nothing to check
    with pytest.raises(NotImplementedError, match="speculative decoding"):
        _check_engine_features(SimpleNamespace(speculative_config=object(), cache_config=ok.cache_config))
    with pytest.raises(NotImplementedError, match="fp8 KV cache"):
        _check_engine_features(SimpleNamespace(speculative_config=None,
                                               cache_config=SimpleNamespace(cache_dtype="fp8_e4m3")))


def test_prompt_slots_follow_the_engines_internal_request_ids():
    """vLLM makes request ids unique inside the engine (the client's id + a random suffix), so two requests sent
    with one client id are two slots here; a finished request frees only its own slot."""
    from cab_vllm.backend.plan import PromptSlots

    slots = PromptSlots(2)
    a, b = slots.slot("req-7-1a2b3c4d"), slots.slot("req-7-9f8e7d6c")
    assert a is not None and b is not None and a != b
    slots.stored.update({"req-7-1a2b3c4d": 3, "req-7-9f8e7d6c": 5})
    slots.sync(frozenset({"req-7-9f8e7d6c"}))
    assert slots.of == {"req-7-9f8e7d6c": b} and slots.stored == {"req-7-9f8e7d6c": 5}
    assert slots.slot("new") == a  # the freed slot is reused
    assert slots.slot("one-too-many") is None and slots.exhausted == 1  # full: that request decodes by bounds


def test_graph_branches_need_conditional_nodes(monkeypatch):
    """CAB_GRAPH_BRANCHES needs CUDA-graph IF nodes: PyTorch's own (its node methods and its lookup of the graph being
    captured, CUDA 12.4+) or NVIDIA's CUDA Python bindings. Without either the engine start fails naming the
    variable, the torch build and what the bindings lack."""
    import torch

    from cab_vllm.backend import graphs

    class Graph:
        begin_capture_to_if_node = end_capture_to_conditional_node = staticmethod(lambda *a: None)

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(graphs, "_bindings_problem", lambda: "the cuda-bindings package is not installed")
    assert not graphs.conditional_nodes_supported()  # no get_currently_capturing_graph (as in torch 2.11)
    with pytest.raises(ValueError, match=r"CAB_GRAPH_BRANCHES=1 needs CUDA-graph conditional nodes.*torch .* has none"
                                         r".*cuda-bindings package is not installed"):
        graphs.check_supported()
    monkeypatch.setattr(graphs, "_bindings_problem", lambda: None)  # the bindings can build them
    assert graphs.conditional_nodes_supported() and not graphs.native_nodes_supported()
    graphs.check_supported()
    monkeypatch.setattr(graphs, "_bindings_problem", lambda: "no CUDA device")
    Graph.get_currently_capturing_graph = staticmethod(lambda: None)
    assert graphs.native_nodes_supported()
    graphs.check_supported()
    monkeypatch.setattr(torch.version, "cuda", "12.2")
    assert not graphs.native_nodes_supported()
    with pytest.raises(ValueError, match=r"CUDA-graph conditional nodes.*no CUDA device"):
        graphs.check_supported()


def test_graph_branches_outside_a_capture_just_run_and_check_their_flags():
    """Outside a CUDA-graph capture (CPU tensors here) each branch's body simply runs; a flag that is not a
    one-element bool tensor is refused by name."""
    import torch

    from cab_vllm.backend.graphs import graph_branches

    ran = []
    a, b = graph_branches(torch.zeros(1, dtype=torch.bool), torch.ones(1, dtype=torch.bool))
    with a:
        ran.append("a")
    with b:
        ran.append("b")
    assert ran == ["a", "b"]
    for bad in (torch.zeros(1, dtype=torch.int32), torch.zeros(2, dtype=torch.bool)):
        with pytest.raises(ValueError, match="one-element bool"):
            graph_branches(torch.zeros(1, dtype=torch.bool), bad)


def test_graph_branch_bindings_problems_are_named(monkeypatch):
    """What the CUDA Python route lacks, in words: the CUDA build of torch, the package and its version."""
    import sys
    import types

    import torch

    from cab_vllm.backend import graphs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert graphs._bindings_problem() == "no CUDA device"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "12.2")
    assert "12.4+ needed" in graphs._bindings_problem()
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    assert "cuda-bindings package is not installed" in graphs._bindings_problem()
    fake = types.ModuleType("cuda.bindings")
    fake.__version__, fake.driver, fake.nvrtc, fake.runtime = "12.9.0", object(), object(), object()
    monkeypatch.setitem(sys.modules, "cuda", types.ModuleType("cuda"))
    monkeypatch.setitem(sys.modules, "cuda.bindings", fake)
    assert graphs._bindings_problem() == "cuda-bindings 12.9.0 is installed (13 or newer needed)"
    fake.__version__ = "13.0.1"
    want = None if hasattr(torch._C, "_cuda_beginAllocateCurrentThreadToPool") else "cannot route"
    got = graphs._bindings_problem()
    assert got is None if want is None else want in got


def test_prefill_tiles_one_request_equals_the_concatenated_batch():
    """prefill_tiles: one request's selection comes back as it is (no copies), tile rows numbered from its first
    query block; several requests are concatenated in order, each padded to the widest selection with -1."""
    from cab_vllm.backend.attention import prefill_tiles

    gen = torch.Generator().manual_seed(3)
    parts = [(0, torch.randint(0, 9, (3, 2, 4), generator=gen, dtype=torch.int32),
              torch.randint(1, 5, (3, 2), generator=gen, dtype=torch.int32), 5),
             (2, torch.randint(0, 9, (2, 2, 6), generator=gen, dtype=torch.int32),
              torch.randint(1, 7, (2, 2), generator=gen, dtype=torch.int32), 0)]
    one = prefill_tiles(parts[:1])
    assert one.seq.tolist() == [0, 0, 0] and one.qblock.tolist() == [5, 6, 7]
    assert one.indices.data_ptr() == parts[0][1].data_ptr() and one.counts.data_ptr() == parts[0][2].data_ptr()
    both = prefill_tiles(parts)
    assert both.seq.tolist() == [0, 0, 0, 2, 2] and both.qblock.tolist() == [5, 6, 7, 0, 1]
    assert both.indices.shape == (5, 2, 6) and (both.indices[:3, :, 4:] == -1).all()
    assert torch.equal(both.indices[:3, :, :4], parts[0][1]) and torch.equal(both.indices[3:], parts[1][1])
    assert torch.equal(both.counts, torch.cat([parts[0][2], parts[1][2]]))
    for a, b in zip(one, prefill_tiles([(0, parts[0][1], parts[0][2], 5), (1, parts[0][1][:0], parts[0][2][:0], 8)])):
        assert torch.equal(a, b)  # an empty second request changes nothing
