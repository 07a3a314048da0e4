"""Public API end to end: select_blocks -> Selection -> sparse_attention, Triton vs torch, against float64."""

from __future__ import annotations

import math

import pytest
import torch

import cab_vllm
from conftest import KERNEL_FP32_TOL, block_mask_of, masked_attention_oracle, rel_err
from cab_vllm import ESTIMATORS, POLICIES, CABConfig
from cab_vllm.ops.curvature import curvature
from cab_vllm.policies import estimate


def _qkv(b, hq, hkv, n, d, dtype=torch.float32, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n, d, generator=gen).to(device, dtype)
    k = torch.randn(b, hkv, n, d, generator=gen).to(device, dtype)
    v = torch.randn(b, hkv, n, d, generator=gen).to(device, dtype)
    return q, k, v


def policy_score(q, k, cfg: CABConfig) -> torch.Tensor | None:
    """The float score [B, Hkv, M, M] the policy ranks its free blocks by (torch twin), or None for policies
    that do not look at Q/K (their selections must then be identical)."""
    if cfg.policy in ("streaming", "random", "dense"):
        return None
    a_max, a_mean = estimate(q, k, cfg, impl="torch")
    if cfg.policy == "curvature":
        return -curvature(a_mean, impl="torch")
    if cfg.policy == "h2o":
        return a_mean.cumsum(-2)
    return a_max  # magnitude, cab (curvature_share = 0)


def assert_same_selection_up_to_ties(s1: cab_vllm.Selection, s2: cab_vllm.Selection, score, atol=None):
    """Same counts; where the picks differ, the picked blocks' scores agree (up to atol: TF32 on a GPU)."""
    atol = (1e-4 if KERNEL_FP32_TOL < 1e-4 else 1e-2) if atol is None else atol
    assert torch.equal(s1.counts.cpu(), s2.counts.cpu())
    if score is None:
        assert torch.equal(s1.indices.cpu(), s2.indices.cpu())
        return
    m = s1.num_blocks
    m1 = block_mask_of(s1.indices, s1.counts, m).reshape(-1, m)
    m2 = block_mask_of(s2.indices, s2.counts, m).reshape(-1, m)
    sc = score.cpu().reshape(-1, m).double().clamp(-1e6, 1e6)
    for r in range(m1.shape[0]):
        if torch.equal(m1[r], m2[r]):
            continue
        a = sc[r][m1[r]].sort().values
        b = sc[r][m2[r]].sort().values
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


