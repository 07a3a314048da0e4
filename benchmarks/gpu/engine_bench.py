"""Time to first token and time per output token inside a CUDA vLLM engine: CAB (--attention-backend CUSTOM)
against vLLM's FLASH_ATTN on the same machine, on a Llama-3.1-8B-shaped model with dummy weights (nothing to
carry), batch 1, random prompt token ids, CUDA graphs on, chunked prefill on, prefix caching off.

  python benchmarks/gpu/engine_bench.py --backend FLASH_ATTN --lens 512,4096,32768,131072 --out fa.jsonl
  python benchmarks/gpu/engine_bench.py --backend CUSTOM --sparsity 0.95 ... --out cab95.jsonl

One engine per process (run the backends one after the other). Each JSON line: backend, sparsity, n, ttft_s
(median of --reps; of --short-reps for prompts of at most 8192 tokens), tpot_ms (the engine's time from the first to the last token of a 1+T-token request / T,
median of the same; tpot_diff_ms: (wall time of 1+T tokens - TTFT) / T, which the prefill's spread blurs), the greedy output ids of a
fixed prompt (sparsity-0 runs must equal FLASH_ATTN's), engine start time and GPU memory; per timed request (and for
the first request) the Triton kernels compiled or loaded from disk while it ran and the CUDA allocations it made
(LoadWatch: what one request pays once that the next does not); the probe's margin of each greedy id over the
runner-up (probe_margins: a near-tie where two engines' ids part).

--weights normal: after vLLM's dummy load (every weight uniform in +-1e-3: every query and key comes out near zero,
so every key of a context scores about the same and a rule that keeps a score's ties keeps them all), the model's
weights are drawn again in the engine (LLM.apply_model): norms 1, every other weight normal(0, 0.02), a
freshly initialised model's spread. Keys then score apart as a trained model's do (base-2 logits spread over
units, not thousandths), so the cost of a decode that ranks keys by score is its cost on real text; FlashAttention's
does not depend on the values. Needs VLLM_ALLOW_INSECURE_SERIALIZATION=1 (set here) to send the function.

--profile-decode N: after the timed runs, the GPU kernels of T decode steps of an N-token prompt (torch.profiler in
this process, where the engine runs with tensor parallel 1): a prefill-only request and a 1+T-token one are
profiled, and their difference per kernel name is what one decode step launches (calls and GPU time per step,
and the step's span from its first kernel's start to its last's end: the gaps are host-side waits). In the
summary line as decode_profile, printed as PROF lines; then, from the 1+T-token trace alone, each step's length,
GPU busy and idle time and its idle stretches by the kernels around them (GAP lines, decode_profile.step_gaps).

--steady-decode: with --batch B, the decode step of B requests that all decode (nothing prefilling), per length:
B prompts are sent together, each asked for enough tokens that they all still decode once the last one's prefill
is done, and the engine is stepped by hand (LLMEngine.step, in this process): the steady steps are those in which
every request got one token and had one before; their time per step (first to last of the longest run of such
steps / steps) is the TPOT of B users decoding at once (in the row as steady_decode). The plain TPOT of a batch
counts the steps that also prefill the others' chunks.

--profile-prompt N: one request of an N-token prompt and one output token (its TTFT), profiled on the host and
the GPU: the host time, where the GPU work starts and ends in it, the GPU busy time and its idle time between its
first and last kernel, the host operations by self time (what a backend adds per request shows as extra host time
and operations) and the kernels by GPU time (in the summary line as prompt_profile, printed as HOST and KERN lines).

--first-request-profile N: the same timeline for two requests of an N-token prompt and one output token, the first
right after a request of 2 output tokens and the second after one of 1 + --decode-tokens (the order of the timed
runs, whose first TTFT has been the slower), and what the first had more: host span, GPU busy and idle time, the
kernels and host operations whose time differs most (summary line: first_request_profile; FIRSTREQ, FIRSTKERN and
FIRSTHOST lines). The profiler is started once before, so its own start is in neither.

--idle-before S: the engine idles S seconds before each timed first-token request and each of the two profiled
ones (outside the profile): if the first request's extra time is the card's clocks under its power limit after a
long prompt just before, it goes away with a pause.

--host-phases N: --host-reps requests of an N-token prompt and one output token, with the engine's host steps
(HOST_PHASES: admission, scheduling, input preparation, the attention metadata builders and forwards, sampling,
output processing) wrapped in wall-clock timers: per step the calls, the time and where it starts and ends in the
request (medians; in the summary line as host_phases, printed as PHASE lines). Two runs' tables side by side say
which step a backend lengthens; the timers cost ~1 us per call in both."""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
# CAB's step metrics are recorded in the process running tensor-parallel rank 0's attention (a worker process under
# TP > 1): prometheus_client's multiprocess mode lets this process read them (set before anything imports it)
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="cab_prom_"))

SHORT_PROMPT = 8192  # prompts of at most this many tokens are repeated --short-reps times

LLAMA_8B = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=49152,
                max_position_embeddings=135168, rope_theta=500000.0, rms_norm_eps=1e-5, torch_dtype="bfloat16",
                bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


# the probe request: its greedy ids are compared between backends, and its first run times the first request
PROBE_TOKENS, PROBE_OUT = 2000, 24


def model_len(lens: list) -> int:
    """The engine's max_model_len: room for the longest measured prompt and for the probe request, with 512 tokens
    to spare for the generated ones (a run of short prompts alone still fits the probe)."""
    return max(max(lens), PROBE_TOKENS + PROBE_OUT) + 512


