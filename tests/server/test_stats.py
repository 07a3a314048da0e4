"""cab_vllm.backend.stats without an engine: the host-side block counts agree with CABConfig.keep_counts (what
the selection keeps), dense reasons follow plan_batch, predictor timings are flushed per step."""

from __future__ import annotations

import random

import pytest

from cab_vllm.backend.plan import plan_batch
from cab_vllm.backend.stats import Stats, causal_blocks, kept_blocks
from cab_vllm.config import CABConfig


@pytest.fixture
def stats(monkeypatch) -> Stats:
    monkeypatch.setenv("CAB_METRICS", "0")  # totals only: no process-global Prometheus metrics in the test run
    return Stats()


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.7, 0.9, 0.95, 0.99])
@pytest.mark.parametrize("sink, local", [(1, 1), (2, 3)])
def test_kept_blocks_match_keep_counts(sparsity, sink, local):
    cfg = CABConfig(sparsity=sparsity, sink_blocks=sink, local_blocks=local)
    keep = cfg.keep_counts(300).tolist()
    rng = random.Random(0)
    for first, last in [(0, 0), (0, 1), (0, 299), (5, 5), (63, 64), (127, 255)] + \
            [tuple(sorted(rng.sample(range(300), 2))) for _ in range(10)]:
        assert kept_blocks(sparsity, sink + local, first, last) == sum(keep[first:last + 1])
        assert causal_blocks(first, last) == sum(m + 1 for m in range(first, last + 1))


def test_record_plan_counts_rows_tokens_blocks_and_dense_reasons(stats):
    bs = 64
    base = CABConfig(decode_rule="bounds")  # the decode row below: the per-step (bounds) budget
    s7 = base.replace(sparsity=0.7)
    # rows: decode at 3000 (sparse), prefill 1000 new tokens of 5000 (sparse, 0.7), short prefill (below the
    # threshold), decode with sparsity 0, prefill with policy dense, a padding row
    qsl = [0, 1, 1001, 1101, 1102, 2102, 2102]
    seq = [3000, 5000, 100, 4000, 2000, 0]
    cfgs = [base, s7, base, base.replace(sparsity=0.0), base.replace(policy="dense"), base]
    plan = plan_batch(qsl, seq, cfgs, dense_threshold=1024, count=False)
    stats.record_plan(plan, cfgs, bs, 1024)
    t = stats.totals
    assert t[("rows", "decode", "0.90", "cab", "sparse")] == 1
    assert t[("rows", "prefill", "0.70", "cab", "sparse")] == 1
    assert t[("tokens", "prefill", "0.70", "cab", "sparse")] == 1000
    assert t[("rows", "prefill", "0.90", "cab", "dense")] == 1 and t[("tokens", "prefill", "0.90", "cab", "dense")] == 100
    assert t[("rows", "decode", "0.00", "cab", "dense")] == 1
    assert t[("rows", "prefill", "0.90", "dense", "dense")] == 1
    assert t[("dense", "prefill", "below_threshold")] == 1
    assert t[("dense", "decode", "sparsity_zero")] == 1
    assert t[("dense", "prefill", "policy_dense")] == 1
    assert sum(v for k, v in t.items() if k[0] == "rows") == 5  # the padding row is not counted
    # achieved sparsity inputs: the 0.7 prefill covers query blocks 62..78 of a 5000-token context
    first, last = (5000 - 1000) // bs, (5000 - 1) // bs
    keep = s7.keep_counts(last + 1).tolist()
    assert t[("kept", "prefill", "0.70")] == sum(keep[first:])
    assert t[("causal", "prefill", "0.70")] == sum(range(first + 1, last + 2))
    achieved = 1 - t[("kept", "prefill", "0.70")] / t[("causal", "prefill", "0.70")]
    assert 0.65 < achieved <= 0.7
    # dense rows keep every causal block
    assert t[("kept", "decode", "0.00")] == t[("causal", "decode", "0.00")] == 4000 // bs + 1
    m = (3000 - 1) // bs
    assert t[("kept", "decode", "0.90")] == base.keep_counts(m + 1)[-1].item()


