"""Sparse decode through vLLM's FlashAttention: each (row, KV head) as a sequence of its own over a gathered page table.

    python benchmarks/gpu/fa_gather_profile.py [--lens 131072,32768,4096] [--rows 1,8] [--sparsity 0.95]
        [--splits 0,8,16,32] [--fa-versions 3,2]

A question for the decode path, timed before any engine code is written: CAB's decode selection keeps key blocks per
(row, KV head); if the KV cache is laid out heads-before-tokens within a page (vLLM's HND order), a page of one KV
head is a contiguous [page_size, head_dim] tile, so the cache viewed as [pages * Hkv, page_size, 1, D] gives every
(page, head) an index of its own. A (row, KV head) pair is then a sequence of one query token (its GQA group of
query heads) over a page table listing only the pages of its kept blocks, and FlashAttention's paged varlen kernel
does the sparse attention: dense rows and sparse rows in one launch.

Llama-3.1-8B attention geometry (32/8 heads, head dim 128, bf16), 16-token pages, one layer, in a CUDA graph with
L2 flushed between calls (decode_profile.py's timer). Columns (us per layer): gathered: the kept blocks of every
(row, head) through FlashAttention as above; dense_hnd: every block the same way (the virtual layout's cost for a
dense row); dense: FlashAttention as vLLM runs it (NHD cache, all 32/8 heads per row, every block); empty: that launch
with every row's sequence length 0 (what a CUDA graph of CAB's decode step pays for FlashAttention when every row is
CAB's). Each gathered output is checked against a PyTorch reference over the same kept blocks (max abs error).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import pathlib

import torch

HQ, HKV, D, PAGE, BS = 32, 8, 128, 16, 64
PER_BLOCK = BS // PAGE


def _decode_profile():
    """decode_profile.py beside this file: its CUDA-graph timer (L2 flushed) and its prompt selections."""
    spec = importlib.util.spec_from_file_location("decode_profile", pathlib.Path(__file__).with_name(
        "decode_profile.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod._FLUSH = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lens", default="131072,32768,4096")
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--sparsity", type=float, default=0.95)
    ap.add_argument("--splits", default="0,8,16,32", help="FlashAttention num_splits (0: its own heuristic)")
    ap.add_argument("--fa-versions", default="3,2", help="FlashAttention versions to time (vLLM's fa_version)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("fa_gather_profile.py needs a CUDA GPU")
    if not 0.0 <= a.sparsity < 1.0:
        ap.error("--sparsity must be in [0, 1)")
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    from cab_vllm.config import CABConfig

    dp = _decode_profile()
    timer, kept_blocks = dp.graph_time_us, dp.kept_blocks
    dev, dt = "cuda", torch.bfloat16
    scale = D ** -0.5
    splits = [int(x) for x in a.splits.split(",")]
    versions = [int(x) for x in a.fa_versions.split(",")]
    print(f"{'n':>7} {'rows':>4} {'kept':>5} {'fa':>2} {'splits':>6} {'gathered':>9} {'dense_hnd':>9} {'dense':>8} "
          f"{'empty':>6} {'max_err':>8}  (us per layer, CUDA graph, L2 flushed)")
    for n in (int(x) for x in a.lens.split(",")):
        for rows in (int(x) for x in a.rows.split(",")):
            pages_per_seq = math.ceil(n / PAGE)
            m = math.ceil(n / BS)
            keep = int(CABConfig(sparsity=a.sparsity).keep_counts(m)[-1])
            n_pages = rows * pages_per_seq + 1
            # HND pages: [pages, Hkv, page, D]; a (page, head) tile is contiguous
            kc = torch.randn(n_pages, HKV, PAGE, D, device=dev, dtype=dt)
            vc = torch.randn_like(kc)
            kv1 = kc.view(n_pages * HKV, PAGE, 1, D)
            vv1 = vc.view(n_pages * HKV, PAGE, 1, D)
            bt = (1 + torch.arange(rows * pages_per_seq, device=dev, dtype=torch.int32)).view(rows, pages_per_seq)
            gen = torch.Generator().manual_seed(n + rows)
            seqs = rows * HKV
            gtab = torch.zeros(seqs, keep * PER_BLOCK, device=dev, dtype=torch.int32)
            dtab = torch.zeros(seqs, pages_per_seq, device=dev, dtype=torch.int32)
            glen = torch.zeros(seqs, device=dev, dtype=torch.int32)
            dlen = torch.full((seqs,), n, device=dev, dtype=torch.int32)
            picks = {}
            for r in range(rows):
                for h in range(HKV):
                    blocks = kept_blocks(m, keep, gen)
                    picks[r, h] = blocks
                    pg = torch.tensor([b * PER_BLOCK + j for b in blocks for j in range(PER_BLOCK)], device=dev)
                    pg = pg[pg < pages_per_seq]
                    gtab[r * HKV + h, : len(pg)] = bt[r, pg] * HKV + h
                    dtab[r * HKV + h] = bt[r] * HKV + h
                    last = min((blocks[-1] + 1) * BS, n)
                    glen[r * HKV + h] = (len(blocks) - 1) * BS + (last - blocks[-1] * BS)
            q = torch.randn(rows, HQ, D, device=dev, dtype=dt)
            qs = q.view(seqs, HQ // HKV, D)
            cu = torch.arange(seqs + 1, device=dev, dtype=torch.int32)
            out = torch.empty_like(qs)
            # vLLM's own dense decode: NHD cache [pages, page, Hkv, D]
            kn = kc.transpose(1, 2).contiguous()
            vn = vc.transpose(1, 2).contiguous()
            cu_r = torch.arange(rows + 1, device=dev, dtype=torch.int32)
            sl = torch.full((rows,), n, device=dev, dtype=torch.int32)
            out_r = torch.empty_like(q)

            sl0 = torch.zeros_like(sl)

            def run(tab, lens, ns, kmax, fa, o=out):
                return lambda: flash_attn_varlen_func(q=qs, k=kv1, v=vv1, max_seqlen_q=1, cu_seqlens_q=cu,
                                                      max_seqlen_k=kmax, seqused_k=lens, softmax_scale=scale,
                                                      causal=True, block_table=tab, out=o, fa_version=fa,
                                                      num_splits=ns)

            def plain(lens, ns, fa):
                return lambda: flash_attn_varlen_func(
                    q=q, k=kn, v=vn, max_seqlen_q=1, cu_seqlens_q=cu_r, max_seqlen_k=n, seqused_k=lens,
                    softmax_scale=scale, causal=True, block_table=bt, out=out_r, fa_version=fa, num_splits=ns)

            def check(fa, ns) -> float:
                """Max abs error of the gathered launch against a PyTorch reference on a few (row, head) pairs."""
                run(gtab, glen, ns, keep * BS, fa)()
                torch.cuda.synchronize()
                err = 0.0
                for (r, h), blocks in list(picks.items())[:: max(1, len(picks) // 4)]:
                    tok = torch.cat([torch.arange(b * BS, min((b + 1) * BS, n), device=dev) for b in blocks])
                    phys, off = bt[r, tok // PAGE], tok % PAGE
                    k, v = kc[phys, h, off].float(), vc[phys, h, off].float()
                    qq = q[r, h * (HQ // HKV):(h + 1) * (HQ // HKV)].float()
                    ref = torch.softmax(qq @ k.T * scale, -1) @ v
                    err = max(err, (out[r * HKV + h].float() - ref).abs().max().item())
                return err

            for fa, ns in ((fa, ns) for fa in versions for ns in splits):
                cells, errors = [], []
                for what, make, width in (("max_err", lambda: check(fa, ns), 8),
                                          ("gathered", lambda: timer(run(gtab, glen, ns, keep * BS, fa)), 9),
                                          ("dense_hnd", lambda: timer(run(dtab, dlen, ns, n, fa)), 9),
                                          ("dense", lambda: timer(plain(sl, ns, fa)), 8),
                                          ("empty", lambda: timer(plain(sl0, ns, fa)), 6)):
                    try:  # a benchmark sweep: a variant FlashAttention refuses is reported and the sweep goes on
                        cells.append((what, f"{make():>{width}.{4 if what == 'max_err' else 1}f}"))
                    except Exception as e:  # noqa: BLE001
                        cells.append((what, f"{'failed':>{width}}"))
                        errors.append(f"{what}: {type(e).__name__}: {str(e)[:200]}")
                c = dict(cells)
                print(f"{n:>7} {rows:>4} {keep:>5} {fa:>2} {ns:>6} {c['gathered']} {c['dense_hnd']} {c['dense']} "
                      f"{c['empty']} {c['max_err']}" + "".join(f"\n    {x}" for x in errors), flush=True)


if __name__ == "__main__":
    main()
