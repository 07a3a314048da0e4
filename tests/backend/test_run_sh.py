"""benchmarks/gpu/run.sh (the GPU engine comparison's driver), with engine_bench.py replaced by a stub that
records what it was given: one engine per entry, a run's own CAB_* variables (after @) reach only that run and
name its files, and a malformed variable stops the script before anything runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

STUB = """#!/usr/bin/env bash
if [ "${1:-}" = "benchmarks/gpu/engine_bench.py" ]; then
  shift
  exec "%(py)s" -c 'import json, os, sys
out = sys.argv[sys.argv.index("--out") + 1]
env = {k: v for k, v in os.environ.items() if k.startswith("CAB_")}
row = dict(backend=sys.argv[sys.argv.index("--backend") + 1], sparsity=None, init_s=1, first_request_s=0,
           second_request_s=0, mem_after_init_gib=0, peak_during_runs_gib=0, probe_out=[], cab_env=env,
           args=sys.argv[1:], fa_graph_splits=(int(sys.argv[sys.argv.index("--fa-graph-splits") + 1])
                                                if "--fa-graph-splits" in sys.argv else None),
           block_size=(int(sys.argv[sys.argv.index("--block-size") + 1]) if "--block-size" in sys.argv else None),
           fa_version=(int(sys.argv[sys.argv.index("--fa-version") + 1]) if "--fa-version" in sys.argv else None))
open(out, "w").write(json.dumps(row) + "\\n")' "$@"
fi
exec "%(py)s" "$@"
"""


def _run(tmp_path, runs):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "python3"
    stub.write_text(STUB % {"py": sys.executable})
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env = {k: v for k, v in env.items() if not k.startswith("CAB_")}
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


def test_a_runs_flash_attention_splits_reach_only_that_run_as_an_argument(tmp_path):
    p, out = _run(tmp_path, "CUSTOM:0.95 CUSTOM:0.95@FA_GRAPH_SPLITS=8,CAB_FUSED_SELECT=0")
    rows = _ok_rows(p, out)
    mine = rows["engine_CUSTOM_0.95_FA_GRAPH_SPLITS-8_CAB_FUSED_SELECT-0.jsonl"]
    assert mine["cab_env"] == {"CAB_FUSED_SELECT": "0"}  # not passed on as a variable
    assert mine["args"][mine["args"].index("--fa-graph-splits") + 1] == "8"
    assert "--fa-graph-splits" not in rows["engine_CUSTOM_0.95.jsonl"]["args"]
    assert "with CAB_FUSED_SELECT=0 flash_attn_max_num_splits_for_cuda_graph=8" in p.stdout


def test_a_runs_block_size_reaches_only_that_run_as_an_argument(tmp_path):
    p, out = _run(tmp_path, "CUSTOM:0.95 CUSTOM:0.95@BLOCK_SIZE=64,FA_GRAPH_SPLITS=8")
    rows = _ok_rows(p, out)
    mine = rows["engine_CUSTOM_0.95_BLOCK_SIZE-64_FA_GRAPH_SPLITS-8.jsonl"]
    assert mine["cab_env"] == {}
    assert mine["args"][mine["args"].index("--block-size") + 1] == "64"
    assert mine["args"][mine["args"].index("--fa-graph-splits") + 1] == "8"
    assert "--block-size" not in rows["engine_CUSTOM_0.95.jsonl"]["args"]
    assert "flash_attn_max_num_splits_for_cuda_graph=8 block_size=64" in p.stdout


def test_a_runs_flash_attention_version_reaches_only_that_run_as_an_argument(tmp_path):
    p, out = _run(tmp_path, "FLASH_ATTN: CUSTOM:0.95@FA_VERSION=2,CAB_FUSED_SELECT=0 FLASH_ATTN:@FA_VERSION=2")
    rows = _ok_rows(p, out)
    assert set(rows) == {"engine_FLASH_ATTN_dense.jsonl", "engine_CUSTOM_0.95_FA_VERSION-2_CAB_FUSED_SELECT-0.jsonl",
                         "engine_FLASH_ATTN_dense_FA_VERSION-2.jsonl"}
    mine = rows["engine_CUSTOM_0.95_FA_VERSION-2_CAB_FUSED_SELECT-0.jsonl"]
    assert mine["cab_env"] == {"CAB_FUSED_SELECT": "0"}
    assert mine["args"][mine["args"].index("--fa-version") + 1] == "2"
    assert rows["engine_FLASH_ATTN_dense_FA_VERSION-2.jsonl"]["fa_version"] == 2
    assert "--fa-version" not in rows["engine_FLASH_ATTN_dense.jsonl"]["args"]
    assert "with CAB_FUSED_SELECT=0 flash_attn_version=2" in p.stdout


def test_a_malformed_variable_stops_the_script(tmp_path):
    for bad in ("CUSTOM:0.95@GRAPH_BRANCHES=1", "CUSTOM:0.95@FA_GRAPH_SPLITS=x", "CUSTOM:0.95@BLOCK_SIZE=x",
                "CUSTOM:0.95@FA_VERSION=x"):
        p, out = _run(tmp_path, bad)
        assert p.returncode == 2 and "is not CAB_NAME=VALUE" in p.stdout
        assert not list(out.glob("engine_*.jsonl"))