def cab_counts() -> dict:
    """CAB's metrics summed over every process of this run (multiprocess mode): prefill query tokens and decode
    rows, the figures a request's size fixes (each counted once per step, whatever the tensor-parallel size)."""
    from prometheus_client import CollectorRegistry, multiprocess

    from cab_vllm.backend.stats import FLUSH_SECONDS, STATS

    STATS.flush()  # steps this process's background thread has not accounted yet
    time.sleep(10 * FLUSH_SECONDS)  # and those of worker processes (tensor parallel)
    reg = CollectorRegistry()
    multiprocess.MultiProcessCollector(reg)
    out = {"prefill_tokens": 0.0, "decode_rows": 0.0}
    for fam in reg.collect():
        for s in fam.samples:
            if s.name == "cab_query_tokens_total" and s.labels.get("phase") == "prefill":
                out["prefill_tokens"] += s.value
            elif s.name == "cab_rows_total" and s.labels.get("phase") == "decode":
                out["decode_rows"] += s.value
    return out


def probe_margins(logprobs) -> list | None:
    """Per generated token, how far the chosen token's log-probability stands above the runner-up's (vLLM's
    per-step {token id: Logprob} dicts with logprobs=2), rounded to 1e-4: where two engines' greedy ids part, a
    margin near 0 says a near-tie that summation order decides, a large one that the two computed different
    things. None without logprobs."""
    if not logprobs:
        return None
    out = []
    for step in logprobs:
        vals = sorted((getattr(v, "logprob", v) for v in step.values()), reverse=True)
        out.append(round(vals[0] - vals[1], 4) if len(vals) > 1 else None)
    return out


class LoadWatch:
    """What each timed request paid once: the Triton kernels this process compiled or loaded from Triton's disk
    cache while it ran (its in-memory cache misses, triton.knobs.runtime.jit_cache_hook, chained to a hook already
    there), the CUDA allocations torch's caching allocator made (memory_stats' num_device_alloc) and Python's
    garbage collections of the oldest generation with their pause (gc.callbacks; the engine runs in this process).
    A request whose TTFT exceeds the next one's shows here what it did that the next did not. knobs: Triton's (for
    tests)."""

    def __init__(self, knobs=None) -> None:
        import gc

        self.names: list = []
        self.full_gcs: list = []  # ms of each generation-2 collection since the last take
        self._gc_start = 0.0
        gc.callbacks.append(self._on_gc)
        self.installed = False
        self._allocs = self._device_allocs()
        try:
            if knobs is None:
                from triton import knobs
            prev = knobs.runtime.jit_cache_hook
        except (ImportError, AttributeError):  # a Triton without knobs: no kernel names, allocations still counted
            return

        def hook(*args, **kw):
            fn = kw.get("fn")
            self.names.append(getattr(fn, "name", None) or str(kw.get("repr", "?"))[:80])
            return prev(*args, **kw) if prev is not None else False  # False: compile / load as usual

        knobs.runtime.jit_cache_hook = hook
        self.installed = True

    def _on_gc(self, phase: str, info: dict) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self.full_gcs.append(round((time.perf_counter() - self._gc_start) * 1e3, 2))

    @staticmethod
    def _device_allocs() -> int:
        import torch

        return int(torch.cuda.memory_stats().get("num_device_alloc", 0)) if torch.cuda.is_available() else 0

    def take(self) -> tuple[list, int, list]:
        """(kernel names, CUDA allocations, full collections' ms) since the last take (or since the watch began)."""
        names, self.names = self.names, []
        gcs, self.full_gcs = self.full_gcs, []
        allocs = self._device_allocs()
        grew, self._allocs = allocs - self._allocs, allocs
        return names, grew, gcs


class PhaseTimer:
    """CUDA-event timing of CAB's prefill phases inside the engine (the engine runs in this process): gathering
    keys from the paged cache (attention.gather_paged: the whole context without a summary slot, or for the exact
    rows on the unfused path), pooling a chunk's keys into the kept summaries (attention.update_key_summaries), its
    block selection (attention.prefill_selection: estimate + select) and its sparse attention
    (attention.run_prefill), by wrapping those module functions. Decode steps replay CUDA graphs: not timed."""

    def __init__(self) -> None:
        import torch
        from cab_vllm.backend import attention

        self.events: list = []
        for name in ("gather_paged", "update_key_summaries", "prefill_selection", "run_prefill"):
            fn = getattr(attention, name)

            def timed(*args, _fn=fn, _name=name, **kw):
                if torch.cuda.is_current_stream_capturing():
                    return _fn(*args, **kw)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = _fn(*args, **kw)
                end.record()
                self.events.append((_name, start, end))
                return out

            setattr(attention, name, timed)

    def reset(self) -> None:
        self.events.clear()

    def totals(self) -> dict:
        import torch

        torch.cuda.synchronize()
        out: dict = {}
        for name, start, end in self.events:
            out[name] = out.get(name, 0.0) + start.elapsed_time(end) / 1e3
        return out


