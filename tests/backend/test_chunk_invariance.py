"""benchmarks/gpu/chunk_invariance.py's reading of CAB's step trace (the script itself needs a CUDA GPU)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("chunk_invariance", ROOT / "benchmarks/gpu/chunk_invariance.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_chunk_ends_split_the_long_prompts_runs(tmp_path):
    """Prefill rows past 4,096 tokens are the long prompt's chunks; each run ends at its length; decode rows and the
    short requests' rows are not chunks."""
    steps = [[[4096, 8192, 0.95, "cab", False, None]], [[1808, 10000, 0.95, "cab", False, None]],
             [[1, 10001, 0.95, "cab", False, 1]],
             [[300, 300, 0.95, "cab", True, None], [300, 300, 0.95, "cab", True, None]],
             [[1, 301, 0.95, "cab", True, 2], [3700, 4480, 0.95, "cab", False, None]],
             [[1, 302, 0.95, "cab", True, 2], [5520, 10000, 0.95, "cab", False, None]]]
    (tmp_path / "7.log").write_text("".join(f"7 plan {json.dumps(s)}\n" for s in steps) + "7 register\n")
    assert _module().chunk_ends(str(tmp_path), 10000) == [[8192, 10000], [4480, 10000]]
