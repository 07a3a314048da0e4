"""ops.fa_prefill: CAB's sparse prefill as FlashAttention paged varlen launches (one sequence per query block and KV
head over its kept pages). On the CPU the launches go to a PyTorch twin of flash_attn_varlen_func's call (the
keys of each sequence read through its page table up to seqused_k, bottom-right causal); on a GPU with vLLM also to
vLLM's FlashAttention itself. Both against the float64 oracle of the selection and CAB's own kernel."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import (LAYOUTS, make_paged_cache, make_varlen_batch, pack_selection, rel_err, varlen_twin,
                      vllm_flash_attention)
from cab_vllm.ops.fa_prefill import TABLE_WIDTH, fa_sparse_prefill, fa_tables
from cab_vllm.ops.prefill import PrefillTiles, paged_sparse_prefill
from test_prefill import prefill_oracle, same_dtype_error

# (seq_len, q_len): full prefills of awkward lengths, chunks over a cached prefix that start inside a key block,
# a 1-token sequence
SPECS = [(200, 200), (97, 40), (1, 1), (300, 77), (63, 63), (130, 66)]


def own_block_tiles(specs, hkv: int, bs: int, kmax: int, seed: int, device="cpu"):
    """One tile per (sequence, query block of new tokens), per KV head a random ascending selection that ends with
    the tile's own block (what CAB's policies keep: the diagonal always). Returns PrefillTiles and the lists."""
    gen = torch.Generator().manual_seed(seed)
    seq, qb, rows = [], [], []
    for s, (n, ql) in enumerate(specs):
        for mb in range((n - ql) // bs, (n - 1) // bs + 1):
            per_head = []
            for _ in range(hkv):
                c = int(torch.randint(0, min(kmax - 1, mb) + 1, (1,), generator=gen))
                per_head.append(sorted(torch.randperm(mb, generator=gen)[:c].tolist()) + [mb])
            seq.append(s)
            qb.append(mb)
            rows.append(per_head)
    idx, cnt = pack_selection(rows, kmax)
    tiles = PrefillTiles(torch.tensor(seq, dtype=torch.int32), torch.tensor(qb, dtype=torch.int32), idx, cnt)
    return PrefillTiles(*(t.to(device) for t in tiles)), rows


CASES = [  # (Hq, Hkv, D, block_size, page_size, layout, dtype)
    pytest.param(8, 2, 64, 64, 16, "kv_pair", torch.float16, id="g4-bs64-page16-kvpair-fp16"),
    pytest.param(6, 2, 32, 32, 32, "plain", torch.float16, id="g3-bs32-page32-plain-fp16"),
    pytest.param(4, 4, 64, 64, 32, "kv_interleaved", torch.bfloat16, id="g1-bs64-page32-interleaved-bf16"),
    pytest.param(7, 1, 128, 128, 16, "head_major", torch.bfloat16, id="g7-bs128-page16-headmajor-bf16"),
    pytest.param(8, 2, 128, 64, 64, "kv_pair", torch.bfloat16, id="g4-bs64-page64-kvpair-bf16"),
]


@pytest.mark.parametrize("hq,hkv,d,bs,page,layout,dtype", CASES)
def test_fa_launches_compute_the_selection(hq, hkv, d, bs, page, layout, dtype, device):
    batch = make_varlen_batch(SPECS, hq, hkv, d, dtype, seed=hq + d + page, device=device)
    kc, vc, bt = make_paged_cache(batch["k"], batch["v"], page, layout=layout, seed=page + bs)
    tiles, rows = own_block_tiles(SPECS, hkv, bs, kmax=4, seed=d + bs, device=device)
    scale = 1.0 / math.sqrt(d)
    args = (batch["q_packed"], kc, vc, bt, batch["query_start_loc"], batch["seq_lens"], tiles, bs, scale)
    out = torch.full_like(batch["q_packed"], float("nan"))
    got = fa_sparse_prefill(*args, out=out, varlen=varlen_twin, fa_version=3, streams=2)
    assert got is out and not got.isnan().any(), "a row was left unwritten or read a NaN slot"
    oracle = prefill_oracle(batch, SPECS, tiles, rows, bs, scale, hq)
    base = same_dtype_error(batch, SPECS, tiles, rows, bs, scale, hq, oracle)
    assert rel_err(got, oracle) <= 2 * base + 1e-4
    ref = paged_sparse_prefill(*args, impl="torch")  # CAB's own twin on the same selection
    assert rel_err(got, ref) <= 2 * base + 1e-4


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("page", [16, 32, 64])
def test_fa_tables(page, impl, device):
    """Tile t's packed rows, kept keys and pages, written out by hand for a chunk that starts inside a block (the
    PyTorch twin and the Triton launch)."""
    specs, bs, hkv = [(300, 77), (64, 64), (130, 1)], 64, 2
    batch = make_varlen_batch(specs, 2, hkv, 16, torch.float16, device=device)
    kc, vc, bt = make_paged_cache(batch["k"], batch["v"], page, seed=3)
    tiles, rows = own_block_tiles(specs, hkv, bs, kmax=3, seed=5, device=device)
    t = fa_tables(tiles, bt.to(device), batch["query_start_loc"], batch["seq_lens"], bs, page, impl=impl)
    # sequence 0: new tokens 223..299 -> blocks 3 (223..255) and 4 (256..299); 1: block 0; 2: block 2 (token 129)
    assert t.cu_seqlens_q.tolist() == [0, 33, 77, 141, 142]
    assert t.max_seqlen_k == 3 * bs
    own = [64, 44, 64, 2]  # keys of each tile's own block up to its last token
    per = bs // page
    for i, per_head in enumerate(rows):
        s = int(tiles.seq[i])
        for h, blocks in enumerate(per_head):
            assert int(t.seqused_k[h, i]) == (len(blocks) - 1) * bs + own[i]
            want = [int(bt[s, min(j * per + p, bt.shape[1] - 1)]) for j in blocks for p in range(per)]
            assert t.pages[h, i, : len(want)].tolist() == want


@pytest.mark.parametrize("bs,page,kmax", [(64, 16, 3), (64, 16, 150), (32, 32, 7), (128, 16, 70)])
def test_fa_tables_launch_equals_its_twin(bs, page, kmax, device):
    """The Triton launch writes every entry the PyTorch twin writes (the unused tail and -1 padding as block 0
    included) on random selections of awkward batches, with more page-table entries per tile than one step of a
    program writes (kmax 150 x 4 pages, 70 x 8)."""
    specs = SPECS + [(kmax * bs + 37, bs + 5), (3 * bs, 2 * bs)]
    hkv = 3
    batch = make_varlen_batch(specs, 3, hkv, 16, torch.float16, device=device)
    kc, vc, bt = make_paged_cache(batch["k"], batch["v"], page, seed=kmax)
    tiles, _ = own_block_tiles(specs, hkv, bs, kmax=kmax, seed=kmax + bs, device=device)
    args = (tiles, bt.to(device), batch["query_start_loc"], batch["seq_lens"], bs, page)
    want, got = fa_tables(*args, impl="torch"), fa_tables(*args, impl="triton")
    for w, g in zip(want, got):
        if isinstance(w, torch.Tensor):
            assert g.dtype == w.dtype and torch.equal(g, w)
        else:
            assert g == w
    assert kmax < 100 or got.pages.shape[-1] > TABLE_WIDTH  # the long rows take several steps


def test_fa_prefill_refuses_what_it_cannot_run(device):
    batch = make_varlen_batch([(100, 100)], 4, 2, 32, torch.float16, device=device)
    kc, vc, bt = make_paged_cache(batch["k"], batch["v"], 48)
    tiles, _ = own_block_tiles([(100, 100)], 2, 64, kmax=2, seed=0, device=device)
    args = (batch["q_packed"], kc, vc, bt, batch["query_start_loc"], batch["seq_lens"], tiles, 64, None)
    with pytest.raises(ValueError, match="multiple of the cache's page size 48"):
        fa_sparse_prefill(*args, out=torch.empty_like(batch["q_packed"]), varlen=varlen_twin, fa_version=3)
    kc, vc, bt = make_paged_cache(batch["k"], batch["v"], 16)
    with pytest.raises(ValueError, match="streams=0"):
        fa_sparse_prefill(batch["q_packed"], kc, vc, bt, *args[4:], out=torch.empty_like(batch["q_packed"]),
                          varlen=varlen_twin, fa_version=3, streams=0)
    b32 = make_varlen_batch([(100, 100)], 4, 2, 32, torch.float32, device=device)
    kc, vc, bt = make_paged_cache(b32["k"], b32["v"], 16)
    with pytest.raises(ValueError, match="num_splits=-1"):
        fa_sparse_prefill(*args, out=torch.empty_like(batch["q_packed"]), varlen=varlen_twin, fa_version=3,
                          num_splits=-1)
    with pytest.raises(ValueError, match="fp16/bf16"):
        fa_sparse_prefill(b32["q_packed"], kc, vc, bt, b32["query_start_loc"], b32["seq_lens"], tiles, 64, None,
                          out=torch.empty_like(b32["q_packed"]), varlen=varlen_twin, fa_version=3)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [0, 1])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("hq,hkv,d,bs,page,dtype", [(32, 8, 128, 64, 16, torch.bfloat16),
                                                    (14, 2, 64, 64, 32, torch.float16),
                                                    (9, 3, 64, 64, 64, torch.bfloat16)])
def test_vllm_flash_attention_computes_the_selection(hq, hkv, d, bs, page, dtype, layout, splits):
    """vLLM's own FlashAttention (its version on this GPU) against the oracle and CAB's Triton kernel."""
    varlen, version = vllm_flash_attention()
    specs = SPECS + [(4096 + 37, 2048 + 5)]
    batch = make_varlen_batch(specs, hq, hkv, d, dtype, seed=hq, device="cuda")
    kc, vc, bt = make_paged_cache(batch["k"], batch["v"], page, layout=layout, seed=page)
    tiles, rows = own_block_tiles(specs, hkv, bs, kmax=9, seed=d, device="cuda")
    scale = 1.0 / math.sqrt(d)
    args = (batch["q_packed"], kc, vc, bt, batch["query_start_loc"], batch["seq_lens"], tiles, bs, scale)
    got = fa_sparse_prefill(*args, out=torch.full_like(batch["q_packed"], float("nan")),
                            varlen=varlen, fa_version=version, num_splits=splits)
    assert not got.isnan().any()
    oracle = prefill_oracle(batch, specs, tiles, rows, bs, scale, hq)
    base = same_dtype_error(batch, specs, tiles, rows, bs, scale, hq, oracle)
    assert rel_err(got, oracle) <= 2 * base + 1e-4
    triton = paged_sparse_prefill(*args, impl="triton")
    assert rel_err(got, triton) <= 2 * base + 1e-4


def test_side_streams_wait_for_the_caller_and_the_caller_for_them(monkeypatch):
    """The lanes of fa_sparse_prefill's launches (CUDA streams faked here): the caller's stream first, then side
    streams made once per device and index, each waiting for the caller's queued work; _join makes the caller wait
    for every side stream. One lane off CUDA or for one stream."""
    from cab_vllm.ops import fa_prefill

    log, made = [], []

    class FakeStream:
        def __init__(self, device=None, name=None):
            self.device, self.name = device, name or f"side{len(made)}"
            made.append(self)

        def wait_stream(self, other):
            log.append((self.name, other.name))

    caller = FakeStream(name="caller")
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: caller)
    monkeypatch.setattr(fa_prefill, "_SIDE_STREAMS", {})
    dev = torch.device("cuda", 0)
    lanes = fa_prefill._streams(dev, 3)
    assert lanes[0] is None and [s.name for s in lanes[1:]] == ["side1", "side2"]
    assert log == [("side1", "caller"), ("side2", "caller")]
    again = fa_prefill._streams(dev, 2)
    assert again[1] is lanes[1] and len(made) == 3  # made once
    log.clear()
    fa_prefill._join(lanes)
    assert log == [("caller", "side1"), ("caller", "side2")]
    assert fa_prefill._streams(torch.device("cpu"), 3) == [None] and fa_prefill._streams(dev, 1) == [None]


@pytest.mark.gpu
@pytest.mark.parametrize("streams", [2, 3, 8])
def test_vllm_flash_attention_on_several_streams(streams):
    """The KV heads' launches taking turns on side streams write what one stream writes, bit for bit, and the
    caller's stream sees every head's rows (a NaN-filled output read right after the call, no synchronize)."""
    varlen, version = vllm_flash_attention()
    hq, hkv, d, bs = 32, 8, 128, 64
    specs = SPECS + [(8192 + 37, 4096 + 5)]
    batch = make_varlen_batch(specs, hq, hkv, d, torch.bfloat16, seed=streams, device="cuda")
    kc, vc, bt = make_paged_cache(batch["k"], batch["v"], 16, layout="kv_pair", seed=streams)
    tiles, _ = own_block_tiles(specs, hkv, bs, kmax=20, seed=streams, device="cuda")
    args = (batch["q_packed"], kc, vc, bt, batch["query_start_loc"], batch["seq_lens"], tiles, bs, d ** -0.5)
    one = fa_sparse_prefill(*args, out=torch.full_like(batch["q_packed"], float("nan")), varlen=varlen,
                            fa_version=version, streams=1)
    many = fa_sparse_prefill(*args, out=torch.full_like(batch["q_packed"], float("nan")), varlen=varlen,
                             fa_version=version, streams=streams)
    assert not many.isnan().any() and torch.equal(many, one)
