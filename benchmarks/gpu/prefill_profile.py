"""One long prompt's chunked prefill through CAB's per-layer path, phase by phase and kernel by kernel, to see
where the prefill's CAB time goes (no vLLM needed).

    python benchmarks/gpu/prefill_profile.py [--n 131072] [--chunk 16384] [--sparsities 0.95,0.99] [--top 25]
        [--tile-rows 16,32,64] [--key-tile 32,64] [--key-split 128,256] [--pool-warps 2,4,8]
        [--pool-bounds-warps 2,4,8] [--logits-warps 4,8] [--logits-stages 2,3] [--select-warps 4,8]
        [--fa-streams 1,2] [--exact-two-passes] [--fa-prefill 0|1] [--block-size 64,128] [--page 16] [--baselines]

Llama-3.1-8B attention geometry (32/8 heads, head dim 128, bf16), a paged cache (16-token pages, --page) holding
the prompt's keys and values, one layer. Each chunk runs what the backend runs for a prefill row with a key-summary slot
(attention.attend): pool the chunk's key blocks into the kept summaries (update_key_summaries), estimate and select
(prefill_selection; in the chunk holding the prompt's end the exact last rows read every key in place from the paged
cache, ops.blocks.PagedKeys, or from a gathered copy on the unfused path), sparse attention on the selection
(run_prefill: vLLM's FlashAttention over the kept pages, the engine's default on Hopper, or CAB's Triton kernel with
--fa-prefill 0; the first needs vLLM installed). Prints each phase's GPU time per chunk
and summed over the prompt (CUDA events; a first pass compiles and is not timed), the host syncs of each phase
(each one drains the GPU's queue; torch.cuda.set_sync_debug_mode), then the kernels by GPU time
(torch.profiler, one more pass). The engine benchmark's phase times are these summed over the model's layers
(engine_bench.py, per_prompt_s). Also the causal FLOPs the selection keeps and the sparse attention's TFLOP/s
against the floor (those FLOPs at PEAK_TFLOPS), and the bytes its tiles read if none shares keys through L2
(kept_bytes) against the card's DRAM bandwidth. --baselines: the same layer dense on the same machine, the same
inputs: vLLM's FlashAttention over the paged cache in the same chunks (what FLASH_ATTN runs in the engine) and in
one launch, FlashAttention-2 (SDPA's flash backend) and cuDNN (SDPA's cudnn backend) on contiguous copies.
"""

from __future__ import annotations

import argparse
import itertools
import math
from collections import defaultdict

import torch

from cab_vllm.backend.attention import (KeySummaries, device_ints, prefill_selection, run_prefill,
                                        update_key_summaries)
from cab_vllm.config import CABConfig
from cab_vllm.ops.blocks import PagedKeys
from cab_vllm.policies import scores_chunk_end

PHASES = ("update_key_summaries", "prefill_selection", "run_prefill")
# launch settings main() sweeps (each a comma list; every combination): option, module of cab_vllm.ops, its constant,
# which run reads it ("fused": the fused predictor, --fused-select 1; "triton": CAB's Triton kernels, --impl triton;
# "fa": vLLM's FlashAttention prefill, --impl triton with --fa-prefill 1), what it is
SWEEP = (
    ("tile-rows", "fused_select", "TILE_ROWS", "fused", "(query block, head) rows per logits program"),
    ("key-tile", "fused_select", "KEY_TILE", "fused", "key blocks per step of a logits program's loop, powers of two"),
    ("key-split", "fused_select", "KEY_SPLIT", "fused", "key blocks per program of the logits launch"),
    ("pool-warps", "coarsen", "POOL_WARPS", "triton",
     "warps per program of the pooling kernel (queries' features, keys' summaries)"),
    ("pool-bounds-warps", "coarsen", "POOL_BOUNDS_WARPS", "triton",
     "warps per pooling program of the bounds' minima and maxima (the keys' summaries)"),
    ("logits-warps", "fused_select", "LOGITS_WARPS", "fused", "warps per logits program"),
    ("logits-stages", "fused_select", "LOGITS_STAGES", "fused", "key tiles in flight per logits program"),
    ("select-warps", "fused_select", "SELECT_WARPS", "fused", "warps per selection program"),
    ("fa-streams", "fa_prefill", "FA_STREAMS", "fa",
     "CUDA streams the KV heads' FlashAttention launches take turns on (with --fa-prefill 1)"),
)
PEAK_TFLOPS = 989.0  # dense bf16 tensor-core peak of an H100 / H200 SXM (no sparsity), for the floor


