"""benchmarks/gpu/carry.sh (files carried to an offline GPU machine in pieces): pack, keep each piece as it arrives,
unpack; the bytes come back equal, also when the only thing carried is a hidden folder (the vLLM pieces'
.gpu_carry), and a bad command is refused."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CARRY = ROOT / "benchmarks" / "gpu" / "carry.sh"


def _sh(*args, cwd, store=None):
    env = dict(os.environ, STORE=str(store)) if store else None
    return subprocess.run(["bash", str(CARRY), *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_pieces_round_trip_a_hidden_folder_and_a_rooted_path(tmp_path):
    src, pieces, store = tmp_path / "src", tmp_path / "pieces", tmp_path / "store"
    (src / ".gpu_carry").mkdir(parents=True)
    (tmp_path / "cache" / "gguf").mkdir(parents=True)
    blob = os.urandom(3 * 2**20 + 12345)
    (src / ".gpu_carry" / "vllm.pack.00").write_bytes(blob)
    (tmp_path / "cache" / "gguf" / "m.gguf").write_bytes(blob[::-1])
    r = _sh("pack", str(pieces), "1", ".gpu_carry", f"{tmp_path / 'cache'}:gguf/m.gguf", cwd=src)
    assert r.returncode == 0, r.stderr
    parts = sorted(pieces.glob("carry.*"))
    assert len(parts) == 7 and all(p.stat().st_size <= 2**20 for p in parts)
    for i, p in enumerate(parts):  # one piece per transfer, as on the GPU machine
        arrived = tmp_path / f"arrived{i}"
        arrived.mkdir()
        p.rename(arrived / p.name)
        r = _sh("keep", str(arrived), cwd=src, store=store)
        assert r.returncode == 0 and r.stdout.strip() == str(i + 1), r.stderr
    r = _sh("unpack", cwd=src, store=store)
    assert r.returncode == 0, r.stderr
    assert (store / "in" / ".gpu_carry" / "vllm.pack.00").read_bytes() == blob
    assert (store / "in" / "gguf" / "m.gguf").read_bytes() == blob[::-1]
    assert not (store / "pieces").exists()

    # only a hidden folder carried: unpack still succeeds (its size report must not need a visible entry)
    r = _sh("pack", str(pieces), "2", ".gpu_carry", cwd=src)
    store2 = tmp_path / "store2"
    assert _sh("keep", str(pieces), cwd=src, store=store2).returncode == 0
    r = _sh("unpack", cwd=src, store=store2)
    assert r.returncode == 0, r.stderr
    assert (store2 / "in" / ".gpu_carry" / "vllm.pack.00").read_bytes() == blob


def test_a_bad_command_is_refused(tmp_path):
    r = _sh("unzip", cwd=tmp_path)
    assert r.returncode == 2 and "usage" in r.stdout
