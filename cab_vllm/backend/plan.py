"""Per-step planning for the vLLM backend, on the host (the metadata builder's side; no vLLM import:
unit-testable, and usable on a GPU machine without vLLM).

Inputs are vLLM's per-batch tensors (CommonAttentionMetadata): query_start_loc [S+1], seq_lens [S],
block_table [S, max_pages], slot_mapping [T] (slot = page * page_size + offset, -1 = padding).

  EngineSettings     engine-wide defaults from CAB_* environment variables, validated through CABConfig.
  request_config     one request's CABConfig from its SamplingParams.extra_args ({"cab_sparsity", "cab_policy",
                     "cab_budget"}).
  plan_batch         host-side split of a batch into decode rows (1 query token) and prefill rows (>1), and the
                     dense/sparse decision per row (stats.dense_reason: prompt rows of a prompt, decode
                     rows of a context, shorter than dense_threshold -> dense).
  route_rows         per decode row, where its key blocks come from (MODE_*), its prompt-table slot and budget;
                     per prefill row, whether it stores the prompt's selection (PromptSlots).

The device side, run per layer by the attention impl, is backend.attention.
"""

from __future__ import annotations

import functools
import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from cab_vllm.backend.stats import dense_reason
from cab_vllm.config import BUDGETS, POLICIES, CABConfig, decode_token_count

# Per-process counters (requests/rows per step, not per layer): proof the backend ran and how often it went dense.
METRICS: Counter = Counter()


ENV_FIELDS = {  # environment variable -> (CABConfig field, parser)
    "CAB_SPARSITY": ("sparsity", float),
    "CAB_POLICY": ("policy", str),
    "CAB_BLOCK_SIZE": ("block_size", int),
    "CAB_ESTIMATOR": ("estimator", str),
    "CAB_SINK_BLOCKS": ("sink_blocks", int),
    "CAB_LOCAL_BLOCKS": ("local_blocks", int),
    "CAB_EXACT_ROWS": ("exact_rows", int),
    "CAB_CURVATURE_SHARE": ("curvature_share", float),
    "CAB_DECODE_RULE": ("decode_rule", str),
    "CAB_BUDGET": ("budget", str),
    "CAB_TOP_P": ("top_p", float),
    "CAB_BUDGET_FLOOR": ("budget_floor", float),
    "CAB_BUDGET_CAP": ("budget_cap", float),
    "CAB_BUDGET_WINDOW": ("budget_window", int),
    "CAB_ANSWER_BLOCKS": ("answer_blocks", int),
    "CAB_ANSWER_DENSE": ("answer_dense", None),  # 0 or 1 (_flag)
    "CAB_VERTICAL_BLOCKS": ("vertical_blocks", None),  # 0 or 1 (_flag)
    "CAB_DENSE_LAYERS": ("dense_layers", int),
    "CAB_DENSE_PREFILL": ("dense_prefill", None),  # 0 or 1 (_flag)
    "CAB_DECODE_SPARSITY": ("decode_sparsity", float),
}
IMPLS = ("auto", "torch", "triton")
TOKEN_SCORERS = ("exact", "int4", "fp8")
MAX_RERANK = 64  # (ops.token_decode.MAX_RERANK; plan.py imports no kernel module)
# Rows per piece of a chunk that runs as decode rows (BatchPlan.as_decode): each piece's decode launches hold its
# rows' scores and selections ([rows, Hkv, key blocks] each; 64 MiB apiece at 512 rows, 8 KV heads and 128k)
AS_DECODE_ROWS = 512
REQUEST_KEYS = ("cab_sparsity", "cab_policy", "cab_budget")


