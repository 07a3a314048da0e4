"""cab_experiments.granularity: the (query tile x key block) tiles the token-level oracle's choices touch, against a
loop over tiles; the CLI's refusals."""

from __future__ import annotations

import math

import pytest
import torch

from cab_experiments.granularity import markdown, union_density
from cab_vllm import hf


def _brute(q, k, keep, scale, tile, bs, per_head=False):
    n = q.shape[2]
    kept = torch.isfinite(hf.token_oracle_scores(q, k, keep, scale, 0, n))  # [B, Hkv, G, N, N]
    kept = kept.flatten(1, 2) if per_head else kept.any(2)
    touched = causal = 0
    for b in range(q.shape[0]):
        for h in range(kept.shape[1]):
            for t0 in range(0, n, tile):
                rows = kept[b, h, t0:t0 + tile]
                last = (min(n, t0 + tile) - 1) // bs
                causal += last + 1
                for j in range(last + 1):
                    touched += bool(rows[:, j * bs:(j + 1) * bs].any())
    return touched / causal


@pytest.mark.parametrize("per_head", [False, True], ids=["per-kv-head", "per-head"])
@pytest.mark.parametrize("n,tile,bs,rows", [(37, 4, 8, 8), (64, 8, 8, 16), (50, 1, 16, 8), (45, 16, 4, 16)])
def test_union_density_counts_the_touched_tiles(n, tile, bs, rows, per_head):
    torch.manual_seed(n + tile)
    q, k = torch.randn(2, 4, n, 8), torch.randn(2, 2, n, 8)
    keep = torch.randint(1, 12, (2, 2, n))
    got = union_density(q, k, keep, 0.3, [tile], bs, rows=rows, per_head=per_head)[0]
    assert got == pytest.approx(_brute(q, k, keep, 0.3, tile, bs, per_head), abs=1e-12)
    assert 0 < got <= 1
    several = union_density(q, k, keep, 0.3, [tile, 1, tile], bs, rows=rows, per_head=per_head)
    assert several[0] == several[2] == got  # one scoring serves every tile size
    assert several[1] == union_density(q, k, keep, 0.3, [1], bs, rows=rows, per_head=per_head)[0]
    if per_head:  # a group's heads together touch at least what each touches alone
        assert got <= union_density(q, k, keep, 0.3, [tile], bs, rows=rows)[0] + 1e-12


