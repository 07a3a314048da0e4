"""Shared pieces of the experiments: policy variants, model loading (with YaRN), resumable JSONL, timing, and the
generation cell that the needle grid and the task suite both run (same batching, same row fields)."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from cab_vllm.config import POLICIES, CABConfig

_FIELDS = {f for f in CABConfig.__dataclass_fields__} - {"sparsity", "policy"}
# the transformers adapter's own keys (cab_vllm.hf.using), not CABConfig fields
ADAPTER_KEYS = ("phases", "layers", "early", "compensate", "oracle", "tokens", "prefill", "prefill_chunk",
                "prefill_rows", "prefill_pooled", "prefill_est", "prefill_within", "prefill_cand")


@dataclass(frozen=True)
class Variant:
    """A policy with optional CABConfig overrides, written ``policy[:field=value,...]``.

    Examples: ``dense``, ``cab``, ``cab:curvature_share=0.5``, ``curvature:estimator=max_l2`` (the seed).
    The extra key ``phases=prefill|decode`` sparsifies only that phase, ``layers=LO-HI`` only layers LO..HI-1,
    ``early=N@S`` runs layers below N at sparsity S, ``compensate=mean|mass`` adds the dropped blocks' average back,
    ``oracle=token`` lets every sparse row keep its own best keys token by token at the same density,
    ``prefill=vertical`` lets every prompt row keep its recent keys and the keys the prompt's last rows attend to most
    (one token-level set per KV head) at the same density (``prefill=vslash``: also the offsets they attend to most;
    ``prefill_chunk=N``: each chunk of N rows ranks by its own last rows, ``prefill_rows=R``: by its last R,
    ``prefill_pooled=1``: by their mean query, ``prefill_est=sparqb16``: by their scores estimated as a token
    selector estimates them, ``prefill_within=F``: first among the tokens of cab's blocks at F x the budget,
    ``prefill_cand=rowbounds``: of as many blocks ranked by every row's box bound), and
    ``tokens=pcaR|sparqR|sparqgR|dimsR|intB`` the same keys ranked by an estimate (cab_vllm.hf.using; the transformers adapter
    only; pca and dims need the model's key basis and dimension order, cab_vllm.hf.calibrate_key_basis)."""

    spec: str
    policy: str
    overrides: tuple[tuple[str, object], ...] = ()

    @classmethod
    def parse(cls, spec: str) -> "Variant":
        policy, _, rest = spec.strip().partition(":")
        if policy not in POLICIES:
            raise ValueError(f"variant {spec!r}: unknown policy {policy!r} (expected one of {', '.join(POLICIES)})")
        overrides = []
        for item in filter(None, (s.strip() for s in rest.split(","))):
            key, eq, raw = item.partition("=")
            if not eq:
                raise ValueError(f"variant {spec!r}: {item!r} is not field=value")
            if key in ("tokens", "prefill_est"):
                from cab_vllm.hf import parse_prefill_est, parse_row_tokens

                try:
                    (parse_row_tokens if key == "tokens" else parse_prefill_est)(raw)
                except ValueError as e:
                    raise ValueError(f"variant {spec!r}: {e}") from None
                overrides.append((key, raw))
                continue
            if key in ("phases", "compensate", "oracle", "prefill", "prefill_cand"):
                from cab_vllm.hf import CANDIDATES, COMPENSATIONS, ORACLES, PHASES, PREFILLS

                allowed = {"phases": PHASES, "compensate": COMPENSATIONS, "oracle": ORACLES, "prefill": PREFILLS,
                           "prefill_cand": CANDIDATES}[key]
                if raw not in allowed:
                    raise ValueError(f"variant {spec!r}: {key}={raw!r} must be one of {allowed}")
                overrides.append((key, raw))
                continue
            if key == "prefill_pooled":
                if raw not in ("0", "1"):
                    raise ValueError(f"variant {spec!r}: prefill_pooled={raw!r} must be 0 or 1")
                overrides.append((key, raw == "1"))
                continue
            if key == "prefill_within":
                try:
                    f = float(raw)
                except ValueError:
                    f = float("nan")
                if not f >= 1:
                    raise ValueError(f"variant {spec!r}: prefill_within={raw!r} must be a number >= 1 (times the "
                                     f"budget)")
                overrides.append((key, f))
                continue
            if key in ("prefill_chunk", "prefill_rows"):
                if not raw.isdigit() or int(raw) < 1:
                    raise ValueError(f"variant {spec!r}: {key}={raw!r} must be a positive number of rows")
                overrides.append((key, int(raw)))
                continue
            if key == "layers":
                lo, dash, hi = raw.partition("-")
                if not (dash and lo.isdigit() and hi.isdigit() and int(lo) < int(hi)):
                    raise ValueError(f"variant {spec!r}: layers={raw!r} must be LO-HI with LO < HI (e.g. 2-24)")
                overrides.append((key, (int(lo), int(hi))))
                continue
            if key == "early":
                n, at, sp = raw.partition("@")
                try:
                    value = (int(n), float(sp))
                except ValueError:
                    value = None
                if not at or value is None or value[0] < 1 or not 0.0 <= value[1] < 1.0:
                    raise ValueError(f"variant {spec!r}: early={raw!r} must be N@S with N >= 1 and S in [0, 1)")
                overrides.append((key, value))
                continue
            if key not in _FIELDS:
                raise ValueError(f"variant {spec!r}: {key!r} is not a CABConfig field (one of {sorted(_FIELDS)})")
            default = CABConfig.__dataclass_fields__[key].default
            if isinstance(default, bool):  # bool("0") is True: a flag is written 0/1 (or false/true)
                flags = {"0": False, "false": False, "1": True, "true": True}
                if raw.lower() not in flags:
                    raise ValueError(f"variant {spec!r}: {key}={raw!r} must be 0 or 1")
                overrides.append((key, flags[raw.lower()]))
                continue
            try:  # (the one field without a default value, decode_sparsity, is a number)
                value = float(raw) if default is None else type(default)(raw) if not isinstance(default, str) else raw
            except ValueError as e:
                kind = "number" if default is None else type(default).__name__
                raise ValueError(f"variant {spec!r}: {key}={raw!r} is not a {kind}") from e
            overrides.append((key, value))
        v = cls(spec.strip(), policy, tuple(overrides))
        v.config(0.9)  # validate the overrides now, not in the middle of a sweep
        return v

    @property
    def phases(self) -> str:
        return dict(self.overrides).get("phases", "both")

    @property
    def layers(self) -> tuple[int, int] | None:
        return dict(self.overrides).get("layers")

    @property
    def early(self) -> tuple[int, float] | None:
        return dict(self.overrides).get("early")

    @property
    def compensate(self) -> str | None:
        return dict(self.overrides).get("compensate")

    @property
    def oracle(self) -> str | None:
        return dict(self.overrides).get("oracle")

    @property
    def tokens(self) -> str | None:
        return dict(self.overrides).get("tokens")

    @property
    def prefill(self) -> str | None:
        return dict(self.overrides).get("prefill")

    @property
    def prefill_chunk(self) -> int | None:
        return dict(self.overrides).get("prefill_chunk")

    @property
    def prefill_rows(self) -> int | None:
        return dict(self.overrides).get("prefill_rows")

    @property
    def prefill_pooled(self) -> bool:
        return dict(self.overrides).get("prefill_pooled", False)

    @property
    def prefill_est(self) -> str | None:
        return dict(self.overrides).get("prefill_est")

    @property
    def prefill_within(self) -> float | None:
        return dict(self.overrides).get("prefill_within")

    @property
    def prefill_cand(self) -> str:
        return dict(self.overrides).get("prefill_cand", "cab")

    @property
    def is_dense(self) -> bool:
        return self.policy == "dense"

    def using(self, sparsity: float, impl: str = "auto"):
        """cab_vllm.hf.using for this cell: the config at ``sparsity`` and the adapter's ablation keys (phases,
        layers, early, compensate, oracle, tokens, prefill, prefill_chunk, prefill_rows, prefill_pooled, prefill_est,
        prefill_within, prefill_cand);
        yields the block counts."""
        from cab_vllm import hf

        return hf.using(self.config(sparsity), impl=impl, phases=self.phases, layers=self.layers, early=self.early,
                        compensate=self.compensate, oracle=self.oracle, tokens=self.tokens, prefill=self.prefill,
                        prefill_chunk=self.prefill_chunk, prefill_rows=self.prefill_rows,
                        prefill_pooled=self.prefill_pooled, prefill_est=self.prefill_est,
                        prefill_within=self.prefill_within, prefill_cand=self.prefill_cand)

    def config(self, sparsity: float) -> CABConfig | None:
        """The CABConfig at ``sparsity``; None (dense attention) for the dense policy or sparsity 0."""
        if self.is_dense or sparsity == 0:
            return None
        kw = {k: v for k, v in self.overrides if k not in ADAPTER_KEYS}
        return CABConfig(policy=self.policy, sparsity=sparsity, **kw)


def cells(variants: Iterable[Variant], sparsities: Iterable[float]) -> list[tuple[Variant, float]]:
    """(variant, sparsity) pairs to run: dense once at sparsity 0, every other variant at each sparsity > 0."""
    out, seen = [], set()
    sparsities = list(sparsities)
    for v in variants:
        for s in ([0.0] if v.is_dense else [s for s in sparsities if s > 0]):
            if (v.spec, s) not in seen:
                seen.add((v.spec, s))
                out.append((v, s))
    return out


def yarn_rope(config, factor: float) -> None:
    """Extend ``config``'s context by ``factor`` with YaRN (as Qwen2.5's model card does past 32k)."""
    if not factor > 1:
        raise ValueError(f"yarn factor must be > 1, got {factor}")
    rp = dict(getattr(config, "rope_parameters", None) or {})
    if rp.get("rope_type", "default") != "default":
        raise ValueError(f"the model already uses rope_type={rp.get('rope_type')!r}")
    orig = config.max_position_embeddings
    rp.update(rope_type="yarn", factor=float(factor), original_max_position_embeddings=orig)
    config.rope_parameters = rp
    config.max_position_embeddings = int(orig * factor)


def yarn_overrides(path, factor: float) -> dict:
    """vLLM ``hf_overrides`` that extend the model at ``path`` by ``factor`` with YaRN, by yarn_rope's rule (the
    transformers path's): its rope parameters and its scaled max_position_embeddings."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    yarn_rope(config, factor)
    return {"rope_parameters": config.rope_parameters, "max_position_embeddings": config.max_position_embeddings}


def load_model(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32, yarn: float | None = None):
    """(model, tokenizer, path) for a prepared model name or HF folder, attention swapped to CAB (dense until
    ``cab_vllm.hf.using(cfg)``)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from cab_vllm import hf
    from cab_models.models import prepare_model

    hf.register()
    path = prepare_model(name)
    config = AutoConfig.from_pretrained(path)
    if yarn:
        yarn_rope(config, yarn)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, attn_implementation=hf.ATTN_NAME, dtype=dtype)
    model = model.to(device).eval()
    if yarn and getattr(model.model.rotary_emb, "rope_type", None) != "yarn":
        raise RuntimeError("YaRN was requested but the model's rotary embedding ignored it")
    return model, AutoTokenizer.from_pretrained(path), path


class EngineModel:
    """The serving path for the experiments: a vLLM engine in this process with the CAB attention backend
    (``--attention-backend CUSTOM``). Each cell's policy, sparsity and budget travel per request in extra_args
    (cab_policy, cab_sparsity, cab_budget), as a served request's ``vllm_xargs`` do; the dense policy or
    sparsity 0 runs the engine's dense path. Other variant overrides (an estimator, a curvature share, phases)
    are engine-wide settings (CAB_* environment) and are refused by name. ``config.max_position_embeddings`` is
    the engine's max_model_len (what check_lengths reads)."""

    PER_REQUEST = ("budget",)

    def __init__(self, path, max_model_len: int, yarn: float | None = None, gpu_memory_utilization: float | None = None,
                 dtype: str = "auto", max_num_batched_tokens: int | None = None, enforce_eager: bool = False,
                 dense_threshold: int | None = None) -> None:
        import os
        import types

        # the engine core in this process: CAB's step figures (achieved density) are read from its STATS
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        if dense_threshold is not None:
            os.environ["CAB_DENSE_THRESHOLD"] = str(int(dense_threshold))
        from vllm import LLM

        kw: dict = dict(attention_backend="CUSTOM", max_model_len=max_model_len, enable_prefix_caching=False,
                        seed=0, dtype=dtype, enforce_eager=enforce_eager)
        if gpu_memory_utilization is not None:
            kw["gpu_memory_utilization"] = gpu_memory_utilization
        if max_num_batched_tokens is not None:
            kw["max_num_batched_tokens"] = max_num_batched_tokens
        if yarn:  # the transformers path's rule (yarn_rope), handed to the engine as config overrides
            kw["hf_overrides"] = yarn_overrides(path, yarn)
        self.llm = LLM(str(path), **kw)
        self.config = types.SimpleNamespace(max_position_embeddings=max_model_len)
        from cab_vllm.backend import compat

        # what the engine's backend applies (CAB_DENSE_THRESHOLD, else 16384 with vLLM's FlashAttention at hand):
        # every row records it, since below it every policy runs dense
        self.dense_threshold = compat.engine_settings().dense_threshold
        self.engine = self.engine_overrides()

    @staticmethod
    def engine_overrides(environ=None) -> dict:
        """CABConfig fields the engine-wide CAB_* variables set away from their defaults (other than the per-request
        sparsity, policy and budget): every request of the engine runs with them."""
        from cab_vllm.backend.plan import ENV_FIELDS, EngineSettings

        cfg, default = EngineSettings.from_env(environ).cfg, CABConfig()
        wide = sorted({f for f, _ in ENV_FIELDS.values()} - {"sparsity", "policy", *EngineModel.PER_REQUEST})
        return {f: getattr(cfg, f) for f in wide if getattr(cfg, f) != getattr(default, f)}

    @classmethod
    def request_args(cls, variant: "Variant", sparsity: float, engine: dict | None = None) -> dict:
        """The extra_args of a request for this cell; ValueError for a variant the engine cannot run as named.
        A variant's other overrides (an estimator, a curvature share, ...) are engine-wide: accepted when they are
        exactly what the engine runs with (``engine``: engine_overrides(), read from CAB_* when None), so a row's
        label always says what ran (``CAB_ESTIMATOR=max_l2`` with ``curvature:estimator=max_l2``)."""
        engine = cls.engine_overrides() if engine is None else engine
        wide = {k: v for k, v in variant.overrides if k not in cls.PER_REQUEST}
        if not variant.is_dense and wide != engine:
            bad = {k: v for k, v in wide.items() if engine.get(k, object()) != v}
            if bad:
                from cab_vllm.backend.plan import ENV_FIELDS

                var = {f: name for name, (f, _) in ENV_FIELDS.items()}
                how = " ".join(f"{var[k]}={v}" if k in var else f"({k}: no engine variable)" for k, v in bad.items())
                raise ValueError(f"variant {variant.spec!r}: {', '.join(f'{k}={v}' for k, v in bad.items())} cannot "
                                 f"be set per request in the vLLM engine (only policy, sparsity and "
                                 f"{', '.join(cls.PER_REQUEST)}); set it engine-wide ({how}) and run that variant "
                                 f"alone")
            missing = [f"{k}={v}" for k, v in engine.items() if k not in wide]
            raise ValueError(f"variant {variant.spec!r}: the engine runs with {', '.join(missing)} (CAB_* "
                             f"variables), which the variant's name does not say: add it to the variant "
                             f"({variant.policy}:{','.join(missing)}) or unset the variable")
        extra: dict = {"cab_sparsity": 0.0 if variant.is_dense else float(sparsity), "cab_policy": variant.policy}
        extra.update({f"cab_{k}": v for k, v in variant.overrides if k in cls.PER_REQUEST})
        return extra

    def generate(self, tok, batch: list[dict], variant: "Variant", sparsity: float, max_new_tokens: int
                 ) -> tuple[list[str], float, float | None]:
        """Greedy answers of a batch, seconds, and the achieved density of the batch's steps (kept / causal key
        blocks from CAB's step figures; None when they are not in this process)."""
        from vllm import SamplingParams

        from cab_vllm.backend.stats import STATS

        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens,
                                extra_args=self.request_args(variant, sparsity, self.engine))
        before = kept_causal(STATS)
        t0 = time.perf_counter()
        outs = self.llm.generate([{"prompt_token_ids": it["input_ids"]} for it in batch], params, use_tqdm=False)
        secs = time.perf_counter() - t0
        kept, causal = (a - b for a, b in zip(kept_causal(STATS), before))
        answers = [tok.decode(o.outputs[0].token_ids, skip_special_tokens=True) for o in outs]
        return answers, secs, (kept / causal if causal else None)