@dataclass(frozen=True)
class KernelOptions:
    """Kernel choices of the engine that change speed, not results (each is tested against the same reference).
    None keeps the kernel module's default. fused_select (on by default): the prefill's estimate and selection
    without the [M, M] estimate (ops.fused_select; cab without a curvature share and magnitude, fixed budget); one_launch_rows: decode
    batches of at most this many rows run selection and attention in one launch (default: ops.decode.one_launch_default,
    one row, in engines of at most ONE_LAUNCH_MAX_MPAD key blocks; a value given here holds at any max_model_len);
    graph_branches: in a decode step's CUDA graph, vLLM's FlashAttention and CAB's decode launch each sit in an IF
    node that runs only when the step has rows for it (cab_vllm.backend.graphs); dense_decode: dense decode rows
    (short contexts, sparsity 0) run in CAB's decode kernel over every key block instead of vLLM's FlashAttention,
    so a decode step (and its CUDA graph) holds one attention launch per layer, not two (FlashAttention's launch
    costs its time even when it has no rows); dense prefill rows still run in FlashAttention. dense_decode=None (the
    default) means on unless graph_branches is on (the two exclude each other; H200, 8B geometry: TPOT at 128k
    0.590x FLASH_ATTN with it against 0.621x without, short requests within run-to-run noise). fa_prefill: the
    sparse prefill rows run in vLLM's FlashAttention, one sequence per (query block, KV head) over its kept pages
    (ops.fa_prefill), instead of CAB's Triton kernel; None (the default) means where it was measured faster:
    FlashAttention 3 (Hopper), 16-bit caches, pages that tile a key block (backend.fa_prefill_launcher). fa_streams:
    the CUDA streams those launches (one per KV head) take turns on (None: ops.fa_prefill.FA_STREAMS)."""

    fused_select: bool = True
    one_launch_rows: int | None = None
    graph_branches: bool = False
    dense_decode: bool | None = None
    fa_prefill: bool | None = None
    fa_streams: int | None = None

    def __post_init__(self) -> None:
        if self.dense_decode is None:  # the default: on, unless the decode graph branches around FlashAttention
            object.__setattr__(self, "dense_decode", not self.graph_branches)
        if self.fa_prefill is not None and not isinstance(self.fa_prefill, bool):
            raise ValueError(f"fa_prefill={self.fa_prefill!r} is invalid: expected True, False or None")
        for name in ("fused_select", "graph_branches", "dense_decode"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: expected True or False")
        if self.graph_branches and self.dense_decode:
            raise ValueError("graph_branches and dense_decode (CAB_GRAPH_BRANCHES=1, CAB_DENSE_DECODE=1) exclude "
                             "each other: with dense_decode a decode graph holds no FlashAttention launch to branch "
                             "around")
        for name, least in (("one_launch_rows", 0), ("fa_streams", 1)):  # the whole-number fields (None: default)
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < least):
                raise ValueError(f"{name}={v!r} is invalid: expected an integer >= {least}")

    # the whole-number fields and their variables
    ENV_COUNTS = {"one_launch_rows": "CAB_DECODE_ONE_LAUNCH_ROWS", "fa_streams": "CAB_FA_STREAMS"}

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "KernelOptions":
        """CAB_FUSED_SELECT, CAB_GRAPH_BRANCHES, CAB_DENSE_DECODE and CAB_FA_PREFILL (0 or 1),
        CAB_DECODE_ONE_LAUNCH_ROWS, CAB_FA_STREAMS; unset ones keep the defaults; a bad value raises ValueError
        naming the variable."""
        def flag(var: str) -> bool | None:
            raw = env.get(var, "").strip()
            if raw not in ("", "0", "1"):
                raise ValueError(f"{var}={raw!r} is invalid: expected 0 or 1")
            return None if raw == "" else raw == "1"

        counts = {f: _count_from_env(env, var, 0) for f, var in cls.ENV_COUNTS.items() if env.get(var, "").strip()}
        try:
            flags = {f: v for f, v in (("fused_select", flag("CAB_FUSED_SELECT")),
                                       ("graph_branches", flag("CAB_GRAPH_BRANCHES")),
                                       ("dense_decode", flag("CAB_DENSE_DECODE")),
                                       ("fa_prefill", flag("CAB_FA_PREFILL"))) if v is not None}
            return cls(**flags, **counts)
        except ValueError as e:
            field = next((f for f in counts if str(e).startswith(f"{f}=")), None)
            if field is None:
                raise
            raise ValueError(f"{cls.ENV_COUNTS[field]}: {e}") from None


