"""decode_rule="tokens" and dense_prefill through the backend's planning and kernel path (no vLLM): the knobs, the
routing of token rows (the block kernel skips them, ops.token_decode runs them), the step figures, and the outputs
of a mixed batch against each row's own reference."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from backend_harness import PagedSim, dense_rows, rel_err
from cab_vllm.backend.plan import EngineSettings, plan_batch, route_rows
from cab_vllm.backend.stats import Stats, dense_reason
from cab_vllm.config import CABConfig, decode_token_count
from cab_vllm.ops._triton import HAS_TRITON, interpreting
from cab_vllm.ops.decode import MODE_ALL, MODE_BOUNDS, MODE_RECENT, MODE_SKIP
from cab_vllm.ops.token_decode import kept_keys


# -- knobs ----------------------------------------------------------------------------------------------------
def test_knobs_from_env_and_their_errors():
    s = EngineSettings.from_env({"CAB_DECODE_RULE": "tokens", "CAB_DENSE_PREFILL": "1"})
    assert s.cfg.decode_rule == "tokens" and s.cfg.dense_prefill and s.cfg.decode_scoring == "tokens"
    assert not EngineSettings.from_env({"CAB_DENSE_PREFILL": "0"}).cfg.dense_prefill
    with pytest.raises(ValueError, match="CAB_DENSE_PREFILL='yes' is invalid: expected 0 or 1"):
        EngineSettings.from_env({"CAB_DENSE_PREFILL": "yes"})
    # a dense prompt leaves the prompt rule nothing to reuse: the engine's start names it
    with pytest.raises(ValueError, match="CAB_DENSE_PREFILL.*needs a decode rule of its own"):
        EngineSettings.from_env({"CAB_DENSE_PREFILL": "1"})
    with pytest.raises(ValueError, match="dense_prefill=True needs a decode rule of its own"):
        CABConfig(dense_prefill=True, decode_rule="prompt")
    with pytest.raises(ValueError, match="dense_prefill"):
        CABConfig(dense_prefill=1, decode_rule="tokens")
    # the policies with a decode rule of their own keep it; "tokens" is for those that rank keys by attention
    assert CABConfig(policy="streaming", decode_rule="tokens").decode_scoring == "recent"
    assert CABConfig(policy="h2o", decode_rule="tokens").decode_scoring == "tokens"
    assert CABConfig(policy="streaming", dense_prefill=True).decode_scoring == "recent"


def test_token_scorer_knobs_and_their_errors():
    from cab_vllm.backend import plan as plan_mod
    from cab_vllm.ops import token_decode as td

    s = EngineSettings.from_env({"CAB_DECODE_RULE": "tokens", "CAB_TOKEN_SCORER": "int4", "CAB_TOKEN_RERANK": "3"})
    assert s.key_codes and s.token_rerank == 3
    assert not EngineSettings.from_env({"CAB_DECODE_RULE": "tokens"}).key_codes
    assert plan_mod.MAX_RERANK == td.MAX_RERANK
    with pytest.raises(ValueError, match="CAB_TOKEN_SCORER: token_scorer='int8' is invalid"):
        EngineSettings.from_env({"CAB_DECODE_RULE": "tokens", "CAB_TOKEN_SCORER": "int8"})
    with pytest.raises(ValueError, match="CAB_TOKEN_SCORER: .*needs decode_rule='tokens', got 'auto'"):
        EngineSettings.from_env({"CAB_TOKEN_SCORER": "int4"})
    with pytest.raises(ValueError, match="CAB_TOKEN_RERANK: token_rerank=0 is invalid"):
        EngineSettings.from_env({"CAB_DECODE_RULE": "tokens", "CAB_TOKEN_SCORER": "int4", "CAB_TOKEN_RERANK": "0"})
    with pytest.raises(ValueError, match="CAB_TOKEN_RERANK='x' is not a valid int"):
        EngineSettings.from_env({"CAB_TOKEN_RERANK": "x"})
    assert EngineSettings.from_env({}).token_passes == 1
    assert EngineSettings.from_env({"CAB_DECODE_RULE": "tokens", "CAB_TOKEN_PASSES": "2"}).token_passes == 2
    assert EngineSettings.from_env({"CAB_DECODE_RULE": "tokens", "CAB_TOKEN_PASSES": "0"}).token_passes == 0
    with pytest.raises(ValueError, match="CAB_TOKEN_PASSES: token_passes=3 is invalid: expected 0, 1 or 2"):
        EngineSettings.from_env({"CAB_TOKEN_PASSES": "3"})
    with pytest.raises(ValueError, match="CAB_TOKEN_PASSES: token_passes=0 .* takes no key copy"):
        EngineSettings.from_env({"CAB_DECODE_RULE": "tokens", "CAB_TOKEN_SCORER": "fp8", "CAB_TOKEN_PASSES": "0"})
    with pytest.raises(ValueError, match="CAB_TOKEN_PASSES='one' is not a valid int"):
        EngineSettings.from_env({"CAB_TOKEN_PASSES": "one"})


@dataclasses.dataclass(frozen=True)
class FakeSpec:
    """The fields of vLLM's KV cache spec that the key copy's page padding reads (a bf16 cache)."""

    block_size: int = 16
    num_kv_heads: int = 2
    head_size: int = 64
    page_size_padded: int | None = None

    @property
    def page_size_bytes(self):
        return self.page_size_padded or 2 * self.block_size * self.num_kv_heads * self.head_size * 2


def test_pages_padded_for_the_key_copy_and_its_views():
    """The KV cache spec's pages grow by the copy's bytes (what vLLM then counts); the views of a padded cache
    address each page's tail (the K/V content untouched by writes to them); a cache without the room is refused."""
    from cab_vllm.backend import compat
    from cab_vllm.ops.key_codes import page_tail_bytes

    padded = compat.with_key_code_pages(FakeSpec())
    assert padded.page_size_padded == 2 * 16 * 2 * 64 * 2 + 16 * 2 * (32 + 16) == 8192 + page_tail_bytes(16, 2, 64)
    with pytest.raises(NotImplementedError, match="already padded"):
        compat.with_key_code_pages(padded)
    pages, hkv, page, d = 5, 2, 16, 64
    elems = padded.page_size_padded // 2
    flat = torch.zeros(pages * elems, dtype=torch.bfloat16)
    kv = flat.as_strided((pages, hkv, page, 2 * d), (elems, 2 * d, hkv * 2 * d, 1))  # NHD inside the page
    codes = compat.key_codes_view(kv, d)
    codes.codes.fill_(0xFF)
    codes.bounds.fill_(1.0009765625)  # 0x3C01: both bytes nonzero
    assert torch.all(kv == 0)  # the tails are outside every page's K/V
    assert int((flat.view(torch.uint8) != 0).sum()) == pages * page_tail_bytes(page, hkv, d)
    with pytest.raises(RuntimeError, match="CAB_TOKEN_SCORER=int4: the KV cache.s pages have no room for the key copy"):
        compat.key_codes_view(torch.zeros(pages, hkv, page, 2 * d, dtype=torch.bfloat16), d)


