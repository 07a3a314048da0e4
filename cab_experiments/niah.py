"""Experiment A: the needle (passkey) grid — lengths x depths x trials x policies x sparsities, greedy generation.

Each cell generates with the model's attention swapped to CAB (cab_vllm.hf) and checks that the answer holds the
pass key. Prompts of one length share a token count, so they run batched (no padding); prefill and decode both
run the policy (decode rules: see cab_vllm.hf).
"""

from __future__ import annotations

from cab_experiments.common import Deadline, Jsonl, Variant, calibrate_keys, cells, check_lengths, run_cell
from cab_models.text import answer_has_passkey, passkey_prompt

KEY = ("model", "yarn", "haystack", "length", "depth", "trial", "variant", "sparsity", "dense_threshold")


def build_prompts(tok, length: int, depths, trials: int, haystack: str, seed: int = 0) -> list[dict]:
    """One prompt per (depth, trial); trial t uses seed ``seed + t`` (its pass key and Austen offset)."""
    out = []
    for t in range(trials):
        for d in depths:
            p = passkey_prompt(tok, length, d, haystack=haystack, seed=seed + t)
            out.append({"depth": d, "trial": t, "prompt": p, "input_ids": p.input_ids})
    return out


def _result(it: dict, answer: str) -> dict:
    p = it["prompt"]
    return {"passkey": p.passkey, "answer": answer.strip()[:200], "correct": answer_has_passkey(answer, p.passkey)}


def run_niah(model, tok, model_name: str, out: Jsonl, lengths, depths, trials: int, variants: list[Variant],
             sparsities, haystack: str = "austen", yarn: float | None = None, max_new_tokens: int = 16,
             batch_tokens: int = 131072, impl: str = "auto", seed: int = 0, time_budget: float | None = None,
             progress: bool = True) -> int:
    """Run the grid, appending one row per (prompt, variant, sparsity) to ``out`` (cells already there are
    skipped). Returns the number of rows written; stops early (cleanly, between batches) at ``time_budget``."""
    from tqdm.auto import tqdm

    check_lengths(model, lengths)
    calibrate_keys(model, tok, variants, max(lengths))
    todo = cells(variants, sparsities)
    deadline, written = Deadline(time_budget), 0
    total = len(lengths) * len(depths) * trials * len(todo)
    bar = tqdm(total=total, desc=f"niah {model_name}", disable=not progress)
    for n in lengths:
        prompts = build_prompts(tok, n, depths, trials, haystack, seed)
        for variant, sp in todo:
            base = dict(model=model_name, yarn=yarn, haystack=haystack, length=n)
            w, stopped = run_cell(model, tok, out, prompts, variant, sp, base, ("depth", "trial"), _result,
                                  max_new_tokens, batch_tokens, impl, deadline, bar)
            written += w
            if stopped:
                bar.close()
                return written
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
