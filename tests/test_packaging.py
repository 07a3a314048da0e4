"""The core package stays core: ``cab_vllm`` (config, API, policies, ops, vLLM backend, transformers adapter) pulls
in none of model preparation / text (``cab_models``) or the experiments (``cab_experiments``), nor their heavy
dependencies; the wheel ships the core (cab_vllm, server, cab_models) and its console script, not the experiments
or the load tests (they run from a checkout)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOT_CORE = ("cab_models", "cab_experiments", "transformers", "gguf", "matplotlib")


def test_import_cab_vllm_pulls_in_nothing_of_models_text_or_experiments():
    """In a fresh interpreter (other tests' imports would hide it): the library and its vLLM backend plugin."""
    code = ("import json, sys, cab_vllm, cab_vllm.backend; "
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {NOT_CORE!r})))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == []


def _imported_top_levels(package: str) -> dict[str, set[str]]:
    """file -> top-level modules it imports (anywhere in the file, lazily or not)."""
    out = {}
    for f in sorted((ROOT / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        out[str(f.relative_to(ROOT))] = names
    return out


@pytest.mark.parametrize("package,forbidden", [
    ("cab_vllm", {"cab_models", "cab_experiments", "server"}),  # not even lazily
    ("server", {"cab_experiments"}),  # the server needs cab_models (its packaged default model), not experiments
    ("cab_models", {"cab_experiments", "server"}),
])
def test_layering(package, forbidden):
    bad = {f: sorted(names & forbidden) for f, names in _imported_top_levels(package).items() if names & forbidden}
    assert not bad, f"{package} imports what it must not: {bad}"


CORE = {"cab_vllm", "server", "cab_models"}  # the wheel; cab_experiments and loadtests run from a checkout


def test_packages_and_console_scripts_are_shipped():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = meta["tool"]["setuptools"]["packages"]["find"]["include"]
    tops = {pat.rstrip("*") for pat in include}
    assert tops == CORE, include
    for name, target in meta["project"]["scripts"].items():
        module, _, func = target.partition(":")
        assert module.split(".")[0] in tops, f"{name}: {module} is not packaged ({include})"
        source = (ROOT / Path(*module.split("."))).with_suffix(".py")
        assert source.exists() and f"def {func}(" in source.read_text(), f"{name}: {target} not found"
    assert meta["project"]["scripts"] == {"cab-serve": "server.cli:main"}
    assert {"eval", "loadtests", "server"} <= set(meta["project"]["optional-dependencies"])


def test_wheel_ships_the_core_only(tmp_path):
    """Build the wheel (no deps, no isolation: ~2 s) from a copy of the sources and list its top-level entries."""
    import shutil
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    for d in ("cab_vllm", "server", "cab_models", "cab_experiments", "loadtests"):
        shutil.copytree(ROOT / d, src / d, ignore=shutil.ignore_patterns("__pycache__", "results"))
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path / "whl"), str(src)], capture_output=True, text=True, timeout=300)
    if p.returncode != 0 and "No module named" in p.stderr:
        pytest.skip(f"cannot build without isolation here: {p.stderr[-300:]}")
    assert p.returncode == 0, p.stderr[-3000:]
    (wheel,) = (tmp_path / "whl").glob("cab_vllm-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == CORE
    assert "cab_models/text.py" in names and "server/cli.py" in names
    assert "cab-serve = server.cli:main" in entry_points and "cab_experiments" not in entry_points


def test_checkout_runs_what_the_wheel_leaves_out():
    """python -m cab_experiments / python -m loadtests work from the repository root."""
    for module in ("cab_experiments", "loadtests"):
        p = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT,
                           timeout=300)
        assert p.returncode == 0 and "usage: python -m " + module in p.stdout, (module, p.stderr[-2000:])


def test_backend_runs_ops_not_their_twins():
    """The vLLM backend reaches the kernels through the ops' public functions (which pick Triton or their PyTorch
    implementation) and ops.blocks; it never imports the test oracles' module (ops.reference) itself."""
    bad = []
    for f in sorted((ROOT / "cab_vllm" / "backend").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.endswith("ops.reference"):
                bad.append(str(f.relative_to(ROOT)))
    assert not bad, f"backend modules importing ops.reference: {bad}"


def test_readme_documents_every_engine_variable():
    """Every CAB_* variable the engine reads into its CABConfig (backend.plan.ENV_FIELDS) has a row in README.md."""
    from cab_vllm.backend.plan import ENV_FIELDS

    readme = (ROOT / "README.md").read_text()
    missing = [k for k in ENV_FIELDS if f"`{k}`" not in readme]
    assert not missing, f"README.md does not document {missing}"
