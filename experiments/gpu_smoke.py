"""Smoke run of the experiment code paths on a GPU before the real models arrive: a randomly initialised
2-layer Qwen2 (Qwen2.5-0.5B's head geometry) with CAB swapped in — every policy through generate() (prefill +
decode, batch 2), the chunked NLL against transformers' own loss, the attention timer, YaRN, and a planted-needle
bridge row. Prints one line per check; exits non-zero on the first failure."""

from __future__ import annotations

import sys
import time

import torch


def main() -> int:
    from transformers import AutoModelForCausalLM, Qwen2Config

    from cab_vllm import hf
    from cab_experiments.bridge import synthetic_retrieval
    from cab_experiments.common import Variant, yarn_rope
    from cab_experiments.ppl import attention_latency, token_nll

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    n = 4096 if dev == "cuda" else 512
    hf.register()
    cfg = Qwen2Config(vocab_size=1024, hidden_size=896, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768)
    yarn_rope(cfg, 4.0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=hf.ATTN_NAME, dtype=dtype).to(dev).eval()
    assert model.model.rotary_emb.rope_type == "yarn", model.model.rotary_emb.rope_type
    print("yarn ok", cfg.max_position_embeddings)
    ids = torch.randint(0, 1024, (2, n), device=dev)
    for spec in ["dense", "cab", "h2o", "streaming", "magnitude", "random", "curvature:estimator=max_l2",
                 "cab:estimator=topr", "cab:estimator=sampled"]:
        v = Variant.parse(spec)
        t0 = time.perf_counter()
        with torch.no_grad(), hf.using(v.config(0.95)) as st:
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                 pad_token_id=0)
        assert out.shape == (2, n + 4), out.shape
        print(f"generate {spec}: {time.perf_counter() - t0:.2f} s, density "
              f"{st['kept'] / max(1, st['causal']):.3f}, decode calls {st['decode_calls']}")
    with torch.no_grad():
        x = ids[0, :1024]
        nll = token_nll(model, x, chunk=300)
        ref = model(input_ids=x[None], labels=x[None]).loss.float()
        assert abs(nll.mean().item() - ref.item()) < 2e-2 * ref.item(), (nll.mean().item(), ref.item())
        print(f"nll ok {nll.mean().item():.4f} vs {ref.item():.4f}")
        with hf.capture() as caps:
            model.get_decoder()(input_ids=ids[:1], use_cache=False)
        for spec, sp in [("dense", 0.0), ("cab", 0.95), ("streaming", 0.99)]:
            print(f"latency {spec}@{sp}: {attention_latency(caps, Variant.parse(spec).config(sp), 3) * 1e3:.2f} ms")
    rows = synthetic_retrieval([16384 if dev == "cuda" else 2048], [Variant.parse("dense"), Variant.parse("cab")],
                               [0.95], seeds=1, device=dev, dtype=dtype)
    print("bridge", [(r["variant"], r["needle_kept"], round(r["needle_cosine"], 3)) for r in rows])
    assert rows[0]["needle_cosine"] > 0.9
    print("SMOKE OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
