"""benchmarks/gpu/fused_probe.py's kernels under Triton's CPU interpreter: the sampled logits, and the one-pass
launch (every key's logit, the online softmax over each head's keys at or above its threshold, values of kept keys
only) with its merge, each against PyTorch on the same values (the GPU run times them)."""

from __future__ import annotations

import math

import pytest
import torch

from cab_vllm.ops._triton import HAS_TRITON, interpreting
from conftest import load_script

pytestmark = pytest.mark.skipif(not (HAS_TRITON and interpreting()), reason="needs Triton's CPU interpreter")

def _probe():
    return load_script("benchmarks/gpu/fused_probe.py")


def _inputs(rows=2, hq=8, hkv=2, d=32, page=16, n=1500, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pages = -(-n // page)
    kv = torch.randn(2, rows * pages + 3, page, hkv, d, generator=gen)
    bt = torch.randperm(rows * pages + 3, generator=gen)[:rows * pages].view(rows, pages).int()
    return torch.randn(rows, hq, d, generator=gen) * 2.0, kv[0], kv[1], bt


@pytest.mark.parametrize("n, sample, keep", [(1500, 4, 30), (2100, 16, 42), (77, 1, 5)])
def test_sampled_thresholds_and_one_pass_attention(n, sample, keep):
    """The sampled logits are PyTorch's; each head's threshold is its sample's round(keep / sample)-th largest; the
    one-pass launch and merge (one loop per chunk, or two: logits stored, then read back) give PyTorch's softmax
    over the keys at or above it (chunks, a partial last tile and a row shorter than a step included), count them as
    PyTorch does, and keep about keep keys per head."""
    fp = _probe()
    q, kc, vc, bt = _inputs(n=n)
    scale = 1 / math.sqrt(q.shape[-1])
    fz = fp.Fused(2, 8, 2, 32, n, keep, sample, "cpu")
    fz.thresholds(q, kc, bt, scale)
    sg = fp.sampled_reference(q, kc, bt, n, scale, sample)
    assert (fz.sg[..., :fz.m] - sg).abs().max() < 1e-4
    assert torch.allclose(fz.thr, sg.topk(fz.k, -1).values[..., -1])
    fz.thr -= 1e-3  # (the threshold's own key clear of it: two dots of the same key may differ in the last bit)
    ref, kept = fp.reference(q, kc, vc, bt, n, scale, fz.thr)
    for two_phase in (False, True):
        out = torch.full_like(q, 7.0)
        fz.cnt.zero_()
        fz.attend(q, kc, vc, bt, scale, out, two_phase)
        assert (out - ref).abs().max() < 1e-4
        assert torch.equal(fz.cnt.sum(-1), kept.to(torch.int32))
    assert bool((kept >= fz.k).all())
    if sample == 1:
        assert bool((kept == keep).all())  # the whole row sampled: exactly the keep best (distinct scores)
    else:
        assert 0.3 * keep < float(kept.float().mean()) < 3 * keep


def test_bad_shapes_are_refused():
    fp = _probe()
    with pytest.raises(ValueError, match="do not fit together"):
        fp.Fused(1, 6, 4, 32, 100, 5, 4, "cpu")