def test_predictor_timings_flush_on_the_next_step(stats):
    plan = plan_batch([0, 1], [10], [CABConfig()], dense_threshold=0, count=False)
    with stats.timed("decode", "cpu"):
        sum(range(10000))
    with stats.timed("bounds", "cpu"):
        pass
    assert stats.totals[("predictor", "decode")] == 0  # pending until the builder's next step
    stats.record_plan(plan, [CABConfig()], 64, 0)
    assert stats.totals[("predictor", "decode")] > stats.totals[("predictor", "bounds")] > 0
    assert stats.totals[("step",)] == 1
    stats.record_plan(plan, [CABConfig()], 64, 0)
    assert stats.totals[("step",)] == 1  # no new timings, no new step sample


def _mixed_steps():
    base = CABConfig(decode_rule="bounds")
    steps = []
    for i in range(5):
        cfgs = [base.replace(sparsity=0.5 + 0.1 * i), base, base.replace(sparsity=0.0)]
        qsl, seq = [0, 1, 1 + 700 + i, 2 + 700 + i], [3000 + i, 5000 + 64 * i, 900]
        steps.append((plan_batch(qsl, seq, cfgs, dense_threshold=1024, count=False), cfgs))
    return steps


def test_deferred_steps_are_accounted_by_flush_as_record_plan_would(stats, monkeypatch):
    """defer_plan: nothing counted on the caller's path; flush() then adds exactly what record_plan adds, every
    step once, and a second flush adds nothing."""
    import cab_vllm.backend.stats as mod

    monkeypatch.setattr(mod, "FLUSH_SECONDS", 30.0)  # the background thread stays out of this test's way
    at_once = Stats()
    for plan, cfgs in _mixed_steps():
        stats.defer_plan(plan, cfgs, 64, 1024)
        at_once.record_plan(plan, cfgs, 64, 1024)
    assert not +stats.totals  # nothing yet
    stats.flush()
    assert stats.totals == at_once.totals and stats.totals[("rows", "decode", "0.70", "cab", "sparse")] == 1
    stats.flush()
    assert stats.totals == at_once.totals


def test_the_experiments_read_kept_and_causal_after_a_flush(stats, monkeypatch):
    """The experiment runner's density (kept / causal of a batch's steps) counts steps still deferred."""
    import cab_vllm.backend.stats as mod
    from cab_experiments.common import kept_causal

    monkeypatch.setattr(mod, "FLUSH_SECONDS", 30.0)
    at_once = Stats()
    for plan, cfgs in _mixed_steps():
        stats.defer_plan(plan, cfgs, 64, 1024)
        at_once.record_plan(plan, cfgs, 64, 1024)
    kept = sum(v for k, v in at_once.totals.items() if k[0] == "kept")
    causal = sum(v for k, v in at_once.totals.items() if k[0] == "causal")
    assert 0 < kept < causal
    assert kept_causal(stats) == (kept, causal)


def test_deferred_steps_are_accounted_in_the_background(stats):
    """Without a flush() the process's background thread accounts deferred steps within FLUSH_SECONDS or so, and
    one started per process (a forked child starts its own)."""
    import threading
    import time

    at_once = Stats()
    for plan, cfgs in _mixed_steps():
        stats.defer_plan(plan, cfgs, 64, 1024)
        at_once.record_plan(plan, cfgs, 64, 1024)
    deadline = time.monotonic() + 10
    while stats.totals != at_once.totals:
        assert time.monotonic() < deadline, "the background thread did not account the deferred steps"
        time.sleep(0.01)
    plan, cfgs = _mixed_steps()[0]
    stats.defer_plan(plan, cfgs, 64, 1024)
    names = [t.name for t in threading.enumerate() if t.name == "cab-stats"]
    assert len(names) >= 1
    stats.flush()
    assert stats.totals[("rows", "prefill", "0.90", "cab", "sparse")] == 6


def test_a_forked_child_accounts_its_own_steps_not_its_parents(stats, monkeypatch):
    """After a fork the child has no background thread: its first deferred step starts one; the steps its parent
    had deferred are the parent's to account, not counted twice."""
    import multiprocessing as mp

    import cab_vllm.backend.stats as mod

    monkeypatch.setattr(mod, "FLUSH_SECONDS", 0.01)
    steps = _mixed_steps()
    stats.defer_plan(*steps[0], 64, 1024)  # the parent's thread starts
    stats.defer_plan(*steps[1], 64, 1024)
    ctx = mp.get_context("fork")
    q = ctx.Queue()

    def child():
        import time

        before = dict(stats.totals)
        stats.defer_plan(*steps[2], 64, 1024)
        deadline = time.monotonic() + 10
        one = Stats()
        one.record_plan(*steps[2], 64, 1024)
        want = {k: before.get(k, 0) + v for k, v in one.totals.items()}
        while any(stats.totals[k] != v for k, v in want.items()) and time.monotonic() < deadline:
            time.sleep(0.01)
        q.put(all(stats.totals[k] == v for k, v in want.items()) and len(stats.totals) == len(
            set(before) | set(want)))

    p = ctx.Process(target=child)
    p.start()
    got = q.get(timeout=30)
    p.join(30)
    assert got, "the child did not account its own step (or counted its parent's)"
    stats.flush()
    at_once = Stats()
    for plan, cfgs in steps[:2]:
        at_once.record_plan(plan, cfgs, 64, 1024)
    assert stats.totals == at_once.totals  # the parent: its two steps, not the child's