def oracle_from_selection(q, k, v, sel: cab_vllm.Selection, scale=None) -> torch.Tensor:
    """Float64 [B, Hq, N, D]: causal attention restricted to the selected blocks."""
    b, hq, n, d = q.shape
    hkv, bs = k.shape[1], sel.block_size
    scale = 1 / math.sqrt(d) if scale is None else scale
    bm = block_mask_of(sel.indices, sel.counts, sel.num_blocks)  # [B, Hkv, M, M]
    pos = torch.arange(n)
    out = torch.empty(b, hq, n, d, dtype=torch.float64)
    for i in range(b):
        allowed = bm[i][:, pos // bs][:, :, pos // bs] & (pos[None, :] <= pos[:, None])
        out[i], _ = masked_attention_oracle(q[i], k[i], v[i], allowed.repeat_interleave(hq // hkv, 0), scale)
    return out


# ----------------------------------------------------------------------------------------------------
# end to end, every policy
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hq,hkv,d,n,bs", [pytest.param(8, 2, 64, 200, 16, id="g4-d64-N200-bs16"),
                                          pytest.param(2, 2, 128, 97, 32, id="g1-d128-N97-bs32")])
@pytest.mark.parametrize("policy", POLICIES)
def test_select_and_attend_triton_vs_torch(policy, hq, hkv, d, n, bs, device):
    q, k, v = _qkv(2, hq, hkv, n, d, seed=hq + n, device=device)
    cfg = CABConfig(policy=policy, block_size=bs, sparsity=0.6, exact_rows=8)
    s_tri = cab_vllm.select_blocks(q, k, cfg, impl="triton")
    s_ref = cab_vllm.select_blocks(q, k, cfg, impl="torch")
    m = -(-n // bs)
    assert s_tri.indices.shape[:3] == (2, hkv, m) and s_tri.seq_len == n and s_tri.block_size == bs
    keep = (cfg.replace(sparsity=0.0) if policy == "dense" else cfg).keep_counts(m)
    assert torch.equal(s_ref.counts.cpu(), keep.to(torch.int32).expand(2, hkv, m))
    assert_same_selection_up_to_ties(s_tri, s_ref, policy_score(q, k, cfg))
    # outputs on one selection: Triton kernel, torch twin, float64 oracle
    o_tri = cab_vllm.sparse_attention(q, k, v, s_ref, impl="triton")
    o_ref = cab_vllm.sparse_attention(q, k, v, s_ref, impl="torch")
    oracle = oracle_from_selection(q, k, v, s_ref)
    assert o_tri.shape == q.shape and not o_tri.isnan().any()
    assert rel_err(o_tri, oracle) < KERNEL_FP32_TOL and rel_err(o_ref, oracle) < 1e-5


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_cab_every_estimator_triton_vs_torch(estimator, device):
    q, k, v = _qkv(1, 8, 2, 150, 64, seed=1, device=device)
    cfg = CABConfig(policy="cab", estimator=estimator, block_size=16, sparsity=0.7, num_reps=2, sample_rows=4)
    s_tri = cab_vllm.select_blocks(q, k, cfg, impl="triton")
    s_ref = cab_vllm.select_blocks(q, k, cfg, impl="torch")
    assert_same_selection_up_to_ties(s_tri, s_ref, policy_score(q, k, cfg))


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_cab_exact_rows_rank_the_last_query_block(impl, device):
    """exact_rows > 0: the last query block keeps the blocks with the most exact attention mass of its last
    exact_rows tokens (max over the GQA group), not the estimator's top blocks."""
    from cab_vllm.ops.coarsen import group_reduce, sampled_block_attention
    from cab_vllm.ops.select import forced_mask

    q, k, _ = _qkv(1, 4, 2, 200, 64, seed=2, device=device)
    bs, m = 16, 13
    cfg = CABConfig(policy="cab", block_size=bs, sparsity=0.7, exact_rows=8, estimator="mean")
    sel = cab_vllm.select_blocks(q, k, cfg, impl=impl)
    exact = sampled_block_attention(q.double(), k.double(), bs, 8, torch.tensor([m - 1]), impl="torch")
    score, _ = group_reduce(exact.cpu(), 2)  # [1, Hkv, 1, M]
    free = ~forced_mask(m, 1, 1)[-1]
    mask = block_mask_of(sel.indices, sel.counts, m)[0, :, -1]  # [Hkv, M]
    for h in range(2):
        got = score[0, h, 0][mask[h] & free].sort(descending=True).values
        want = score[0, h, 0][free].sort(descending=True).values[: len(got)]
        torch.testing.assert_close(got, want, rtol=0, atol=KERNEL_FP32_TOL)
    # with exact_rows = 0 the same row follows the estimator instead, which here picks differently
    est = cab_vllm.select_blocks(q, k, cfg.replace(exact_rows=0), impl=impl)
    assert not torch.equal(est.indices[0, :, -1], sel.indices[0, :, -1])


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_sparsity_zero_equals_dense_attention(policy, impl, device):
    q, k, v = _qkv(1, 4, 2, 97, 64, seed=3, device=device)
    sel = cab_vllm.select_blocks(q, k, CABConfig(policy=policy, sparsity=0.0, block_size=16), impl=impl)
    assert sel.density() == pytest.approx(1.0)
    out = cab_vllm.sparse_attention(q, k, v, sel, impl=impl)
    n = q.shape[2]
    causal = torch.ones(n, n, dtype=torch.bool).tril().expand(4, n, n)
    dense, _ = masked_attention_oracle(q[0], k[0], v[0], causal, 1 / 8)
    assert rel_err(out[0], dense) < KERNEL_FP32_TOL


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("hq,hkv", [(4, 2), (4, 1)], ids=["g2", "mqa-g4"])
def test_single_token_input(policy, hq, hkv, device):
    """N = 1: one block, one key; the output is v itself."""
    q, k, v = _qkv(2, hq, hkv, 1, 64, seed=4, device=device)
    for impl in ("triton", "torch"):
        sel = cab_vllm.select_blocks(q, k, CABConfig(policy=policy), impl=impl)
        assert sel.indices.shape == (2, hkv, 1, 1) and sel.counts.flatten().tolist() == [1] * 2 * hkv
        out = cab_vllm.sparse_attention(q, k, v, sel, impl=impl)
        assert not out.isnan().any(), impl
        torch.testing.assert_close(out, v.repeat_interleave(hq // hkv, 1), rtol=KERNEL_FP32_TOL, atol=KERNEL_FP32_TOL)


@pytest.mark.parametrize("policy", ["magnitude", "h2o"])
def test_bf16_selection_triton_vs_torch(policy, device):
    """bf16 inputs through the one-pass estimator kernels (pooling and the fused softmax, no tl.dot)."""
    q, k, _ = _qkv(1, 8, 2, 150, 64, dtype=torch.bfloat16, seed=5, device=device)
    cfg = CABConfig(policy=policy, block_size=16, sparsity=0.7)
    s_tri = cab_vllm.select_blocks(q, k, cfg, impl="triton")
    s_ref = cab_vllm.select_blocks(q, k, cfg, impl="torch")
    assert_same_selection_up_to_ties(s_tri, s_ref, policy_score(q, k, cfg))


def test_default_config_and_auto_impl(device):
    """No cfg, impl='auto': the defaults (block 64, sparsity 0.9, cab) run on CPU through the torch twin."""
    q, k, v = _qkv(1, 4, 2, 300, 64, seed=6, device=device)
    sel = cab_vllm.select_blocks(q, k)
    assert sel.block_size == 64 and sel.num_blocks == 5
    assert torch.equal(sel.counts[0, 0].cpu(), CABConfig().keep_counts(5).to(torch.int32))
    out = cab_vllm.sparse_attention(q, k, v, sel)
    assert rel_err(out, oracle_from_selection(q, k, v, sel)) < KERNEL_FP32_TOL


def test_custom_scale(device):
    q, k, v = _qkv(1, 2, 2, 70, 64, seed=7, device=device)
    sel = cab_vllm.select_blocks(q, k, CABConfig(block_size=16, sparsity=0.5), impl="torch")
    for impl in ("triton", "torch"):
        out = cab_vllm.sparse_attention(q, k, v, sel, scale=0.3, impl=impl)
        assert rel_err(out, oracle_from_selection(q, k, v, sel, scale=0.3)) < KERNEL_FP32_TOL


def test_transposed_bnhd_inputs(device):
    """q, k, v as [B, N, H, D] buffers viewed as [B, H, N, D] (how HF and vLLM hold them): the Triton path
    takes the strides as they are."""
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(2, 97, 8, 64, generator=gen).to(device).transpose(1, 2)
    k = torch.randn(2, 97, 2, 64, generator=gen).to(device).transpose(1, 2)
    v = torch.randn(2, 97, 2, 64, generator=gen).to(device).transpose(1, 2)
    cfg = CABConfig(block_size=16, sparsity=0.5)
    s_tri = cab_vllm.select_blocks(q, k, cfg, impl="triton")
    s_ref = cab_vllm.select_blocks(q.contiguous(), k.contiguous(), cfg, impl="torch")
    assert_same_selection_up_to_ties(s_tri, s_ref, policy_score(q, k, cfg))
    out = cab_vllm.sparse_attention(q, k, v, s_ref, impl="triton")
    assert rel_err(out, oracle_from_selection(q, k, v, s_ref)) < KERNEL_FP32_TOL


@pytest.mark.parametrize("d", [80, 96], ids=lambda d: f"d{d}")
def test_head_dim_not_a_power_of_two(d, device):
    q, k, v = _qkv(1, 4, 2, 97, d, seed=d, device=device)
    cfg = CABConfig(block_size=16, sparsity=0.5)
    s_tri = cab_vllm.select_blocks(q, k, cfg, impl="triton")
    s_ref = cab_vllm.select_blocks(q, k, cfg, impl="torch")
    assert_same_selection_up_to_ties(s_tri, s_ref, policy_score(q, k, cfg))
    out = cab_vllm.sparse_attention(q, k, v, s_ref, impl="triton")
    assert rel_err(out, oracle_from_selection(q, k, v, s_ref)) < KERNEL_FP32_TOL


# ----------------------------------------------------------------------------------------------------
# MQA (Hkv = 1) through the Triton kernel
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hq,n", [(4, 97), (7, 200)], ids=["g4-N97", "g7-N200"])
def test_sparse_attention_triton_mqa(hq, n, device):
    """One KV head (MQA) and several query blocks: Selection.to_tiles() yields counts [B*M, 1] whose size-1
    last dim has a non-unit stride; the Triton path must still run and match the oracle."""
    q, k, v = _qkv(1, hq, 1, n, 64, seed=8, device=device)
    sel = cab_vllm.select_blocks(q, k, CABConfig(block_size=16, sparsity=0.5), impl="torch")
    out = cab_vllm.sparse_attention(q, k, v, sel, impl="triton")
    assert rel_err(out, oracle_from_selection(q, k, v, sel)) < KERNEL_FP32_TOL


# ----------------------------------------------------------------------------------------------------
# Selection and input checks
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_selection_density(sparsity, device):
    q, k, _ = _qkv(2, 2, 2, 320, 64, seed=9, device=device)
    cfg = CABConfig(policy="streaming", block_size=16, sparsity=sparsity)
    sel = cab_vllm.select_blocks(q, k, cfg)
    m = 20
    want = sum(int(x) for x in cfg.keep_counts(m)) / (m * (m + 1) / 2)
    assert sel.density() == pytest.approx(want, rel=1e-12)
    assert (sel.density() == 1.0) == (sparsity == 0.0)


def test_selection_to_tiles_layout(device):
    q, k, _ = _qkv(2, 4, 2, 70, 64, seed=10, device=device)
    sel = cab_vllm.select_blocks(q, k, CABConfig(block_size=16, sparsity=0.5), impl="torch")
    t = sel.to_tiles()
    assert t.seq.tolist() == [0] * 5 + [1] * 5 and t.qblock.tolist() == list(range(5)) * 2
    for tt in range(10):
        b, mb = tt // 5, tt % 5
        assert torch.equal(t.indices[tt], sel.indices[b, :, mb]) and torch.equal(t.counts[tt], sel.counts[b, :, mb])


def _bad_calls():
    q, k, v = _qkv(1, 4, 2, 40, 64)
    sel = cab_vllm.select_blocks(q, k, CABConfig(block_size=16), impl="torch")
    return [
        ("q-3d", lambda: cab_vllm.select_blocks(q[0], k, CABConfig(block_size=16))),
        ("hq-not-multiple", lambda: cab_vllm.select_blocks(q[:, :3], k, CABConfig(block_size=16))),
        ("n-mismatch", lambda: cab_vllm.select_blocks(q, k[:, :, :30], CABConfig(block_size=16))),
        ("d-mismatch", lambda: cab_vllm.select_blocks(q, k[..., :32], CABConfig(block_size=16))),
        ("dtype-mismatch", lambda: cab_vllm.select_blocks(q, k.double(), CABConfig(block_size=16))),
        ("zero-tokens", lambda: cab_vllm.select_blocks(q[:, :, :0], k[:, :, :0], CABConfig(block_size=16))),
        ("bad-impl", lambda: cab_vllm.select_blocks(q, k, CABConfig(block_size=16), impl="cuda")),
        ("v-shape", lambda: cab_vllm.sparse_attention(q, k, v[:, :1], sel)),
        ("sel-wrong-length", lambda: cab_vllm.sparse_attention(q[:, :, :39], k[:, :, :39], v[:, :, :39], sel)),
        ("sel-wrong-heads", lambda: cab_vllm.sparse_attention(q, k[:, :1], v[:, :1], sel)),
    ]


@pytest.mark.parametrize("call", [c for _, c in _bad_calls()], ids=[i for i, _ in _bad_calls()])
def test_bad_inputs_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


# ----------------------------------------------------------------------------------------------------
# CABConfig validation
# ----------------------------------------------------------------------------------------------------
BAD_FIELDS = [
    ("block_size", 8), ("block_size", 48), ("block_size", 64.0), ("block_size", True),
    ("sparsity", -0.1), ("sparsity", 1.0), ("sparsity", float("nan")), ("sparsity", "0.5"), ("sparsity", True),
    ("sink_blocks", -1), ("sink_blocks", 1.5),
    ("local_blocks", 0), ("local_blocks", None),
    ("policy", "quest"), ("policy", "CAB"),
    ("estimator", "max"), ("estimator", None),
    ("num_reps", 0), ("num_reps", 65),
    ("sample_rows", 0), ("sample_rows", 65),
    ("exact_rows", -1), ("exact_rows", 65),
    ("curvature_share", 1.5), ("curvature_share", float("inf")),
    ("h2o_recent_share", -0.1), ("h2o_recent_share", float("nan")),
    ("seed", 1.5), ("seed", True), ("seed", "0"),
]


@pytest.mark.parametrize("field,value", BAD_FIELDS, ids=[f"{f}={v!r}" for f, v in BAD_FIELDS])
def test_config_rejects_bad_field(field, value):
    with pytest.raises(ValueError, match=rf"CABConfig\.{field}="):
        CABConfig(**{field: value})
    with pytest.raises(ValueError, match=rf"CABConfig\.{field}="):
        CABConfig().replace(**{field: value})


def test_config_bounds_follow_block_size():
    """num_reps / sample_rows / exact_rows may go up to the block size, not past it."""
    cfg = CABConfig(block_size=16, num_reps=16, sample_rows=16, exact_rows=16)
    assert cfg.exact_rows == 16
    with pytest.raises(ValueError, match="exact_rows"):
        cfg.replace(block_size=16, exact_rows=17)
    assert CABConfig(block_size=128, exact_rows=100).exact_rows == 100


def test_config_replace_and_frozen():
    cfg = CABConfig()
    new = cfg.replace(sparsity=0.5, policy="h2o")
    assert (new.sparsity, new.policy, cfg.sparsity) == (0.5, "h2o", 0.9)
    with pytest.raises(ValueError, match="no field"):
        cfg.replace(sparsty=0.5)
    with pytest.raises(AttributeError):
        cfg.sparsity = 0.1  # frozen
    assert all(CABConfig(policy=p).policy == p for p in POLICIES)
    assert all(CABConfig(estimator=e).estimator == e for e in ESTIMATORS)
