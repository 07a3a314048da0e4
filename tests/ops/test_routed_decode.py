"""The CUDA-graph-safe decode path: ops.select.decode_select (the step's per-row selection from key bounds,
recency or a hash) and ops.decode.routed_decode (rows routed by mode: skipped, prompt rule from a stored table, all
blocks, or the step's selection; with select=, a selection launch before the attention's). Triton (interpreted on CPU)
against the PyTorch twins and a float64 oracle."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import KERNEL_FP32_TOL, LSE_ATOL, make_paged_cache, make_varlen_batch, rel_err
from cab_vllm.backend.attention import PromptTable
from cab_vllm.ops._triton import next_pow2
from cab_vllm.ops.decode import (MODE_ALL, MODE_BOUNDS, MODE_PROMPT, MODE_RANDOM, MODE_RECENT, MODE_SKIP,
                                 DecodeRoutes, routed_decode, routed_indices)
from cab_vllm.ops.reference import paged_decode_ref
from cab_vllm.ops.select import decode_scores_ref, decode_select, hash_score

LENS = [1, 200, 63, 97, 333, 130]
MODES = [MODE_ALL, MODE_PROMPT, MODE_BOUNDS, MODE_SKIP, MODE_RECENT, MODE_RANDOM]


def _case(hq=4, hkv=2, d=32, page=16, seed=0, dtype=torch.float32, device="cpu"):
    batch = make_varlen_batch([(n, 1) for n in LENS], hq, hkv, d, dtype, seed=seed, device=device)
    kc, vc, bt = make_paged_cache(batch["k"], batch["v"], page, layout="kv_pair", seed=seed + 1)
    q = torch.stack([x[:, -1] for x in batch["q"]])  # [S, Hq, D]: the query at seq_len - 1
    sl = torch.tensor(LENS, dtype=torch.int32, device=device)
    return batch, kc, vc, bt, q, sl


def _row1_prompt_table(hkv: int, device):
    """A prompt table whose slot 1 stores blocks [0, 1] (KV head 0) and [2] (KV head 1), and the rows' (slots,
    prompt blocks) that send row 1 (200 tokens, 4 blocks) there: its 3-block prompt's selection, then block 3."""
    table = PromptTable(4, hkv, 8, device)
    table.put(1, torch.tensor([[0, 1, -1], [2, -1, -1]], dtype=torch.int32, device=device),
              torch.tensor([2, 1], dtype=torch.int32, device=device))
    slots = torch.tensor([0, 1, 0, 0, 0, 0], dtype=torch.int32, device=device)
    pblocks = torch.tensor([0, 3, 0, 0, 0, 0], dtype=torch.int32, device=device)
    return table, slots, pblocks


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("page", [16, 32], ids=lambda p: f"page{p}")
def test_decode_select_matches_the_twin(impl, page, device):
    torch.manual_seed(0)
    _, kc, vc, bt, q, sl = _case(page=page, device=device)
    s, hkv = q.shape[0], kc.shape[2]
    mmax = 8
    modes = torch.tensor(MODES, dtype=torch.int32, device=device)
    keep = torch.tensor([0, 0, 2, 0, 3, 4], dtype=torch.int32, device=device)
    idx = torch.full((s, hkv, mmax), 7, dtype=torch.int32, device=device)
    cnt = torch.full((s, hkv), 99, dtype=torch.int32, device=device)
    scores = torch.empty(s, hkv, next_pow2(mmax), device=device)
    decode_select(q, kc, bt, sl, modes, keep, 64, 1, 1, 3, idx, cnt, scores, impl=impl)
    pri = decode_scores_ref(q, kc, bt, sl, modes, 64, 1, 1, 3, next_pow2(mmax))
    for r, mode in enumerate(MODES):
        if mode not in (MODE_BOUNDS, MODE_RECENT, MODE_RANDOM):
            assert cnt[r].tolist() == [99] * hkv  # rows of other modes are not written
            continue
        m = (LENS[r] - 1) // 64 + 1
        want = min(int(keep[r]), m)
        for h in range(hkv):
            c = int(cnt[r, h])
            got = idx[r, h, :c].tolist()
            assert c == want and got == sorted(set(got)) and all(0 <= j < m for j in got)
            assert (idx[r, h, c:] == -1).all()
            # the chosen blocks are a top-`want` set of the twin's priorities (ties may pick other indices)
            p = pri[r, h, :m]
            assert sorted(p[got].tolist(), reverse=True) == sorted(p.tolist(), reverse=True)[:want]
    if impl == "triton":  # the kernel's priorities themselves equal the twin's (bounds from the cache's keys)
        for r in (2, 4, 5):
            m = (LENS[r] - 1) // 64 + 1
            assert torch.allclose(scores[r, :, :m].cpu(), pri[r, :, :m].cpu(), rtol=1e-4, atol=1e-4)


