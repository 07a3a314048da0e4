"""GPU tests: real Triton kernels in bf16 against the PyTorch twins, up to N = 128k (marked gpu).

Long sequences are checked on a sample of query blocks: the reference runs for those rows only.
"""

from __future__ import annotations

import math

import pytest
import torch

import cab_vllm
from cab_vllm.ops import reference as ref
from cab_vllm.ops.coarsen import block_logits, estimate_grouped, pool, sampled_block_attention
from cab_vllm.ops.curvature import curvature
from cab_vllm.ops.decode import paged_sparse_decode
from cab_vllm.ops.flex import flex_sparse_attention
from cab_vllm.ops.prefill import PrefillTiles, paged_sparse_prefill

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DEV = "cuda"
BF16_TOL = 2e-2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


def rows_ref(q, k, v, sel, blocks):
    """Reference output of the given query blocks only: [B, Hq, rows, D] float32 and the row slice."""
    outs = []
    bs = sel.block_size
    for mb in blocks:
        r0, r1 = mb * bs, min((mb + 1) * bs, q.shape[2])
        o, _ = ref.sparse_attention_ref(q[:, :, r0:r1], k[:, :, :r1], v[:, :, :r1], sel.indices[:, :, : mb + 1],
                                        sel.counts[:, :, : mb + 1], bs, q_offset=r0)
        outs.append((r0, r1, o))
    return outs


