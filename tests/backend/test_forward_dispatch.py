"""CABImpl.forward's dispatch per layer: a step whose rows all run in vLLM's FlashAttention (short requests,
sparsity 0) does no CAB work at all after FlashAttention (no cache views, no buffers, no attend); a step with CAB
rows runs both."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

import cab_vllm.backend.backend as backend  # noqa: E402
from cab_vllm.backend.plan import BatchPlan, KernelOptions  # noqa: E402


class FakeFA:
    def __init__(self):
        self.calls = 0

    def forward(self, layer, query, key, value, kv_cache, md, output):
        self.calls += 1
        output.fill_(1.0)
        return output


def _impl(monkeypatch, calls):
    impl = object.__new__(backend.CABImpl)
    impl.fa, impl._traced, impl.head_size, impl.num_heads, impl._dense = FakeFA(), True, 8, 2, False
    impl._encodes, impl._codes = False, None  # (CAB_TOKEN_SCORER=int4 off)
    impl._fa_prefill, impl._fa_prefill_key = None, (torch.float32, 1)  # CAB's Triton kernel, decided for this cache
    cache = torch.zeros(1, 1, 1, 8)
    monkeypatch.setattr(backend.compat, "split_kv", lambda *a: calls.append("split_kv") or (cache, cache))
    monkeypatch.setattr(backend.CABImpl, "_buffers", lambda self, *a: calls.append("buffers"))
    monkeypatch.setattr(backend, "attend", lambda *a, **kw: calls.append("attend"))
    return impl


def _md(**flags):
    plan = BatchPlan([0], [], [None], [True], [0, 1], [10])
    return backend.CABMetadata(1, torch.tensor([0, 1]), torch.tensor([10]), torch.zeros(1, 1, dtype=torch.int32),
                               torch.zeros(1, dtype=torch.int64), plan, **flags)


def test_an_all_dense_step_does_no_cab_work_after_flash_attention(monkeypatch):
    calls = []
    impl = _impl(monkeypatch, calls)
    q = torch.zeros(1, 16)
    out = impl.forward(None, q, q, q, torch.zeros(1), _md(run_fa=True), torch.zeros(1, 16))
    assert impl.fa.calls == 1 and calls == [] and bool((out == 1).all())


@pytest.mark.parametrize("dense_layer", [False, True], ids=["sparse-layer", "dense-layer"])
def test_the_key_copy_is_encoded_in_every_step_whatever_runs_it(monkeypatch, dense_layer):
    """CAB_TOKEN_SCORER=int4: a step whose rows all run in FlashAttention (a dense prompt, a short request that may
    later grow past the dense threshold) and the layers CAB_DENSE_LAYERS keeps dense still encode their new keys
    first: a later token decode ranks every key by the copy."""
    calls = []
    impl = _impl(monkeypatch, calls)
    impl._encodes, impl._dense = True, dense_layer
    monkeypatch.setattr(backend.CABImpl, "_encode", lambda self, kv, md: calls.append("encode"))
    q = torch.zeros(1, 16)
    impl.forward(None, q, q, q, torch.zeros(1), _md(run_fa=True, fa_all=object()), torch.zeros(1, 16))
    assert calls == ["encode"] and impl.fa.calls == 1


@pytest.mark.parametrize("flags", [dict(run_fa=True, run_cab_prefill=True), dict(run_cab_decode=True)],
                         ids=["dense-and-sparse-prefill", "sparse-decode"])
def test_a_step_with_cab_rows_runs_them(monkeypatch, flags):
    calls = []
    impl = _impl(monkeypatch, calls)
    impl.table = impl.workspace = impl.summaries = None
    impl.settings = backend.compat.engine_settings()
    impl.scale = 1.0
    routes = backend.DecodeRoutes(*[torch.zeros(1, dtype=torch.int32)] * 7)
    q = torch.zeros(1, 16)

    class T:  # the prompt table / workspace fields forward reads
        idx = cnt = sel_idx = sel_cnt = torch.zeros(1, dtype=torch.int32)

    impl.table = impl.workspace = T()
    impl.forward(None, q, q, q, torch.zeros(1), _md(routes=routes, **flags), torch.zeros(1, 16))
    assert calls == ["split_kv", "buffers", "attend"]
    assert impl.fa.calls == (1 if flags.get("run_fa") else 0)


@pytest.mark.parametrize("mode", ["plain", "branches", "dense-decode"], ids=["plain-graph", "graph-branches",
                                                                            "dense-decode"])
def test_a_captured_decode_step(monkeypatch, mode):
    """While a decode step's CUDA graph is captured both launches are recorded (which rows are dense changes per
    replay); with CAB_GRAPH_BRANCHES each sits in its own IF node, FlashAttention's on the builder's first flag and
    CAB's on the second; with CAB_DENSE_DECODE CAB's launch runs the dense rows too and FlashAttention's is not
    recorded."""
    import contextlib
    import dataclasses

    calls = []
    impl = _impl(monkeypatch, calls)
    impl.fa.forward = lambda *a: calls.append("fa")
    impl.settings = dataclasses.replace(backend.compat.engine_settings(),
                                        kernels=KernelOptions(graph_branches=mode == "branches",
                                                              dense_decode=mode == "dense-decode"))
    impl.scale = 1.0

    class T:
        idx = cnt = sel_idx = sel_cnt = torch.zeros(1, dtype=torch.int32)

    impl.table = impl.workspace = T()
    impl.summaries = None
    flags = (torch.zeros(1, dtype=torch.bool), torch.ones(1, dtype=torch.bool))

    @contextlib.contextmanager
    def branch(pred):
        calls.append(("if", "fa" if pred is flags[0] else "cab"))
        yield
        calls.append("end")

    monkeypatch.setattr(backend, "graph_branches", lambda *preds: [branch(p) for p in preds])
    monkeypatch.setattr(backend, "_capturing", lambda q: True)
    routes = backend.DecodeRoutes(*[torch.zeros(1, dtype=torch.int32)] * 7)
    q = torch.zeros(1, 16)
    impl.forward(None, q, q, q, torch.zeros(1), _md(routes=routes, branches=flags), torch.zeros(1, 16))
    if mode == "branches":
        assert calls == [("if", "fa"), "fa", "end", ("if", "cab"), "split_kv", "buffers", "attend", "end"]
    elif mode == "dense-decode":
        assert calls == ["split_kv", "buffers", "attend"]
    else:
        assert calls == ["fa", "split_kv", "buffers", "attend"]


class _FakeFABuilder:
    def build(self, common_prefix_len, cm, fast_build=False):
        return ("fa", cm.seq_lens.tolist())


def _builder(rows=8, fa=True):
    from cab_vllm.backend.plan import EngineSettings, PromptSlots

    b = object.__new__(backend.CABMetadataBuilder)
    b.settings, b._runner, b._v2, b._warned, b._trace, b._record = EngineSettings(), None, None, set(), False, False
    b.rows, b.slots, b.summaries, b.fa = rows, PromptSlots(rows), None, _FakeFABuilder() if fa else None
    b.fa_all, b._dense_share = None, 0.0
    b._routes = torch.zeros(backend.ROUTE_FIELDS, rows, dtype=torch.int32)
    b._fa_seq_lens = torch.zeros(rows, dtype=torch.int32)
    b._fa_tail, b._ring, b._views = 0, backend._PinnedRing((backend.ROUTE_FIELDS, rows), pinned=False), {}
    flags = backend.flag_views(b._routes[5])
    b._branches = (flags[1:2], flags[2:3])
    return b


def _cm(seq_lens, qlens):
    import inspect

    from vllm.v1.attention.backends.utils import CommonAttentionMetadata

    n = len(seq_lens)
    qsl = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    kw = dict(query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=sl, seq_lens_cpu=sl, num_reqs=n,
              num_actual_tokens=int(qsl[-1]), max_query_len=max(qlens), max_seq_len=max(seq_lens),
              block_table_tensor=torch.zeros(n, 512, dtype=torch.int32), slot_mapping=torch.zeros(int(qsl[-1]),
                                                                                                  dtype=torch.int64),
              causal=True, num_computed_tokens_cpu=sl - torch.tensor(qlens, dtype=torch.int32))
    params = inspect.signature(CommonAttentionMetadata).parameters
    return CommonAttentionMetadata(**{k: v for k, v in kw.items() if k in params})


@pytest.mark.parametrize("seq_lens, fa, cab", [([100, 90], True, False), ([20000, 30000], False, True),
                                               ([20000, 90, 30000], True, True)],
                         ids=["all-dense", "all-sparse", "mixed"])
def test_the_step_flags_the_graph_branches_read(seq_lens, fa, cab):
    """The builder's flags for a decode step (copied to the device with the routes): FlashAttention has rows, CAB
    has rows; the metadata's branch views read them as bools, and FlashAttention's sequence lengths are 0 for
    CAB's rows. A smaller step after a larger one leaves no stale row behind. (The branches exist with
    CAB_GRAPH_BRANCHES, which keeps dense decode rows in FlashAttention.)"""
    from cab_vllm.backend.plan import EngineSettings

    b = _builder()
    b.settings = EngineSettings(kernels=KernelOptions(graph_branches=True))
    b.build(0, _cm([20000] * 6, [1] * 6))  # a larger step first
    md = b.build(0, _cm(seq_lens, [1] * len(seq_lens)))
    assert [bool(md.branches[0]), bool(md.branches[1])] == [fa, cab]
    assert md.run_fa == fa and md.run_cab_decode == cab
    dense = [n < b.settings.dense_threshold for n in seq_lens]
    assert b._fa_seq_lens.tolist() == [n if d else 0 for n, d in zip(seq_lens, dense)] + [0] * (8 - len(seq_lens))
    assert b._routes[0, len(seq_lens):].tolist() == [0] * (8 - len(seq_lens))  # rows past the step: MODE_SKIP
    assert b._routes[0, :len(seq_lens)].ne(0).tolist() == [not d for d in dense]


@pytest.mark.parametrize("seq_lens, qlens", [([100, 90], [1, 1]), ([20000, 90, 30000], [1, 1, 1]),
                                              ([100, 20000, 300], [1, 1, 300]), ([100, 90, 20000], [1, 1, 4000])],
                         ids=["all-dense-decode", "mixed-decode", "dense-prefill", "sparse-prefill"])
def test_dense_decode_rows_run_in_cab_with_dense_decode(seq_lens, qlens):
    """CAB_DENSE_DECODE=1: a dense decode row is CAB's (MODE_ALL: every key block), FlashAttention gets sequence
    length 0 for it and runs only when a dense prefill row is in the step; the captured-graph metadata does not
    launch FlashAttention. Without the option the same dense decode rows are FlashAttention's (MODE_SKIP)."""
    import dataclasses

    from cab_vllm.backend.plan import EngineSettings
    from cab_vllm.ops.decode import MODE_ALL, MODE_SKIP

    for dense_decode in (False, True):
        b = _builder()
        b.settings = EngineSettings(kernels=KernelOptions(dense_decode=dense_decode))
        b.build(0, _cm([20000] * 6, [1] * 6))  # a larger step first: no stale FlashAttention row left behind
        md = b.build(0, _cm(seq_lens, qlens))
        dense = [n < b.settings.dense_threshold for n in seq_lens]
        decode = [q == 1 for q in qlens]
        fa_rows = [d and (q > 1 or not dense_decode) for d, q in zip(dense, qlens)]
        assert md.run_fa == any(fa_rows)
        assert (md.fa is not None) == (any(fa_rows) or not dense_decode)  # built for the steps it runs in
        if md.fa is not None:
            assert md.fa[1] == [n if f else 0 for n, f in zip(seq_lens, fa_rows)]
        d = sum(decode)
        want = [(MODE_ALL if dense_decode else MODE_SKIP) if dn else None for dn in dense[:d]]
        got = b._routes[0, :d].tolist()
        assert [g for g, w in zip(got, want) if w is not None] == [w for w in want if w is not None]
        assert all(g not in (MODE_ALL, MODE_SKIP) for g, w in zip(got, want) if w is None)  # sparse: selected
        assert md.run_cab_decode == (any(not dn for dn in dense[:d]) or (dense_decode and d > 0))
        cap = b.build_for_cudagraph_capture(_cm([100, 90], [1, 1]))
        assert cap.run_fa is not dense_decode and cap.run_cab_decode
    with pytest.raises(ValueError, match="CAB_GRAPH_BRANCHES=1, CAB_DENSE_DECODE=1"):
        dataclasses.replace(KernelOptions(dense_decode=True), graph_branches=True)