def test_bounds_scores_are_upper_bounds_of_every_key_score(device):
    """Quest's guarantee: a block's bound is >= q.k / sqrt(D) for every key of the block, for every head."""
    from cab_vllm.ops.blocks import gather_paged
    from cab_vllm.ops.select import _bounds_scores

    torch.manual_seed(5)
    batch, kc, vc, bt, q, sl = _case(device=device)
    r, n = 4, LENS[4]
    ub = _bounds_scores(q[r], kc, bt[r], n, 64)  # [Hkv, m]
    k = gather_paged(kc, bt[r], n).float()  # [Hkv, n, D]
    g = q.shape[1] // k.shape[0]
    sc = torch.einsum("hgd,hnd->hgn", q[r].float().view(k.shape[0], g, -1), k) / math.sqrt(q.shape[-1])
    blk = torch.arange(n, device=sc.device) // 64
    for h in range(k.shape[0]):
        assert (sc[h].amax(0) <= ub[h, blk] + 1e-4).all()


def test_hash_score_is_deterministic_and_spread():
    j = torch.arange(4096)
    a, b = hash_score(j, 1, 500, 0), hash_score(j, 1, 500, 0)
    assert torch.equal(a, b) and (a >= 0).all() and (a < 1 << 24).all()
    assert len(set(a.tolist())) > 4000  # nearly no collisions
    assert not torch.equal(a, hash_score(j, 1, 501, 0))  # a new step draws anew


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_routed_decode_matches_oracle_per_mode(impl, dtype, device):
    torch.manual_seed(2)
    batch, kc, vc, bt, q, sl = _case(dtype=dtype, device=device)
    s, hq, d = q.shape
    hkv = kc.shape[2]
    table = PromptTable(4, hkv, 8, device)
    table.put(2, torch.tensor([[0, 2, -1], [1, 2, -1]], dtype=torch.int32, device=device),
              torch.tensor([2, 2], dtype=torch.int32, device=device))
    slots = torch.tensor([0, 2, 0, 0, 0, 0], dtype=torch.int32, device=device)
    pblocks = torch.tensor([0, 3, 0, 0, 0, 0], dtype=torch.int32, device=device)  # row 1: 200 tokens = 4 blocks
    sel_idx = torch.full((s, hkv, 8), -1, dtype=torch.int32, device=device)
    sel_cnt = torch.zeros(s, hkv, dtype=torch.int32, device=device)
    for r, m in enumerate(MODES):
        if m in (MODE_BOUNDS, MODE_RECENT, MODE_RANDOM):
            nb = (LENS[r] - 1) // 64 + 1
            pick = sorted({0, nb - 1})
            sel_idx[r, :, : len(pick)] = torch.tensor(pick, dtype=torch.int32)
            sel_cnt[r] = len(pick)
    routes = DecodeRoutes(torch.tensor(MODES, dtype=torch.int32, device=device), slots, table.idx, table.cnt,
                          pblocks, sel_idx, sel_cnt)
    out = torch.full_like(q, float("nan"))
    routed_decode(q, kc, vc, bt, sl, routes, 64, 1 / math.sqrt(d), out, num_splits=3, impl=impl)
    idx, cnt = routed_indices(routes, sl, 64)
    assert idx[1, 0, : int(cnt[1, 0])].tolist() == [0, 2, 3]  # the prompt's {0, 2} + every block from 3
    ref, _ = paged_decode_ref(q.double(), kc.double(), vc.double(), bt, sl, idx, cnt, 64, 1 / math.sqrt(d))
    tol = {torch.float32: max(KERNEL_FP32_TOL, 1e-5), torch.float16: 5e-3}[dtype]
    for r, m in enumerate(MODES):
        if m == MODE_SKIP:
            assert torch.isnan(out[r]).all()  # left to another kernel: never written
        else:
            assert rel_err(out[r], ref[r]) < tol, (r, m)


