"""Token-sparse decode (ops.token_decode): the Triton kernels (interpreted on a CPU) against the PyTorch twin, and the
twin against an independent reference (softmax over each head's exact top-k keys, chosen by torch.topk)."""

from __future__ import annotations

import math

import pytest
import torch

from cab_vllm.ops import token_decode as td
from cab_vllm.ops._triton import HAS_TRITON, interpreting
from cab_vllm.ops.blocks import gather_paged

TRITON = pytest.mark.skipif(not (HAS_TRITON and interpreting()), reason="needs TRITON_INTERPRET=1 (CPU tensors)")


def paged(lens, hq, hkv, d, page, dtype=torch.float32, seed=0, keys=None):
    """q [S, Hq, D], key/value caches [pages, page, Hkv, D] (one tensor, as vLLM's, so K and V share strides),
    a permuted block table and seq_lens for rows of lengths ``lens``; keys: optional [S] list of [n, Hkv, D] keys."""
    gen = torch.Generator().manual_seed(seed)
    pages = [-(-n // page) for n in lens]
    total = sum(pages) + 3
    kv = torch.randn(2, total, page, hkv, d, generator=gen).to(dtype)
    ids = torch.randperm(total, generator=gen)
    bt = torch.zeros(len(lens), max(pages), dtype=torch.int32)
    off = 0
    for s, p in enumerate(pages):
        bt[s, :p] = ids[off:off + p].to(torch.int32)
        off += p
        if keys is not None:
            flat = kv[0][bt[s, :p].long()].reshape(p * page, hkv, d)
            flat[: lens[s]] = keys[s].to(dtype)
            kv[0][bt[s, :p].long()] = flat.view(p, page, hkv, d)
    q = torch.randn(len(lens), hq, d, generator=gen).to(dtype)
    return q, kv[0], kv[1], bt, torch.tensor(lens, dtype=torch.int32)


def topk_reference(q, kc, vc, bt, sl, keep, scale, candidates=None):
    """Float64 attention of each row's query over each head's ``keep`` best keys (torch.topk of the exact scores),
    every key when keep >= n; None for rows with keep <= 0. candidates(s, n, keep) -> [Hq, n] bool: the keys a
    head's best are taken from (all when None)."""
    from cab_vllm.ops.blocks import gather_paged

    hq, hkv = q.shape[1], kc.shape[2]
    outs = []
    for s, (n, kt) in enumerate(zip(sl.tolist(), keep.tolist())):
        if kt <= 0:
            outs.append(None)
            continue
        k = gather_paged(kc, bt[s], n).double().repeat_interleave(hq // hkv, 0)  # [Hq, n, D]
        v = gather_paged(vc, bt[s], n).double().repeat_interleave(hq // hkv, 0)
        sc = torch.einsum("hd,hnd->hn", q[s].double(), k) * scale
        if candidates is not None:
            sc = sc.masked_fill(~candidates(s, n, kt), float("-inf"))
        if kt < n:
            top = sc.topk(kt, dim=-1).indices
            sc = torch.full_like(sc, float("-inf")).scatter(-1, top, sc.gather(-1, top))
        outs.append(torch.einsum("hn,hnd->hd", torch.softmax(sc, -1), v))
    return outs


def both_impls(q, kc, vc, bt, sl, kp, scale):
    """[(out, counts)] of the PyTorch twin and of the Triton kernels on the same inputs (out starts at 7.0: a row
    not written keeps it)."""
    res = []
    for impl in ("torch", "triton"):
        o, c = torch.full_like(q, 7.0), torch.zeros(q.shape[0], q.shape[1], dtype=torch.int32)
        td.token_decode(q, kc, vc, bt, sl, kp, scale, o, counts=c, impl=impl)
        res.append((o, c))
    return res


@pytest.fixture
def two_passes(monkeypatch):
    """The two-pass rule (PASSES 2: the keep-th key pinned to STEP_B), for the tests that check exact top keys."""
    monkeypatch.setattr(td, "PASSES", 2)


CASES = [  # (lens, keep, Hq, Hkv, D, page)
    ([77, 130, 300], [10, 0, 45], 4, 2, 32, 16),  # GQA 2, a row left alone
    ([200, 65, 1], [300, 7, 5], 6, 2, 48, 64),  # keep > n (every key), a one-token context
    ([513, 129], [37, 129], 3, 3, 64, 32),  # MHA, lengths off the 64-token tile, keep == n
    ([4100, 900], [205, 45], 8, 2, 32, 16),  # over a counting chunk (4096 keys)
    ([700, 1500], [8, 12], 14, 2, 64, 16),  # Qwen's group of 7 (padded to 8 in the scan, 16 in the dot)
]


@pytest.mark.usefixtures("two_passes")
@pytest.mark.parametrize("lens, keep, hq, hkv, d, page", CASES)
def test_torch_twin_is_softmax_over_each_heads_top_keys(lens, keep, hq, hkv, d, page):
    q, kc, vc, bt, sl = paged(lens, hq, hkv, d, page, seed=len(lens) + d)
    kp = torch.tensor(keep, dtype=torch.int32)
    out = torch.full_like(q, 7.0)
    counts = torch.zeros(len(lens), hq, dtype=torch.int32)
    td.token_decode(q, kc, vc, bt, sl, kp, 1 / math.sqrt(d), out, counts=counts, impl="torch")
    for s, ref in enumerate(topk_reference(q, kc, vc, bt, sl, kp, 1 / math.sqrt(d))):
        if ref is None:
            assert torch.all(out[s] == 7.0) and torch.all(counts[s] == 0)  # not written
            continue
        assert torch.allclose(out[s].double(), ref, atol=1e-5, rtol=1e-5)
        assert counts[s].tolist() == [min(keep[s], lens[s])] * hq  # random scores: no ties at the threshold


@pytest.mark.skipif(not (HAS_TRITON and interpreting()), reason="needs TRITON_INTERPRET=1 (CPU tensors)")
@pytest.mark.parametrize("lens, keep, hq, hkv, d, page", CASES)
def test_triton_equals_the_twin(lens, keep, hq, hkv, d, page):
    q, kc, vc, bt, sl = paged(lens, hq, hkv, d, page, seed=3 * len(lens) + d)
    (o0, c0), (o1, c1) = both_impls(q, kc, vc, bt, sl, torch.tensor(keep, dtype=torch.int32), 1 / math.sqrt(d))
    assert torch.allclose(o0, o1, atol=1e-5, rtol=1e-5)
    assert torch.equal(c0, c1)


def steps(chunk, count_chunk, scan_tile, list_tile, atomic):
    return dict(CHUNK=chunk, COUNT_CHUNK=count_chunk, SCAN_TILE=scan_tile, ATTEND_TILE=list_tile, COUNT_ATOMIC=atomic)


def sampled_steps(chunk, tile, min_tiles):
    return dict(PASSES=0, FUSED_CHUNK=chunk, FUSED_TILE=tile, FUSED_MIN_TILES=min_tiles, SAMPLE_TILE=16,
                SAMPLE_SEL_TILE=64)


@TRITON
@pytest.mark.parametrize("knobs", [
    steps(1024, 4096, 64, 16, True), steps(64, 128, 128, 32, True), steps(128, 256, 512, 64, False),
    steps(64, 128, 64, 32, False), sampled_steps(1024, 128, 2), sampled_steps(64, 16, 1), sampled_steps(256, 32, 4)])
def test_launch_steps_equal_the_twin(monkeypatch, knobs):
    """The launches' steps: logits chunks (whose first-pass counts the threshold launch shifts onto the row's
    maximum) and counting chunks of several sizes, the second count by atomics or by histograms, several scan and
    list steps per attention split (a budget of half the keys: a group's kept list is long). With a sampled
    threshold (PASSES 0): the one-pass launch split into other chunk and step sizes (several splits per row, a row's
    last split short, more splits than a short row fills), the sampling launch's steps of 16 keys (several per
    program), the threshold launch's 64 logits in registers (the rest read again at each bisection step)."""
    for name, value in knobs.items():
        monkeypatch.setattr(td, name, value)
    lens, keep = [1100, 333, 700], [550, 20, 699]
    q, kc, vc, bt, sl = paged(lens, 8, 2, 32, 16, seed=11)
    (o0, c0), (o1, c1) = both_impls(q, kc, vc, bt, sl, torch.tensor(keep, dtype=torch.int32), 0.2)
    assert torch.allclose(o0, o1, atol=1e-5, rtol=1e-5)
    assert torch.equal(c0, c1)


@TRITON
@pytest.mark.parametrize("lens, keep, hq, hkv, d, page", CASES[:1] + CASES[3:])
def test_two_counting_passes_equal_the_twin(monkeypatch, lens, keep, hq, hkv, d, page):
    """PASSES 2 (a second counting pass pins the keep-th key to STEP_B; the default, 1, is the other tests'): the
    kernels keep what the twin's rule keeps, and the counts agree."""
    monkeypatch.setattr(td, "PASSES", 2)
    q, kc, vc, bt, sl = paged(lens, hq, hkv, d, page, seed=5 * len(lens) + d)
    (o0, c0), (o1, c1) = both_impls(q, kc, vc, bt, sl, torch.tensor(keep, dtype=torch.int32), 1 / math.sqrt(d))
    assert torch.allclose(o0, o1, atol=1e-5, rtol=1e-5)
    assert torch.equal(c0, c1)


@TRITON
@pytest.mark.parametrize("scale", [0.2, 4.0])
def test_one_counting_pass_with_codes_and_a_wide_spread(scale):
    """passes=1 (the argument) with the 4-bit key copy (the candidates' thresholds and the final ones both
    one-pass), and with scores spread past the window (scale 4: heads whose window holds fewer keys than their
    budget)."""
    lens, keep = [300, 700], [40, 60]
    q, kc, vc, bt, sl = paged(lens, 8, 2, 32, 16, seed=13)
    kp = torch.tensor(keep, dtype=torch.int32)
    codes = encoded(kc, bt, sl)
    res = []
    for impl in ("torch", "triton"):
        o, c = torch.full_like(q, 7.0), torch.zeros(2, 8, dtype=torch.int32)
        td.token_decode(q, kc, vc, bt, sl, kp, scale, o, counts=c, impl=impl, codes=codes, passes=1)
        res.append((o, c))
    assert torch.allclose(res[0][0], res[1][0], atol=1e-5, rtol=1e-5)
    assert torch.equal(res[0][1], res[1][1])


def test_one_counting_pass_keeps_the_keys_above_bucket_a_and_about_the_budget(monkeypatch):
    """PASSES 1 on random logits: every key above the keep-th's STEP_A bucket is kept, none below it, and about
    keep keys in all (the bucket's keys sampled by position hash: within keep / 8 + 3 per head, 5% on average)."""
    monkeypatch.setattr(td, "PASSES", 1)
    z = torch.randn(4, 6, 3000, generator=torch.Generator().manual_seed(3)) * 2.0
    for keep in (5, 60, 600):
        kept, cut = td._rule(z, keep)
        a, _ = td._buckets(z)
        big_a = (torch.sort(a, -1).values[..., keep - 1:keep])  # the keep-th largest key's bucket
        assert bool(((a < big_a) <= kept).all()) and not bool((kept & (a > big_a)).any())
        got = kept.sum(-1).float()  # the bucket's keys sit at scattered positions: the hash keeps about need
        assert bool((abs(got - keep) <= keep // 8 + 3).all()) and abs(float(got.mean()) - keep) <= 0.05 * keep + 1, got
        assert bool(cut.any())


@TRITON
def test_a_chunk_far_above_the_rest(monkeypatch):
    """Keys of one 64-token chunk score ~40 base-2 logits above the others: the other chunks' first-pass counts
    shift past the window, and the heads keep only the keys in it (fewer than their budget), as the twin does."""
    monkeypatch.setattr(td, "CHUNK", 64)
    n, hq, hkv, d = 400, 4, 2, 32
    gen = torch.Generator().manual_seed(5)
    q = paged([n], hq, hkv, d, 16, seed=5)[0]  # (the same queries with any keys)
    keys = torch.randn(n, hkv, d, generator=gen) * 0.1
    keys[128:192] = q[0].view(hkv, hq // hkv, d).sum(1) + torch.randn(64, hkv, d, generator=gen) * 0.05
    q, kc, vc, bt, sl = paged([n], hq, hkv, d, 16, seed=5, keys=[keys])
    res = both_impls(q, kc, vc, bt, sl, torch.tensor([150], dtype=torch.int32), 1.0)
    assert torch.equal(res[0][1], res[1][1])
    assert 0 < int(res[0][1].min()) and int(res[0][1].max()) <= 64  # only the far chunk's keys are in the window
    assert torch.allclose(res[0][0], res[1][0], atol=1e-5)


@pytest.mark.usefixtures("two_passes")
@TRITON
def test_ties_at_the_threshold_are_kept_up_to_the_slack():
    """Keys repeated a few times score exactly alike: every key that ties with the keep-th is kept while the tied
    keys beyond the budget are at most TIE_SLACK, by both paths, and the output is the softmax over all of them."""
    hq, hkv, d, n = 4, 2, 32, 300
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(30, hkv, d, generator=gen)
    keys = base[torch.arange(n) % 30]  # thirty distinct keys, ten copies each
    q, kc, vc, bt, sl = paged([n], hq, hkv, d, 16, keys=[keys])
    kp = torch.tensor([15], dtype=torch.int32)  # the best key's 10 copies, then 5 of the next 10 ties: all 10
    res = both_impls(q, kc, vc, bt, sl, kp, 0.2)
    assert torch.equal(res[0][1], res[1][1])
    assert res[0][1].tolist() == [[20] * hq]
    assert torch.allclose(res[0][0], res[1][0], atol=1e-5)


@TRITON
@pytest.mark.parametrize("distinct", [5, 1])
def test_a_flood_of_ties_keeps_about_the_budget(distinct):
    """Keys repeated many times (five distinct keys, 60 copies each; or one key everywhere: a model whose keys all
    score the same): the tied keys beyond the budget exceed TIE_SLACK, so each head keeps about the keys it needs
    of them, picked by position hash, in both paths (the count reported is the budget), and the outputs agree."""
    hq, hkv, d, n = 4, 2, 32, 300
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(distinct, hkv, d, generator=gen)
    keys = base[torch.arange(n) % distinct]
    q, kc, vc, bt, sl = paged([n], hq, hkv, d, 16, keys=[keys])
    keep = 70  # five keys: the best one's 60 copies, then 10 of the next 60 ties; one key: 70 of 300 ties
    kp = torch.tensor([keep], dtype=torch.int32)
    res = both_impls(q, kc, vc, bt, sl, kp, 0.2)
    assert torch.equal(res[0][1], res[1][1])
    assert res[0][1].tolist() == [[keep] * hq]
    assert torch.allclose(res[0][0], res[1][0], atol=1e-5)
    k = gather_paged(kc, bt[0], n).float()  # what the rule keeps of these logits, head by head
    z = torch.einsum("hgd,hnd->hgn", q[0].float().view(hkv, hq // hkv, d), k) * (0.2 * td.LOG2E)
    kept = td.kept_keys(z, keep)
    assert bool((abs(kept.sum(-1) - keep) <= 3).all()), kept.sum(-1)  # about the budget, not every tie
    pos = torch.arange(n)
    for h in kept.view(hq, n):
        assert int(pos[h].max() - pos[h].min()) > n * 3 // 4  # spread over the context, not its first keys


def test_tie_cut():
    """No cut while the ties beyond the need are at most TIE_SLACK; past it a cut that keeps about need of the
    tied keys (of consecutive positions: within 2 of need)."""
    assert int(td.tie_cut(5, 5 + td.TIE_SLACK)) == -1 and int(td.tie_cut(0, 0)) == -1
    for need, here in ((10, 60), (1, 100), (70, 300), (999, 5000)):
        cut = int(td.tie_cut(need, here))
        assert 0 <= cut < 2 ** 31
        for start in (0, 12345):
            got = int((td.tie_hash(torch.arange(start, start + here)) < cut).sum())
            assert abs(got - need) <= 2, (need, here, start, got)


@TRITON
def test_fp16_cache():
    """Half-precision caches (fp16 here: the interpreter's tl.dot multiplies bf16 bit patterns; bf16 runs on the
    GPU in test_gpu_bf16_long_context_and_graph_replay)."""
    q, kc, vc, bt, sl = paged([333, 97], 8, 2, 64, 16, dtype=torch.float16, seed=4)
    kp = torch.tensor([40, 12], dtype=torch.int32)
    outs = []
    for impl in ("torch", "triton"):
        o = torch.empty_like(q)
        td.token_decode(q, kc, vc, bt, sl, kp, 0.125, o, impl=impl)
        outs.append(o.float())
    assert (outs[0] - outs[1]).abs().max() < 2e-3  # one fp16 rounding of the output, P in fp16 before P @ V


@TRITON
def test_rows_beyond_the_scratch_run_in_groups_and_the_scratch_is_reusable():
    """A scratch of 2 rows serves 5 rows in three groups of launches; a second call on the same scratch (a CUDA
    graph replay) gives the same result, and the merge counters are back at zero."""
    lens, keep = [90, 300, 64, 200, 150], [20, 0, 64, 13, 1]
    q, kc, vc, bt, sl = paged(lens, 4, 2, 32, 16, seed=6)
    kp = torch.tensor(keep, dtype=torch.int32)
    scratch = td.token_scratch(2, 4, 2, 32, 320, "cpu")
    ref = torch.full_like(q, 5.0)
    td.token_decode(q, kc, vc, bt, sl, kp, 0.17, ref, impl="torch")
    for _ in range(2):
        out = torch.full_like(q, 5.0)
        td.token_decode(q, kc, vc, bt, sl, kp, 0.17, out, scratch=scratch, impl="triton")
        assert torch.allclose(out, ref, atol=1e-5)
        assert torch.all(scratch.sync == 0)


@pytest.mark.usefixtures("two_passes")
def test_kept_keys_rule():
    z = torch.tensor([[3.0, 1.0, 2.0, 2.0, -1.0]])
    assert td.kept_keys(z, 2).tolist() == [[True, False, True, True, False]]  # the tie with the 2nd kept
    assert td.kept_keys(z, 5).all() and td.kept_keys(z, 9).all()
    assert td.kept_keys(z, 1).tolist() == [[True, False, False, False, False]]
    # within STEP_B (1/512 of a base-2 logit) of the keep-th: kept; further: not
    z = torch.tensor([[10.0, 9.5, 9.5 - 1e-4, 9.49, 5.0]])
    assert td.kept_keys(z, 2).tolist() == [[True, True, True, False, False]]
    # fewer than keep keys within the window (31.75-32 below the maximum): those only
    z = torch.tensor([[40.0, 30.0, 0.0, -1.0, -2.0]])
    assert td.kept_keys(z, 3).tolist() == [[True, True, False, False, False]]


@pytest.mark.usefixtures("two_passes")
@pytest.mark.parametrize("seed", range(6))
def test_kept_keys_are_the_top_keys_and_their_near_ties(seed):
    """On random logits of any spread: every one of the keep best is kept, and nothing below the keep-th by more
    than STEP_B (unless fewer than keep lie within the window, where the window's keys are kept)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(3, 5, 700, generator=gen) * (1.0 + 10.0 * seed)
    for keep in (1, 7, 100, 699):
        kept = td.kept_keys(z, keep)
        kth = z.topk(keep, dim=-1).values[..., -1:]
        # the window: BUCKETS buckets of STEP_A on the absolute grid, from the maximum's down (31.75-32 below it)
        window = torch.floor(-z / td.STEP_A) - torch.floor(-z.amax(-1, keepdim=True) / td.STEP_A) < td.BUCKETS
        assert bool((window >= (z > z.amax(-1, keepdim=True) - (td.BUCKETS - 1) * td.STEP_A)).all())
        assert bool((window <= (z > z.amax(-1, keepdim=True) - td.BUCKETS * td.STEP_A)).all())
        in_window = window.sum(-1, keepdim=True) >= keep
        assert bool(torch.where(in_window, (z >= kth) <= kept, kept == window).all())
        assert bool(torch.where(in_window, ~kept | (z >= kth - td.STEP_B), True).all())


def test_bad_inputs_are_named():
    q, kc, vc, bt, sl = paged([50], 4, 2, 32, 16)
    out = torch.empty_like(q)
    with pytest.raises(ValueError, match="keep must be an int32"):
        td.token_decode(q, kc, vc, bt, sl, torch.tensor([5]), 0.1, out)
    with pytest.raises(ValueError, match="out must be like q"):
        td.token_decode(q, kc, vc, bt, sl, torch.tensor([5], dtype=torch.int32), 0.1, out[:, :2])
    with pytest.raises(ValueError, match="multiple of KV heads"):
        td.token_decode(q[:, :3], kc, vc, bt, sl, torch.tensor([5], dtype=torch.int32), 0.1, out[:, :3])
    with pytest.raises(ValueError, match="rows >= 1"):
        td.token_scratch(0, 4, 2, 32, 100, "cpu")
    for bad in (-1, 3, True):
        with pytest.raises(ValueError, match="must be 0, 1 or 2 \\(counting passes; 0: a sampled threshold\\)"):
            td.token_decode(q, kc, vc, bt, sl, torch.tensor([5], dtype=torch.int32), 0.1, out, passes=bad)


@TRITON
def test_a_scratch_of_other_heads_is_refused():
    q, kc, vc, bt, sl = paged([50], 4, 2, 32, 16)
    with pytest.raises(ValueError, match="scratch does not match"):
        td.token_decode(q, kc, vc, bt, sl, torch.tensor([5], dtype=torch.int32), 0.1, torch.empty_like(q),
                        scratch=td.token_scratch(1, 8, 2, 32, 64, "cpu"), impl="triton")
    q, kc, vc, bt, sl = paged([100], 4, 2, 32, 16)
    with pytest.raises(ValueError, match=r"a row of 100 tokens does not fit the scratch's logits \(64 tokens\)"):
        td.token_decode(q, kc, vc, bt, sl, torch.tensor([5], dtype=torch.int32), 0.1, torch.empty_like(q),
                        scratch=td.token_scratch(1, 4, 2, 32, 40, "cpu"), impl="triton")


def test_scratch_sizes():
    assert td.scratch_rows(32, 131072, 256) == (256 << 20) // (32 * 131072 * 4)  # 16 rows of 8B at 128k
    assert td.scratch_rows(14, 4096, 8) == 8
    assert 1 <= td.num_splits(1, 8, 131072) <= td.MAX_SPLITS
    assert td.num_splits(1, 2, 100) == 1  # two tiles: one split


@pytest.mark.gpu
@pytest.mark.parametrize("passes", [0, 1, 2])
def test_gpu_bf16_long_context_and_graph_replay(monkeypatch, passes):
    """On a GPU: 8B geometry (32/8 heads, D=128, 16-token pages), rows of 32k and 5k tokens in bf16, Triton against
    the twin, with one counting pass and with two; then the launches captured in a CUDA graph and replayed on new
    queries and budgets."""
    monkeypatch.setattr(td, "PASSES", passes)
    lens, keep = [32768, 5000], [655, 100]
    q, kc, vc, bt, sl = (t.cuda() for t in paged(lens, 32, 8, 128, 16, dtype=torch.bfloat16, seed=9))
    kp = torch.tensor(keep, dtype=torch.int32, device="cuda")
    scratch = td.token_scratch(2, 32, 8, 128, 32768, "cuda")
    ref, out = torch.empty_like(q), torch.empty_like(q)
    c0, c1 = (torch.zeros(2, 32, dtype=torch.int32, device="cuda") for _ in range(2))
    td.token_decode(q, kc, vc, bt, sl, kp, 0.088, ref, counts=c0, impl="torch")
    td.token_decode(q, kc, vc, bt, sl, kp, 0.088, out, counts=c1, scratch=scratch, impl="triton")
    assert (out.float() - ref.float()).abs().max() < 2e-2
    # (bf16 logits summed in another order; with a sampled threshold the keys near it move the count more)
    assert ((c0 - c1).abs().float() <= (0.03 if passes == 0 else 0.01) * c0.float() + 1).all()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        td.token_decode(q, kc, vc, bt, sl, kp, 0.088, out, scratch=scratch, impl="triton")
    q.copy_(torch.randn_like(q))
    kp.copy_(torch.tensor([2000, 5000], dtype=torch.int32))
    g.replay()
    td.token_decode(q, kc, vc, bt, sl, kp, 0.088, ref, impl="torch")
    torch.cuda.synchronize()
    assert (out.float() - ref.float()).abs().max() < 2e-2
    assert torch.all(scratch.sync == 0)


def first_stage(n, keep):
    """One row of n keys (4/2 heads, D=32) run to stages=1 by the kernels: (inputs..., scratch, out (3.0: untouched
    so far), the row's exact base-2 logits [Hq, n])."""
    q, kc, vc, bt, sl = paged([n], 4, 2, 32, 16, seed=8)
    kp = torch.tensor([keep], dtype=torch.int32)
    scratch = td.token_scratch(1, 4, 2, 32, n, "cpu")
    out = torch.full_like(q, 3.0)
    td.token_decode(q, kc, vc, bt, sl, kp, 0.2, out, scratch=scratch, impl="triton", stages=1)
    k = gather_paged(kc, bt[0], n).repeat_interleave(2, 0)
    return q, kc, vc, bt, sl, kp, scratch, out, torch.einsum("hd,hnd->hn", q[0], k) * 0.2 * td.LOG2E


@TRITON
def test_profiling_stages_stop_after_their_launch():
    """stages=1 runs the logits launch only (the scratch holds every key's base-2 logit, out untouched), 2 adds the
    threshold (counts filled), 3 everything; other values are refused."""
    q, kc, vc, bt, sl, kp, scratch, out, z = first_stage(150, 20)
    assert torch.allclose(scratch.logits[0, :, :150], z, atol=1e-5) and torch.all(out == 3.0)
    td.token_decode(q, kc, vc, bt, sl, kp, 0.2, out, scratch=scratch, impl="triton", stages=2)
    assert scratch.sel[0, :, 2].tolist() == [20] * 4 and torch.all(out == 3.0)
    with pytest.raises(ValueError, match="stages=4"):
        td.token_decode(q, kc, vc, bt, sl, kp, 0.2, out, scratch=scratch, impl="triton", stages=4)


@TRITON
@pytest.mark.parametrize("keep", [3, 40, 250])
def test_triton_equals_the_twin_on_peaked_scores(keep):
    """Scores spread over far more than the window (32 base-2 units below the maximum): heads keep the window's
    keys where fewer than keep lie in it; Triton and the twin keep the same keys."""
    q, kc, vc, bt, sl = paged([300, 130], 4, 2, 32, 16, seed=12)
    kp = torch.tensor([keep, keep], dtype=torch.int32)
    res = []
    for impl in ("torch", "triton"):
        o, c = torch.empty_like(q), torch.zeros(2, 4, dtype=torch.int32)
        td.token_decode(q, kc, vc, bt, sl, kp, 4.0, o, counts=c, impl=impl)
        res.append((o, c))
    assert torch.equal(res[0][1], res[1][1])
    assert torch.allclose(res[0][0], res[1][0], atol=1e-5)
    if keep == 250:
        assert (res[0][1][0] < 250).any()  # some head found fewer than keep keys in its window


# -- with a 4-bit key copy (codes=): the copy ranks every key, the exact rule runs on rerank x keep candidates ------
def encoded(kc, bt, sl, fmt="int4"):
    from cab_vllm.ops import key_codes as kq

    codes = kq.key_codes(kc.shape[0], kc.shape[1], kc.shape[2], kc.shape[3], kc.device, fmt)
    return kq.encode_keys(kc, codes, bt, sl, sl.clone(), impl="torch")


def rerank_reference(q, kc, vc, bt, sl, keep, scale, codes, rerank):
    """Float64: each head's candidates by the copy's scores (kept_keys' rule for rerank x keep keys: the rule is
    tested against torch.topk above), the keep best of those by exact score (topk_reference), softmax over them;
    None for rows with keep <= 0."""
    from cab_vllm.ops.key_codes import dequantize

    g = q.shape[1] // kc.shape[2]

    def candidates(s, n, kt):
        est = torch.einsum("hd,hnd->hn", q[s].float(), dequantize(codes, bt[s], n).repeat_interleave(g, 0))
        return td.kept_keys(est * (scale * td.LOG2E), kt * rerank)

    return topk_reference(q, kc, vc, bt, sl, keep, scale, candidates)


def both_with_codes(q, kc, vc, bt, sl, kp, scale, codes, rerank=td.RERANK):
    res = []
    for impl in ("torch", "triton"):
        o, c = torch.full_like(q, 7.0), torch.zeros(q.shape[0], q.shape[1], dtype=torch.int32)
        td.token_decode(q, kc, vc, bt, sl, kp, scale, o, counts=c, impl=impl, codes=codes, rerank=rerank)
        res.append((o, c))
    return res


@pytest.mark.usefixtures("two_passes")
@pytest.mark.parametrize("rerank", [1, 2, 4])
@pytest.mark.parametrize("lens, keep, hq, hkv, d, page", CASES)
def test_codes_twin_is_exact_top_of_the_estimates_candidates(lens, keep, hq, hkv, d, page, rerank):
    q, kc, vc, bt, sl = paged(lens, hq, hkv, d, page, seed=len(lens) + d + 1)
    codes = encoded(kc, bt, sl)
    kp = torch.tensor(keep, dtype=torch.int32)
    out = torch.full_like(q, 7.0)
    counts = torch.zeros(len(lens), hq, dtype=torch.int32)
    td.token_decode(q, kc, vc, bt, sl, kp, 1 / math.sqrt(d), out, counts=counts, impl="torch", codes=codes,
                    rerank=rerank)
    for s, ref in enumerate(rerank_reference(q, kc, vc, bt, sl, kp, 1 / math.sqrt(d), codes, rerank)):
        if ref is None:
            assert torch.all(out[s] == 7.0) and torch.all(counts[s] == 0)
            continue
        exact = counts[s] == min(keep[s], lens[s])  # else a near tie (within STEP_B) kept beside the keep-th
        assert bool((counts[s] >= min(keep[s], lens[s])).all()) and int(exact.sum()) >= hq - 2
        assert torch.allclose(out[s][exact].double(), ref[exact], atol=1e-5, rtol=1e-5)


@TRITON
@pytest.mark.parametrize("lens, keep, hq, hkv, d, page", CASES)
def test_codes_triton_equals_the_twin(lens, keep, hq, hkv, d, page):
    q, kc, vc, bt, sl = paged(lens, hq, hkv, d, page, seed=5 * len(lens) + d)
    (o0, c0), (o1, c1) = both_with_codes(q, kc, vc, bt, sl, torch.tensor(keep, dtype=torch.int32), 1 / math.sqrt(d),
                                         encoded(kc, bt, sl))
    assert torch.allclose(o0, o1, atol=1e-5, rtol=1e-5)
    assert torch.equal(c0, c1)


@TRITON
@pytest.mark.parametrize("chunk, scan_tile, list_tile, atomic", [(64, 64, 16, True), (128, 512, 32, False)])
def test_codes_launch_steps_and_chunks_without_candidates(monkeypatch, chunk, scan_tile, list_tile, atomic):
    """Small chunks, where most hold no head's candidate (their maxima -inf after the rescoring: their counts
    shift past the window), several scan and list steps per chunk, both second-count paths; one row keeps a key
    of every chunk's far-scoring block, one has every key a candidate (rerank x keep >= n)."""
    for name, value in (("CHUNK", chunk), ("SCAN_TILE", scan_tile), ("ATTEND_TILE", list_tile),
                        ("COUNT_ATOMIC", atomic)):
        monkeypatch.setattr(td, name, value)
    n, hq, hkv, d = 700, 8, 2, 32
    gen = torch.Generator().manual_seed(13)
    q = paged([n], hq, hkv, d, 16, seed=13)[0]
    keys = torch.randn(n, hkv, d, generator=gen) * 0.1
    keys[300:340] = q[0].view(hkv, hq // hkv, d).sum(1) + torch.randn(40, hkv, d, generator=gen) * 0.3
    q, kc, vc, bt, sl = paged([n, n, 90], hq, hkv, d, 16, seed=13, keys=[keys, keys, keys[:90]])
    q[1:] = q[:1]
    kp = torch.tensor([15, 200, 50], dtype=torch.int32)
    (o0, c0), (o1, c1) = both_with_codes(q, kc, vc, bt, sl, kp, 1.0, encoded(kc, bt, sl))
    assert torch.equal(c0, c1)
    assert torch.allclose(o0, o1, atol=1e-5)


@TRITON
def test_codes_fp16_cache():
    """A half-precision cache: the kernel's estimate in float16 (codes made float16 by their bits, 0x6400 | code,
    less 1024), the twin's in float32: at rerank 2 on random keys both keep the same keys (counts equal), outputs
    within one fp16 rounding."""
    q, kc, vc, bt, sl = paged([333, 97, 1200], 8, 2, 64, 16, dtype=torch.float16, seed=15)
    kp = torch.tensor([40, 12, 100], dtype=torch.int32)
    res = both_with_codes(q, kc, vc, bt, sl, kp, 0.125, encoded(kc, bt, sl))
    assert torch.equal(res[0][1], res[1][1])
    assert (res[0][0].float() - res[1][0].float()).abs().max() < 2e-3


def test_codes_with_every_key_a_candidate_is_the_exact_decode():
    """rerank x keep >= n: every key is a candidate, and the decode is the exact one (same keys, same output)."""
    q, kc, vc, bt, sl = paged([120, 300], 4, 2, 32, 16, seed=14)
    kp = torch.tensor([40, 75], dtype=torch.int32)
    exact, est = torch.empty_like(q), torch.empty_like(q)
    c0, c1 = torch.zeros(2, 4, dtype=torch.int32), torch.zeros(2, 4, dtype=torch.int32)
    td.token_decode(q, kc, vc, bt, sl, kp, 0.3, exact, counts=c0, impl="torch")
    td.token_decode(q, kc, vc, bt, sl, kp, 0.3, est, counts=c1, impl="torch", codes=encoded(kc, bt, sl), rerank=4)
    assert torch.equal(c0, c1) and torch.allclose(exact, est, atol=1e-6)


def test_codes_bad_inputs_are_named():
    from cab_vllm.ops import key_codes as kq

    q, kc, vc, bt, sl = paged([50], 4, 2, 32, 16)
    kp = torch.tensor([5], dtype=torch.int32)
    codes = encoded(kc, bt, sl)
    with pytest.raises(ValueError, match="rerank=0 must be an integer 1..64"):
        td.token_decode(q, kc, vc, bt, sl, kp, 0.1, torch.empty_like(q), codes=codes, rerank=0)
    with pytest.raises(ValueError, match="codes must be uint8"):
        td.token_decode(q, kc, vc, bt, sl, kp, 0.1, torch.empty_like(q),
                        codes=kq.KeyCodes(codes.codes[:-1], codes.bounds))


def _prmt(a: int, b: int, sel: int) -> int:
    """PTX prmt.b32 (default mode): result byte i is byte (sel >> 4i) & 7 of b:a (a's bytes 0-3, b's 4-7)."""
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    return sum(src[(sel >> (4 * i)) & 7] << (8 * i) for i in range(4))


@pytest.mark.parametrize("shift", [0, 4])
def test_the_nibble_asm_makes_1024_plus_each_bytes_nibble(shift):
    """key_codes._nibbles_asm's PTX, emulated on every byte value at each of a word's four places: the two output
    registers hold, in element order (element i: byte i of the packed input, lane i % 2 of register i // 2), the
    float16 bits of 1024 + (byte >> shift) & 15."""
    import random

    rng = random.Random(shift)
    for _ in range(2000):
        e = [rng.randrange(256) for _ in range(4)]
        word = sum(x << (8 * i) for i, x in enumerate(e))
        t = ((word >> shift) if shift else word) & 0x0F0F0F0F
        r0, r1 = _prmt(t, 0x64646464, 0x4140), _prmt(t, 0x64646464, 0x4342)
        lanes = [r0 & 0xFFFF, r0 >> 16, r1 & 0xFFFF, r1 >> 16]
        assert lanes == [0x6400 | ((x >> shift) & 15) for x in e]
        assert [float(torch.tensor(v, dtype=torch.int16).view(torch.float16)) - 1024 for v in lanes] == \
            [float((x >> shift) & 15) for x in e]


def gpu_long_context_with_codes(fmt):
    """8B geometry, bf16, 32k and 5k rows on a GPU: the copy of format fmt encoded by its kernel, the decode with it
    against the twin on the same copy (outputs within bf16's error, kept counts within 1%), then captured in a CUDA
    graph and replayed on new queries and budgets."""
    from cab_vllm.ops import key_codes as kq

    lens, keep = [32768, 5000], [655, 100]
    q, kc, vc, bt, sl = (t.cuda() for t in paged(lens, 32, 8, 128, 16, dtype=torch.bfloat16, seed=9))
    codes = kq.key_codes(kc.shape[0], 16, 8, 128, "cuda", fmt)
    kq.encode_keys(kc, codes, bt, sl, sl.clone())
    kp = torch.tensor(keep, dtype=torch.int32, device="cuda")
    scratch = td.token_scratch(2, 32, 8, 128, 32768, "cuda")
    ref, out = torch.empty_like(q), torch.empty_like(q)
    c0, c1 = (torch.zeros(2, 32, dtype=torch.int32, device="cuda") for _ in range(2))
    td.token_decode(q, kc, vc, bt, sl, kp, 0.088, ref, counts=c0, impl="torch", codes=codes)
    td.token_decode(q, kc, vc, bt, sl, kp, 0.088, out, counts=c1, scratch=scratch, impl="triton", codes=codes)
    assert (out.float() - ref.float()).abs().max() < 3e-2
    assert ((c0 - c1).abs().float() <= 0.01 * c0.float() + 1).all()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        td.token_decode(q, kc, vc, bt, sl, kp, 0.088, out, scratch=scratch, impl="triton", codes=codes)
    q.copy_(torch.randn_like(q))
    kp.copy_(torch.tensor([2000, 5000], dtype=torch.int32))
    g.replay()
    td.token_decode(q, kc, vc, bt, sl, kp, 0.088, ref, impl="torch", codes=codes)
    torch.cuda.synchronize()
    assert (out.float() - ref.float()).abs().max() < 3e-2
    assert torch.all(scratch.sync == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("asm", [False, True], ids=["plain", "nibble-asm"])
def test_gpu_codes_bf16_long_context_and_graph_replay(monkeypatch, asm):
    """On a GPU (8B geometry, bf16, 32k and 5k rows): the copy encoded by its kernel, the decode with it against
    the twin on the same copy (the twin's estimates in float32 against the kernel's float16 dot: outputs within
    bf16's error, kept counts within 1%), then captured in a CUDA graph and replayed on new queries and budgets;
    with the codes made float16 in Triton or in inline PTX (CODE_ASM)."""
    monkeypatch.setattr(td, "CODE_ASM", asm)
    gpu_long_context_with_codes("int4")


# -- with a float8 key copy (codes= of fmt "fp8"): the estimate picks each head's keep keys, attended by exact score --
@pytest.mark.usefixtures("two_passes")
@pytest.mark.parametrize("lens, keep, hq, hkv, d, page", CASES)
def test_fp8_twin_is_exact_softmax_over_the_estimates_best(lens, keep, hq, hkv, d, page):
    """The twin keeps what the rule keeps of the copy's estimates (kept_keys, tested against torch.topk above) and
    attends to those keys by their exact scores (float64 reference); the estimate's choice differs from the exact
    best keys somewhere (it is an estimate), and the kept keys are not rescored into another set."""
    from cab_vllm.ops.key_codes import estimate

    q, kc, vc, bt, sl = paged(lens, hq, hkv, d, page, seed=len(lens) + d + 2)
    codes = encoded(kc, bt, sl, "fp8")
    kp = torch.tensor(keep, dtype=torch.int32)
    out, counts = torch.full_like(q, 7.0), torch.zeros(len(lens), hq, dtype=torch.int32)
    scale = 1 / math.sqrt(d)
    td.token_decode(q, kc, vc, bt, sl, kp, scale, out, counts=counts, impl="torch", codes=codes)
    g = hq // hkv
    differs = False
    for s, (n, kt) in enumerate(zip(lens, keep)):
        if kt <= 0:
            assert torch.all(out[s] == 7.0) and torch.all(counts[s] == 0)
            continue
        est = estimate(q[s].view(hkv, g, d), codes, bt[s], n).reshape(hq, n) * (scale * td.LOG2E)
        sel = td.kept_keys(est, kt)
        k = gather_paged(kc, bt[s], n).double().repeat_interleave(g, 0)
        v = gather_paged(vc, bt[s], n).double().repeat_interleave(g, 0)
        z = (torch.einsum("hd,hnd->hn", q[s].double(), k) * scale).masked_fill(~sel, float("-inf"))
        ref = torch.einsum("hn,hnd->hd", torch.softmax(z, -1), v)
        assert torch.equal(counts[s], sel.sum(-1).to(torch.int32))
        assert torch.allclose(out[s].double(), ref, atol=1e-5, rtol=1e-5)
        if kt < n:
            exact = td.kept_keys(torch.einsum("hd,hnd->hn", q[s].double(), k).float(), kt)
            differs |= not torch.equal(exact, sel)
    assert differs or max(min(k, n) for k, n in zip(keep, lens)) == max(lens)


@TRITON
@pytest.mark.parametrize("lens, keep, hq, hkv, d, page", CASES)
def test_fp8_triton_equals_the_twin(lens, keep, hq, hkv, d, page):
    q, kc, vc, bt, sl = paged(lens, hq, hkv, d, page, seed=5 * len(lens) + d + 1)
    (o0, c0), (o1, c1) = both_with_codes(q, kc, vc, bt, sl, torch.tensor(keep, dtype=torch.int32), 1 / math.sqrt(d),
                                         encoded(kc, bt, sl, "fp8"))
    assert torch.allclose(o0, o1, atol=1e-5, rtol=1e-5)
    assert torch.equal(c0, c1)


@TRITON
def test_fp8_fp16_cache_and_small_chunks(monkeypatch):
    """A half-precision cache (the group centers' dot in float16, its result spread over the keys in two float16
    halves) and 256-key chunks (a tile each, several chunks a row): the kernel keeps the twin's keys; outputs
    within one fp16 rounding."""
    monkeypatch.setattr(td, "CHUNK", 256)
    q, kc, vc, bt, sl = paged([333, 97, 1200], 8, 2, 64, 16, dtype=torch.float16, seed=16)
    kp = torch.tensor([40, 12, 100], dtype=torch.int32)
    res = both_with_codes(q, kc, vc, bt, sl, kp, 0.125, encoded(kc, bt, sl, "fp8"))
    assert torch.equal(res[0][1], res[1][1])
    assert (res[0][0].float() - res[1][0].float()).abs().max() < 2e-3


def test_fp8_bad_inputs_are_named():
    q, kc, vc, bt, sl = paged([50], 4, 2, 32, 16)
    kp = torch.tensor([5], dtype=torch.int32)
    codes = encoded(kc, bt, sl, "fp8")
    with pytest.raises(ValueError, match="share strides"):
        td.token_decode(q, kc, vc.transpose(0, 1).contiguous().transpose(0, 1), bt, sl, kp, 0.1, torch.empty_like(q),
                        codes=codes, impl="triton")


@pytest.mark.gpu
def test_gpu_fp8_bf16_long_context_and_graph_replay():
    """On a GPU (8B geometry, bf16, 32k and 5k rows): the float8 copy encoded by its kernel, the decode with it
    against the twin on the same copy (outputs within bf16's error, kept counts within 1%), then captured in a CUDA
    graph and replayed on new queries and budgets."""
    gpu_long_context_with_codes("fp8")


# -- passes=0: each head's threshold from a sample of its exact logits, one pass that scores and attends ------------
@pytest.fixture
def sampled(monkeypatch):
    monkeypatch.setattr(td, "PASSES", 0)


@TRITON
@pytest.mark.usefixtures("sampled")
@pytest.mark.parametrize("lens, keep, hq, hkv, d, page", CASES + [([5000, 3000], [300, 40], 8, 2, 32, 16)])
def test_sampled_threshold_kernels_equal_the_twin(lens, keep, hq, hkv, d, page):
    """The sampling, threshold and one-pass launches keep what the twin's sampled_rule keeps (rows left alone,
    every key kept, strides 1 and 4, Qwen's group of 7 included), with the same counts."""
    q, kc, vc, bt, sl = paged(lens, hq, hkv, d, page, seed=7 * len(lens) + d)
    (o0, c0), (o1, c1) = both_impls(q, kc, vc, bt, sl, torch.tensor(keep, dtype=torch.int32), 1 / math.sqrt(d))
    assert torch.allclose(o0, o1, atol=1e-5, rtol=1e-5)
    assert torch.equal(c0, c1)


def test_sampled_rule_keeps_each_heads_best_about_keep():
    """The twin's rule: a threshold never above the sample's k-th largest logit and within the bisection's step of
    it; the kept keys are those at or above it (each head's best), about keep of them on a long row; with a
    stride of 1 (keep < 2 SAMPLE_Q) exactly the keep best; every key when keep >= n."""
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(6, 40000, generator=gen) * 3
    for keep in (800, 2000):
        st = td.sample_stride(keep)
        assert st == min(td.SAMPLE, keep // td.SAMPLE_Q)
        thr = td.sampled_threshold(z[:, ::st], keep, st)
        kth = z[:, ::st].topk(round(keep / st), dim=-1).values[:, -1]
        assert torch.all(thr <= kth) and torch.all(kth - thr <= td.SAMPLE_RANGE / 2 ** td.SAMPLE_ITERS * 1.01)
        sel = td.sampled_rule(z, keep)
        assert torch.equal(sel, z >= thr[:, None])
        ratio = sel.sum(-1).float() / keep
        assert ratio.min() > 0.6 and ratio.max() < 1.4, ratio  # the sample's quantile: a spread ~ 1/sqrt(keep/st)
    sel = td.sampled_rule(z[:, :3000], 100)  # stride 1: the k-th largest itself
    assert sel.sum(-1).tolist() == [100] * 6
    assert torch.equal(sel, z[:, :3000] >= z[:, :3000].topk(100, dim=-1).values[:, -1:])
    assert td.sampled_rule(z[:, :50], 50).all()


def test_sampled_threshold_stays_within_the_window():
    """A head whose sampled logits fall far below its maximum (more than SAMPLE_RANGE) stops at the window's
    floor: it keeps the keys within SAMPLE_RANGE of the sample's maximum (the others weigh under 2^-32)."""
    z = torch.zeros(1, 640)
    z[0, ::10] = -100.0
    z[0, 0] = 0.0
    thr = td.sampled_threshold(z[:, ::10], 300, 10)
    assert float(thr) == -td.SAMPLE_RANGE


@TRITON
@pytest.mark.usefixtures("sampled")
def test_sampled_stages_and_refusals():
    """passes=0's profiling stages: 1 writes the sampled logits (every stride-th key's) and nothing else, 2 the
    thresholds (sel[..., 5], float32 bits) the twin computes from them; a key copy with passes=0 is refused, and so
    is a scratch made for the counting rule (whose split partials are fewer than the one-pass launch's here)."""
    q, kc, vc, bt, sl, kp, scratch, out, z = first_stage(2000, 300)
    st = td.sample_stride(300)
    m = -(-2000 // st)
    assert torch.allclose(scratch.logits[0, :, :m], z[:, ::st], atol=1e-5) and torch.all(out == 3.0)
    td.token_decode(q, kc, vc, bt, sl, kp, 0.2, out, scratch=scratch, impl="triton", stages=2)
    thr = scratch.sel[0, :, 5].view(torch.float32)
    assert torch.allclose(thr, td.sampled_threshold(scratch.logits[0, :, :m], 300, st), atol=1e-6)
    assert torch.all(out == 3.0)
    from cab_vllm.ops import key_codes as kq

    codes = kq.key_codes(kc.shape[0], kc.shape[1], kc.shape[2], kc.shape[3], "cpu")
    with pytest.raises(ValueError, match="passes=0 \\(a sampled threshold over exact scores\\) takes none"):
        td.token_decode(q, kc, vc, bt, sl, kp, 0.2, out, codes=codes)
    counting = td.token_scratch(1, 4, 2, 32, 2000, "cpu", passes=1)
    assert counting.part_lse.numel() < 4 * td.fused_splits(1, 2, 2000) <= scratch.part_lse.numel()
    with pytest.raises(ValueError, match="make it with token_scratch\\(..., passes=0\\)"):
        td.token_decode(q, kc, vc, bt, sl, kp, 0.2, out, scratch=counting, impl="triton")