@pytest.mark.parametrize("n", [4096, 32768, 131072], ids=lambda n: f"N{n // 1024}k")
@pytest.mark.parametrize("policy", ["cab", "random"])
def test_prefill_long_bf16(n, policy):
    torch.manual_seed(n)
    hq, hkv, d = 32, 8, 128
    q = torch.randn(1, hq, n, d, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(1, hkv, n, d, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(1, hkv, n, d, device=DEV, dtype=torch.bfloat16)
    sel = cab_vllm.select_blocks(q, k, cab_vllm.CABConfig(sparsity=0.95, policy=policy))
    assert torch.equal(sel.counts[0, 0].cpu(), cab_vllm.CABConfig(sparsity=0.95).keep_counts(sel.num_blocks))
    out = cab_vllm.sparse_attention(q, k, v, sel)
    out_flex = cab_vllm.sparse_attention(q, k, v, sel, impl="flex")
    assert not out.isnan().any()
    m = sel.num_blocks
    for r0, r1, o in rows_ref(q, k, v, sel, [0, 1, m // 2, m - 1]):
        assert rel(out[:, :, r0:r1], o) < BF16_TOL
        assert rel(out_flex[:, :, r0:r1], o) < BF16_TOL
    assert rel(out, out_flex) < BF16_TOL


@pytest.mark.parametrize("page_size", [16, 64])
@pytest.mark.parametrize("hq,hkv", [(32, 8), (7, 1), (4, 4)], ids=lambda x: str(x))
def test_paged_varlen_prefill_and_decode_bf16(page_size, hq, hkv):
    torch.manual_seed(page_size + hq)
    d, bs = 128, 64
    lens, qlens = [8192, 97, 3000, 1], [8192, 97, 1000, 1]  # chunked prefill: 3000 cached, 1000 new
    s = len(lens)
    maxp = max(-(-l // page_size) for l in lens)
    npages = 1 + s * maxp
    key_cache = torch.randn(npages, page_size, hkv, d, device=DEV, dtype=torch.bfloat16)
    value_cache = torch.randn(npages, page_size, hkv, d, device=DEV, dtype=torch.bfloat16)
    block_table = (torch.randperm(npages - 1, device=DEV)[: s * maxp] + 1).view(s, maxp).to(torch.int32)
    qsl = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    q = torch.randn(int(qsl[-1]), hq, d, device=DEV, dtype=torch.bfloat16)
    seqs, qbs, idxs, cnts = [], [], [], []
    kmax = 16
    for si in range(s):
        ctx = lens[si] - qlens[si]
        for mb in range(ctx // bs, (lens[si] - 1) // bs + 1):
            ii = torch.full((hkv, kmax), -1, dtype=torch.int32)
            cc = torch.zeros(hkv, dtype=torch.int32)
            for h in range(hkv):
                c = min(kmax, mb + 1)
                pick = torch.randperm(mb)[: c - 1].tolist() + [mb]
                ii[h, :c] = torch.tensor(sorted(pick), dtype=torch.int32)
                cc[h] = c
            seqs.append(si), qbs.append(mb), idxs.append(ii), cnts.append(cc)
    tiles = PrefillTiles(torch.tensor(seqs, dtype=torch.int32, device=DEV), torch.tensor(qbs, dtype=torch.int32, device=DEV),
                         torch.stack(idxs).to(DEV), torch.stack(cnts).to(DEV))
    out = paged_sparse_prefill(q, key_cache, value_cache, block_table, qsl, seq_lens, tiles, bs)
    want = paged_sparse_prefill(q.float(), key_cache.float(), value_cache.float(), block_table, qsl, seq_lens, tiles,
                                bs, impl="torch")
    assert rel(out, want) < BF16_TOL
    # decode on the same cache, with the selection of each sequence's last tile: equals its last prefill row
    last_tile = [max(i for i, x in enumerate(seqs) if x == si) for si in range(s)]
    dq = torch.stack([q[int(qsl[si + 1]) - 1] for si in range(s)])
    dec, lse = paged_sparse_decode(dq, key_cache, value_cache, block_table, seq_lens, tiles.indices[last_tile],
                                   tiles.counts[last_tile], bs)
    last_rows = torch.stack([out[int(qsl[si + 1]) - 1] for si in range(s)])
    assert rel(dec, last_rows) < BF16_TOL
    dref, lref = paged_sparse_decode(dq.float(), key_cache.float(), value_cache.float(), block_table, seq_lens,
                                     tiles.indices[last_tile], tiles.counts[last_tile], bs, impl="torch")
    assert rel(dec, dref) < BF16_TOL
    assert torch.allclose(lse, lref, atol=5e-2)


def test_decode_128k_batch8_splits():
    torch.manual_seed(0)
    s, n, hq, hkv, d, page = 8, 131072, 32, 8, 128, 16
    per = n // page
    key_cache = torch.randn(1 + s * per, page, hkv, d, device=DEV, dtype=torch.bfloat16)
    value_cache = torch.randn_like(key_cache)
    block_table = (torch.randperm(s * per, device=DEV) + 1).view(s, per).to(torch.int32)
    seq_lens = torch.tensor([n - 17 * i for i in range(s)], dtype=torch.int32, device=DEV)
    q = torch.randn(s, hq, d, device=DEV, dtype=torch.bfloat16)
    m = n // 64
    dense_idx = torch.arange(m, dtype=torch.int32, device=DEV).expand(s, hkv, m).contiguous()
    cnt = ((seq_lens - 1) // 64 + 1).to(torch.int32)[:, None].expand(s, hkv).contiguous()
    a, la = paged_sparse_decode(q, key_cache, value_cache, block_table, seq_lens, dense_idx, cnt, 64, num_splits=1)
    b, lb = paged_sparse_decode(q, key_cache, value_cache, block_table, seq_lens, dense_idx, cnt, 64)
    assert rel(a, b) < 1e-2 and torch.allclose(la, lb, atol=1e-3)
    # dense decode equals SDPA on the gathered cache (one sequence to bound memory)
    kx = ref.gather_paged(key_cache, block_table[3], int(seq_lens[3]))[None]
    vx = ref.gather_paged(value_cache, block_table[3], int(seq_lens[3]))[None]
    sd = torch.nn.functional.scaled_dot_product_attention(q[3][None, :, None].float(), kx.float(), vx.float(),
                                                          enable_gqa=True)
    assert rel(b[3], sd[0, :, 0]) < BF16_TOL


@pytest.mark.parametrize("estimator", ["max_l2", "mean", "bounds"])
def test_estimators_bf16_match_twin(estimator):
    torch.manual_seed(1)
    q = torch.randn(1, 32, 8192 + 37, 128, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(1, 8, 8192 + 37, 128, device=DEV, dtype=torch.bfloat16)
    got = block_logits(q, k, 64, estimator)
    want = block_logits(q, k, 64, estimator, impl="torch")
    assert rel(got, want) < 2e-3  # TF32 matmuls on the GPU
    gmax, gmean = estimate_grouped(q, k, 64, estimator)
    wmax, wmean = estimate_grouped(q, k, 64, estimator, impl="torch")
    assert (gmax - wmax).abs().max() < 1e-2 and (gmean - wmean).abs().max() < 1e-2
    assert torch.allclose(gmean.sum(-1), torch.ones_like(gmean.sum(-1)), atol=1e-4)
    st = pool(k, 64, bounds=True)
    sr = pool(k, 64, bounds=True, impl="torch")
    assert torch.equal(st["lo"], sr["lo"]) and torch.equal(st["hi"], sr["hi"])


def test_sampled_and_curvature_match_twin():
    torch.manual_seed(2)
    q = torch.randn(1, 8, 4096 + 5, 128, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 4096 + 5, 128, device=DEV, dtype=torch.bfloat16)
    a = sampled_block_attention(q, k, 64, 16)
    b = sampled_block_attention(q.float(), k.float(), 64, 16, impl="torch")
    assert (a - b).abs().max() < 1e-2
    assert torch.allclose(a.sum(-1), torch.ones_like(a.sum(-1)), atol=1e-3)
    g = torch.softmax(torch.randn(8, 2048, 2048, device=DEV).masked_fill(
        ~ref.causal_block_mask(2048, DEV), float("-inf")), -1)
    f1, f2 = curvature(g), curvature(g, impl="torch")
    fin = torch.isfinite(f2)
    assert torch.equal(fin, torch.isfinite(f1))
    assert (f1 - f2)[fin].abs().max() < 1e-4


def test_flex_dense_matches_sdpa_16k():
    torch.manual_seed(3)
    n = 16384 + 64
    q = torch.randn(1, 32, n, 128, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(1, 8, n, 128, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(1, 8, n, 128, device=DEV, dtype=torch.bfloat16)
    sel = cab_vllm.select_blocks(q, k, cab_vllm.CABConfig(policy="dense"))
    sd = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert rel(flex_sparse_attention(q, k, v, sel.indices, sel.counts, 64), sd) < BF16_TOL
    assert rel(cab_vllm.sparse_attention(q, k, v, sel), sd) < BF16_TOL
    assert math.isclose(sel.density(), 1.0)


def test_decode_selection_matches_twin():
    torch.manual_seed(4)
    from cab_vllm.ops.select import decode_priority

    q = torch.randn(5, 32, 128, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(5, 8, 20000, 128, device=DEV, dtype=torch.bfloat16)
    b = pool(k, 64, bounds=True)
    sl = torch.tensor([20000, 1, 64, 65, 12345], dtype=torch.int32, device=DEV)
    a1 = decode_priority(q, b["lo"], b["hi"], sl, 64, 1, 2)
    a2 = decode_priority(q, b["lo"], b["hi"], sl, 64, 1, 2, impl="torch")
    fin = torch.isfinite(a2)
    assert torch.equal(fin, torch.isfinite(a1))
    assert (a1 - a2)[fin].abs().max() < 1e-3


def test_prefill_kernel_compiles_once_for_any_block_table_width():
    """The engine's block table is as wide as max_model_len allows (a row stride that is often a multiple of 16),
    the warm-up's as wide as its prompt: the sparse prefill kernel must not compile again for the other width."""
    from cab_vllm.ops.prefill import _sparse_prefill_kernel

    caches = getattr(_sparse_prefill_kernel, "device_caches", None)
    if caches is None:
        pytest.skip("this Triton keeps no per-device kernel cache to count")
    hq, hkv, d, bs, page = 8, 2, 128, 64, 16
    n = 1000
    key_cache = torch.randn(1 + 2 * 8224, page, hkv, d, device=DEV, dtype=torch.bfloat16)
    value_cache = torch.randn_like(key_cache)
    q = torch.randn(n, hq, d, device=DEV, dtype=torch.bfloat16)
    qsl = torch.tensor([0, n], dtype=torch.int32, device=DEV)
    seq_lens = torch.tensor([n], dtype=torch.int32, device=DEV)
    m = -(-n // bs)
    idx = torch.arange(m, dtype=torch.int32, device=DEV).expand(m, hkv, m).contiguous()
    cnt = (torch.arange(m, dtype=torch.int32, device=DEV) + 1)[:, None].expand(m, hkv).contiguous()
    tiles = PrefillTiles(torch.zeros(m, dtype=torch.int32, device=DEV), torch.arange(m, dtype=torch.int32, device=DEV),
                         idx, cnt)
    outs = []
    sizes = []
    for width in (129, 8224):  # the warm-up's table and a 131584-token engine's
        bt = torch.zeros(1, width, dtype=torch.int32, device=DEV)
        bt[0, : -(-n // page)] = torch.arange(1, 1 + -(-n // page), dtype=torch.int32, device=DEV)
        outs.append(paged_sparse_prefill(q, key_cache, value_cache, bt, qsl, seq_lens, tiles, bs))
        torch.cuda.synchronize()
        sizes.append(sum(len(c[0]) for c in caches.values()))
    assert torch.equal(outs[0], outs[1])
    assert sizes[1] == sizes[0], f"compiled again for the wider block table ({sizes})"
