"""A vLLM scheduler whose prefill chunks end where no other request can move them: CABScheduler.

CAB selects key blocks per 64-token query block from the rows of the block that its chunk holds, scores the prompt's
last ``exact_rows`` rows exactly in the chunk that ends the prompt, and stores that chunk's selection for the prompt
decode rule (a prompt whose last token arrives alone is handed to attention as a decode row and selects by key bounds
instead). vLLM's own scheduler ends a prefill chunk wherever the step's token budget runs out, and a prefix-cache hit
wherever the cached pages end; the budget is shared with the other requests' tokens and the cache holds what other
requests left. So with vLLM's scheduler a long prompt's selections, and its answer, can change with the traffic
around it (BENCHMARKS.md, forty-second run: from the first generated token, in CUDA vLLM on an H100).

CABScheduler (vLLM's Scheduler, or AsyncScheduler when async scheduling is on) cuts every prompt the same way
whatever else is running:
- a chunk that does not end the prompt ends on a multiple of CAB's block (CAB_BLOCK_SIZE), and at least
  ``exact_rows`` (at least 2) tokens before the prompt's end, so no query block is split, the chunk that ends the
  prompt holds every row the exact scores read, and the prompt's last token never arrives alone;
- a prefix-cache hit is used up to a multiple of CAB's block (and of the page size), leaving the same rows (for a
  preempted request, those of its prompt);
- a preempted request, prefilled again over its prompt and the tokens it had generated, stops at the prompt's end.
A request under the adaptive budget with windows of W > 1 query blocks (CAB_BUDGET_WINDOW) has its chunks and hits
cut at multiples of W blocks instead, so each window's total is split over rows that are always selected together.
Which rows run dense does not depend on the chunks either: a prompt shorter than the dense threshold runs dense, a
longer one sparse in every chunk (stats.dense_reason). vLLM's own deterministic prefix-caching cut (a newer vLLM's
--deterministic-prefix-caching: a prompt's last partial page computed in a step of its own) is replaced by the
same idea at CAB's unit: the chunk before the prompt's end stops where a full prefix-cache hit would resume, so a
hit and a miss compute the prompt's last chunk alike.
CABScheduler works through the hook vLLM 0.26-0.33 have for Mamba's block-aligned chunks
(``_mamba_block_aligned_split``, ``need_mamba_block_aligned_split``): models with Mamba layers, and a vLLM without the
hook, are refused at start.

cab-serve uses it; with ``vllm serve`` or ``LLM(...)`` pass ``--scheduler-cls cab_vllm.backend.scheduler.CABScheduler``
(``scheduler_cls=...``). The chunk of a preempted request past its prompt's end replays what its rows kept as decode
rows: under the prompt decode rule the stored selection (plan.route_rows, attention.replay_selection), under the
per-step rules each row as the decode row it was (plan.decode_pieces). What still depends on other requests: KV
pages loaded by a KV connector.
"""

from __future__ import annotations

import math
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

QUALNAME = "cab_vllm.backend.scheduler.CABScheduler"