def test_releases_without_customize_spec_get_padded_pages_from_the_layer(monkeypatch):
    """vLLM 0.26/0.27 (no AttentionBackend.customize_spec): the plugin wraps Attention.get_kv_cache_spec once; with
    CAB_TOKEN_SCORER=int4 a CAB layer's spec comes back with its pages padded for the copy, another backend's and an
    engine without the copy's unchanged."""
    pytest.importorskip("vllm")
    from vllm.model_executor.layers.attention import attention as attn_mod
    from vllm.v1.attention.backend import AttentionBackend

    from cab_vllm.backend import compat
    from cab_vllm.ops.key_codes import page_tail_bytes

    monkeypatch.delattr(AttentionBackend, "customize_spec")
    monkeypatch.setattr(attn_mod.Attention, "get_kv_cache_spec",
                        lambda self, vc: FakeSpec(num_kv_heads=8, head_size=128))
    compat.hook_key_code_pages()
    compat.hook_key_code_pages()  # idempotent: wrapped once
    wrapped = attn_mod.Attention.get_kv_cache_spec
    assert wrapped._cab_hooked

    class CABLayer:
        from cab_vllm.backend.backend import CABBackend as attn_backend

    class OtherLayer:
        attn_backend = AttentionBackend

    monkeypatch.setenv("CAB_DECODE_RULE", "tokens")
    monkeypatch.setenv("CAB_TOKEN_SCORER", "int4")
    assert wrapped(CABLayer(), None).page_size_padded == 2 * 16 * 8 * 128 * 2 + page_tail_bytes(16, 8, 128)
    assert wrapped(OtherLayer(), None).page_size_padded is None
    monkeypatch.setenv("CAB_TOKEN_SCORER", "exact")
    assert wrapped(CABLayer(), None).page_size_padded is None


