"""CABConfig.answer_blocks: the rows that produce the answer (a prompt's last query block, every decode query) keep
at least that many key blocks, on top of the fixed or the adaptive budget; every other row keeps what it kept.
Checked in each place that selects or counts: the rule itself, select_from_attention (both budgets), the public
select_blocks, the backend's chunked prefill selection (only the chunk holding the prompt's end), the fused
predictor against the unfused path, the decode budgets (Quest rule and the engine's plan), the metrics, and the
engine-wide CAB_ANSWER_BLOCKS."""

from __future__ import annotations

import pytest
import torch

from cab_vllm.config import CABConfig
from cab_vllm.policies import estimate, max_keep, select_from_attention


def random_inputs(b: int, hq: int, hkv: int, n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, hq, n, d, generator=g), torch.randn(b, hkv, n, d, generator=g)


def _rows_mass(b: int, h: int, m: int, seed: int) -> torch.Tensor:
    """[b, h, m, m] row-stochastic causal estimated mass, random."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(b, h, m, m, generator=g).tril()
    return a / a.sum(-1, keepdim=True)


@pytest.mark.parametrize("sparsity, m, want", [(0.9, 64, 20), (0.95, 64, 20), (0.5, 64, 32), (0.9, 12, 12),
                                               (0.9, 1, 1)])
def test_the_rule_raises_only_the_answer_row(sparsity, m, want):
    cfg = CABConfig(sparsity=sparsity, answer_blocks=20)
    plain = CABConfig(sparsity=sparsity).keep_counts(m)
    got = cfg.keep_counts(m, answer=True)
    assert torch.equal(got[:-1], plain[:-1])
    assert int(got[-1]) == want == min(m, max(int(plain[-1]), 20))
    assert torch.equal(cfg.keep_counts(m), plain)  # not an answer row: the sparsity rule alone
    assert cfg.answer_keep(3, 64) == 20 and cfg.answer_keep(30, 64) == 30 and cfg.answer_keep(3, 5) == 5
    assert torch.equal(CABConfig(sparsity=sparsity).keep_counts(m, answer=True), plain)  # 0: off


@pytest.mark.parametrize("value", [-1, 1.5, True, "8", None])
def test_config_rejects_a_bad_answer_blocks(value):
    with pytest.raises(ValueError, match=r"CABConfig\.answer_blocks="):
        CABConfig(answer_blocks=value)


@pytest.mark.parametrize("policy", ["cab", "magnitude", "h2o", "curvature", "streaming", "random"])
@pytest.mark.parametrize("budget", ["fixed", "adaptive"])
def test_selection_keeps_the_floor_in_the_answer_row_only(policy, budget):
    m, a = 37, _rows_mass(2, 3, 37, seed=1)
    base = CABConfig(sparsity=0.9, policy=policy, budget=budget)
    cfg = base.replace(answer_blocks=12)
    i0, c0 = select_from_attention(a, a, base, impl="torch", answer=True)  # answer_blocks 0: no change
    i1, c1 = select_from_attention(a, a, cfg, impl="torch", answer=True)
    assert torch.equal(c0[..., :-1], c1[..., :-1])
    assert torch.equal(i0[..., :-1, :], i1[..., :-1, : i0.shape[-1]])
    assert (c1[..., -1] == torch.clamp(c0[..., -1], min=12)).all()
    assert i1.shape[-1] == max_keep(cfg, 0, m, answer=True) >= 12
    last = i1[..., -1, :]
    assert ((last >= 0).sum(-1) == c1[..., -1]).all() and (last < m).all()
    kept = [set(r.tolist()) - {-1} for r in last.reshape(-1, last.shape[-1])]
    assert all({0, m - 1} <= s for s in kept)  # sink and diagonal still kept
    if policy in ("cab", "magnitude"):  # ranked by the estimate: the answer row keeps the top-12 blocks
        for s, row in zip(kept, a[..., -1, :].reshape(-1, m)):
            top = set(row.topk(12).indices.tolist())
            assert len(top - s) <= 2  # sink and diagonal may take two of the twelve places
    # without answer=True (a chunk that does not end the prompt) the floor does not apply
    i2, c2 = select_from_attention(a, a, cfg, impl="torch")
    assert torch.equal(c2, c0) and torch.equal(i2, i0)


def test_select_blocks_floors_the_prompts_last_block():
    from cab_vllm.api import select_blocks

    q, k = random_inputs(1, 4, 2, 700, 32, seed=3)
    base = CABConfig(sparsity=0.9)
    s0, s1 = select_blocks(q, k, base, impl="torch"), select_blocks(q, k, base.replace(answer_blocks=8), impl="torch")
    assert torch.equal(s0.counts[..., :-1], s1.counts[..., :-1])
    assert (s1.counts[..., -1] == 8).all() and (s0.counts[..., -1] == 2).all()


def test_chunked_prefill_floors_only_the_chunk_that_ends_the_prompt():
    from cab_vllm.backend.attention import prefill_selection

    hq, hkv, n, d = 4, 2, 1500, 32
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(hq, n, d, generator=g), torch.randn(hkv, n, d, generator=g)
    base = CABConfig(sparsity=0.95)
    cfg = base.replace(answer_blocks=10)
    for exact in (True, False):
        i0, c0, f0 = prefill_selection(q[:, 1000:], k, base, impl="torch", exact=exact)
        i1, c1, f1 = prefill_selection(q[:, 1000:], k, cfg, impl="torch", exact=exact)
        assert f0 == f1 == 1000 // 64
        assert torch.equal(c0[:-1], c1[:-1])
        want = torch.clamp(c0[-1], min=10) if exact else c0[-1]
        assert torch.equal(c1[-1], want), exact


@pytest.mark.parametrize("policy", ["cab", "magnitude"])
@pytest.mark.parametrize("answer, last", [({"answer_blocks": 9}, 9), ({"answer_dense": True}, 21)],
                         ids=["answer_blocks", "answer_dense"])
def test_fused_predictor_floors_the_answer_row_as_the_unfused_path(policy, answer, last):
    """The fused predictor against the unfused path with the answer row's floor (answer_blocks) or dense answer row
    (answer_dense: 1337 keys, all 21 blocks), in the chunk that ends the prompt only (exact)."""
    from cab_vllm.ops.coarsen import key_summary
    from cab_vllm.policies import estimate_and_select

    q, k = random_inputs(1, 4, 2, 1337, 32, seed=9)
    cfg = CABConfig(sparsity=0.9, policy=policy, decode_rule="tokens", **answer)
    first = 9
    summ = key_summary(k, 64, cfg.estimator, impl="torch")
    qr = q[:, :, first * 64:]
    for exact in (True, False):
        a_max, a_mean = estimate(qr, k, cfg, impl="torch", q_block_offset=first, summary=summ, n_keys=1337,
                                 exact=exact)
        want = select_from_attention(a_max, a_mean, cfg, impl="torch", q_block_offset=first, answer=exact)
        got = estimate_and_select(qr, k, cfg, first, summ, 1337, exact=exact, impl="torch")
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
        assert (got[1][..., -1] == (last if exact else 3)).all()


def test_decode_budgets_floor_every_decode_query():
    from cab_vllm.backend.plan import keep_count
    from cab_vllm.policies import select_decode_blocks

    base = CABConfig(sparsity=0.95, decode_rule="bounds")
    cfg = base.replace(answer_blocks=16)
    for n in (1, 100, 64 * 16, 4096, 64 * 500):
        m = (n - 1) // 64 + 1
        assert keep_count(cfg, n) == min(m, max(keep_count(base, n), 16))
    # the Quest rule (the adapter's decode and the engine's fallback) keeps the same counts
    g = torch.Generator().manual_seed(2)
    s, hkv, mmax, d = 3, 2, 40, 16
    q = torch.randn(s, 4, d, generator=g)
    lo = torch.randn(s, hkv, mmax, d, generator=g)
    hi = lo + torch.rand(s, hkv, mmax, d, generator=g)
    seq = torch.tensor([300, 1200, 2560], dtype=torch.int32)
    _, cnt = select_decode_blocks(q, lo, hi, seq, cfg, impl="torch")
    want = torch.tensor([keep_count(cfg, int(x)) for x in seq])
    assert (cnt == want[:, None]).all() and int(want[0]) == 5 and int(want[1]) == 16


def test_metrics_count_the_answer_rows(monkeypatch):
    monkeypatch.setenv("CAB_METRICS", "0")  # totals only
    from cab_vllm.backend.plan import PromptSlots, plan_batch, route_rows
    from cab_vllm.backend.stats import Stats, kept_blocks

    cfg = CABConfig(sparsity=0.95, answer_blocks=16)
    forced = cfg.sink_blocks + cfg.local_blocks
    # a prompt's last chunk (tokens 2000..3000 of 3000), a middle chunk (1000..2000 of a 3000-token prompt) and a
    # decode row that reads its stored prompt selection (prompt of 1000 tokens, now at 1100)
    slots = PromptSlots(4)
    warm = plan_batch([0, 1000], [1000], [cfg], 0, count=False, req_ids=["c"], live=frozenset("abc"),
                      prompt_lens=[1000])
    route_rows(warm, slots, fa_dense=False)
    plan = plan_batch([0, 1000, 2000, 2001], [3000, 2000, 1100], [cfg] * 3, 0, count=False,
                      req_ids=["a", "b", "c"], live=frozenset("abc"), prompt_lens=[3000, 3000, 1000])
    route_rows(plan, slots, fa_dense=False)
    st = Stats()
    st.record_plan(plan, [cfg] * 3, 64, 0)
    last = 2999 // 64
    plain = kept_blocks(0.95, forced, 2000 // 64, last) + kept_blocks(0.95, forced, 1000 // 64, 1999 // 64)
    k_last = kept_blocks(0.95, forced, last, last)
    assert k_last < 16
    assert st.totals[("kept", "prefill", "0.95")] == plain + 16 - k_last
    mp = 999 // 64
    assert st.totals[("kept", "decode", "0.95")] == max(kept_blocks(0.95, forced, mp, mp), 16) + 1099 // 64 - mp


def test_engine_setting_from_the_environment():
    from cab_vllm.backend.plan import EngineSettings

    assert EngineSettings.from_env({"CAB_ANSWER_BLOCKS": "32"}).cfg.answer_blocks == 32
    assert EngineSettings.from_env({}).cfg.answer_blocks == 0
    for bad in ("-1", "x", "1.5"):
        with pytest.raises(ValueError, match="CAB_ANSWER_BLOCKS"):
            EngineSettings.from_env({"CAB_ANSWER_BLOCKS": bad})


# -- answer_dense: the prompt's last query block attends to every causal block; decode keeps its own budget ---------
def test_answer_dense_makes_the_prompts_last_row_dense_and_leaves_decode_alone():
    from cab_vllm.backend.plan import keep_count

    base = CABConfig(sparsity=0.95, decode_rule="tokens", decode_sparsity=0.98)
    cfg = base.replace(answer_dense=True)
    for m in (1, 5, 64, 300):
        plain = base.keep_counts(m)
        got = cfg.keep_counts(m, answer=True, prompt=True)
        assert torch.equal(got[:-1], plain[:-1]) and int(got[-1]) == m
        assert torch.equal(cfg.keep_counts(m, answer=True), base.keep_counts(m, answer=True))  # a decode row: as before
    assert cfg.answer_keep(3, 64, prompt=True) == 64 and cfg.answer_keep(3, 64) == 3
    for n in (100, 4096, 64 * 500 + 7):  # the decode budgets (tokens and blocks) do not move
        assert cfg.decode_tokens(n) == base.decode_tokens(n) <= n
        assert n < 4096 or cfg.decode_tokens(n) < n
        assert keep_count(cfg, n) == keep_count(base, n)
    m = 37
    a = _rows_mass(1, 2, m, seed=4)
    i0, c0 = select_from_attention(a, a, base, impl="torch", answer=True)
    i1, c1 = select_from_attention(a, a, cfg, impl="torch", answer=True)
    assert torch.equal(c0[..., :-1], c1[..., :-1]) and (c1[..., -1] == m).all() and (c0[..., -1] < m).all()
    assert sorted(i1[0, 0, -1].tolist()) == list(range(m)) and i1.shape[-1] == max_keep(cfg, 0, m, answer=True) == m
    i2, c2 = select_from_attention(a, a, cfg, impl="torch")  # not the prompt's end: no change
    assert torch.equal(c2, c0)


def test_answer_dense_needs_a_decode_rule_of_its_own_and_a_bool():
    with pytest.raises(ValueError, match="answer_dense=True needs a decode rule of its own"):
        CABConfig(answer_dense=True)  # cab's "auto" rule decodes from the prompt's last selection
    with pytest.raises(ValueError, match="answer_dense=True needs a decode rule of its own"):
        CABConfig(answer_dense=True, decode_rule="prompt")
    assert CABConfig(answer_dense=True, decode_rule="bounds").answer_dense
    assert CABConfig(answer_dense=True, policy="magnitude").answer_dense  # magnitude's "auto": bounds
    for bad in (1, "1", None):
        with pytest.raises(ValueError, match=r"CABConfig\.answer_dense="):
            CABConfig(answer_dense=bad, decode_rule="tokens")


def test_metrics_count_the_dense_answer_row(monkeypatch):
    monkeypatch.setenv("CAB_METRICS", "0")
    from cab_vllm.backend.plan import PromptSlots, plan_batch, route_rows
    from cab_vllm.backend.stats import Stats, kept_blocks

    cfg = CABConfig(sparsity=0.95, decode_rule="tokens", answer_dense=True)
    forced = cfg.sink_blocks + cfg.local_blocks
    plan = plan_batch([0, 1000], [3000], [cfg], 0, count=False, req_ids=["a"], live=frozenset("a"),
                      prompt_lens=[3000])  # the prompt's last chunk: tokens 2000..2999
    route_rows(plan, PromptSlots(4), fa_dense=False)
    st = Stats()
    st.record_plan(plan, [cfg], 64, 0)
    last = 2999 // 64
    want = kept_blocks(0.95, forced, 2000 // 64, last) - kept_blocks(0.95, forced, last, last) + last + 1
    assert st.totals[("kept", "prefill", "0.95")] == want


def test_answer_dense_from_the_environment():
    from cab_vllm.backend.plan import EngineSettings

    assert EngineSettings.from_env({"CAB_ANSWER_DENSE": "1", "CAB_DECODE_RULE": "tokens"}).cfg.answer_dense
    assert not EngineSettings.from_env({}).cfg.answer_dense
    with pytest.raises(ValueError, match="CAB_ANSWER_DENSE"):
        EngineSettings.from_env({"CAB_ANSWER_DENSE": "2", "CAB_DECODE_RULE": "tokens"})
    with pytest.raises(ValueError, match="CAB_ANSWER_DENSE.*needs a decode rule of its own"):
        EngineSettings.from_env({"CAB_ANSWER_DENSE": "1"})