class Timer:
    """GPU time per (phase, chunk) from CUDA event pairs (wall time on the CPU), read once at the end."""

    def __init__(self, dev: torch.device) -> None:
        self.cuda = dev.type == "cuda"
        self.marks: list = []

    def __call__(self, phase: str, chunk: int, fn):
        import time

        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            self.marks.append((phase, chunk, start, end))
        else:
            t = time.perf_counter()
            out = fn()
            self.marks.append((phase, chunk, t, time.perf_counter()))
        return out

    def ms(self) -> dict:
        if self.cuda:
            torch.cuda.synchronize()
        out: dict = defaultdict(float)
        for phase, chunk, a, b in self.marks:
            out[(phase, chunk)] += a.elapsed_time(b) if self.cuda else (b - a) * 1e3
        return out


def prompt_pass(q, kc, vc, bt, n: int, chunk: int, cfg: CABConfig, store: KeySummaries, impl: str, timer=None,
                label=None, sel_impl: str | None = None, fused: bool = False, fa=None, kept: list | None = None):
    """Every chunk of one n-token prompt, as attention.attend runs a prefill row with a summary slot; each phase
    timed by ``timer`` or labelled for torch.profiler by ``label`` (record_function). sel_impl: the selection's
    implementation (default: attend's choice for this device); fused: the fused predictor
    (KernelOptions.fused_select); fa: run_prefill's (varlen, version) of vLLM's FlashAttention, or None; kept: a
    list that gets each chunk's (selection counts [R, Hkv], first query block, chunk start, chunk end)."""
    dev = q.device
    bs = cfg.block_size
    if sel_impl is None:  # as attend picks it (the selection's Triton kernels on CUDA only)
        sel_impl = "triton" if impl == "triton" and dev.type == "cuda" else "torch"
    out = torch.empty_like(q)
    scale = 1.0 / math.sqrt(q.shape[-1])
    def labelled(phase, c, fn):
        with label(phase):
            return fn()

    run = timer or (labelled if label else (lambda phase, c, fn: fn()))
    for c, a in enumerate(range(0, n, chunk)):
        b = min(n, a + chunk)
        final = b == n
        summary = run("update_key_summaries", c, lambda: update_key_summaries(store, 0, a // bs, kc, bt[0], b, bs,
                                                                              sel_impl))
        k_all = PagedKeys(kc, bt[:1], b) if scores_chunk_end(cfg, final) else None
        sel = run("prefill_selection", c, lambda: prefill_selection(q[a:b].transpose(0, 1), k_all, cfg,
                                                                    impl=sel_impl, summary=summary, n=b,
                                                                    exact=final, fused=fused))
        if kept is not None:
            kept.append((sel[1], sel[2], a, b))
        qsl = device_ints([0, b - a], dev, torch.int32)  # as attend builds them: no stream sync
        sl = device_ints([b], dev, torch.int32)
        run("run_prefill", c, lambda: run_prefill(q[a:b], kc, vc, bt[:1], qsl, sl, [sel], bs, scale, out[a:b],
                                                  impl, fa=fa))
    return out


def _tiles(kept: list, block_size: int):
    """Each query block of the selections ``kept`` ((counts [R, Hkv], first block, chunk start, chunk end) per
    chunk): (its kept blocks per KV head as float64 [Hkv], the query block, its first row, one past its last row)."""
    for cnt, first, a, b in kept:
        cnt = cnt.double().cpu()  # [R, Hkv]
        for r in range(cnt.shape[0]):
            qb = first + r
            yield cnt[r], qb, max(qb * block_size, a), min((qb + 1) * block_size, b)


def kept_flops(kept: list, hq: int, d: int, block_size: int) -> tuple[float, float]:
    """(FLOPs, causal FLOPs) of the sparse attention over one prompt's chunks: each query block's rows against its
    kept full blocks and its own block's keys up to each row (4 * d per (row, key, head): QK^T and PV), and the
    same for every causal key (dense)."""
    flops = dense = 0.0
    for cnt, qb, lo, hi in _tiles(kept, block_size):
        g = hq // cnt.numel()
        own = sum(p - qb * block_size + 1 for p in range(lo, hi))  # own-block keys each row sees
        flops += g * 4 * d * float(((cnt - 1) * block_size * (hi - lo) + own).sum())
        dense += hq * 4 * d * sum(p + 1 for p in range(lo, hi))
    return flops, dense


