"""benchmarks/gpu/engine_bench.py's decode-step breakdown (--profile-decode): what one decode step launches, from
two kernel traces of the same prompt (prefill only, prefill + T steps)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def bench():
    env = dict(os.environ)  # the script sets vLLM/Prometheus variables at import: keep them out of this process
    try:
        spec = importlib.util.spec_from_file_location("engine_bench", ROOT / "benchmarks/gpu/engine_bench.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        os.environ.clear()
        os.environ.update(env)
    return mod


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


@pytest.mark.parametrize("flag", ["--profile-decode", "--profile-prompt"])
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
    assert "first_gpu_us" not in bench.host_breakdown(cpu, [])
    with pytest.raises(ValueError, match="no host events"):
        bench.host_breakdown([], gpu)


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