def test_deferred_steps_flush_pending_predictor_timings_on_the_callers_thread(stats, monkeypatch):
    """The predictor timings of earlier steps are flushed by defer_plan itself (their CUDA events are read on the
    thread that recorded them), as by record_plan."""
    import cab_vllm.backend.stats as mod

    monkeypatch.setattr(mod, "FLUSH_SECONDS", 30.0)
    plan = plan_batch([0, 1], [10], [CABConfig()], dense_threshold=0, count=False)
    with stats.timed("decode", "cpu"):
        sum(range(10000))
    stats.defer_plan(plan, [CABConfig()], 64, 0)
    assert stats.totals[("predictor", "decode")] > 0 and stats.totals[("step",)] == 1
    assert stats.totals[("rows", "decode", "0.90", "cab", "sparse")] == 0  # the plan itself: deferred
    stats.flush()
    assert stats.totals[("rows", "decode", "0.90", "cab", "sparse")] == 1


def test_prometheus_export(monkeypatch):
    """With prometheus_client, the same figures land in the process registry under the documented names."""
    pc = pytest.importorskip("prometheus_client")
    monkeypatch.setenv("CAB_METRICS", "1")
    s = Stats()
    cfg = CABConfig(sparsity=0.55)
    plan = plan_batch([0, 2048], [2048], [cfg], dense_threshold=0, count=False)

    def value(name, **labels):
        return pc.REGISTRY.get_sample_value(name, labels) or 0.0

    before = value("cab_rows_total", phase="prefill", sparsity="0.55", policy="cab", mode="sparse")
    s.record_plan(plan, [cfg], 64, 0)
    assert value("cab_rows_total", phase="prefill", sparsity="0.55", policy="cab", mode="sparse") == before + 1
    assert value("cab_causal_key_blocks_total", phase="prefill", sparsity="0.55") >= 32 * 33 // 2


