"""Model Runner V2 (CUDA vLLM 0.26+'s default for most models) keeps no SamplingParams and gives the attention
backend no request ids. The builder reads the step's requests from the runner's execute_model frame: its
input_batch (req_ids in row order) and scheduler_output (scheduled_new_reqs carry each request's sampling params
in its first step). Stand-in objects with V2's attribute names; the real V2 runner needs a CUDA vLLM."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from cab_vllm.backend import backend  # noqa: E402


class FakeV2Runner:
    def __init__(self):
        self.req_states = SimpleNamespace(req_id_to_index={})
        self.model_state = object()

    def execute_model(self, scheduler_output, probe, dummy_run=False):
        for new in scheduler_output.scheduled_new_reqs:
            self.req_states.req_id_to_index[new.req_id] = len(self.req_states.req_id_to_index)
        for rid in scheduler_output.finished_req_ids:
            self.req_states.req_id_to_index.pop(rid, None)
        input_batch = SimpleNamespace(req_ids=scheduler_output.order)  # noqa: F841 (read from this frame)
        return self._prepare_attn(probe)

    def _prepare_attn(self, probe):
        return probe()


def _new(rid, n_prompt, extra):
    return SimpleNamespace(req_id=rid, prompt_token_ids=list(range(n_prompt)),
                           sampling_params=SimpleNamespace(extra_args=extra))


def _sched(new=(), order=(), finished=()):
    return SimpleNamespace(scheduled_new_reqs=list(new), order=list(order), finished_req_ids=set(finished))


def test_v2_runner_is_recognised_and_v1_is_not_taken_for_it():
    v2 = FakeV2Runner()
    assert backend._is_v2_runner(v2) and not backend._is_v1_runner(v2)
    v1 = SimpleNamespace(input_batch=None, requests={}, req_states=None, model_state=None)
    assert backend._is_v1_runner(v1) and not backend._is_v2_runner(v1)

    def construct_builder_here(self=v2):
        return backend._find_runner()

    assert construct_builder_here() is v2


def test_v2_requests_follow_the_steps():
    runner, reqs = FakeV2Runner(), backend.V2Requests()
    probe = lambda: reqs.batch(runner, 3)  # noqa: E731 (the builder's call, below execute_model)
    # step 1: two new requests, one with CAB fields; the batch is padded to 3 rows
    got = runner.execute_model(_sched([_new("a", 100, {"cab_sparsity": 0.99}), _new("b", 7, None)], ["a", "b"]),
                               probe)
    ids, live, extras, plens = got
    assert ids == ["a", "b"] and live == {"a", "b"} and extras == [{"cab_sparsity": 0.99}, None] and plens == [100, 7]
    # step 2: no new request (decodes): the fields are remembered; row order is the runner's
    ids, live, extras, plens = runner.execute_model(_sched(order=["b", "a"]), probe)
    assert ids == ["b", "a"] and extras == [None, {"cab_sparsity": 0.99}] and plens == [7, 100]
    # step 3: "a" finished and a new one came: "a" is forgotten
    ids, live, extras, _ = runner.execute_model(_sched([_new("c", 5, {"cab_policy": "h2o"})], ["b", "c"], ["a"]),
                                                probe)
    assert live == {"b", "c"} and "a" not in reqs.extra and extras == [None, {"cab_policy": "h2o"}]
    # a dummy run (profiling, capture) or a build outside execute_model: no requests
    assert runner.execute_model(_sched(order=["b"]), probe, dummy_run=True) is None
    assert reqs.batch(runner, 1) is None


def test_builder_reads_per_request_fields_under_v2():
    """The builder's per-row configs under V2: each request's own sparsity/policy, engine defaults otherwise,
    and a bad field falls back to the defaults (with a warning) instead of stopping the engine."""
    import weakref

    from cab_vllm.backend.plan import EngineSettings

    runner = FakeV2Runner()
    b = object.__new__(backend.CABMetadataBuilder)
    b.settings, b._runner, b._v2, b._warned = EngineSettings(), weakref.ref(runner), backend.V2Requests(), set()
    sched = _sched([_new("a", 100, {"cab_sparsity": 0.5, "cab_policy": "h2o"}), _new("b", 9, None),
                    _new("c", 9, {"cab_sparsity": 2.0})], ["a", "b", "c"])
    cfgs, ids, live, plens = runner.execute_model(sched, lambda: b._request_cfgs(4))
    base = EngineSettings().cfg
    assert (cfgs[0].sparsity, cfgs[0].policy) == (0.5, "h2o") and cfgs[1] == base and cfgs[2] == base
    assert cfgs[3] == base and ids == ["a", "b", "c", None] and plens == [100, 9, 9, None] and live == {"a", "b", "c"}
    assert b._warned == {"c"}