@dataclass(frozen=True)
class EngineSettings:
    """Engine-wide defaults. cfg: the default CABConfig; dense_threshold: shorter prompts (decode rows: contexts) run
    dense; impl: 'auto' (Triton kernels on CUDA, PyTorch on CPU), 'torch' or 'triton' (CPU needs TRITON_INTERPRET=1);
    summary_slots: requests whose key-block summaries are kept across prompt chunks at once (0: none kept, every
    chunk pools its whole context). token_scorer (decode_rule="tokens" only): what ranks a token decode's keys,
    "exact" (every key's exact score), "int4" (a 4-bit copy of the keys kept in each cache page's tail, ops.key_codes,
    whose token_rerank x budget best keys per head are rescored exactly: reads ~3/8 of the key bytes, not all;
    the cache holds ~16% fewer tokens in the same memory at 16-bit) or "fp8" (a centered float8 copy in the pages'
    tails, whose budget best keys per head are attended by exact score, token_rerank unused: reads 57% of the key
    bytes at D=128; the cache holds ~22% fewer tokens). token_passes: the token decode's counting passes
    (ops.token_decode.kept_keys): 1 keeps every key above its keep-th key's 1/4-wide bucket and samples that
    bucket's keys by position hash to the budget; 2 pins each head's keep-th key to 1/512 of a base-2 logit (two
    launches more per layer); 0 counts nothing: each head's threshold is a quantile of a sample of its exact logits
    (one key in up to 16), then one launch scores every key and attends to those above it (about the budget, not
    exactly: ops.token_decode.sampled_rule; exact scores only)."""

    cfg: CABConfig = CABConfig()
    dense_threshold: int = 1024
    impl: str = "auto"
    summary_slots: int = 4
    kernels: KernelOptions = KernelOptions()
    token_scorer: str = "exact"
    token_rerank: int = 2
    token_passes: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.dense_threshold, int) or self.dense_threshold < 0:
            raise ValueError(f"dense_threshold={self.dense_threshold!r} is invalid: expected an integer >= 0")
        if not isinstance(self.summary_slots, int) or self.summary_slots < 0:
            raise ValueError(f"summary_slots={self.summary_slots!r} is invalid: expected an integer >= 0")
        if self.impl not in IMPLS:
            raise ValueError(f"impl={self.impl!r} is invalid: expected one of {IMPLS}")
        if not isinstance(self.kernels, KernelOptions):
            raise ValueError(f"kernels={self.kernels!r} is invalid: expected a KernelOptions")
        if self.token_scorer not in TOKEN_SCORERS:
            raise ValueError(f"token_scorer={self.token_scorer!r} is invalid: expected one of {TOKEN_SCORERS}")
        if self.token_scorer != "exact" and self.cfg.decode_rule != "tokens":
            raise ValueError(f"token_scorer={self.token_scorer!r} ranks the keys of the tokens decode rule: it needs "
                             f"decode_rule='tokens', got {self.cfg.decode_rule!r}")
        r = self.token_rerank
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= MAX_RERANK:
            raise ValueError(f"token_rerank={r!r} is invalid: expected an integer 1..{MAX_RERANK}")
        p = self.token_passes
        if isinstance(p, bool) or p not in (0, 1, 2):
            raise ValueError(f"token_passes={p!r} is invalid: expected 0, 1 or 2")
        if p == 0 and self.token_scorer != "exact":
            raise ValueError(f"token_passes=0 (a sampled threshold over exact scores) takes no key copy: "
                             f"token_scorer={self.token_scorer!r} ranks by counting passes (1 or 2)")

    @property
    def key_codes(self) -> bool:
        """Whether the engine keeps a key copy in its cache pages (token_scorer "int4" or "fp8", the copy's
        format)."""
        return self.token_scorer != "exact"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "EngineSettings":
        """Read CAB_* variables (CAB_SPARSITY, CAB_POLICY, CAB_BLOCK_SIZE, CAB_ESTIMATOR, CAB_SINK_BLOCKS,
        CAB_LOCAL_BLOCKS, CAB_EXACT_ROWS, CAB_CURVATURE_SHARE, CAB_DECODE_RULE, CAB_BUDGET, CAB_TOP_P,
        CAB_BUDGET_FLOOR, CAB_BUDGET_CAP, CAB_BUDGET_WINDOW, CAB_ANSWER_BLOCKS, CAB_ANSWER_DENSE, CAB_DENSE_LAYERS,
        CAB_DENSE_PREFILL, CAB_DECODE_SPARSITY, CAB_DENSE_THRESHOLD, CAB_IMPL, CAB_SUMMARY_SLOTS, CAB_TOKEN_SCORER,
        CAB_TOKEN_RERANK, CAB_TOKEN_PASSES, and the kernel choices of KernelOptions.from_env); unset ones keep the
        defaults. A bad value raises ValueError naming the variable."""
        env = os.environ if environ is None else environ
        changes: dict[str, object] = {}
        for var, (field, parse) in ENV_FIELDS.items():
            raw = env.get(var)
            if raw is None or raw == "":
                continue
            if parse is None:  # a flag
                if raw.strip() not in ("0", "1"):
                    raise ValueError(f"{var}={raw!r} is invalid: expected 0 or 1")
                changes[field] = raw.strip() == "1"
                continue
            try:
                changes[field] = parse(raw.strip())
            except ValueError:
                raise ValueError(f"{var}={raw!r} is not a valid {parse.__name__}") from None
        try:
            cfg = CABConfig().replace(**changes)
        except ValueError as e:
            names = {f: v for v, (f, _) in ENV_FIELDS.items()}
            field = next((f for f in changes if f"CABConfig.{f}=" in str(e)), None)
            raise ValueError(f"{names.get(field, 'CAB_*')}: {e}") from None
        thr = _count_from_env(env, "CAB_DENSE_THRESHOLD", cls.dense_threshold)
        impl = env.get("CAB_IMPL", "").strip() or "auto"
        if impl not in IMPLS:
            raise ValueError(f"CAB_IMPL={impl!r} is invalid: expected one of {IMPLS}")
        slots = _count_from_env(env, "CAB_SUMMARY_SLOTS", cls.summary_slots)
        scorer = env.get("CAB_TOKEN_SCORER", "").strip() or cls.token_scorer
        rerank = _count_from_env(env, "CAB_TOKEN_RERANK", cls.token_rerank)
        passes = _count_from_env(env, "CAB_TOKEN_PASSES", cls.token_passes)
        try:
            return cls(cfg, thr, impl, slots, KernelOptions.from_env(env), scorer, rerank, passes)
        except ValueError as e:
            var = {"token_scorer": "CAB_TOKEN_SCORER", "token_rerank": "CAB_TOKEN_RERANK",
                   "token_passes": "CAB_TOKEN_PASSES"}
            field = next((f for f in var if str(e).startswith(f"{f}=")), None)
            if field is None:
                raise
            raise ValueError(f"{var[field]}: {e}") from None