def test_routed_decode_with_a_workspace_equals_fresh_buffers(device):
    from cab_vllm.backend.attention import DecodeWorkspace

    torch.manual_seed(3)
    _, kc, vc, bt, q, sl = _case(device=device)
    s, hkv = q.shape[0], kc.shape[2]
    ws = DecodeWorkspace(8, q.shape[1], hkv, q.shape[2], 8, device)
    modes = torch.full((s,), MODE_ALL, dtype=torch.int32, device=device)
    z = torch.zeros(s, dtype=torch.int32, device=device)
    routes = DecodeRoutes(modes, z, torch.zeros(1, hkv, 1, dtype=torch.int32, device=device),
                          torch.zeros(1, hkv, dtype=torch.int32, device=device),
                          z, ws.sel_idx[:s], ws.sel_cnt[:s])
    a, b = torch.empty_like(q), torch.empty_like(q)
    routed_decode(q, kc, vc, bt, sl, routes, 64, 0.2, a, ws.splits(s), ws.partials(s), impl="triton")
    routed_decode(q, kc, vc, bt, sl, routes, 64, 0.2, b, ws.splits(s), None, impl="triton")
    assert torch.equal(a, b)


@pytest.mark.parametrize("keep", [[0, 0, 2, 0, 3, 4], [0, 0, 1, 0, 9, 2]], ids=["k234", "k192"])
def test_routed_decode_selects_then_attends_like_the_twins(keep, device):
    """routed_decode(select=...): the step's selection, then the attention (every mode in one batch,
    one workspace reused across launches) equals decode_select + routed_decode of the PyTorch twins, and leaves
    its sync counters at zero for the next launch (a CUDA graph replays it as is)."""
    from cab_vllm.backend.attention import DecodeWorkspace
    from cab_vllm.ops.decode import Selection

    torch.manual_seed(5)
    _, kc, vc, bt, q, sl = _case(device=device)
    s, hq, d = q.shape
    hkv = kc.shape[2]
    table, slots, pblocks = _row1_prompt_table(hkv, device)
    modes = torch.tensor(MODES, dtype=torch.int32, device=device)
    keep_t = torch.tensor(keep, dtype=torch.int32, device=device)
    ws = DecodeWorkspace(8, hq, hkv, d, 8, device)
    outs = {}
    for impl in ("torch", "triton", "triton"):
        ws.sel_idx.fill_(7)
        ws.sel_cnt.fill_(99)
        routes = DecodeRoutes(modes, slots, table.idx, table.cnt, pblocks, ws.sel_idx[:s], ws.sel_cnt[:s])
        out = torch.full_like(q, float("nan"))
        routed_decode(q, kc, vc, bt, sl, routes, 64, 1 / math.sqrt(d), out, ws.splits(s), ws.partials(s), impl=impl,
                      select=Selection(keep_t, ws.scores[:s], 1, 1, 3))
        assert int(ws.sync.abs().sum()) == 0
        got = (out.clone(), *routed_indices(routes, sl, 64))
        if impl in outs:
            # replays are deterministic (MODE_SKIP rows stay NaN: never written)
            assert all(torch.allclose(a, b, rtol=0, atol=0, equal_nan=True) for a, b in zip(outs[impl], got))
        outs[impl] = got
    (o_t, i_t, c_t), (o_k, i_k, c_k) = outs["torch"], outs["triton"]
    assert torch.equal(c_t, c_k)
    for r, m in enumerate(MODES):
        if m == MODE_SKIP:
            assert torch.isnan(o_k[r]).all() and int(c_k[r].sum()) == 0
            continue
        if m != MODE_BOUNDS:  # bounds ties may pick other blocks (same priorities); recency/hash have no ties
            assert torch.equal(i_t[r], i_k[r]), (r, m)
        assert rel_err(o_k[r], o_t[r]) < max(KERNEL_FP32_TOL, 1e-5) or m == MODE_BOUNDS, (r, m)
    # the bounds row: its own selection, checked by attending to exactly the blocks it chose
    r = MODES.index(MODE_BOUNDS)
    ref, _ = paged_decode_ref(q.double(), kc.double(), vc.double(), bt, sl, i_k, c_k, 64, 1 / math.sqrt(d))
    assert rel_err(o_k[r], ref[r]) < max(KERNEL_FP32_TOL, 1e-5)


def _uniform_routes(q, kc, mode, device):
    """Every row in `mode`, slot 0, zero-filled tables of 8 blocks: (routes, the zero [S] int32 vector)."""
    s, hkv = q.shape[0], kc.shape[2]
    modes = torch.full((s,), mode, dtype=torch.int32, device=device)
    z = torch.zeros(s, dtype=torch.int32, device=device)
    idx = torch.zeros(s, hkv, 8, dtype=torch.int32, device=device)
    cnt = torch.zeros(s, hkv, dtype=torch.int32, device=device)
    return DecodeRoutes(modes, z, idx, cnt, z, idx, cnt), z


