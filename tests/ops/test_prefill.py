"""ops.prefill.paged_sparse_prefill: Triton (interpreted on CPU) vs the PyTorch twin vs a float64 oracle built
from the selection, on varlen batches over a randomly paged vLLM cache."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import (KERNEL_FP32_TOL, LAYOUTS, make_paged_cache, make_varlen_batch, masked_attention_oracle,
                      pack_selection, random_block_subset, rel_err, skip_if_interpreted_bf16_dot)
from cab_vllm.ops.prefill import PrefillTiles, paged_sparse_prefill

# (seq_len, q_len): full prefills of awkward lengths, a chunked prefill over a cached prefix, a 1-token
# sequence, and a decode-like row (1 new token after 129 cached) in the same batch
SPECS = [(200, 200), (97, 40), (1, 1), (63, 63), (130, 1)]

# (Hq, Hkv, D, block_size, page_size, layout, dtype)
CASES = [
    pytest.param(2, 2, 64, 64, 16, "plain", torch.float32, id="g1-d64-bs64-page16-plain-fp32"),
    pytest.param(8, 2, 128, 64, 32, "kv_pair", torch.float32, id="g4-d128-bs64-page32-kvpair-fp32"),
    pytest.param(7, 1, 64, 64, 64, "head_major", torch.float32, id="g7-d64-bs64-page64-headmajor-fp32"),
    pytest.param(4, 1, 64, 16, 64, "plain", torch.float32, id="g4-d64-bs16-page64-plain-fp32"),
    pytest.param(4, 2, 64, 64, 48, "kv_interleaved", torch.float32, id="g2-d64-bs64-page48-kvinterleaved-fp32"),
    pytest.param(8, 1, 80, 16, 16, "head_major", torch.float32, id="g8-d80-bs16-page16-headmajor-fp32"),
    pytest.param(8, 2, 64, 32, 16, "kv_pair", torch.float16, id="g4-d64-bs32-page16-kvpair-fp16"),
    pytest.param(7, 1, 128, 64, 16, "kv_interleaved", torch.float16, id="g7-d128-bs64-page16-kvinterleaved-fp16"),
    pytest.param(8, 2, 128, 64, 16, "kv_pair", torch.bfloat16, id="g4-d128-bs64-page16-kvpair-bf16"),
]


def random_tiles(specs, hkv: int, bs: int, kmax: int, seed: int, empty_prob: float = 0.1, device="cpu"):
    """One tile per (sequence, query block holding new tokens), each with a random selection per KV head.
    Returns PrefillTiles and the Python selection lists [tile][kvh] -> blocks."""
    gen = torch.Generator().manual_seed(seed)
    seq, qb, rows = [], [], []
    for s, (n, ql) in enumerate(specs):
        for mb in range((n - ql) // bs, (n - 1) // bs + 1):
            seq.append(s)
            qb.append(mb)
            rows.append([random_block_subset(gen, mb, kmax, empty_prob) for _ in range(hkv)])
    idx, cnt = pack_selection(rows, kmax)
    tiles = PrefillTiles(torch.tensor(seq, dtype=torch.int32), torch.tensor(qb, dtype=torch.int32), idx, cnt)
    return PrefillTiles(*(t.to(device) for t in tiles)), rows


def diagonal_tiles(specs, hkv: int, bs: int, device="cpu"):
    """One tile per (sequence, query block holding new tokens); per (tile, KV head) in turn every causal block,
    the diagonal block alone, or every block but the diagonal. Returns PrefillTiles and the selection lists."""
    seq, qb, rows = [], [], []
    for s, (n, ql) in enumerate(specs):
        for mb in range((n - ql) // bs, (n - 1) // bs + 1):
            pattern = [list(range(mb + 1)), [mb], list(range(mb))]
            rows.append([pattern[(len(seq) + h) % 3] for h in range(hkv)])
            seq.append(s)
            qb.append(mb)
    idx, cnt = pack_selection(rows, max(len(b) for per_head in rows for b in per_head))
    tiles = PrefillTiles(torch.tensor(seq, dtype=torch.int32), torch.tensor(qb, dtype=torch.int32), idx, cnt)
    return PrefillTiles(*(t.to(device) for t in tiles)), rows


def allowed_mask(spec, s: int, tiles: PrefillTiles, rows, bs: int, hq: int, hkv: int) -> torch.Tensor:
    """[Hq, q_len, seq_len] bool of sequence s: row p may see key t iff t <= p and t's block is selected for
    the tile holding p."""
    n, ql = spec
    ctx = n - ql
    allowed = torch.zeros(hkv, ql, n, dtype=torch.bool)
    for t in range(len(rows)):
        if int(tiles.seq[t]) != s:
            continue
        mb = int(tiles.qblock[t])
        for h in range(hkv):
            for j in rows[t][h]:
                for p in range(max(mb * bs, ctx), min((mb + 1) * bs, n)):
                    allowed[h, p - ctx, j * bs: min((j + 1) * bs, p + 1)] = True
    return allowed.repeat_interleave(hq // hkv, 0)


def prefill_oracle(batch, specs, tiles: PrefillTiles, rows, bs: int, scale: float, hq: int) -> torch.Tensor:
    """Float64 [T, Hq, D] from the selection lists (independent of the library's reference)."""
    hkv = batch["k"][0].shape[0]
    outs = []
    for s, spec in enumerate(specs):
        allowed = allowed_mask(spec, s, tiles, rows, bs, hq, hkv)
        o, _ = masked_attention_oracle(batch["q"][s], batch["k"][s], batch["v"][s], allowed, scale)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


def same_dtype_error(batch, specs, tiles, rows, bs, scale, hq, oracle) -> float:
    """Relative error against the oracle of the same masked attention computed by PyTorch in the input dtype
    (habit 4's yardstick: the kernel may be at most ~2x worse)."""
    if batch["q"][0].dtype == torch.float32:
        return 0.0
    hkv = batch["k"][0].shape[0]
    outs = []
    for s, spec in enumerate(specs):
        allowed = allowed_mask(spec, s, tiles, rows, bs, hq, hkv)
        kx = batch["k"][s].repeat_interleave(hq // hkv, 0)
        vx = batch["v"][s].repeat_interleave(hq // hkv, 0)
        sc = ((batch["q"][s] @ kx.transpose(-1, -2)) * scale).masked_fill(~allowed.to(kx.device), float("-inf"))
        p = torch.softmax(sc, -1).nan_to_num(0.0)  # all in the input dtype
        outs.append((p @ vx).transpose(0, 1))
    return rel_err(torch.cat(outs), oracle)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("page", [16, 32, 48, 64], ids=lambda p: f"page{p}")
def test_paged_cache_helper(page, layout):
    """The test cache itself: a permuted table that never uses the null page, the requested strides, and the
    library's gather returns the contiguous K/V."""
    from cab_vllm.ops.blocks import gather_paged

    batch = make_varlen_batch(SPECS, 2, 2, 64, torch.float32)
    kc, vc, bt = make_paged_cache(batch["k"], batch["v"], page, layout=layout)
    assert kc.shape[1:] == (page, 2, 64) and bt.dtype == torch.int32
    used = bt[bt > 0]
    assert len(used) == len(set(used.tolist())) == sum(-(-n // page) for n, _ in SPECS)
    assert torch.isnan(kc[0]).all() and torch.isnan(vc[0]).all()
    if layout == "kv_pair":
        assert kc.untyped_storage().data_ptr() == vc.untyped_storage().data_ptr()
        assert vc.data_ptr() - kc.data_ptr() == kc.numel() * 4
    if layout == "kv_interleaved":
        assert not kc.is_contiguous() and kc.stride(0) == 2 * page * 2 * 64
    if layout == "head_major":
        assert kc.stride(2) > kc.stride(1)
    for s, (n, _) in enumerate(SPECS):
        assert torch.equal(gather_paged(kc, bt[s], n), batch["k"][s])
        assert torch.equal(gather_paged(vc, bt[s], n), batch["v"][s])
        for st in sorted({0, 1, page - 1, page, n // 2, n - 1} & set(range(n))):  # from any position, any layout
            assert torch.equal(gather_paged(kc, bt[s], n, start=st), batch["k"][s][:, st:])
            assert torch.equal(gather_paged(vc, bt[s], n - 1, start=st)[:, : n - 1 - st], batch["v"][s][:, st: n - 1])


@pytest.mark.parametrize("hq,hkv,d,bs,page,layout,dtype", CASES)
def test_prefill_matches_twin_and_oracle(hq, hkv, d, bs, page, layout, dtype, device):
    skip_if_interpreted_bf16_dot(dtype)
    batch = make_varlen_batch(SPECS, hq, hkv, d, dtype, seed=hq * d + bs, device=device)
    kc, vc, bt = make_paged_cache(batch["k"], batch["v"], page, layout=layout, seed=page)
    tiles, rows = random_tiles(SPECS, hkv, bs, kmax=4, seed=d + page, device=device)
    scale = 1.0 / math.sqrt(d)
    args = (batch["q_packed"], kc, vc, bt, batch["query_start_loc"], batch["seq_lens"], tiles, bs)
    got = paged_sparse_prefill(*args, impl="triton")
    twin = paged_sparse_prefill(*args, impl="torch")
    oracle = prefill_oracle(batch, SPECS, tiles, rows, bs, scale, hq)
    assert got.shape == batch["q_packed"].shape and got.dtype == dtype
    assert not got.isnan().any(), "the kernel read a NaN slot (null page, unused page or past seq_len)"
    base = same_dtype_error(batch, SPECS, tiles, rows, bs, scale, hq, oracle)
    assert rel_err(got, oracle) <= 2 * base + KERNEL_FP32_TOL
    assert rel_err(twin, oracle) <= 2 * base + 1e-5
    # rows whose selection is empty are exactly zero in both
    empty_rows = oracle.abs().amax(-1) == 0
    assert (got.cpu()[empty_rows] == 0).all() and (twin.cpu()[empty_rows] == 0).all()


def test_prefill_empty_selection_gives_zero_not_nan(device):
    specs = [(70, 70), (33, 10)]
    batch = make_varlen_batch(specs, 4, 2, 64, torch.float32, seed=1, device=device)
    kc, vc, bt = make_paged_cache(batch["k"], batch["v"], 16)
    tiles, rows = random_tiles(specs, 2, 16, kmax=3, seed=2, empty_prob=0.0, device=device)
    counts = tiles.counts.clone()
    counts[1] = 0  # every head of tile 1 (sequence 0, rows 16..31)
    assert tiles.seq.tolist() == [0, 0, 0, 0, 0, 1, 1] and tiles.qblock[5] == 1
    counts[5, 1] = 0  # KV head 1 of tile 5: sequence 1, block 1 = positions 23..31 = its packed rows 70..78
    tiles = tiles._replace(counts=counts)
    for impl in ("triton", "torch"):
        out = paged_sparse_prefill(batch["q_packed"], kc, vc, bt, batch["query_start_loc"], batch["seq_lens"], tiles,
                                   16, impl=impl)
        assert not out.isnan().any(), impl
        assert (out[16:32] == 0).all(), impl
        assert (out[70:79, 2:4] == 0).all() and (out[70:79, 0:2].abs().sum(-1) > 0).all(), impl
        assert (out[:16].abs().sum(-1) > 0).all(), impl


def test_dense_api_path_equals_paged_path(device):
    """cab_vllm.sparse_attention on [B, H, N, D] tensors (the dense path of the same kernel) equals
    paged_sparse_prefill over a randomly paged copy of the same K/V."""
    import cab_vllm

    b, hq, hkv, n, d, bs = 2, 8, 2, 97, 64, 32
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(b, hq, n, d, generator=gen).to(device)
    k = torch.randn(b, hkv, n, d, generator=gen).to(device)
    v = torch.randn(b, hkv, n, d, generator=gen).to(device)
    sel = cab_vllm.select_blocks(q, k, cab_vllm.CABConfig(block_size=bs, sparsity=0.5, policy="random"), impl="torch")
    dense = cab_vllm.sparse_attention(q, k, v, sel, impl="triton")
    kc, vc, bt = make_paged_cache(k, v, 16, layout="kv_pair", seed=4)
    qsl = torch.arange(b + 1, dtype=torch.int32, device=device) * n
    sl = torch.full((b,), n, dtype=torch.int32, device=device)
    paged = paged_sparse_prefill(q.transpose(1, 2).reshape(b * n, hq, d), kc, vc, bt, qsl, sl, sel.to_tiles(), bs,
                                 impl="triton")
    torch.testing.assert_close(dense.transpose(1, 2).reshape(b * n, hq, d), paged, rtol=1e-6, atol=1e-6)
    twin = cab_vllm.sparse_attention(q, k, v, sel, impl="torch")
    assert rel_err(dense, twin) < KERNEL_FP32_TOL


@pytest.mark.parametrize("page", [1, 2], ids=lambda p: f"page{p}")
def test_prefill_cache_with_many_pages_at_high_ids(page, device):
    """>= 32k pages with the used ones at the top of the id range: page ids and page * stride offsets far
    beyond 16-bit and block-local ranges (a true 2^31 element offset would need > 4 GB of cache)."""
    specs = [(100, 100), (70, 30)]
    batch = make_varlen_batch(specs, 4, 2, 64, torch.float32, seed=5, device=device)
    kc, vc, bt = make_paged_cache(batch["k"], batch["v"], page, num_pages=70000 // page, high_ids=True, seed=6)
    assert kc.shape[0] >= 32768 and int(bt[bt > 0].min()) >= kc.shape[0] - 200 // page
    tiles, rows = random_tiles(specs, 2, 16, kmax=4, seed=7, device=device)
    out = paged_sparse_prefill(batch["q_packed"], kc, vc, bt, batch["query_start_loc"], batch["seq_lens"], tiles, 16,
                               impl="triton")
    oracle = prefill_oracle(batch, specs, tiles, rows, 16, 1 / 8, 4)
    assert rel_err(out, oracle) < KERNEL_FP32_TOL


def test_prefill_writes_into_strided_out(device):
    specs = [(50, 50)]
    batch = make_varlen_batch(specs, 4, 2, 64, torch.float32, seed=8, device=device)
    kc, vc, bt = make_paged_cache(batch["k"], batch["v"], 16)
    tiles, _ = random_tiles(specs, 2, 16, kmax=3, seed=9, empty_prob=0.0, device=device)
    args = (batch["q_packed"], kc, vc, bt, batch["query_start_loc"], batch["seq_lens"], tiles, 16)
    want = paged_sparse_prefill(*args, impl="torch")
    for impl in ("triton", "torch"):
        buf = torch.full((50, 4, 2, 64), 7.0, device=device)
        out = buf[:, :, 1]  # a strided view, like a slice of a larger output buffer
        res = paged_sparse_prefill(*args, out=out, impl=impl)
        assert res.data_ptr() == out.data_ptr()
        torch.testing.assert_close(out, want, rtol=KERNEL_FP32_TOL, atol=KERNEL_FP32_TOL)
        assert (buf[:, :, 0] == 7.0).all(), "wrote outside the out view"


def _bad_inputs():
    """(id, mutation of the argument dict) pairs that must raise ValueError."""
    return [
        ("q-fp16-cache-fp32", lambda a: a.update(q=a["q"].half())),
        ("value-cache-dtype", lambda a: a.update(value_cache=a["value_cache"].half())),
        ("head-dim-mismatch", lambda a: a.update(q=a["q"][..., :32].contiguous())),
        ("hq-not-multiple-of-hkv", lambda a: a.update(q=a["q"][:, :3].contiguous())),
        ("block-table-int64", lambda a: a.update(block_table=a["block_table"].long())),
        ("seq-lens-int64", lambda a: a.update(seq_lens=a["seq_lens"].long())),
        ("query-start-loc-int64", lambda a: a.update(query_start_loc=a["query_start_loc"].long())),
        ("query-start-loc-wrong-size", lambda a: a.update(query_start_loc=a["query_start_loc"][:-1])),
        ("q-not-3d", lambda a: a.update(q=a["q"][None])),
        ("cache-not-4d", lambda a: a.update(key_cache=a["key_cache"][..., None], value_cache=a["value_cache"][..., None])),
        ("head-dim-not-contiguous", lambda a: a.update(q=a["q"].transpose(0, 2).contiguous().transpose(0, 2))),
        ("block-size-not-pow2", lambda a: a.update(block_size=48)),
        ("head-dim-below-16", lambda a: a.update(q=a["q"][..., :8].contiguous(), key_cache=a["key_cache"][..., :8],
                                                  value_cache=a["value_cache"][..., :8])),
        ("tiles-wrong-heads", lambda a: a.update(tiles=a["tiles"]._replace(indices=a["tiles"].indices[:, :1],
                                                                             counts=a["tiles"].counts[:, :1]))),
    ]


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("mutate", [m for _, m in _bad_inputs()], ids=[i for i, _ in _bad_inputs()])
def test_prefill_rejects_bad_inputs(mutate, impl, device):
    specs = [(40, 40)]
    batch = make_varlen_batch(specs, 4, 2, 64, torch.float32, device=device)
    kc, vc, bt = make_paged_cache(batch["k"], batch["v"], 16)
    tiles, _ = random_tiles(specs, 2, 16, kmax=2, seed=0, device=device)
    a = dict(q=batch["q_packed"], key_cache=kc, value_cache=vc, block_table=bt,
             query_start_loc=batch["query_start_loc"], seq_lens=batch["seq_lens"], tiles=tiles, block_size=16)
    mutate(a)
    with pytest.raises(ValueError):
        paged_sparse_prefill(**a, impl=impl)


@pytest.mark.parametrize("which", ["block_table-col-major", "seq_lens-strided", "query_start_loc-strided"])
def test_prefill_non_contiguous_metadata_is_rejected_or_honoured(which, device):
    """The kernel reads block_table rows, seq_lens and query_start_loc with unit stride. A strided view
    must either raise ValueError or give the right answer, never a silently wrong one."""
    specs = [(40, 40), (33, 33)]
    batch = make_varlen_batch(specs, 4, 2, 64, torch.float32, seed=10, device=device)
    kc, vc, bt = make_paged_cache(batch["k"], batch["v"], 16, seed=11)
    tiles, _ = random_tiles(specs, 2, 16, kmax=3, seed=12, empty_prob=0.0, device=device)
    a = dict(q=batch["q_packed"], key_cache=kc, value_cache=vc, block_table=bt,
             query_start_loc=batch["query_start_loc"], seq_lens=batch["seq_lens"], tiles=tiles, block_size=16)
    want = paged_sparse_prefill(**a, impl="torch")
    name = which.split("-")[0]
    t = a[name]
    if name == "block_table":
        a[name] = t.t().contiguous().t()
    else:
        a[name] = torch.stack([t, torch.zeros_like(t)], -1)[..., 0]
    assert torch.equal(a[name], t) and not a[name].is_contiguous()
    try:
        got = paged_sparse_prefill(**a, impl="triton")
    except ValueError:
        return
    assert rel_err(got, want) < KERNEL_FP32_TOL, f"non-contiguous {name} accepted but the output is wrong"


@pytest.mark.parametrize("hq,hkv,d,bs,page,layout,dtype", [CASES[0], CASES[2], CASES[3]])
def test_only_the_diagonal_block_is_masked(hq, hkv, d, bs, page, layout, dtype, device):
    """The kernel masks scores only in each tile's diagonal block (the causal and sequence-end masks are no-ops
    before it): per (tile, KV head) every causal block, the diagonal block alone, or every block but the diagonal,
    over sequence lengths that are not multiples of the block and chunked queries after a cached prefix, equal the
    float64 oracle and the PyTorch twin."""
    specs = [(200, 200), (97, 40), (130, 70), (63, 63), (150, 1), (1, 1)]
    batch = make_varlen_batch(specs, hq, hkv, d, dtype, seed=5, device=device)
    kc, vc, bt = make_paged_cache(batch["k"], batch["v"], page, layout=layout, seed=6)
    tiles, rows = diagonal_tiles(specs, hkv, bs, device)
    scale = 1.0 / math.sqrt(d)
    args = (batch["q_packed"], kc, vc, bt, batch["query_start_loc"], batch["seq_lens"], tiles, bs)
    got = paged_sparse_prefill(*args, impl="triton")
    twin = paged_sparse_prefill(*args, impl="torch")
    assert not got.isnan().any()
    oracle = prefill_oracle(batch, specs, tiles, rows, bs, scale, hq)
    assert rel_err(got, oracle) <= KERNEL_FP32_TOL
    assert rel_err(got, twin) <= KERNEL_FP32_TOL


@pytest.mark.parametrize("lazy,reverse", [(1, 0), (0, 1), (1, 1)])
@pytest.mark.parametrize("sharp", [1.0, 24.0], ids=["scale", "sharp"])
@pytest.mark.parametrize("hq,hkv,d,bs,page,layout,dtype", [CASES[0], CASES[2], CASES[7], CASES[8]])
def test_launch_options_give_the_same_attention(hq, hkv, d, bs, page, layout, dtype, sharp, lazy, reverse, device,
                                                monkeypatch):
    """The tuning sweep's launch options (prefill.LAUNCH_OVERRIDE): lazy_rescale=1 (the accumulator rescaled only
    when a row's block maximum passes its running maximum by more than 2**8) and reverse_tiles=1 (programs take the
    tiles last to first): random selections (empty ones included) and the diagonal patterns equal the float64
    oracle as the default launch does, also with scores sharpened so the maxima jump from block to block (the
    rescale branch taken mid-loop); other values are refused by name."""
    import cab_vllm.ops.prefill as prefill

    skip_if_interpreted_bf16_dot(dtype)
    specs = [(200, 200), (97, 40), (130, 70), (63, 63), (150, 1), (1, 1), (333, 333)]
    batch = make_varlen_batch(specs, hq, hkv, d, dtype, seed=13, device=device)
    kc, vc, bt = make_paged_cache(batch["k"], batch["v"], page, layout=layout, seed=14)
    scale = sharp / math.sqrt(d)
    args = (batch["q_packed"], kc, vc, bt, batch["query_start_loc"], batch["seq_lens"])
    monkeypatch.setitem(prefill.LAUNCH_OVERRIDE, "lazy_rescale", lazy)
    monkeypatch.setitem(prefill.LAUNCH_OVERRIDE, "reverse_tiles", reverse)
    for tiles, rows in (random_tiles(specs, hkv, bs, kmax=5, seed=15, device=device),
                        diagonal_tiles(specs, hkv, bs, device)):
        got = paged_sparse_prefill(*args, tiles, bs, scale=scale, impl="triton")
        assert not got.isnan().any() and not got.isinf().any()
        oracle = prefill_oracle(batch, specs, tiles, rows, bs, scale, hq)
        base = same_dtype_error(batch, specs, tiles, rows, bs, scale, hq, oracle)
        assert rel_err(got, oracle) <= 2 * base + KERNEL_FP32_TOL
    for key, bad in (("lazy_rescale", 2), ("reverse_tiles", -1), ("tma", 2)):
        monkeypatch.setitem(prefill.LAUNCH_OVERRIDE, key, bad)
        with pytest.raises(ValueError, match=f"{key} must be 0 or 1"):
            paged_sparse_prefill(*args, tiles, bs, impl="triton")
        monkeypatch.setitem(prefill.LAUNCH_OVERRIDE, key, 0)


TMA_CASES = [
    pytest.param(7, 1, 64, 64, 64, "head_major", torch.float32, id="g7-d64-bs64-page64-headmajor-fp32"),
    pytest.param(4, 1, 64, 16, 64, "plain", torch.float32, id="g4-d64-bs16-page64-plain-fp32"),
    pytest.param(8, 2, 128, 64, 128, "kv_pair", torch.float16, id="g4-d128-bs64-page128-kvpair-fp16"),
    pytest.param(8, 2, 128, 64, 64, "kv_interleaved", torch.bfloat16, id="g4-d128-bs64-page64-kvinterleaved-bf16"),
]


@pytest.mark.parametrize("lazy", [0, 1])
@pytest.mark.parametrize("hq,hkv,d,bs,page,layout,dtype", TMA_CASES)
def test_tma_launch_option_gives_the_same_attention(hq, hkv, d, bs, page, layout, dtype, lazy, device, monkeypatch):
    """tma=1 (a launch option for the tuning sweep: every selected block but a tile's last loaded as one tensor-
    descriptor box of its page, pages of a multiple of the block): random selections (empty ones, selections
    without the diagonal block) and the diagonal patterns equal the float64 oracle, over caches whose unused slots
    are NaN (the last block, the only one that can hold them, goes through the masked path); pages of other sizes
    and non-power-of-two head dims are refused by name."""
    import cab_vllm.ops.prefill as prefill

    skip_if_interpreted_bf16_dot(dtype)
    specs = [(200, 200), (97, 40), (130, 70), (63, 63), (150, 1), (1, 1), (333, 333)]
    batch = make_varlen_batch(specs, hq, hkv, d, dtype, seed=21, device=device)
    kc, vc, bt = make_paged_cache(batch["k"], batch["v"], page, layout=layout, seed=22)
    scale = 1.0 / math.sqrt(d)
    args = (batch["q_packed"], kc, vc, bt, batch["query_start_loc"], batch["seq_lens"])
    monkeypatch.setitem(prefill.LAUNCH_OVERRIDE, "tma", 1)
    monkeypatch.setitem(prefill.LAUNCH_OVERRIDE, "lazy_rescale", lazy)
    for tiles, rows in (random_tiles(specs, hkv, bs, kmax=6, seed=23, device=device),
                        diagonal_tiles(specs, hkv, bs, device)):
        got = paged_sparse_prefill(*args, tiles, bs, impl="triton")
        assert not got.isnan().any(), "a NaN slot was read"
        oracle = prefill_oracle(batch, specs, tiles, rows, bs, scale, hq)
        base = same_dtype_error(batch, specs, tiles, rows, bs, scale, hq, oracle)
        assert rel_err(got, oracle) <= 2 * base + KERNEL_FP32_TOL
    kc16, vc16, bt16 = make_paged_cache(batch["k"], batch["v"], 16 if bs > 16 else 8, layout=layout, seed=22)
    with pytest.raises(ValueError, match="tma needs pages of a multiple"):
        paged_sparse_prefill(batch["q_packed"], kc16, vc16, bt16, batch["query_start_loc"], batch["seq_lens"], tiles,
                             bs, impl="triton")


def test_tma_launch_option_refuses_an_odd_head_dim(device, monkeypatch):
    import cab_vllm.ops.prefill as prefill

    specs = [(130, 130)]
    batch = make_varlen_batch(specs, 4, 2, 80, torch.float32, seed=3, device=device)
    kc, vc, bt = make_paged_cache(batch["k"], batch["v"], 64, seed=4)
    tiles, _ = diagonal_tiles(specs, 2, 64, device)
    monkeypatch.setitem(prefill.LAUNCH_OVERRIDE, "tma", 1)
    with pytest.raises(ValueError, match="tma needs a power-of-two head dim"):
        paged_sparse_prefill(batch["q_packed"], kc, vc, bt, batch["query_start_loc"], batch["seq_lens"], tiles, 64,
                             impl="triton")
