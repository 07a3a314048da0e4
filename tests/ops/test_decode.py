"""ops.decode.paged_sparse_decode: split-K decode over the selected blocks of a paged cache, Triton (interpreted
on CPU) vs the PyTorch twin vs a float64 oracle; and decode == the last row of prefill."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import (KERNEL_FP32_TOL, LSE_ATOL, make_paged_cache, make_varlen_batch, masked_attention_oracle,
                      pack_selection, random_block_subset, rel_err, skip_if_interpreted_bf16_dot)
from cab_vllm.ops.decode import default_num_splits, paged_sparse_decode
from cab_vllm.ops.prefill import PrefillTiles, paged_sparse_prefill

LENS = [1, 63, 64, 65, 97, 200]

# (Hq, Hkv, D, block_size, page_size, layout, dtype)
CASES = [
    pytest.param(2, 2, 64, 64, 16, "plain", torch.float32, id="g1-d64-bs64-page16-plain-fp32"),
    pytest.param(8, 2, 128, 64, 32, "kv_pair", torch.float32, id="g4-d128-bs64-page32-kvpair-fp32"),
    pytest.param(7, 1, 64, 16, 64, "head_major", torch.float32, id="g7-d64-bs16-page64-headmajor-fp32"),
    pytest.param(4, 2, 64, 32, 48, "kv_interleaved", torch.float32, id="g2-d64-bs32-page48-kvinterleaved-fp32"),
    pytest.param(16, 2, 96, 64, 16, "head_major", torch.float32, id="g8-d96-bs64-page16-headmajor-fp32"),
    pytest.param(8, 2, 64, 64, 16, "kv_pair", torch.float16, id="g4-d64-bs64-page16-kvpair-fp16"),
    pytest.param(7, 1, 128, 16, 16, "plain", torch.float16, id="g7-d128-bs16-page16-plain-fp16"),
    pytest.param(8, 2, 128, 64, 16, "kv_pair", torch.bfloat16, id="g4-d128-bs64-page16-kvpair-bf16"),
]


@pytest.mark.parametrize("bs,page", [(64, 16), (16, 64), (64, 128), (32, 48)],
                         ids=["pages-per-block", "blocks-per-page", "bs64-page128", "straddling"])
def test_decode_values_with_their_own_strides(bs, page, device):
    """Keys in vLLM's [2, pages, ...] layout and values allocated head-major (other strides): the kernel must not
    address the values through the keys' offsets (it shares one offset tile only when the strides match). Every
    page/block relation: several pages per block, several blocks per page (one page-table read per block), blocks
    straddling pages."""
    hq, hkv, d = 4, 2, 32
    batch = make_varlen_batch([(n, 1) for n in LENS], hq, hkv, d, torch.float32, seed=5, device=device)
    kc, _, bt = make_paged_cache(batch["k"], batch["v"], page, layout="kv_pair", seed=6)
    _, vc, bt2 = make_paged_cache(batch["k"], batch["v"], page, layout="head_major", seed=6)
    assert torch.equal(bt, bt2) and kc.stride() != vc.stride()
    idx, cnt, rows = random_decode_selection(LENS, hkv, bs, 5, 7, device=device)
    q, sl = batch["q_packed"], batch["seq_lens"]
    out, _ = paged_sparse_decode(q, kc, vc, bt, sl, idx, cnt, bs, impl="triton")
    oout, _ = decode_oracle(batch, LENS, rows, bs, 1 / math.sqrt(d), hq)
    assert rel_err(out, oout) < KERNEL_FP32_TOL


def random_decode_selection(lens, hkv, bs, kmax, seed, empty_prob=0.1, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    rows = [[random_block_subset(gen, (n - 1) // bs, kmax, empty_prob) for _ in range(hkv)] for n in lens]
    idx, cnt = pack_selection(rows, kmax)
    return idx.to(device), cnt.to(device), rows


def decode_oracle(batch, lens, rows, bs, scale, hq):
    """Float64 (out [S, Hq, D], lse [S, Hq]): the query at seq_len - 1 over the selected blocks."""
    hkv = batch["k"][0].shape[0]
    outs, lses = [], []
    for s, n in enumerate(lens):
        allowed = torch.zeros(hkv, 1, n, dtype=torch.bool)
        for h in range(hkv):
            for j in rows[s][h]:
                allowed[h, 0, j * bs: (j + 1) * bs] = True
        allowed = allowed.repeat_interleave(hq // hkv, 0)
        o, lse = masked_attention_oracle(batch["q"][s], batch["k"][s], batch["v"][s], allowed, scale)
        outs.append(o[:, 0])
        lses.append(lse[:, 0])
    return torch.stack(outs), torch.stack(lses)


def _setup(hq, hkv, d, bs, page, layout, dtype, lens=LENS, seed=0, kmax=5, empty_prob=0.1, device="cpu",
           **cache_kw):
    batch = make_varlen_batch([(n, 1) for n in lens], hq, hkv, d, dtype, seed=seed, device=device)
    kc, vc, bt = make_paged_cache(batch["k"], batch["v"], page, layout=layout, seed=seed + 1, **cache_kw)
    idx, cnt, rows = random_decode_selection(lens, hkv, bs, kmax, seed + 2, empty_prob, device=device)
    return batch, kc, vc, bt, idx, cnt, rows


@pytest.mark.parametrize("hq,hkv,d,bs,page,layout,dtype", CASES)
def test_decode_matches_twin_and_oracle(hq, hkv, d, bs, page, layout, dtype, device):
    skip_if_interpreted_bf16_dot(dtype)
    batch, kc, vc, bt, idx, cnt, rows = _setup(hq, hkv, d, bs, page, layout, dtype, seed=hq + d + page,
                                               device=device)
    q, sl = batch["q_packed"], batch["seq_lens"]
    scale = 1 / math.sqrt(d)
    out, lse = paged_sparse_decode(q, kc, vc, bt, sl, idx, cnt, bs, impl="triton")
    tout, tlse = paged_sparse_decode(q, kc, vc, bt, sl, idx, cnt, bs, impl="torch")
    oout, olse = decode_oracle(batch, LENS, rows, bs, scale, hq)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (len(LENS), hq) and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    # the output rounding to the dtype bounds the error of both (the kernel accumulates in fp32)
    tol = {torch.float32: KERNEL_FP32_TOL, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert rel_err(out, oout) < tol and rel_err(tout, oout) < tol
    lse, tlse = lse.cpu(), tlse.cpu()
    fin = torch.isfinite(olse)
    assert torch.equal(torch.isfinite(lse), fin) and torch.equal(torch.isfinite(tlse), fin)
    torch.testing.assert_close(lse[fin].double(), olse[fin], rtol=0, atol=LSE_ATOL)
    torch.testing.assert_close(tlse[fin].double(), olse[fin], rtol=0, atol=LSE_ATOL)


@pytest.mark.parametrize("hq,hkv,d", [(8, 2, 64), (7, 1, 128)], ids=["g4-d64", "g7-d128"])
def test_decode_num_splits_do_not_change_the_result(hq, hkv, d, device):
    batch, kc, vc, bt, idx, cnt, _ = _setup(hq, hkv, d, 16, 16, "kv_pair", torch.float32, seed=3, kmax=9,
                                             empty_prob=0.0, device=device)
    args = (batch["q_packed"], kc, vc, bt, batch["seq_lens"], idx, cnt, 16)
    ref_out, ref_lse = paged_sparse_decode(*args, num_splits=1, impl="triton")
    # 3 splits; more splits than selected blocks (empty splits); the default heuristic
    for ns in (3, 16, None):
        out, lse = paged_sparse_decode(*args, num_splits=ns, impl="triton")
        # on a GPU the TF32 rounding of p depends on each split's running max: not bit-stable across splits
        torch.testing.assert_close(out, ref_out, rtol=KERNEL_FP32_TOL, atol=KERNEL_FP32_TOL / 10)
        torch.testing.assert_close(lse, ref_lse, rtol=KERNEL_FP32_TOL, atol=KERNEL_FP32_TOL / 10)
    # the heuristic: ~264 programs (two waves of 132 SMs), at least one block per split, at most 64 splits
    assert default_num_splits(1, 8, 2048) == 33 and default_num_splits(64, 8, 2048) == 1
    assert default_num_splits(1, 8, 8) == 8 and default_num_splits(1, 1, 1 << 20) == 64


def test_decode_empty_selection_gives_zero_and_minus_inf(device):
    batch, kc, vc, bt, idx, cnt, _ = _setup(4, 2, 64, 16, 16, "plain", torch.float32, seed=4, empty_prob=0.0,
                                             device=device)
    cnt = cnt.clone()
    cnt[2] = 0  # both KV heads of sequence 2
    cnt[4, 1] = 0  # one KV head of sequence 4
    for impl, ns in (("triton", 1), ("triton", 4), ("torch", None)):
        out, lse = paged_sparse_decode(batch["q_packed"], kc, vc, bt, batch["seq_lens"], idx, cnt, 16,
                                       num_splits=ns, impl=impl)
        assert not out.isnan().any() and not lse.isnan().any(), impl
        assert (out[2] == 0).all() and torch.isneginf(lse[2]).all(), impl
        assert (out[4, 2:] == 0).all() and torch.isneginf(lse[4, 2:]).all(), impl
        assert torch.isfinite(lse[4, :2]).all() and (out[4, :2].abs().sum(-1) > 0).all(), impl


@pytest.mark.parametrize("hq,hkv,bs,page", [(8, 2, 64, 16), (7, 1, 16, 32), (4, 4, 32, 48)],
                         ids=["g4-bs64-page16", "g7-bs16-page32", "g1-bs32-page48"])
def test_decode_equals_last_row_of_prefill(hq, hkv, bs, page, device):
    """Same cache, same selection: the decode output of each sequence equals the prefill output of its last
    row (full prefills and a chunked one over a cached prefix)."""
    specs = [(200, 200), (97, 30), (1, 1), (65, 65), (130, 2)]
    d = 64
    batch = make_varlen_batch(specs, hq, hkv, d, torch.float32, seed=5, device=device)
    kc, vc, bt = make_paged_cache(batch["k"], batch["v"], page, layout="kv_pair", seed=6)
    gen = torch.Generator().manual_seed(7)
    seq, qb, rows = [], [], []
    for s, (n, ql) in enumerate(specs):
        for mb in range((n - ql) // bs, (n - 1) // bs + 1):
            seq.append(s)
            qb.append(mb)
            rows.append([random_block_subset(gen, mb, 4, 0.0) for _ in range(hkv)])
    idx, cnt = pack_selection(rows, 4)
    idx, cnt = idx.to(device), cnt.to(device)
    tiles = PrefillTiles(torch.tensor(seq, dtype=torch.int32, device=device),
                         torch.tensor(qb, dtype=torch.int32, device=device), idx, cnt)
    qsl = batch["query_start_loc"]
    pre = paged_sparse_prefill(batch["q_packed"], kc, vc, bt, qsl, batch["seq_lens"], tiles, bs, impl="triton")
    last_tile = [max(t for t, x in enumerate(seq) if x == s) for s in range(len(specs))]
    last_rows = qsl[1:].long() - 1
    dq = batch["q_packed"][last_rows]
    for impl in ("triton", "torch"):
        dec, _ = paged_sparse_decode(dq, kc, vc, bt, batch["seq_lens"], idx[last_tile], cnt[last_tile], bs,
                                     num_splits=3 if impl == "triton" else None, impl=impl)
        torch.testing.assert_close(dec, pre[last_rows], rtol=KERNEL_FP32_TOL, atol=KERNEL_FP32_TOL)


@pytest.mark.parametrize("page", [1, 2], ids=lambda p: f"page{p}")
def test_decode_cache_with_many_pages_at_high_ids(page, device):
    """>= 32k pages, the used ones at the top of the id range (see the prefill twin of this test)."""
    lens = [150, 3, 64]
    batch, kc, vc, bt, idx, cnt, rows = _setup(4, 2, 64, 16, page, "plain", torch.float32, lens=lens, seed=8,
                                               device=device, num_pages=70000 // page, high_ids=True)
    assert kc.shape[0] >= 32768 and int(bt[bt > 0].min()) >= kc.shape[0] - 220 // page
    out, lse = paged_sparse_decode(batch["q_packed"], kc, vc, bt, batch["seq_lens"], idx, cnt, 16, impl="triton")
    oout, olse = decode_oracle(batch, lens, rows, 16, 1 / 8, 4)
    assert rel_err(out, oout) < KERNEL_FP32_TOL
    fin = torch.isfinite(olse)
    torch.testing.assert_close(lse.cpu()[fin].double(), olse[fin], rtol=0, atol=LSE_ATOL)


def test_decode_writes_into_strided_out(device):
    batch, kc, vc, bt, idx, cnt, _ = _setup(4, 2, 64, 16, 16, "plain", torch.float32, seed=9, empty_prob=0.0,
                                             device=device)
    args = (batch["q_packed"], kc, vc, bt, batch["seq_lens"], idx, cnt, 16)
    want, _ = paged_sparse_decode(*args, impl="torch")
    for impl in ("triton", "torch"):
        buf = torch.full((len(LENS), 4, 2, 64), 7.0, device=device)
        out = buf[:, :, 0]
        res, _ = paged_sparse_decode(*args, out=out, impl=impl)
        assert res.data_ptr() == out.data_ptr()
        torch.testing.assert_close(out, want, rtol=KERNEL_FP32_TOL, atol=KERNEL_FP32_TOL)
        assert (buf[:, :, 1] == 7.0).all()


def _bad_inputs():
    return [
        ("q-fp16-cache-fp32", lambda a: a.update(q=a["q"].half())),
        ("head-dim-mismatch", lambda a: a.update(q=a["q"][..., :32].contiguous())),
        ("hq-not-multiple-of-hkv", lambda a: a.update(q=a["q"][:, :3].contiguous())),
        ("block-table-int64", lambda a: a.update(block_table=a["block_table"].long())),
        ("seq-lens-int64", lambda a: a.update(seq_lens=a["seq_lens"].long())),
        ("indices-int64", lambda a: a.update(indices=a["indices"].long())),
        ("counts-int64", lambda a: a.update(counts=a["counts"].long())),
        ("indices-wrong-heads", lambda a: a.update(indices=a["indices"][:, :1], counts=a["counts"][:, :1])),
        ("counts-wrong-shape", lambda a: a.update(counts=a["counts"][:-1])),
        ("q-not-3d", lambda a: a.update(q=a["q"][None])),
        ("num-splits-zero", lambda a: a.update(num_splits=0)),
        ("num-splits-over-the-merge-tile", lambda a: a.update(num_splits=65)),
    ]


@pytest.mark.parametrize("mutate", [m for _, m in _bad_inputs()], ids=[i for i, _ in _bad_inputs()])
def test_decode_rejects_bad_inputs(mutate, device):
    batch, kc, vc, bt, idx, cnt, _ = _setup(4, 2, 64, 16, 16, "plain", torch.float32, lens=[40, 17], device=device)
    a = dict(q=batch["q_packed"], key_cache=kc, value_cache=vc, block_table=bt, seq_lens=batch["seq_lens"],
             indices=idx, counts=cnt, block_size=16)
    mutate(a)
    with pytest.raises(ValueError):
        paged_sparse_decode(**a, impl="triton")


@pytest.mark.parametrize("which", ["block_table-col-major", "seq_lens-strided"])
def test_decode_non_contiguous_metadata_is_rejected_or_honoured(which, device):
    """A strided block_table or seq_lens must raise ValueError or give the right answer, never a silently
    wrong one (the kernel reads both with unit stride)."""
    batch, kc, vc, bt, idx, cnt, _ = _setup(4, 2, 64, 16, 16, "plain", torch.float32, lens=[40, 33], seed=10,
                                             empty_prob=0.0, device=device)
    a = dict(q=batch["q_packed"], key_cache=kc, value_cache=vc, block_table=bt, seq_lens=batch["seq_lens"],
             indices=idx, counts=cnt, block_size=16)
    want, _ = paged_sparse_decode(**a, impl="torch")
    name = which.split("-")[0]
    t = a[name]
    a[name] = t.t().contiguous().t() if name == "block_table" else torch.stack([t, torch.zeros_like(t)], -1)[..., 0]
    assert torch.equal(a[name], t) and not a[name].is_contiguous()
    try:
        got, _ = paged_sparse_decode(**a, impl="triton")
    except ValueError:
        return
    assert rel_err(got, want) < KERNEL_FP32_TOL, f"non-contiguous {name} accepted but the output is wrong"
