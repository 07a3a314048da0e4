"""benchmarks/gpu/run.sh (the GPU engine comparison's driver), with engine_bench.py replaced by a stub that
records what it was given: one engine per entry, a run's own CAB_* variables (after @) reach only that run and
name its files, and a malformed variable stops the script before anything runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

STUB = """#!/usr/bin/env bash
if [ "${1:-}" = "benchmarks/gpu/engine_bench.py" ]; then
  shift
  exec "%(py)s" -c 'import json, os, sys
out = sys.argv[sys.argv.index("--out") + 1]
env = {k: v for k, v in os.environ.items() if k.startswith("CAB_")}
row = dict(backend=sys.argv[sys.argv.index("--backend") + 1], sparsity=None, init_s=1, first_request_s=0,
           second_request_s=0, mem_after_init_gib=0, peak_during_runs_gib=0, probe_out=[], cab_env=env,
           args=sys.argv[1:])
for key in ("fa_graph_splits", "block_size", "fa_version", "max_model_len"):  # the engine settings, as engine_bench.py records them
    flag = "--" + key.replace("_", "-")
    row[key] = int(sys.argv[sys.argv.index(flag) + 1]) if flag in sys.argv else None
open(out, "w").write(json.dumps(row) + "\\n")
if row["backend"] == "CUSTOM":  # the engine core logs where its start went (backend.warmup)
    print("(EngineCore pid=7) INFO 12-03 [warmup.py:99] CAB warm-up (4/2 heads, head dim 32, bfloat16): "
          "prefill and decode paths 1.5 s")' "$@"