def test_selection_buffers_are_checked(device):
    from cab_vllm.ops.decode import Selection

    _, kc, vc, bt, q, sl = _case(device=device)
    s, hkv = q.shape[0], kc.shape[2]
    routes, z = _uniform_routes(q, kc, MODE_BOUNDS, device)
    for scores in (torch.zeros(s, hkv, 6, device=device), torch.zeros(s, hkv, 4, device=device),
                   torch.zeros(s - 1, hkv, 8, device=device), torch.zeros(s, hkv, 8, dtype=torch.float64, device=device)):
        with pytest.raises(ValueError, match="inconsistent buffers"):
            routed_decode(q, kc, vc, bt, sl, routes, 64, 0.2, torch.empty_like(q), 2,
                          select=Selection(z, scores, 1, 1, 0))


def test_routes_must_cover_every_row(device):
    """Every attention program reads its row's mode, slot and prompt length (whatever the mode), so each of them
    needs an entry per row: a shorter one is refused with a clear error instead of being read past its end."""
    _, kc, vc, bt, q, sl = _case(device=device)
    full, z = _uniform_routes(q, kc, MODE_ALL, device)
    for short in ("modes", "slots", "tab_blocks"):
        routes = full._replace(**{short: z[: q.shape[0] - 1]})
        with pytest.raises(ValueError, match="routes must cover every row"):
            routed_decode(q, kc, vc, bt, sl, routes, 64, 0.2, torch.empty_like(q), 2, impl="triton")


def test_a_step_without_selecting_rows_takes_no_tickets(device):
    """The builder's `selecting` flag 0 (no row selects its own blocks): the launch runs by program id, gives the
    same output as with the flag derived on the device, and leaves every counter at zero."""
    from cab_vllm.backend.attention import DecodeWorkspace
    from cab_vllm.ops.decode import Selection

    torch.manual_seed(7)
    _, kc, vc, bt, q, sl = _case(device=device)
    s, hq, d = q.shape
    hkv = kc.shape[2]
    ws = DecodeWorkspace(8, hq, hkv, d, 8, device)
    modes = torch.tensor([MODE_ALL, MODE_SKIP, MODE_ALL, MODE_ALL, MODE_SKIP, MODE_ALL], dtype=torch.int32,
                         device=device)
    z = torch.zeros(s, dtype=torch.int32, device=device)
    outs = []
    for flag in (None, torch.zeros(1, dtype=torch.int32, device=device)):
        routes = DecodeRoutes(modes, z, torch.zeros(1, hkv, 1, dtype=torch.int32, device=device),
                              torch.zeros(1, hkv, dtype=torch.int32, device=device), z, ws.sel_idx[:s], ws.sel_cnt[:s],
                              flag)
        out = torch.zeros_like(q)
        routed_decode(q, kc, vc, bt, sl, routes, 64, 0.3, out, ws.splits(s), ws.partials(s), impl="triton",
                      select=Selection(z, ws.scores[:s], 1, 1, 0))
        assert int(ws.sync.abs().sum()) == 0
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and outs[0][0].abs().sum() > 0 and outs[0][1].abs().sum() == 0


