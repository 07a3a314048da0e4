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


def _brute(q, k, v, keep, scale):
    """Row by row: the top keep[b, kvh, i] causal keys of each (query head, token) by exact score, softmax."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    out = torch.zeros(b, hq, nq, d)
    for bi in range(b):
        for h in range(hq):
            for i in range(nq):
                pos = nk - nq + i
                s = scale * (k[bi, h // g, :pos + 1].float() @ q[bi, h, i].float())
                kt = min(int(keep[bi, h // g, i]), pos + 1)
                top = s.topk(kt).indices
                p = torch.softmax(s[top], 0)
                out[bi, h, i] = p @ v[bi, h // g, top].float()
    return out


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