def _count_from_env(env: Mapping[str, str], var: str, default: int) -> int:
    """A whole number >= 0 from the environment variable var (unset or empty: default)."""
    raw = env.get(var, "").strip()
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise ValueError(f"{var}={raw!r} is not a valid int") from None
    if value < 0:
        raise ValueError(f"{var}={value} is invalid: expected an integer >= 0")
    return value


def _sparsity_value(sp: object) -> float:
    if isinstance(sp, str):  # OpenAI vllm_xargs may carry numbers as strings
        try:
            sp = float(sp)
        except ValueError:
            raise ValueError(f"cab_sparsity={sp!r} is invalid: expected a number in [0, 1)") from None
    if isinstance(sp, bool) or not isinstance(sp, (int, float)) or not math.isfinite(sp) or not 0.0 <= sp < 1.0:
        raise ValueError(f"cab_sparsity={sp!r} is invalid: expected a number in [0, 1)")
    return float(sp)


def validate_request_args(extra_args: Mapping[str, object] | None) -> None:
    """Raise ValueError with a clear message when a request's cab_* extra_args are invalid."""
    if not extra_args:
        return
    if extra_args.get("cab_sparsity") is not None:
        _sparsity_value(extra_args["cab_sparsity"])
    for key, allowed in (("cab_policy", POLICIES), ("cab_budget", BUDGETS)):
        value = extra_args.get(key)
        if value is not None and (not isinstance(value, str) or value not in allowed):
            raise ValueError(f"{key}={value!r} is invalid: expected one of {', '.join(allowed)}")


@functools.lru_cache(maxsize=256)
def _replaced(base: CABConfig, sparsity: float | None, policy: str | None, budget: str | None = None) -> CABConfig:
    changes: dict[str, object] = {}
    if sparsity is not None:
        changes["sparsity"] = float(sparsity)
    if policy is not None:
        changes["policy"] = policy
    if budget is not None:
        changes["budget"] = budget
    return base.replace(**changes) if changes else base


