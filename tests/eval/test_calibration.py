"""Calibration on a real model (small, CPU): the default policy keeps the needle better than the seed's pipeline.

SmolLM2-135M-Instruct, a 2k-token passkey prompt; the full grid (Qwen, natural text, 4k-8k) is run by
`python -m cab_experiments.calibrate` and reported in experiments/results/.
"""

from __future__ import annotations

import pytest
import torch

from cab_experiments.calibrate import ORACLE, Setting, calibrate_captures, capture_prompt, default_setting, seed_setting


@pytest.fixture(scope="module")
def captured():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cab_vllm import hf
    from cab_models.models import prepare_model
    from cab_models.text import passkey_prompt

    hf.register()
    path = prepare_model("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=hf.ATTN_NAME, dtype=torch.float32).eval()
    prompts = [passkey_prompt(tok, 2048, depth, "filler", seed=11) for depth in (0.2, 0.6)]
    return [(capture_prompt(model, p.input_ids), p.needle_token_span) for p in prompts]


def test_capture_shapes(captured):
    caps, span = captured[0]
    assert len(caps) == 30  # SmolLM2 layers
    layer, q, k = caps[0]
    assert q.shape[1] == 9 and k.shape[1] == 3 and q.shape[2] == k.shape[2] and q.shape[3] == 64
    assert 0 < span[0] < span[1] <= q.shape[2]


SPARSITIES = (0.75, 0.9)


@pytest.fixture(scope="module")
def results(captured):
    settings = [st for s in SPARSITIES for st in (default_setting(s), seed_setting(s), Setting(ORACLE, "bounds", s),
                                                  Setting("random", "bounds", s))]
    rows = {}
    for caps, span in captured:
        for r in calibrate_captures(caps, span, settings):
            rows.setdefault((r["policy"], r["sparsity"]), []).append(r)
    return rows


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_default_beats_seed_pipeline(results, sparsity):
    def mean(policy, key):
        rs = results[(policy, sparsity)]
        return sum(r[key] for r in rs) / len(rs)

    default, seed = mean("cab", "needle_recall"), mean("curvature", "needle_recall")
    print(f"sparsity {sparsity}: needle recall default {default:.2f} seed {seed:.2f} "
          f"oracle {mean(ORACLE, 'needle_recall'):.2f} random {mean('random', 'needle_recall'):.2f}")
    assert default > seed
    assert default >= 0.8
    # the oracle is an upper bound on attention mass kept; every policy keeps the sink + local share
    for policy in ("cab", "curvature", "random"):
        assert mean(policy, "mass_recall") <= mean(ORACLE, "mass_recall") + 1e-6
        assert 0.0 < mean(policy, "mass_recall") <= 1.0 + 1e-6