def test_token_rows_reach_the_device_and_the_capture_holds_their_launches():
    """CAB_DECODE_RULE=tokens with dense prompts: a long decode row gets its keys per head in the routes' token row
    (the block kernel sees MODE_SKIP), a short one is dense; the step runs CAB's decode (run_cab_decode, run_tokens);
    the prompt rows are FlashAttention's; the captured graph's metadata holds the token launches. Without the rule
    neither the routes nor the capture have them."""
    from cab_vllm.backend.plan import EngineSettings
    from cab_vllm.ops.decode import MODE_ALL, MODE_SKIP

    b = _builder()
    b.settings = EngineSettings.from_env({"CAB_DECODE_RULE": "tokens", "CAB_DENSE_PREFILL": "1"})
    cfg = b.settings.cfg
    md = b.build(0, _cm([30000, 100, 20000], [1, 1, 5000]))
    assert md.run_tokens and md.run_cab_decode and md.run_fa and not md.run_cab_prefill
    assert b._routes[0, :2].tolist() == [MODE_SKIP, MODE_ALL]
    assert md.tkeep.tolist() == [cfg.decode_tokens(30000), 0] == b._routes[6, :2].tolist()
    assert md.fa == ("fa", [0, 0, 20000])  # the dense prompt: FlashAttention's; decode rows: CAB's
    assert b.build_for_cudagraph_capture(_cm([100, 90], [1, 1])).run_tokens
    b = _builder()
    md = b.build(0, _cm([30000, 100], [1, 1]))
    assert not md.run_tokens and md.tkeep.tolist() == [0, 0]
    assert not b.build_for_cudagraph_capture(_cm([100, 90], [1, 1])).run_tokens