@functools.lru_cache(maxsize=256)
def _as_dense(cfg: CABConfig) -> CABConfig:
    """cfg with policy 'dense' (cached: a step's dense rows would otherwise build and validate one per row)."""
    return cfg.replace(policy="dense")


def request_config(base: CABConfig, extra_args: Mapping[str, object] | None) -> CABConfig:
    """The CABConfig of one request: ``base`` with its cab_sparsity / cab_policy / cab_budget (validated)
    applied."""
    validate_request_args(extra_args)
    if not extra_args:
        return base
    sp = extra_args.get("cab_sparsity")
    return _replaced(base, None if sp is None else _sparsity_value(sp), extra_args.get("cab_policy"),
                     extra_args.get("cab_budget"))


@dataclass
class BatchPlan:
    """Host-side plan of one batch (shared by every layer of the step).

    decode_rows / prefill_rows: request rows (batch order) with 1 / more than 1 new token.
    cfgs: the CABConfig of every row (per-request knobs applied; policy 'dense' for rows below the threshold).
    dense: per row, whether it runs dense. qsl, seq_lens: host copies (lists).
    req_ids: per row, the engine's request id (None: unknown); live: the ids of every request the engine still
    holds (None: unknown). Both are needed by decode_rule="prompt" (PromptSelections); prompt_lens (per row,
    None: unknown) lets the metrics count what that rule keeps, and keeps the decode rows of a prompt that ran
    dense dense.
    """

    decode_rows: list[int]
    prefill_rows: list[int]
    cfgs: list[CABConfig]
    dense: list[bool]
    qsl: list[int]
    seq_lens: list[int]
    req_ids: list | None = None
    live: frozenset | None = None
    prompt_lens: list | None = None
    # filled by route_rows: per decode row (plan.decode_rows order) its MODE_*, prompt-table slot, prompt block
    # count and blocks to keep; per prefill row (plan.prefill_rows order) the slot whose prompt selection
    # this chunk stores, with the query block to store (None: nothing to store)
    modes: list | None = None
    slots: list | None = None
    pblocks: list | None = None
    keep: list | None = None
    store: list | None = None
    # filled by route_rows, per prefill row: (KeySummaries slot, first key block to pool) or None (gather and
    # pool the whole context), and whether the chunk holds the prompt's last token (True when unknown)
    summary: list | None = None
    final: list | None = None
    # filled by route_rows, per prefill row: (prompt-table slot, prompt block count) for a chunk past its prompt's end
    # under the prompt rule (a preempted request prefilled again over the tokens it had generated): its rows keep what
    # they kept as decode rows, the stored prompt selection and every later block (attention.replay_selection); None
    replay: list | None = None
    # filled by route_rows, per decode row: keys each query head keeps under decode_rule="tokens" (0: not a token
    # row; such a row is MODE_SKIP for the block kernel and runs in ops.token_decode)
    tkeep: list | None = None
    # per prefill row (plan.prefill_rows order): for a sparse chunk past its prompt's end under a per-step decode rule
    # (a preempted request prefilled again over the tokens it had generated), the plans of its rows as the decode
    # rows they were, in pieces of up to AS_DECODE_ROWS rows (each row one query token at its own context, routed by
    # route_rows; attention.attend runs them through the decode path); None
    as_decode: list | None = None

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens)

    def prompt_len(self, r: int) -> int | None:
        """Row r's prompt length (None: unknown)."""
        return self.prompt_lens[r] if self.prompt_lens is not None else None


