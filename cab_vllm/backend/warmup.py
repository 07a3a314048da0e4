"""Compile the backend's Triton kernels during engine start (vLLM's profiling run), so the first request is as
fast as the second: one sparse chunked prefill and one decode step of each routed mode, on scratch tensors with
the model's head geometry and dtype, through the same code path as the engine (attention.attend)."""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import torch

from cab_vllm.backend.plan import KernelOptions, PromptSlots, SummarySlots, plan_batch, route_rows
from cab_vllm.backend.attention import DecodeWorkspace, KeySummaries, PromptTable, attend, write_kv
from cab_vllm.config import CABConfig
from cab_vllm.ops.fused_select import estimate_select
from cab_vllm.policies import fused_select_ok

logger = logging.getLogger(__name__)


def warm_up_kernels(num_heads: int, num_kv_heads: int, head_size: int, dtype: torch.dtype, device,
                    cfg: CABConfig, workspace: DecodeWorkspace, page_size: int = 16, n: int = 2048,
                    summaries: KeySummaries | None = None, kernels: KernelOptions | None = None,
                    dense_threshold: int = 0, fa_prefill=None, token_scratch=None,
                    token_rerank: int | None = None, token_passes: int | None = None,
                    token_scorer: str = "int4") -> dict[str, float]:
    """kernels: the engine's KernelOptions, so the variants compiled here are the ones its steps launch;
    token_scratch: the engine's TokenScratch when its decode rule is "tokens" (the decode steps below then run the
    token decode on it: cfg's rule applies to every decode step of an estimating policy); token_rerank: the
    engine's EngineSettings.token_rerank when it keeps a key copy (every step below then encodes its keys, and the
    token decode ranks by the copy), else None; token_scorer: that copy's format ("int4" or "fp8"); token_passes:
    the engine's EngineSettings.token_passes (None: ops.token_decode.PASSES);
    fa_prefill: the layer's (varlen, version) when its sparse prefill rows run in vLLM's FlashAttention (no Triton
    prefill kernel to compile then).
    dense_threshold: the engine's (EngineSettings.dense_threshold): contexts below it run dense, so the per-row
    kernels that compile per power of two of the key blocks are made only from its block count up. Returns the
    seconds each part took (the compiles, mostly), also logged at INFO: where an engine's start time goes."""
    kernels = KernelOptions() if kernels is None else kernels
    cuda = torch.device(device).type == "cuda"
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t0
        if cuda:
            torch.cuda.synchronize(device)
        t1 = time.perf_counter()
        seconds[name] = t1 - t0
        t0 = t1

    gen = torch.Generator(device="cpu").manual_seed(0)
    cap = workspace.max_blocks * cfg.block_size - 2  # the longest sequence the engine (and its buffers) hold
    halves = [h for h in (n // 2, 550) if 2 * h + 1 <= cap]
    n = 2 * halves[0] if halves else min(n, cap)
    pages = math.ceil((max(n, 1100) + 2) / page_size) + 1
    kv = torch.randn(pages, num_kv_heads, page_size, 2 * head_size, generator=gen).to(device=device, dtype=dtype)
    kvt = kv.transpose(1, 2)
    key_cache, value_cache = kvt[..., :head_size], kvt[..., head_size:]
    bt = torch.arange(1, pages, dtype=torch.int32, device=device)[None]
    codes = None
    if token_rerank is not None:
        from cab_vllm.ops.key_codes import encode_keys, key_codes

        codes = key_codes(pages, page_size, num_kv_heads, head_size, device, token_scorer)
    slots = PromptSlots(2)
    kept = SummarySlots(1) if summaries is not None else None  # a prompt's later chunk pools only its own blocks
    table = PromptTable(2, num_kv_heads, workspace.max_blocks, device)
    sparse = cfg.replace(sparsity=max(cfg.sparsity, 0.5)) if cfg.policy != "dense" else CABConfig(sparsity=0.5)
    scale = 1.0 / math.sqrt(head_size)

    def step(a: int, b: int, c: CABConfig, prompt_len: int, opts: KernelOptions = kernels) -> None:
        q = torch.randn(b - a, num_heads, head_size, generator=gen).to(device=device, dtype=dtype)
        k = torch.randn(b - a, num_kv_heads, head_size, generator=gen).to(device=device, dtype=dtype)
        pos = torch.arange(a, b, device=device)
        sm = bt[0].long()[pos // page_size] * page_size + pos % page_size
        write_kv(k, k, key_cache, value_cache, sm)
        if codes is not None:
            encode_keys(key_cache, codes, bt, torch.tensor([b], dtype=torch.int32, device=device),
                        torch.tensor([b - a], dtype=torch.int32, device=device), max_new=b - a)
        plan = plan_batch([0, b - a], [b], [c], 0, count=False, req_ids=["warm"], live=frozenset({"warm"}),
                          prompt_lens=[prompt_len])
        route_rows(plan, slots, fa_dense=False, summaries=kept)
        out = torch.empty_like(q)
        tokens = None
        if token_scratch is not None and plan.tkeep and any(plan.tkeep):
            tokens = (torch.tensor(plan.tkeep, dtype=torch.int32, device=device), token_scratch)
        attend(q, key_cache, value_cache, bt, torch.tensor([b], dtype=torch.int32, device=device), plan, scale, out,
               table=table, workspace=workspace, summaries=summaries, kernels=opts, fa_prefill=fa_prefill,
               tokens=tokens, key_codes=(codes, token_rerank) if codes is not None else None,
               token_passes=token_passes)

    # two prompts in two chunks each, one with lengths that are multiples of 16 and one without (Triton compiles
    # the two apart); the final chunk stores the prompt selection, then a decode step reads it (the prompt rule)
    for half in halves:
        step(0, half, sparse, 2 * half)
        step(half, 2 * half, sparse, 2 * half)
        step(2 * half, 2 * half + 1, sparse, 2 * half)
    from cab_vllm.ops import decode as dec

    one_row_max = dec.ONE_LAUNCH_MAX_ROWS if kernels.one_launch_rows is None else kernels.one_launch_rows
    if kernels.one_launch_rows is None and not dec.one_launch_default(1, workspace.mpad):
        one_row_max = 0  # this engine's selection rows are too wide for one launch (ops.decode.ONE_LAUNCH_MAX_MPAD)
    # a single-row decode step runs selection and attention in one launch (when one_row_max >= 1), a larger batch
    # in two: make both
    for limit in dict.fromkeys((one_row_max, 0)):
        opts = dataclasses.replace(kernels, one_launch_rows=limit)
        if limit != one_row_max and halves:  # the prompt rule again: the final chunk stores the selection
            h = halves[-1]
            step(h, 2 * h, sparse, 2 * h, opts)
            step(2 * h, 2 * h + 1, sparse, 2 * h, opts)
        for policy in ("magnitude", "streaming"):  # decode with the step's own selection
            slots.stored.clear()
            step(n, n + 1, sparse.replace(policy=policy), n, opts)
    lap("prefill_decode")
    if cuda:
        # the estimate's softmax compiles once per power of two of the key-block count: make every one a sparse row
        # can have, from the dense threshold's (16 blocks, 1024 tokens, at least) up to the engine's longest
        # context (a 1-row softmax each; CUDA's default threshold, 16384 tokens, leaves 4 of 8 sizes at 128k)
        from cab_vllm.ops.coarsen import softmax_group

        least = -(-dense_threshold // cfg.block_size)  # the fewest key blocks a sparse row can have
        counts = _block_counts(workspace.max_blocks, least)
        for p in counts:
            logits = torch.zeros(1, num_heads, 1, p, dtype=torch.float32, device=device)
            softmax_group(logits, p * cfg.block_size, num_kv_heads, cfg.block_size, q_block_offset=p - 1)
        lap("softmax")
        launches = 0
        if kernels.fused_select and fused_select_ok(cfg):
            launches = warm_fused_select(num_heads, num_kv_heads, head_size, dtype, device, cfg, workspace.max_blocks,
                                         least)
        lap("fused_select")
        more = (f", the estimate's softmax for {len(counts)} key-block counts {seconds['softmax']:.1f} s, the fused "
                f"predictor ({launches} launches) {seconds['fused_select']:.1f} s")
    else:
        more = ""
    logger.info("CAB warm-up (%d/%d heads, head dim %d, %s): prefill and decode paths %.1f s%s", num_heads,
                num_kv_heads, head_size, str(dtype).replace("torch.", ""), seconds["prefill_decode"], more)
    return seconds


def warm_fused_select(num_heads: int, num_kv_heads: int, head_size: int, dtype: torch.dtype, device,
                      cfg: CABConfig, max_blocks: int, least: int = 0) -> int:
    """Compile the fused predictor (ops.fused_select; KernelOptions.fused_select, CAB_FUSED_SELECT, on by default)
    for every power of two of the key-block count (_block_counts; from that of ``least`` blocks, the fewest a sparse
    row has), with and without exact rows (its compiled variants). Returns the number of launches."""
    launches = 0
    q1 = torch.zeros(1, num_heads, cfg.block_size, head_size, dtype=dtype, device=device)
    for p in _block_counts(max_blocks, least):
        summ = KeySummaries(1, num_kv_heads, p, head_size, cfg.estimator, dtype, device).data
        for ex in (None, torch.zeros(num_kv_heads, p, device=device)):
            estimate_select(q1, summ, p * cfg.block_size, torch.ones(1, dtype=torch.int32, device=device), 1,
                            cfg.block_size, cfg.estimator, cfg.sink_blocks, cfg.local_blocks, p - 1, ex)
            launches += 1
    return launches


def _block_counts(max_blocks: int, least: int = 0) -> list[int]:
    """The key-block counts whose power of two the per-row kernels compile for: from 16 (1024 tokens), or from the
    power of two of ``least`` (the fewest key blocks a sparse row has, the dense threshold's), up to the engine's
    longest context (none where no sparse row fits it)."""
    from cab_vllm.ops._triton import next_pow2

    if least > max_blocks:
        return []
    top, p, counts = next_pow2(max_blocks), max(16, next_pow2(max(least, 1))), []
    while p <= top:
        counts.append(p)
        p *= 2
    return counts