# (module, Class.method): a request's way through the engine on the host, in CUDA vLLM 0.26's V1 layout
# (--host-phases); a name another vLLM lacks is reported as missing, not timed
HOST_PHASES = (
    ("vllm.entrypoints.offline_utils", "OfflineInferenceMixin._add_completion_requests"),
    ("vllm.v1.engine.input_processor", "InputProcessor.process_inputs"),
    ("vllm.v1.engine.llm_engine", "LLMEngine.add_request"),
    ("vllm.entrypoints.offline_utils", "OfflineInferenceMixin._run_engine"),
    ("vllm.v1.engine.llm_engine", "LLMEngine.step"),
    ("vllm.v1.engine.core_client", "InprocClient.get_output"),
    ("vllm.v1.core.sched.scheduler", "Scheduler.schedule"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.execute_model"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._update_states"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._prepare_inputs"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._build_attention_metadata"),
    ("vllm.v1.attention.backends.flash_attn", "FlashAttentionMetadataBuilder.build"),
    ("cab_vllm.backend.backend", "CABMetadataBuilder.build"),
    ("cab_vllm.backend.backend", "CABMetadataBuilder._request_cfgs"),
    ("cab_vllm.backend.stats", "Stats.defer_plan"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._model_forward"),
    ("vllm.v1.attention.backends.flash_attn", "FlashAttentionImpl.forward"),
    ("cab_vllm.backend.backend", "CABImpl.forward"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.sample_tokens"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._sample"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._bookkeeping_sync"),
    ("vllm.v1.worker.gpu_model_runner", "AsyncGPUModelRunnerOutput.get_output"),
    ("vllm.v1.core.sched.scheduler", "Scheduler.update_from_output"),
    ("vllm.v1.engine.output_processor", "OutputProcessor.process_outputs"),
)


class HostPhases:
    """Wall-clock timing of the methods in ``phases`` (HOST_PHASES) by wrapping them on their classes: each call's
    (name, start, end) in perf_counter seconds. Wrap after the engine is made (the plugin's own wrappers on the
    InputProcessor then run inside the timed call) and rebind ``rebind``'s bound attributes (the engine core keeps
    its step function bound). What a backend adds on the host per request shows as the difference of two runs'
    ``summary`` (host_phase_summary)."""

    def __init__(self, phases=HOST_PHASES) -> None:
        import importlib

        self.calls: list = []
        self.missing: list = []
        self._undo: list = []
        for mod_name, qual in phases:
            cls_name, meth = qual.split(".")
            try:
                cls = getattr(importlib.import_module(mod_name), cls_name)
                fn = cls.__dict__[meth]
            except (ImportError, AttributeError, KeyError):
                self.missing.append(qual)
                continue

            def timed(*args, _fn=fn, _name=qual, **kw):
                t = time.perf_counter()
                try:
                    return _fn(*args, **kw)
                finally:
                    self.calls.append((_name, t, time.perf_counter()))

            setattr(cls, meth, timed)
            self._undo.append((cls, meth, fn))

    def restore(self) -> None:
        for cls, meth, fn in reversed(self._undo):
            setattr(cls, meth, fn)
        self._undo.clear()


def host_phase_summary(windows: list, calls: list) -> dict:
    """Per phase name, the median over requests of: calls per request, total time (ms), and where its first call
    starts and its last call ends (ms after the request's start). ``windows``: [(t_start, t_end)] of each request
    (perf_counter seconds); ``calls``: [(name, start, end)]; a call belongs to the window holding its start. Also
    the requests' median wall time (ms). A phase seen in no window is left out."""
    if not windows:
        raise ValueError("no requests to summarise")
    per: dict = {}
    for i, (w0, w1) in enumerate(windows):
        for name, a, b in calls:
            if w0 <= a < w1:
                d = per.setdefault(name, {}).setdefault(i, [0, 0.0, a, b])
                d[0] += 1
                d[1] += b - a
                d[2], d[3] = min(d[2], a), max(d[3], b)
    out = {"requests": len(windows),
           "wall_ms": round(statistics.median((w1 - w0) * 1e3 for w0, w1 in windows), 3), "phases": {}}
    for name, by_req in per.items():
        vals = [by_req.get(i) for i in range(len(windows))]
        got = [(v, windows[i][0]) for i, v in enumerate(vals) if v is not None]
        out["phases"][name] = {
            "calls": statistics.median(v[0] if v else 0 for v in vals),
            "total_ms": round(statistics.median(v[1] * 1e3 if v else 0.0 for v in vals), 3),
            "first_ms": round(statistics.median((v[2] - w0) * 1e3 for v, w0 in got), 3),
            "last_ms": round(statistics.median((v[3] - w0) * 1e3 for v, w0 in got), 3),
        }
    return out


def decode_breakdown(prefill_only: list, with_decode: list, steps: int, top: int = 25) -> dict:
    """Per decode step, from two kernel traces of the same prompt, [(name, start_us, end_us)] each: the prompt's
    prefill alone and the prefill plus ``steps`` decode steps. Kernel calls and GPU time per step by name (the
    difference of the two traces; names the prefill also runs cancel up to its run-to-run spread), the GPU time
    and the span per step (the span counts the gaps between kernels, i.e. host-side waits)."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")

    def by_name(trace):
        out: dict = {}
        for name, a, b in trace:
            c, t = out.get(name, (0, 0.0))
            out[name] = (c + 1, t + (b - a))
        return out

    def span(trace):
        return (max(b for _, _, b in trace) - min(a for _, a, _ in trace)) if trace else 0.0

    pa, pb = by_name(prefill_only), by_name(with_decode)
    rows = []
    for name in set(pa) | set(pb):
        (ca, ta), (cb, tb) = pa.get(name, (0, 0.0)), pb.get(name, (0, 0.0))
        rows.append((name, (cb - ca) / steps, (tb - ta) / steps))
    rows.sort(key=lambda r: -r[2])
    busy = sum(r[2] for r in rows)
    return {"steps": steps, "gpu_us_per_step": round(busy, 1),
            "span_us_per_step": round((span(with_decode) - span(prefill_only)) / steps, 1),
            "kernels": [[n, round(c, 2), round(t, 2)] for n, c, t in rows[:top] if c > 0 or abs(t) >= 0.05]}


def steady_decode(log: list, batch: int) -> dict:
    """From a step log [(t_seconds, {request id: new tokens})] (one entry per engine step, in order) of ``batch``
    requests: the longest run of steady steps, where each of the ``batch`` requests got exactly one token and had
    got one in an earlier step (no request's prefill in it). Returns the run's step count and its time per step
    (ms, first to last step of the run / steps in between); ValueError when no two steady steps follow each other."""
    if batch < 1:
        raise ValueError(f"batch={batch} must be >= 1")
    seen: set = set()
    steady = []
    for _, got in log:
        steady.append(len(got) == batch and all(v == 1 for v in got.values()) and seen.issuperset(got))
        seen.update(r for r, v in got.items() if v > 0)
    best, start = (0, 0), None
    for i, ok in enumerate(steady + [False]):
        if ok and start is None:
            start = i
        elif not ok and start is not None:
            best = max(best, (i - start, start))
            start = None
    steps, first = best
    if steps < 2:
        raise ValueError(f"no two steady decode steps in a row for {batch} requests ({sum(steady)} steady steps): "
                         "ask for more tokens per request")
    last = first + steps - 1
    return {"steps": steps, "step_ms": round((log[last][0] - log[first][0]) / (steps - 1) * 1e3, 3)}


def step_log(llm, prompts: list, n_out: int) -> list:
    """Send ``prompts`` (token id lists) together for ``n_out`` greedy tokens each and step the engine by hand:
    [(time after the step, {request id: tokens it got in the step})] for steady_decode."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    sp = SamplingParams(temperature=0, max_tokens=n_out, ignore_eos=True, detokenize=False,
                        output_kind=RequestOutputKind.DELTA)
    for i, ids in enumerate(prompts):
        engine.add_request(f"steady-{i}", {"prompt_token_ids": ids}, sp)
    log = []
    while engine.has_unfinished_requests():
        outs = engine.step()
        got = {o.request_id: len(o.outputs[0].token_ids) for o in outs if o.outputs}
        log.append((time.perf_counter(), {r: v for r, v in got.items() if v > 0}))
    return log


def step_gaps(trace: list, steps: int, marker: str = "ArgMaxOps", top: int = 8) -> dict:
    """Where a decode step's GPU sits idle, from one kernel trace [(name, start_us, end_us)] that ends with ``steps``
    decode steps: a step is the stretch between two ends of the sampler's kernel (``marker`` in its name: the
    greedy sampler's argmax, once per step), the last ``steps`` of them are taken. Per step (medians): its length,
    the GPU busy time (union of kernel intervals) and the idle time; and the idle stretches by the kernels on
    either side ("before -> after", names cut to 60 characters), as µs per step (mean over the steps) with how often
    they occur per step. The gaps say which host work the GPU waits for (e.g. a builder's, between the sampler
    and the next step's first copy)."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    ev = sorted(trace, key=lambda e: e[1])
    ends = [(b, name) for name, _, b in ev if marker in name]
    if len(ends) < steps + 1:
        raise ValueError(f"the trace has {len(ends)} '{marker}' kernels; {steps + 1} are needed for {steps} steps")
    windows = list(zip(ends[-steps - 1:-1], ends[-steps:]))
    lengths, busy, idle = [], [], []
    pairs: dict = {}
    for (w0, sampler), (w1, _) in windows:
        inside = [(n, max(a, w0), min(b, w1)) for n, a, b in ev if b > w0 and a < w1]
        covered, cur, prev = 0.0, w0, sampler
        for name, a, b in inside:
            if a > cur:
                key = f"{prev[:60]} -> {name[:60]}"
                c, t = pairs.get(key, (0, 0.0))
                pairs[key] = (c + 1, t + (a - cur))
            if b > cur:
                covered += b - max(a, cur)
                cur, prev = b, name
        lengths.append(w1 - w0)
        busy.append(covered)
        idle.append(w1 - w0 - covered)
    rows = sorted(pairs.items(), key=lambda kv: -kv[1][1])[:top]
    return {"steps": steps, "step_us": round(statistics.median(lengths), 1),
            "busy_us": round(statistics.median(busy), 1), "idle_us": round(statistics.median(idle), 1),
            "gaps": [[k, round(c / steps, 2), round(t / steps, 1)] for k, (c, t) in rows]}


def host_breakdown(cpu: list, gpu: list, top: int | None = 25) -> dict:
    """One request's host and GPU timeline from a profile: cpu [(name, start_us, end_us, self_us)] (host
    operations), gpu [(name, start_us, end_us)] (kernels, copies): the host span, the GPU work's first start and
    last end relative to it, the GPU busy time, the kernel count, and the host operations by self time (the top
    rows of each; None: all)."""
    if not cpu:
        raise ValueError("no host events in the profile")
    t0, t1 = min(a for _, a, _, _ in cpu), max(b for _, _, b, _ in cpu)
    ops: dict = {}
    for name, _, _, self_us in cpu:
        c, t = ops.get(name, (0, 0.0))
        ops[name] = (c + 1, t + self_us)
    rows = sorted(ops.items(), key=lambda kv: -kv[1][1])[:top]
    kern: dict = {}
    for name, a, b in gpu:
        c, t = kern.get(name, (0, 0.0))
        kern[name] = (c + 1, t + b - a)
    krows = sorted(kern.items(), key=lambda kv: -kv[1][1])[:top]
    out = {"host_us": round(t1 - t0, 1), "host_ops": len(cpu), "kernels": len(gpu),
           "gpu_busy_us": round(sum(b - a for _, a, b in gpu), 1),
           "ops": [[n, c, round(t, 1)] for n, (c, t) in rows],
           "gpu_kernels": [[n, c, round(t, 1)] for n, (c, t) in krows]}
    if gpu:
        out["first_gpu_us"] = round(min(a for _, a, _ in gpu) - t0, 1)
        out["last_gpu_us"] = round(max(b for _, _, b in gpu) - t0, 1)
        covered, end = 0.0, None  # the union of the GPU's intervals: what is left of its span is idle
        for a, b in sorted((a, b) for _, a, b in gpu):
            if end is None or a > end:
                covered, end = covered + b - a, b
            elif b > end:
                covered, end = covered + b - end, b
        out["gpu_covered_us"] = round(covered, 1)
        out["gpu_idle_us"] = round(out["last_gpu_us"] - out["first_gpu_us"] - covered, 1)
    return out


def timeline_diff(first: dict, second: dict, top: int = 15) -> dict:
    """What one request's timeline had more than another's (two host_breakdown results of the same prompt, every
    row kept): the differences of the host span, the GPU's busy, covered and idle time and its last end; then the
    kernels and the host operations whose summed time differs most, as [name, calls first, calls second, us first
    - us second], largest difference first (a name missing on one side counts 0 there)."""
    keys = ("host_us", "gpu_busy_us", "gpu_covered_us", "gpu_idle_us", "last_gpu_us")
    out = {f"{k}_diff": round(first[k] - second[k], 1) for k in keys if k in first and k in second}

    def rows(field: str) -> list:
        a = {n: (c, t) for n, c, t in first[field]}
        b = {n: (c, t) for n, c, t in second[field]}
        got = []
        for n in a.keys() | b.keys():
            (ca, ta), (cb, tb) = a.get(n, (0, 0.0)), b.get(n, (0, 0.0))
            got.append([n, ca, cb, round(ta - tb, 1)])
        return sorted(got, key=lambda r: (-abs(r[3]), r[0]))[:top]

    out["gpu_kernels"] = rows("gpu_kernels")
    out["ops"] = rows("ops")
    return out


def host_trace(fn) -> tuple[list, list]:
    """(host operations [(name, start_us, end_us, self_us)], GPU activity [(name, start_us, end_us)]) while fn()
    runs."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    cpu, gpu = [], []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            gpu.append((e.name, e.time_range.start, e.time_range.end))
        else:
            cpu.append((e.name, e.time_range.start, e.time_range.end, e.self_cpu_time_total))
    return cpu, gpu


def kernel_trace(fn) -> list:
    """[(name, start_us, end_us)] of the GPU activity (kernels, copies, sets) while fn() runs."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA]


def redraw_weights(model) -> int:
    """Every parameter of model drawn again in place (the CUDA graphs captured at start keep their pointers): norm
    weights 1, the rest normal(0, 0.02); returns how many tensors."""
    import torch

    n = 0
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", required=True, choices=["FLASH_ATTN", "CUSTOM"])
    ap.add_argument("--sparsity", type=float, default=None, help="CAB_SPARSITY for CUSTOM")
    ap.add_argument("--lens", default="512,4096,32768,131072")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--short-reps", type=int, default=8, metavar="N",
                    help=f"repetitions for prompts of at most {SHORT_PROMPT} tokens (cheap, and their few-percent "
                    "gaps need more than two samples; at least --reps)")
    ap.add_argument("--batch", type=int, default=1, help="prompts of each length sent together (TTFT: the whole "
                    "batch's first tokens; TPOT: per step of the batch)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--weights", choices=("dummy", "normal"), default="dummy",
                    help="dummy: vLLM's uniform +-1e-3 (every key scores alike); normal: redrawn in the engine as a "
                         "fresh model's (norms 1, the rest normal(0, 0.02))")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--runner", choices=("v1", "v2"), default="v1",
                    help="vLLM's model runner (V2 is CUDA vLLM 0.26+'s default for this model; CAB reads its step)")
    ap.add_argument("--steady-decode", action="store_true",
                    help="per length, the decode step of --batch requests that all decode (see the module docstring)")
    ap.add_argument("--steady-steps", type=int, default=32, help="steady decode steps asked for (--steady-decode)")
    ap.add_argument("--profile-decode", type=int, default=None, metavar="N",
                    help="after the runs, the kernels of one decode step at an N-token context (tensor parallel 1)")
    ap.add_argument("--profile-steps", type=int, default=32, help="decode steps profiled (--profile-decode)")
    ap.add_argument("--profile-prompt", type=int, default=None, metavar="N",
                    help="after the runs, the host and GPU timeline of one N-token request's first token")
    ap.add_argument("--first-request-profile", type=int, default=None, metavar="N",
                    help="after the runs, the timelines of two N-token requests of one output token, the first "
                         "after a request of 2 tokens, the second after one of 1 + --decode-tokens, and their "
                         "difference")
    ap.add_argument("--idle-before", type=float, default=0.0, metavar="S",
                    help="seconds the engine sits idle before each timed first-token request (and each profiled one "
                         "of --first-request-profile): whether a request's time depends on what the card ran just "
                         "before it (its clocks under the power limit)")
    ap.add_argument("--host-phases", type=int, default=None, metavar="N",
                    help="after the runs, --host-reps requests of an N-token prompt and one output token with the "
                    "engine's host steps timed (HOST_PHASES; tensor parallel 1): where a backend's host time goes")
    ap.add_argument("--host-reps", type=int, default=16, help="requests timed (--host-phases)")
    ap.add_argument("--fa-graph-splits", type=int, default=None, metavar="N",
                    help="vLLM's attention_config.flash_attn_max_num_splits_for_cuda_graph (32 by default): the "
                    "splits FlashAttention's decode graphs are captured for (with CUSTOM: CAB's FlashAttention rows)")
    ap.add_argument("--fa-version", type=int, default=None, metavar="N",
                    help="vLLM's attention_config flash_attn_version (2 or 3) for this engine: the FlashAttention "
                         "that runs the dense rows (CAB) or every row (FLASH_ATTN)")
    ap.add_argument("--block-size", type=int, default=None, metavar="N",
                    help="tokens per page of the KV cache (vLLM's --block-size; 16 by default on CUDA): CAB's decode "
                    "kernel reads one page-table entry per 64-token key block when a page holds whole blocks")
    ap.add_argument("--max-model-len", type=int, default=None, metavar="N",
                    help="the engine's max_model_len (default: model_len of --lens); CAB sizes its decode buffers by "
                         "it, so a short prompt can be timed in an engine sized for long ones")
    ap.add_argument("--scheduler", choices=("vllm", "cab"), default="vllm",
                    help="vllm: vLLM's own scheduler (as LLM(...) and `vllm serve` have it); cab: CABScheduler "
                         "(cab_vllm.backend.scheduler, what cab-serve uses: prefill chunks end at CAB's blocks)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if a.fa_version is not None and a.fa_version not in (2, 3):
        ap.error("--fa-version must be 2 or 3")
    if a.fa_graph_splits is not None and a.fa_graph_splits < 1:
        ap.error("--fa-graph-splits must be >= 1")
    if a.block_size is not None and (a.block_size < 16 or a.block_size % 16):
        ap.error("--block-size must be a positive multiple of 16")
    lens = [int(x) for x in a.lens.split(",")]
    if a.max_model_len is not None and a.max_model_len < model_len(lens):
        ap.error(f"--max-model-len must be at least {model_len(lens)} (the longest "
                 f"prompt, the probe request and 512 generated tokens)")
    if a.steady_decode and a.steady_steps < 2:
        ap.error("--steady-steps must be >= 2")
    if a.reps < 1 or a.short_reps < 1:
        ap.error("--reps and --short-reps must be >= 1")
    if a.profile_decode is not None and (a.tp != 1 or a.profile_decode < 1 or a.profile_steps < 1):
        ap.error("--profile-decode needs --tp 1, N >= 1 and --profile-steps >= 1")
    if a.profile_prompt is not None and (a.tp != 1 or a.profile_prompt < 1):
        ap.error("--profile-prompt needs --tp 1 and N >= 1")
    if a.first_request_profile is not None and (a.tp != 1 or not 1 <= a.first_request_profile <= max(lens)):
        ap.error(f"--first-request-profile needs --tp 1 and 1 <= N <= {max(lens)} (the longest of --lens)")
    if not 0 <= a.idle_before <= 600:
        ap.error(f"--idle-before must be between 0 and 600 seconds, got {a.idle_before}")
    if a.host_phases is not None and (a.tp != 1 or a.host_phases < 1 or a.host_reps < 1):
        ap.error("--host-phases needs --tp 1, N >= 1 and --host-reps >= 1")
    if a.sparsity is not None:
        os.environ["CAB_SPARSITY"] = str(a.sparsity)
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1" if a.runner == "v2" else "0"
    if a.weights == "normal":
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # LLM.apply_model sends a function to the engine
    import torch
    from vllm import LLM, SamplingParams

    from cab_vllm.backend.scheduler import QUALNAME

    attention_config = {k: v for k, v in (("flash_attn_max_num_splits_for_cuda_graph", a.fa_graph_splits),
                                          ("flash_attn_version", a.fa_version)) if v is not None}
    d = tempfile.mkdtemp()
    json.dump(dict(LLAMA_8B, num_hidden_layers=a.layers), open(os.path.join(d, "config.json"), "w"))
    t0 = time.time()
    llm = LLM(d, load_format="dummy", attention_backend=a.backend,
              max_model_len=a.max_model_len or model_len(lens),
              gpu_memory_utilization=a.gpu_memory_utilization, enable_prefix_caching=False, skip_tokenizer_init=True,
              disable_log_stats=False,  # per-request first/last token times (RequestOutput.metrics) for the TPOT
              tensor_parallel_size=a.tp, enforce_eager=a.eager, seed=0,
              **({"attention_config": attention_config} if attention_config else {}),
              **({} if a.block_size is None else {"block_size": a.block_size}),
              **({"scheduler_cls": QUALNAME} if a.scheduler == "cab" else {}))
    init_s = time.time() - t0
    if a.weights == "normal":
        print(f"weights redrawn: {sum(llm.apply_model(redraw_weights))} tensors", flush=True)
    mem0 = torch.cuda.memory_allocated() if a.tp == 1 else 0
    torch.cuda.reset_peak_memory_stats()
    rows = []
    phases = PhaseTimer() if a.backend == "CUSTOM" else None

    sent = {"prefill_tokens": 0, "decode_rows": 0}  # what the requests below make CAB count, once
    counts0 = cab_counts() if a.backend == "CUSTOM" else None  # start-up (profiling, warm-up, graphs) excluded

    def gen(ids, n_out, batch=1, logprobs=None):
        sent["prefill_tokens"] += len(ids) * batch
        sent["decode_rows"] += (n_out - 1) * batch
        sp = SamplingParams(temperature=0, max_tokens=n_out, ignore_eos=True, detokenize=False, logprobs=logprobs)
        # a batch: the same length, different ids (no prefix shared; prefix caching is off anyway)
        prompts = [{"prompt_token_ids": ids if b == 0 else [(x + 7 * b) % 40000 + 100 for x in ids]}
                   for b in range(batch)]
        t = time.perf_counter()
        out = llm.generate(prompts, sp, use_tqdm=False)
        wall = time.perf_counter() - t
        # the engine core's own time from first to last token of each request (no prefill in it)
        decode = [(o.metrics.last_token_ts - o.metrics.first_token_ts) / (n_out - 1) * 1e3 for o in out
                  if n_out > 1 and getattr(o, "metrics", None) is not None and o.metrics.last_token_ts > 0]
        gen.decode_ms = statistics.median(decode) if decode else None
        gen.margins = probe_margins(out[0].outputs[0].logprobs) if logprobs else None
        return wall, list(out[0].outputs[0].token_ids)

    rng = random.Random(0)
    probe = [rng.randrange(100, 40000) for _ in range(PROBE_TOKENS)]
    watch = LoadWatch()
    watch.take()
    t_first, probe_out = gen(probe, PROBE_OUT)  # the first request: as fast as the second when kernels warmed at start
    first_loads = watch.take()
    t_second, _ = gen(probe, PROBE_OUT, logprobs=2)
    margins = gen.margins  # the greedy ids' margins over the runner-up (near-ties flip between kernels)
    for n in lens:
        ids = [random.Random(n + r).randrange(100, 40000) for r in range(n)]
        gen(ids, 2, a.batch)  # warm: kernels specialised for this length
        if phases is not None:
            phases.reset()
        ttft, tot, direct, loads = [], [], [], []
        reps = max(a.reps, a.short_reps) if n <= SHORT_PROMPT else a.reps
        for _ in range(reps):
            time.sleep(a.idle_before)
            watch.take()
            ttft.append(gen(ids, 1, a.batch)[0])
            loads.append(watch.take())
            tot.append(gen(ids, 1 + a.decode_tokens, a.batch)[0])
            direct.append(gen.decode_ms)
        ttft_s = statistics.median(ttft)
        # by difference of two requests' wall times: at 128k the prefill's run-to-run spread (~0.1 s) moves this
        # by ~1.5 ms per token; the engine's first-to-last token time does not contain the prefill
        tpot_diff = statistics.median([(t - f) / a.decode_tokens * 1e3 for t, f in zip(tot, ttft)])
        measured = None not in direct
        tpot = statistics.median(direct) if measured else tpot_diff
        row = dict(backend=a.backend, sparsity=a.sparsity, n=n, ttft_s=round(ttft_s, 4), tpot_ms=round(tpot, 3),
                   tpot_from="engine first-to-last token" if measured else "difference of wall times",
                   tpot_diff_ms=round(tpot_diff, 3), ttft_runs=[round(x, 4) for x in ttft],
                   ttft_runs_triton_loads=[names for names, _, _ in loads],
                   ttft_runs_device_allocs=[grew for _, grew, _ in loads],
                   ttft_runs_full_gc_ms=[gcs for _, _, gcs in loads], reps=reps, batch=a.batch,
                   decode_tokens=a.decode_tokens, layers=a.layers, tp=a.tp, eager=a.eager, runner=a.runner,
                   idle_before_s=a.idle_before)
        if phases is not None:  # CAB's prefill phases, GPU time summed over layers and chunks, per prompt
            row["per_prompt_s"] = {k: round(v / (2 * reps * a.batch), 4) for k, v in phases.totals().items()}
        if a.steady_decode:
            budget = llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
            # one prompt chunk per step (the others' decode rows take a token each): the last prompt is done after
            # about this many steps, and every request must still decode for --steady-steps after that
            prefill_steps = a.batch * -(-n // max(1, budget - a.batch))
            prompts = [[(x + 13 * b) % 40000 + 100 for x in ids] for b in range(a.batch)]
            n_out = prefill_steps + a.steady_steps + 2
            sent["prefill_tokens"] += n * a.batch
            sent["decode_rows"] += (n_out - 1) * a.batch
            row["steady_decode"] = dict(batch=a.batch, **steady_decode(step_log(llm, prompts, n_out), a.batch))
            print(f"STEADY n={n} batch={a.batch}: {row['steady_decode']['step_ms']} ms per step over "
                  f"{row['steady_decode']['steps']} steps", flush=True)
        rows.append(row)
        print("RES", json.dumps(row), flush=True)
    peak = torch.cuda.max_memory_allocated() if a.tp == 1 else 0
    summary = dict(backend=a.backend, sparsity=a.sparsity, weights=a.weights, init_s=round(init_s, 1),
                   first_request_s=round(t_first, 4), second_request_s=round(t_second, 4),
                   first_request_triton_loads=first_loads[0], first_request_device_allocs=first_loads[1],
                   first_request_full_gc_ms=first_loads[2],
                   probe_margins=margins,
                   probe_out=probe_out, mem_after_init_gib=round(mem0 / 2**30, 2),
                   peak_during_runs_gib=round(peak / 2**30, 2), gpu=torch.cuda.get_device_name(), tp=a.tp,
                   cab_env={k: v for k, v in sorted(os.environ.items())
                            if k.startswith("CAB_") and k != "CAB_CACHE_DIR"},  # the model cache: no setting
                   fa_graph_splits=a.fa_graph_splits, fa_version=a.fa_version, block_size=a.block_size,
                   max_model_len=a.max_model_len, scheduler=a.scheduler,
                   scheduler_class=type(llm.llm_engine.engine_core.engine_core.scheduler).__name__
                   if hasattr(getattr(llm.llm_engine.engine_core, "engine_core", None), "scheduler") else None)
    if counts0 is not None:  # equal: counted once (TP > 1 included); twice the requests' figures: once per rank
        counts1 = cab_counts()
        summary["cab_metrics"] = {k: dict(sent=sent[k], counted=counts1[k] - counts0[k]) for k in sent}
    if a.profile_decode is not None:
        ids = [random.Random(7 + r).randrange(100, 40000) for r in range(a.profile_decode)]
        gen(ids, 1 + a.profile_steps)  # warm for this length
        only = kernel_trace(lambda: gen(ids, 1))
        both = kernel_trace(lambda: gen(ids, 1 + a.profile_steps))
        prof = dict(n=a.profile_decode, **decode_breakdown(only, both, a.profile_steps))
        summary["decode_profile"] = prof
        print(f"PROF n={prof['n']} per decode step: GPU {prof['gpu_us_per_step']} us, span "
              f"{prof['span_us_per_step']} us", flush=True)
        for name, calls, us in prof["kernels"]:
            print(f"PROF {us:9.2f} us {calls:7.2f} calls  {name[:110]}", flush=True)
        try:
            gaps = step_gaps(both, a.profile_steps)
        except ValueError as e:  # e.g. a sampler without the argmax kernel: the rest of the profile stands
            print(f"GAP not measured: {e}", flush=True)
        else:
            prof["step_gaps"] = gaps
            print(f"GAP per decode step (median of {gaps['steps']}): {gaps['step_us']} us, GPU busy "
                  f"{gaps['busy_us']} us, idle {gaps['idle_us']} us", flush=True)
            for pair, per_step, us in gaps["gaps"]:
                print(f"GAP {us:8.1f} us {per_step:5.2f}x  {pair}", flush=True)
    if a.profile_prompt is not None:
        ids = [random.Random(11 + r).randrange(100, 40000) for r in range(a.profile_prompt)]
        gen(ids, 1)
        gen(ids, 1)  # warm for this length
        prof = dict(n=a.profile_prompt, **host_breakdown(*host_trace(lambda: gen(ids, 1))))
        summary["prompt_profile"] = prof
        print(f"HOST n={prof['n']} one request: host {prof['host_us']} us ({prof['host_ops']} ops), GPU work from "
              f"{prof.get('first_gpu_us')} to {prof.get('last_gpu_us')} us, busy {prof['gpu_busy_us']} us in "
              f"{prof['kernels']} kernels", flush=True)
        print(f"HOST GPU covered {prof.get('gpu_covered_us')} us, idle {prof.get('gpu_idle_us')} us between its first "
              f"and last kernel", flush=True)
        for name, calls, us in prof["ops"]:
            print(f"HOST {us:9.1f} us {calls:6d} calls  {name[:110]}", flush=True)
        for name, calls, us in prof["gpu_kernels"]:
            print(f"KERN {us:9.1f} us {calls:6d} calls  {name[:110]}", flush=True)
    if a.host_phases is not None:
        ids = [random.Random(13 + r).randrange(100, 40000) for r in range(a.host_phases)]
        gen(ids, 1)
        gen(ids, 1)  # warm for this length
        timer = HostPhases()
        windows = []
        try:
            for _ in range(a.host_reps):
                t = time.perf_counter()
                gen(ids, 1)
                windows.append((t, time.perf_counter()))
        finally:
            timer.restore()
        hp = dict(n=a.host_phases, missing=timer.missing, **host_phase_summary(windows, timer.calls))
        summary["host_phases"] = hp
        print(f"PHASE n={hp['n']} {hp['requests']} requests, wall {hp['wall_ms']} ms (median); not in this vLLM: "
              f"{', '.join(hp['missing']) or 'none'}", flush=True)
        for name, v in sorted(hp["phases"].items(), key=lambda kv: kv[1]["first_ms"]):
            print(f"PHASE {v['first_ms']:9.3f} -> {v['last_ms']:9.3f} ms  {v['total_ms']:8.3f} ms in {v['calls']:5g} "
                  f"calls  {name}", flush=True)
    if a.first_request_profile is not None:
        n = a.first_request_profile
        ids = [random.Random(17 + r).randrange(100, 40000) for r in range(n)]
        host_trace(lambda: gen(ids, 1))  # the profiler's own first use (CUPTI's start) is in neither request below
        gen(ids, 2)  # as before the timed runs' first request
        walls, lines = [], []

        def timed_request():  # its wall time under the profiler, without the profile's processing
            t = time.perf_counter()
            gen(ids, 1)
            walls.append(round(time.perf_counter() - t, 4))

        for before in (None, 1 + a.decode_tokens):  # the second after a longer request, as the timed runs' second
            if before is not None:
                gen(ids, before)
            time.sleep(a.idle_before)  # outside the profile
            lines.append(host_breakdown(*host_trace(timed_request), top=None))
        fp = dict(n=n, wall_s=walls, first=lines[0], second=lines[1], diff=timeline_diff(lines[0], lines[1]))
        summary["first_request_profile"] = fp
        d = fp["diff"]
        print(f"FIRSTREQ n={n} profiled requests {walls[0]} / {walls[1]} s; first minus second: host "
              f"{d.get('host_us_diff')} us, GPU busy {d.get('gpu_busy_us_diff')} us, idle {d.get('gpu_idle_us_diff')} "
              f"us, last GPU end {d.get('last_gpu_us_diff')} us", flush=True)
        for name, c1, c2, us in d["gpu_kernels"]:
            print(f"FIRSTKERN {us:9.1f} us {c1:6d} / {c2:6d} calls  {name[:110]}", flush=True)
        for name, c1, c2, us in d["ops"]:
            print(f"FIRSTHOST {us:9.1f} us {c1:6d} / {c2:6d} calls  {name[:110]}", flush=True)
    print("SUM", json.dumps(summary), flush=True)
    with open(a.out, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()
