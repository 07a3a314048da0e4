"""Key-block summaries kept across a prompt's chunks (attention.KeySummaries, plan.SummarySlots): a chunk pools only
its own key blocks, and selects and attends exactly as when it gathers and pools the whole context."""

from __future__ import annotations

import logging
import os

import pytest
import torch

import cab_vllm.backend.attention as attention
from backend_harness import PagedSim, check_step
from cab_vllm.backend.attention import KeySummaries
from cab_vllm.backend.plan import EngineSettings, SummarySlots
from cab_vllm.config import CABConfig
from cab_vllm.ops.coarsen import block_logits, key_summary, logits_from_summary
from cab_vllm.config import SUMMARY_ESTIMATORS

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
IMPLS = ["torch", "triton"] if INTERPRETED else ["torch"]


# -- the summaries themselves --------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("estimator", SUMMARY_ESTIMATORS)
def test_logits_from_summary_equal_block_logits(estimator, impl):
    """The estimate from stored summaries is the estimate from the keys (awkward sizes: a partial last block,
    GQA 3, head dim 24)."""
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 6, 37, 24, generator=gen), torch.randn(1, 2, 101, 24, generator=gen)
    ks = key_summary(k, 16, estimator, impl=impl)
    assert ks.shape == (1, 2, 7, 48 if estimator == "bounds" else 24)
    torch.testing.assert_close(logits_from_summary(q, ks, 16, estimator, impl=impl),
                               block_logits(q, k, 16, estimator, impl=impl), rtol=0, atol=0)


@pytest.mark.parametrize("estimator", SUMMARY_ESTIMATORS)
def test_summaries_of_full_blocks_do_not_change_as_keys_arrive(estimator):
    """What makes keeping them valid: a full block's summary depends on its own keys only, and a block-aligned
    slice pools to the same summaries as the whole (the partial last block is the only one that changes)."""
    k = torch.randn(1, 2, 200, 16)
    whole = key_summary(k, 32, estimator)
    assert torch.equal(key_summary(k[:, :, :130], 32, estimator)[:, :, :4], whole[:, :, :4])
    assert torch.equal(key_summary(k[:, :, 64:], 32, estimator), whole[:, :, 2:])
    assert not torch.equal(key_summary(k[:, :, :130], 32, estimator)[:, :, 4], whole[:, :, 4])


def test_bad_summaries_are_refused():
    with pytest.raises(ValueError, match="estimator 'topr' has no key summary"):
        KeySummaries(2, 2, 8, 16, "topr", torch.float32, "cpu")
    with pytest.raises(ValueError, match="does not fit estimator 'bounds'"):
        logits_from_summary(torch.randn(1, 2, 32, 16), torch.randn(1, 2, 2, 16), 16, "bounds")
    store = KeySummaries(1, 2, 4, 16, "bounds", torch.float32, "cpu")
    assert store.data.shape == (1, 2, 4, 32) and store.nbytes == 1 * 2 * 4 * 32 * 4
    with pytest.raises(ValueError, match="5 key blocks do not fit the key summaries"):
        attention.update_key_summaries(store, 0, 0, torch.zeros(10, 16, 2, 16), torch.arange(10), 65, 16)


# -- the builder's slots ---------------------------------------------------------------------------------------
def test_summary_slots_keep_release_and_evict():
    s = SummarySlots(2)
    assert s.take("a", 0, frozenset({"a"})) == (0, 0)  # a new request pools from block 0
    slot_a = 0
    s.done("a", 4, ended=False)
    assert s.take("a", 4, frozenset({"a"})) == (slot_a, 4)  # next chunk: pools from block 4 on
    assert s.take("a", 3, frozenset({"a"})) == (slot_a, 3)  # a chunk starting earlier (recompute) pools from there
    s.done("a", 6, ended=False)
    slot_b = s.take("b", 0, frozenset({"b"}))[0]
    s.done("b", 2, ended=True)
    assert slot_b != slot_a
    # both slots taken: "c" evicts the oldest request not in its step ("a"), which starts over if it returns
    assert s.take("c", 5, frozenset({"c", "b"})) == (slot_a, 0)
    assert "a" not in s.of
    # every slot held by this step's rows: no slot, the chunk pools its whole context
    assert s.take("d", 0, frozenset({"b", "c"})) is None and s.misses == 1
    s.begin_step(live=frozenset({"b", "c"}))  # "b" ended last step: released now
    assert "b" not in s.of and s.free == [slot_b]
    s.begin_step(live=frozenset())  # "c" left the engine
    assert s.of == {} and sorted(s.free) == [0, 1]