def _wide_select(n: int, device: str):
    """decode_select of bounds, recency and hash rows over n tokens (n / 64 blocks: a wide top-k tile)."""
    hq, hkv, d, page = 2, 1, 16, 64
    batch = make_varlen_batch([(n, 1)] * 3, hq, hkv, d, torch.float32, seed=11, device=device)
    kc, _, bt = make_paged_cache(batch["k"], batch["v"], page, seed=12)
    q = torch.stack([x[:, -1] for x in batch["q"]])
    sl = torch.full((3,), n, dtype=torch.int32, device=device)
    modes = torch.tensor([MODE_BOUNDS, MODE_RECENT, MODE_RANDOM], dtype=torch.int32, device=device)
    m = -(-n // 64)
    keep = torch.tensor([m // 20, m // 7, m // 3], dtype=torch.int32, device=device)
    idx = torch.full((3, hkv, m), 7, dtype=torch.int32, device=device)
    cnt = torch.zeros(3, hkv, dtype=torch.int32, device=device)
    scores = torch.empty(3, hkv, next_pow2(m), device=device)
    decode_select(q, kc, bt, sl, modes, keep, 64, 1, 2, 5, idx, cnt, scores, impl="triton")
    pri = decode_scores_ref(q, kc, bt, sl, modes, 64, 1, 2, 5, next_pow2(m))
    for r in range(3):
        c = int(cnt[r, 0])
        got = idx[r, 0, :c].tolist()
        assert c == int(keep[r]) and got == sorted(set(got)) and (idx[r, 0, c:] == -1).all()
        p = pri[r, 0, :m]
        assert sorted(p[got].tolist(), reverse=True) == sorted(p.tolist(), reverse=True)[:c]


def test_top_k_of_a_wide_score_row_matches_the_twin(device):
    """513 blocks (a 1024-wide tile, as a 32k context has): the tile width at which Triton 3.6 once failed to
    compile the top-k's scan on the H200."""
    _wide_select(513 * 64 - 17, device)


@pytest.mark.gpu
def test_top_k_at_128k_matches_the_twin():
    _wide_select(131072 - 3, "cuda")


def test_short_selections_use_fewer_splits_with_the_same_output(device):
    """min_blocks_per_split: a (row, KV head) whose blocks fill fewer splits than launched leaves the rest empty
    and the merge reads only the used ones; the output does not depend on it (beyond summation order)."""
    torch.manual_seed(9)
    _, kc, vc, bt, q, sl = _case(device=device)
    s, hq, d = q.shape
    hkv = kc.shape[2]
    table, slots, pblocks = _row1_prompt_table(hkv, device)
    modes = torch.tensor([MODE_ALL, MODE_PROMPT, MODE_ALL, MODE_SKIP, MODE_ALL, MODE_ALL], dtype=torch.int32,
                         device=device)
    idx = torch.zeros(s, hkv, 8, dtype=torch.int32, device=device)
    cnt = torch.zeros(s, hkv, dtype=torch.int32, device=device)
    routes = DecodeRoutes(modes, slots, table.idx, table.cnt, pblocks, idx, cnt)
    outs = []
    for min_per in (1, 2, 3, 100):
        out = torch.zeros_like(q)
        routed_decode(q, kc, vc, bt, sl, routes, 64, 1 / math.sqrt(d), out, 4, impl="triton",
                      min_blocks_per_split=min_per)
        outs.append(out)
    ri, rc = routed_indices(routes, sl, 64)
    ref, _ = paged_decode_ref(q.double(), kc.double(), vc.double(), bt, sl, ri, rc, 64, 1 / math.sqrt(d))
    live = modes != MODE_SKIP
    for out in outs:
        assert rel_err(out[live], ref[live]) < max(KERNEL_FP32_TOL, 1e-5)
        assert (out[~live] == 0).all()
    with pytest.raises(ValueError, match="min_blocks_per_split"):
        routed_decode(q, kc, vc, bt, sl, routes, 64, 0.2, torch.zeros_like(q), 4, impl="triton",
                      min_blocks_per_split=0)


def test_selection_and_attention_in_one_launch_equal_two_launches(device):
    """step_launch with both roles (programs take roles from a ticket; attention waits for its selection) gives
    what routed_decode's two launches give, for every mode in one batch, and leaves the counters at zero."""
    from cab_vllm.backend.attention import DecodeWorkspace
    from cab_vllm.ops.decode import Selection, step_launch

    torch.manual_seed(6)
    _, kc, vc, bt, q, sl = _case(device=device)
    s, hq, d = q.shape
    hkv = kc.shape[2]
    table, slots, pblocks = _row1_prompt_table(hkv, device)
    modes = torch.tensor(MODES, dtype=torch.int32, device=device)
    keep = torch.tensor([0, 0, 2, 0, 3, 4], dtype=torch.int32, device=device)
    ws = DecodeWorkspace(8, hq, hkv, d, 8, device)
    outs = []
    for one in (False, True):
        ws.sel_idx.fill_(7)
        ws.sel_cnt.fill_(99)
        routes = DecodeRoutes(modes, slots, table.idx, table.cnt, pblocks, ws.sel_idx[:s], ws.sel_cnt[:s])
        sel = Selection(keep, ws.scores[:s], 1, 1, 3)
        out = torch.zeros_like(q)
        if one:
            step_launch(q, kc, vc, bt, sl, routes.sel_idx, routes.sel_cnt, block_size=64, routes=routes, select=sel,
                        scale=1 / math.sqrt(d), num_splits=ws.splits(s), out=out, lse=ws.lse[:s],
                        scratch=ws.partials(s))
        else:
            routed_decode(q, kc, vc, bt, sl, routes, 64, 1 / math.sqrt(d), out, ws.splits(s), ws.partials(s),
                          impl="triton", select=sel)
        assert int(ws.sync.abs().sum()) == 0
        outs.append((out, *routed_indices(routes, sl, 64)))
    (o2, i2, c2), (o1, i1, c1) = outs
    assert torch.equal(i2, i1) and torch.equal(c2, c1)
    assert rel_err(o1, o2) < max(KERNEL_FP32_TOL, 1e-6)


@pytest.mark.parametrize("rows", [1, 6])
def test_routed_decode_one_or_two_launches_give_the_same_step(rows, device, monkeypatch):
    """routed_decode runs selection and attention in one launch for a batch of at most ONE_LAUNCH_MAX_ROWS rows
    (fixed per CUDA graph: the batch size), two launches above; forced either way, every row gets the same
    selection and output, and the counters are left at zero."""
    import cab_vllm.ops.decode as dec
    from cab_vllm.backend.attention import DecodeWorkspace
    from cab_vllm.ops.decode import Selection

    torch.manual_seed(8)
    _, kc, vc, bt, q, sl = _case(device=device)
    hq, d, hkv = q.shape[1], q.shape[2], kc.shape[2]
    table, slots, pblocks = _row1_prompt_table(hkv, device)
    order = [2, 1, 4, 5, 0, 3][:rows]  # a bounds row first: rows=1 is a lone selecting row
    pick = torch.tensor(order, device=device)
    q, sl, bt, slots, pblocks = q[pick], sl[pick], bt[pick], slots[pick], pblocks[pick]
    modes = torch.tensor([MODES[i] for i in order], dtype=torch.int32, device=device)
    keep = torch.tensor([[0, 0, 2, 0, 3, 4][i] for i in order], dtype=torch.int32, device=device)
    ws = DecodeWorkspace(8, hq, hkv, d, 8, device)
    launches = []
    real = dec.step_launch
    monkeypatch.setattr(dec, "step_launch", lambda *a, **kw: (launches.append(kw.get("attend", True)), real(*a, **kw)))
    outs = {}
    for one in (None, False, True):
        launches.clear()
        ws.sel_idx.fill_(7)
        ws.sel_cnt.fill_(99)
        routes = DecodeRoutes(modes, slots, table.idx, table.cnt, pblocks, ws.sel_idx[:rows], ws.sel_cnt[:rows])
        out = torch.zeros_like(q)
        routed_decode(q, kc, vc, bt, sl, routes, 64, 1 / math.sqrt(d), out, ws.splits(rows), ws.partials(rows),
                      impl="triton", select=Selection(keep, ws.scores[:rows], 1, 1, 3), one_launch=one)
        assert int(ws.sync.abs().sum()) == 0
        outs[one] = (out, *routed_indices(routes, sl, 64))
        auto_one = dec.one_launch_default(rows, ws.mpad)
        assert auto_one == (rows <= dec.ONE_LAUNCH_MAX_ROWS)  # a narrow workspace: the rows decide
        assert len(launches) == (1 if (one or (one is None and auto_one)) else 2), (one, launches)
    for one in (None, True):
        assert torch.equal(outs[one][1], outs[False][1]) and torch.equal(outs[one][2], outs[False][2])
        assert rel_err(outs[one][0], outs[False][0]) < max(KERNEL_FP32_TOL, 1e-6)


def test_one_launch_default_needs_a_narrow_selection(device, monkeypatch):
    """By default a one-row step runs in one launch only while the selection's score rows are at most
    ONE_LAUNCH_MAX_MPAD wide (the engine's longest context in blocks): wider, two launches (its attention was
    slower in one on the H200); the result is the same either way, and an explicit one_launch still holds."""
    import cab_vllm.ops.decode as dec
    from cab_vllm.backend.attention import DecodeWorkspace
    from cab_vllm.ops.decode import Selection

    assert dec.one_launch_default(1, dec.ONE_LAUNCH_MAX_MPAD) and not dec.one_launch_default(1, 2 * dec.ONE_LAUNCH_MAX_MPAD)
    assert not dec.one_launch_default(dec.ONE_LAUNCH_MAX_ROWS + 1, 16)
    torch.manual_seed(11)
    _, kc, vc, bt, q, sl = _case(device=device)
    hq, d, hkv = q.shape[1], q.shape[2], kc.shape[2]
    table, slots, pblocks = _row1_prompt_table(hkv, device)
    pick = torch.tensor([2], device=device)  # a row that selects by key bounds
    q, sl, bt, slots, pblocks = q[pick], sl[pick], bt[pick], slots[pick], pblocks[pick]
    modes = torch.tensor([MODES[2]], dtype=torch.int32, device=device)
    keep = torch.tensor([2], dtype=torch.int32, device=device)
    ws = DecodeWorkspace(2, hq, hkv, d, 20, device)  # selection rows 32 wide
    launches = []
    real = dec.step_launch
    monkeypatch.setattr(dec, "step_launch", lambda *a, **kw: (launches.append(kw.get("attend", True)), real(*a, **kw)))
    outs = []
    for cap, one, expect in ((64, None, 1), (16, None, 2), (16, True, 1)):
        monkeypatch.setattr(dec, "ONE_LAUNCH_MAX_MPAD", cap)
        launches.clear()
        routes = DecodeRoutes(modes, slots, table.idx, table.cnt, pblocks, ws.sel_idx[:1], ws.sel_cnt[:1])
        out = torch.zeros_like(q)
        routed_decode(q, kc, vc, bt, sl, routes, 64, 1 / math.sqrt(d), out, ws.splits(1), ws.partials(1),
                      impl="triton", select=Selection(keep, ws.scores[:1], 1, 1, 3), one_launch=one)
        assert len(launches) == expect, (cap, one, launches)
        assert int(ws.sync.abs().sum()) == 0
        outs.append((out, *routed_indices(routes, sl, 64)))
    for o, i, c in outs[1:]:
        assert torch.equal(i, outs[0][1]) and torch.equal(c, outs[0][2])
        assert rel_err(o, outs[0][0]) < max(KERNEL_FP32_TOL, 1e-6)


@pytest.mark.parametrize("programs", [1, 3])
def test_selection_is_the_same_for_any_number_of_scoring_programs(programs, device, monkeypatch):
    """How many programs score a (row, KV head)'s blocks (MAX_SCORE_PROGRAMS, a tuning knob: each program takes
    every programs-th tile of 16 blocks) changes no selection and no output; rows of 24-37 blocks here."""
    import cab_vllm.ops.decode as dec
    from cab_vllm.backend.attention import DecodeWorkspace
    from cab_vllm.ops.decode import Selection

    lens = [1500, 2300, 1900]
    batch = make_varlen_batch([(n, 1) for n in lens], 4, 2, 32, torch.float32, seed=9, device=device)
    kc, vc, bt = make_paged_cache(batch["k"], batch["v"], 16, layout="kv_pair", seed=10)
    q = torch.stack([x[:, -1] for x in batch["q"]])
    sl = torch.tensor(lens, dtype=torch.int32, device=device)
    s, hq, d = q.shape
    hkv = kc.shape[2]
    modes = torch.tensor([MODE_BOUNDS, MODE_RECENT, MODE_RANDOM], dtype=torch.int32, device=device)
    keep = torch.tensor([5, 7, 4], dtype=torch.int32, device=device)
    ws = DecodeWorkspace(4, hq, hkv, d, 40, device)
    table = PromptTable(4, hkv, 40, device)
    zeros = torch.zeros(s, dtype=torch.int32, device=device)
    got = []
    for n in (dec.MAX_SCORE_PROGRAMS, programs):
        monkeypatch.setattr(dec, "MAX_SCORE_PROGRAMS", n)
        routes = DecodeRoutes(modes, zeros, table.idx, table.cnt, zeros, ws.sel_idx[:s], ws.sel_cnt[:s])
        out = torch.zeros_like(q)
        routed_decode(q, kc, vc, bt, sl, routes, 64, 1 / math.sqrt(d), out, ws.splits(s), ws.partials(s),
                      impl="triton", select=Selection(keep, ws.scores[:s], 1, 1, 3), one_launch=False)
        assert int(ws.sync.abs().sum()) == 0
        got.append((out, *routed_indices(routes, sl, 64)))
    assert torch.equal(got[0][2], keep[:, None].expand(s, hkv))
    assert torch.equal(got[0][1], got[1][1]) and torch.equal(got[0][2], got[1][2])
    assert torch.equal(got[0][0], got[1][0])


@pytest.mark.parametrize("merge_splits", [1, 2, 4, 64], ids=lambda m: f"merge{m}")
@pytest.mark.parametrize("hq, hkv", [(4, 2), (7, 1), (16, 2)], ids=["g2", "g7", "g8"])
def test_merge_splits_match_the_oracle(merge_splits, hq, hkv, device):
    """Split partials merged one by one or several per load (merge_splits; merge_tile caps it by the group and the
    splits) give the oracle's output and LSE in every mode: prompt rows whose stored selection ends mid-split,
    every block, explicit indices, skipped rows; many splits and one block each (min_blocks_per_split 1), more
    splits than blocks, one split."""
    torch.manual_seed(11)
    _, kc, vc, bt, q, sl = _case(hq=hq, hkv=hkv, device=device)
    s, _, d = q.shape
    table = PromptTable(4, hkv, 8, device)
    sel = torch.tensor([[0, 1, 2], [1, -1, -1]], dtype=torch.int32, device=device)[:hkv]
    table.put(2, sel, torch.tensor([3, 1], dtype=torch.int32, device=device)[:hkv])
    modes = torch.tensor([MODE_ALL, MODE_PROMPT, MODE_ALL, MODE_SKIP, MODE_PROMPT, MODE_BOUNDS], dtype=torch.int32,
                         device=device)
    slots = torch.tensor([0, 2, 0, 0, 2, 0], dtype=torch.int32, device=device)
    pblocks = torch.tensor([0, 3, 0, 0, 4, 0], dtype=torch.int32, device=device)
    idx = torch.full((s, hkv, 8), -1, dtype=torch.int32, device=device)
    cnt = torch.zeros(s, hkv, dtype=torch.int32, device=device)
    idx[5, :, :2] = torch.tensor([0, 2], dtype=torch.int32)  # row 5 (130 tokens, 3 blocks): blocks 0 and 2
    cnt[5] = 2
    routes = DecodeRoutes(modes, slots, table.idx, table.cnt, pblocks, idx, cnt)
    ri, rc = routed_indices(routes, sl, 64)
    ref, ref_lse = paged_decode_ref(q.double(), kc.double(), vc.double(), bt, sl, ri, rc, 64, 1 / math.sqrt(d))
    live = modes != MODE_SKIP
    for splits, min_per in ((1, 1), (3, 1), (6, 1), (8, 1), (2, 3)):
        out = torch.zeros_like(q)
        marker = torch.full_like(q[0], 7.0)
        out[3] = marker
        lse = torch.empty(s, hq, dtype=torch.float32, device=device)
        from cab_vllm.ops.decode import step_launch

        step_launch(q, kc, vc, bt, sl, idx, cnt, block_size=64, routes=routes, scale=1 / math.sqrt(d),
                    num_splits=splits, out=out, lse=lse, min_blocks_per_split=min_per, merge_splits=merge_splits)
        assert rel_err(out[live], ref[live]) < max(KERNEL_FP32_TOL, 1e-5), (splits, min_per)
        torch.testing.assert_close(lse[live].double().cpu(), ref_lse[live].double().cpu(), rtol=0, atol=LSE_ATOL)
        assert torch.equal(out[3], marker)  # a skipped row is not written


def test_merge_splits_is_checked(device):
    _, kc, vc, bt, q, sl = _case(device=device)
    routes = DecodeRoutes(torch.full((len(LENS),), MODE_ALL, dtype=torch.int32, device=device), sl, sl[:, None, None],
                          sl[:, None], sl, sl[:, None, None], sl[:, None])
    table = PromptTable(4, 2, 8, device)
    routes = routes._replace(tab_idx=table.idx, tab_cnt=table.cnt,
                             sel_idx=torch.zeros(len(LENS), 2, 8, dtype=torch.int32, device=device),
                             sel_cnt=torch.zeros(len(LENS), 2, dtype=torch.int32, device=device))
    for bad in (3, 128, 0, 2.0):
        with pytest.raises(ValueError, match="merge_splits"):
            routed_decode(q, kc, vc, bt, sl, routes, 64, 0.2, torch.zeros_like(q), 2, impl="triton", merge_splits=bad)


def test_merge_tile_fits_the_group_and_the_splits():
    from cab_vllm.ops.decode import MERGE_TILE, merge_tile

    assert merge_tile(1, 4, 33) == 1 and merge_tile(16, 4, 33) == 16 and merge_tile(64, 4, 33) == MERGE_TILE // 4
    assert merge_tile(16, 8, 33) == MERGE_TILE // 8 and merge_tile(16, 7, 33) == MERGE_TILE // 8
    assert merge_tile(16, 4, 3) == 4 and merge_tile(16, 4, 1) == 1 and merge_tile(64, 1, 64) == 64
    assert merge_tile(8, 128, 64) == 1  # a group too large for the tile merges split by split