def test_a_prompt_step_of_short_requests_copies_nothing_to_the_device():
    """A step of prompt rows only, every one dense (below the threshold): FlashAttention's metadata over the step's
    own sequence lengths, no routes copied (the buffer keeps what the last step left), no CAB work flagged; a step
    with a sparse prompt row, or with decode rows, still writes its routes, and the next step's FlashAttention
    lengths carry nothing stale."""
    from cab_vllm.ops.decode import MODE_ALL

    b = _builder()
    b.build(0, _cm([20000, 100, 300], [1, 1, 1]))  # a decode step: routes written
    routes0, ring0 = b._routes.clone(), list(b._ring.extent)
    md = b.build(0, _cm([512, 90], [512, 90]))
    assert md.fa == ("fa", [512, 90]) and md.run_fa and not md.run_cab_decode and not md.run_cab_prefill
    assert torch.equal(b._routes, routes0) and list(b._ring.extent) == ring0  # nothing copied
    assert md.plan.dense == [True, True] and md.plan.prefill_rows == [0, 1]
    md = b.build(0, _cm([512, 30000], [512, 4000]))  # one sparse prompt row: FlashAttention gets only the dense one
    assert md.fa == ("fa", [512, 0]) and md.run_cab_prefill
    md = b.build(0, _cm([100], [1]))  # a dense decode row (CAB's dense-decode kernel by default)
    assert md.fa is None and md.run_cab_decode and b._routes[0, 0].item() == MODE_ALL
    assert b._fa_seq_lens[1:].tolist() == [0] * 7


