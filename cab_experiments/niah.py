"""Experiment A: the needle (passkey) grid — lengths x depths x trials x policies x sparsities, greedy generation.

Each cell generates with the model's attention swapped to CAB (cab_vllm.hf) and checks that the answer holds the
pass key. Prompts of one length share a token count, so they run batched (no padding); prefill and decode both
run the policy (decode rules: see cab_vllm.hf).
"""

from __future__ import annotations

import torch

from cab_vllm import hf
from cab_experiments.common import Clock, Deadline, Jsonl, Variant, cells, context_limit
from cab_models.text import answer_has_passkey, passkey_prompt

KEY = ("model", "yarn", "haystack", "length", "depth", "trial", "variant", "sparsity")


def build_prompts(tok, length: int, depths, trials: int, haystack: str, seed: int = 0) -> list[dict]:
    """One prompt per (depth, trial); trial t uses seed ``seed + t`` (its pass key and Austen offset)."""
    out = []
    for t in range(trials):
        for d in depths:
            p = passkey_prompt(tok, length, d, haystack=haystack, seed=seed + t)
            out.append({"depth": d, "trial": t, "prompt": p})
    return out


def _batches(items: list[dict], max_tokens: int) -> list[list[dict]]:
    """Group by exact token count (no padding), at most ``max_tokens`` prompt tokens a batch."""
    groups: dict[int, list[dict]] = {}
    for it in items:
        groups.setdefault(len(it["prompt"].input_ids), []).append(it)
    out = []
    for n, g in sorted(groups.items()):
        per = max(1, max_tokens // n)
        out += [g[i: i + per] for i in range(0, len(g), per)]
    return out


@torch.no_grad()
def generate(model, tok, batch: list[dict], max_new_tokens: int) -> tuple[list[str], float]:
    dev = model.device
    ids = torch.tensor([it["prompt"].input_ids for it in batch], device=dev)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with Clock(dev) as clk:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad)
    return tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True), clk.seconds


def run_niah(model, tok, model_name: str, out: Jsonl, lengths, depths, trials: int, variants: list[Variant],
             sparsities, haystack: str = "austen", yarn: float | None = None, max_new_tokens: int = 16,
             batch_tokens: int = 131072, impl: str = "auto", seed: int = 0, time_budget: float | None = None,
             progress: bool = True) -> int:
    """Run the grid, appending one row per (prompt, variant, sparsity) to ``out`` (cells already there are
    skipped). Returns the number of rows written; stops early (cleanly, between batches) at ``time_budget``."""
    from tqdm.auto import tqdm

    limit = context_limit(model)
    too_long = [n for n in lengths if n > limit]
    if too_long:
        raise ValueError(f"lengths {too_long} exceed the model's context ({limit} tokens); pass a YaRN factor")
    todo = cells(variants, sparsities)
    deadline, written = Deadline(time_budget), 0
    total = len(lengths) * len(depths) * trials * len(todo)
    bar = tqdm(total=total, desc=f"niah {model_name}", disable=not progress)
    for n in lengths:
        prompts = build_prompts(tok, n, depths, trials, haystack, seed)
        for variant, sp in todo:
            base = dict(model=model_name, yarn=yarn, haystack=haystack, length=n, variant=variant.spec,
                        sparsity=sp)
            pending = [it for it in prompts if not out.has(**base, depth=it["depth"], trial=it["trial"])]
            bar.update(len(prompts) - len(pending))
            for batch in _batches(pending, batch_tokens):
                if deadline.passed():
                    bar.close()
                    return written
                with hf.using(variant.config(sp), impl=impl, phases=variant.phases) as stats:
                    answers, secs = generate(model, tok, batch, max_new_tokens)
                density = stats["kept"] / stats["causal"] if stats["causal"] else 1.0
                for it, ans in zip(batch, answers):
                    p = it["prompt"]
                    out.write({**base, "depth": it["depth"], "trial": it["trial"], "policy": variant.policy,
                               "n_tokens": len(p.input_ids), "passkey": p.passkey, "answer": ans.strip()[:200],
                               "correct": answer_has_passkey(ans, p.passkey), "density": round(density, 5),
                               "batch": len(batch), "seconds": round(secs / len(batch), 4)})
                    written += 1
                bar.update(len(batch))
    bar.close()
    return written


def accuracy_table(rows: list[dict]) -> dict:
    """{(model, yarn, variant, sparsity): {length: accuracy}} over depths and trials."""
    acc: dict = {}
    for r in rows:
        key = (r["model"], r.get("yarn"), r["variant"], r["sparsity"])
        c = acc.setdefault(key, {}).setdefault(r["length"], [0, 0])
        c[0] += bool(r["correct"])
        c[1] += 1
    return {k: {n: c[0] / c[1] for n, c in sorted(v.items())} for k, v in acc.items()}
