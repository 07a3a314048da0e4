"""Sparse prefill through vLLM's FlashAttention-3: each (query block, KV head) as a sequence over a page table that
lists only its kept key blocks' pages, against CAB's Triton kernel on the same selection.

    python benchmarks/gpu/fa_prefill_profile.py [--n 131072] [--chunk 16384] [--sparsities 0.95,0.99] [--splits 1]
        [--block 64] [--page 16]

A question for the prefill path, timed before any engine code is written. CAB keeps key blocks per (query block, KV
head), ascending, the query's own block last. FlashAttention's paged varlen kernel with a query block's 64 tokens as
one sequence (its GQA group of query heads), the pages of its kept blocks as that sequence's page table and
bottom-right causal alignment computes exactly that block-sparse attention (the own block is the last in the table,
so query i sees the keys up to itself). Two ways to give every KV head a page table of its own over vLLM's NHD cache
[pages, page_size, Hkv, 2*D] (keys and values side by side in the last dim, as CAB's backend lays it out):
- heads: one launch per KV head over the head's strided view [pages, page_size, 1, D] (no copies);
- one: one launch over an overlapping view whose "page" p' = page * page_size * Hkv + head starts at that page's
  head (stride 2*D, rows Hkv*2*D apart), with the queries and outputs permuted to heads-first (two copies, timed).
Llama-3.1-8B attention geometry (32/8 heads, head dim 128, bf16), 16-token pages (--page) in a random order, random
selections with CAB's per-row budgets (sink and own block always kept). Times: triton.testing.do_bench medians (L2
flushed), summed over the prompt's chunks; TFLOP/s over the kept causal FLOPs. Errors against CAB's kernel.
"""

from __future__ import annotations

import argparse

import torch

HQ, HKV, D, PAGE, BS = 32, 8, 128, 16, 64
G = HQ // HKV