def test_with_seq_lens_is_replace_without_the_init():
    """The FlashAttention metadata's copy of the step's common metadata with CAB's rows zeroed: every field as
    dataclasses.replace gives it, the original untouched."""
    import dataclasses

    from cab_vllm.backend import compat

    cm = _cm([300, 20000, 90], [1, 1, 1])
    zeroed = torch.tensor([300, 0, 90], dtype=torch.int32)
    got, want = compat.with_seq_lens(cm, zeroed), cm.replace(seq_lens=zeroed)
    assert type(got) is type(cm) and got is not cm
    for f in dataclasses.fields(cm):
        assert getattr(got, f.name) is getattr(want, f.name), f.name
    assert cm.seq_lens.tolist() == [300, 20000, 90]


@pytest.mark.parametrize("fa", [True, False], ids=["flash-attention", "no-flash-attention"])
def test_dense_layers_dispatch(monkeypatch, fa):
    """CAB_DENSE_LAYERS=2: layers 0 and 1 (found from vLLM's layer name at their first step) run every row densely
    - vLLM's FlashAttention on the all-rows metadata, or the dense twin where it is absent - and no CAB work;
    layer 2 takes the usual dispatch."""
    import dataclasses
    from types import SimpleNamespace

    calls = []
    impl = _impl(monkeypatch, calls)
    seen = []
    impl.fa.forward = lambda layer, q, k, v, kv, md, out: seen.append(md)
    if not fa:
        impl.fa = None
    monkeypatch.setattr(backend, "attend_dense", lambda *a: calls.append("attend_dense"))
    settings = backend.compat.engine_settings()
    impl.settings = dataclasses.replace(settings, cfg=settings.cfg.replace(dense_layers=2))
    impl.scale = 1.0
    q = torch.zeros(1, 16)
    for i in (0, 1, 2):
        impl._dense = None
        calls.clear()
        seen.clear()
        layer = SimpleNamespace(layer_name=f"model.layers.{i}.self_attn.attn")
        impl.forward(layer, q, q, q, torch.zeros(1), _md(run_fa=True, fa="fa", fa_all="fa_all"), torch.zeros(1, 16))
        assert impl._dense == (i < 2)
        if i < 2:
            assert seen == (["fa_all"] if fa else []) and calls == ([] if fa else ["split_kv", "attend_dense"])
        else:
            assert seen == (["fa"] if fa else [])
    with pytest.raises(ValueError, match="layer index"):
        impl._dense = None
        impl.forward(SimpleNamespace(layer_name="lm_head.attn"), q, q, q, torch.zeros(1), _md(), torch.zeros(1, 16))


