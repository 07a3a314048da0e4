"""Calibration of estimators x policies x sparsities on a real model's post-RoPE Q/K.

For one passkey prompt, every layer's Q/K is captured in one dense prefill (cab_vllm.hf.capture). Then, per
layer and query head:
- the exact block attention of every query block (mass of all its rows; the block-level oracle's input);
- the needle mass: attention of the last query block (the question) on the blocks holding the needle.
The retrieval heads are the top ``head_frac`` of all (layer, head) pairs by needle mass. For each setting:
- needle recall: on the retrieval heads, the share whose KV head keeps, in the last query block's row, the
  needle block that head attends to most;
- mass recall: over all heads and query blocks, the exact attention mass inside the selection (1 = lossless);
- last-row mass recall: the same for the question's query block only.
The block-level oracle keeps, per KV head, the blocks of largest exact mass (max over the group's heads).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from cab_vllm.config import CABConfig
from cab_vllm.ops.coarsen import sampled_block_attention
from cab_vllm.ops.reference import selection_to_block_mask
from cab_vllm.ops.coarsen import group_reduce
from cab_vllm.policies import estimate, select_from_attention

ORACLE = "oracle"


@dataclass(frozen=True)
class Setting:
    """One calibration cell: a policy with an estimator at a sparsity (policy 'oracle' = exact block mass)."""

    policy: str
    estimator: str
    sparsity: float
    curvature_share: float = 0.0
    exact_rows: int | None = None  # None: CABConfig's default

    def config(self, base: CABConfig) -> CABConfig:
        kw = dict(policy=self.policy if self.policy != ORACLE else "magnitude", estimator=self.estimator,
                  sparsity=self.sparsity, curvature_share=self.curvature_share)
        if self.exact_rows is not None:
            kw["exact_rows"] = self.exact_rows
        return base.replace(**kw)

    @property
    def name(self) -> str:
        s = f"{self.policy}/{self.estimator}"
        if self.curvature_share:
            s += f"/curv{self.curvature_share:g}"
        if self.exact_rows is not None:
            s += f"/exact{self.exact_rows}"
        return s


def oracle_selection(a_exact: torch.Tensor, num_kv_heads: int, cfg: CABConfig):
    """Keep, per KV head, the blocks of largest exact attention mass (max over the group's heads): the
    magnitude policy applied to the exact block attention."""
    a_max, a_mean = group_reduce(a_exact, num_kv_heads)
    return select_from_attention(a_max, a_mean, cfg.replace(policy="magnitude"))


@torch.no_grad()
def layer_exact(q: torch.Tensor, k: torch.Tensor, block_size: int, needle_blocks: list[int]) -> dict:
    """Exact block attention [Hq, M, M] of one layer (batch 1) and each head's needle mass/target block."""
    a = sampled_block_attention(q.float(), k.float(), block_size, block_size, impl="torch")[0]
    last = a[:, -1]  # [Hq, M]: the question's query block
    nb = torch.tensor(needle_blocks, device=a.device)
    needle_mass = last[:, nb].sum(-1)
    target = nb[last[:, nb].argmax(-1)]
    return {"a": a, "needle_mass": needle_mass, "target": target}


@torch.no_grad()
def score_selection(mask: torch.Tensor, ex: dict, group: int) -> dict:
    """mask [Hkv, M, M] bool -> per-head needle hit [Hq], mass recall [Hq], last-row mass recall [Hq]."""
    mq = mask.repeat_interleave(group, 0)  # [Hq, M, M]
    a = ex["a"]
    m = a.shape[-1]
    mass = (a * mq).sum(-1)  # [Hq, M]
    hit = mq[torch.arange(mq.shape[0]), m - 1, ex["target"]]
    return {"hit": hit, "mass": mass.mean(-1), "last_mass": mass[:, -1]}


@torch.no_grad()
def calibrate_captures(captures: list, needle_span: tuple[int, int], settings: list[Setting],
                       base: CABConfig = CABConfig(), head_frac: float = 0.1) -> list[dict]:
    """Rows of results for one prompt: one per setting, aggregated over layers and heads."""
    bs = base.block_size
    n = captures[0][2].shape[2]
    needle_blocks = list(range(needle_span[0] // bs, (needle_span[1] - 1) // bs + 1))
    per_layer = []
    timings: dict[str, float] = {}
    for layer, q, k in captures:
        if q.shape[0] != 1:
            raise ValueError("calibration captures must have batch 1")
        hq, hkv = q.shape[1], k.shape[1]
        ex = layer_exact(q, k, bs, needle_blocks)
        res = {}
        for st in settings:
            cfg = st.config(base)
            t0 = time.perf_counter()
            if st.policy == ORACLE:
                idx, cnt = oracle_selection(ex["a"][None], hkv, cfg)
            else:
                a_max, a_mean = estimate(q, k, cfg, impl="torch")
                idx, cnt = select_from_attention(a_max, a_mean, cfg, impl="torch")
            timings[st.name] = timings.get(st.name, 0.0) + time.perf_counter() - t0
            mask = selection_to_block_mask(idx[0], cnt[0], ex["a"].shape[-1])
            res[(st.name, st.sparsity)] = score_selection(mask, ex, hq // hkv)
        per_layer.append((ex["needle_mass"], res))
    needle_mass = torch.cat([nm for nm, _ in per_layer])
    n_ret = max(1, int(round(head_frac * needle_mass.numel())))
    ret = torch.zeros_like(needle_mass, dtype=torch.bool)
    ret[needle_mass.topk(n_ret).indices] = True
    rows = []
    for st in settings:
        key = (st.name, st.sparsity)
        hit = torch.cat([r[key]["hit"] for _, r in per_layer])
        mass = torch.cat([r[key]["mass"] for _, r in per_layer])
        last_mass = torch.cat([r[key]["last_mass"] for _, r in per_layer])
        rows.append(dict(setting=st.name, policy=st.policy, estimator=st.estimator, sparsity=st.sparsity,
                         curvature_share=st.curvature_share, n_tokens=n, needle_blocks=needle_blocks,
                         retrieval_heads=int(ret.sum()), needle_recall=float(hit[ret].float().mean()),
                         needle_recall_all_heads=float(hit.float().mean()), mass_recall=float(mass.mean()),
                         last_row_mass_recall=float(last_mass.mean()), select_seconds=timings[st.name]))
    return rows


def default_settings(sparsities=(0.9, 0.95, 0.98)) -> list[Setting]:
    """The full grid: every estimator under magnitude/curvature/h2o/cab, plus streaming, random, oracle, and
    the seed's pipeline (curvature on max-L2 representatives) and a curvature-share sweep of cab."""
    out = []
    for s in sparsities:
        out.append(Setting(ORACLE, "bounds", s))
        out.append(Setting("streaming", "bounds", s))
        out.append(Setting("random", "bounds", s))
        for e in ("max_l2", "mean", "topr", "bounds", "sampled"):
            for p in ("magnitude", "curvature", "h2o", "cab"):
                out.append(Setting(p, e, s))
        for share in (0.25, 0.5):
            out.append(Setting("cab", "bounds", s, curvature_share=share))
        out.append(Setting("cab", "bounds", s, exact_rows=0))
    return out


def seed_setting(sparsity: float) -> Setting:
    """The seed's pipeline: max-L2 representatives, most-negative curvature."""
    return Setting("curvature", "max_l2", sparsity)


def default_setting(sparsity: float) -> Setting:
    d = CABConfig()
    return Setting(d.policy, d.estimator, sparsity)


def capture_prompt(model, input_ids: list[int]) -> list:
    """Dense prefill of one prompt through a model loaded with attn_implementation="cab"; returns captures."""
    from cab_vllm import hf

    ids = torch.tensor([input_ids])
    with torch.no_grad(), hf.using(None), hf.capture() as caps:
        model(ids, use_cache=False)
    return [(layer, q, k) for layer, q, k in caps]


__all__ = ["ORACLE", "Setting", "calibrate_captures", "capture_prompt", "default_settings", "seed_setting", "default_setting"]


def summarize(rows: list[dict]) -> str:
    """Markdown table: mean over prompts of needle recall / mass recall per setting and sparsity."""
    from collections import defaultdict

    agg: dict = defaultdict(list)
    for r in rows:
        agg[(r["setting"], r["sparsity"])].append(r)
    sparsities = sorted({r["sparsity"] for r in rows})
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    head = " | ".join(f"needle@{s:g}" for s in sparsities) + " | " + " | ".join(f"mass@{s:g}" for s in sparsities)
    lines = [f"| setting | {head} |", "|---" * (1 + 2 * len(sparsities)) + "|"]
    for st in settings:
        cells = []
        for key in ("needle_recall", "mass_recall"):
            for s in sparsities:
                rs = agg.get((st, s), [])
                cells.append(f"{sum(r[key] for r in rs) / len(rs):.2f}" if rs else "-")
        lines.append(f"| {st} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cab_vllm import hf
    from cab_models.models import prepare_model
    from cab_models.text import passkey_prompt

    ap = argparse.ArgumentParser(prog="python -m cab_experiments.calibrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    ap.add_argument("--haystack", choices=["austen", "filler"], default="austen")
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    ap.add_argument("--out", default="experiments/results/calibration.jsonl")
    a = ap.parse_args(argv)
    hf.register()
    path = prepare_model(a.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=hf.ATTN_NAME, dtype=torch.float32).eval()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = default_settings(tuple(a.sparsities))
    rows = []
    with out.open("w") as f:
        for n in a.lengths:
            for depth in a.depths:
                p = passkey_prompt(tok, n, depth, haystack=a.haystack, seed=int(depth * 1000) + n)
                t0 = time.perf_counter()
                caps = capture_prompt(model, p.input_ids)
                for r in calibrate_captures(caps, p.needle_token_span, settings):
                    r.update(model=a.model, haystack=a.haystack, depth=depth, length=n)
                    rows.append(r)
                    f.write(json.dumps(r) + "\n")
                f.flush()
                print(f"{a.model} {a.haystack} n={n} depth={depth}: {time.perf_counter() - t0:.0f} s", flush=True)
    table = summarize(rows)
    Path(out.with_suffix(".md")).write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