def _engine_name(model) -> str:
    return "vllm" if isinstance(model, EngineModel) else "hf"


def _engine_env(model) -> dict:
    """An engine row's CAB_* environment (the engine-wide settings it ran under, e.g. CAB_TOKEN_SCORER), as
    {"cab_env": {...}}; nothing for the adapter's rows."""
    if not isinstance(model, EngineModel):
        return {}
    return {"cab_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("CAB_")}}


def kept_causal(stats) -> tuple[float, float]:
    """(kept, causal) key blocks a cab_vllm.backend.stats.Stats has counted, every step so far included: the builder
    defers its accounting to a background thread, so the totals are flushed first (read without it, a batch's
    last steps would count in the next batch)."""
    stats.flush()
    totals = stats.totals
    return (sum(v for k, v in totals.items() if k[0] == "kept"), sum(v for k, v in totals.items() if k[0] == "causal"))


def context_limit(model) -> int:
    return int(model.config.max_position_embeddings)


def check_lengths(model, lengths) -> None:
    """Refuse prompt lengths past the model's context (a YaRN factor raises it: load_model(yarn=...))."""
    limit = context_limit(model)
    too_long = [n for n in lengths if n > limit]
    if too_long:
        raise ValueError(f"lengths {too_long} exceed the model's context ({limit} tokens); pass a YaRN factor")


class Jsonl:
    """Append-only JSONL results with resume: rows whose ``key`` fields match an existing row are skipped."""

    def __init__(self, path: str | Path, key: tuple[str, ...]):
        self.path, self.key = Path(path), key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        if self.path.exists():
            for i, line in enumerate(self.path.read_text().splitlines()):
                if line.strip():
                    try:
                        self.rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{self.path}:{i + 1} is not JSON ({e}); move the file away") from e
        self.done = {self._key(r) for r in self.rows}

    def _key(self, row: dict) -> tuple:
        return tuple(row.get(k) for k in self.key)

    def has(self, **fields) -> bool:
        return self._key(fields) in self.done

    def write(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows.append(row)
        self.done.add(self._key(row))


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Clock:
    """Wall time with a device sync on both ends."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        sync(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self.t0


class Deadline:
    """A time budget in seconds (None or <= 0 = unlimited)."""

    def __init__(self, seconds: float | None):
        self.end = time.monotonic() + seconds if seconds and seconds > 0 else math.inf

    def passed(self) -> bool:
        return time.monotonic() > self.end


# ----------------------------------------------------------------------------------------------------------------
# greedy generation over one (variant, sparsity) cell
# ----------------------------------------------------------------------------------------------------------------
def batches(items: list[dict], max_tokens: int) -> list[list[dict]]:
    """Group by exact token count of ``it["input_ids"]`` (no padding), at most ``max_tokens`` prompt tokens a
    batch."""
    groups: dict[int, list[dict]] = {}
    for it in items:
        groups.setdefault(len(it["input_ids"]), []).append(it)
    out = []
    for n, g in sorted(groups.items()):
        per = max(1, max_tokens // n)
        out += [g[i: i + per] for i in range(0, len(g), per)]
    return out


@torch.no_grad()
def generate(model, tok, batch: list[dict], max_new_tokens: int) -> tuple[list[str], float]:
    """Greedy answers (decoded, special tokens dropped) of a batch of equal-length prompts, and the seconds taken."""
    dev = model.device
    ids = torch.tensor([it["input_ids"] for it in batch], device=dev)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with Clock(dev) as clk:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad)
    return tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True), clk.seconds


CALIBRATION_POSITION = 0.37  # where in the six novels the calibration text starts (any fixed place)


def calibrate_keys(model, tok, variants, length: int, corpus: str | None = None) -> bool:
    """Before a sweep whose variants rank keys by projection or fixed dimensions (``tokens=pcaR``, ``dimsR``, or the
    same as ``prefill_est``): store
    each layer's key basis and dimension order on
    ``model`` (cab_vllm.hf.calibrate_key_basis) from a dense pass over ``length`` tokens (the sweep's longest
    prompt: post-RoPE keys at every position it will see) of plain Austen text (one fixed window, no needles, no
    question). Returns whether it ran; the vLLM engine is refused."""
    from cab_vllm import hf

    if not any(spec is not None and hf.parse_tokens(spec)[0] in ("pca", "dims")
               for v in variants for spec in (v.tokens, v.prefill_est)):
        return False
    if isinstance(model, EngineModel):
        raise ValueError("tokens=pca... and tokens=dims... are transformers-adapter ablations; the vLLM engine cannot "
                         "run them")
    from cab_models.text import _haystack_source

    text = _haystack_source("austen", 8 * length, CALIBRATION_POSITION, None, corpus=corpus)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :length]
    hf.calibrate_key_basis(model, ids.to(next(model.parameters()).device))
    return True


def run_cell(model, tok, out: Jsonl, items: list[dict], variant: Variant, sparsity: float, base: dict,
             keys: tuple[str, ...], result: Callable[[dict, str], dict], max_new_tokens: int, batch_tokens: int,
             impl: str, deadline: Deadline, bar) -> tuple[int, bool]:
    """Generate every item of ``items`` (dicts with ``input_ids`` and the ``keys`` fields) not yet in ``out`` with
    ``variant`` at ``sparsity``; one row each: ``base``, the keys, policy, n_tokens, ``result(item, answer)``,
    the achieved density, batch size and seconds per prompt. Returns (rows written, stopped at the deadline)."""
    base = {**base, "variant": variant.spec, "sparsity": sparsity}
    if isinstance(model, EngineModel):
        base["dense_threshold"] = model.dense_threshold
    pending = [it for it in items if not out.has(**base, **{k: it[k] for k in keys})]
    bar.update(len(items) - len(pending))
    written = 0
    for batch in batches(pending, batch_tokens):
        if deadline.passed():
            return written, True
        if isinstance(model, EngineModel):
            answers, secs, density = model.generate(tok, batch, variant, sparsity, max_new_tokens)
        else:
            with variant.using(sparsity, impl) as stats:
                answers, secs = generate(model, tok, batch, max_new_tokens)
            density = stats["kept"] / stats["causal"] if stats["causal"] else 1.0
        for it, ans in zip(batch, answers):
            out.write({**base, **{k: it[k] for k in keys}, "policy": variant.policy,
                       "n_tokens": len(it["input_ids"]), **result(it, ans),
                       "density": None if density is None else round(density, 5), "engine": _engine_name(model),
                       **_engine_env(model), "batch": len(batch), "seconds": round(secs / len(batch), 4)})
            written += 1
        bar.update(len(batch))
    return written, False
