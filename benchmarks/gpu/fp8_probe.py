"""Would a centered float8 copy of the keys score a decode step's keys faster than exact bf16 scores? A probe, not
the engine's path (no vLLM needed).

    python benchmarks/gpu/fp8_probe.py [--lens 32768,131072] [--rows 1,8] [--group-pad 16,64] [--check]

Llama-3.1-8B attention geometry (32/8 heads, D=128, bf16, 16-token pages in a shuffled order), one layer. For each
context length and batch it times, in a CUDA graph with L2 flushed before each call (decode_profile.graph_time_us):
  exact    the token decode's first launch (ops.token_decode, stages=1: exact logits of every key, with its first
           counting pass), the launch a float8 estimate would replace
  bf16     this probe's own kernel over the bf16 keys (logits and per-chunk maxima only, no counting): its floor
  fp8/G    this probe's kernel over a centered float8 copy (experiments/RESULTS.md, "A float8 copy of K"): each
           channel's mid-range per CENTER tokens of a row subtracted (bfloat16, [rows, Hkv, groups, D]), the rest
           float8 e4m3 with a float32 scale per token, paged as the cache is; the group's queries padded to G rows
           (16: mma.sync, float8 made half first; 64: Hopper's wgmma takes float8 as it is). Logit = scale_q * s_tok *
           (q8 . k8) + q . mid (one number per head and 1,024-token program).
--check compares each kernel's logits with PyTorch on the same copy (the float8 copy's error is the copy's, not the
kernel's) and the estimate's ranking with exact scores (recall of each head's 2% best keys among its 2% best by the
estimate). Prints microseconds per step.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

HQ, HKV, D, PAGE = 32, 8, 128, 16
CHUNK, TILE = 1024, 128  # keys per program, keys per step
CENTER = CHUNK  # tokens per centering group: one center per program (RESULTS: 128 or 1,024 center as well as 16)
LOG2E = 1.4426950408889634

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def fp8_logits_kernel(q_ptr, q8_ptr, sq_ptr, k_ptr, ks_ptr, mid_ptr, bt_ptr, lg_ptr, n, scale_log2, stride_bt,
                      stride_kp, stride_kt,
                      stride_kh, stride_sp, stride_st, stride_sh, stride_ms, stride_mh, stride_mg, stride_ls,
                      stride_lh, FP8: tl.constexpr, GROUP: tl.constexpr, GP: tl.constexpr, HEADS_KV: tl.constexpr,
                      DIM: tl.constexpr, CHUNK_T: tl.constexpr, TILE_T: tl.constexpr, PAGE_T: tl.constexpr,
                      Q8_IN: tl.constexpr = False):
    """Logits (base 2) of one row's group of queries against one chunk of its keys: [rows x KV heads x chunks]
    programs. FP8: keys from the centered float8 copy (k_ptr float8, ks_ptr scales, mid_ptr centers), else the bf16
    cache (k_ptr). Q8_IN: the queries' float8 values and scales read from q8_ptr / sq_ptr (made by PyTorch) instead
    of made here (Triton's CPU interpreter rounds float32 to float8 wrongly near powers of two)."""
    pid = tl.program_id(0)
    chunks = tl.cdiv(n, CHUNK_T)
    s = pid // (HEADS_KV * chunks)
    kvh = (pid // chunks) % HEADS_KV
    c = pid % chunks
    g = tl.arange(0, GP)
    g_ok = g < GROUP
    d = tl.arange(0, DIM)
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + (s * HEADS_KV * GROUP + heads)[:, None] * DIM + d[None, :], mask=g_ok[:, None], other=0.0)
    q = q.to(tl.float32)
    if FP8:
        if Q8_IN:
            q8 = tl.load(q8_ptr + (s * HEADS_KV * GROUP + heads)[:, None] * DIM + d[None, :], mask=g_ok[:, None],
                         other=0.0)
            sq = tl.load(sq_ptr + s * HEADS_KV * GROUP + heads, mask=g_ok, other=0.0)
        else:
            sq = tl.maximum(tl.max(tl.abs(q), 1), 1e-30) / 448.0  # a scale per query row
            q8 = (q / sq[:, None]).to(tl.float8e4nv)
        mid = tl.load(mid_ptr + s * stride_ms + kvh * stride_mh + c * stride_mg + d).to(tl.float32)
        qm = tl.sum(q * mid[None, :], 1)  # q . center: one number per head for the whole chunk
    else:
        qb = q.to(k_ptr.dtype.element_ty)  # (the cache's dtype: bf16 on a GPU)
    row = lg_ptr + s.to(tl.int64) * stride_ls + heads[:, None].to(tl.int64) * stride_lh
    t0 = c * CHUNK_T
    for p0 in range(t0, t0 + CHUNK_T, TILE_T):
        pos = p0 + tl.arange(0, TILE_T)
        ok = pos < n
        page = tl.load(bt_ptr + s * stride_bt + pos // PAGE_T, mask=ok, other=0).to(tl.int64)
        slot = pos % PAGE_T
        k = tl.load(k_ptr + (page * stride_kp + slot * stride_kt + kvh * stride_kh)[:, None] + d[None, :],
                    mask=ok[:, None], other=0.0)
        if FP8:
            sk = tl.load(ks_ptr + page * stride_sp + slot * stride_st + kvh * stride_sh, mask=ok, other=0.0)
            z = tl.dot(q8, tl.trans(k)) * sq[:, None] * sk[None, :] + qm[:, None]
        else:
            z = tl.dot(qb, tl.trans(k))
        tl.store(row + pos[None, :], z * scale_log2, mask=g_ok[:, None] & ok[None, :])


def cache_keys(key_cache: torch.Tensor, block_table: torch.Tensor, n: int) -> torch.Tensor:
    """Each row's first n keys gathered from its pages: [rows, Hkv, n, D] float32."""
    page, hkv, d = key_cache.shape[1:]
    return torch.stack([key_cache[block_table[s, :-(-n // page)].long()].reshape(-1, hkv, d)[:n].float().transpose(0, 1)
                        for s in range(block_table.shape[0])])


def make_copy(key_cache: torch.Tensor, block_table: torch.Tensor, n: int, center: int = CENTER):
    """The centered float8 copy of rows' first n keys: (k8 [pages, page, Hkv, D] float8 e4m3, ks [pages, page, Hkv]
    float32, mid [rows, Hkv, groups, D] bfloat16). Each group of ``center`` logical tokens of a row and head is
    centered on its channels' mid-range (rounded to bf16), the rest scaled per token to e4m3's 448."""
    rows, page = block_table.shape[0], key_cache.shape[1]
    hkv, d = key_cache.shape[2], key_cache.shape[3]
    groups = -(-n // center)
    k8 = torch.zeros(key_cache.shape, dtype=torch.float8_e4m3fn, device=key_cache.device)
    ks = torch.zeros(key_cache.shape[:3], dtype=torch.float32, device=key_cache.device)
    mid = torch.zeros(rows, hkv, groups, d, dtype=torch.bfloat16, device=key_cache.device)
    keys = cache_keys(key_cache, block_table, n)
    for s in range(rows):
        pages = block_table[s, :-(-n // page)].long()
        k = keys[s].transpose(0, 1)  # [n, Hkv, D]
        for gi in range(groups):
            sl = k[gi * center:(gi + 1) * center]
            mid[s, :, gi] = ((sl.amax(0) + sl.amin(0)) / 2).to(torch.bfloat16)
        r = k - mid[s].float().repeat_interleave(center, 1)[:, :n].transpose(0, 1)  # [n, Hkv, D]
        sc = r.abs().amax(-1).clamp_min(1e-30) / 448.0
        q8 = (r / sc[..., None]).to(torch.float8_e4m3fn)
        full = torch.zeros(len(pages) * page, hkv, d, dtype=torch.float8_e4m3fn, device=key_cache.device)
        full[:n] = q8
        k8[pages] = full.view(len(pages), page, hkv, d)
        fs = torch.zeros(len(pages) * page, hkv, device=key_cache.device)
        fs[:n] = sc
        ks[pages] = fs.view(len(pages), page, hkv)
    return k8, ks, mid


def copy_keys(k8, ks, mid, block_table, n, center: int = CENTER) -> torch.Tensor:
    """What the copy holds, dequantized: [rows, Hkv, n, D] float32."""
    rows, page = block_table.shape[0], k8.shape[1]
    out = []
    for s in range(rows):
        pages = block_table[s, :-(-n // page)].long()
        r = k8[pages].float().reshape(-1, k8.shape[2], k8.shape[3])[:n] * ks[pages].reshape(-1, k8.shape[2])[:n, :,
                                                                                                            None]
        out.append((r + mid[s].float().repeat_interleave(center, 1)[:, :n].transpose(0, 1)).transpose(0, 1))
    return torch.stack(out)


def quantize_queries(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [rows, Hq, D] -> (float8 e4m3 values, float32 scale per row and head): what the kernel makes of them."""
    sq = q.float().abs().amax(-1).clamp_min(1e-30) / 448.0
    return (q.float() / sq[..., None]).to(torch.float8_e4m3fn), sq


def probe_logits(q, key_cache, block_table, n, scale, logits, copy=None, group_pad: int = 16,
                 q8=None) -> torch.Tensor:
    """Logits (base 2) of q [rows, Hq, D] against each row's first n keys into logits [rows, Hq, >= n] float32:
    exact bf16 scores (copy None) or the centered float8 copy's (copy = make_copy's triple; the queries made float8
    in the kernel, or given as quantize_queries' pair q8)."""
    rows, hq, d = q.shape
    hkv = key_cache.shape[2]
    if hq % hkv or d != key_cache.shape[3] or group_pad < hq // hkv or logits.shape[-1] < n:
        raise ValueError(f"q {tuple(q.shape)}, cache {tuple(key_cache.shape)}, group_pad {group_pad}, logits "
                         f"{tuple(logits.shape)} do not fit together")
    k8, ks, mid = copy if copy is not None else (key_cache, key_cache, key_cache)
    fp8 = copy is not None
    mstr = (mid.stride(0), mid.stride(1), mid.stride(2)) if fp8 else (0, 0, 0)
    sstr = (ks.stride(0), ks.stride(1), ks.stride(2)) if fp8 else (0, 0, 0)
    grid = (rows * hkv * triton.cdiv(n, CHUNK),)
    q8v, sq = q8 if q8 is not None else (q, q)
    fp8_logits_kernel[grid](q, q8v, sq, k8, ks, mid, block_table, logits, n, scale * LOG2E, block_table.stride(0),
                            k8.stride(0), k8.stride(1), k8.stride(2), *sstr, *mstr, logits.stride(0),
                            logits.stride(1), FP8=fp8, GROUP=hq // hkv, GP=group_pad, HEADS_KV=hkv, DIM=d,
                            CHUNK_T=CHUNK, TILE_T=TILE, PAGE_T=key_cache.shape[1], Q8_IN=q8 is not None,
                            num_warps=4)
    return logits


def setup(n: int, rows: int, dev: str, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pages_per_row = -(-n // PAGE)
    perm = torch.randperm(rows * pages_per_row, generator=gen)
    bt = perm.view(rows, pages_per_row).to(torch.int32).to(dev)
    kc = (torch.randn(rows * pages_per_row, PAGE, HKV, D, generator=gen) * 0.5)
    kc[..., 7] += 6.0  # a channel of large, nearly constant value, as post-RoPE keys carry
    q = torch.randn(rows, HQ, D, generator=gen)
    return q.to(dev, torch.bfloat16), kc.to(dev, torch.bfloat16), bt


def check(n: int, rows: int, dev: str, group_pad: int) -> dict:
    """Kernel against PyTorch on the same inputs; the estimate's recall of the exact 2% best keys per head."""
    q, kc, bt = setup(n, rows, dev)
    scale = 1 / math.sqrt(D)
    copy = make_copy(kc, bt, n)
    lg = torch.zeros(rows, HQ, n, device=dev)
    keys = cache_keys(kc, bt, n).repeat_interleave(HQ // HKV, 1)
    exact = torch.einsum("shd,shnd->shn", q.float(), keys) * scale * LOG2E
    probe_logits(q, kc, bt, n, scale, lg, None, group_pad)
    err_bf16 = float((lg - exact).abs().max())
    probe_logits(q, kc, bt, n, scale, lg, copy, group_pad)
    est_ref = torch.einsum("shd,shnd->shn", q.float(), copy_keys(*copy, bt, n).repeat_interleave(HQ // HKV, 1))
    err_fp8 = float((lg - est_ref * scale * LOG2E).abs().max())  # (the queries' float8 rounding is the kernel's)
    keep = max(1, n // 50)
    best = exact.topk(keep, -1).indices
    got = lg.topk(keep, -1).indices
    hit = (best[..., :, None] == got[..., None, :]).any(-1).float().mean(-1)
    return {"err_bf16": err_bf16, "err_fp8": err_fp8, "recall_mean": float(hit.mean()), "recall_min": float(hit.min()),
            "logit_spread": float(exact.std())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lens", default="32768,131072")
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--group-pad", default="16,64")
    ap.add_argument("--check", action="store_true", help="also compare with PyTorch (at the first length, one row)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("fp8_probe.py times CUDA kernels: no CUDA device here (its kernel's logic is tested on CPU "
                         "under the Triton interpreter in tests/backend/test_fp8_probe.py)")
    import decode_profile as dp
    from cab_vllm.ops import token_decode as td

    dp._FLUSH = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    pads = [int(x) for x in a.group_pad.split(",")]
    lens, rows_list = [int(x) for x in a.lens.split(",")], [int(x) for x in a.rows.split(",")]
    if a.check:
        nc = min(lens[0], 32768)
        for gp in pads:
            print(f"check n={nc} G={gp}: {check(nc, 1, 'cuda', gp)}")
    print("      n rows    exact     bf16 " + " ".join(f"  fp8/{gp:<3d}" for gp in pads) + "  (us per step)")
    for n in lens:
        for rows in rows_list:
            q, kc, bt = setup(n, rows, "cuda")
            scale = 1 / math.sqrt(D)
            copy = make_copy(kc, bt, n)
            lg = torch.zeros(rows, HQ, n, device="cuda")
            sl = torch.full((rows,), n, dtype=torch.int32, device="cuda")
            keep = torch.full((rows,), max(1, n // 50), dtype=torch.int32, device="cuda")
            scratch = td.token_scratch(rows, HQ, HKV, D, n, "cuda")
            out = torch.empty_like(q)
            t_exact = dp.graph_time_us(lambda: td.token_decode(q, kc, kc, bt, sl, keep, scale, out, scratch=scratch,
                                                               stages=1))
            t_bf16 = dp.graph_time_us(lambda: probe_logits(q, kc, bt, n, scale, lg, None, 16))
            t_fp8 = [dp.graph_time_us(lambda gp=gp: probe_logits(q, kc, bt, n, scale, lg, copy, gp)) for gp in pads]
            print(f"{n:7d} {rows:4d} {t_exact:8.1f} {t_bf16:8.1f} " + " ".join(f"{t:8.1f}" for t in t_fp8))


if __name__ == "__main__":
    main()
