"""Experiment B: perplexity versus attention latency on Jane Austen's novels.

Perplexity: windows of L tokens from the six novels joined (evenly spaced offsets), one prefill each with the
policy active in every layer; the loss is reported over the whole window and over its last quarter (where the
context is long enough for sparsity to matter).
Latency: every layer's post-RoPE Q/K of one window is captured once; per (variant, sparsity) the time of the
whole attention of all layers — predictor (select_blocks) included — is measured with CUDA events (median of
repeats) against dense SDPA (FlashAttention on the GPU) on the same tensors in the same run.
"""

from __future__ import annotations

import math
import statistics

import torch
import torch.nn.functional as F

from cab_vllm import hf
from cab_vllm.api import select_blocks, sparse_attention
from cab_experiments.common import Clock, Deadline, Jsonl, Variant, cells, context_limit

KEY = ("kind", "model", "yarn", "length", "window", "variant", "sparsity")


def corpus_ids(tok, cache_dir=None) -> torch.Tensor:
    from cab_models.text import austen_books

    text = "\n\n".join(austen_books(cache_dir).values())
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def window_offsets(total: int, length: int, windows: int) -> list[int]:
    if length > total:
        raise ValueError(f"window length {length} exceeds the corpus ({total} tokens)")
    if windows < 1:
        raise ValueError("windows must be >= 1")
    span = total - length
    return [span * i // max(1, windows - 1) if windows > 1 else 0 for i in range(windows)]


@torch.no_grad()
def token_nll(model, ids: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Per-token negative log-likelihood [N-1] (fp32) of one sequence ids [N], logits computed in chunks."""
    hidden = model.get_decoder()(input_ids=ids[None], use_cache=False).last_hidden_state[0]
    out = []
    for i in range(0, ids.numel() - 1, chunk):
        j = min(i + chunk, ids.numel() - 1)
        logits = model.lm_head(hidden[i:j]).float()
        out.append(F.cross_entropy(logits, ids[i + 1: j + 1], reduction="none"))
    return torch.cat(out)


def _time(fn, device, reps: int) -> float:
    """Median seconds of ``fn`` (one warm-up), CUDA events on the GPU."""
    fn()
    times = []
    for _ in range(reps):
        if torch.device(device).type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            with Clock(device) as c:
                fn()
            times.append(c.seconds)
    return statistics.median(times)


def _dense_backend(device):
    """FlashAttention on CUDA (an error rather than a silent slower fallback); SDPA's choice elsewhere."""
    import contextlib

    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


@torch.no_grad()
def attention_latency(captures: list, cfg, reps: int = 5, impl: str = "auto") -> float:
    """Seconds for the attention of every captured layer: predictor + sparse kernel (cfg) or dense SDPA (None)."""
    def run():
        for _, q, k in captures:
            if cfg is None:
                with _dense_backend(q.device):
                    F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
            else:
                sparse_attention(q, k, k, select_blocks(q, k, cfg, impl=impl), impl=impl)

    return _time(run, captures[0][1].device, reps)


def run_ppl(model, tok, model_name: str, out: Jsonl, lengths, windows: int, variants: list[Variant], sparsities,
            yarn: float | None = None, latency: bool = True, latency_reps: int = 5, impl: str = "auto",
            time_budget: float | None = None, progress: bool = True, corpus: torch.Tensor | None = None) -> int:
    """Append kind="ppl" rows (one per window x cell) and kind="latency" rows (one per cell) to ``out``."""
    from tqdm.auto import tqdm

    limit = context_limit(model)
    if any(n > limit for n in lengths):
        raise ValueError(f"lengths {[n for n in lengths if n > limit]} exceed the model's context ({limit})")
    dev = model.device
    ids_all = corpus_ids(tok) if corpus is None else corpus
    todo = cells(variants, sparsities)
    deadline, written = Deadline(time_budget), 0
    bar = tqdm(total=len(lengths) * len(todo) * (windows + int(latency)), desc=f"ppl {model_name}",
               disable=not progress)
    for n in lengths:
        offs = window_offsets(ids_all.numel(), n, windows)
        for variant, sp in todo:
            base = dict(model=model_name, yarn=yarn, length=n, variant=variant.spec, sparsity=sp)
            for w, off in enumerate(offs):
                bar.update()
                if out.has(kind="ppl", window=w, **base):
                    continue
                if deadline.passed():
                    return written
                ids = ids_all[off: off + n].to(dev)
                with variant.using(sp, impl) as stats, Clock(dev) as clk:
                    nll = token_nll(model, ids)
                q4 = nll[-(nll.numel() // 4):]
                out.write({"kind": "ppl", **base, "window": w, "offset": off, "policy": variant.policy,
                           "nll": nll.mean().item(), "nll_last_quarter": q4.mean().item(),
                           "ppl": math.exp(nll.mean().item()), "ppl_last_quarter": math.exp(q4.mean().item()),
                           "density": round(stats["kept"] / stats["causal"], 5) if stats["causal"] else 1.0,
                           "forward_s": round(clk.seconds, 4)})
                written += 1
        if latency:
            ids = ids_all[offs[0]: offs[0] + n].to(dev)
            with hf.using(None), hf.capture() as caps:
                model.get_decoder()(input_ids=ids[None], use_cache=False)
            for variant, sp in todo:
                bar.update()
                base = dict(model=model_name, yarn=yarn, length=n, variant=variant.spec, sparsity=sp)
                if out.has(kind="latency", window=0, **base):
                    continue
                if deadline.passed():
                    return written
                secs = attention_latency(caps, variant.config(sp), latency_reps, impl)
                out.write({"kind": "latency", **base, "window": 0, "policy": variant.policy,
                           "layers": len(caps), "attention_s": secs, "device": dev.type,
                           "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None})
                written += 1
            del caps
    bar.close()
    return written


def summary(rows: list[dict]) -> dict:
    """{(model, yarn, length, variant, sparsity): {"ppl", "ppl_last_quarter", "attention_s"}} (means over windows)."""
    acc: dict = {}
    for r in rows:
        key = (r["model"], r.get("yarn"), r["length"], r["variant"], r["sparsity"])
        d = acc.setdefault(key, {"nll": [], "nll_q": [], "attention_s": None})
        if r["kind"] == "ppl":
            d["nll"].append(r["nll"])
            d["nll_q"].append(r["nll_last_quarter"])
        elif r["kind"] == "latency":
            d["attention_s"] = r["attention_s"]
    return {k: {"ppl": math.exp(statistics.mean(d["nll"])) if d["nll"] else None,
                "ppl_last_quarter": math.exp(statistics.mean(d["nll_q"])) if d["nll_q"] else None,
                "attention_s": d["attention_s"], "windows": len(d["nll"])} for k, d in acc.items()}