def chunk_tokens(start: int, num_new: int, prompt_len: int, prefill_end: int, block: int, last_rows: int,
                 hit_stop: int = 0) -> int:
    """The tokens a prefill chunk from position ``start`` may take when vLLM's budget offers ``num_new``: up to the
    first stop after start (the prompt's end, the end of the prefill: past the prompt for a preempted request
    prefilled again) it may reach; a chunk that stops short of it ends on a multiple of ``block``, and short of the
    prompt's end by at least ``last_rows`` tokens. hit_stop (> 0: a multiple of block at least last_rows before the
    prompt's end): a chunk that would run past it stops there, so the prompt's last chunk starts where a full
    prefix-cache hit resumes. 0: no allowed end within the budget (the request waits for a step with more room)."""
    if start >= prefill_end:
        return num_new
    end = start + num_new
    stop = prompt_len if start < prompt_len else prefill_end
    if start < hit_stop < min(end, stop):
        return hit_stop - start
    if end >= stop:
        return stop - start
    cap = stop - last_rows if stop == prompt_len else stop
    return max(min(end, cap) // block * block - start, 0)


def kept_hit(hit: int, num_tokens: int, unit: int, last_rows: int) -> int:
    """The tokens of a prefix-cache hit of ``hit`` tokens (of a request of num_tokens) to use: a multiple of unit that
    leaves at least last_rows tokens to compute."""
    return max(min(hit, num_tokens - last_rows), 0) // unit * unit


class CABScheduler(Scheduler):
    """vLLM's scheduler with CAB's chunk ends (module docstring). Built as CABAsyncScheduler when the engine schedules
    asynchronously, so it keeps vLLM's async scheduling."""

    def __new__(cls, *args: Any, **kwargs: Any):
        if cls is CABScheduler:
            vcfg = kwargs.get("vllm_config", args[0] if args else None)
            if getattr(getattr(vcfg, "scheduler_config", None), "async_scheduling", False):
                cls = CABAsyncScheduler
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        hooked = "need_mamba_block_aligned_split" in vars(self) and any(
            "_mamba_block_aligned_split" in vars(c) for c in type(self).__mro__ if c.__module__ != __name__)
        if not hooked:
            raise NotImplementedError("CABScheduler: this vLLM's scheduler has no block-aligned chunk hook "
                                      "(need_mamba_block_aligned_split / _mamba_block_aligned_split, vLLM 0.26-0.33), "
                                      "so it cannot end prefill chunks on CAB's blocks; drop --scheduler-cls to run "
                                      "vLLM's scheduler, whose chunk ends follow the other requests")
        if self.need_mamba_block_aligned_split:
            raise NotImplementedError("CABScheduler cuts prefill chunks at CAB's blocks through the hook vLLM keeps "
                                      "for Mamba's block-aligned chunks; this model has Mamba layers, which the CAB "
                                      "backend does not support")
        from cab_vllm.backend.compat import engine_settings

        settings = engine_settings()
        self.cab_cfg = settings.cfg
        self.cab_block = settings.cfg.block_size
        self.cab_window_block = settings.cfg.block_size * settings.cfg.budget_window  # adaptive requests' unit
        self.cab_last_rows = max(settings.cfg.exact_rows, 2)
        budget = self.scheduler_config.max_num_batched_tokens
        if budget < self.cab_window_block + self.cab_last_rows:
            unit = (f"CAB's block ({self.cab_block})" if self.cab_window_block == self.cab_block else
                    f"an adaptive budget window (CAB_BUDGET_WINDOW={settings.cfg.budget_window} blocks of "
                    f"{self.cab_block}: {self.cab_window_block})")
            raise ValueError(f"CABScheduler: max_num_batched_tokens={budget} must be at least {unit} + "
                             f"{self.cab_last_rows} tokens, or a prompt's chunks could never end on one")
        self.cab_group_pages = [g.kv_cache_spec.block_size for g in self.kv_cache_config.kv_cache_groups]
        self.cab_hit_unit = math.lcm(self.cab_block, *self.cab_group_pages)
        self.cab_window_hit_unit = math.lcm(self.cab_window_block, *self.cab_group_pages)
        # a newer vLLM's deterministic prefix caching: CAB's chunk rule takes the place of vLLM's cut (chunk_tokens)
        self.cab_hit_stops = bool(getattr(self, "deterministic_prefix_caching", False))
        self.need_mamba_block_aligned_split = True  # vLLM then calls _mamba_block_aligned_split for every chunk
        # the cache manager's prefix-cache hits (read by this scheduler, and by the manager's own connector path)
        self.vllm_computed_blocks = self.kv_cache_manager.get_computed_blocks
        self.kv_cache_manager.get_computed_blocks = self.cab_computed_blocks

    def cab_windowed(self, request) -> bool:
        """Whether the request's chunks and hits are cut at whole adaptive budget windows: its config (the engine's
        with its cab_* extra_args) is adaptive and a window holds more than one block."""
        if self.cab_window_block == self.cab_block:
            return False
        from cab_vllm.backend.plan import request_config

        extra = getattr(getattr(request, "sampling_params", None), "extra_args", None)
        return request_config(self.cab_cfg, extra).adaptive

    def cab_units(self, request) -> tuple[int, int]:
        """(chunk unit, prefix-cache hit unit) of the request, in tokens."""
        if self.cab_windowed(request):
            return self.cab_window_block, self.cab_window_hit_unit
        return self.cab_block, self.cab_hit_unit

    def cab_computed_blocks(self, request, *args: Any, **kwargs: Any):
        """vLLM's prefix-cache hit for the request (KVCacheBlocks per cache group, tokens, ...), cut to kept_hit.
        Later arguments go to vLLM's lookup as they came (0.33+: an upper bound of the hit, max_cache_hit_length)."""
        blocks, hit, *rest = self.vllm_computed_blocks(request, *args, **kwargs)
        # a preempted request's hit may run past its prompt: stop before the prompt's end, so the chunk that ends the
        # prompt runs again (it stores the prompt's selection, which the tokens after it replay)
        keep = kept_hit(hit, min(request.num_tokens, request.num_prompt_tokens), self.cab_units(request)[1],
                        self.cab_last_rows)
        if keep < hit:
            blocks = type(blocks)(tuple(list(g)[:keep // p] for g, p in zip(blocks.blocks, self.cab_group_pages)))
        return (blocks, keep, *rest)

    def _prefix_cache_aligned_split(self, request, num_new_tokens: int, *args: Any, **kwargs: Any) -> int:
        """A newer vLLM's deterministic prefix-caching cut, left to _mamba_block_aligned_split (hit_stop): vLLM's
        own stop at the prompt's last page would keep CAB's chunks from ever reaching a block end past it."""
        return num_new_tokens

    def _mamba_block_aligned_split(self, request, num_new_tokens: int, num_new_local_computed_tokens: int = 0,
                                   num_external_computed_tokens: int = 0, *args: Any, **kwargs: Any) -> int:
        # (later arguments of newer vLLMs, such as a shared-prefix hint for Mamba's cache, do not concern CAB)
        start = request.num_computed_tokens + num_new_local_computed_tokens + num_external_computed_tokens
        prefill_end = max(request.num_prompt_tokens, request.num_tokens - 1)
        unit, hit_unit = self.cab_units(request)
        hit_stop = 0
        if self.cab_hit_stops and request.num_tokens == request.num_prompt_tokens:  # a fresh prompt (not preempted)
            hit_stop = kept_hit(request.num_prompt_tokens, request.num_prompt_tokens, hit_unit, self.cab_last_rows)
        return chunk_tokens(start, num_new_tokens, request.num_prompt_tokens, prefill_end, unit, self.cab_last_rows,
                            hit_stop)


class CABAsyncScheduler(CABScheduler, AsyncScheduler):
    """CABScheduler over vLLM's AsyncScheduler (async scheduling on)."""