def plan_batch(query_start_loc_cpu: torch.Tensor | Sequence[int], seq_lens_cpu: torch.Tensor | Sequence[int],
               cfgs: Sequence[CABConfig], dense_threshold: int, count: bool = True, req_ids: Sequence | None = None,
               live: frozenset | None = None, prompt_lens: Sequence | None = None) -> BatchPlan:
    """Split a batch into decode and prefill rows and decide dense vs sparse per row.

    A row goes dense when its prompt (decode: its context) is below ``dense_threshold`` or its sparsity is 0 (the
    result is the same; dense skips the selection), and a prompt-rule decode row when its prompt (prompt_lens, per
    row; None: unknown) was below the threshold (stats.dense_reason). ``count`` adds the decisions to METRICS.
    """
    qsl = _int_list(query_start_loc_cpu)
    sl = _int_list(seq_lens_cpu)
    n = len(sl)
    if len(qsl) != n + 1 or len(cfgs) != n:
        raise ValueError(f"batch of {n} rows has {len(qsl)} query offsets and {len(cfgs)} configs")
    if req_ids is not None and len(req_ids) != n:
        raise ValueError(f"batch of {n} rows has {len(req_ids)} request ids")
    if prompt_lens is not None and len(prompt_lens) != n:
        raise ValueError(f"batch of {n} rows has {len(prompt_lens)} prompt lengths")
    dec, pre, out_cfgs, dense, as_decode = [], [], [], [], []
    for r in range(n):
        q_len = qsl[r + 1] - qsl[r]
        if q_len <= 0:  # padding row
            out_cfgs.append(cfgs[r])
            dense.append(True)
            continue
        pl = prompt_lens[r] if prompt_lens is not None else None
        subs = None
        if q_len > 1 and pl is not None and sl[r] - q_len >= pl and cfgs[r].decode_scoring not in ("prompt", "all"):
            subs = decode_pieces(sl[r], q_len, cfgs[r], dense_threshold, pl)
            d = all(all(s.dense) for s in subs)  # each row dense or not by its own context, as a decode row
            if d:
                subs = None
        else:
            d = dense_reason(cfgs[r], sl[r], dense_threshold, pl, q_len == 1) is not None
        out_cfgs.append(_as_dense(cfgs[r]) if d and cfgs[r].policy != "dense" else cfgs[r])
        dense.append(d)
        (dec if q_len == 1 else pre).append(r)
        if q_len > 1:
            as_decode.append(subs)
        if count:
            METRICS[("decode" if q_len == 1 else "prefill") + ("_dense" if d else "_sparse")] += 1
            if q_len == 1 and not d and cfgs[r].decode_scoring == "prompt":
                METRICS["decode_prompt_rule"] += 1
    return BatchPlan(dec, pre, out_cfgs, dense, qsl, sl, None if req_ids is None else list(req_ids), live,
                     None if prompt_lens is None else list(prompt_lens), as_decode=as_decode)


def decode_pieces(seq_len: int, q_len: int, cfg: CABConfig, dense_threshold: int, prompt_len: int
                  ) -> list[BatchPlan]:
    """The rows of a chunk of q_len tokens ending at seq_len, past its prompt (prompt_len tokens), as decode rows:
    plans of up to AS_DECODE_ROWS rows, row i one query token at context seq_len - q_len + i + 1 (BatchPlan.as_decode).
    Each row is planned as a decode row of the same request: dense or sparse by its own context, then (route_rows)
    its blocks by the same per-step rule, so a preempted request's recomputed tokens select what they did when they
    were decoded, whatever other requests shared either step."""
    start = seq_len - q_len
    pieces = []
    for a in range(0, q_len, AS_DECODE_ROWS):
        k = min(AS_DECODE_ROWS, q_len - a)
        pieces.append(plan_batch(range(k + 1), range(start + a + 1, start + a + k + 1), [cfg] * k, dense_threshold,
                                 count=False, prompt_lens=[prompt_len] * k))
    return pieces


def _int_list(xs) -> list[int]:
    """A host tensor or a sequence as a list of Python ints (a tensor in one tolist(): iterating it makes a
    0-d tensor per element, ~20 us for two rows inside the engine)."""
    if hasattr(xs, "tolist"):
        xs = xs.tolist()
    return [int(x) for x in xs]


