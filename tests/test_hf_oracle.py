"""The adapter's token-level oracle (cab_vllm.hf.token_oracle_attention, using(oracle="token")): each query token keeps
its own highest-scoring keys, as many as its kept blocks hold, against a brute-force row-by-row reference."""

from __future__ import annotations

import math

import pytest
import torch

from cab_vllm import hf
from cab_vllm.api import select_blocks
from cab_vllm.config import CABConfig
from cab_vllm.ops.blocks import selection_to_block_mask
from cab_vllm.ops.reference import dense_attention_ref


def _brute_ranked(q, k, v, keep, scale, rank, shared=False):
    """Row by row: for each (KV head, token) the top keep[b, kvh, i] causal keys of each query head j of the group by
    ``rank(bi, j, i, keys)`` [pos + 1] or, ``shared``, of the group's summed softmax of it; each head then softmaxes
    its exact scores over its keys."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    out = torch.zeros(b, hq, nq, d)
    for bi in range(b):
        for h in range(hkv):
            heads = range(h * g, (h + 1) * g)
            for i in range(nq):
                pos = nk - nq + i
                keys = k[bi, h, :pos + 1].float()
                kt = min(int(keep[bi, h, i]), pos + 1)
                ranks = [rank(bi, j, i, keys) for j in heads]
                if shared:
                    tops = [sum(torch.softmax(x, 0) for x in ranks).topk(kt).indices] * g
                else:
                    tops = [x.topk(kt).indices for x in ranks]
                for j, top in zip(heads, tops):
                    p = torch.softmax(scale * (keys[top] @ q[bi, j, i].float()), 0)
                    out[bi, j, i] = p @ v[bi, h, top].float()
    return out


def _brute(q, k, v, keep, scale):
    """Row by row: the top keep[b, kvh, i] causal keys of each (query head, token) by exact score, softmax."""
    return _brute_ranked(q, k, v, keep, scale, lambda bi, j, i, keys: keys @ q[bi, j, i].float())


@pytest.mark.parametrize("nq,nk,rows", [(37, 37, 256), (37, 37, 5), (1, 50, 256), (9, 70, 4)],
                         ids=["prefill", "prefill-chunked", "decode", "tail-chunked"])
def test_matches_the_row_by_row_reference(nq, nk, rows):
    torch.manual_seed(nq * 100 + nk)
    q, k, v = torch.randn(2, 6, nq, 8), torch.randn(2, 2, nk, 8), torch.randn(2, 2, nk, 8)
    keep = torch.randint(1, nk + 5, (2, 2, nq))  # some past the row's causal keys: clamped
    got = hf.token_oracle_attention(q, k, v, keep, 0.4, rows=rows)
    torch.testing.assert_close(got, _brute(q, k, v, keep, 0.4), atol=1e-5, rtol=1e-5)


def test_every_key_kept_is_dense_and_one_key_is_its_value():
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 4, 40, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    full = torch.full((1, 2, 40), 40)
    torch.testing.assert_close(hf.token_oracle_attention(q, k, v, full, 0.25),
                               dense_attention_ref(q, k, v, 0.25).float(), atol=1e-5, rtol=1e-5)
    one = hf.token_oracle_attention(q, k, v, torch.ones(1, 2, 40, dtype=torch.long), 0.25)
    s = torch.einsum("bhid,bhjd->bhij", q, k.repeat_interleave(2, 1)).masked_fill(
        torch.ones(40, 40, dtype=torch.bool).triu(1), float("-inf"))
    want = v.repeat_interleave(2, 1)[0, torch.arange(4)[:, None], s[0].argmax(-1)]  # [Hq, N, D]
    torch.testing.assert_close(one[0], want)
    with pytest.raises(ValueError, match="keep must be"):
        hf.token_oracle_attention(q, k, v, torch.ones(1, 4, 40), 0.25)


@pytest.mark.parametrize("n,bs", [(200, 32), (256, 64), (97, 16)])
def test_kept_tokens_count_the_causal_keys_of_the_kept_blocks(n, bs):
    torch.manual_seed(n)
    q, k = torch.randn(1, 4, n, 8), torch.randn(1, 2, n, 8)
    sel = select_blocks(q, k, CABConfig(block_size=bs, sparsity=0.7, policy="random"), impl="torch")
    blocks = selection_to_block_mask(sel.indices, sel.counts, sel.num_blocks)  # [B, Hkv, M, M]
    tok = blocks.repeat_interleave(bs, -1).repeat_interleave(bs, -2)[..., :n, :n]
    tok &= torch.ones(n, n, dtype=torch.bool).tril()
    assert torch.equal(hf.kept_tokens(sel), tok.sum(-1))


def test_a_model_runs_with_the_oracle_at_the_selections_density():
    """using(oracle="token") in a (tiny, random) transformers model: the same kept/causal counts as the block path,
    other outputs; refused with compensate or an unknown value."""
    transformers = pytest.importorskip("transformers")
    hf.register()
    conf = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(conf, attn_implementation=hf.ATTN_NAME).eval()
    ids = torch.randint(0, 97, (1, 300))
    cfg = CABConfig(policy="cab", sparsity=0.8)
    out, counts = {}, {}
    for oracle in (None, "token"):
        with torch.no_grad(), hf.using(cfg, impl="torch", oracle=oracle) as st:
            out[oracle] = model.generate(ids, max_new_tokens=3, do_sample=False, output_logits=True,
                                         return_dict_in_generate=True).logits[0]
        counts[oracle] = (st["kept"], st["causal"], st["decode_calls"])
    assert counts[None] == counts["token"] and counts[None][0] < counts[None][1]
    assert not torch.allclose(out[None], out["token"], atol=1e-4)
    with pytest.raises(ValueError, match="pick one"):
        with hf.using(cfg, oracle="token", compensate="mean"):
            pass
    with pytest.raises(ValueError, match="oracle="):
        with hf.using(cfg, oracle="block"):
            pass
    assert math.isfinite(float(out["token"].float().sum()))


# ---- token selection ranked by an estimate (using(tokens=...)) ------------------------------------------------------
@pytest.mark.parametrize("spec", ["pca5", "sparq3", "sparqg3", "int2", "int4"])
@pytest.mark.parametrize("nq,nk,rows", [(37, 37, 256), (37, 37, 7), (1, 50, 256)],
                         ids=["prefill", "prefill-chunked", "decode"])
def test_estimated_ranking_matches_the_row_by_row_reference(spec, nq, nk, rows):
    torch.manual_seed(nq + nk + len(spec))
    d = 32
    q, k, v = torch.randn(2, 6, nq, d), torch.randn(2, 2, nk, d), torch.randn(2, 2, nk, d)
    keep = torch.randint(1, nk + 5, (2, 2, nq))
    kind, r = hf.parse_tokens(spec)[:2]
    basis = torch.linalg.qr(torch.randn(2, d, d)).Q  # any orthonormal basis per KV head
    est = hf.key_estimate(kind, r, k, basis)
    got = hf.token_oracle_attention(q, k, v, keep, 0.3, rows=rows, estimate=est)
    kq = hf.quantize_keys(k, r) if kind == "int" else None

    def rank(bi, j, i, keys):  # query head j; 3 query heads per KV head here
        qi, h = q[bi, j, i].float(), j // 3
        if kind == "pca":
            p = basis[h, :, :r]
            return (keys @ p) @ (p.T @ qi)
        if kind == "int":
            return kq[bi, h, :keys.shape[0]] @ qi
        mag = qi.abs() if kind == "sparq" else q[bi, 3 * h:3 * h + 3, i].abs().sum(0)  # sparqg: the group's |q|
        dims = mag.topk(r).indices
        return keys[:, dims] @ qi[dims]
    torch.testing.assert_close(got, _brute_ranked(q, k, v, keep, 0.3, rank), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("nq,nk,rows", [(37, 37, 256), (37, 37, 7), (1, 50, 256)],
                         ids=["prefill", "prefill-chunked", "decode"])
def test_reranked_candidates_match_the_row_by_row_reference(nq, nk, rows):
    """int2x3: each row's 3 x keep best keys by their int2 estimate are candidates, the keep of them with the highest
    exact scores are kept; a factor past the row's keys is the exact oracle, factor 1 the estimate alone."""
    torch.manual_seed(nq + 3 * nk)
    d = 32
    q, k, v = torch.randn(2, 6, nq, d), torch.randn(2, 2, nk, d), torch.randn(2, 2, nk, d)
    keep = torch.randint(1, nk // 4, (2, 2, nq))
    spec = hf.parse_tokens("int2x3")
    est = hf.key_estimate(spec.kind, spec.param, k)
    got = hf.token_oracle_attention(q, k, v, keep, 0.3, rows=rows, estimate=est, rerank=spec.rerank)
    kq = hf.quantize_keys(k, 2)

    def rank(bi, j, i, keys):  # the candidates' exact scores, the others far below
        qi = q[bi, j, i].float()
        kt = min(int(keep[bi, j // 3, i]), keys.shape[0])
        cand = (kq[bi, j // 3, :keys.shape[0]] @ qi).topk(min(3 * kt, keys.shape[0])).indices
        return torch.full((keys.shape[0],), -1e9).index_copy(0, cand, keys[cand] @ qi)
    torch.testing.assert_close(got, _brute_ranked(q, k, v, keep, 0.3, rank), atol=1e-5, rtol=1e-5)
    exact = hf.token_oracle_attention(q, k, v, keep, 0.3, rows=rows)
    torch.testing.assert_close(hf.token_oracle_attention(q, k, v, keep, 0.3, rows=rows, estimate=est, rerank=nk),
                               exact, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hf.token_oracle_attention(q, k, v, keep, 0.3, rows=rows, estimate=est, rerank=1),
                               hf.token_oracle_attention(q, k, v, keep, 0.3, rows=rows, estimate=est))
    assert not torch.allclose(got, exact, atol=1e-3)  # int2 candidates at 3x miss some of the exact best
    with pytest.raises(ValueError, match="rerank"):
        hf.token_oracle_attention(q, k, v, keep, 0.3, rows=rows, rerank=2)


@pytest.mark.parametrize("spec", ["exactkv", "int4kv", "sparqg3kv"])
@pytest.mark.parametrize("nq,nk,rows", [(29, 29, 256), (29, 29, 6), (1, 45, 256)], ids=["prefill", "chunked", "decode"])
def test_kv_shared_selection_matches_the_row_by_row_reference(spec, nq, nk, rows):
    torch.manual_seed(nq * 7 + nk + len(spec))
    d = 32
    q, k, v = torch.randn(2, 6, nq, d), torch.randn(2, 2, nk, d), torch.randn(2, 2, nk, d)
    keep = torch.randint(1, nk + 5, (2, 2, nq))
    kind, r, shared = hf.parse_tokens(spec)[:3]
    assert shared
    est = None if kind == "exact" else hf.key_estimate(kind, r, k)
    got = hf.token_oracle_attention(q, k, v, keep, 0.3, rows=rows, estimate=est, shared=True)
    kq = hf.quantize_keys(k, 4)

    def rank(bi, j, i, keys):
        qi = q[bi, j, i].float()
        if kind == "exact":
            return 0.3 * (keys @ qi)
        if kind == "int":
            return kq[bi, j // 3, :keys.shape[0]] @ qi
        dims = q[bi, 3 * (j // 3):3 * (j // 3) + 3, i].abs().sum(0).topk(r).indices
        return keys[:, dims] @ qi[dims]
    # the estimate's scale enters the group's softmax: key_estimate leaves it out, so the reference does too
    torch.testing.assert_close(got, _brute_ranked(q, k, v, keep, 0.3, rank, shared=True), atol=1e-5, rtol=1e-5)
    # one query head per KV head: the group is the head, the same keys as its own oracle
    q1 = q[:, ::3].contiguous()
    torch.testing.assert_close(hf.token_oracle_attention(q1, k, v, keep, 0.3, shared=True),
                               hf.token_oracle_attention(q1, k, v, keep, 0.3), atol=1e-5, rtol=1e-5)


def test_full_rank_estimates_keep_the_exact_oracle():
    """pca with every direction and sparq with every dimension rank keys by their exact scores: the oracle's output."""
    torch.manual_seed(11)
    q, k, v = torch.randn(1, 4, 60, 16), torch.randn(1, 2, 60, 16), torch.randn(1, 2, 60, 16)
    keep = torch.randint(1, 30, (1, 2, 60))
    want = hf.token_oracle_attention(q, k, v, keep, 0.25)
    basis = hf.key_basis(k)
    for est in (hf.key_estimate("pca", 16, k, basis), hf.key_estimate("sparq", 16, k), hf.key_estimate("sparqg", 16, k)):
        torch.testing.assert_close(hf.token_oracle_attention(q, k, v, keep, 0.25, estimate=est), want,
                                   atol=1e-5, rtol=1e-5)


def test_key_basis_is_orthonormal_leading_first_and_exact_on_low_rank_keys():
    torch.manual_seed(5)
    d, r = 16, 3
    span = torch.linalg.qr(torch.randn(2, d, r)).Q  # keys of each KV head lie in an r-dim subspace
    k = torch.einsum("hdr,bhnr->bhnd", span, torch.randn(1, 2, 80, r) * torch.tensor([5.0, 2.0, 1.0]))
    basis = hf.key_basis(k)
    torch.testing.assert_close(basis.transpose(1, 2) @ basis, torch.eye(d).expand(2, d, d), atol=1e-5, rtol=1e-5)
    energy = (k[0] @ basis).pow(2).sum(1)  # [Hkv, D]: each direction's share of the keys
    assert bool((energy[:, :-1] >= energy[:, 1:] - 1e-3).all())  # leading directions first
    qr = torch.randn(1, 2, 3, 5, d)
    exact = torch.einsum("bhgqd,bhnd->bhgqn", qr, k)
    torch.testing.assert_close(hf.key_estimate("pca", r, k, basis)(qr), exact, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(hf.key_estimate("pca", r - 1, k, basis)(qr), exact, atol=1e-2)


def test_quantized_keys_step_and_error():
    torch.manual_seed(2)
    k = torch.randn(3, 64) * torch.logspace(-2, 2, 3)[:, None]
    for bits in (2, 4, 8):
        kq = hf.quantize_keys(k, bits)
        step = k.view(3, 2, 32).abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
        assert bool(((kq - k).view(3, 2, 32).abs() <= step / 2 + 1e-6).all())
        levels = (kq.view(3, 2, 32) / step).round().unique()
        assert levels.numel() <= 2 ** bits - 1
    with pytest.raises(ValueError, match="multiple of"):
        hf.quantize_keys(torch.randn(2, 40), 4)


def test_key_dims_rank_groups_by_score_energy_and_the_estimate_reads_them():
    """key_dims: whole groups of 16 dimensions, by E[q^2] E[k^2] summed over the group (the KV group's query heads'
    E[q^2] added); dimsR's estimate is the dot product over the first R of them; all of them is the exact score."""
    torch.manual_seed(9)
    d = 64
    q, k = torch.randn(1, 4, 50, d), torch.randn(1, 2, 50, d)
    q[:, :2, :, 32:48] *= 10.0  # KV head 0's queries: group 2 carries the scores
    k[:, 1, :, 0:16] *= 10.0  # KV head 1's keys: group 0 does
    dims = hf.key_dims(q, k)
    assert dims.shape == (2, d) and dims[0, :16].tolist() == list(range(32, 48)) and dims[1, :16].tolist() == list(
        range(16))
    assert sorted(dims[0].tolist()) == list(range(d))
    qr = torch.randn(1, 2, 2, 3, d)
    got = hf.key_estimate("dims", 16, k, dims)(qr)
    want = torch.stack([torch.einsum("gqd,nd->gqn", qr[0, h][..., dims[h, :16]], k[0, h][:, dims[h, :16]])
                        for h in range(2)])[None]
    torch.testing.assert_close(got, want)
    exact = torch.einsum("bhgqd,bhnd->bhgqn", qr, k)
    torch.testing.assert_close(hf.key_estimate("dims", d, k, dims)(qr), exact, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="calibrate_key_basis"):
        hf.key_estimate("dims", 16, k)
    with pytest.raises(ValueError, match="more than the head's 64"):
        hf.key_estimate("dims", 80, k, dims)
    with pytest.raises(ValueError, match="multiple of 16"):
        hf.parse_tokens("dims24")


@pytest.mark.parametrize("spec,want", [("exact", ("exact", 0, False)), ("pca32", ("pca", 32, False)),
                                       ("dims32", ("dims", 32, False)),
                                       ("sparq8", ("sparq", 8, False)), ("sparqg16", ("sparqg", 16, False)),
                                       ("sparqb16", ("sparqb", 16, False)),
                                       ("int4", ("int", 4, False)), ("exactkv", ("exact", 0, True)),
                                       ("sparqg16kv", ("sparqg", 16, True)), ("int4x4", ("int", 4, False, 4)),
                                       ("sparqg16x2", ("sparqg", 16, False, 2)), ("intc4x2", ("intc", 4, False, 2)),
                                       ("intc2kv", ("intc", 2, True))])
def test_parse_tokens(spec, want):
    assert hf.parse_tokens(spec) == (want + (0,) if len(want) == 3 else want)


@pytest.mark.parametrize("bad", ["pca", "pca0", "int1", "int9", "sparq-2", "token", "PCA32", "", None, "kv", "exactkvkv",
                                 "int4x0", "exactx2", "int4x2kv", "int4kvx2", "intc1", "intc9"])
def test_parse_tokens_refuses(bad):
    with pytest.raises(ValueError, match="tokens="):
        hf.parse_tokens(bad)


def _tiny_model():
    transformers = pytest.importorskip("transformers")
    hf.register()
    conf = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(conf, attn_implementation=hf.ATTN_NAME).eval()


def test_a_model_runs_with_estimated_token_selection():
    """using(tokens=...) in a tiny model: the block selection's counts; pca needs calibrate_key_basis first; pca at
    full rank gives the exact oracle's logits; refused beside oracle= or compensate=."""
    model = _tiny_model()
    ids = torch.randint(0, 97, (1, 300))
    cfg = CABConfig(policy="cab", sparsity=0.8)

    def run(**kw):
        with torch.no_grad(), hf.using(cfg, impl="torch", **kw) as st:
            logits = model.generate(ids, max_new_tokens=3, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True).logits[0]
        return logits, (st["kept"], st["causal"], st["decode_calls"])

    with pytest.raises(ValueError, match="calibrate_key_basis"):
        run(tokens="pca4")
    with pytest.raises(ValueError, match="calibrate_key_basis"):
        run(tokens="dims16")
    assert hf.calibrate_key_basis(model, torch.randint(0, 97, (1, 128))) == 2
    assert all(m.cab_key_basis.shape == (2, 16, 16) for m in model.modules() if hasattr(m, "cab_key_basis"))
    assert all(m.cab_key_dims.shape == (2, 16) for m in model.modules() if hasattr(m, "cab_key_dims"))
    exact, counts = run(oracle="token")
    full, counts_full = run(tokens="pca16")
    low, counts_low = run(tokens="pca2")
    q4, counts_q4 = run(tokens="int4")
    grouped, counts_grouped = run(tokens="exactkv")
    every_dim, counts_dims = run(tokens="dims16")  # head dim 16: every dimension, the exact oracle
    torch.testing.assert_close(every_dim, exact, atol=1e-3, rtol=1e-3)
    assert counts_dims == counts
    assert counts == counts_full == counts_low == counts_q4 == counts_grouped
    assert not torch.allclose(grouped, exact, atol=1e-3)  # two query heads per KV head: one set of keys for both
    torch.testing.assert_close(full, exact, atol=1e-3, rtol=1e-3)
    assert not torch.allclose(low, exact, atol=1e-3)
    with pytest.raises(ValueError, match="give one of them"):
        run(oracle="token", tokens="exact")
    with pytest.raises(ValueError, match="pick one"):
        run(tokens="int4", compensate="mean")


# ---- decode_rule="tokens" and dense_prefill in the adapter (what the engine runs) -------------------------------------
def test_dense_prefill_and_token_decode_in_the_adapter():
    """CABConfig(dense_prefill=True, decode_rule="tokens"): the prompt's logits are dense attention's and counted as
    keeping every block; every decode step is the exact token oracle at decode_tokens keys per head (what the
    engine's token rows keep), counted at the bounds rule's blocks; and at a budget of every key it is dense."""
    model = _tiny_model()
    ids = torch.randint(0, 97, (1, 300))
    cfg = CABConfig(policy="cab", sparsity=0.9, decode_rule="tokens", dense_prefill=True)

    def run(c):
        with torch.no_grad(), hf.using(c, impl="torch") as st:
            logits = torch.cat(model.generate(ids, max_new_tokens=4, do_sample=False, output_logits=True,
                                              return_dict_in_generate=True).logits)  # [steps, vocab]
        return logits, dict(st)

    dense, _ = run(None)
    tok, st = run(cfg)
    torch.testing.assert_close(tok[0], dense[0], atol=1e-4, rtol=1e-4)  # the prompt's own logits: dense
    assert not torch.allclose(tok[1:], dense[1:], atol=1e-4)  # decode keeps 10% of the keys
    m, hkv, layers = 5, 2, 2  # 300 tokens = 5 blocks; the decode steps see 301..303
    prompt_blocks = layers * hkv * m * (m + 1) // 2
    decode_kept = sum(layers * hkv * int(cfg.keep_counts(-(-n // 64), answer=True)[-1]) for n in (301, 302, 303))
    assert st["kept"] == prompt_blocks + decode_kept and st["causal"] == prompt_blocks + 3 * layers * hkv * 5
    # the adapter's decode step is token_oracle_attention at cfg.decode_tokens keys
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 301, 16), torch.randn(1, 2, 301, 16)
    with hf.using(cfg, impl="torch"):
        got = hf._decode(torch.nn.Module(), q, k, v, cfg, 0.25, "torch")
    want = hf.token_oracle_attention(q, k, v, torch.full((1, 2, 1), cfg.decode_tokens(301)), 0.25)
    torch.testing.assert_close(got, want)
    every, _ = run(cfg.replace(sparsity=0.01))  # 0.99 of the blocks: at 5 blocks, every block and every key
    torch.testing.assert_close(every, dense, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="needs a decode rule of its own"):
        CABConfig(dense_prefill=True)


@pytest.mark.parametrize("n, bits, group", [(37, 4, 16), (16, 2, 16), (5, 8, 4)])
def test_quantize_keys_channel_by_loops(n, bits, group):
    """Per channel and group of tokens (the last one short): the minimum plus a whole number of 2^bits - 1 steps of
    the group's range (both held as float16, the step at least 2^-14), the nearest to the key (within half a step
    and the minimum's float16 rounding); a channel constant over a group comes back within that rounding; an outlier
    channel does not coarsen the others (it has its own range). The engine's 4-bit copy reads back the same."""
    from cab_vllm.ops import key_codes as kq

    torch.manual_seed(n + bits)
    k = torch.randn(2, 3, n, 8)
    k[..., 5] *= 100.0  # an outlier channel
    k[0, 0, :, 2] = 0.7  # a constant one
    got = hf.quantize_keys_channel(k, bits, group)
    assert got.shape == k.shape
    levels = 2 ** bits - 1
    for g0 in range(0, n, group):
        seg = k[..., g0:g0 + group, :]
        lo, hi = seg.amin(-2, keepdim=True), seg.amax(-2, keepdim=True)
        lo16 = lo.half().float()
        step = ((hi - lo) / levels).clamp(min=2 ** -14).half().float()
        want = torch.floor((seg - lo16) / step + 0.5).clamp(0, levels) * step + lo16
        torch.testing.assert_close(got[..., g0:g0 + group, :], want)
        assert bool(((got[..., g0:g0 + group, :] - seg).abs() <= step / 2 + lo.abs() * 2 ** -11 + 1e-6).all())
    torch.testing.assert_close(got[0, 0, :, 2], k[0, 0, :, 2], atol=0.7 * 2 ** -11, rtol=0)
    err = (got - k).abs()
    assert err[..., :5].max() < err[..., 5].max() / 20  # the other channels keep their own, finer steps
    if bits == 4 and group == kq.GROUP:  # the engine's copy of the same keys, in 16-token pages
        pages = -(-n // 16)
        cache = torch.zeros(pages * 16, 3, 8)
        cache[:n] = k[1].transpose(0, 1)
        codes = kq.key_codes(pages, 16, 3, 8, "cpu")
        bt = torch.arange(pages, dtype=torch.int32)[None]
        ln = torch.tensor([n], dtype=torch.int32)
        kq.encode_keys(cache.view(pages, 16, 3, 8), codes, bt, ln, ln, impl="torch")
        assert torch.equal(kq.dequantize(codes, bt[0], n), got[1])


def test_intc_estimate_ranks_by_the_channel_quantized_keys():
    torch.manual_seed(3)
    k, qr = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 3, 1, 16)
    est = hf.key_estimate("intc", 4, k)
    torch.testing.assert_close(est(qr), torch.einsum("bhgqd,bhnd->bhgqn", qr, hf.quantize_keys_channel(k, 4)))


# ---- prefill="vertical": recent keys and one token-level set per KV head ------------------------------------------
def _brute_vertical(q, k, v, keep, scale, rank, local, slash=None):
    """Row by row: each (KV head, token) keeps its ``local`` most recent keys, then the highest-ranked earlier keys
    (``rank`` [B, Hkv, N]; with ``slash``, key j of row i by max(rank[j], slash[i - j])) up to keep[b, kvh, i];
    every query head of the group softmaxes its exact scores over those keys."""
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    out = torch.zeros(b, hq, n, d)
    for bi in range(b):
        for h in range(hkv):
            for i in range(n):
                kt = max(1, min(int(keep[bi, h, i]), i + 1))
                recent = list(range(i, max(-1, i - local), -1))[:kt]

                def score(j, i=i, h=h, bi=bi):
                    return max(float(rank[bi, h, j]), float(slash[bi, h, i - j]) if slash is not None else -1.0)
                older = sorted(range(0, max(0, i - local + 1)), key=lambda j: -score(j))
                top = torch.tensor(recent + older[:kt - len(recent)])
                for j in range(h * g, (h + 1) * g):
                    p = torch.softmax(scale * (k[bi, h, top].float() @ q[bi, j, i].float()), 0)
                    out[bi, j, i] = p @ v[bi, h, top].float()
    return out


@pytest.mark.parametrize("n,local,rows", [(37, 5, 256), (37, 5, 6), (70, 1, 16), (9, 64, 256)],
                         ids=["whole", "chunked", "local1", "all-local"])
def test_vertical_attention_matches_the_row_by_row_reference(n, local, rows):
    torch.manual_seed(n + local)
    q, k, v = torch.randn(2, 6, n, 8), torch.randn(2, 2, n, 8), torch.randn(2, 2, n, 8)
    keep = torch.randint(0, n + 5, (2, 2, n))  # 0 (clamped to 1) and past the row's causal keys (clamped)
    rank = torch.rand(2, 2, n)  # distinct values: one order
    got = hf.vertical_attention(q, k, v, keep, 0.4, rank=rank, local=local, rows=rows)
    torch.testing.assert_close(got, _brute_vertical(q, k, v, keep, 0.4, rank, local), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n,local,rows", [(37, 5, 256), (37, 3, 6), (20, 1, 7)], ids=["whole", "chunked", "local1"])
def test_vertical_and_slash_attention_matches_the_row_by_row_reference(n, local, rows):
    torch.manual_seed(n * 3 + local)
    q, k, v = torch.randn(1, 4, n, 8), torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8)
    keep = torch.randint(0, n + 3, (1, 2, n))
    rank, slash = torch.rand(1, 2, n), torch.rand(1, 2, n)  # distinct values: one order
    got = hf.vertical_attention(q, k, v, keep, 0.4, rank=rank, local=local, rows=rows, slash=slash)
    want = _brute_vertical(q, k, v, keep, 0.4, rank, local, slash)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, hf.vertical_attention(q, k, v, keep, 0.4, rank=rank, local=local, rows=rows))


def _last_rows_mass(q, k, scale, rows):
    """By loops, one batch, two query heads per KV head: (each key's, each offset's) attention mass in the last
    ``rows`` rows, summed over those rows and the group's heads: ([1, Hkv, N], [1, Hkv, N])."""
    n, hkv = q.shape[2], k.shape[1]
    by_key, by_offset = torch.zeros(1, hkv, n), torch.zeros(1, hkv, n)
    for h in range(hkv):
        for j in (2 * h, 2 * h + 1):
            for i in range(n - rows, n):
                p = torch.softmax(scale * (k[0, h, :i + 1] @ q[0, j, i]), 0)
                by_key[0, h, :i + 1] += p
                for key in range(i + 1):
                    by_offset[0, h, i - key] += p[key]
    return by_key, by_offset


def test_slash_rank_is_the_last_rows_attention_by_offset():
    torch.manual_seed(6)
    q, k = torch.randn(1, 4, 30, 8), torch.randn(1, 2, 30, 8)
    got = hf.slash_rank(q, k, 0.3, rows=5)
    torch.testing.assert_close(got, _last_rows_mass(q, k, 0.3, 5)[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.sum(-1), hf.vertical_rank(q, k, 0.3, rows=5).sum(-1))  # the same mass


@pytest.mark.parametrize("slash", [False, True], ids=["vertical", "vslash"])
def test_chunked_vertical_attention_ranks_each_chunk_by_its_own_last_rows(slash):
    """Chunks of 13 rows of a 37-row prompt: each chunk's rows as the row-by-row reference with the ranking of that
    chunk's last rows over its keys; one chunk (None, or one as long as the prompt) is the whole prompt's ranking."""
    torch.manual_seed(11 + slash)
    n, chunk, local = 37, 13, 4
    q, k, v = torch.randn(1, 4, n, 8), torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8)
    keep = torch.randint(1, n, (1, 2, n))
    got = hf.chunked_vertical_attention(q, k, v, keep, 0.4, chunk=chunk, slash=slash, local=local)
    assert got.shape == q.shape
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        qc, kc = q[:, :, :c1], k[:, :, :c1]
        want = _brute_vertical(qc, kc, v[:, :, :c1], keep[..., :c1], 0.4, hf.vertical_rank(qc, kc, 0.4), local,
                               hf.slash_rank(qc, kc, 0.4) if slash else None)
        torch.testing.assert_close(got[:, :, c0:c1], want[:, :, c0:c1], atol=1e-5, rtol=1e-5)
    whole = hf.vertical_attention(q, k, v, keep, 0.4, local=local,
                                  slash=hf.slash_rank(q, k, 0.4) if slash else None)
    for one in (None, n, n + 5):
        torch.testing.assert_close(hf.chunked_vertical_attention(q, k, v, keep, 0.4, chunk=one, slash=slash,
                                                                 local=local), whole)
    assert not torch.allclose(got, whole, atol=1e-4)  # the early chunks rank by other rows
    # ranked by each chunk's last 3 rows (rows=): the reference with that ranking; differs from the 64-row one
    few = hf.chunked_vertical_attention(q, k, v, keep, 0.4, chunk=chunk, slash=slash, local=local, rows=3)
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        qc, kc = q[:, :, :c1], k[:, :, :c1]
        want = _brute_vertical(qc, kc, v[:, :, :c1], keep[..., :c1], 0.4, hf.vertical_rank(qc, kc, 0.4, rows=3),
                               local, hf.slash_rank(qc, kc, 0.4, rows=3) if slash else None)
        torch.testing.assert_close(few[:, :, c0:c1], want[:, :, c0:c1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(few, got, atol=1e-4)
    if not slash:  # ranked by the mean query of each chunk's last 5 rows: the reference with that ranking
        pooled = hf.chunked_vertical_attention(q, k, v, keep, 0.4, chunk=chunk, local=local, rows=5, pooled=True)
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            qm = q[:, :, c1 - 5:c1].mean(2, keepdim=True).view(1, 2, 2, 1, 8)  # [B, Hkv, G, 1, D]
            rank = torch.softmax(0.4 * torch.einsum("bhgrd,bhnd->bhgrn", qm, k[:, :, :c1]), -1).sum((2, 3))
            want = _brute_vertical(q[:, :, :c1], k[:, :, :c1], v[:, :, :c1], keep[..., :c1], 0.4, rank, local)
            torch.testing.assert_close(pooled[:, :, c0:c1], want[:, :, c0:c1], atol=1e-5, rtol=1e-5)
    else:
        with pytest.raises(ValueError, match="no slash lines"):
            hf.chunked_vertical_attention(q, k, v, keep, 0.4, chunk=chunk, slash=True, pooled=True)
    if not slash:  # ranked by each chunk's last 5 rows' scores on the 3 dimensions of largest |q| over those rows and
        # the group (sparqb3): the reference with that ranking; every dimension (sparqb8) is the exact ranking
        est = hf.chunked_vertical_attention(q, k, v, keep, 0.4, chunk=chunk, local=local, rows=5,
                                            estimate=hf.key_estimate("sparqb", 3, k))
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            qr = q[:, :, c1 - 5:c1].view(1, 2, 2, 5, 8)
            dims = qr.abs().sum((2, 3)).topk(3, dim=-1).indices  # [B, Hkv, 3]
            qd = qr.gather(-1, dims[:, :, None, None].expand(1, 2, 2, 5, 3))
            kd = k[:, :, :c1].gather(-1, dims[:, :, None].expand(1, 2, c1, 3))
            s = 0.4 * torch.einsum("bhgrd,bhnd->bhgrn", qd, kd)
            causal = torch.arange(c1)[None, :] <= torch.arange(c1 - 5, c1)[:, None]
            rank = torch.softmax(s.masked_fill(~causal, float("-inf")), -1).sum((2, 3))
            want = _brute_vertical(q[:, :, :c1], k[:, :, :c1], v[:, :, :c1], keep[..., :c1], 0.4, rank, local)
            torch.testing.assert_close(est[:, :, c0:c1], want[:, :, c0:c1], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(est, few5 := hf.chunked_vertical_attention(q, k, v, keep, 0.4, chunk=chunk,
                                                                              local=local, rows=5), atol=1e-4)
        torch.testing.assert_close(hf.chunked_vertical_attention(q, k, v, keep, 0.4, chunk=chunk, local=local, rows=5,
                                                                 estimate=hf.key_estimate("sparqb", 8, k)), few5)
        with pytest.raises(ValueError, match="not with an estimate"):
            hf.chunked_vertical_attention(q, k, v, keep, 0.4, chunk=chunk, pooled=True,
                                          estimate=hf.key_estimate("sparqb", 3, k))
    with pytest.raises(ValueError, match="rows must be"):
        hf.chunked_vertical_attention(q, k, v, keep, 0.4, chunk=chunk, rows=0)
    with pytest.raises(ValueError, match="chunk must be"):
        hf.chunked_vertical_attention(q, k, v, keep, 0.4, chunk=0)
    with pytest.raises(ValueError, match="first_row must be"):
        hf.vertical_attention(q, k, v, keep, 0.4, first_row=n)


def test_chunked_vertical_attention_within_reads_each_blocks_candidates_first():
    """within (a block mask, one chunk per block): each chunk's rows as the row-by-row reference whose ranking puts
    the tokens of that query block's candidate blocks above every other key (each group by the chunk's own last rows'
    mass); every block a candidate is the plain chunked ranking; bad shapes are refused."""
    torch.manual_seed(21)
    n, bs, local = 37, 8, 3
    m = -(-n // bs)
    q, k, v = torch.randn(1, 4, n, 8), torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8)
    keep = torch.randint(1, n, (1, 2, n))
    within = (torch.rand(1, 2, m, m) < 0.4) & torch.ones(m, m, dtype=torch.bool).tril()
    got = hf.chunked_vertical_attention(q, k, v, keep, 0.4, chunk=bs, local=local, rows=5, within=within)
    plain = hf.chunked_vertical_attention(q, k, v, keep, 0.4, chunk=bs, local=local, rows=5)
    for c0 in range(0, n, bs):
        c1 = min(n, c0 + bs)
        qc, kc = q[:, :, :c1], k[:, :, :c1]
        cand = torch.stack([within[0, h, c0 // bs, torch.arange(c1) // bs] for h in range(2)])[None]  # [1, 2, c1]
        rank = hf.vertical_rank(qc, kc, 0.4, rows=5) + 1000.0 * cand  # candidates first, each group by mass
        want = _brute_vertical(qc, kc, v[:, :, :c1], keep[..., :c1], 0.4, rank, local)
        torch.testing.assert_close(got[:, :, c0:c1], want[:, :, c0:c1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-4)
    every = torch.ones(1, 2, m, m, dtype=torch.bool)
    torch.testing.assert_close(hf.chunked_vertical_attention(q, k, v, keep, 0.4, chunk=bs, local=local, rows=5,
                                                             within=every), plain)
    for bad in (dict(within=within[..., :-1, :-1]), dict(within=within[:, :1]), dict(within=within, chunk=16),
                dict(within=within, chunk=None), dict(within=within, slash=True)):
        with pytest.raises(ValueError, match="within must be"):
            hf.chunked_vertical_attention(q, k, v, keep, 0.4, **{"chunk": bs, **bad})


def test_vertical_rank_is_the_last_rows_summed_attention():
    torch.manual_seed(5)
    q, k = torch.randn(1, 4, 40, 8), torch.randn(1, 2, 40, 8)
    got = hf.vertical_rank(q, k, 0.3, rows=7)
    torch.testing.assert_close(got, _last_rows_mass(q, k, 0.3, 7)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.sum(-1), torch.full((1, 2), 14.0))  # 7 rows x 2 heads, each summing to 1
    # every key kept: dense causal attention, whatever the ranking
    v = torch.randn(1, 2, 40, 8)
    full = hf.vertical_attention(q, k, v, torch.full((1, 2, 40), 40), 0.3, local=3)
    torch.testing.assert_close(full, dense_attention_ref(q, k, v, scale=0.3).float(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="keep must be"):
        hf.vertical_attention(q, k, v, torch.ones(1, 2, 39), 0.3)
    with pytest.raises(ValueError, match="rank and slash must be"):
        hf.vertical_attention(q, k, v, torch.ones(1, 2, 40), 0.3, rank=torch.ones(1, 1, 40))
    with pytest.raises(ValueError, match="local must be"):
        hf.vertical_attention(q, k, v, torch.ones(1, 2, 40), 0.3, local=0)


def test_a_model_runs_with_the_vertical_prefill():
    """using(prefill="vertical") in a tiny model: the block selection's counts, the prompt's logits differ from the
    block path's and the token oracle's, decode follows the policy's rule; refused beside oracle/tokens/compensate and
    for an unknown value."""
    model = _tiny_model()
    ids = torch.randint(0, 97, (1, 300))
    cfg = CABConfig(policy="cab", sparsity=0.8, decode_rule="tokens")

    def run(**kw):
        with torch.no_grad(), hf.using(cfg, impl="torch", **kw) as st:
            logits = torch.cat(model.generate(ids, max_new_tokens=3, do_sample=False, output_logits=True,
                                              return_dict_in_generate=True).logits)
        return logits, (st["kept"], st["causal"], st["decode_calls"])

    block, c_block = run()
    vert, c_vert = run(prefill="vertical")
    vslash, c_vslash = run(prefill="vslash")
    tok, c_tok = run(oracle="token")
    assert c_block == c_vert == c_vslash and c_block[0] < c_block[1]
    for other in (block, tok, vslash):
        assert not torch.allclose(vert[0], other[0], atol=1e-4)
    assert math.isfinite(float(vert.sum())) and math.isfinite(float(vslash.sum()))
    for bad in (dict(oracle="token"), dict(tokens="int4"), dict(compensate="mean")):
        with pytest.raises(ValueError, match="not with oracle, tokens or compensate"):
            run(prefill="vslash", **bad)
    with pytest.raises(ValueError, match="prefill="):
        run(prefill="slash")
    chunked, c_chunked = run(prefill="vertical", prefill_chunk=128)  # 300 rows: 3 chunks
    assert c_chunked == c_vert and not torch.allclose(chunked[0], vert[0], atol=1e-4)
    whole, _ = run(prefill="vertical", prefill_chunk=300)
    torch.testing.assert_close(whole, vert)
    with pytest.raises(ValueError, match="prefill_chunk"):
        run(prefill_chunk=128)
    # each 64-row chunk ranked by its own last 8 rows: the block selection's counts, another answer than 64 rows'
    few, c_few = run(prefill="vertical", prefill_chunk=64, prefill_rows=8)
    tile, _ = run(prefill="vertical", prefill_chunk=64)
    assert c_few == c_vert and not torch.allclose(few[0], tile[0], atol=1e-4)
    for bad in (dict(prefill_rows=8), dict(prefill="vertical", prefill_rows=0)):
        with pytest.raises(ValueError, match="prefill_rows"):
            run(**bad)
    pooled, c_pooled = run(prefill="vertical", prefill_chunk=64, prefill_pooled=True)
    assert c_pooled == c_vert and not torch.allclose(pooled[0], tile[0], atol=1e-4)
    for bad in (dict(prefill_pooled=True), dict(prefill="vslash", prefill_pooled=True)):
        with pytest.raises(ValueError, match="prefill_pooled"):
            run(**bad)
    # ranked by the block's rows' scores on 4 of the 16 dimensions: the block selection's counts, another answer;
    # on all 16, the exact ranking's
    est, c_est = run(prefill="vertical", prefill_chunk=64, prefill_est="sparqb4")
    assert c_est == c_vert and not torch.allclose(est[0], tile[0], atol=1e-4)
    torch.testing.assert_close(run(prefill="vertical", prefill_chunk=64, prefill_est="sparqb16")[0], tile)
    for bad in (dict(prefill_est="sparqb4"), dict(prefill="vertical", prefill_pooled=True, prefill_est="sparqb4")):
        with pytest.raises(ValueError, match="prefill_est=.*needs prefill="):
            run(**bad)
    for bad in ("exact", "sparqb4kv", "int4x2", "sparqb"):
        with pytest.raises(ValueError, match="prefill_est=|tokens="):
            run(prefill="vertical", prefill_est=bad)
    with pytest.raises(ValueError, match="sparqbR shares dimensions"):
        run(tokens="sparqb4")
    # ranked first among the tokens of cab's blocks at 2x the budget: the block selection's counts, another answer;
    # at a factor that keeps every causal block, the plain per-block ranking's
    within, c_within = run(prefill="vertical", prefill_chunk=64, prefill_within=2)
    assert c_within == c_vert and not torch.allclose(within[0], tile[0], atol=1e-4)
    torch.testing.assert_close(run(prefill="vertical", prefill_chunk=64, prefill_within=5)[0], tile)
    for bad in (dict(prefill_within=2), dict(prefill="vertical", prefill_within=2),
                dict(prefill="vslash", prefill_chunk=64, prefill_within=2),
                dict(prefill="vertical", prefill_chunk=128, prefill_within=2)):
        with pytest.raises(ValueError, match="prefill_within=2 ranks each query block"):
            run(**bad)
    with pytest.raises(ValueError, match="must be >= 1"):
        run(prefill="vertical", prefill_chunk=64, prefill_within=0.5)
    # the candidates ranked by every row's box bounds instead (their choice: the tests below): the same counts
    rows_b, c_rows_b = run(prefill="vertical", prefill_chunk=64, prefill_within=2, prefill_cand="rowbounds")
    assert c_rows_b == c_vert and math.isfinite(float(rows_b.sum()))
    torch.testing.assert_close(run(prefill="vertical", prefill_chunk=64, prefill_within=5,
                                   prefill_cand="rowbounds")[0], tile)
    with pytest.raises(ValueError, match="prefill_cand='rowbounds' chooses prefill_within's candidates"):
        run(prefill="vertical", prefill_chunk=64, prefill_cand="rowbounds")
    with pytest.raises(ValueError, match="prefill_cand='pooled' must be one of"):
        run(prefill="vertical", prefill_chunk=64, prefill_within=2, prefill_cand="pooled")


def _row_bound_candidates_by_loops(q, k, counts, bs, sink, local):
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    g, m = hq // hkv, -(-n // bs)
    out = torch.zeros(b, hkv, m, m, dtype=torch.bool)
    for bi in range(b):
        for h in range(hkv):
            for i in range(m):
                best = torch.full((m,), -1.0, dtype=torch.float64)
                for gi in range(g):
                    for r in range(i * bs, min(n, (i + 1) * bs)):
                        qr = q[bi, h * g + gi, r].double()
                        logit = torch.empty(i + 1, dtype=torch.float64)
                        for j in range(i + 1):
                            kb = k[bi, h, j * bs:min(n, (j + 1) * bs)].double()
                            lo, hi = kb.min(0).values, kb.max(0).values
                            logit[j] = torch.maximum(qr * lo, qr * hi).sum() / math.sqrt(d) + math.log(kb.shape[0])
                        best[:i + 1] = torch.maximum(best[:i + 1], logit.softmax(0))
                forced = [j for j in range(i + 1) if j < sink or j > i - local]
                rest = sorted((j for j in range(i + 1) if j not in forced), key=lambda j: (-float(best[j]), j))
                for j in (forced + rest)[:int(counts[bi, h, i])]:
                    out[bi, h, i, j] = True
    return out


@pytest.mark.parametrize("n,bs,g,step", [(70, 16, 2, 4096), (97, 8, 3, 16), (64, 16, 1, 32)])
def test_row_bound_candidates_match_the_row_by_row_reference(n, bs, g, step):
    """Every row's box bound on each causal key block, its softmax, the largest over the query block's rows and the
    group's heads, sink and local blocks first, then the best counts: the loops' choice, in slices of rows too."""
    torch.manual_seed(n)
    hkv, d = 2, 8
    m = -(-n // bs)
    q, k = torch.randn(1, hkv * g, n, d), torch.randn(1, hkv, n, d)
    counts = torch.minimum(torch.randint(1, m + 1, (1, hkv, m)), torch.arange(1, m + 1))
    got = hf.row_bound_candidates(q, k, counts, bs, sink_blocks=1, local_blocks=2, rows_per_step=step)
    assert torch.equal(got, _row_bound_candidates_by_loops(q, k, counts, bs, 1, 2))
    assert torch.equal(got.sum(-1), counts)
    with pytest.raises(ValueError, match="counts must be"):
        hf.row_bound_candidates(q, k, counts[..., :-1], bs)
    for bad_q, bad_k in ((q[0], k), (q, k[:, :, :-1]), (q[:, :3] if g == 2 else q[:, :1], k)):
        with pytest.raises(ValueError, match="must be \\[B, Hq, N, D\\]"):
            hf.row_bound_candidates(bad_q, bad_k, counts, bs)


def test_row_bound_candidates_find_the_block_one_row_needs():
    """One query row aligned with one key of a far block, the other rows with nothing: that row's bound picks the
    block, which the block's mean query (cab's pooled estimate) would not single out."""
    torch.manual_seed(0)
    n, bs, d = 512, 64, 16
    q, k = 0.1 * torch.randn(1, 1, n, d), 0.1 * torch.randn(1, 1, n, d)
    needle = torch.zeros(d)
    needle[3] = 6.0
    k[0, 0, 130] = needle  # key block 2
    q[0, 0, 7 * bs + 5] = needle  # one row of the last query block
    counts = torch.minimum(torch.full((1, 1, 8), 3), torch.arange(1, 9))
    got = hf.row_bound_candidates(q, k, counts, bs, sink_blocks=1, local_blocks=1)
    assert bool(got[0, 0, 7, 2]) and int(got[0, 0, 7].sum()) == 3
