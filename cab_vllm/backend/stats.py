"""CAB's own serving figures, recorded where the attention runs (vLLM's worker process) and exported through
prometheus_client.

  STATS.defer_plan(plan, cfgs, block_size)    once per step, from the metadata builder: record_plan off the step's
                  path (a list append; a background thread of the process accounts the step within
                  FLUSH_SECONDS, STATS.flush() at once). The step's accounting took 80-140 us of host time on a CPU
                  inside vLLM's engine, ahead of the forward's first launch: time a short request's first token
                  waited for.
  STATS.record_plan(plan, cfgs, block_size)   the same, at once: key blocks kept vs
                  causal (the achieved sparsity, from CABConfig.keep_counts on the host: no device sync; an
                  adaptive budget keeps the same total per prefill selection, exact for row-local policies; a
                  chunk of curvature/h2o, or a prompt-rule decode step, can differ by a few blocks), rows and
                  query tokens per requested sparsity / policy / mode, and the rows that ran dense and why.
  STATS.timed(phase, device)                   around block selection in the forward (the predictor): host
                  wall time on the CPU; on CUDA a pair of CUDA events, read lazily at the next step (never a
                  sync), so it is GPU time.

Metrics (counters, so a scrape of several processes sums correctly; PromQL ratios give the figures):

  cab_kept_key_blocks_total{phase,sparsity}     key blocks attended (per query block, per KV head group)
  cab_causal_key_blocks_total{phase,sparsity}   key blocks a dense causal pass would attend
      achieved sparsity = 1 - kept / causal (for one requested sparsity, or summed over all)
  cab_rows_total{phase,sparsity,policy,mode}    request rows per step (a decode request counts once a step, a
                                                prefill once per chunk); mode = sparse | dense
  cab_query_tokens_total{phase,sparsity,policy,mode}   new query tokens those rows processed
  cab_dense_rows_total{phase,reason}            rows run dense: below_threshold (prompt rows of a prompt, decode
                                                rows of a context, shorter than CAB_DENSE_THRESHOLD),
                                                sparsity_zero, policy_dense, prompt_dense (a prompt-rule decode
                                                step of a request whose prompt was below the threshold)
  cab_predictor_seconds_total{phase}            block-selection time summed over layers: prefill = estimate +
                                                select per chunk; decode = the one decode launch (selection
                                                fused with attention), eager steps only (CUDA-graph replays
                                                run no host code and are not timed)
  cab_predictor_step_seconds                    histogram of the selection time of one step (all layers)

``sparsity`` labels are the request's sparsity rounded to two decimals ("0.70"). Across processes (vLLM's
API server, engine core and workers) the figures meet in prometheus_client's multiprocess mode:
PROMETHEUS_MULTIPROC_DIR must be set before any of those processes imports prometheus_client (cab-serve does
it). Without prometheus_client, or with CAB_METRICS=0, only the in-process ``totals`` Counter is kept.
Imports neither vLLM nor torch at module level.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import threading
import time
from collections import Counter
from typing import Iterator, Sequence

PHASES = ("prefill", "decode")
DENSE_REASONS = ("below_threshold", "sparsity_zero", "policy_dense")
STEP_BUCKETS = (1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_MAX_PENDING_EVENTS = 8192  # CUDA event pairs awaiting completion (bounded: dropped oldest first, counted)
# deferred steps (Stats.defer_plan) are accounted by a background thread that looks every this many seconds (a
# wake-up per step instead cost the builder ~40 us: the thread switch)
FLUSH_SECONDS = 0.05


@functools.lru_cache(maxsize=256)
def _kept_prefix(sparsity: float, forced: int, num_blocks: int) -> tuple[int, ...]:
    """Prefix sums of the key blocks kept by query blocks 0..num_blocks-1 (config.keep_counts): entry m = sum of
    keep(0..m-1). Cached per (sparsity, forced, size); sizes grow by doubling."""
    from cab_vllm.config import keep_counts

    return (0, *keep_counts(sparsity, forced, num_blocks).cumsum(0).tolist())


def kept_blocks(sparsity: float, forced: int, first: int, last: int) -> int:
    """Key blocks kept by query blocks first..last (inclusive) at this sparsity (``forced`` = sink + local)."""
    size = 64
    while size <= last:
        size *= 2
    p = _kept_prefix(float(sparsity), int(forced), size)
    return p[last + 1] - p[first]


def causal_blocks(first: int, last: int) -> int:
    """Key blocks a dense causal pass attends for query blocks first..last: sum of (m + 1)."""
    return (last + 1) * (last + 2) // 2 - first * (first + 1) // 2


def prompt_rule_kept(cfg, pblocks: int, first: int, last: int) -> int:
    """Key blocks the prompt decode rule keeps for query blocks first..last of a prompt of pblocks blocks: the prompt's
    last query block's count (at least answer_blocks), then every block after it up to the row's own."""
    mp = pblocks - 1
    k_mp = cfg.answer_keep(kept_blocks(cfg.sparsity, cfg.sink_blocks + cfg.local_blocks, mp, mp), mp + 1)
    rows = last - first + 1
    return rows * (k_mp - mp) + (first + last) * rows // 2


def dense_reason(cfg, seq_len: int, dense_threshold: int, prompt_len: int | None = None,
                 decode: bool = False) -> str | None:
    """Why a row with this (requested) CABConfig runs dense, or None if it runs sparse (plan_batch decides by it).
    A prompt row runs dense when its request's prompt (prompt_len) is shorter than the threshold, whatever its chunk
    (with the prompt length unknown: when its context, seq_len, is), so how vLLM chunks a prompt does not decide which
    of its rows run dense; a decode row when its context is shorter. A decode row under the prompt rule whose prompt
    (prompt_len tokens, None: unknown) was below the threshold stays dense ("prompt_dense"): that rule keeps what the
    prompt's last row kept plus every later block, and a dense prompt kept every block (the key-bounds rule that stood
    in for it found the needle far less often: experiments/RESULTS.md). A prompt row of a config with dense_prefill runs
    dense ("dense_prefill")."""
    if cfg.policy == "dense":
        return "policy_dense"
    if cfg.sparsity == 0.0:
        return "sparsity_zero"
    if not decode and cfg.dense_prefill:
        return "dense_prefill"
    if (seq_len if decode or prompt_len is None else prompt_len) < dense_threshold:
        return "below_threshold"
    if decode and prompt_len is not None and prompt_len < dense_threshold and cfg.decode_scoring == "prompt":
        return "prompt_dense"
    return None


class Stats:
    """Per-process recorder. ``totals`` (a Counter keyed by (metric, labels...)) always holds the figures; the
    Prometheus metrics are created on first use when prometheus_client imports and CAB_METRICS != '0'."""

    def __init__(self) -> None:
        self.totals: Counter = Counter()
        self.recording = True  # False on tensor-parallel ranks other than 0 (the builder sets it): counted once
        self._lock = threading.Lock()
        self._prom = None  # None: not tried yet; False: unavailable; else a dict of metrics
        self._children: dict = {}
        self._pending_events: list = []  # [(phase, start_event, end_event)]
        self._pending_host: Counter = Counter()  # phase -> seconds (CPU timings since the last step)
        self._deferred: list = []  # record_plan arguments of steps not accounted yet (defer_plan)
        self._deferred_lock = threading.Lock()  # the list's own: the builder never waits for an accounting
        self._flushing = False  # this process runs the background thread that accounts deferred steps
        self._exit_flush = False
        if hasattr(os, "register_at_fork"):  # a forked child has no thread: it starts its own at its first step
            os.register_at_fork(after_in_child=self._forked)

    # -- exporting --------------------------------------------------------------------------------------------
    def _metrics(self):
        if self._prom is None:
            self._prom = False
            if os.environ.get("CAB_METRICS", "1") != "0":
                try:
                    import prometheus_client as pc
                except ImportError:
                    pc = None
                if pc is not None:
                    self._prom = self._create(pc)
        return self._prom

    @staticmethod
    def _create(pc) -> dict:
        def counter(name, doc, labels):
            try:
                return pc.Counter(name, doc, labels)
            except ValueError:  # already registered in this process (e.g. tests re-creating Stats)
                return pc.REGISTRY._names_to_collectors[name]

        def histogram(name, doc):
            try:
                return pc.Histogram(name, doc, buckets=STEP_BUCKETS)
            except ValueError:
                return pc.REGISTRY._names_to_collectors[name]

        return {
            "kept": counter("cab_kept_key_blocks", "Key blocks attended by CAB (per query block, per KV head group)",
                            ["phase", "sparsity"]),
            "causal": counter("cab_causal_key_blocks", "Key blocks a dense causal pass would attend",
                              ["phase", "sparsity"]),
            "rows": counter("cab_rows", "Request rows per step (decode: one per request per step; prefill: one "
                            "per chunk)", ["phase", "sparsity", "policy", "mode"]),
            "tokens": counter("cab_query_tokens", "New query tokens processed", ["phase", "sparsity", "policy",
                                                                                  "mode"]),
            "dense": counter("cab_dense_rows", "Rows run dense, by reason", ["phase", "reason"]),
            "predictor": counter("cab_predictor_seconds", "Block-selection (predictor) time, summed over layers",
                                 ["phase"]),
            "dropped": counter("cab_predictor_timings_dropped", "CUDA predictor timings dropped (never completed)",
                               []),
            "step": histogram("cab_predictor_step_seconds", "Block-selection time of one step, all layers"),
        }

    def _inc(self, key: tuple, amount: float) -> None:
        self.totals[key] += amount
        prom = self._metrics()
        if not prom:
            return
        child = self._children.get(key)
        if child is None:
            metric = prom[key[0]]
            child = metric.labels(*key[1:]) if len(key) > 1 else metric
            self._children[key] = child
        child.inc(amount)

    def _apply(self, step: Counter) -> None:
        """Add one step's figures (caller holds the lock)."""
        for key, v in step.items():
            self._inc(key, v)

    # -- recording --------------------------------------------------------------------------------------------
    def record_plan(self, plan, cfgs: Sequence, block_size: int, dense_threshold: int,
                    dense_share: float = 0.0) -> None:
        """Account one step's plan (cab_vllm.backend.plan.BatchPlan) with the rows' requested CABConfigs
        ``cfgs`` (before plan_batch turns dense rows into policy 'dense'); also flushes the predictor timings
        of the previous step. Host arithmetic on the plan's lists only. dense_share: the fraction of the model's
        attention layers that attend densely whatever the rule (CABConfig.dense_layers): a sparse row's kept
        blocks are its layers' mean."""
        with self._lock:
            self._apply(self._plan_counts(plan, cfgs, block_size, dense_threshold, dense_share))
            self._flush_timings()

    def defer_plan(self, plan, cfgs: Sequence, block_size: int, dense_threshold: int,
                   dense_share: float = 0.0) -> None:
        """record_plan later: the step is accounted by this process's background thread within about
        FLUSH_SECONDS (or by flush()); the caller's cost is a list append. The plan and cfgs must not change
        afterwards (the builder makes new ones every step). The predictor timings of earlier steps are flushed
        here, on the caller's thread (their CUDA events are queried where they were recorded), only when some are
        pending."""
        with self._deferred_lock:
            self._deferred.append((plan, cfgs, block_size, dense_threshold, dense_share))
        if not self._flushing:
            self._start_flusher()
        if self._pending_events or self._pending_host:
            with self._lock:
                self._flush_timings()

    def flush(self) -> None:
        """Account every deferred step now (in-process readers of ``totals`` or the metrics call this first)."""
        with self._deferred_lock:
            todo, self._deferred = self._deferred, []
        for args in todo:
            step = self._plan_counts(*args)
            with self._lock:
                self._apply(step)

    def _start_flusher(self) -> None:
        """The background thread of this process (a forked child starts its own; atexit accounts what is left)."""
        self._flushing = True
        threading.Thread(target=self._flush_loop, name="cab-stats", daemon=True).start()
        if not self._exit_flush:
            self._exit_flush = True
            atexit.register(self.flush)

    def _forked(self) -> None:
        self._flushing = False
        self._lock = threading.Lock()  # either lock may have been held by the parent's thread at the fork
        self._deferred_lock = threading.Lock()
        self._deferred = []  # the parent's steps: the parent accounts them

    def _flush_loop(self) -> None:
        while True:
            time.sleep(FLUSH_SECONDS)  # mostly while the engine's thread waits for the GPU (the GIL released)
            if self._deferred:
                self.flush()

    def _plan_counts(self, plan, cfgs: Sequence, block_size: int, dense_threshold: int,
                     dense_share: float = 0.0) -> Counter:
        """The figures record_plan adds for one step, by metric key."""
        step: Counter = Counter()
        decode_index = {r: i for i, r in enumerate(plan.decode_rows)}
        final = dict(zip(plan.prefill_rows, plan.final or ()))  # prefill rows holding their prompt's end
        replay = dict(zip(plan.prefill_rows, plan.replay or ()))  # prefill rows replaying the prompt rule
        as_decode = dict(zip(plan.prefill_rows, plan.as_decode or ()))  # prefill rows run as decode rows
        for r in range(plan.num_reqs):
            q_len = plan.qsl[r + 1] - plan.qsl[r]
            if q_len <= 0:
                continue
            n = plan.seq_lens[r]
            cfg = cfgs[r]
            phase = "decode" if q_len == 1 else "prefill"
            sp = sparsity_label(cfg.sparsity)
            first, last = (n - q_len) // block_size, (n - 1) // block_size
            causal = causal_blocks(first, last)
            if plan.dense[r]:
                kept, mode = causal, "dense"
                reason = dense_reason(cfg, n, dense_threshold, plan.prompt_len(r), phase == "decode")
                if reason is not None:
                    step[("dense", phase, reason)] += 1
            elif phase == "decode" and plan.modes is not None:
                # route_rows decided the row's source: the stored prompt selection (its budget + every block after
                # the prompt) or the step's own selection (the query block's budget, as in the else branch)
                i = decode_index[r]
                if plan.modes[i] == 1:  # MODE_PROMPT: the prompt's last row kept at least answer_blocks
                    kept = prompt_rule_kept(cfg, plan.pblocks[i], last, last)
                else:
                    kept = plan.keep[i]
                mode = "sparse"
            elif replay.get(r) is not None:  # a preempted request's rows past its prompt: as its decode rows
                kept = prompt_rule_kept(cfg, replay[r][1], first, last)
                mode = "sparse"
            elif as_decode.get(r):  # the same under a per-step rule: the rows' share of their contexts' blocks,
                # counted on the chunk's query blocks as every prefill chunk is
                rows = Counter()
                for sub in as_decode[r]:
                    rows += self._plan_counts(sub, [cfg] * sub.num_reqs, block_size, dense_threshold)
                k_rows, c_rows = (sum(v for key, v in rows.items() if key[0] == name) for name in ("kept", "causal"))
                kept = causal * k_rows / c_rows
                mode = "sparse"
            else:
                kept = kept_blocks(cfg.sparsity, cfg.sink_blocks + cfg.local_blocks, first, last)
                if final.get(r) and cfg.raises_answer_row:  # the prompt's last row: an answer row
                    k_last = kept_blocks(cfg.sparsity, cfg.sink_blocks + cfg.local_blocks, last, last)
                    kept += cfg.answer_keep(k_last, last + 1, prompt=True) - k_last
                mode = "sparse"
            if dense_share and mode == "sparse":
                kept += dense_share * (causal - kept)
            step[("kept", phase, sp)] += kept
            step[("causal", phase, sp)] += causal
            step[("rows", phase, sp, cfg.policy, mode)] += 1
            step[("tokens", phase, sp, cfg.policy, mode)] += q_len
        return step

    @contextlib.contextmanager
    def timed(self, phase: str, device) -> Iterator[None]:
        """Time the block selection inside the ``with``: host wall time, or CUDA events on a CUDA device. A process
        that does not record (``recording`` False: tensor-parallel ranks other than 0) times nothing."""
        if not self.recording:
            yield
            return
        if getattr(device, "type", device) == "cuda":
            import torch

            if torch.cuda.is_current_stream_capturing():  # a CUDA graph replays it: events cannot be recorded
                yield
                return
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            with self._lock:
                self._pending_events.append((phase, start, end))
                if len(self._pending_events) > _MAX_PENDING_EVENTS:
                    del self._pending_events[0]
                    self._inc(("dropped",), 1)
            return
        t0 = time.perf_counter()
        yield
        dt = time.perf_counter() - t0
        with self._lock:
            self._pending_host[phase] += dt

    def _flush_timings(self) -> None:
        """Move finished timings into the counters (caller holds the lock). CUDA pairs not finished yet stay."""
        per_phase: Counter = Counter(self._pending_host)
        self._pending_host.clear()
        if self._pending_events:
            keep = []
            for phase, start, end in self._pending_events:
                if end.query():
                    per_phase[phase] += start.elapsed_time(end) / 1000.0
                else:
                    keep.append((phase, start, end))
            self._pending_events = keep
        if not per_phase:
            return
        for phase, secs in per_phase.items():
            self._inc(("predictor", phase), secs)
        total = sum(per_phase.values())
        self.totals[("step",)] += 1
        prom = self._metrics()
        if prom:
            prom["step"].observe(total)

STATS = Stats()


def sparsity_label(sparsity: float) -> str:
    """The ``sparsity`` label of the metrics: two decimals ("0.90") when that is exact, else every digit needed
    ("0.995", "0.999999"), so no label rounds to a value the API would reject (e.g. "1.00")."""
    two = f"{sparsity:.2f}"
    return two if float(two) == sparsity else repr(float(sparsity))