class PromptSlots:
    """Builder side of decode_rule="prompt": a slot of the per-layer PromptTables for every live request, and
    which requests have a stored prompt selection. Host bookkeeping only (once per step)."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.free = list(range(num_slots - 1, -1, -1))
        self.of: dict = {}  # request id -> slot
        self.stored: dict = {}  # request id -> prompt blocks of its stored selection
        self.exhausted = 0  # requests that found no free slot (they decode with the bounds rule)

    def sync(self, live) -> None:
        """Free the slots of requests the engine no longer holds."""
        if live is None or not self.of:
            return
        for rid in self.of.keys() - live:
            self.free.append(self.of.pop(rid))
            self.stored.pop(rid, None)

    def slot(self, rid) -> int | None:
        if rid is None:
            return None
        got = self.of.get(rid)
        if got is None and self.free:
            got = self.of[rid] = self.free.pop()
        if got is None:
            self.exhausted += 1
        return got


class SummarySlots:
    """Builder side of the key summaries kept across a prompt's chunks (attention.KeySummaries): a slot per
    request being prefilled sparsely with a one-pass estimator, and how many of its key blocks the slot holds.
    Host bookkeeping only (once per step). A request keeps its slot until its prompt's last chunk has run, it
    leaves the engine, or a request of a later step needs the slot (the oldest one not in that step is
    evicted; it pools its whole context again if it comes back). No free slot: the chunk gathers and pools the
    whole context, as without summaries (counted in ``misses``)."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.free = list(range(num_slots - 1, -1, -1))
        self.of: dict = {}  # request id -> [slot, full key blocks the slot holds]
        self.ended: list = []  # requests whose prompt ended in the last step: released at the next one
        self.misses = 0

    def begin_step(self, live) -> None:
        for rid in self.ended:
            self._release(rid)
        self.ended = []
        if live is not None:
            for rid in [r for r in self.of if r not in live]:
                self._release(rid)

    def _release(self, rid) -> None:
        got = self.of.pop(rid, None)
        if got is not None:
            self.free.append(got[0])

    def take(self, rid, start_block: int, step: frozenset) -> tuple[int, int] | None:
        """(slot, first block to pool) for a chunk of request rid whose new tokens start in key block start_block;
        step: the request ids of this step's rows (their slots are not evicted)."""
        got = self.of.get(rid)
        if got is not None:
            return got[0], min(got[1], start_block)
        if not self.free:
            old = next((r for r in self.of if r not in step), None)
            if old is None:
                self.misses += 1
                return None
            self._release(old)
        self.of[rid] = [self.free.pop(), 0]
        return self.of[rid][0], 0

    def done(self, rid, full_blocks: int, ended: bool) -> None:
        self.of[rid][1] = full_blocks
        if ended:
            self.ended.append(rid)


