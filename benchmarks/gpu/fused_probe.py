"""Could a token decode score every key and attend to each head's kept keys in one pass? A probe, not the engine's
path (no vLLM needed).

    python benchmarks/gpu/fused_probe.py [--lens 32768,131072] [--rows 1,8] [--sparsity 0.98] [--sample 16] [--check]

Today's token decode (ops.token_decode) stores every key's logit, counts them into histograms, picks each head's
threshold in a second launch and attends to the listed keys in a third (a scan of every stored logit first). Here the
threshold comes first, from a sample: each head's (keep / SAMPLE)-th largest exact logit over every SAMPLE-th key.
Then one launch, split by chunks of CHUNK keys as FlashDecoding splits, computes every key's logit and runs the
online softmax over the keys at or above its head's threshold in the same loop (the values of those keys only: a
load predicated on the tile's kept rows moves no bytes for the others), and a merge launch combines the chunks. The
keys kept are about keep (the sample's quantile; its count is what --check reports), not exactly the keep best.

Llama-3.1-8B attention geometry (32/8 heads, D=128, bf16, 16-token pages in a shuffled order), one layer, a CUDA
graph with L2 flushed before each call (decode_profile.graph_time_us). Prints microseconds per step:
  tokens   ops.token_decode, exact scores, its defaults (the baseline)
  sample   the sampled logits and the thresholds (a Triton launch, then torch.topk of the sample)
  fused    the one-pass launch and the merge
  fused2   the same with two loops per chunk (logits stored, then read back from L2 for the kept keys' values)
  whole    sample + fused (whole2: + fused2)
--check compares each kernel with PyTorch on the GPU and reports the kept keys per head against keep.
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
CHUNK, TILE = 1024, 128  # keys per program of the fused launch, keys per step
SAMPLE_TILE = 128  # sampled keys per program of the sampling launch
LOG2E = 1.4426950408889634

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _group_q(q_ptr, s, kvh, GROUP: tl.constexpr, GP: tl.constexpr, DIM: tl.constexpr, HEADS: tl.constexpr):
    g = tl.arange(0, GP)
    d = tl.arange(0, DIM)
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + (s * HEADS + heads)[:, None] * DIM + d[None, :], mask=(g < GROUP)[:, None], other=0.0)
    return q, g, g < GROUP, d, heads


@triton.jit
def sample_kernel(q_ptr, k_ptr, bt_ptr, sg_ptr, n, m, scale_log2, stride_bt, stride_kp, stride_kt, stride_kh,
                  stride_ss, stride_sh, SAMPLE: tl.constexpr, GROUP: tl.constexpr, GP: tl.constexpr,
                  HEADS_KV: tl.constexpr, DIM: tl.constexpr, TILE_T: tl.constexpr, PAGE_T: tl.constexpr):
    """Exact base-2 logits of keys 0, SAMPLE, 2 SAMPLE, ... (m of them) of one row and KV head, TILE_T per program,
    into sg [rows, Hq, m] (-inf past m)."""
    pid = tl.program_id(0)
    tiles = tl.cdiv(m, TILE_T)
    s = pid // (HEADS_KV * tiles)
    kvh = (pid // tiles) % HEADS_KV
    j = (pid % tiles) * TILE_T + tl.arange(0, TILE_T)
    ok = j < m
    pos = j * SAMPLE
    q, g, g_ok, d, heads = _group_q(q_ptr, s, kvh, GROUP, GP, DIM, HEADS_KV * GROUP)
    page = tl.load(bt_ptr + s * stride_bt + pos // PAGE_T, mask=ok, other=0).to(tl.int64)
    k = tl.load(k_ptr + (page * stride_kp + (pos % PAGE_T) * stride_kt + kvh * stride_kh)[:, None] + d[None, :],
                mask=ok[:, None], other=0.0)
    z = tl.dot(q.to(k.dtype), tl.trans(k)) * scale_log2
    tl.store(sg_ptr + s * stride_ss + heads[:, None] * stride_sh + j[None, :], tl.where(ok[None, :], z, float("-inf")),
             mask=g_ok[:, None])


@triton.jit
def fused_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, thr_ptr, po_ptr, pl_ptr, cnt_ptr, lg_ptr, n, scale_log2, stride_bt,
                 stride_kp, stride_kt, stride_kh, stride_ls, GROUP: tl.constexpr, GP: tl.constexpr,
                 HEADS_KV: tl.constexpr, DIM: tl.constexpr, CHUNK_T: tl.constexpr, TILE_T: tl.constexpr,
                 PAGE_T: tl.constexpr, TWO_PHASE: tl.constexpr):
    """One chunk of one row and KV head: every key's base-2 logit, and the online softmax of each head over its keys
    at or above its threshold thr [rows, Hq] (values loaded for the rows some head keeps). Partial output (normalized)
    into po [rows, Hq, chunks, D], its base-2 LSE into pl [rows, Hq, chunks] (-inf: nothing kept), the keys each
    head kept into cnt [rows, Hq, chunks]. K and V share strides. TWO_PHASE: the chunk's logits stored (lg [rows,
    Hq, >= n]) in a first loop, read back in a second that loads the kept keys' values (those loads then wait on L2,
    not on the tile's dot)."""
    pid = tl.program_id(0)
    chunks = tl.cdiv(n, CHUNK_T)
    s = pid // (HEADS_KV * chunks)
    kvh = (pid // chunks) % HEADS_KV
    c = pid % chunks
    q, g, g_ok, d, heads = _group_q(q_ptr, s, kvh, GROUP, GP, DIM, HEADS_KV * GROUP)
    q = q.to(k_ptr.dtype.element_ty)
    thr = tl.load(thr_ptr + s * HEADS_KV * GROUP + heads, mask=g_ok, other=float("inf"))
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    kept = tl.zeros([GP], tl.int32)
    acc = tl.zeros([GP, DIM], tl.float32)
    t0 = c * CHUNK_T
    t1 = tl.minimum(t0 + CHUNK_T, n)
    row_lg = lg_ptr + s * stride_ls + heads[:, None] * n
    if TWO_PHASE:
        for p0 in range(t0, t1, TILE_T):
            pos = p0 + tl.arange(0, TILE_T)
            ok = pos < n
            page = tl.load(bt_ptr + s * stride_bt + pos // PAGE_T, mask=ok, other=0).to(tl.int64)
            off = (page * stride_kp + (pos % PAGE_T) * stride_kt + kvh * stride_kh)[:, None] + d[None, :]
            k = tl.load(k_ptr + off, mask=ok[:, None], other=0.0)
            tl.store(row_lg + pos[None, :], tl.dot(q, tl.trans(k)) * scale_log2, mask=g_ok[:, None] & ok[None, :])
        tl.debug_barrier()
    for p0 in range(t0, t1, TILE_T):
        pos = p0 + tl.arange(0, TILE_T)
        ok = pos < n
        page = tl.load(bt_ptr + s * stride_bt + pos // PAGE_T, mask=ok, other=0).to(tl.int64)
        off = (page * stride_kp + (pos % PAGE_T) * stride_kt + kvh * stride_kh)[:, None] + d[None, :]
        if TWO_PHASE:
            z = tl.load(row_lg + pos[None, :], mask=g_ok[:, None] & ok[None, :], other=float("-inf"),
                        cache_modifier=".cg")
        else:
            k = tl.load(k_ptr + off, mask=ok[:, None], other=0.0)
            z = tl.dot(q, tl.trans(k)) * scale_log2
        keep = (z >= thr[:, None]) & ok[None, :] & g_ok[:, None]
        row = tl.max(keep.to(tl.int32), 0) > 0  # keys some head of the group keeps: their values only
        v = tl.load(v_ptr + off, mask=row[:, None], other=0.0)
        zs = tl.where(keep, z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(zs, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(zs - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
        kept += tl.sum(keep.to(tl.int32), 1)
    lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    base = (s * HEADS_KV * GROUP + heads) * chunks + c
    tl.store(po_ptr + base[:, None] * DIM + d[None, :], out, mask=g_ok[:, None])
    tl.store(pl_ptr + base, lse, mask=g_ok)
    tl.store(cnt_ptr + base, kept, mask=g_ok)


@triton.jit
def merge_kernel(po_ptr, pl_ptr, o_ptr, chunks, DIM: tl.constexpr, CP: tl.constexpr):
    """One (row, query head): the chunks' partials weighted by their LSEs -> o [rows, Hq, D]."""
    h = tl.program_id(0)
    c = tl.arange(0, CP)
    ok = c < chunks
    lse = tl.load(pl_ptr + h * chunks + c, mask=ok, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp2(lse - top)
    d = tl.arange(0, DIM)
    part = tl.load(po_ptr + (h * chunks + c)[:, None] * DIM + d[None, :], mask=ok[:, None], other=0.0)
    tot = tl.sum(w, 0)
    tl.store(o_ptr + h * DIM + d, (tl.sum(w[:, None] * part, 0) / tl.where(tot > 0.0, tot, 1.0)).to(
        o_ptr.dtype.element_ty))


class Fused:
    """The probe's buffers for rows of n keys (fixed addresses: a CUDA graph replays them) and its launches."""

    def __init__(self, rows: int, hq: int, hkv: int, d: int, n: int, keep: int, sample: int, device):
        if hq % hkv or keep < 1 or sample < 1 or n < 1:
            raise ValueError(f"heads {hq}/{hkv}, keep {keep}, sample {sample}, n {n} do not fit together")
        self.rows, self.hq, self.hkv, self.d, self.n, self.sample = rows, hq, hkv, d, n, sample
        self.m = -(-n // sample)
        self.k = max(1, min(self.m, round(keep / sample)))  # the sample's quantile that stands for keep
        self.chunks = -(-n // CHUNK)
        f32 = dict(dtype=torch.float32, device=device)
        self.sg = torch.empty(rows, hq, -(-self.m // SAMPLE_TILE) * SAMPLE_TILE, **f32)
        self.thr = torch.empty(rows, hq, **f32)
        self.po = torch.empty(rows, hq, self.chunks, d, **f32)
        self.pl = torch.empty(rows, hq, self.chunks, **f32)
        self.cnt = torch.empty(rows, hq, self.chunks, dtype=torch.int32, device=device)
        self.lg = torch.empty(rows, hq, n, **f32)  # (TWO_PHASE's logits)

    def thresholds(self, q, kc, bt, scale):
        rows, hq, d = q.shape
        g = hq // self.hkv
        grid = (rows * self.hkv * -(-self.m // SAMPLE_TILE),)
        sample_kernel[grid](q, kc, bt, self.sg, self.n, self.m, scale * LOG2E, bt.stride(0), kc.stride(0),
                            kc.stride(1), kc.stride(2), self.sg.stride(0), self.sg.stride(1), SAMPLE=self.sample,
                            GROUP=g, GP=max(16, triton.next_power_of_2(g)), HEADS_KV=self.hkv, DIM=d,
                            TILE_T=SAMPLE_TILE, PAGE_T=kc.shape[1], num_warps=4)
        self.thr.copy_(torch.topk(self.sg[..., :self.m], self.k, dim=-1, sorted=True).values[..., -1])

    def attend(self, q, kc, vc, bt, scale, out, two_phase: bool = False):
        rows, hq, d = q.shape
        g = hq // self.hkv
        fused_kernel[(rows * self.hkv * self.chunks,)](
            q, kc, vc, bt, self.thr, self.po, self.pl, self.cnt, self.lg, self.n, scale * LOG2E, bt.stride(0),
            kc.stride(0), kc.stride(1), kc.stride(2), self.lg.stride(0), GROUP=g, GP=max(16, triton.next_power_of_2(g)),
            HEADS_KV=self.hkv, DIM=d, CHUNK_T=CHUNK, TILE_T=TILE, PAGE_T=kc.shape[1], TWO_PHASE=two_phase,
            num_warps=4)
        merge_kernel[(rows * hq,)](self.po, self.pl, out, self.chunks, DIM=d,
                                   CP=max(2, triton.next_power_of_2(self.chunks)), num_warps=4)
        return out


def reference(q, kc, vc, bt, n, scale, thr):
    """PyTorch: each head's softmax over its keys whose base-2 logit is at least thr [rows, Hq] -> (out [rows, Hq,
    D] float32, kept [rows, Hq])."""
    page, hkv, d = kc.shape[1:]
    rows, hq = q.shape[:2]
    outs, kept = [], []
    for s in range(rows):
        pages = bt[s, :-(-n // page)].long()
        k = kc[pages].reshape(-1, hkv, d)[:n].float().transpose(0, 1).repeat_interleave(hq // hkv, 0)
        v = vc[pages].reshape(-1, hkv, d)[:n].float().transpose(0, 1).repeat_interleave(hq // hkv, 0)
        z = torch.einsum("hd,hnd->hn", q[s].float(), k) * scale * LOG2E
        sel = z >= thr[s][:, None]
        p = torch.exp2(z - z.amax(-1, keepdim=True)).masked_fill(~sel, 0.0)
        outs.append(torch.einsum("hn,hnd->hd", p, v) / p.sum(-1, keepdim=True))
        kept.append(sel.sum(-1))
    return torch.stack(outs), torch.stack(kept)


def sampled_reference(q, kc, bt, n, scale, sample):
    """PyTorch: the sampled logits [rows, Hq, ceil(n / sample)] (keys 0, sample, ...)."""
    page, hkv, d = kc.shape[1:]
    pos = torch.arange(0, n, sample, device=kc.device)
    out = []
    for s in range(q.shape[0]):
        k = kc[bt[s, pos // page].long(), pos % page].float().transpose(0, 1)  # [Hkv, m, D]
        out.append(torch.einsum("hd,hnd->hn", q[s].float(), k.repeat_interleave(q.shape[1] // hkv, 0)))
    return torch.stack(out) * scale * LOG2E


def setup(n: int, rows: int, dev: str, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pages_per_row = -(-n // PAGE)
    perm = torch.randperm(rows * pages_per_row + 1, generator=gen)[:rows * pages_per_row]
    bt = perm.view(rows, pages_per_row).to(torch.int32).to(dev)
    kv = torch.randn(2, rows * pages_per_row + 1, PAGE, HKV, D, generator=gen)
    q = torch.randn(rows, HQ, D, generator=gen) * 2.0  # peaked enough that the kept keys carry the mass
    return q.to(dev, torch.bfloat16), kv[0].to(dev, torch.bfloat16), kv[1].to(dev, torch.bfloat16), bt


def check(n: int, rows: int, sparsity: float, sample: int, dev: str) -> dict:
    q, kc, vc, bt = setup(n, rows, dev)
    scale = 1 / math.sqrt(D)
    keep = max(1, round(n * (1 - sparsity)))
    fz = Fused(rows, HQ, HKV, D, n, keep, sample, dev)
    fz.thresholds(q, kc, bt, scale)
    sg_err = float((fz.sg[..., :fz.m] - sampled_reference(q, kc, bt, n, scale, sample)).abs().max())
    out, out2 = torch.empty_like(q), torch.empty_like(q)
    fz.attend(q, kc, vc, bt, scale, out)
    fz.attend(q, kc, vc, bt, scale, out2, True)
    ref, kept = reference(q, kc, vc, bt, n, scale, fz.thr)
    ratio = kept.float() / keep
    return {"sample_err": sg_err, "out_err": float((out.float() - ref).abs().max()),
            "out2_err": float((out2.float() - ref).abs().max()),
            "kept_counted_as_reference": bool(torch.equal(fz.cnt.sum(-1), kept.to(torch.int32))),
            "kept_over_keep_mean": float(ratio.mean()), "min": float(ratio.min()), "max": float(ratio.max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lens", default="32768,131072")
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--sparsity", type=float, default=0.98)
    ap.add_argument("--sample", type=int, default=16, help="one key of every SAMPLE sets the thresholds")
    ap.add_argument("--check", action="store_true", help="also compare with PyTorch (each length, one row)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("fused_probe.py times CUDA kernels: no CUDA device here (its kernels' logic is tested on CPU "
                         "under the Triton interpreter in tests/backend/test_fused_probe.py)")
    import decode_profile as dp
    from cab_vllm.ops import token_decode as td

    dp._FLUSH = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    lens, rows_list = [int(x) for x in a.lens.split(",")], [int(x) for x in a.rows.split(",")]
    if a.check:
        for n in lens:
            print(f"check n={n}: {check(n, 1, a.sparsity, a.sample, 'cuda')}", flush=True)
    print("      n rows   tokens   sample    fused   fused2    whole   whole2  (us per step)")
    for n in lens:
        for rows in rows_list:
            q, kc, vc, bt = setup(n, rows, "cuda")
            scale = 1 / math.sqrt(D)
            keep = max(1, round(n * (1 - a.sparsity)))
            sl = torch.full((rows,), n, dtype=torch.int32, device="cuda")
            kp = torch.full((rows,), keep, dtype=torch.int32, device="cuda")
            scratch = td.token_scratch(rows, HQ, HKV, D, n, "cuda")
            out = torch.empty_like(q)
            fz = Fused(rows, HQ, HKV, D, n, keep, a.sample, "cuda")
            t_tok = dp.graph_time_us(lambda: td.token_decode(q, kc, vc, bt, sl, kp, scale, out, scratch=scratch))
            t_s = dp.graph_time_us(lambda: fz.thresholds(q, kc, bt, scale))
            t_f = dp.graph_time_us(lambda: fz.attend(q, kc, vc, bt, scale, out))
            t_f2 = dp.graph_time_us(lambda: fz.attend(q, kc, vc, bt, scale, out, True))
            t_w = dp.graph_time_us(lambda: (fz.thresholds(q, kc, bt, scale), fz.attend(q, kc, vc, bt, scale, out)))
            t_w2 = dp.graph_time_us(lambda: (fz.thresholds(q, kc, bt, scale),
                                             fz.attend(q, kc, vc, bt, scale, out, True)))
            print(f"{n:7d} {rows:4d} {t_tok:8.1f} {t_s:8.1f} {t_f:8.1f} {t_f2:8.1f} {t_w:8.1f} {t_w2:8.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
