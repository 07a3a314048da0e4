"""Run one vLLM engine (LLM class) on a job described by a JSON file and write the results as JSON.

    python engine_run.py job.json result.json

job: {"model": path, "backend": "CUSTOM" | null, "max_model_len": int, "dtype": str,
      "engine_kwargs": {...}, "chat": bool,
      "requests": [{"prompt": str | "prompt_token_ids": [...], "max_tokens": int, "extra_args": {...},
                    "ignore_eos": bool (optional)}],
      "batches": [[request indices], ...]   (default: one batch of all requests),
      "bad_requests": [{"prompt": ..., "extra_args": {...}}]   (each must be rejected; the engine must go on)}
The CAB_* and VLLM_* environment of the process configures the engine. Runs in its own process so each
engine starts clean (and vLLM's spawn needs the __main__ guard).
"""

from __future__ import annotations

import json
import os
import sys
import time


def key_code_pages(kv_cache, spec) -> int:
    """Pages of one layer's cache whose key copy (CAB_TOKEN_SCORER=int4 or fp8, in each page's tail) equals a fresh
    encode of the page's keys, taken as a full page (the pages a finished prompt filled)."""
    import os

    import torch

    from cab_vllm.backend import compat
    from cab_vllm.ops import key_codes as kq

    fmt = os.environ.get("CAB_TOKEN_SCORER", "int4")
    stored = compat.key_codes_view(kv_cache, spec.head_size, fmt)
    key_cache, _ = compat.split_kv(kv_cache, spec.head_size)
    pages, page = key_cache.shape[0], key_cache.shape[1]
    fresh = kq.key_codes(pages, page, key_cache.shape[2], spec.head_size, "cpu", fmt)
    bt = torch.arange(pages, dtype=torch.int32)[:, None]
    full = torch.full((pages,), page, dtype=torch.int32)
    kq.encode_keys(key_cache, fresh, bt, full, full, impl="torch")
    same = [torch.equal(stored.codes[p], fresh.codes[p]) and torch.equal(stored.bounds[p], fresh.bounds[p])
            for p in range(pages)]
    return sum(same)


def main(job_path: str, out_path: str) -> None:
    job = json.load(open(job_path))
    from vllm import LLM, SamplingParams

    kw = dict(job.get("engine_kwargs", {}))
    if job.get("backend"):
        kw["attention_backend"] = job["backend"]
    t0 = time.time()
    llm = LLM(job["model"], max_model_len=job.get("max_model_len", 4096), dtype=job.get("dtype", "bfloat16"),
              enforce_eager=True, gpu_memory_utilization=job.get("gpu_memory_utilization", 0.5), seed=0, **kw)
    init_s = time.time() - t0
    tok = llm.get_tokenizer() if not kw.get("skip_tokenizer_init") else None

    def as_prompt(r):
        if "prompt_token_ids" in r:
            return {"prompt_token_ids": r["prompt_token_ids"]}
        if job.get("chat"):
            return tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                           tokenize=False)
        return r["prompt"]

    def params(r):
        return SamplingParams(max_tokens=r.get("max_tokens", 16), temperature=0.0, extra_args=r.get("extra_args"),
                              ignore_eos=r.get("ignore_eos", False))

    reqs = job["requests"]
    batches = job.get("batches") or [list(range(len(reqs)))]
    outs: list = [None] * len(reqs)
    lens: list = [None] * len(reqs)
    t1 = time.time()
    for batch in batches:
        res = llm.generate([as_prompt(reqs[i]) for i in batch], [params(reqs[i]) for i in batch], use_tqdm=False)
        for i, o in zip(batch, res):
            outs[i] = {"text": o.outputs[0].text, "token_ids": list(o.outputs[0].token_ids)}
            lens[i] = len(o.prompt_token_ids)
    gen_s = time.time() - t1
    rejected = []
    for r in job.get("bad_requests", []):
        try:
            llm.generate([as_prompt(r)], [params(r)], use_tqdm=False)
            rejected.append(None)
        except Exception as e:  # noqa: BLE001 - report any other type to the test
            rejected.append(f"{type(e).__name__}: {e}")
    after = None
    if job.get("bad_requests"):
        r = reqs[0]
        after = list(llm.generate([as_prompt(r)], [params(r)], use_tqdm=False)[0].outputs[0].token_ids)
    info = {"outputs": outs, "prompt_lens": lens, "rejected": rejected, "after_bad": after, "pid": os.getpid(),
            "init_s": init_s, "gen_s": gen_s}
    try:  # only in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0)
        runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
        info["backends"] = sorted({f"{g.backend.__module__}.{g.backend.__name__}" for gs in runner.attn_groups
                                   for g in gs})
        kcc = getattr(runner, "kv_cache_config", None)
        if kcc is not None:  # what vLLM sized the cache by: bytes per page, pages
            info["kv_page_bytes"] = int(kcc.kv_cache_groups[0].kv_cache_spec.page_size_bytes)
            info["kv_num_blocks"] = int(kcc.num_blocks)
        if job.get("check_key_codes"):
            info["key_code_pages"] = key_code_pages(runner.kv_caches[0], kcc.kv_cache_groups[0].kv_cache_spec)
        from cab_vllm.backend.plan import METRICS
        from cab_vllm.backend.stats import STATS

        STATS.flush()  # steps the background thread has not accounted yet
        info["metrics"] = dict(METRICS)
        info["blocks"] = {"|".join(k): v for k, v in STATS.totals.items() if k[0] in ("kept", "causal")}
    except AttributeError:
        pass
    json.dump(info, open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
