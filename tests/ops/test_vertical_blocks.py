"""CABConfig.vertical_blocks: every chunk's last query tokens are scored exactly against every key and every query
block of the chunk ranks each key block by the larger of its estimate and those scores (policies.estimate), on its
causal blocks only; the prompt's last row still takes the exact scores; the budget is the plain rule's."""

from __future__ import annotations

import pytest
import torch

from cab_vllm.backend.plan import EngineSettings
from cab_vllm.config import CABConfig
from cab_vllm.ops.blocks import causal_block_mask
from cab_vllm.policies import estimate, exact_last_row, select_from_attention, uses_vertical_blocks


def _case(n, hq, hkv, d, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, hq, n, d, generator=gen), torch.randn(1, hkv, n, d, generator=gen)


@pytest.mark.parametrize("n, first", [(1000, 0), (1337, 9)], ids=["square", "chunk"])
@pytest.mark.parametrize("exact", [True, False], ids=["prompt-end", "earlier-chunk"])
def test_every_row_takes_the_larger_of_its_estimate_and_the_exact_scores(n, first, exact):
    q, k = _case(n, 4, 2, 32, seed=n)
    cfg = CABConfig(sparsity=0.8, exact_rows=16)
    qr = q[:, :, first * cfg.block_size:]
    base_max, base_mean = estimate(qr, k, cfg, impl="torch", q_block_offset=first, exact=False)
    v_max, v_mean = estimate(qr, k, cfg.replace(vertical_blocks=True), impl="torch", q_block_offset=first,
                             exact=exact)
    emax, emean = exact_last_row(qr, k, cfg, first, impl="torch")
    mq, m = base_max.shape[-2:]
    allowed = causal_block_mask(m, None, first, mq)
    want_max = torch.where(allowed, torch.maximum(base_max, emax), 0.0)
    want_mean = torch.where(allowed, torch.maximum(base_mean, emean), 0.0)
    if exact:  # the prompt's last row: the exact scores themselves
        want_max[:, :, -1], want_mean[:, :, -1] = emax[:, :, 0], emean[:, :, 0]
    assert torch.equal(v_max, want_max) and torch.equal(v_mean, want_mean)
    assert not v_max[..., ~allowed].any()  # nothing on non-causal blocks
    assert (v_max[:, :, :-1] > base_max[:, :, :-1]).any()  # the exact scores raise some earlier rows' blocks
    # the same budget: counts as the plain rule's
    _, c_plain = select_from_attention(base_max, base_mean, cfg, impl="torch", q_block_offset=first, answer=exact)
    _, c_vert = select_from_attention(v_max, v_mean, cfg.replace(vertical_blocks=True), impl="torch",
                                      q_block_offset=first, answer=exact)
    assert torch.equal(c_plain, c_vert)


def test_a_key_block_the_chunk_end_attends_is_kept_by_earlier_rows():
    """A key planted so that the last rows attend to it (and nothing else does) enters every later row's selection
    with vertical blocks, and not without (the estimate alone misses it)."""
    torch.manual_seed(0)
    n, d = 64 * 24, 32
    q, k = _case(n, 2, 1, d, seed=5)
    q, k = q * 0.1, k * 0.1
    probe = torch.nn.functional.normalize(torch.randn(d), dim=0)
    q = q - (q @ probe)[..., None] * probe  # no other query row looks for it
    k[0, 0, 64 * 5 + 17] = probe * 20  # one token of key block 5
    q[0, :, -16:] = probe * 3  # the chunk's last 16 rows (the exact rows) do
    cfg = CABConfig(sparsity=0.75, exact_rows=16, estimator="mean")
    sel = {}
    for v in (False, True):
        c = cfg.replace(vertical_blocks=v)
        a_max, a_mean = estimate(q, k, c, impl="torch", exact=False)
        idx, cnt = select_from_attention(a_max, a_mean, c, impl="torch")
        # the rows past the local block with a free slot beyond sink and diagonal
        sel[v] = [(idx[0, 0, r, :cnt[0, 0, r]] == 5).any().item() for r in range(6, 24) if cnt[0, 0, r] > 2]
    assert len(sel[True]) >= 12 and all(sel[True])
    assert sum(sel[False]) <= len(sel[False]) // 2, sel[False]  # the block's mean key alone: some rows by chance


def test_vertical_blocks_checks_and_environment():
    assert uses_vertical_blocks(CABConfig(vertical_blocks=True))
    assert not uses_vertical_blocks(CABConfig())
    # other policies ignore it (a request may switch policy under an engine that sets it)
    for policy in ("magnitude", "dense", "h2o"):
        c = CABConfig(vertical_blocks=True, policy=policy)
        assert c.vertical_blocks and not uses_vertical_blocks(c)
    with pytest.raises(ValueError, match="vertical_blocks=True ranks key blocks by the cab policy's exact rows"):
        CABConfig(vertical_blocks=True, exact_rows=0)
    for bad in (1, "yes", None):
        with pytest.raises(ValueError, match=r"CABConfig\.vertical_blocks="):
            CABConfig(vertical_blocks=bad)
    assert EngineSettings.from_env({"CAB_VERTICAL_BLOCKS": "1"}).cfg.vertical_blocks
    assert not EngineSettings.from_env({"CAB_VERTICAL_BLOCKS": "0"}).cfg.vertical_blocks
    with pytest.raises(ValueError, match="CAB_VERTICAL_BLOCKS"):
        EngineSettings.from_env({"CAB_VERTICAL_BLOCKS": "2"})
