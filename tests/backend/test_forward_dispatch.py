"""CABImpl.forward's dispatch per layer: a step whose rows all run in vLLM's FlashAttention (short requests,
sparsity 0) does no CAB work at all after FlashAttention (no cache views, no buffers, no attend); a step with CAB
rows runs both."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

import cab_vllm.backend.backend as backend  # noqa: E402
from cab_vllm.backend.plan import BatchPlan  # noqa: E402


class FakeFA:
    def __init__(self):
        self.calls = 0

    def forward(self, layer, query, key, value, kv_cache, md, output):
        self.calls += 1
        output.fill_(1.0)
        return output


def _impl(monkeypatch, calls):
    impl = object.__new__(backend.CABImpl)
    impl.fa, impl._traced, impl.head_size, impl.num_heads = FakeFA(), True, 8, 2
    monkeypatch.setattr(backend.compat, "split_kv", lambda *a: calls.append("split_kv") or (a[0], a[0]))
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