def test_summary_slots_setting(monkeypatch):
    assert EngineSettings.from_env({}).summary_slots == 4
    assert EngineSettings.from_env({"CAB_SUMMARY_SLOTS": "0"}).summary_slots == 0
    with pytest.raises(ValueError, match="CAB_SUMMARY_SLOTS='many' is not a valid int"):
        EngineSettings.from_env({"CAB_SUMMARY_SLOTS": "many"})
    with pytest.raises(ValueError, match="CAB_SUMMARY_SLOTS=-1 is invalid"):
        EngineSettings.from_env({"CAB_SUMMARY_SLOTS": "-1"})


# -- chunked prefill through the paged cache -------------------------------------------------------------------
def _inputs(lens, hq=4, hkv=2, d=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return ([torch.randn(hq, n, d, generator=gen) for n in lens], [torch.randn(hkv, n, d, generator=gen) for n in lens],
            [torch.randn(hkv, n, d, generator=gen) for n in lens])


def _run(cfg, lens, schedule, summary_slots, impl="torch", prompt_lens=None, swap_slots_before=None):
    """Run the schedule (a list of steps, each [(sequence, new tokens)]) and return every step's (out, selections)."""
    q, k, v = _inputs(lens)
    sim = PagedSim(q, k, v, page_size=16, cfg=cfg, summary_slots=summary_slots)
    sim.prompt_lens.update(prompt_lens or {})
    got = []
    for i, rows in enumerate(schedule):
        if swap_slots_before == i:  # e.g. a prefix-cache hit: the request's first chunk starts past position 0
            sim.summary_slots = SummarySlots(summary_slots)
        out, md = sim.step(rows, impl=impl)
        assert check_step(sim, out, md) < 1e-5
        got.append((out, md.get("prefill"), md["plan"]))
    return got, sim


def _same(a, b):
    for (oa, sa, _), (ob, sb, _) in zip(a, b):
        torch.testing.assert_close(oa, ob, rtol=0, atol=0)
        if sa is None:
            assert sb is None
            continue
        for ea, eb in zip(sa, sb, strict=True):
            if ea is None:  # a chunk past its prompt run as decode rows (a per-step decode rule)
                assert eb is None
                continue
            (ia, ca, fa), (ib, cb, fb) = ea, eb
            assert fa == fb and torch.equal(ca, cb) and torch.equal(ia, ib)


# two prompts prefilled in chunks that start mid-block, interleaved, then decoded
LENS = [700, 530]
SCHEDULE = [[(0, 150)], [(0, 200), (1, 130)], [(1, 250)], [(0, 300), (1, 140)], [(0, 1), (1, 1)], [(0, 49)]]
CFGS = [pytest.param(CABConfig(policy="cab", sparsity=0.75, block_size=32), id="cab-bounds"),
        pytest.param(CABConfig(policy="magnitude", sparsity=0.75, block_size=32, estimator="max_l2"),
                     id="magnitude-max_l2"),
        pytest.param(CABConfig(policy="cab", sparsity=0.75, block_size=32, estimator="mean", exact_rows=0),
                     id="cab-mean"),
        pytest.param(CABConfig(policy="h2o", sparsity=0.75, block_size=32), id="h2o-square"),
        pytest.param(CABConfig(policy="cab", sparsity=0.75, block_size=32, vertical_blocks=True),
                     id="cab-vertical")]


@pytest.mark.parametrize("cfg", CFGS)
@pytest.mark.parametrize("slots", [1, 2, 4], ids=["1-slot", "2-slots", "4-slots"])
def test_chunked_prefill_with_kept_summaries_equals_pooling_everything(cfg, slots):
    """Same selections and same outputs, bit for bit, whether a chunk pools the whole context or only its own
    blocks on top of the kept summaries; with one slot the two prompts evict each other or find none free."""
    want, _ = _run(cfg, LENS, SCHEDULE, 0, prompt_lens={0: 650, 1: 520})
    got, sim = _run(cfg, LENS, SCHEDULE, slots, prompt_lens={0: 650, 1: 520})
    _same(got, want)
    kept = [p.summary for _, _, p in got]
    assert any(e is not None and e[1] > 0 for row in kept for e in row)  # some chunk pooled only its own blocks
    if slots == 1:
        assert sim.summary_slots.misses > 0  # both prompts in one step: one of them went without


@pytest.mark.parametrize("impl", ["triton"] if INTERPRETED else [])
def test_chunked_prefill_with_kept_summaries_triton(impl):
    cfg = CABConfig(policy="cab", sparsity=0.75, block_size=32)
    sched = [[(0, 150)], [(0, 200)], [(0, 330)]]
    want, _ = _run(cfg, [700], sched, 0, impl=impl, prompt_lens={0: 680})
    got, _ = _run(cfg, [700], sched, 2, impl=impl, prompt_lens={0: 680})
    _same(got, want)


def test_the_slot_holds_the_summaries_of_the_whole_context():
    cfg = CABConfig(policy="cab", sparsity=0.75, block_size=32)
    q, k, v = _inputs([700])
    sim = PagedSim(q, k, v, page_size=16, cfg=cfg, summary_slots=2)
    sim.prompt_lens[0] = 700
    sim.step([(0, 150)])
    sim.step([(0, 260)])
    slot, full = sim.summary_slots.of["req-0"]
    assert full == 410 // 32
    want = key_summary(k[0][None, :, :410], 32, "bounds")[0]
    assert torch.equal(sim.summaries.data[slot, :, :13], want)


def test_a_request_first_seen_mid_prompt_pools_its_whole_context_once():
    """A chunk whose request has no slot yet (a prefix-cache hit, or evicted) pools from block 0; later chunks
    only their own blocks."""
    cfg = CABConfig(policy="cab", sparsity=0.75, block_size=32)
    sched = [[(0, 300)], [(0, 200)], [(0, 180)]]
    want, _ = _run(cfg, [700], sched, 0, prompt_lens={0: 680})
    got, _ = _run(cfg, [700], sched, 2, prompt_lens={0: 680}, swap_slots_before=1)
    _same(got, want)
    assert got[1][2].summary == [(got[1][2].summary[0][0], 0)]
    assert got[2][2].summary[0][1] == 500 // 32


def test_only_the_prompts_last_chunk_reads_all_keys(monkeypatch):
    """With kept summaries a chunk pools only its own blocks (from the block its new tokens start in) and reads
    no other key; the chunk that holds the prompt's end also takes the whole context once, for cab's exact last
    rows (the only rows that need every key)."""
    pooled, selected = [], []
    real_update, real_select = attention.update_key_summaries, attention.prefill_selection

    def spy_update(store, slot, first_block, *a, **kw):
        pooled.append(first_block)
        return real_update(store, slot, first_block, *a, **kw)

    def spy_select(q_new, k_all, cfg, impl="auto", summary=None, n=None, exact=True, fused=False):
        selected.append((k_all is None, summary is not None, exact))
        return real_select(q_new, k_all, cfg, impl=impl, summary=summary, n=n, exact=exact, fused=fused)

    monkeypatch.setattr(attention, "update_key_summaries", spy_update)
    monkeypatch.setattr(attention, "prefill_selection", spy_select)
    cfg = CABConfig(policy="cab", sparsity=0.75, block_size=32)
    _run(cfg, [700], [[(0, 150)], [(0, 200)], [(0, 330)]], 2, prompt_lens={0: 680})
    assert pooled == [0, 150 // 32, 350 // 32]
    assert selected == [(True, True, False), (True, True, False), (False, True, True)]


def test_vertical_blocks_score_every_chunks_end(monkeypatch):
    """With vertical_blocks every chunk takes the whole context for its own last rows' exact scores (not only the one
    that ends the prompt), and a chunk selects what prefill_selection selects from the keys up to its end."""
    selected = []
    real_select = attention.prefill_selection

    def spy_select(q_new, k_all, cfg, impl="auto", summary=None, n=None, exact=True, fused=False):
        selected.append((k_all is None, exact))
        return real_select(q_new, k_all, cfg, impl=impl, summary=summary, n=n, exact=exact, fused=fused)

    monkeypatch.setattr(attention, "prefill_selection", spy_select)
    cfg = CABConfig(policy="cab", sparsity=0.75, block_size=32, vertical_blocks=True)
    got, _ = _run(cfg, [700], [[(0, 150)], [(0, 200)], [(0, 330)]], 2, prompt_lens={0: 680})
    assert selected == [(False, False), (False, False), (False, True)]
    q, k, _ = _inputs([700])
    for step, (a, b) in enumerate([(0, 150), (150, 350)]):
        idx, cnt, first = real_select(q[0][:, a:b], k[0][:, :b], cfg, impl="torch", exact=False)
        sel = got[step][1][0]
        assert torch.equal(sel[0], idx) and torch.equal(sel[1], cnt) and sel[2] == first
        plain = real_select(q[0][:, a:b], k[0][:, :b], cfg.replace(vertical_blocks=False), impl="torch", exact=False)
        assert torch.equal(plain[1], cnt)  # the same budget


def test_exact_rows_only_in_the_chunk_that_holds_the_prompts_end():
    """A non-final chunk's last query block is estimated like any other (as an unchunked prefill does); the
    chunk holding the prompt's end scores its last block from its last query tokens exactly."""
    cfg = CABConfig(policy="cab", sparsity=0.75, block_size=32)
    got, _ = _run(cfg, [700], [[(0, 150)], [(0, 530)]], 0, prompt_lens={0: 680})
    assert got[0][2].final == [False] and got[1][2].final == [True]
    q, k, _ = _inputs([700])
    idx, cnt, first = attention.prefill_selection(q[0][:, :150], k[0][:, :150], cfg, impl="torch", exact=False)
    sel = got[0][1][0]
    assert torch.equal(sel[0], idx) and torch.equal(sel[1], cnt) and sel[2] == first


@pytest.mark.skipif(not INTERPRETED, reason="the fused selection is Triton's (interpreted on the CPU)")
@pytest.mark.parametrize("fused", [True, False])
def test_exact_rows_read_the_keys_in_place(fused):
    """The chunk holding the prompt's end hands the keys to the selection as PagedKeys (read in place from the paged
    cache by the exact rows' kernel, no gathered copy): the same selection as with the gathered keys, fused or not
    (the unfused path gathers them itself)."""
    from conftest import make_paged_cache
    from cab_vllm.backend.attention import update_key_summaries
    from cab_vllm.ops.blocks import PagedKeys

    cfg = CABConfig(policy="cab", sparsity=0.75, block_size=32)
    n, a = 700, 530
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(8, n - a, 32, generator=gen)
    k = torch.randn(2, n, 32, generator=gen)
    kc, _, bt = make_paged_cache([k], [k.clone()], 16, layout="kv_pair", seed=4)
    store = KeySummaries(1, 2, 32, 32, cfg.estimator, torch.float32, "cpu")
    summ = update_key_summaries(store, 0, 0, kc, bt[0], n, 32, "triton")
    args = dict(impl="triton", summary=summ, n=n, exact=True, fused=fused)
    got = attention.prefill_selection(q, PagedKeys(kc, bt[:1], n), cfg, **args)
    want = attention.prefill_selection(q, k, cfg, **args)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2]


def test_warm_up_runs_the_kept_summary_path(monkeypatch):
    """Engine start compiles what a prompt's later chunks run (pooling its own blocks into the kept summaries):
    the warm-up goes through that path, on scratch tensors."""
    from cab_vllm.backend.attention import DecodeWorkspace
    from cab_vllm.backend.warmup import warm_up_kernels

    firsts = []
    real = attention.update_key_summaries

    def spy(store, slot, first_block, *a, **kw):
        firsts.append(first_block)
        return real(store, slot, first_block, *a, **kw)

    monkeypatch.setattr(attention, "update_key_summaries", spy)
    cfg = CABConfig()
    store = KeySummaries(4, 2, 64, 32, cfg.estimator, torch.float32, "cpu")
    warm_up_kernels(4, 2, 32, torch.float32, "cpu", cfg, DecodeWorkspace(4, 4, 2, 32, 64, "cpu"), summaries=store)
    assert 0 in firsts and any(f > 0 for f in firsts)


@pytest.mark.gpu
def test_kept_summaries_select_the_same_blocks_on_the_gpu():
    """A 64k prompt in 8k chunks (bf16, 32/8 heads, head dim 128): the kept summaries select exactly what pooling
    the whole context per chunk selects, and give the same outputs."""
    gen = torch.Generator().manual_seed(0)
    n, hq, hkv, d = 65536 + 37, 32, 8, 128

    def mk(h):
        return [torch.randn(h, n, d, generator=gen).to("cuda", torch.bfloat16)]

    q, k, v = mk(hq), mk(hkv), mk(hkv)
    runs = []
    for slots in (0, 4):
        sim = PagedSim(q, k, v, page_size=16, cfg=CABConfig(sparsity=0.95), summary_slots=slots)
        sim.prompt_lens[0] = n
        steps, done = [], 0
        while done < n:
            step = min(8192, n - done)
            out, md = sim.step([(0, step)], impl="triton")
            steps.append((out, md["prefill"], md["plan"]))
            done += step
        runs.append(steps)
    _same(runs[1], runs[0])
    assert runs[1][-1][2].summary[0][1] == (n - (n % 8192 or 8192)) // 64


def test_warm_up_makes_both_decode_launch_shapes(monkeypatch):
    """A single-row decode step runs selection and attention in one launch, a larger batch in two (their kernels
    compile apart): the warm-up decodes under both, each with a step that selects its own blocks and one that
    reads its prompt's selection, and leaves the row limit as it was."""
    import cab_vllm.ops.decode as dec
    from cab_vllm.backend.attention import DecodeWorkspace
    from cab_vllm.backend.warmup import warm_up_kernels

    seen = []
    real = dec.routed_decode

    def spy(q, *a, **kw):
        width = kw["select"].scores.shape[-1] if kw.get("select") is not None else 1
        one = dec.one_launch_default(q.shape[0], width) if kw.get("one_launch") is None else kw["one_launch"]
        routes = a[4]
        seen.append((one, tuple(routes.modes[: q.shape[0]].tolist())))
        return real(q, *a, **kw)

    monkeypatch.setattr(dec, "routed_decode", spy)
    limit = dec.ONE_LAUNCH_MAX_ROWS
    cfg = CABConfig()
    store = KeySummaries(4, 2, 64, 32, cfg.estimator, torch.float32, "cpu")
    warm_up_kernels(4, 2, 32, torch.float32, "cpu", cfg, DecodeWorkspace(4, 4, 2, 32, 64, "cpu"), summaries=store)
    assert dec.ONE_LAUNCH_MAX_ROWS == limit
    for one in (True, False):
        modes = {m for o, ms in seen if o == one for m in ms}
        assert dec.MODE_PROMPT in modes and modes & set(dec.SELECTED_MODES), (one, seen)


def test_warm_up_of_a_wide_engine_makes_only_two_launch_steps(monkeypatch):
    """An engine whose selection rows are wider than ops.decode.ONE_LAUNCH_MAX_MPAD decodes every batch in two
    launches by default: its warm-up compiles only those (one launch would be a compile the engine never uses); a
    row limit the engine sets (CAB_DECODE_ONE_LAUNCH_ROWS) still gets its one-launch steps."""
    import cab_vllm.ops.decode as dec
    from cab_vllm.backend.attention import DecodeWorkspace
    from cab_vllm.backend.plan import KernelOptions
    from cab_vllm.backend.warmup import warm_up_kernels

    seen = []
    real = dec.routed_decode
    monkeypatch.setattr(dec, "routed_decode", lambda q, *a, **kw: seen.append(
        (q.shape[0], kw.get("one_launch"), kw["select"].scores.shape[-1])) or real(q, *a, **kw))
    monkeypatch.setattr(dec, "ONE_LAUNCH_MAX_MPAD", 32)
    ws = DecodeWorkspace(4, 4, 2, 32, 64, "cpu")  # selection rows 64 wide
    warm_up_kernels(4, 2, 32, torch.float32, "cpu", CABConfig(), ws)

    def launches():  # one launch or not, as routed_decode decides it
        return {dec.one_launch_default(rows, w) if one is None else one for rows, one, w in seen}

    assert seen and all(w == 64 for _, _, w in seen)
    assert launches() == {False}
    seen.clear()
    warm_up_kernels(4, 2, 32, torch.float32, "cpu", CABConfig(), ws, kernels=KernelOptions(one_launch_rows=1))
    assert launches() == {True, False}


def test_warm_up_compiles_the_engines_kernel_options(monkeypatch, caplog):
    """The engine's KernelOptions reach every decode launch of the warm-up (the variants it compiles are the ones
    the engine's steps run), and the prefill selections get the fused predictor's choice; the time it took is
    returned and logged."""
    import cab_vllm.backend.attention as attention
    import cab_vllm.ops.decode as dec
    from cab_vllm.backend.attention import DecodeWorkspace
    from cab_vllm.backend.plan import KernelOptions
    from cab_vllm.backend.warmup import warm_up_kernels

    seen, fused = [], []
    real_dec, real_sel = dec.routed_decode, attention.prefill_selection
    monkeypatch.setattr(dec, "routed_decode", lambda *a, **kw: seen.append(kw) or real_dec(*a, **kw))
    monkeypatch.setattr(attention, "prefill_selection",
                        lambda *a, **kw: fused.append(kw.get("fused")) or real_sel(*a, **kw))
    opts = KernelOptions(fused_select=True, one_launch_rows=2)
    cfg = CABConfig()
    with caplog.at_level(logging.INFO, logger="cab_vllm.backend.warmup"):
        took = warm_up_kernels(4, 2, 32, torch.float32, "cpu", cfg, DecodeWorkspace(4, 4, 2, 32, 64, "cpu"),
                               kernels=opts)
    assert seen and {kw["one_launch"] for kw in seen} == {True, False}  # a one-row step under limits 2 and 0
    assert fused and set(fused) == {True}
    # where the start time goes, returned and logged (on CPU: no per-size Triton compiles to make)
    assert set(took) == {"prefill_decode"} and took["prefill_decode"] > 0
    assert any("CAB warm-up (4/2 heads, head dim 32, float32): prefill and decode paths" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("block_size", [None, 32], ids=["unset", "bs32"])
def test_warm_up_uses_the_engines_page_size(block_size, monkeypatch):
    """The decode kernel compiles per page size (a constexpr): the engine start's warm-up builds its scratch cache
    with the engine's cache block size (16, vLLM's CUDA default, when the config has none), else the first real
    decode step would compile again."""
    import types

    import cab_vllm.backend.backend as backend
    import cab_vllm.backend.warmup as warmup

    got = []
    monkeypatch.setattr(warmup, "warm_up_kernels",
                        lambda *a, **kw: got.append((kw["page_size"], kw["dense_threshold"], kw["fa_prefill"])))
    monkeypatch.setattr(backend, "_WARMED", set())
    monkeypatch.delenv("CAB_WARMUP", raising=False)
    monkeypatch.setenv("CAB_DENSE_THRESHOLD", "4096")
    vcfg = types.SimpleNamespace(cache_config=types.SimpleNamespace(block_size=block_size))
    impl = types.SimpleNamespace(num_heads=4, num_kv_heads=2, head_size=32, settings=backend.compat.engine_settings(),
                                 workspace=None, summaries=None, _vcfg=vcfg, _fa_prefill=None,
                                 token_scratch=None)
    backend._warm_up(impl, torch.zeros(1, 4, 32))
    # and the engine's dense threshold: the per-size kernels are made only for sizes a sparse row can have; the
    # sparse prefill's kernel as the layer chose it (undecided: CAB's Triton kernel)
    assert got == [(block_size or 16, 4096, None)]
    choice = backend.FAPrefill(object(), 3)
    impl = types.SimpleNamespace(**{**vars(impl), "_fa_prefill": choice, "num_heads": 8})
    backend._warm_up(impl, torch.zeros(1, 8, 32))
    assert got[-1] == (block_size or 16, 4096, choice)
