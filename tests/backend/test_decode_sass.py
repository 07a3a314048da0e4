"""benchmarks/decode_sass.py compiles the engine's decode step for sm_90 on this machine (Triton's compiler, the
ptxas and cuobjdump it ships) and counts its loop over key blocks: the count exists, and a page of whole key blocks
(64 tokens) makes the loop shorter than 16-token pages do (one page-table read per block instead of one per key)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tools_available() -> bool:
    try:
        import triton
    except ImportError:
        return False
    bin_dir = Path(triton.__file__).parent / "backends/nvidia/bin"
    return (bin_dir / "ptxas").exists() and (bin_dir / "cuobjdump").exists()


@pytest.mark.skipif(not _tools_available(), reason="Triton's bundled ptxas / cuobjdump are missing")
def test_decode_loop_counts_and_the_page_of_whole_blocks(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    res = {}
    for page in (16, 64):
        out = tmp_path / f"page{page}.json"
        p = subprocess.run([sys.executable, str(ROOT / "benchmarks/decode_sass.py"), "--n", "8192", "--page",
                            str(page), "--json", str(out)], capture_output=True, text=True, cwd=ROOT, env=env,
                           timeout=900)
        assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
        res[page] = json.loads(out.read_text())
        assert f"page={page}" in p.stdout and "in the loop over key blocks" in p.stdout
    for r in res.values():  # (decode_sass.analyse fails unless the loop holds tensor-core instructions)
        assert 0 < r["loop_instructions"] < r["instructions"]
    assert res[64]["loop_instructions"] < res[16]["loop_instructions"]


@pytest.mark.skipif(not _tools_available(), reason="Triton's bundled ptxas / cuobjdump are missing")
def test_token_decode_estimate_with_the_key_copy_compiles_for_hopper(tmp_path):
    """benchmarks/token_sass.py: the token decode's logits launch compiled for sm_90, exact, with the 4-bit key copy,
    with CODE_ASM's inline PTX (ptxas assembles it) and with the float8 copy: each has its loop of tensor-core
    instructions, the PTX nibbles leave the loop shorter and without the byte-by-byte unpacking's int-to-float
    conversions."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = tmp_path / "token.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks/token_sass.py"), "--n", "8192", "--kernels",
                        "_logits_kernel", "--json", str(out)], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    r = json.loads(out.read_text())
    exact, plain, asm, fp8 = (r[f"_logits_kernel/{v}"] for v in ("exact", "int4", "int4_asm", "fp8"))
    for x in (exact, plain, asm, fp8):
        assert 0 < x["loop_instructions"] < x["instructions"] and x["registers"] <= 255
    assert asm["loop_instructions"] < plain["loop_instructions"]
    assert "I2F" not in dict(map(tuple, asm["loop_opcodes"]))


def test_refuses_to_run_interpreted():
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks/decode_sass.py")], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=300)
    assert p.returncode != 0 and "without TRITON_INTERPRET" in p.stderr


@pytest.mark.skipif(not _tools_available(), reason="Triton's bundled ptxas / cuobjdump are missing")
def test_fp8_estimate_compiles_for_hopper():
    """benchmarks/fp8_estimate_sass.py: the three ways of scoring a 128-key step compile for sm_90; with 64 query
    rows the float8 dot has no float8-to-half conversions (F2FP) in its loop and a shorter loop than bf16 keys, while
    keys made bf16 in registers convert every element (F2F). A bad --group-pad is refused."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    script = str(ROOT / "benchmarks/fp8_estimate_sass.py")
    p = subprocess.run([sys.executable, script, "--group-pad", "64"], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    rows = {ln.split("  ")[1].strip(): ln for ln in p.stdout.splitlines() if ln.strip().startswith("64 rows")}
    assert set(rows) == {"bf16 keys", "fp8 keys, fp8 queries", "fp8 keys made bf16"}, p.stdout
    loop = {k: int(v.split("loop (128 keys)")[1].split()[0]) for k, v in rows.items()}
    assert "F2FP" not in rows["fp8 keys, fp8 queries"] and "F2F " in rows["fp8 keys made bf16"]
    assert loop["fp8 keys, fp8 queries"] < loop["bf16 keys"] < loop["fp8 keys made bf16"]
    bad = subprocess.run([sys.executable, script, "--group-pad", "24"], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=300)
    assert bad.returncode == 2 and "power of two" in bad.stderr