@pytest.mark.parametrize("n", [1, 63, 64, 65, 700, 4096, 131072])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.98])
def test_decode_tokens_is_what_the_kept_blocks_hold(n, sparsity):
    cfg = CABConfig(sparsity=sparsity, decode_rule="tokens")
    m = -(-n // 64)
    k = int(cfg.keep_counts(m, answer=True)[-1])
    lengths = [64] * (m - 1) + [n - 64 * (m - 1)]  # the query's own block is the last, partial one
    assert cfg.decode_tokens(n) == min(n, 64 * (k - 1) + lengths[-1]) == decode_token_count(k, n, 64)
    assert 1 <= cfg.decode_tokens(n) <= n


def test_decode_sparsity_sets_the_decode_budget_alone():
    cfg = CABConfig(sparsity=0.8, decode_rule="tokens", decode_sparsity=0.98)
    for n in (65, 4096, 131072):
        assert cfg.decode_tokens(n) == CABConfig(sparsity=0.98, decode_rule="tokens").decode_tokens(n)
        assert cfg.decode_tokens(n) <= CABConfig(sparsity=0.8, decode_rule="tokens").decode_tokens(n)
    assert cfg.decode_tokens(4096) < CABConfig(sparsity=0.8, decode_rule="tokens").decode_tokens(4096)
    assert cfg.keep_counts(64).tolist() == CABConfig(sparsity=0.8).keep_counts(64).tolist()  # the prompt's budget
    assert cfg.decode_config.sparsity == 0.98 and cfg.decode_config.decode_sparsity is None
    assert CABConfig(decode_rule="tokens").decode_config == CABConfig(decode_rule="tokens")
    # the engine's planner gives a token row that budget, and counts its blocks
    plan = plan_batch([0, 1], [5000], [cfg], 1024, count=False)
    route_rows(plan, None, fa_dense=True)
    assert plan.tkeep == [cfg.decode_tokens(5000)]
    assert plan.keep == [int(cfg.decode_config.keep_counts(-(-5000 // 64), answer=True)[-1])]
    assert plan.keep == [cfg.decode_blocks(5000)]
    s = EngineSettings.from_env({"CAB_DECODE_RULE": "tokens", "CAB_DECODE_SPARSITY": "0.98", "CAB_SPARSITY": "0.8"})
    assert (s.cfg.sparsity, s.cfg.decode_sparsity) == (0.8, 0.98)
    with pytest.raises(ValueError, match="CAB_DECODE_SPARSITY.*needs decode_rule='tokens'"):
        EngineSettings.from_env({"CAB_DECODE_SPARSITY": "0.98"})
    with pytest.raises(ValueError, match="CAB_DECODE_SPARSITY='high' is not a valid float"):
        EngineSettings.from_env({"CAB_DECODE_RULE": "tokens", "CAB_DECODE_SPARSITY": "high"})
    for bad in (1.0, -0.1, float("nan"), True):
        with pytest.raises(ValueError, match="decode_sparsity"):
            CABConfig(decode_rule="tokens", decode_sparsity=bad)


def test_dense_reason_of_a_dense_prefill():
    cfg = CABConfig(dense_prefill=True, decode_rule="tokens", sparsity=0.9)
    assert dense_reason(cfg, 5000, 1024) == "dense_prefill"
    assert dense_reason(cfg, 5000, 1024, decode=True) is None
    assert dense_reason(cfg, 500, 1024, decode=True) == "below_threshold"


# -- routing and figures --------------------------------------------------------------------------------------
def test_route_rows_gives_token_rows_their_budget_and_the_block_kernel_skips_them():
    tok = CABConfig(sparsity=0.9, decode_rule="tokens", dense_prefill=True)
    cfgs = [tok, tok.replace(policy="streaming"), tok, tok]
    # three decodes (one below the threshold) and a prompt
    plan = plan_batch([0, 1, 2, 3, 3003], [5000, 3000, 700, 3000], cfgs, 1024, count=False)
    route_rows(plan, None, fa_dense=True)
    assert plan.dense == [False, False, True, True]  # the prompt runs dense (dense_prefill), the short decode too
    assert plan.modes == [MODE_SKIP, MODE_RECENT, MODE_SKIP]
    assert plan.tkeep == [tok.decode_tokens(5000), 0, 0]
    assert plan.keep[0] == int(tok.keep_counts(-(-5000 // 64), answer=True)[-1])  # what the figures count
    st = Stats()
    step = st._plan_counts(plan, cfgs, 64, 1024)
    assert step[("dense", "prefill", "dense_prefill")] == 1
    assert step[("rows", "decode", "0.90", "cab", "sparse")] == 1
    m = -(-5000 // 64)
    m_s = -(-3000 // 64)
    kept_stream = plan.keep[1]
    m_short = -(-700 // 64)
    assert step[("kept", "decode", "0.90")] == plan.keep[0] + kept_stream + m_short
    assert step[("causal", "decode", "0.90")] == m + m_s + m_short


def test_without_the_tokens_rule_no_row_gets_a_token_budget():
    cfg = CABConfig(sparsity=0.9, decode_rule="bounds")
    plan = plan_batch([0, 1], [5000], [cfg], 1024, count=False)
    route_rows(plan, None, fa_dense=True)
    assert plan.modes == [MODE_BOUNDS] and plan.tkeep == [0]


# -- outputs --------------------------------------------------------------------------------------------------
def token_reference(sim, s, n, keep, scale):
    """Float64 attention of sequence s's query at n - 1 over each head's kept keys (kept_keys' rule)."""
    q = sim.q[s][:, n - 1].double()  # [Hq, D]
    k, v = sim.k[s][:, :n].double(), sim.v[s][:, :n].double()
    g = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
    z = torch.einsum("hd,hnd->hn", q, k) * scale
    z = z.masked_fill(~kept_keys((z * 1.4426950408889634).float(), keep), float("-inf"))
    return torch.einsum("hn,hnd->hd", torch.softmax(z, -1), v)[None]


IMPLS = ["torch"] + (["triton"] if HAS_TRITON and interpreting() else [])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("page_size", [16, 64], ids=lambda p: f"page{p}")
def test_a_mixed_batch_with_token_rows(impl, page_size):
    """Dense prompts (dense_prefill), then decode steps where token rows, a streaming row (block kernel) and a dense
    row sit together: every row equals its own reference."""
    lens = [900, 700, 710, 660]
    hq, hkv, d = 6, 2, 32
    gen = torch.Generator().manual_seed(11)
    mk = lambda h, n: torch.randn(h, n, d, generator=gen)  # noqa: E731
    tok = CABConfig(sparsity=0.9, decode_rule="tokens", dense_prefill=True)
    sim = PagedSim([mk(hq, n) for n in lens], [mk(hkv, n) for n in lens], [mk(hkv, n) for n in lens], page_size,
                   tok)
    cfgs = [tok, tok.replace(sparsity=0.98), tok.replace(policy="streaming"), tok.replace(sparsity=0.0)]
    scale = 1 / math.sqrt(d)
    out, md = sim.step([(0, 895), (1, 695), (2, 705), (3, 650)], cfgs=cfgs, dense_threshold=512, impl=impl)
    assert md["plan"].dense == [True] * 4  # dense_prefill: every prompt, whatever its policy
    want = torch.cat([dense_rows(sim.q, sim.k, sim.v, 0, 0, 895, scale), dense_rows(sim.q, sim.k, sim.v, 1, 0, 695,
                                                                                      scale)])
    assert rel_err(out[: 895 + 695], want) < 1e-5
    for _ in range(3):
        out, md = sim.step([(0, 1), (1, 1), (2, 1), (3, 1)], cfgs=cfgs, dense_threshold=512, impl=impl)
        plan = md["plan"]
        assert plan.modes == [MODE_SKIP, MODE_SKIP, MODE_RECENT, MODE_ALL] and plan.tkeep[2:] == [0, 0]
        n3 = sim.done[3]
        assert rel_err(out[3:4], dense_rows(sim.q, sim.k, sim.v, 3, n3 - 1, n3, scale)) < 1e-5
        for r, s in ((0, 0), (1, 1)):
            n = sim.done[s]
            assert plan.tkeep[r] == cfgs[r].decode_tokens(n) < n
            assert rel_err(out[r:r + 1], token_reference(sim, s, n, plan.tkeep[r], scale)) < 1e-5
        # the streaming row through the block kernel: its recorded blocks
        n = sim.done[2]
        idx, cnt = md["decode"]
        blocks = idx[2, 0, : int(cnt[2, 0])].tolist()
        keys = torch.zeros(n, dtype=torch.bool)
        for j in blocks:
            keys[j * 64:(j + 1) * 64] = True
        q = sim.q[2][:, n - 1].double()
        kk = sim.k[2][:, :n].double().repeat_interleave(3, 0)
        vv = sim.v[2][:, :n].double().repeat_interleave(3, 0)
        z = torch.einsum("hd,hnd->hn", q, kk).mul(scale).masked_fill(~keys, float("-inf"))
        assert rel_err(out[2:3], torch.einsum("hn,hnd->hd", torch.softmax(z, -1), vv)[None]) < 1e-5


def fresh_copy(sim, s, n, fmt):
    """The key copy (format fmt) of sequence s's first n keys made in one go on a contiguous cache of 16-token pages,
    and that cache's block table row [1, pages]."""
    from cab_vllm.ops import key_codes as kq

    hkv, d, dev = sim.k[s].shape[0], sim.k[s].shape[-1], sim.k[s].device
    pages = -(-n // 16)
    cache = torch.zeros(pages * 16, hkv, d, dtype=sim.k[s].dtype, device=dev)
    cache[:n] = sim.k[s][:, :n].transpose(0, 1)
    cache = cache.view(pages, 16, hkv, d)
    bt = torch.arange(pages, dtype=torch.int32, device=dev)[None]
    codes = kq.key_codes(pages, 16, hkv, d, dev, fmt)
    ln = torch.tensor([n], dtype=torch.int32, device=dev)
    return kq.encode_keys(cache, codes, bt, ln, ln, impl="torch"), bt


def int4_reference(sim, s, n, keep, scale, rerank):
    """Float64 attention of sequence s's query at n - 1 over each head's kept keys when a 4-bit copy ranks them:
    the copy of the row's keys made in one go (ops.key_codes on a contiguous cache: the engine's copy, encoded step
    by step in its pages, must read back the same), candidates by kept_keys' rule at rerank x keep, then the rule
    again on their exact scores."""
    from cab_vllm.ops import key_codes as kq

    codes, bt = fresh_copy(sim, s, n, "int4")
    q = sim.q[s][:, n - 1].double()
    g = q.shape[0] // sim.k[s].shape[0]
    est = torch.einsum("hd,hnd->hn", q.float(), kq.dequantize(codes, bt[0], n).repeat_interleave(g, 0))
    k, v = sim.k[s][:, :n].double().repeat_interleave(g, 0), sim.v[s][:, :n].double().repeat_interleave(g, 0)
    z = torch.einsum("hd,hnd->hn", q, k) * scale
    z = z.masked_fill(~kept_keys(est * (scale * 1.4426950408889634), keep * rerank), float("-inf"))
    z = z.masked_fill(~kept_keys((z * 1.4426950408889634).float(), keep), float("-inf"))
    return torch.einsum("hn,hnd->hd", torch.softmax(z, -1), v)[None]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("page_size", [16, 32], ids=lambda p: f"page{p}")
@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_token_rows_ranked_by_the_pages_key_copy(impl, page_size, fmt):
    """CAB_TOKEN_SCORER=int4 / fp8: the cache pages end with the key copy, encoded step by step as prompts arrive
    in chunks and decode steps add keys; token rows rank by it (int4 at rerank 1: the copy's own best keys; fp8: the
    copy's best keys attended by exact score; both differ from the exact ones here, so the test tells the two
    apart) and equal their own reference; a streaming row beside them is untouched by it."""
    lens = [700, 650, 600]
    hq, hkv, d = 4, 2, 32
    gen = torch.Generator().manual_seed(12)
    mk = lambda h, n: torch.randn(h, n, d, generator=gen)  # noqa: E731
    tok = CABConfig(sparsity=0.9, decode_rule="tokens", dense_prefill=True)
    sim = PagedSim([mk(hq, n) for n in lens], [mk(hkv, n) for n in lens], [mk(hkv, n) for n in lens], page_size,
                   tok, token_rerank=1, token_scorer=fmt)
    cfgs = [tok, tok.replace(sparsity=0.98), tok.replace(policy="streaming")]
    sim.step([(0, 300), (1, 250), (2, 590)], cfgs=cfgs, dense_threshold=256, impl=impl)
    sim.step([(0, 390), (1, 390)], cfgs=cfgs[:2], dense_threshold=256, impl=impl)
    scale = 1 / math.sqrt(d)
    differs = False
    for _ in range(3):
        out, md = sim.step([(0, 1), (1, 1), (2, 1)], cfgs=cfgs, dense_threshold=256, impl=impl)
        plan = md["plan"]
        assert plan.modes == [MODE_SKIP, MODE_SKIP, MODE_RECENT]
        for r in (0, 1):
            n = sim.done[r]
            ref = (int4_reference(sim, r, n, plan.tkeep[r], scale, 1) if fmt == "int4"
                   else fp8_reference(sim, r, n, plan.tkeep[r], scale))
            assert rel_err(out[r:r + 1], ref) < 1e-5
            differs |= rel_err(ref, token_reference(sim, r, n, plan.tkeep[r], scale)) > 1e-4
        assert torch.isfinite(out[2]).all()
    assert differs


def test_token_rows_not_first_in_the_batch_are_written_back():
    """A decode row after a prompt row (not vLLM's order): its output is gathered and written back."""
    lens = [400, 300]
    hq, hkv, d = 4, 2, 16
    gen = torch.Generator().manual_seed(2)
    mk = lambda h, n: torch.randn(h, n, d, generator=gen)  # noqa: E731
    tok = CABConfig(sparsity=0.9, decode_rule="tokens")
    sim = PagedSim([mk(hq, n) for n in lens], [mk(hkv, n) for n in lens], [mk(hkv, n) for n in lens], 16, tok)
    sim.step([(0, 399)], dense_threshold=0)
    out, md = sim.step([(1, 300), (0, 1)], dense_threshold=0)
    assert md["plan"].decode_rows == [1] and md["plan"].tkeep == [tok.decode_tokens(400)]
    assert rel_err(out[300:301], token_reference(sim, 0, 400, md["plan"].tkeep[0], 1 / math.sqrt(d))) < 1e-5


def test_warm_up_runs_the_token_decode_on_the_engines_scratch(monkeypatch):
    """With the tokens rule the warm-up's decode steps of an estimating policy run the token decode, on the scratch
    the engine's steps use (the compiled variants are theirs); without it none does."""
    import cab_vllm.ops.token_decode as td
    from cab_vllm.backend.attention import DecodeWorkspace
    from cab_vllm.backend.warmup import warm_up_kernels

    seen = []
    real = td.token_decode
    monkeypatch.setattr(td, "token_decode", lambda *a, **kw: seen.append((a[5].tolist(), kw.get("scratch")))
                        or real(*a, **kw))
    scratch = td.token_scratch(1, 4, 2, 32, 64 * 64, "cpu")
    cfg = CABConfig(decode_rule="tokens", dense_prefill=True)
    warm_up_kernels(4, 2, 32, torch.float32, "cpu", cfg, DecodeWorkspace(4, 4, 2, 32, 64, "cpu"),
                    token_scratch=scratch)
    assert seen and all(s is scratch and k[0] > 0 for k, s in seen)
    seen.clear()
    warm_up_kernels(4, 2, 32, torch.float32, "cpu", CABConfig(decode_rule="bounds"),
                    DecodeWorkspace(4, 4, 2, 32, 64, "cpu"), token_scratch=scratch)
    assert seen == []


@pytest.mark.gpu
def test_token_rows_through_the_kernel_path_gpu():
    """On a GPU, 8B geometry in bf16: dense prompts of 20k and 5k tokens, then decode steps at 98% whose token rows
    run the Triton token decode; each row against its own float64 reference (the same kept keys)."""
    lens = [20010, 5010]
    hq, hkv, d = 32, 8, 128
    gen = torch.Generator().manual_seed(21)
    mk = lambda h, n: torch.randn(h, n, d, generator=gen).to("cuda", torch.bfloat16)  # noqa: E731
    tok = CABConfig(sparsity=0.98, decode_rule="tokens", dense_prefill=True)
    sim = PagedSim([mk(hq, n) for n in lens], [mk(hkv, n) for n in lens], [mk(hkv, n) for n in lens], 16, tok)
    sim.step([(0, 20000), (1, 5000)], dense_threshold=1024, impl="triton")
    scale = 1 / math.sqrt(d)
    for _ in range(3):
        out, md = sim.step([(0, 1), (1, 1)], dense_threshold=1024, impl="triton")
        plan = md["plan"]
        assert plan.modes == [MODE_SKIP, MODE_SKIP] and all(plan.tkeep)
        for r in (0, 1):
            n = sim.done[r]
            ref = token_reference(sim, r, n, plan.tkeep[r], scale)
            assert rel_err(out[r:r + 1], ref) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_token_rows_ranked_by_the_key_copy_gpu(fmt):
    """On a GPU, 8B geometry in bf16, the cache's pages padded for the key copy (CAB_TOKEN_SCORER=int4 / fp8): dense
    prompts of 20k and 5k tokens encoded by the kernel, then decode steps at 98% whose token rows rank by the copy
    (int4 at rerank 2; fp8: its best keys attended by exact score) in the Triton launches; each row against its own
    float64 reference (the copy made by the twin)."""
    lens = [20010, 5010]
    hq, hkv, d = 32, 8, 128
    gen = torch.Generator().manual_seed(22)
    mk = lambda h, n: torch.randn(h, n, d, generator=gen).to("cuda", torch.bfloat16)  # noqa: E731
    tok = CABConfig(sparsity=0.98, decode_rule="tokens", dense_prefill=True)
    sim = PagedSim([mk(hq, n) for n in lens], [mk(hkv, n) for n in lens], [mk(hkv, n) for n in lens], 16, tok,
                   token_rerank=2, token_scorer=fmt)
    sim.step([(0, 20000), (1, 5000)], dense_threshold=1024, impl="triton")
    scale = 1 / math.sqrt(d)
    for _ in range(3):
        out, md = sim.step([(0, 1), (1, 1)], dense_threshold=1024, impl="triton")
        for r in (0, 1):
            n, keep = sim.done[r], md["plan"].tkeep[r]
            ref = int4_reference(sim, r, n, keep, scale, 2) if fmt == "int4" else fp8_reference(sim, r, n, keep, scale)
            assert rel_err(out[r:r + 1], ref) < 2e-2


# -- CAB_TOKEN_SCORER=fp8: a centered float8 copy in the pages' tails; the estimate's keep best attended exactly ----
def test_fp8_scorer_setting_and_its_pages():
    """CAB_TOKEN_SCORER=fp8 keeps a copy (key_codes); its pages grow by the float8 copy's bytes (D + 2 (D/16 + 1)
    per token and head), whose views address each page's tail only; an int4-sized page has no room for it."""
    from cab_vllm.backend import compat
    from cab_vllm.ops.key_codes import page_tail_bytes

    s = EngineSettings.from_env({"CAB_DECODE_RULE": "tokens", "CAB_TOKEN_SCORER": "fp8"})
    assert s.key_codes and s.token_scorer == "fp8"
    padded = compat.with_key_code_pages(FakeSpec(), "fp8")
    assert padded.page_size_padded == 8192 + 16 * 2 * (64 + 2 * 5) == 8192 + page_tail_bytes(16, 2, 64, "fp8")
    pages, hkv, page, d = 5, 2, 16, 64
    elems = padded.page_size_padded // 2
    flat = torch.zeros(pages * elems, dtype=torch.bfloat16)
    kv = flat.as_strided((pages, hkv, page, 2 * d), (elems, 2 * d, hkv * 2 * d, 1))
    codes = compat.key_codes_view(kv, d, "fp8")
    assert codes.fmt == "fp8" and codes.codes.shape[-1] == d and codes.bounds.shape[-1] == d // 16 + 1
    codes.codes.fill_(0xFF)
    codes.bounds.fill_(1.0009765625)
    assert torch.all(kv == 0)
    assert int((flat.view(torch.uint8) != 0).sum()) == pages * page_tail_bytes(page, hkv, d, "fp8")
    small = compat.with_key_code_pages(FakeSpec(), "int4").page_size_padded // 2
    kv4 = torch.zeros(pages * small, dtype=torch.bfloat16).as_strided((pages, hkv, page, 2 * d),
                                                                       (small, 2 * d, hkv * 2 * d, 1))
    with pytest.raises(RuntimeError, match="CAB_TOKEN_SCORER=fp8: the KV cache's pages have no room"):
        compat.key_codes_view(kv4, d, "fp8")


def fp8_reference(sim, s, n, keep, scale):
    """Float64 attention of sequence s's query at n - 1 over the keys kept_keys' rule keeps of the float8 copy's
    estimates (the copy made in one go on a contiguous cache: the engine's, encoded step by step in its pages, must
    read back the same), by their exact scores."""
    from cab_vllm.ops import key_codes as kq

    codes, bt = fresh_copy(sim, s, n, "fp8")
    hkv, d = sim.k[s].shape[0], sim.k[s].shape[-1]
    q = sim.q[s][:, n - 1].double()
    g = q.shape[0] // hkv
    est = kq.estimate(q.view(hkv, g, d), codes, bt[0], n).reshape(hkv * g, n)
    k, v = sim.k[s][:, :n].double().repeat_interleave(g, 0), sim.v[s][:, :n].double().repeat_interleave(g, 0)
    z = torch.einsum("hd,hnd->hn", q, k) * scale
    z = z.masked_fill(~kept_keys(est * (scale * 1.4426950408889634), keep), float("-inf"))
    return torch.einsum("hn,hnd->hd", torch.softmax(z, -1), v)[None]

