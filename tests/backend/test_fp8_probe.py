"""benchmarks/gpu/fp8_probe.py's kernel under Triton's CPU interpreter: exact scores over a shuffled paged cache, and
the centered float8 copy's estimate, each against PyTorch on the same values (the GPU run times them)."""

from __future__ import annotations

import math

import pytest
import torch

from cab_vllm.ops._triton import HAS_TRITON, interpreting
from conftest import load_script

pytestmark = pytest.mark.skipif(not (HAS_TRITON and interpreting()), reason="needs Triton's CPU interpreter")

def _probe():
    return load_script("benchmarks/gpu/fp8_probe.py")


def _inputs(rows=2, hq=8, hkv=2, d=32, page=16, n=1500, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pages = -(-n // page)
    kc = torch.randn(rows * pages + 3, page, hkv, d, generator=gen) * 0.5
    kc[..., 3] += 6.0  # a large, nearly constant channel
    bt = torch.randperm(rows * pages + 3, generator=gen)[:rows * pages].view(rows, pages).int()
    return torch.randn(rows, hq, d, generator=gen), kc, bt


@pytest.mark.parametrize("n", [1500, 1024, 77])
def test_exact_logits_over_shuffled_pages(n):
    """Exact scores (base 2) of every key of each row, a partial last chunk and a row shorter than a step included;
    nothing written past n."""
    fp = _probe()
    q, kc, bt = _inputs(n=n)
    scale = 1 / math.sqrt(q.shape[-1])
    lg = torch.full((q.shape[0], q.shape[1], n + 9), 7.0)
    fp.probe_logits(q, kc, bt, n, scale, lg, None, 16)
    ref = torch.einsum("shd,shnd->shn", q, fp.cache_keys(kc, bt, n).repeat_interleave(4, 1)) * scale * fp.LOG2E
    assert (lg[..., :n] - ref).abs().max() < 1e-4
    assert torch.all(lg[..., n:] == 7.0)


def test_centered_float8_estimate():
    """The copy: each 1,024-token group centered on its channels' mid-range, the rest float8 per token; its keys
    within float8's step of the residual (the constant channel's offset kept exactly by the center). The kernel's
    estimate (queries given in float8) equals PyTorch's on the same copy, and ranks each head's 2% best keys
    mostly among its own 2% best. Bad shapes are refused."""
    fp = _probe()
    n = 1500
    q, kc, bt = _inputs(n=n)
    scale = 1 / math.sqrt(q.shape[-1])
    copy = fp.make_copy(kc, bt, n)
    keys = fp.cache_keys(kc, bt, n)
    deq = fp.copy_keys(*copy, bt, n)
    assert deq.shape == keys.shape
    assert (deq - keys).abs().max() < 0.1 and (deq - keys)[..., 3].abs().max() < 0.1
    q8 = fp.quantize_queries(q)
    lg = torch.zeros(q.shape[0], q.shape[1], n)
    fp.probe_logits(q, kc, bt, n, scale, lg, copy, 16, q8)
    k8, ks, mid = copy
    qd = q8[0].float() * q8[1][..., None]
    ref = []
    for s in range(q.shape[0]):
        pg = bt[s].long()
        res = (k8[pg].float().reshape(-1, 2, 32)[:n] * ks[pg].reshape(-1, 2)[:n, :, None]).transpose(0, 1)
        m = mid[s].float().repeat_interleave(fp.CENTER, 1)[:, :n]
        ref.append(torch.einsum("hd,hnd->hn", qd[s], res.repeat_interleave(4, 0))
                   + torch.einsum("hd,hnd->hn", q[s], m.repeat_interleave(4, 0)))
    assert (lg - torch.stack(ref) * scale * fp.LOG2E).abs().max() < 1e-4
    exact = torch.einsum("shd,shnd->shn", q, keys.repeat_interleave(4, 1))
    keep = n // 50
    best, got = exact.topk(keep, -1).indices, lg.topk(keep, -1).indices
    recall = (best[..., :, None] == got[..., None, :]).any(-1).float().mean(-1)
    assert float(recall.mean()) > 0.8, recall
    with pytest.raises(ValueError, match="do not fit together"):
        fp.probe_logits(q, kc, bt, n, scale, lg[..., :100], None, 16)
    with pytest.raises(ValueError, match="do not fit together"):
        fp.probe_logits(q[:, :6], kc, bt, n, scale, lg, None, 2)
