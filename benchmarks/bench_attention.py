"""Prefill and decode timing of CAB against dense baselines, all in one run on one GPU.

Prefill (B=1, Hq=32, Hkv=8, D=128, bf16, causal): FA2 (SDPA flash), cuDNN SDPA, dense Flex; the CAB
predictor (select_blocks, default cab policy); CAB attention at 90/95/98/99% sparsity through our Triton
kernel and through FlexAttention, alone and with the predictor. Decode at 128k, batch 1 and 8, over a
paged cache (page 16): our kernel on all blocks (dense) and on a bounds selection, against SDPA.
Writes JSON (--out) and prints a table last. Usage:
    python benchmarks/bench_attention.py --lengths 16384 32768 65536 131072 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import triton.testing

import cab_vllm
from cab_vllm.ops.coarsen import pool
from cab_vllm.ops.decode import paged_sparse_decode
from cab_vllm.ops.flex import build_block_mask, flex_sparse_attention
from cab_vllm.policies import select_decode_blocks
from torch.nn.attention import SDPBackend, sdpa_kernel

F = torch.nn.functional


def bench(fn, rep_ms: float = 300.0) -> float:
    return float(triton.testing.do_bench(fn, warmup=50, rep=rep_ms, return_mode="median"))


def causal_flops(n: int, hq: int, d: int, density: float = 1.0) -> float:
    return 4.0 * hq * d * n * n / 2 * density


def prefill_rows(n: int, hq: int, hkv: int, d: int, sparsities, rows: list[dict]) -> None:
    dt, dev = torch.bfloat16, "cuda"
    q = torch.randn(1, hq, n, d, device=dev, dtype=dt)
    k = torch.randn(1, hkv, n, d, device=dev, dtype=dt)
    v = torch.randn(1, hkv, n, d, device=dev, dtype=dt)
    kx, vx = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)

    def add(name, ms, density=1.0, **kw):
        tf = causal_flops(n, hq, d, density) / (ms * 1e-3) / 1e12
        rows.append(dict(kind="prefill", n=n, name=name, ms=ms, tflops=tf, **kw))
        print(f"  N={n:>6} {name:<28} {ms:9.3f} ms  {tf:7.1f} TFLOP/s", flush=True)

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        fa2 = bench(lambda: F.scaled_dot_product_attention(q, kx, vx, is_causal=True))
    add("fa2_sdpa", fa2)
    try:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            add("cudnn_sdpa", bench(lambda: F.scaled_dot_product_attention(q, kx, vx, is_causal=True)))
    except RuntimeError as e:
        print("  cudnn unavailable:", str(e)[:120])
    dense_sel = cab_vllm.select_blocks(q, k, cab_vllm.CABConfig(policy="dense"))
    dmask = build_block_mask(dense_sel.indices, dense_sel.counts, 64, n, hq)
    add("flex_dense", bench(lambda: flex_sparse_attention(q, k, v, None, None, 64, block_mask=dmask)))
    add("triton_dense", bench(lambda: cab_vllm.sparse_attention(q, k, v, dense_sel)))
    del dense_sel, dmask
    for s in sparsities:
        cfg = cab_vllm.CABConfig(sparsity=s)
        pred = bench(lambda: cab_vllm.select_blocks(q, k, cfg))
        sel = cab_vllm.select_blocks(q, k, cfg)
        dens = sel.density()
        add(f"cab_predictor@{s}", pred, 0.0, sparsity=s)
        tri = bench(lambda: cab_vllm.sparse_attention(q, k, v, sel))
        mask_ms = bench(lambda: build_block_mask(sel.indices, sel.counts, 64, n, hq))
        bm = build_block_mask(sel.indices, sel.counts, 64, n, hq)
        flx = bench(lambda: flex_sparse_attention(q, k, v, None, None, 64, block_mask=bm))
        add(f"cab_triton@{s}", tri, dens, sparsity=s, speedup_vs_fa2=fa2 / tri)
        add(f"cab_triton+pred@{s}", tri + pred, dens, sparsity=s, speedup_vs_fa2=fa2 / (tri + pred))
        add(f"cab_flex@{s}", flx, dens, sparsity=s, speedup_vs_fa2=fa2 / flx)
        add(f"cab_flex+pred+mask@{s}", flx + pred + mask_ms, dens, sparsity=s,
            speedup_vs_fa2=fa2 / (flx + pred + mask_ms))
        del sel, bm
    torch.cuda.empty_cache()


def decode_rows(n: int, batch: int, hq: int, hkv: int, d: int, sparsities, rows: list[dict]) -> None:
    dt, dev, page, bs = torch.bfloat16, "cuda", 16, 64
    per = n // page
    kc = torch.randn(batch * per + 1, page, hkv, d, device=dev, dtype=dt)
    vc = torch.randn_like(kc)
    bt = (torch.randperm(batch * per, device=dev) + 1).view(batch, per).to(torch.int32)
    sl = torch.full((batch,), n, dtype=torch.int32, device=dev)
    q = torch.randn(batch, hq, d, device=dev, dtype=dt)
    m = n // bs
    kv_bytes = 2 * batch * n * hkv * d * 2

    def add(name, ms, **kw):
        gbs = kw.pop("bytes", kv_bytes) / (ms * 1e-3) / 1e9
        rows.append(dict(kind="decode", n=n, batch=batch, name=name, ms=ms, gbps=gbs, **kw))
        print(f"  decode N={n} B={batch} {name:<26} {ms:8.4f} ms  {gbs:7.0f} GB/s", flush=True)

    # SDPA baseline on a contiguous copy of the cache, one query token
    kx = kc[bt.long()].reshape(batch, n, hkv, d).transpose(1, 2).contiguous()
    vx = vc[bt.long()].reshape(batch, n, hkv, d).transpose(1, 2).contiguous()
    try:
        base = bench(lambda: F.scaled_dot_product_attention(q[:, :, None], kx, vx, enable_gqa=True))
        add("sdpa_contiguous", base)
    except RuntimeError as e:
        print("  sdpa decode failed:", str(e)[:160])
        base = float("nan")
    del kx, vx
    idx = torch.arange(m, dtype=torch.int32, device=dev).expand(batch, hkv, m).contiguous()
    cnt = torch.full((batch, hkv), m, dtype=torch.int32, device=dev)
    dense = bench(lambda: paged_sparse_decode(q, kc, vc, bt, sl, idx, cnt, bs))
    add("triton_dense_paged", dense)
    # per-block key bounds (cached by the backend as blocks fill): pool once, outside the timed step
    kd = kc[bt.long()].reshape(batch, n, hkv, d).transpose(1, 2)
    bounds = pool(kd.contiguous(), bs, bounds=True)
    del kd
    for s in sparsities:
        cfg = cab_vllm.CABConfig(sparsity=s)
        sel_ms = bench(lambda: select_decode_blocks(q, bounds["lo"], bounds["hi"], sl, cfg))
        di, dc = select_decode_blocks(q, bounds["lo"], bounds["hi"], sl, cfg)
        frac = float(dc.float().mean() / m)
        att = bench(lambda: paged_sparse_decode(q, kc, vc, bt, sl, di, dc, bs))
        add(f"cab_decode@{s}", att, sparsity=s, bytes=kv_bytes * frac, speedup_vs_dense=dense / att)
        add(f"cab_decode+select@{s}", att + sel_ms, sparsity=s, bytes=kv_bytes * frac,
            speedup_vs_dense=dense / (att + sel_ms))
    del kc, vc
    torch.cuda.empty_cache()


def predictor_stages(n: int, hq: int, hkv: int, d: int, rows: list[dict]) -> None:
    """Where the default predictor's time goes (one 95%-sparsity selection)."""
    from cab_vllm.ops.coarsen import block_logits, estimate_grouped, sampled_block_attention
    from cab_vllm.policies import select_from_attention

    cfg = cab_vllm.CABConfig(sparsity=0.95)
    q = torch.randn(1, hq, n, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16)
    amax, amean = estimate_grouped(q, k, 64, cfg.estimator)
    m = amax.shape[-1]
    stages = {
        "pool+logits": lambda: block_logits(q, k, 64, cfg.estimator),
        "pool+logits+softmax+group": lambda: estimate_grouped(q, k, 64, cfg.estimator),
        "exact_last_rows": lambda: sampled_block_attention(q, k, 64, cfg.exact_rows,
                                                           torch.tensor([m - 1], device="cuda")),
        "select": lambda: select_from_attention(amax, amean, cfg),
        "total (select_blocks)": lambda: cab_vllm.select_blocks(q, k, cfg),
    }
    for name, fn in stages.items():
        ms = bench(fn)
        rows.append(dict(kind="predictor_stage", n=n, name=name, ms=ms))
        print(f"  predictor stage N={n} {name:<26} {ms:8.3f} ms", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.98, 0.99])
    ap.add_argument("--decode-batches", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--decode-len", type=int, default=131072)
    ap.add_argument("--out", default="bench_attention.json")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    hq, hkv, d = 32, 8, 128
    rows: list[dict] = []
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=time.strftime("%Y-%m-%d"), hq=hq, hkv=hkv, d=d, dtype="bf16", cab_config=repr(cab_vllm.CABConfig()))
    print(meta, flush=True)
    predictor_stages(max(a.lengths), hq, hkv, d, rows)
    for n in a.lengths:
        prefill_rows(n, hq, hkv, d, a.sparsities, rows)
    for b in a.decode_batches:
        decode_rows(a.decode_len, b, hq, hkv, d, [0.95, 0.99], rows)
    with open(a.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print("\n| kind | N | batch | name | ms | TFLOP/s or GB/s | speedup |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        perf = r.get("tflops", r.get("gbps", 0.0))
        if r["kind"] == "predictor_stage":
            continue
        sp = r.get("speedup_vs_fa2", r.get("speedup_vs_dense", ""))
        sp = f"{sp:.1f}x" if sp != "" else ""
        print(f"| {r['kind']} | {r['n']} | {r.get('batch', 1)} | {r['name']} | {r['ms']:.3f} | {perf:.0f} | {sp} |")


if __name__ == "__main__":
    main()