def test_prompt_decode_rule_counts_what_it_keeps(stats):
    """decode_rule="prompt": a decode row whose prompt selection is stored keeps the prompt's last query block's
    budget plus the blocks after the prompt; a row whose prompt ran dense (below the threshold) stays dense and is
    counted as prompt_dense; a row without a stored selection otherwise (unknown prompt, or one that came whole
    from the prefix cache) selects at its own query block's budget, and is counted so."""
    from cab_vllm.backend.plan import PromptSlots, route_rows
    from cab_vllm.ops.decode import MODE_BOUNDS, MODE_PROMPT, MODE_SKIP

    cfg = CABConfig(sparsity=0.9, decode_rule="prompt")
    slots = PromptSlots(4)
    # step 1: the prompts of a (2048 tokens, sparse) and b (500 tokens, dense) finish
    pre = plan_batch([0, 2048, 2548], [2048, 500], [cfg] * 2, dense_threshold=1024, count=False,
                     req_ids=["a", "b"], prompt_lens=[2048, 500], live=frozenset("ab"))
    route_rows(pre, slots, fa_dense=True)
    assert slots.stored == {"a": 2048 // 64}
    # step 2: decodes of a, b and c (c: unknown prompt), all past the threshold
    seq = [2100, 2100, 2100]
    plan = plan_batch([0, 1, 2, 3], seq, [cfg] * 3, dense_threshold=1024, count=False, req_ids=["a", "b", "c"],
                      prompt_lens=[2048, 500, None], live=frozenset("abc"))
    route_rows(plan, slots, fa_dense=True)
    assert plan.modes == [MODE_PROMPT, MODE_SKIP, MODE_BOUNDS]  # b: vLLM's FlashAttention, as its prompt
    stats.record_plan(plan, [cfg] * 3, 64, 1024)
    m_prompt, m = 2048 // 64, (2100 - 1) // 64 + 1
    keep_prompt = int(cfg.keep_counts(m_prompt)[-1])
    keep_now = int(cfg.keep_counts(m)[-1])
    assert stats.totals[("kept", "decode", "0.90")] == keep_prompt + (m - m_prompt) + m + keep_now
    assert stats.totals[("causal", "decode", "0.90")] == 3 * m
    assert stats.totals[("dense", "decode", "prompt_dense")] == 1
    assert stats.totals[("rows", "decode", "0.90", "cab", "dense")] == 1


def test_sparsity_label_keeps_every_digit_it_needs():
    from cab_vllm.backend.stats import sparsity_label

    assert sparsity_label(0.9) == "0.90" and sparsity_label(0.0) == "0.00" and sparsity_label(0.95) == "0.95"
    for s in (0.995, 0.999999, 0.123456):
        assert sparsity_label(s) == repr(s) and float(sparsity_label(s)) == s and float(sparsity_label(s)) < 1.0


def test_a_process_that_does_not_record_times_nothing(stats):
    stats.recording = False  # a tensor-parallel rank other than 0
    with stats.timed("decode", "cpu"):
        sum(range(1000))
    assert not stats._pending_host and not stats._pending_events
    stats.recording = True


def test_dense_layers_move_kept_blocks_toward_causal(stats):
    """record_plan's dense_share (CAB_DENSE_LAYERS / the model's layers): a sparse row's kept blocks are the mean
    over layers, the dense layers keeping every causal block; dense rows are unchanged."""
    cfg = CABConfig(sparsity=0.9, decode_rule="bounds")
    qsl, seq = [0, 1, 1001, 1101], [3000, 5000, 100]
    plan = plan_batch(qsl, seq, [cfg] * 3, dense_threshold=1024, count=False)
    stats.record_plan(plan, [cfg] * 3, 64, 1024)
    plain = dict(stats.totals)
    shared = Stats()
    shared.record_plan(plan, [cfg] * 3, 64, 1024, dense_share=0.25)
    t = shared.totals
    for phase in ("prefill", "decode"):
        kept, causal = plain[("kept", phase, "0.90")], plain[("causal", phase, "0.90")]
        assert kept < causal and t[("causal", phase, "0.90")] == causal
        assert t[("kept", phase, "0.90")] == pytest.approx(kept + 0.25 * (causal - kept))
    assert plain[("rows", "prefill", "0.90", "cab", "dense")] == t[("rows", "prefill", "0.90", "cab", "dense")] == 1


@pytest.mark.parametrize("value", [-1, 1.5, True, "2", None])
def test_config_rejects_bad_dense_layers(value):
    with pytest.raises(ValueError, match=r"CABConfig\.dense_layers="):
        CABConfig(dense_layers=value)
    assert CABConfig(dense_layers=2).dense_layer(1) and not CABConfig(dense_layers=2).dense_layer(2)
    assert not CABConfig().dense_layer(0)


def test_record_plan_counts_a_replayed_chunk_as_its_decode_rows(stats):
    """A preempted request's chunk past its prompt's end (plan.replay) keeps per query block what its decode rows
    kept: the prompt's last query block's count and every block after it, as attention.replay_selection builds."""
    import torch

    from cab_vllm.backend.attention import PromptTable, replay_selection
    from cab_vllm.backend.stats import kept_blocks

    bs, cfg = 64, CABConfig(sparsity=0.8)
    plan = plan_batch([0, 140], [840], [cfg], dense_threshold=0, count=False, prompt_lens=[700])
    plan.replay, plan.final = [(0, 11)], [False]
    stats.record_plan(plan, [cfg], bs, 0)
    k_mp = cfg.answer_keep(kept_blocks(0.8, cfg.sink_blocks + cfg.local_blocks, 10, 10), 11)
    table = PromptTable(1, 2, 14, "cpu")
    table.put(0, torch.arange(k_mp).repeat(2, 1), torch.full((2,), k_mp))
    _, counts, first = replay_selection(table, 0, 11, 700 // bs, 839 // bs)
    assert first == 10 and counts[:, 0].tolist() == [k_mp, k_mp + 1, k_mp + 2, k_mp + 3]
    assert stats.totals[("kept", "prefill", "0.80")] == int(counts[:, 0].sum())