def test_the_dense_layers_metadata_has_every_row():
    """With CAB_DENSE_LAYERS the builder also builds FlashAttention's metadata over every row at its own length (a
    builder of its own), beside the one with CAB's rows zeroed (built only when FlashAttention has rows in the other
    layers: with dense decode rows in CAB's kernel, the default, a decode step has none)."""
    from cab_vllm.backend.plan import EngineSettings

    for dense_decode, fa in ((False, ("fa", [300, 0, 90])), (True, None)):
        b = _builder()
        b.settings = EngineSettings(kernels=KernelOptions(dense_decode=dense_decode))
        b.fa_all = _FakeFABuilder()
        md = b.build(0, _cm([300, 20000, 90], [1, 1, 1]))
        assert md.fa == fa and md.fa_all == ("fa", [300, 20000, 90])
    assert _builder().build(0, _cm([300], [1])).fa_all is None


def test_layer_index_and_the_flash_attention_lookup():
    """The layer index CAB_DENSE_LAYERS reads from vLLM's layer names; vLLM's FlashAttention is looked up once per
    process (every layer's impl and the builder ask for it)."""
    from cab_vllm.backend import compat

    assert compat.layer_index("model.layers.3.self_attn.attn") == 3
    assert compat.layer_index("language_model.model.layers.17.self_attn.attn") == 17
    with pytest.raises(ValueError, match="layer index"):
        compat.layer_index("model.norm")
    assert compat.flash_attention() is compat.flash_attention()
    assert compat.flash_attention.cache_info().hits >= 1


