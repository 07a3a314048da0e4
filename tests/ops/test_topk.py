"""The kernels' shared top-k (ops.select._topk_values): the k highest priorities of a row, indices ascending, ties to
the lower block, -1 padded, against a stable sort (its bitwise search stops early once exactly k keys remain)."""

from __future__ import annotations

import pytest
import torch

from cab_vllm.ops._triton import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")

if HAS_TRITON:
    import triton
    import triton.language as tl

    from cab_vllm.ops import select as sel

    @triton.jit
    def _rows_topk_kernel(sc_ptr, keep_ptr, idx_ptr, cnt_ptr, n, kmax, MPAD: tl.constexpr, KPAD: tl.constexpr):
        row = tl.program_id(0)
        jj = tl.arange(0, MPAD)
        sc = tl.load(sc_ptr + row * n + jj, mask=jj < n, other=float("-inf"))
        sel._topk_values(sc, jj, tl.load(keep_ptr + row), idx_ptr + row * kmax, cnt_ptr + row, kmax, KPAD)


def topk_rows(scores: torch.Tensor, keep: torch.Tensor, kmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, n = scores.shape
    mpad = triton.next_power_of_2(n)
    idx = torch.full((rows, kmax), -7, dtype=torch.int32, device=scores.device)
    cnt = torch.full((rows,), -7, dtype=torch.int32, device=scores.device)
    _rows_topk_kernel[(rows,)](scores.contiguous(), keep.to(torch.int32).contiguous(), idx, cnt, n, kmax,
                               MPAD=mpad, KPAD=triton.next_power_of_2(kmax))
    return idx, cnt


def reference(scores: torch.Tensor, keep: torch.Tensor, kmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A stable descending sort (ties keep the lower index first): the first k, ascending, -1 padded."""
    rows, n = scores.shape
    idx = torch.full((rows, kmax), -1, dtype=torch.int32)
    cnt = torch.zeros(rows, dtype=torch.int32)
    for r in range(rows):
        k = min(int(keep[r]), n)
        order = torch.sort(scores[r].cpu(), descending=True, stable=True).indices[:k]
        chosen = torch.sort(order).values
        idx[r, :k] = chosen.to(torch.int32)
        cnt[r] = k
    return idx, cnt


def rows_of_every_kind(n: int, rows: int, gen: torch.Generator) -> torch.Tensor:
    """Random rows, rows of few distinct values (many ties), forced (+inf) blocks, a causal tail of -inf,
    negative and zero scores, values that differ only in their last bits."""
    out = []
    for r in range(rows):
        kind = r % 6
        if kind == 0:
            x = torch.rand(n, generator=gen)
        elif kind == 1:
            x = torch.randint(0, 4, (n,), generator=gen).float()
        elif kind == 2:
            x = torch.rand(n, generator=gen)
            x[torch.randperm(n, generator=gen)[: max(1, n // 8)]] = float("inf")
        elif kind == 3:
            x = torch.randn(n, generator=gen)
            x[int(torch.randint(1, n + 1, (1,), generator=gen)):] = float("-inf")
        elif kind == 4:
            x = 1.0 + torch.randint(0, 3, (n,), generator=gen).float() * 2.0 ** -22
        else:
            x = torch.rand(n, generator=gen) * 1e-30
            x[torch.randperm(n, generator=gen)[: n // 3]] = 0.0
        out.append(x)
    return torch.stack(out)


@pytest.mark.parametrize("n", [1, 7, 64, 200])
def test_topk_values_equals_a_stable_sort(n, device):
    gen = torch.Generator().manual_seed(n * 31)
    scores = rows_of_every_kind(n, 12, gen)
    kmax = max(1, n // 2 + 1)
    keep = torch.randint(0, kmax + 1, (scores.shape[0],), generator=gen)
    keep[0], keep[1] = 0, kmax  # nothing, and the widest row
    got_idx, got_cnt = topk_rows(scores.to(device), keep.to(device), kmax)
    want_idx, want_cnt = reference(scores, keep, kmax)
    assert torch.equal(got_cnt.cpu(), want_cnt)
    assert torch.equal(got_idx.cpu(), want_idx)


def test_topk_values_on_fresh_rows_of_awkward_widths(device):
    """Fresh random rows of widths that are not powers of two, wider ones than above."""
    gen = torch.Generator().manual_seed(5)
    for n in (3, 100, 1000):
        scores = rows_of_every_kind(n, 18, gen)
        kmax = n // 3 + 1
        keep = torch.randint(0, kmax + 1, (scores.shape[0],), generator=gen)
        got_idx, got_cnt = topk_rows(scores.to(device), keep.to(device), kmax)
        want_idx, want_cnt = reference(scores, keep, kmax)
        assert torch.equal(got_cnt.cpu(), want_cnt), n
        assert torch.equal(got_idx.cpu(), want_idx), n
