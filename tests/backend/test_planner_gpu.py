"""The backend's kernel path (attention.attend: Triton prefill tiles + split-K decode) driven with vLLM's exact
per-batch tensors (query_start_loc, seq_lens, permuted block tables with a null page 0, slot_mapping written
step by step) against attention restricted to the recorded selection (dense rows: plain causal attention).

GPU: 4k to 128k tokens, bf16, GQA 32/8, head dim 128 (no vLLM needed). CPU: the same steps at small sizes in
fp32 (Triton interpreted, and the PyTorch path)."""

from __future__ import annotations

import os

import pytest
import torch

from backend_harness import PagedSim, check_step
from cab_vllm.config import CABConfig


def _run(n_long: int, dtype, device, impl, hq=32, hkv=8, d=128, page_size=16, sparsity=0.9, seed=0,
         summary_slots=0, fa_prefill=None):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    lens = [n_long + 3, 1000 + 37, n_long // 2 + 11]  # one long prompt, a short one, a half-length one

    def mk(h, n):
        return torch.randn(h, n, d, generator=gen).to(device=device, dtype=dtype)

    q = [mk(hq, n) for n in lens]
    k = [mk(hkv, n) for n in lens]
    v = [mk(hkv, n) for n in lens]
    cfg = CABConfig(sparsity=sparsity)
    sim = PagedSim(q, k, v, page_size, cfg, seed=seed, summary_slots=summary_slots)
    tol = {torch.float32: 1e-4, torch.bfloat16: 2.5e-2, torch.float16: 5e-3}[dtype]
    c = [cfg, cfg.replace(sparsity=0.5), cfg.replace(sparsity=0.0)]
    steps = [
        # chunked prefill of the long prompt beside a whole short prompt (different sparsity)
        ([(0, lens[0] // 2), (1, lens[1] - 1)], [c[0], c[1]]),
        # decode of the short one first (vLLM order), then the rest of the long prompt, then a dense prompt
        ([(1, 1), (0, lens[0] - lens[0] // 2 - 1), (2, lens[2] - 1)], [c[1], c[0], c[2]]),
        # two decodes with different configs
        ([(0, 1), (2, 1)], [c[0], c[2]]),
    ]
    worst = 0.0
    for rows, cfgs in steps:
        out, md = sim.step(rows, cfgs=cfgs, dense_threshold=0, impl=impl, fa_prefill=fa_prefill)
        assert not torch.isnan(out).any()
        worst = max(worst, check_step(sim, out, md))
    assert worst < tol, f"worst relative error {worst:.2e} >= {tol:.0e}"


@pytest.mark.gpu
@pytest.mark.parametrize("slots", [0, 4], ids=["pool-all", "kept-summaries"])
@pytest.mark.parametrize("n", [4096, 16384, 65536, 131072], ids=lambda n: f"{n // 1024}k")
def test_backend_kernel_path_gpu(n, slots):
    _run(n, torch.bfloat16, "cuda", "triton", summary_slots=slots)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [16, 64], ids=lambda p: f"page{p}")
@pytest.mark.parametrize("n", [4096, 131072], ids=lambda n: f"{n // 1024}k")
def test_backend_kernel_path_gpu_flash_attention_prefill(n, page_size):
    """The same steps with the sparse prefill rows in vLLM's FlashAttention (ops.fa_prefill; its version on this
    GPU), the cache's unused slots NaN: FlashAttention must read no key past a sequence's kept ones."""
    from conftest import vllm_flash_attention

    _run(n, torch.bfloat16, "cuda", "triton", page_size=page_size, summary_slots=4, fa_prefill=vllm_flash_attention())


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("n", [300, 1000], ids=lambda n: f"n{n}")
def test_backend_kernel_path_cpu(n, impl):
    if impl == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set by conftest when there is no GPU)")
    _run(n, torch.float32, "cpu", impl, hq=4, hkv=2, d=64, sparsity=0.6, summary_slots=2)