def kept_bytes(kept: list, hq: int, d: int, block_size: int, elem: int = 2) -> float:
    """Bytes the sparse attention moves if each (query block, KV head) tile reads its kept keys and values itself
    (no reuse between tiles through L2: the tiles' own traffic, which L2 hits can only lower): its kept full blocks'
    and its own block's keys up to its last row, K and V, plus its rows' queries and outputs for the group's heads;
    elem bytes per value."""
    total = 0.0
    for cnt, qb, lo, hi in _tiles(kept, block_size):
        keys = (cnt - 1) * block_size + (hi - qb * block_size)  # per KV head
        total += elem * d * float(2 * keys.sum() + 2 * hq * (hi - lo))  # hq = the group's heads x the KV heads
    return total


def peak_tbps(name: str) -> float:
    """The card's DRAM bandwidth in TB/s for the bytes' floor: H200 4.8, H100 SXM 3.35 (others: the H100's)."""
    return 4.8 if "H200" in name else 3.35


def dense_baselines(q, kc, vc, bt, n: int, chunk: int, fa, reps: int = 3) -> dict:
    """ms of the dense causal layer, medians of reps: vLLM's FlashAttention over the paged cache in chunks and in
    one launch, SDPA's flash (FlashAttention-2) and cudnn backends on contiguous [1, Hq, n, D] copies (keys and
    values repeated to every query head)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = q.device
    scale = 1.0 / math.sqrt(q.shape[-1])
    out = torch.empty_like(q)

    def timed(fn) -> float:
        fn()  # compile / warm
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return round(sorted(times)[len(times) // 2], 3)

    def fa_chunks(step: int):
        spans = [(a, min(n, a + step)) for a in range(0, n, step)]
        lens = [(device_ints([0, b - a], dev, torch.int32), device_ints([b], dev, torch.int32)) for a, b in spans]

        def run():
            for (a, b), (qsl, used) in zip(spans, lens):
                fa[0](q=q[a:b], k=kc, v=vc, max_seqlen_q=b - a, cu_seqlens_q=qsl, max_seqlen_k=b, seqused_k=used,
                      softmax_scale=scale, causal=True, block_table=bt, out=out[a:b], fa_version=fa[1])
        return run

    res = {}
    if fa is not None:
        res[f"FlashAttention-{fa[1]} paged, {chunk}-token chunks"] = timed(fa_chunks(chunk))
        res[f"FlashAttention-{fa[1]} paged, one launch"] = timed(fa_chunks(n))
    g = q.shape[1] // kc.shape[2]
    pages = bt[0, : math.ceil(n / kc.shape[1])].long()
    qt = q.transpose(0, 1)[None]
    kt = kc[pages].flatten(0, 1)[:n].repeat_interleave(g, 1).transpose(0, 1)[None].contiguous()
    vt = vc[pages].flatten(0, 1)[:n].repeat_interleave(g, 1).transpose(0, 1)[None].contiguous()
    for name, backend in (("FlashAttention-2 (SDPA flash)", SDPBackend.FLASH_ATTENTION),
                          ("cuDNN (SDPA cudnn)", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                res[name] = timed(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt,
                                                                                            is_causal=True))
        except RuntimeError as e:  # a backend this build or card lacks
            res[name] = f"unavailable: {str(e).splitlines()[0][:120]}"
    return res


def count_syncs(pass_fn) -> dict:
    """{phase: stream synchronizations} in one pass_fn(run) (torch.cuda.set_sync_debug_mode's warnings)."""
    import warnings

    counts: dict = defaultdict(int)

    def run(phase, c, fn):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = fn()
        counts[phase] += sum("synchroniz" in str(w.message) for w in caught)
        return out

    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        pass_fn(run)
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    return {p: counts.get(p, 0) for p in PHASES}


def setup(n: int, hq: int, hkv: int, d: int, page: int, dev: str, dtype, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pages = math.ceil(n / page)
    kc = torch.randn(pages + 1, page, hkv, d, generator=gen).to(dev, dtype)
    vc = torch.randn(pages + 1, page, hkv, d, generator=gen).to(dev, dtype)
    bt = (1 + torch.randperm(pages, generator=gen)).to(torch.int32).view(1, pages).to(dev)  # scattered pages
    q = torch.randn(n, hq, d, generator=gen).to(dev, dtype)
    return q, kc, vc, bt


def profile(n: int, chunk: int, sparsity: float, policy: str = "cab", estimator: str = "bounds", dev: str = "cuda",
            impl: str = "triton", hq: int = 32, hkv: int = 8, d: int = 128, page: int = 16, top: int = 25,
            kernels: bool = True, fused: bool = False, fa_prefill: bool = False, block_size: int = 64,
            baselines: bool = False) -> dict:
    if n < 1 or chunk < 1:
        raise ValueError(f"n={n} and chunk={chunk} must be >= 1")
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    cfg = CABConfig(sparsity=sparsity, policy=policy, estimator=estimator, block_size=block_size)
    if page < 1 or (fa_prefill and cfg.block_size % page):
        raise ValueError(f"page={page} must be >= 1 and, for FlashAttention's sparse prefill, divide the block size "
                         f"{cfg.block_size}")
    if chunk % cfg.block_size:
        raise ValueError(f"chunk={chunk} must be a multiple of the block size {cfg.block_size}")
    fa = None
    if fa_prefill:
        try:
            from vllm.vllm_flash_attn import flash_attn_varlen_func
        except ImportError as e:
            raise SystemExit(f"--fa-prefill 1 needs vLLM's FlashAttention ({e}); --fa-prefill 0 runs CAB's Triton "
                             f"kernel") from None
        fa = (flash_attn_varlen_func, 3 if torch.cuda.get_device_capability()[0] == 9 else 2)
    q, kc, vc, bt = setup(n, hq, hkv, d, page, dev, dtype)
    store = KeySummaries(1, hkv, math.ceil(n / cfg.block_size), d, cfg.estimator, dtype, torch.device(dev))
    kept: list = []
    prompt_pass(q, kc, vc, bt, n, chunk, cfg, store, impl, fused=fused, fa=fa, kept=kept)  # compiles what it needs
    timer = Timer(torch.device(dev))
    prompt_pass(q, kc, vc, bt, n, chunk, cfg, store, impl, timer, fused=fused, fa=fa)
    ms = timer.ms()
    chunks = math.ceil(n / chunk)
    res = {"n": n, "chunk": chunk, "sparsity": sparsity, "policy": policy, "estimator": estimator,
           "per_chunk_ms": {p: [round(ms.get((p, c), 0.0), 3) for c in range(chunks)] for p in PHASES},
           "total_ms": {p: round(sum(ms.get((p, c), 0.0) for c in range(chunks)), 3) for p in PHASES}}
    flops, dense = kept_flops(kept, hq, d, cfg.block_size)
    res["kept_flops"], res["density"] = flops, flops / dense
    res["kept_bytes"] = kept_bytes(kept, hq, d, cfg.block_size, q.element_size())
    if dev == "cuda":  # host syncs per phase: each drains the GPU's queue in the middle of a layer
        res["syncs"] = count_syncs(lambda run: prompt_pass(q, kc, vc, bt, n, chunk, cfg, store, impl, run,
                                                                   fused=fused, fa=fa))
    if kernels:
        from torch.profiler import ProfilerActivity, profile as tprofile, record_function

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
        with tprofile(activities=acts) as prof:
            prompt_pass(q, kc, vc, bt, n, chunk, cfg, store, impl, label=record_function, fused=fused, fa=fa)
        if dev == "cuda":
            torch.cuda.synchronize()
        key = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
        try:
            res["kernels"] = prof.key_averages().table(sort_by=key, row_limit=top)
        except (AttributeError, KeyError, ValueError):  # newer torch names it device time
            res["kernels"] = prof.key_averages().table(sort_by="self_device_time_total", row_limit=top)
    if baselines and dev == "cuda":  # last: seconds of dense attention leave the card hotter (slower clocks)
        res["baselines_ms"] = dense_baselines(q, kc, vc, bt, n, chunk, fa)
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=131072, help="prompt tokens")
    ap.add_argument("--chunk", type=int, default=16384, help="tokens per engine step (vLLM's chunk)")
    ap.add_argument("--sparsities", default="0.95,0.99")
    ap.add_argument("--policy", default="cab")
    ap.add_argument("--estimator", default="bounds")
    ap.add_argument("--top", type=int, default=25, help="kernels listed (by GPU time)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--impl", default="triton", choices=["triton", "torch"])
    ap.add_argument("--heads", default="32,8,128", help="query heads, KV heads, head dim")
    ap.add_argument("--no-kernels", action="store_true", help="phase times only (no torch.profiler pass)")
    ap.add_argument("--fused-select", choices=["0", "1"], default="1",
                    help="estimate, then a top-k per row, no [M, M] estimate (the engine's default, CAB_FUSED_SELECT=1)")
    for opt, mod, const, reader, text in SWEEP:
        need = "with --fused-select 1: " if reader == "fused" else ""
        ap.add_argument(f"--{opt}", default=None, help=f"{need}{text}, comma list (ops.{mod}.{const})")
    ap.add_argument("--fa-prefill", choices=["0", "1"], default=None,
                    help="1: the sparse attention in vLLM's FlashAttention over the kept pages (the engine's default "
                         "on Hopper, CAB_FA_PREFILL; the default here on CUDA); 0: CAB's Triton kernel")
    ap.add_argument("--block-size", default="64",
                    help="CAB's query/key block, tokens, comma list (CABConfig.block_size)")
    ap.add_argument("--page", type=int, default=16, help="the paged cache's page, tokens (vLLM's --block-size)")
    ap.add_argument("--baselines", action="store_true",
                    help="also time the dense layer: vLLM's FlashAttention (chunked and one launch), FlashAttention-2 "
                         "and cuDNN through SDPA")
    ap.add_argument("--exact-two-passes", action="store_true",
                    help="the exact rows read the keys twice (ops.coarsen.SAMPLED_ONE_PASS_BYTES = 0), as before the "
                         "one-pass kernel")
    a = ap.parse_args(argv)
    hq, hkv, d = (int(x) for x in a.heads.split(","))
    fa_prefill = (a.fa_prefill or ("1" if a.device == "cuda" else "0")) == "1"
    from cab_vllm.ops import coarsen

    if a.exact_two_passes:
        coarsen.SAMPLED_ONE_PASS_BYTES = 0
    from cab_vllm.ops import fa_prefill as fap
    from cab_vllm.ops import fused_select as fs

    mods = {"fused_select": fs, "coarsen": coarsen, "fa_prefill": fap}
    lists = [[int(x) for x in v.split(",")] if (v := getattr(a, opt.replace("-", "_"))) else [getattr(mods[mod], c)]
             for opt, mod, c, _, _ in SWEEP]
    blocks = [int(x) for x in a.block_size.split(",")]
    for values, bsz, sp in ((v, b, float(x)) for v in itertools.product(*lists) for b in blocks
                            for x in a.sparsities.split(",")):
        opts = ""
        reads = {"fused": a.fused_select == "1", "triton": a.impl == "triton",
                 "fa": a.impl == "triton" and fa_prefill}  # which settings this run reads
        for (opt, mod, const, reader, _), v in zip(SWEEP, values):
            setattr(mods[mod], const, v)
            if reads[reader]:
                opts += f" {opt.replace('-', '_')}={v}"
        r = profile(a.n, a.chunk, sp, a.policy, a.estimator, a.device, a.impl, hq, hkv, d, top=a.top,
                    kernels=not a.no_kernels, fused=a.fused_select == "1", fa_prefill=fa_prefill, page=a.page,
                    block_size=bsz, baselines=a.baselines)
        opts += " exact_two_passes" if a.exact_two_passes else ""
        opts += f" prefill={'flash_attention' if fa_prefill else 'triton'}"
        print(f"== n={r['n']} chunk={r['chunk']} block={bsz} page={a.page} sparsity={sp} policy={r['policy']} "
              f"estimator={r['estimator']}"
              f"{opts} (one layer, ms)")
        for p in PHASES:
            print(f"{p:22} total {r['total_ms'][p]:9.3f}  per chunk {r['per_chunk_ms'][p]}")
        att, cab = r["total_ms"]["run_prefill"], sum(r["total_ms"].values())
        floor = r["kept_flops"] / PEAK_TFLOPS / 1e9
        print(f"sparse attention: {r['kept_flops'] / 1e12:.3f} TFLOP kept (density {r['density']:.4f} of the causal "
              f"FLOPs), {r['kept_flops'] / att / 1e9:.0f} TFLOP/s; floor at {PEAK_TFLOPS:.0f} TFLOP/s {floor:.3f} ms "
              f"= {100 * floor / att:.0f}% of its time")
        if a.device == "cuda":
            bw = peak_tbps(torch.cuda.get_device_name())
            bfloor = r["kept_bytes"] / bw / 1e9
            print(f"sparse attention: {r['kept_bytes'] / 1e9:.2f} GB if each tile reads its kept keys and values "
                  f"(no reuse through L2), {r['kept_bytes'] / att / 1e9:.2f} TB/s; at {bw} TB/s {bfloor:.3f} ms = "
                  f"{100 * bfloor / att:.0f}% of its time")
        for name, t in r.get("baselines_ms", {}).items():
            ratio = f"  CAB's three phases ({cab:.3f} ms) {t / cab:.1f}x lower" if isinstance(t, float) else ""
            print(f"dense {name:42} {t if isinstance(t, str) else f'{t:9.3f} ms'}{ratio}")
        if "syncs" in r:
            print("host syncs in one pass (drain the GPU's queue):", r["syncs"])
        if "kernels" in r:
            print(r["kernels"])


if __name__ == "__main__":
    main()