def route_rows(plan: BatchPlan, slots: PromptSlots | None, fa_dense: bool,
               summaries: SummarySlots | None = None) -> None:
    """Decide, once per step on the host, where every row's attention comes from (fills plan.modes, slots,
    pblocks, keep, store, tkeep). Dense decode rows: MODE_SKIP when vLLM's FlashAttention runs them (fa_dense),
    else MODE_ALL. Sparse decode rows: under decode_rule="tokens" MODE_SKIP with their keys per head in tkeep
    (ops.token_decode runs them; keep holds the blocks that budget stands for, what the metrics count); MODE_PROMPT
    when the request's prompt selection is stored, else the step's own selection: MODE_BOUNDS (cab/magnitude/h2o/curvature), MODE_RECENT (streaming), MODE_RANDOM.
    A sparse prefill row whose chunk holds the prompt's last token stores that query block's selection; one whose
    chunk starts past the prompt's end, with the selection stored, replays it (plan.replay); under a per-step rule
    its rows are routed as the decode rows they were (plan.as_decode). A sparse prefill row of an estimating policy
    with a one-pass estimator gets a key-summary slot (summaries)."""
    ESTIMATED_POLICIES, SUMMARY_ESTIMATORS, MODE_ALL, MODE_BOUNDS, MODE_PROMPT, MODE_RANDOM, MODE_RECENT, MODE_SKIP = \
        _route_names()
    if slots is not None:
        slots.sync(plan.live)
    modes, sl, pbs, keep, tkeep = [], [], [], [], []
    for r in plan.decode_rows:
        cfg, n = plan.cfgs[r], plan.seq_lens[r]
        rid = plan.req_ids[r] if plan.req_ids is not None else None
        slot, pb, k, tk = 0, 0, 0, 0
        if plan.dense[r]:
            mode = MODE_SKIP if fa_dense else MODE_ALL
        elif cfg.decode_scoring == "prompt" and slots is not None and rid in slots.stored:
            mode, slot, pb = MODE_PROMPT, slots.of[rid], slots.stored[rid]
        elif cfg.decode_scoring == "tokens":  # ops.token_decode runs the row; the block kernel skips it
            mode, k = MODE_SKIP, keep_count(cfg.decode_config, n)
            tk = decode_token_count(k, n, cfg.block_size)
        else:
            mode = {"recent": MODE_RECENT, "random": MODE_RANDOM}.get(cfg.decode_scoring, MODE_BOUNDS)
            k = keep_count(cfg, n)
        modes.append(mode)
        sl.append(slot)
        pbs.append(pb)
        keep.append(k)
        tkeep.append(tk)
    if summaries is not None:
        summaries.begin_step(plan.live)
        step = frozenset(plan.req_ids or ())
    store, kept, final, replay = [], [], [], []
    for i, r in enumerate(plan.prefill_rows):
        cfg, n = plan.cfgs[r], plan.seq_lens[r]
        rid = plan.req_ids[r] if plan.req_ids is not None else None
        pl = plan.prompt_len(r)
        q_len = plan.qsl[r + 1] - plan.qsl[r]
        end = pl if pl is not None else n  # unknown prompt length: this chunk's end
        holds_end = n - q_len <= end - 1 < n
        final.append(holds_end)
        beyond = pl is not None and n - q_len >= pl and not plan.dense[r] and cfg.decode_scoring == "prompt"
        past = beyond and slots is not None and rid in slots.stored
        replay.append((slots.of[rid], slots.stored[rid]) if past else None)
        subs = plan.as_decode[i] if plan.as_decode else None
        if subs is None and beyond and not past:
            # the prompt rule without a stored selection (no free slot): its decode rows chose by key bounds, every
            # one sparse (a sparse prompt's rows are at least the threshold long)
            subs = decode_pieces(n, q_len, cfg, 0, pl)
            if plan.as_decode is None:
                plan.as_decode = [None] * len(plan.prefill_rows)
            plan.as_decode[i] = subs
        for sub in subs or ():  # its rows as the decode rows they were: their own rule, no prompt table
            route_rows(sub, None, fa_dense=False)
        got = None
        if (summaries is not None and rid is not None and not plan.dense[r] and cfg.policy in ESTIMATED_POLICIES
                and cfg.estimator in SUMMARY_ESTIMATORS and not past and not subs):
            got = summaries.take(rid, (n - q_len) // cfg.block_size, step)
            if got is not None:
                summaries.done(rid, n // cfg.block_size, ended=holds_end or n >= end)
        kept.append(got)
        entry = None
        if slots is not None and rid is not None:
            if holds_end and not plan.dense[r] and cfg.decode_scoring == "prompt":
                slot = slots.slot(rid)
                if slot is not None:
                    entry = (slot, (end - 1) // cfg.block_size)
                    slots.stored[rid] = entry[1] + 1
            elif holds_end:
                slots.stored.pop(rid, None)  # the prompt ran dense (or uses a per-step rule): nothing stored
        store.append(entry)
    plan.modes, plan.slots, plan.pblocks, plan.keep, plan.store, plan.tkeep = modes, sl, pbs, keep, store, tkeep
    plan.summary, plan.final, plan.replay = kept, final, replay


@functools.cache
def _route_names() -> tuple:
    """route_rows' names from the config and the decode kernel's module, imported once (not per step)."""
    from cab_vllm.config import ESTIMATED_POLICIES, SUMMARY_ESTIMATORS
    from cab_vllm.ops.decode import MODE_ALL, MODE_BOUNDS, MODE_PROMPT, MODE_RANDOM, MODE_RECENT, MODE_SKIP

    return (ESTIMATED_POLICIES, SUMMARY_ESTIMATORS, MODE_ALL, MODE_BOUNDS, MODE_PROMPT, MODE_RANDOM, MODE_RECENT,
            MODE_SKIP)


def keep_count(cfg: CABConfig, seq_len: int) -> int:
    """Key blocks a decode query at position seq_len - 1 keeps (CABConfig.keep_counts of its query block, an answer
    row: at least cfg.answer_blocks)."""
    return _keep_last(cfg, (seq_len - 1) // cfg.block_size + 1)


@functools.lru_cache(maxsize=4096)
def _keep_last(cfg: CABConfig, m: int) -> int:
    return int(cfg.keep_counts(m, answer=True)[-1])