fi
exec "%(py)s" "$@"
"""


def _run(tmp_path, runs, **extra_env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "python3"
    stub.write_text(STUB % {"py": sys.executable})
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env = {k: v for k, v in env.items()
           if not k.startswith("CAB_") and k not in ("BATCH", "LAYERS", "TP", "RUNNER", "STEADY", "IDLE",
                                                         "FIRST_PROFILE", "SCHED")}
    env.update(extra_env)
    out = tmp_path / "out"
    p = subprocess.run(["bash", "benchmarks/gpu/run.sh", str(out), runs, "512"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    return p, out


def _ok_rows(p, out) -> dict:
    """The run succeeded: its engine rows by file name."""
    assert p.returncode == 0, p.stderr
    return {f.name: json.loads(f.read_text()) for f in out.glob("engine_*.jsonl")}


def test_each_run_gets_its_own_variables(tmp_path):
    p, out = _run(tmp_path, "FLASH_ATTN: CUSTOM:0.95 CUSTOM:0.95@CAB_GRAPH_BRANCHES=1,CAB_FUSED_SELECT=1")
    rows = _ok_rows(p, out)
    assert set(rows) == {"engine_FLASH_ATTN_dense.jsonl", "engine_CUSTOM_0.95.jsonl",
                         "engine_CUSTOM_0.95_CAB_GRAPH_BRANCHES-1_CAB_FUSED_SELECT-1.jsonl"}
    assert rows["engine_CUSTOM_0.95.jsonl"]["cab_env"] == {}
    assert rows["engine_CUSTOM_0.95_CAB_GRAPH_BRANCHES-1_CAB_FUSED_SELECT-1.jsonl"]["cab_env"] == {
        "CAB_GRAPH_BRANCHES": "1", "CAB_FUSED_SELECT": "1"}
    assert "--sparsity" not in rows["engine_FLASH_ATTN_dense.jsonl"]["args"]
    assert "with CAB_FUSED_SELECT=1 CAB_GRAPH_BRANCHES=1" in p.stdout
    assert "== CUSTOM_0.95_CAB_GRAPH_BRANCHES-1_CAB_FUSED_SELECT-1" in p.stdout
    # each CAB run's warm-up line from its log, under its heading; none for FLASH_ATTN
    lines = p.stdout.splitlines()
    warm = "   CAB warm-up (4/2 heads, head dim 32, bfloat16): prefill and decode paths 1.5 s"
    assert lines.count(warm) == 2
    assert lines[lines.index("== CUSTOM_0.95") + 1] == warm
    assert lines[lines.index("== FLASH_ATTN_dense") + 1] != warm


@pytest.mark.parametrize("runs, files, mine, env, given, printed", [
    ("CUSTOM:0.95 CUSTOM:0.95@FA_GRAPH_SPLITS=8,CAB_FUSED_SELECT=0",
     {"engine_CUSTOM_0.95.jsonl", "engine_CUSTOM_0.95_FA_GRAPH_SPLITS-8_CAB_FUSED_SELECT-0.jsonl"},
     "engine_CUSTOM_0.95_FA_GRAPH_SPLITS-8_CAB_FUSED_SELECT-0.jsonl", {"CAB_FUSED_SELECT": "0"},
     {"--fa-graph-splits": "8"}, "with CAB_FUSED_SELECT=0 flash_attn_max_num_splits_for_cuda_graph=8"),
    ("CUSTOM:0.95 CUSTOM:0.95@BLOCK_SIZE=64,FA_GRAPH_SPLITS=8",
     {"engine_CUSTOM_0.95.jsonl", "engine_CUSTOM_0.95_BLOCK_SIZE-64_FA_GRAPH_SPLITS-8.jsonl"},
     "engine_CUSTOM_0.95_BLOCK_SIZE-64_FA_GRAPH_SPLITS-8.jsonl", {}, {"--block-size": "64", "--fa-graph-splits": "8"},
     "flash_attn_max_num_splits_for_cuda_graph=8 block_size=64"),
    ("FLASH_ATTN: CUSTOM:0.95@FA_VERSION=2,CAB_FUSED_SELECT=0 FLASH_ATTN:@FA_VERSION=2",
     {"engine_FLASH_ATTN_dense.jsonl", "engine_CUSTOM_0.95_FA_VERSION-2_CAB_FUSED_SELECT-0.jsonl",
      "engine_FLASH_ATTN_dense_FA_VERSION-2.jsonl"},
     "engine_CUSTOM_0.95_FA_VERSION-2_CAB_FUSED_SELECT-0.jsonl", {"CAB_FUSED_SELECT": "0"}, {"--fa-version": "2"},
     "with CAB_FUSED_SELECT=0 flash_attn_version=2"),
    ("CUSTOM:0.95 CUSTOM:0.95@MAX_LEN=131072",
     {"engine_CUSTOM_0.95.jsonl", "engine_CUSTOM_0.95_MAX_LEN-131072.jsonl"},
     "engine_CUSTOM_0.95_MAX_LEN-131072.jsonl", {}, {"--max-model-len": "131072"}, "with max_model_len=131072"),
], ids=["fa-graph-splits", "block-size", "fa-version", "max-len"])
def test_a_runs_engine_settings_reach_only_that_run_as_arguments(tmp_path, runs, files, mine, env, given, printed):
    """FA_GRAPH_SPLITS, BLOCK_SIZE, FA_VERSION and MAX_LEN among a run's variables become engine_bench.py arguments of
    that run only (not variables; CAB_* beside them stay variables), and its summary line names them."""
    p, out = _run(tmp_path, runs)
    rows = _ok_rows(p, out)
    assert set(rows) == files
    assert rows[mine]["cab_env"] == env  # the settings are not passed on as variables
    for flag, value in given.items():
        assert rows[mine]["args"][rows[mine]["args"].index(flag) + 1] == value
        assert rows[mine][flag[2:].replace("-", "_")] == int(value)
        for other in files:  # the runs without the setting (its NAME is in the file names of those with it)
            if {"--max-model-len": "MAX_LEN"}.get(flag, flag[2:].upper().replace("-", "_")) not in other:
                assert flag not in rows[other]["args"]
    if "FLASH_ATTN:@FA_VERSION=2" in runs:
        assert rows["engine_FLASH_ATTN_dense_FA_VERSION-2.jsonl"]["fa_version"] == 2
    assert printed in p.stdout


def test_a_malformed_variable_stops_the_script(tmp_path):
    for bad in ("CUSTOM:0.95@GRAPH_BRANCHES=1", "CUSTOM:0.95@FA_GRAPH_SPLITS=x", "CUSTOM:0.95@BLOCK_SIZE=x",
                "CUSTOM:0.95@FA_VERSION=x", "CUSTOM:0.95@MAX_LEN=x"):
        p, out = _run(tmp_path, bad)
        assert p.returncode == 2 and "is not CAB_NAME=VALUE" in p.stdout
        assert not list(out.glob("engine_*.jsonl"))


def test_batch_and_layers_reach_every_run_and_name_its_files(tmp_path):
    """BATCH=8 LAYERS=16: each engine gets --batch 8 --layers 16 (the 8B geometry with half its layers, for 8 x 128k
    on one GPU) and its file names say so; without them neither argument is passed."""
    p, out = _run(tmp_path, "FLASH_ATTN: CUSTOM:0.95", BATCH="8", LAYERS="16", STEADY="1")
    rows = _ok_rows(p, out)
    assert set(rows) == {"engine_FLASH_ATTN_dense_b8_l16.jsonl", "engine_CUSTOM_0.95_b8_l16.jsonl"}
    for row in rows.values():
        args = row["args"]
        assert args[args.index("--batch") + 1] == "8" and args[args.index("--layers") + 1] == "16"
        assert "--steady-decode" in args
    (tmp_path / "plain").mkdir()
    p, out = _run(tmp_path / "plain", "CUSTOM:0.95")
    (row,) = _ok_rows(p, out).values()
    assert "--layers" not in row["args"] and "--batch" not in row["args"] and "--steady-decode" not in row["args"]


def test_idle_and_first_profile_reach_the_engine_and_idle_names_its_files(tmp_path):
    """IDLE=2 FIRST_PROFILE=512: the engine gets --idle-before 2 (its files say _idle2) and --first-request-profile."""
    p, out = _run(tmp_path, "CUSTOM:0.95", IDLE="2", FIRST_PROFILE="512")
    rows = _ok_rows(p, out)
    assert set(rows) == {"engine_CUSTOM_0.95_idle2.jsonl"}
    args = rows["engine_CUSTOM_0.95_idle2.jsonl"]["args"]
    assert args[args.index("--idle-before") + 1] == "2" and args[args.index("--first-request-profile") + 1] == "512"


def test_sched_reaches_the_engine_and_names_its_files(tmp_path):
    """SCHED=cab: the engine runs CAB's scheduler (--scheduler cab), its files say _schedcab."""
    p, out = _run(tmp_path, "CUSTOM:0.95", SCHED="cab")
    rows = _ok_rows(p, out)
    assert set(rows) == {"engine_CUSTOM_0.95_schedcab.jsonl"}
    args = rows["engine_CUSTOM_0.95_schedcab.jsonl"]["args"]
    assert args[args.index("--scheduler") + 1] == "cab"
