"""ops.curvature: Forman-style curvature F = 4A - D_i - D_j + 3 A.A of causal block graphs."""

from __future__ import annotations

import pytest
import torch

from cab_vllm.ops.curvature import curvature
from cab_vllm.ops.reference import causal_block_mask


def random_causal_graph(lead: tuple[int, ...], m: int, seed: int = 0) -> torch.Tensor:
    """Row-stochastic causal graph [*lead, M, M] (zero above the diagonal), with some exact zeros below it."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(*lead, m, m, generator=gen) * 2
    z = z.masked_fill(torch.rand(*lead, m, m, generator=gen) < 0.2, float("-inf"))
    z[..., torch.arange(m), torch.arange(m)] = 0.0  # the diagonal stays finite: every row has mass
    z = z.masked_fill(~causal_block_mask(m), float("-inf"))
    return torch.softmax(z, -1)


@pytest.mark.parametrize("lead", [(1,), (2, 3)], ids=["1graph", "2x3graphs"])
@pytest.mark.parametrize("m", [1, 5, 37, 130], ids=lambda m: f"M{m}")
def test_triton_matches_torch(m, lead, device):
    a = random_causal_graph(lead, m, seed=m).to(device)
    got = curvature(a, impl="triton")
    want = curvature(a, impl="torch")
    assert got.shape == a.shape and got.dtype == torch.float32
    causal = causal_block_mask(m, device)
    # +inf exactly above the diagonal, finite on and below it, in both implementations
    for f in (got, want):
        assert torch.isposinf(f[..., ~causal]).all()
        assert torch.isfinite(f[..., causal]).all()
    torch.testing.assert_close(got[..., causal], want[..., causal], rtol=1e-5, atol=1e-5)


def test_float64_brute_force(device):
    a = random_causal_graph((2,), 37, seed=1).double()
    m = a.shape[-1]
    f = curvature(a.float().to(device), impl="triton").cpu().double()
    for b in range(2):
        for i in range(0, m, 5):
            for j in range(i + 1):
                two_hop = sum(float(a[b, i, k] * a[b, k, j]) for k in range(j, i + 1))
                want = 4 * float(a[b, i, j]) - float(a[b, i].sum()) - float(a[b, :, j].sum()) + 3 * two_hop
                assert abs(float(f[b, i, j]) - want) < 1e-5, (b, i, j)


# A by hand:            row sums D_i = 1, 1, 1;  column sums D_j = 1.7, 0.8, 0.5
#   [1.0 0.0 0.0]       A.A = [1.00 0.00 0.00]
#   [0.5 0.5 0.0]             [0.75 0.25 0.00]
#   [0.2 0.3 0.5]             [0.45 0.30 0.25]
# F[i, j] = 4 A - D_i - D_j + 3 A.A, e.g. F[2, 0] = 0.8 - 1 - 1.7 + 1.35 = -0.55
HAND_A = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]
HAND_F = [[4.3, None, None], [1.55, 0.95, None], [-0.55, 0.3, 1.25]]


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_hand_computed_3x3(impl, device):
    f = curvature(torch.tensor(HAND_A, device=device), impl=impl).cpu()
    for i in range(3):
        for j in range(3):
            if HAND_F[i][j] is None:
                assert f[i, j] == float("inf")
            else:
                assert abs(float(f[i, j]) - HAND_F[i][j]) < 1e-6, (i, j)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_degrees_are_row_and_column_sums(impl, device):
    """Not row-stochastic: scaling row 2 by 2 changes D_2 (row sum) and every D_j (column sums)."""
    a = torch.tensor(HAND_A)
    a[2] *= 2  # row 2: [0.4, 0.6, 1.0], D_2 = 2; column sums 1.9, 1.1, 1.0
    f = curvature(a.to(device), impl=impl).cpu()
    # F[2, 0] = 4 * 0.4 - 2 - 1.9 + 3 * (A20 A00 + A21 A10 + A22 A20) = 1.6 - 3.9 + 3 * (0.4 + 0.3 + 0.4) = 1.0
    assert abs(float(f[2, 0]) - 1.0) < 1e-6
    # F[1, 1] = 4 * 0.5 - 1 - 1.1 + 3 * (0.5 * 0.5) = 0.65
    assert abs(float(f[1, 1]) - 0.65) < 1e-6


def test_rejects_non_square():
    with pytest.raises(ValueError):
        curvature(torch.zeros(3, 4))
