"""Compile the backend's Triton kernels during engine start (vLLM's profiling run), so the first request is as
fast as the second: one sparse chunked prefill and one decode step of each routed mode, on scratch tensors with
the model's head geometry and dtype, through the same code path as the engine (planner.attend)."""

from __future__ import annotations

import math

import torch

from cab_vllm.backend.planner import (BoundsCache, DecodeWorkspace, PromptSlots, PromptTable, attend, plan_batch,
                                      route_rows, write_kv)
from cab_vllm.config import CABConfig


def warm_up_kernels(num_heads: int, num_kv_heads: int, head_size: int, dtype: torch.dtype, device,
                    cfg: CABConfig, workspace: DecodeWorkspace, page_size: int = 16, n: int = 1100) -> None:
    gen = torch.Generator(device="cpu").manual_seed(0)
    pages = math.ceil((n + 1) / page_size) + 1
    kv = torch.randn(pages, num_kv_heads, page_size, 2 * head_size, generator=gen).to(device=device, dtype=dtype)
    kvt = kv.transpose(1, 2)
    key_cache, value_cache = kvt[..., :head_size], kvt[..., head_size:]
    bt = torch.arange(1, pages, dtype=torch.int32, device=device)[None]
    bounds = BoundsCache(pages, page_size, num_kv_heads, head_size, cfg.block_size, dtype, device)
    slots = PromptSlots(2)
    table = PromptTable(2, num_kv_heads, workspace.max_blocks, device)
    sparse = cfg.replace(sparsity=max(cfg.sparsity, 0.5)) if cfg.policy != "dense" else CABConfig(sparsity=0.5)
    scale = 1.0 / math.sqrt(head_size)

    def step(a: int, b: int, c: CABConfig) -> None:
        q = torch.randn(b - a, num_heads, head_size, generator=gen).to(device=device, dtype=dtype)
        k = torch.randn(b - a, num_kv_heads, head_size, generator=gen).to(device=device, dtype=dtype)
        pos = torch.arange(a, b, device=device)
        sm = bt[0].long()[pos // page_size] * page_size + pos % page_size
        write_kv(k, k, key_cache, value_cache, sm)
        plan = plan_batch([0, b - a], [b], [c], 0, count=False, req_ids=["warm"], live=frozenset({"warm"}),
                          prompt_lens=[n])
        route_rows(plan, slots, fa_dense=False)
        done = bounds.completed_slots(sm) if b - a > 1 else sm[:0]
        out = torch.empty_like(q)
        attend(q, key_cache, value_cache, bt, torch.tensor([b], dtype=torch.int32, device=device), plan, bounds,
               done, scale, out, table=table, slot_mapping=sm, workspace=workspace)

    step(0, n // 2, sparse)  # a chunk
    step(n // 2, n, sparse)  # the prompt's final chunk: stores the prompt selection
    step(n, n + 1, sparse)  # decode: the prompt rule
    for policy in ("magnitude", "streaming"):  # decode: the step's own selection
        slots.stored.clear()
        step(n, n + 1, sparse.replace(policy=policy))
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