def selection(m: int, sparsity: float, gen: torch.Generator, dev: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ascending selections [m, Hkv, K] (-1 padded) with CAB's per-row budgets, sink and own block kept."""
    from cab_vllm.config import CABConfig

    keep = torch.as_tensor(CABConfig(sparsity=sparsity).keep_counts(m), device=dev).long().clamp(1)
    b = torch.arange(m, device=dev)
    keep = torch.minimum(keep, b + 1)
    kmax = int(keep.max())
    s = torch.rand(m, HKV, m, generator=gen).to(dev)
    s = torch.where(b[None, None, :] <= b[:, None, None], s, -1.0)
    s[:, :, 0] = 2.0
    s[b, :, b] = 3.0
    top = s.topk(kmax, dim=-1).indices  # [m, Hkv, kmax], the budget's blocks first
    cnt = keep[:, None].expand(m, HKV)
    pos = torch.arange(kmax, device=dev)
    top = torch.where(pos[None, None, :] < cnt[..., None], top, m + 1).sort(-1).values
    idx = torch.where(top <= m, top, -1).to(torch.int32)
    return idx.contiguous(), cnt.to(torch.int32).contiguous()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=131072)
    ap.add_argument("--chunk", type=int, default=16384, help="prompt tokens per launch (a multiple of 64)")
    ap.add_argument("--sparsities", default="0.95,0.99")
    ap.add_argument("--splits", default="0", help="FlashAttention num_splits of the per-head launches, comma list "
                                                  "(0: its own heuristic)")
    ap.add_argument("--block", type=int, default=BS, help="CAB's key block, tokens (a power of two >= 16)")
    ap.add_argument("--page", type=int, default=PAGE,
                    help="the cache's page, tokens (divides --block; FlashAttention-3 loads pages by TMA when they are "
                         "a multiple of its 128-key tile)")
    a = ap.parse_args()
    bs, page = a.block, a.page
    if bs < 16 or bs & (bs - 1) or page < 1 or bs % page:
        ap.error(f"--block {bs} must be a power of two >= 16 and a multiple of --page {page}")
    per_block = bs // page
    if a.n <= 0 or a.n % bs or a.chunk % bs or a.chunk <= 0:
        ap.error(f"--n and --chunk must be positive multiples of {bs}")
    if not torch.cuda.is_available():
        raise SystemExit("fa_prefill_profile.py needs a CUDA GPU")
    import triton.testing
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    from cab_vllm.ops.prefill import PrefillTiles, paged_sparse_prefill

    dev, dt, n = "cuda", torch.bfloat16, a.n
    scale = D ** -0.5
    m, pages = n // bs, n // page
    gen = torch.Generator().manual_seed(0)
    phys = torch.randn(pages, page, HKV, 2 * D, generator=gen).to(dev, dt)
    kc, vc = phys[..., :D], phys[..., D:]
    rows_per_page = page * HKV  # the overlapping view's "pages" per real page
    size1 = (pages - 1) * rows_per_page + HKV
    k1 = torch.as_strided(phys, (size1, page, 1, D), (2 * D, HKV * 2 * D, 2 * D, 1))
    v1 = torch.as_strided(phys, (size1, page, 1, D), (2 * D, HKV * 2 * D, 2 * D, 1), phys.storage_offset() + D)
    bt = torch.randperm(pages, generator=gen).to(dev, torch.int32)[None]
    q = torch.randn(n, HQ, D, generator=gen).to(dev, dt)
    qsl = torch.tensor([0, n], device=dev, dtype=torch.int32)
    sl = torch.tensor([n], device=dev, dtype=torch.int32)
    chunks = [(c0, min(c0 + a.chunk, n)) for c0 in range(0, n, a.chunk)]
    dense_flops = 4.0 * HQ * D * n * n / 2

    out_d = torch.empty_like(q)

    def dense() -> None:
        for c0, c1 in chunks:
            flash_attn_varlen_func(q=q[c0:c1], k=kc, v=vc, max_seqlen_q=c1 - c0,
                                   cu_seqlens_q=torch.tensor([0, c1 - c0], device=dev, dtype=torch.int32),
                                   max_seqlen_k=c1, seqused_k=torch.tensor([c1], device=dev, dtype=torch.int32),
                                   softmax_scale=scale, causal=True, block_table=bt, out=out_d[c0:c1], fa_version=3)

    ms = triton.testing.do_bench(dense, return_mode="median")
    print(f"n={n} chunk={a.chunk} block={bs} page={page} FA3 dense (paged, NHD): {ms:.3f} ms "
          f"{dense_flops / ms / 1e9:.0f} TFLOP/s", flush=True)
    for sp in (float(x) for x in a.sparsities.split(",")):
        idx, cnt = selection(m, sp, gen, dev)
        b = torch.arange(m, device=dev)
        used = ((cnt.long() - 1) * bs + torch.clamp(n - b * bs, max=bs)[:, None]).to(torch.int32)  # [m, Hkv]
        flops = float(4.0 * G * D * (bs * (cnt.long() - 1) * bs + bs * (bs + 1) / 2).sum())
        blk = idx.clamp(min=0).long()
        pg = bt[0][(blk[..., None] * per_block + torch.arange(per_block, device=dev)).clamp(max=pages - 1)]
        pg = pg.flatten(2)  # [m, Hkv, K * per_block] physical pages
        tab_h = [pg[:, h].contiguous() for h in range(HKV)]
        tab_1 = (pg.long() * rows_per_page + torch.arange(HKV, device=dev)[None, :, None]).to(torch.int32)
        tab_1 = tab_1.transpose(0, 1).contiguous()  # [Hkv, m, K * per_block]
        kmax_keys = int(used.max())
        out_c, out_h, out_1 = torch.empty_like(q), torch.empty_like(q), torch.empty_like(q)

        def cab() -> None:
            for c0, c1 in chunks:
                r0, r1 = c0 // bs, c1 // bs
                tiles = PrefillTiles(torch.zeros(r1 - r0, device=dev, dtype=torch.int32),
                                     torch.arange(r0, r1, device=dev, dtype=torch.int32), idx[r0:r1], cnt[r0:r1])
                paged_sparse_prefill(q[c0:c1], kc, vc, bt, torch.tensor([0, c1 - c0], device=dev, dtype=torch.int32),
                                     torch.tensor([c1], device=dev, dtype=torch.int32), tiles, bs, scale,
                                     out=out_c[c0:c1], impl="triton")

        cu = {c: torch.arange(0, c[1] - c[0] + 1, bs, device=dev, dtype=torch.int32) for c in chunks}

        def heads(ns: int = 0) -> None:
            for c0, c1 in chunks:
                r0, r1 = c0 // bs, c1 // bs
                for h in range(HKV):
                    hs = slice(h * G, (h + 1) * G)
                    flash_attn_varlen_func(q=q[c0:c1, hs], k=kc[:, :, h:h + 1], v=vc[:, :, h:h + 1], max_seqlen_q=bs,
                                           cu_seqlens_q=cu[c0, c1], max_seqlen_k=kmax_keys,
                                           seqused_k=used[r0:r1, h].contiguous(), softmax_scale=scale, causal=True,
                                           block_table=tab_h[h][r0:r1], out=out_h[c0:c1, hs], fa_version=3,
                                           num_splits=ns)

        cu1 = {c: torch.arange(0, HKV * (c[1] - c[0]) + 1, bs, device=dev, dtype=torch.int32) for c in chunks}
        used1 = used.t().contiguous()  # [Hkv, m]

        def one() -> None:
            for c0, c1 in chunks:
                r0, r1 = c0 // bs, c1 // bs
                t = c1 - c0
                qp = q[c0:c1].view(t, HKV, G, D).transpose(0, 1).reshape(HKV * t, G, D)
                op = torch.empty_like(qp)
                flash_attn_varlen_func(q=qp, k=k1, v=v1, max_seqlen_q=bs, cu_seqlens_q=cu1[c0, c1],
                                       max_seqlen_k=kmax_keys, seqused_k=used1[:, r0:r1].reshape(-1),
                                       softmax_scale=scale, causal=True,
                                       block_table=tab_1[:, r0:r1].reshape(HKV * (r1 - r0), -1), out=op, fa_version=3)
                out_1[c0:c1].view(t, HKV, G, D).copy_(op.view(HKV, t, G, D).transpose(0, 1))

        res = {}
        runs = [("cab", cab, out_c)] + [(f"fa_heads_splits{ns}", lambda ns=int(ns): heads(ns), out_h)
                                        for ns in a.splits.split(",")] + [("fa_one", one, out_1)]
        for name, fn, o in runs:
            try:
                fn()
                torch.cuda.synchronize()
                t = triton.testing.do_bench(fn, return_mode="median")
            except Exception as e:  # a layout FlashAttention refuses is reported, not fatal
                print(f"  s={sp} {name}: failed {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            res[name] = o
            err = "" if name == "cab" else (
                f" max_abs_err={float((o.float() - out_c.float()).abs().max()):.2e}"
                f" rel={float((o.float() - out_c.float()).norm() / out_c.float().norm()):.1e}")
            print(f"  s={sp} density={flops / dense_flops:.4f} {name}: {t:.3f} ms {flops / t / 1e9:.0f} TFLOP/s "
                  f"({ms / t:.1f}x FA3 dense){err}", flush=True)
        # a few (row, head) pairs against a float64 reference over the same kept keys
        for r, h in ((m - 1, 0), (m // 2, 3), (5, 7)):
            blocks = idx[r, h, : cnt[r, h]].long()
            tok = torch.cat([torch.arange(j * bs, min((j + 1) * bs, n), device=dev) for j in blocks.tolist()])
            phys_p, off = bt[0][tok // page].long(), tok % page
            kk = kc[phys_p, off, h].double()
            vv = vc[phys_p, off, h].double()
            qq = q[r * bs:(r + 1) * bs, h * G:(h + 1) * G].double()  # [bs, G, D]
            s = torch.einsum("tgd,kd->gtk", qq, kk) * scale
            qpos = torch.arange(r * bs, (r + 1) * bs, device=dev)
            s = s.masked_fill(tok[None, None, :] > qpos[None, :, None], float("-inf"))
            ref = torch.einsum("gtk,kd->tgd", s.softmax(-1), vv)
            rows = slice(r * bs, (r + 1) * bs)
            errs = " ".join(f"{name}={float((o[rows, h * G:(h + 1) * G].double() - ref).abs().max()):.1e}"
                            for name, o in res.items())
            print(f"    row {r} head {h} ({int(cnt[r, h])} blocks) max abs err vs float64: {errs}", flush=True)


if __name__ == "__main__":
    main()