def test_the_pinned_ring_waits_for_a_buffers_last_copy_and_reuses_its_event(monkeypatch):
    """Pinned buffers are taken in turn; taking one again first waits for the event of the copy that last read it;
    each buffer keeps one event, recorded again at every use (none created per step)."""
    log = []

    class FakeEvent:
        made = 0

        def __init__(self):
            FakeEvent.made += 1
            self.n = FakeEvent.made

        def record(self):
            log.append(("record", self.n))

        def synchronize(self):
            log.append(("sync", self.n))

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    ring = object.__new__(backend._PinnedRing)  # pinned without pinned memory (a CPU machine)
    ring.pinned, ring.bufs = True, [torch.zeros(2, 3, dtype=torch.int32) for _ in range(4)]
    ring.arrays, ring.extent, ring.events, ring.i = [b.numpy() for b in ring.bufs], [0] * 4, [None] * 4, 0
    taken = []
    for _ in range(9):
        _, i = ring.next()
        taken.append(i)
        ring.recorded(i)
    assert taken == [1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert FakeEvent.made == 4  # one per buffer, for good
    # buffer 1's second use (step 5) waits for its first copy's event before that event is recorded again
    assert log[:4] == [("record", 1), ("record", 2), ("record", 3), ("record", 4)]
    assert log[4:6] == [("sync", 1), ("record", 1)]
    assert log.count(("sync", 1)) == 2 and log.count(("record", 1)) == 3


class FakeFAImpl:
    vllm_flash_attn_version = 3


@pytest.mark.parametrize("option", [None, True, False], ids=["default", "on", "off"])
def test_the_sparse_prefill_kernel_choice(monkeypatch, option):
    """backend.fa_prefill_launcher: vLLM's FlashAttention for the sparse prefill rows where it can run (16-bit cache,
    pages that tile a key block) - by default only on FlashAttention 3, where it was measured faster; CAB_FA_PREFILL=1
    wherever it can run, and a start-stopping error naming why where it cannot; CAB_FA_PREFILL=0 never."""
    varlen = object()
    monkeypatch.setattr(backend.compat, "flash_attn_varlen", lambda: varlen)
    fa3, fa2, fa4 = FakeFAImpl(), FakeFAImpl(), FakeFAImpl()
    fa2.vllm_flash_attn_version, fa4.vllm_flash_attn_version = 2, 4
    launch = backend.fa_prefill_launcher
    got = launch(option, fa3, 16, 64, torch.bfloat16)
    assert got == (None if option is False else backend.FAPrefill(varlen, 3))
    assert launch(option, fa3, 64, 64, torch.float16) == (None if option is False else backend.FAPrefill(varlen, 3))
    assert launch(option, fa3, 16, 64, torch.bfloat16, 2) == (None if option is False
                                                               else backend.FAPrefill(varlen, 3, 2))  # CAB_FA_STREAMS
    if option is True:
        assert launch(True, fa2, 32, 64, torch.float16) == backend.FAPrefill(varlen, 2)
    else:
        assert launch(option, fa2, 32, 64, torch.float16) is None  # not measured on FlashAttention 2
    cannot = [((fa3, 48, 64, torch.bfloat16), "48-token pages do not tile CAB's 64-token key blocks"),
              ((fa3, 128, 64, torch.bfloat16), "128-token pages"),
              ((fa3, 16, 64, torch.float32), "fp16 or bf16"),
              ((fa4, 16, 64, torch.bfloat16), "FlashAttention 4 here"),
              ((None, 16, 64, torch.bfloat16), "not available here")]
    for args, why in cannot:
        if option is True:
            with pytest.raises(ValueError, match=f"CAB_FA_PREFILL=1 cannot be honoured: .*{why}"):
                launch(True, *args)
        else:
            assert launch(option, *args) is None
    monkeypatch.setattr(backend.compat, "flash_attn_varlen", lambda: None)  # a vLLM without the function
    if option is True:
        with pytest.raises(ValueError, match="not available"):
            launch(True, fa3, 16, 64, torch.bfloat16)
    else:
        assert launch(option, fa3, 16, 64, torch.bfloat16) is None


def test_the_prefill_kernel_is_chosen_once_and_reaches_attend(monkeypatch):
    """The layer decides in its first step with sparse prefill rows (in the engine: the profiling run) and hands the
    choice to attend; steps without sparse prefill rows pass none and do not decide."""
    calls, seen, decided = [], [], []
    impl = _impl(monkeypatch, calls)
    impl._fa_prefill, impl._fa_prefill_key = None, None  # not decided yet
    monkeypatch.setattr(backend, "attend", lambda *a, **kw: seen.append(kw["fa_prefill"]))
    choice = backend.FAPrefill(object(), 3)
    monkeypatch.setattr(backend, "fa_prefill_launcher", lambda *a: decided.append(a) or choice)
    monkeypatch.setattr(backend.compat, "split_kv", lambda *a: (torch.zeros(2, 16, 1, 8),) * 2)
    impl.settings = backend.compat.engine_settings()
    impl.scale = 1.0
    impl.summaries = None

    class T:
        idx = cnt = sel_idx = sel_cnt = torch.zeros(1, dtype=torch.int32)

    impl.table = impl.workspace = T()
    routes = backend.DecodeRoutes(*[torch.zeros(1, dtype=torch.int32)] * 7)
    q = torch.zeros(1, 16)
    impl.forward(None, q, q, q, torch.zeros(1), _md(routes=routes, run_cab_decode=True), torch.zeros(1, 16))
    assert seen == [None] and decided == []
    for _ in range(2):
        impl.forward(None, q, q, q, torch.zeros(1), _md(routes=routes, run_cab_prefill=True), torch.zeros(1, 16))
    assert seen == [None, choice, choice]
    assert len(decided) == 1 and decided[0][2:] == (16, impl.settings.cfg.block_size, torch.float32,
                                                    impl.settings.kernels.fa_streams)
    # a cache with pages of another size than the one decided for (the engine's configured size): decided again
    monkeypatch.setattr(backend.compat, "split_kv", lambda *a: (torch.zeros(2, 32, 1, 8),) * 2)
    impl.forward(None, q, q, q, torch.zeros(1), _md(routes=routes, run_cab_prefill=True), torch.zeros(1, 16))
    assert len(decided) == 2 and decided[1][2] == 32



def test_the_builder_hands_the_key_copy_its_new_keys():
    """CAB_TOKEN_SCORER=int4: each row's new keys on the device (the routes' row 7 for a step with decode rows,
    which a CUDA graph replays), the leading one-key rows counted apart (their encode launch takes one group
    each) and the longest of the others (the second launch's grid); a prompt-only step of FlashAttention rows gets
    them from query_start_loc."""
    from cab_vllm.backend.plan import EngineSettings
    from cab_vllm.config import CABConfig

    b = _builder()
    b.settings = EngineSettings(cfg=CABConfig(decode_rule="tokens"), token_scorer="int4")
    md = b.build(0, _cm([20000, 30000, 5000, 700], [1, 1, 4096, 700]))
    assert md.num_new.tolist() == [1, 1, 4096, 700] and md.enc_split == 2 and md.max_new == 4096
    assert md.num_new.data_ptr() == b._routes[7].data_ptr()  # the fixed buffer
    md = b.build(0, _cm([20000, 30000], [1, 1]))  # a decode step: one launch, a group per row
    assert md.num_new.tolist() == [1, 1] and md.enc_split == 2 and md.max_new == 0
    md = b.build(0, _cm([500, 300], [500, 300]))  # short prompts, all in FlashAttention
    assert md.num_new.tolist() == [500, 300] and md.enc_split == 0 and md.max_new == 500
    b.settings = EngineSettings()
    assert b.build(0, _cm([20000], [1])).num_new is None  # without the copy: nothing to encode