def test_every_key_kept_touches_every_causal_tile_and_one_key_a_row_one_block():
    torch.manual_seed(0)
    n, bs = 70, 8
    q, k = torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8)  # no GQA: one head per KV head
    assert union_density(q, k, torch.full((1, 2, n), n), 0.3, [4], bs, rows=8) == [1.0]
    one, = union_density(q, k, torch.ones(1, 2, n, dtype=torch.long), 0.3, [1], bs, rows=8)
    causal = sum(i // bs + 1 for i in range(n))
    assert one == pytest.approx(n / causal)
    with pytest.raises(ValueError, match="divide rows"):
        union_density(q, k, torch.ones(1, 2, n), 0.3, [1, 3], bs, rows=8)
    with pytest.raises(ValueError, match="a prefill"):
        union_density(q[:, :, :10], k, torch.ones(1, 2, 10), 0.3, [1], bs)


def test_markdown_averages_over_layers():
    rows = [dict(length=4096, sparsity=0.9, tile=64, layer=i, block_density=0.1, token_density=0.1,
                 union_density=u) for i, u in enumerate((0.2, 0.4))]
    rows.append(dict(length=4096, sparsity=0.9, tile=1, per_head=True, layer=0, block_density=0.1,
                     token_density=0.1, union_density=0.5))
    text = markdown(rows)
    assert "| 4096 | 0.9 | 64 | 0.100 | 0.100 | 0.300 (0.200-0.400) |" in text
    assert "| 4096 | 0.9 | 1 per head | 0.100 | 0.100 | 0.500 (0.500-0.500) |" in text


def test_the_cli_refuses_a_tile_that_does_not_divide_the_row_chunk():
    from cab_experiments.cli import main

    with pytest.raises(SystemExit, match="each must divide 256"):
        main(["granularity", "--tiles", "48", "--device", "cpu"])


def test_the_cli_measures_every_layer_of_a_real_prompt(tmp_path):
    """SmolLM2 (CPU) on a 512-token multi-key prompt: one row per layer, sparsity and tile; the oracle keeps what the
    blocks hold (its keys' density at most the blocks', the diagonal block being partial), and a finer query tile
    touches no more of the causal tiles than a coarser one."""
    import json

    from cab_experiments.cli import main

    out = tmp_path / "g.jsonl"
    assert main(["granularity", "--model", "smollm2-135m-instruct", "--lengths", "512", "--sparsities", "0.8",
                 "--tiles", "64", "16", "--device", "cpu", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    layers = {r["layer"] for r in rows}
    assert len(rows) == 2 * len(layers) and len(layers) == 30  # SmolLM2-135M: 30 layers
    for r in rows:
        assert 0 < r["token_density"] <= r["block_density"] < 1 and 0 < r["union_density"] <= 1
        assert r["device"] == "cpu" and r["sparsity"] == 0.8 and r["n_tokens"] <= 512
    by = {(r["layer"], r["tile"]): r["union_density"] for r in rows}
    assert all(by[(layer, 16)] <= by[(layer, 64)] + 1e-9 for layer in layers)


def test_the_cli_bounds_mode_measures_every_layer(tmp_path):
    """granularity --bounds on SmolLM2 (CPU, 512 tokens): one row per layer and sparsity, fractions in [0, 1] with the
    group's at most the head's, the keys kept what the decode budget says."""
    import json

    from cab_experiments.cli import main
    from cab_vllm.config import CABConfig

    out = tmp_path / "b.jsonl"
    assert main(["granularity", "--bounds", "--model", "smollm2-135m-instruct", "--lengths", "512", "--sparsities",
                 "0.9", "--device", "cpu", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 30 and {r["layer"] for r in rows} == set(range(30))
    for r in rows:
        assert 0 <= r["prunable_group_kernel"] <= r["prunable_group"] <= r["prunable_head"] <= 1
        assert r["keep"] == CABConfig(sparsity=0.9).decode_tokens(r["n_tokens"])


def _brute_prunable(q, k, keep, bs):
    """bound_prunable by loops: a block's bound is the sum over dimensions of the larger of q_d * min and q_d * max."""
    hq, d = q.shape
    hkv, n, _ = k.shape
    g, m = hq // hkv, -(-n // bs)
    head = torch.zeros(hq, m, dtype=torch.bool)
    for h in range(hq):
        z = k[h // g].double() @ q[h].double()
        tau = sorted(z.tolist(), reverse=True)[keep - 1]
        for j in range(m):
            blk = k[h // g, j * bs:(j + 1) * bs].double()
            bound = sum(max(q[h, e].item() * blk[:, e].min().item(), q[h, e].item() * blk[:, e].max().item())
                        for e in range(d))
            head[h, j] = bound < tau
    return head


@pytest.mark.parametrize("n,bs,keep", [(37, 8, 3), (64, 16, 10), (50, 16, 1), (9, 4, 9)])
def test_bound_prunable_matches_loops_and_never_rules_out_a_kept_key(n, bs, keep):
    from cab_experiments.granularity import bound_prunable

    torch.manual_seed(n * 7 + keep)
    q, k = torch.randn(4, 6), torch.randn(2, n, 6)
    got = bound_prunable(q, k, keep, bs)
    head = _brute_prunable(q, k, keep, bs)
    assert got["head"] == pytest.approx(head.double().mean().item(), abs=1e-12)
    assert got["group"] == pytest.approx(head.view(2, 2, -1).all(1).double().mean().item(), abs=1e-12)
    assert 0 <= got["group_kernel"] <= got["group"] <= 1  # a lower threshold rules out fewer blocks
    # safety: no block holding one of a head's keep best keys is ruled out
    z = torch.einsum("hd,hnd->hn", q.double(), k.double().repeat_interleave(2, 0))
    best = z.topk(keep, -1).indices
    for h in range(4):
        assert not head[h, best[h] // bs].any()


def test_bound_prunable_rules_out_far_blocks_and_refuses_bad_input():
    from cab_experiments.granularity import bound_prunable

    q = torch.tensor([[1.0, 0.0]])
    k = torch.zeros(1, 32, 2)
    k[0, :8, 0] = 10.0  # block 0 scores 10, the other three blocks 0: each of their bounds is 0 < 10
    assert bound_prunable(q, k, 4, 8) == {"head": 0.75, "group": 0.75, "group_kernel": 0.75}
    with pytest.raises(ValueError, match="keep"):
        bound_prunable(q, k, 0, 8)
    with pytest.raises(ValueError, match="do not match"):
        bound_prunable(torch.zeros(3, 2), k.expand(2, -1, -1), 1, 8)


@pytest.mark.parametrize("n, keep, bits, quant", [(200, 10, 4, "token"), (97, 30, 2, "channel"),
                                                  (64, 64, 8, "token"), (150, 12, 4, "channel")])
def test_rerank_recall_matches_loops(n, keep, bits, quant):
    """rerank_recall by loops per head: the exact best keep among the quantized estimate's F x keep best, and the
    softmax mass of the keep best candidates by exact score over that of the exact best keep."""
    from cab_experiments.granularity import rerank_recall
    from cab_vllm.hf import quantize_keys, quantize_keys_channel

    torch.manual_seed(n + keep + bits)
    q, k = torch.randn(6, 32), torch.randn(2, n, 32)
    got = rerank_recall(q, k, keep, bits, (1, 2, 4), quant)
    kq = quantize_keys(k, bits) if quant == "token" else quantize_keys_channel(k, bits)
    for f in (1, 2, 4):
        rec, mass = [], []
        for h in range(6):
            z = k[h // 3].double() @ q[h].double() / math.sqrt(32)
            p = torch.softmax(z, 0)
            best = set(z.topk(keep).indices.tolist())
            cand = (kq[h // 3].double() @ q[h].double()).topk(min(n, f * keep)).indices
            kept = cand[z[cand].topk(keep).indices]
            rec.append(len(best & set(cand.tolist())) / keep)
            mass.append(float(p[kept].sum() / p[list(best)].sum()))
        assert got[f"recall_{f}"] == pytest.approx(sum(rec) / 6, abs=1e-9)
        assert got[f"mass_{f}"] == pytest.approx(sum(mass) / 6, abs=1e-9)
        assert (got[f"recall_min_{f}"], got[f"mass_min_{f}"]) == pytest.approx((min(rec), min(mass)), abs=1e-9)
        assert 0 < got[f"mass_{f}"] <= 1 + 1e-9
    assert got["recall_1"] <= got["recall_2"] <= got["recall_4"]  # more candidates, no fewer of the best
    if keep == n:
        assert got["recall_1"] == 1.0 and got["mass_1"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="keep"):
        rerank_recall(q, k, n + 1, bits, (1,))
    with pytest.raises(ValueError, match="quant"):
        rerank_recall(q, k, keep, bits, (1,), "page")


def test_fp8_round_per_row_scale():
    """fp8_round: each row's largest magnitude lands on e4m3's 448 and comes back exact; the others within e4m3's
    relative step (2^-3 of a power of two, half of it after rounding); a zero row stays zero."""
    from cab_experiments.granularity import fp8_round

    torch.manual_seed(0)
    x = torch.randn(5, 64) * torch.tensor([1e-3, 1.0, 30.0, 1e3, 1.0])[:, None]
    x[4] = 0.0
    y = fp8_round(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    top = x.abs().argmax(-1)
    for r in range(4):
        assert y[r, top[r]] == pytest.approx(float(x[r, top[r]]), rel=1e-6)
        s = float(x[r].abs().max()) / 448.0
        err = (y[r] - x[r]).abs()
        # normals: within 1/16 of the value; subnormals (below 2^-6 in scaled units): within half a 2^-9 step
        assert bool((err <= torch.maximum(x[r].abs() / 16, torch.full_like(err, 2.0 ** -10 * s)) * 1.0001).all())
        assert float(err.max()) > 0  # it rounds
    assert torch.equal(y[4], x[4])


def test_fp8_round_centered_keeps_a_large_constant_channel_apart():
    """Channels of large, nearly constant value (as post-RoPE keys carry): rounded with a scale per token, the one
    that is not the token's largest is off by steps of ~14 (-150 of 200 lands at -336 of 448, where e4m3's steps are
    32), more than the other channels' spread; centered per 16-token group first (the mid-range in float16) it is
    not. Short last group, leading dimensions kept."""
    from cab_experiments.granularity import fp8_round, fp8_round_centered

    torch.manual_seed(1)
    k = torch.randn(2, 3, 37, 16)
    k[..., 5] = 200.0 + 0.01 * torch.randn(2, 3, 37)
    k[..., 6] = -150.0 + 0.01 * torch.randn(2, 3, 37)
    c = fp8_round_centered(k)
    assert c.shape == k.shape
    assert float((fp8_round(k) - k)[..., 6].abs().max()) > 1.0
    assert float((c - k).abs().max()) < 0.1
    mid = (k[..., 32:, :].amax(-2) + k[..., 32:, :].amin(-2)) / 2  # the short last group: its own five tokens
    assert torch.allclose(c[..., 32:, 5], k[..., 32:, 5], atol=0.05) and mid.shape == (2, 3, 16)


@pytest.mark.parametrize("quant, group", [("fp8", 16), ("fp8qk", 16), ("fp8c", 16), ("fp8c", 64)])
def test_rerank_recall_with_float8_copies(quant, group):
    """rerank_recall with a float8 copy of the keys (fp8: exact queries; fp8qk: the queries rounded too), against
    loops on fp8_round's values; more candidates never lose a best key, and the float8 estimate holds most of them."""
    from cab_experiments.granularity import fp8_round, fp8_round_centered, rerank_recall

    torch.manual_seed(4)
    n, keep = 300, 20
    q, k = torch.randn(4, 64), torch.randn(2, n, 64) * 3.0
    got = rerank_recall(q, k, keep, 8, (1, 2), quant, group)
    kq = fp8_round_centered(k, group) if quant == "fp8c" else fp8_round(k)
    qq = fp8_round(q) if quant == "fp8qk" else q
    for f in (1, 2):
        rec = []
        for h in range(4):
            z = k[h // 2].double() @ q[h].double()
            cand = (kq[h // 2].double() @ qq[h].double()).topk(f * keep).indices
            rec.append(len(set(z.topk(keep).indices.tolist()) & set(cand.tolist())) / keep)
        assert got[f"recall_{f}"] == pytest.approx(sum(rec) / 4, abs=1e-9)
    assert 0.8 <= got["recall_1"] <= got["recall_2"] <= 1.0


def test_the_cli_rerank_mode_measures_every_layer(tmp_path):
    """granularity --rerank-bits on SmolLM2 (CPU, 512 tokens): one row per layer and quantizer (float8: bits 8), recall
    growing with the factor, the keys kept what the decode budget says; --bounds with it is refused."""
    import json

    from cab_experiments.cli import main
    from cab_vllm.config import CABConfig

    out = tmp_path / "r.jsonl"
    assert main(["granularity", "--rerank-bits", "4", "--rerank-factors", "1", "4", "--rerank-quant", "channel", "token",
                 "fp8", "fp8c", "--center-groups", "16", "128", "--model", "smollm2-135m-instruct", "--lengths",
                 "512", "--sparsities", "0.9", "--device", "cpu", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 150 and {r["layer"] for r in rows} == set(range(30))
    assert {r["quant"] for r in rows} == {"channel", "token", "fp8", "fp8c"}
    assert sorted(r["center_group"] for r in rows if "center_group" in r) == [16] * 30 + [128] * 30
    for r in rows:
        assert 0 < r["recall_1"] <= r["recall_4"] <= 1 and 0 < r["mass_1"] <= 1.00001
        assert r["bits"] == (8 if r["quant"].startswith("fp8") else 4)
        assert r["keep"] == CABConfig(sparsity=0.9).decode_tokens(r["n_tokens"])
    with pytest.raises(SystemExit, match="separate questions"):
        main(["granularity", "--rerank-bits", "4", "--bounds", "--device", "cpu"])
    with pytest.raises(SystemExit, match="separate questions"):
        main(["granularity", "--rerank-bits", "4", "--reuse-lags", "1", "--device", "cpu"])


@pytest.mark.parametrize("n, p0, lags, factors", [(120, 90, (1, 2, 7), (1, 3)), (64, 40, (1, 23), (2,)),
                                                  (33, 10, (5,), (4, 100))])
def test_reuse_recall_matches_loops(n, p0, lags, factors):
    """reuse_recall by loops per head: step p0's F x keep best keys plus those written since are the candidates of
    step p0 + r; recall of that step's exact best keep among them, mass of the keep best candidates over the best's."""
    from cab_experiments.granularity import reuse_recall

    torch.manual_seed(n + p0)
    q, k = torch.randn(6, n, 16), torch.randn(2, n, 16)

    def keep_of(m):
        return max(1, m // 9)

    got = reuse_recall(q, k, p0, lags, factors, keep_of)
    assert set(got) == {(r, f) for r in lags for f in factors}
    for (r, f), v in got.items():
        rec, mass = [], []
        for h in range(6):
            def z(p):
                return k[h // 3, :p + 1].double() @ q[h, p].double() / 4.0
            c0 = z(p0).topk(min(p0 + 1, f * keep_of(p0 + 1))).indices.tolist()
            cand = sorted(set(c0) | set(range(p0 + 1, p0 + r + 1)))
            zr, keep = z(p0 + r), keep_of(p0 + r + 1)
            pr = torch.softmax(zr, 0)
            best = zr.topk(keep).indices.tolist()
            kept = [cand[i] for i in zr[cand].topk(keep).indices.tolist()]
            rec.append(len(set(best) & set(cand)) / keep)
            mass.append(float(pr[kept].sum() / pr[best].sum()))
        assert v["recall"] == pytest.approx(sum(rec) / 6, abs=1e-9)
        assert v["mass"] == pytest.approx(sum(mass) / 6, abs=1e-9)
        assert (v["recall_min"], v["mass_min"]) == pytest.approx((min(rec), min(mass)), abs=1e-9)
        if f * keep_of(p0 + 1) >= p0 + 1:  # every key a candidate: nothing lost
            assert v["recall"] == 1.0 and v["mass"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="positions"):
        reuse_recall(q, k, p0, (n - p0,), factors, keep_of)
    with pytest.raises(ValueError, match="do not match"):
        reuse_recall(q[:, :-1], k, p0, lags, factors, keep_of)


def test_the_cli_reuse_mode_measures_every_layer(tmp_path):
    """granularity --reuse-lags on SmolLM2 (CPU, 512 tokens): one row per layer, lag and factor the answer reaches,
    fractions in [0, 1], the keep of the later step's length."""
    import json

    from cab_experiments.cli import main
    from cab_vllm.config import CABConfig

    out = tmp_path / "u.jsonl"
    assert main(["granularity", "--reuse-lags", "1", "2", "--rerank-factors", "2", "--model", "smollm2-135m-instruct",
                 "--lengths", "512", "--sparsities", "0.9", "--device", "cpu", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    lags = sorted({r["lag"] for r in rows})
    assert lags and set(lags) <= {1, 2} and len(rows) == 30 * len(lags)
    assert {r["layer"] for r in rows} == set(range(30)) and {r["factor"] for r in rows} == {2}
    for r in rows:
        assert 0 <= r["recall_min"] <= r["recall"] <= 1 and 0 <= r["mass_min"] <= r["mass"] <= 1.00001
        assert r["keep"] == CABConfig(sparsity=0.9).decode_tokens(r["n_tokens"] + r["lag"])
        assert r["generated"] >= r["lag"]


@pytest.mark.parametrize("spread", [0.3, 3.0])
def test_passes_mass_against_the_rules_by_hand(spread):
    """passes_mass on random queries and keys: the masses of kept_keys' two rules computed here head by head, the
    counts' distances from the budget, and the tie cap's cuts (none on random keys; every head on keys that all tie)."""
    from cab_experiments.granularity import passes_mass
    from cab_vllm.ops import token_decode as td

    gen = torch.Generator().manual_seed(4)
    q, k = torch.randn(6, 32, generator=gen) * spread, torch.randn(2, 900, 32, generator=gen)
    keep = 40
    got = passes_mass(q, k, keep)
    masses, lost, dev1, dev2, lost0, ratio0 = [], [], [], [], [], []
    for h in range(6):
        z = (q[h] @ k[h // 3].T) * (td.LOG2E / math.sqrt(32))
        p = torch.softmax(z.double() * math.log(2.0), -1)
        two, one = td.kept_keys(z[None], keep, passes=2)[0], td.kept_keys(z[None], keep, passes=1)[0]
        zero = td.sampled_rule(z[None], keep)[0]  # (head by head; the rule itself: tests/ops/test_token_decode.py)
        masses.append(float(p[two].sum()))
        lost.append(float(p[two].sum() - p[one].sum()))
        lost0.append(float(p[two].sum() - p[zero].sum()))
        ratio0.append(int(zero.sum()) / keep)
        dev1.append(abs(int(one.sum()) - keep))
        dev2.append(abs(int(two.sum()) - keep))  # (keys within 1/512 of the keep-th kept too)
    assert got["mass_two"] == pytest.approx(sum(masses) / 6) and got["mass_two_min"] == pytest.approx(min(masses))
    # (abs 1e-9: the logits here by matmul, there by einsum, may differ in float32's last bit; lost is ~1e-4)
    assert got["lost_one"] == pytest.approx(sum(lost) / 6, abs=1e-9)
    assert got["lost_one_max"] == pytest.approx(max(lost), abs=1e-9)
    assert got["count_one_dev"] == max(dev1) and got["count_two_dev"] == max(dev2) <= td.TIE_SLACK
    assert got["tie_cuts"] == 0
    assert got["lost_sampled"] == pytest.approx(sum(lost0) / 6, abs=1e-9)
    assert got["lost_sampled_max"] == pytest.approx(max(lost0), abs=1e-9)
    assert got["count_sampled_ratio"] == pytest.approx(sum(ratio0) / 6)
    assert got["count_sampled_ratio_min"] <= got["count_sampled_ratio"] <= got["count_sampled_ratio_max"]
    tied = passes_mass(q, torch.ones(2, 900, 32), keep)  # every key the same: the cap cuts every head
    assert tied["tie_cuts"] == 6 and tied["mass_two"] == pytest.approx(keep / 900, abs=0.01)
    with pytest.raises(ValueError, match="do not match"):
        passes_mass(q[:5], k, keep)


def test_the_cli_passes_mode_measures_every_layer(tmp_path):
    """granularity --rule-passes on SmolLM2 (CPU, 512 tokens): one row per layer and sparsity, masses in [0, 1]."""
    import json

    from cab_experiments.cli import main

    out = tmp_path / "p.jsonl"
    assert main(["granularity", "--rule-passes", "--model", "smollm2-135m-instruct", "--lengths", "512",
                 "--sparsities", "0.9", "0.98", "--device", "cpu", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 30 * 2 and {r["layer"] for r in rows} == set(range(30))
    for r in rows:
        assert 0 <= r["mass_two_min"] <= r["mass_two"] <= 1.00001 and r["lost_one"] <= r["lost_one_max"] + 1e-9
        assert r["count_two_dev"] >= 0 and r["count_one_dev"] >= 0 and r["tie_cuts"] >= 0
        assert r["lost_sampled"] <= r["lost_sampled_max"] + 1e-9 and r["count_sampled_ratio_min"] > 0
    with pytest.raises(SystemExit, match="separate questions"):
        main(["granularity", "--rule-passes", "--bounds", "--device", "cpu"])


# -- prefill_mass: the share of prompt rows' exact mass each prefill selection keeps ----------------------------------
def _mass_case(n=700, seed=0):
    from cab_vllm.api import select_blocks
    from cab_vllm.config import CABConfig

    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 4, n, 32, generator=g), torch.randn(1, 2, n, 32, generator=g)
    return q, k, select_blocks(q, k, CABConfig(sparsity=0.8))


def test_prefill_mass_against_a_loop_over_rows():
    """Every figure recomputed row by row: the row's softmax, cab's kept blocks' tokens, the vertical lines of the row's
    chunk (hf.chunked_vertical_attention's ranking: the chunk's last VERTICAL_ROWS rows over the keys up to its end)
    and the row's own best keys; the oracle keeps the most, as it must."""
    from cab_experiments.granularity import prefill_mass

    q, k, sel = _mass_case()
    n, scale = q.shape[2], 1 / math.sqrt(32)
    got = prefill_mass(q, k, sel, scale, (0, 256), sample=20, rank_rows=(64, 16))
    pos = torch.linspace(128, n - 1, 20).round().long().unique()
    keep = hf.kept_tokens(sel)[0]  # [Hkv, N]
    want = {"blocks": [], "vertical@0": [], "vertical@256": [], "vertical@0/16": [], "vertical@256/16": [],
            "oracle": []}
    for i in pos.tolist():
        for h in range(4):
            kvh = h // 2
            p = torch.softmax(scale * (q[0, h, i] @ k[0, kvh, : i + 1].T), -1)
            m = sel.counts[0, kvh, i // 64]
            blocks = sel.indices[0, kvh, i // 64, :m].tolist()
            want["blocks"].append(sum(float(p[b * 64:(b + 1) * 64].sum()) for b in blocks))
            kt = min(int(keep[kvh, i]), i + 1)
            want["oracle"].append(float(p.topk(kt).values.sum()))
            for c, r in ((0, 64), (256, 64), (0, 16), (256, 16)):
                e = n if c == 0 else min(n, (i // c + 1) * c)
                rank = hf.vertical_rank(q[:, :, :e], k[:, :, :e], scale, rows=r)[0, kvh]
                local = list(range(max(0, i - hf.VERTICAL_LOCAL + 1), i + 1))
                rest = [j for j in rank[: i + 1].argsort(descending=True).tolist() if j not in local]
                kept = (local[::-1] + rest)[:kt]
                want[f"vertical@{c}" + ("" if r == 64 else f"/{r}")].append(float(p[kept].sum()))
    for key, vals in want.items():
        assert got[key] == pytest.approx(sum(vals) / len(vals), abs=1e-4), key
    assert got["oracle"] >= max(got["blocks"], got["vertical@0"], got["vertical@256"])
    assert "early@256" in got and "early@0" not in got and "early@256/16" in got
    assert got["vertical@256/16"] != got["vertical@256"]
    with pytest.raises(ValueError, match="rank_rows and pooled_rows must be"):
        prefill_mass(q, k, sel, scale, (0,), sample=20, rank_rows=(0,))
    # other selections of the same counts are measured as "blocks" is; other counts are refused
    from cab_vllm.api import select_blocks
    from cab_vllm.config import CABConfig

    exact = select_blocks(q, k, CABConfig(sparsity=0.8, estimator="sampled", sample_rows=64))
    both = prefill_mass(q, k, sel, scale, (), sample=20, others={"same": sel, "block_oracle": exact})
    assert both["same"] == both["blocks"] == got["blocks"] and 0 < both["block_oracle"] <= got["oracle"]
    with pytest.raises(ValueError, match="must keep sel's counts"):
        prefill_mass(q, k, sel, scale, (), sample=20, others={"x": select_blocks(q, k, CABConfig(sparsity=0.5))})
    # ranked first among a wider selection's blocks: every block (sparsity 0) is the plain ranking; cab's own blocks
    # keep about what the blocks keep; a selection in between, in between
    wide = {"all": select_blocks(q, k, CABConfig(sparsity=0.0)), "w2": select_blocks(q, k, CABConfig(sparsity=0.6))}
    inside = prefill_mass(q, k, sel, scale, (64, 256), sample=20, rank_rows=(64, 16), within=wide)
    for name in ("@64", "@256", "@64/16", "@256/16"):
        assert inside[f"all{name}"] == pytest.approx(inside[f"vertical{name}"], abs=1e-6)
        assert got["blocks"] - 0.02 < inside[f"w2{name}"] < inside[f"vertical{name}"] + 0.02
    # a block mask of the same blocks as a selection (hf.row_bound_candidates' form) reads as the selection does
    from cab_vllm.ops.blocks import selection_to_block_mask

    w2 = wide["w2"]
    as_mask = prefill_mass(q, k, sel, scale, (64,), sample=20, within={
        "m": selection_to_block_mask(w2.indices, w2.counts, w2.num_blocks)})
    assert as_mask["m@64"] == pytest.approx(inside["w2@64"], abs=1e-6)
    # ranked by the mean query of each chunk's last 16 rows: as the loop above ranks, with that ranking
    pooled = prefill_mass(q, k, sel, scale, (256,), sample=20, pooled_rows=(16,), within=wide)
    assert pooled["all_pooled@256/16"] == pytest.approx(pooled["pooled@256/16"], abs=1e-6)
    vals = []
    for i in pos.tolist():
        for h in range(4):
            kvh = h // 2
            p = torch.softmax(scale * (q[0, h, i] @ k[0, kvh, : i + 1].T), -1)
            e = min(n, (i // 256 + 1) * 256)
            rank = hf.vertical_rank(q[:, :, :e], k[:, :, :e], scale, rows=16, pooled=True)[0, kvh]
            local = list(range(max(0, i - hf.VERTICAL_LOCAL + 1), i + 1))
            rest = [j for j in rank[: i + 1].argsort(descending=True).tolist() if j not in local]
            vals.append(float(p[(local[::-1] + rest)[:min(int(keep[kvh, i]), i + 1)]].sum()))
    assert pooled["pooled@256/16"] == pytest.approx(sum(vals) / len(vals), abs=1e-4)


def test_prefill_mass_keeps_a_key_every_row_needs_when_the_chunk_end_needs_it_too():
    """A key that nearly every row (the prompt's last ones included) attends to: the vertical lines keep it, their mass
    close to the oracle's; ranked chunk by chunk, a chunk whose last rows look away loses it for its other rows."""
    from cab_experiments.granularity import prefill_mass

    q, k, sel = _mass_case(seed=1)
    probe = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(9)), dim=0)
    k[0, :, 40] = probe * 30
    q[0, :, :] = q[0, :, :] * 0.05 + probe * 2  # every row looks for key 40
    q[0, :, 448:512] = -probe * 2  # the last rows of chunk 1 (256..511) look away from it
    got = prefill_mass(q, k, sel, 1 / math.sqrt(32), (0, 256), sample=40)
    assert got["vertical@0"] > got["oracle"] - 0.03 > 0.85  # all but the rows that look away keep it
    assert got["vertical@256"] < got["vertical@0"] - 0.2  # chunk 1's rows (256..511) lose it
    assert got["early@256"] < got["vertical@256"]


def test_the_cli_prefill_mass_mode(tmp_path):
    """granularity --prefill-mass on SmolLM2 (CPU, 512 tokens): one row per layer and sparsity, masses in [0, 1] with
    the oracle's the largest; a negative chunk size is refused."""
    import json

    from cab_experiments.cli import main

    out = tmp_path / "m.jsonl"
    assert main(["granularity", "--model", "smollm2-135m-instruct", "--lengths", "512", "--sparsities", "0.8",
                 "--prefill-mass", "0", "128", "--device", "cpu", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 30 and {r["layer"] for r in rows} == set(range(30))
    for r in rows:
        vals = [r["blocks"], r["block_oracle"], r["vertical@0"], r["vertical@128"], r["early@128"], r["oracle"]]
        assert all(0 <= v <= 1 for v in vals) and r["oracle"] >= max(vals[:4]) - 1e-4
    # ranked by each chunk's last 16 rows too, without the block oracle
    out2 = tmp_path / "m2.jsonl"
    assert main(["granularity", "--model", "smollm2-135m-instruct", "--lengths", "512", "--sparsities", "0.8",
                 "--prefill-mass", "128", "--rank-rows", "64", "16", "--no-block-oracle", "--device", "cpu",
                 "--out", str(out2)]) == 0
    rows2 = [json.loads(line) for line in out2.read_text().splitlines()]
    assert len(rows2) == 30 and all("block_oracle" not in r for r in rows2)
    for r, r1 in zip(rows2, rows):
        assert r["vertical@128"] == r1["vertical@128"] and 0 <= r["vertical@128/16"] <= r["oracle"] + 1e-4
    for bad in (["--rank-rows", "16"], ["--no-block-oracle"], ["--within", "2"]):
        with pytest.raises(SystemExit, match="go with --prefill-mass"):
            main(["granularity", *bad, "--device", "cpu"])
    with pytest.raises(SystemExit, match="each must be >= 1"):
        main(["granularity", "--prefill-mass", "64", "--within", "0.5", "--device", "cpu"])
    with pytest.raises(SystemExit, match="--within-rowbounds goes with --within"):
        main(["granularity", "--prefill-mass", "64", "--within-rowbounds", "--device", "cpu"])
    with pytest.raises(SystemExit, match="chunk sizes must be >= 0"):
        main(["granularity", "--prefill-mass", "-1", "--device", "cpu"])
    with pytest.raises(SystemExit, match="separate questions"):
        main(["granularity", "--prefill-mass", "0", "--bounds", "--device", "cpu"])
