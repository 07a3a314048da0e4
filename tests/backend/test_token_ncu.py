"""benchmarks/gpu/token_ncu.py (the token decode's launches for Nsight Compute, on a GPU): its arguments are checked
before anything runs, and without CUDA it says so."""

from __future__ import annotations

import pytest
import torch

from conftest import load_script


@pytest.mark.parametrize("argv, msg", [(["--n", "0"], "--n 0 and --rows 1 must be >= 1"),
                                       (["--rows", "0"], "--rows 0 must be >= 1"),
                                       (["--sparsity", "1.0"], "--sparsity 1.0 in \\[0, 1\\)")])
def test_bad_arguments_are_named(argv, msg):
    with pytest.raises(SystemExit, match=msg):
        load_script("benchmarks/gpu/token_ncu.py").main(argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without CUDA gets")
def test_no_cuda_is_said():
    with pytest.raises(SystemExit, match="no CUDA device here"):
        load_script("benchmarks/gpu/token_ncu.py").main(["--n", "1024"])
