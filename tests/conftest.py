"""Shared test plumbing: Triton runs interpreted when there is no GPU; device fixture; paged-cache builders and
float64 oracles.

TRITON_INTERPRET must be set before cab_vllm (or any @triton.jit module) is imported, so this file sets it at
import time and imports nothing from cab_vllm at module level.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist (-n N): each worker takes its share of the cores, so N workers do not run N x cores torch threads
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@contextlib.contextmanager
def environ_restored():
    """Put the whole os.environ back on exit, whatever the code inside set or removed (monkeypatch only restores the
    variables it was asked about; code such as cab-serve's parser sets others)."""
    before = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(before)


@pytest.fixture(autouse=True)
def _cab_env_restored():
    """The CAB_* variables are the engine defaults every backend test reads: whatever a test sets in os.environ
    (directly, or through code such as cab-serve's parser) is put back afterwards, so no test's outcome depends on
    which tests ran before it in the same process (pytest-xdist workers run them in any order)."""
    before = {k: v for k, v in os.environ.items() if k.startswith("CAB_")}
    yield
    for k in [k for k in os.environ if k.startswith("CAB_") and k not in before]:
        del os.environ[k]
    os.environ.update(before)


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of a against b, computed in float64 on the CPU."""
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


# dtype -> relative tolerance of an attention output / estimate against a float64 oracle
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}

# Tolerance of fp32 kernel results: exact-ish fp32 on the CPU interpreter; on a GPU the kernels' fp32 tl.dot
# and the estimators' matmuls run on TF32 tensor cores (10-bit mantissa, ~5e-4 relative).
KERNEL_FP32_TOL = 1e-5 if not torch.cuda.is_available() else 3e-3
# Base-2 log-sum-exp of an fp32 kernel against the float64 oracle: the GPU's fp32 dots run in TF32.
LSE_ATOL = 1e-4 if KERNEL_FP32_TOL < 1e-4 else 1e-2

LAYOUTS = ("plain", "kv_pair", "kv_interleaved", "head_major")


def make_paged_cache(k: list[torch.Tensor] | torch.Tensor, v: list[torch.Tensor] | torch.Tensor, page_size: int,
                     layout: str = "plain", extra_pages: int = 3, seed: int = 0, num_pages: int | None = None,
                     high_ids: bool = False):
    """Scatter contiguous per-sequence K/V into a vLLM-layout paged cache.

    k, v: a list of S tensors [Hkv, n_s, D] (or one [S, Hkv, N, D] tensor: every sequence has N tokens).
    Page 0 is the reserved null page, the others are assigned through a random permutation; every slot that
    holds no token (null page, unused pages, the tail of a sequence's last page) is NaN.
    layout: 'plain'      key_cache, value_cache are separate contiguous [num_pages, page_size, Hkv, D];
            'kv_pair'    both are views kv[0], kv[1] of one [2, num_pages, page_size, Hkv, D] tensor (vLLM's
                         FlashAttention layout: one storage, values at an offset);
            'kv_interleaved'  views kv[:, 0], kv[:, 1] of one [num_pages, 2, page_size, Hkv, D] tensor
                         (non-contiguous: the page stride is twice a page);
            'head_major' allocated [num_pages, Hkv, page_size, D] and transposed to [.., page_size, Hkv, D].
    num_pages: total pages (default: just enough plus ``extra_pages``); high_ids: draw the pages from the top
    of the id range (exercises large page offsets).
    Returns (key_cache, value_cache, block_table [S, max_pages] int32); unused table entries are 0.
    """
    if isinstance(k, torch.Tensor):
        k, v = list(k.unbind(0)), list(v.unbind(0))
    hkv, d = k[0].shape[0], k[0].shape[-1]
    dtype, dev = k[0].dtype, k[0].device
    pages_per = [-(-x.shape[1] // page_size) for x in k]
    need = sum(pages_per)
    total = num_pages if num_pages is not None else 1 + need + extra_pages
    assert total >= 1 + need, "cache too small"
    gen = torch.Generator().manual_seed(seed)
    if high_ids:
        pool_ids = torch.arange(total - need, total)[torch.randperm(need, generator=gen)]
    else:
        pool_ids = torch.randperm(total - 1, generator=gen)[:need] + 1
    shape = (total, page_size, hkv, d)
    # every slot not holding a token is NaN: a kernel that reads past seq_len or through a null table
    # entry poisons its output instead of silently adding garbage
    if layout == "plain":
        kc = torch.full(shape, float("nan"), dtype=dtype, device=dev)
        vc = torch.full(shape, float("nan"), dtype=dtype, device=dev)
    elif layout == "kv_pair":
        kv = torch.full((2, *shape), float("nan"), dtype=dtype, device=dev)
        kc, vc = kv[0], kv[1]
    elif layout == "kv_interleaved":
        kv = torch.full((total, 2, *shape[1:]), float("nan"), dtype=dtype, device=dev)
        kc, vc = kv[:, 0], kv[:, 1]
    elif layout == "head_major":
        kc = torch.full((total, hkv, page_size, d), float("nan"), dtype=dtype, device=dev).transpose(1, 2)
        vc = torch.full((total, hkv, page_size, d), float("nan"), dtype=dtype, device=dev).transpose(1, 2)
    else:
        raise ValueError(f"unknown layout {layout!r}: expected one of {LAYOUTS}")
    block_table = torch.zeros(len(k), max(pages_per), dtype=torch.int32)
    off = 0
    for s, (ks, vs) in enumerate(zip(k, v)):
        n = ks.shape[1]
        ids = pool_ids[off: off + pages_per[s]]
        off += pages_per[s]
        block_table[s, : len(ids)] = ids.to(torch.int32)
        pos = torch.arange(n)
        pages = ids[pos // page_size].to(dev)
        kc[pages, (pos % page_size).to(dev)] = ks.transpose(0, 1).to(dtype)
        vc[pages, (pos % page_size).to(dev)] = vs.transpose(0, 1).to(dtype)
    return kc, vc, block_table.to(dev)


def load_script(relpath: str):
    """A script of this repository (benchmarks/..., not a package) imported as a module from its path."""
    path = Path(__file__).resolve().parents[1] / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def skip_if_interpreted_bf16_dot(dtype: torch.dtype) -> None:
    """Triton 3.9's interpreter computes tl.dot on bfloat16 operands on their raw uint16 bit patterns
    (interpreter.py create_dot: np.matmul of the storage view), so bf16 kernels that use tl.dot can only be
    checked on a GPU. fp16 covers the half-precision path on CPU."""
    if dtype == torch.bfloat16 and interpreting():
        pytest.skip("Triton interpreter: tl.dot on bf16 multiplies raw bit patterns (GPU-only check)")


def block_mask_of(indices: torch.Tensor, counts: torch.Tensor, num_k_blocks: int) -> torch.Tensor:
    """indices [..., K] (-1 padded), counts [...] -> bool [..., num_k_blocks] on the CPU; written independently
    of the library (a Python loop) so it can serve as an oracle."""
    flat_i = indices.reshape(-1, indices.shape[-1]).tolist()
    flat_c = counts.reshape(-1).tolist()
    out = torch.zeros(len(flat_c), num_k_blocks, dtype=torch.bool)
    for r, (row, c) in enumerate(zip(flat_i, flat_c)):
        for j in row[:c]:
            out[r, j] = True
    return out.view(*counts.shape, num_k_blocks)


def masked_attention_oracle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 attention with an explicit mask: q [Hq, nq, D], k/v [Hkv, nk, D], allowed [Hq, nq, nk] bool.

    Returns (out [Hq, nq, D] float64, lse [Hq, nq] float64) on the CPU; a row with no allowed key gives 0, -inf.
    """
    q, k, v, allowed = q.cpu(), k.cpu(), v.cpu(), allowed.cpu()
    g = q.shape[0] // k.shape[0]
    kx = k.double().repeat_interleave(g, 0)
    vx = v.double().repeat_interleave(g, 0)
    s = (q.double() @ kx.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.nan_to_num(neginf=0.0)[..., None]).masked_fill(~allowed, 0.0)
    return p @ vx, lse


def make_varlen_batch(specs: list[tuple[int, int]], hq: int, hkv: int, d: int, dtype: torch.dtype, seed: int = 0,
                      device: str = "cpu"):
    """Sequences given as (seq_len, q_len): the last q_len of seq_len tokens are new (q_len < seq_len is a
    chunked prefill over a cached prefix; q_len = 1 a decode row). Returns a dict with per-sequence contiguous
    k, v [Hkv, seq_len, D] and q [Hq, q_len, D], the packed q [T, Hq, D], query_start_loc and seq_lens (int32).
    """
    gen = torch.Generator().manual_seed(seed)
    ks = [torch.randn(hkv, n, d, generator=gen).to(device, dtype) for n, _ in specs]
    vs = [torch.randn(hkv, n, d, generator=gen).to(device, dtype) for n, _ in specs]
    qs = [torch.randn(hq, ql, d, generator=gen).to(device, dtype) for _, ql in specs]
    qsl = [0]
    for _, ql in specs:
        qsl.append(qsl[-1] + ql)
    return dict(k=ks, v=vs, q=qs, q_packed=torch.cat([x.transpose(0, 1) for x in qs]),
                query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
                seq_lens=torch.tensor([n for n, _ in specs], dtype=torch.int32, device=device))


def random_block_subset(gen: torch.Generator, mb: int, kmax: int, empty_prob: float = 0.1) -> list[int]:
    """A random ascending subset of key blocks 0..mb (usually with the diagonal), at most kmax long; empty with
    probability empty_prob."""
    if torch.rand(1, generator=gen).item() < empty_prob:
        return []
    c = int(torch.randint(1, min(kmax, mb + 1) + 1, (1,), generator=gen))
    pick = torch.randperm(mb + 1, generator=gen)[:c].tolist()
    if mb not in pick and torch.rand(1, generator=gen).item() < 0.8:
        pick[-1] = mb
    return sorted(pick)


def pack_selection(rows: list[list[list[int]]], kmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rows[r][h] = ascending block list -> (indices [R, H, kmax] int32 -1 padded, counts [R, H] int32)."""
    idx = torch.full((len(rows), len(rows[0]), kmax), -1, dtype=torch.int32)
    cnt = torch.zeros(len(rows), len(rows[0]), dtype=torch.int32)
    for r, per_head in enumerate(rows):
        for h, blocks in enumerate(per_head):
            idx[r, h, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
            cnt[r, h] = len(blocks)
    return idx, cnt


def assert_same_selection(idx: torch.Tensor, cnt: torch.Tensor, want_idx: torch.Tensor, want_cnt: torch.Tensor,
                          score: torch.Tensor | None = None, atol: float = 0.0) -> None:
    """Two selections of the same rows (indices [..., K] -1 padded, counts [...]) are equal: counts and shapes
    exactly; indices exactly, except (when ``score`` [..., M], the reference's priorities, is given) in rows
    whose differently picked blocks have scores within ``atol`` of each other: near-ties of an estimate
    computed in another order. Compared as sorted score lists per row, so a real difference fails."""
    assert idx.shape == want_idx.shape, (idx.shape, want_idx.shape)
    assert torch.equal(cnt.cpu(), want_cnt.cpu()), "counts differ"
    if score is None or torch.equal(idx.cpu(), want_idx.cpu()):
        assert torch.equal(idx.cpu(), want_idx.cpu()), "indices differ"
        return
    m = score.shape[-1]
    got = block_mask_of(idx, cnt, m).reshape(-1, m)
    want = block_mask_of(want_idx, want_cnt, m).reshape(-1, m)
    s = score.detach().cpu().double().reshape(-1, m)
    assert s.shape[0] == got.shape[0], "score rows differ from the selection's rows"
    for r in (got != want).any(-1).nonzero().flatten().tolist():
        a, b = s[r][got[r]].sort().values, s[r][want[r]].sort().values
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=lambda e: f"row {r} picks other blocks: {e}")


def varlen_twin(*, q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, seqused_k, softmax_scale, causal, block_table,
                out, fa_version, num_splits=0):
    """flash_attn_varlen_func's paged call in PyTorch (float32 math): sequence i is q[cu[i]:cu[i+1]] [L, H, D]
    against the first seqused_k[i] keys of the pages block_table[i] lists ([pages, page_size, Hk, D] caches),
    causal aligned bottom-right (query l sees keys 0 .. used - L + l), H / Hk query heads per key head."""
    assert causal and fa_version in (2, 3) and isinstance(num_splits, int) and num_splits >= 0
    for t in (q, k, v, out):
        assert t.stride(-1) == 1, "FlashAttention needs a contiguous last dim"
    assert block_table.dtype == torch.int32 and seqused_k.dtype == torch.int32 and cu_seqlens_q.dtype == torch.int32
    page = k.shape[1]
    cu, used = cu_seqlens_q.tolist(), seqused_k.tolist()
    assert len(used) == len(cu) - 1 == block_table.shape[0]
    g = q.shape[1] // k.shape[2]
    for i in range(len(used)):
        a, b, n = cu[i], cu[i + 1], used[i]
        assert 0 <= b - a <= max_seqlen_q and 0 < n <= max_seqlen_k and b - a <= n
        pages = block_table[i, : -(-n // page)].long()
        assert pages.shape[0] == -(-n // page), "page table shorter than seqused_k"
        kk = k[pages].flatten(0, 1)[:n].float().repeat_interleave(g, 1)  # [n, H, D]
        vv = v[pages].flatten(0, 1)[:n].float().repeat_interleave(g, 1)
        s = torch.einsum("lhd,nhd->hln", q[a:b].float(), kk) * softmax_scale
        ok = torch.arange(n, device=q.device)[None, :] <= (n - (b - a) + torch.arange(b - a, device=q.device))[:, None]
        s = s.masked_fill(~ok[None], float("-inf"))
        out[a:b] = torch.einsum("hln,nhd->lhd", s.softmax(-1), vv).to(out.dtype)
    return out


def vllm_flash_attention() -> tuple:
    """(flash_attn_varlen_func, its FlashAttention version on this GPU: 3 on Hopper, else 2) of an installed CUDA
    vLLM, for the GPU tests of the sparse prefill through it; the test is skipped without one."""
    fa = pytest.importorskip("vllm.vllm_flash_attn")
    return fa.flash_attn_varlen_func, 3 if torch.cuda.get_device_capability()[0] == 9 else 2
