"""benchmarks/gpu/prefill_profile.py (the chunked-prefill profile for the GPU) runs the backend's per-chunk path:
at sparsity 0 its output is causal attention, and it times each phase in the chunks that run it."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import load_script
from cab_vllm.backend.attention import KeySummaries
from cab_vllm.config import CABConfig


@pytest.fixture(scope="module")
def pp():
    return load_script("benchmarks/gpu/prefill_profile.py")


@pytest.mark.parametrize("n, chunk, block, page", [(1000, 256, 64, 16), (640, 640, 64, 16), (1000, 256, 128, 32),
                                                   (700, 384, 128, 128)])
def test_chunked_pass_is_causal_attention_at_sparsity_zero(pp, n, chunk, block, page):
    hq, hkv, d = 4, 2, 32
    q, kc, vc, bt = pp.setup(n, hq, hkv, d, page, "cpu", torch.float32, seed=3)
    cfg = CABConfig(sparsity=0.0, block_size=block)  # cab's path with every block kept (not the dense shortcut)
    store = KeySummaries(1, hkv, math.ceil(n / block), d, cfg.estimator, torch.float32, torch.device("cpu"))
    out = pp.prompt_pass(q, kc, vc, bt, n, chunk, cfg, store, "torch")
    pos = torch.arange(n)
    pages = bt[0].long()[pos // page]
    k, v = kc[pages, pos % page], vc[pages, pos % page]  # [n, Hkv, D]
    rep = hq // hkv
    want = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1).repeat_interleave(rep, 0),
                                          v.transpose(0, 1).repeat_interleave(rep, 0), is_causal=True)
    assert torch.allclose(out, want.transpose(0, 1), atol=1e-4, rtol=1e-4)


def test_profile_times_each_phase_where_it_runs(pp):
    r = pp.profile(1000, 256, 0.5, dev="cpu", impl="torch", hq=4, hkv=2, d=32, top=100)
    assert set(r["total_ms"]) == set(pp.PHASES)
    per = r["per_chunk_ms"]
    assert all(len(v) == 4 for v in per.values())
    assert all(x > 0 for p in ("update_key_summaries", "prefill_selection", "run_prefill") for x in per[p])
    assert "prefill_selection" in r["kernels"] and "run_prefill" in r["kernels"]
    with pytest.raises(ValueError, match="multiple of the block size"):
        pp.profile(1000, 100, 0.5, dev="cpu", impl="torch", hq=4, hkv=2, d=32, kernels=False)
    with pytest.raises(ValueError, match="multiple of the block size 128"):
        pp.profile(1000, 192, 0.5, dev="cpu", impl="torch", hq=4, hkv=2, d=32, kernels=False, block_size=128)
    with pytest.raises(ValueError, match="divide the block size 64"):
        pp.profile(1000, 256, 0.5, dev="cpu", impl="torch", hq=4, hkv=2, d=32, kernels=False, fa_prefill=True,
                   page=48)


def test_kept_flops_counts_each_rows_kept_keys(pp):
    """By hand: blocks of 64, 4 query / 2 KV heads, d = 1 (4 FLOPs per row, key and query head). Chunk [0, 100):
    query block 0 (64 rows, only its own block: 2080 causal pairs per head), block 1 (36 rows: 666 own-block
    pairs; head 0 keeps one more full block: 64 x 36). Then a chunk [80, 100) that starts inside block 1."""
    kept = [(torch.tensor([[1, 1], [2, 1]]), 0, 0, 100)]
    assert pp.kept_flops(kept, 4, 1, 64) == (2 * 4 * (2080 * 2 + 64 * 36 + 666 * 2), 4 * 4 * 5050)
    assert pp.kept_flops([(torch.tensor([[1, 2]]), 1, 80, 100)], 4, 1, 64) == (
        2 * 4 * (530 * 2 + 64 * 20), 4 * 4 * sum(range(81, 101)))
    # bytes, 2 per value, d = 1: query block 0 reads 64 keys per head (K and V: 512 B for both heads) and its 64 rows'
    # queries and outputs for 2 heads of each group (1024 B); block 1 reads 100 and 36 keys (400 + 144 B) and 36 rows
    # (576 B); a chunk [80, 100) inside block 1: 20 rows, keys 36 + 64 and 36 + 0
    assert pp.kept_bytes(kept, 4, 1, 64) == 512 + 1024 + 400 + 144 + 576
    inside = [(torch.tensor([[1, 2]]), 1, 80, 100)]
    assert pp.kept_bytes(inside, 4, 1, 64, elem=4) == 4 * (2 * (36 + 100) + 2 * 2 * 20 * 2)
    assert pp.peak_tbps("NVIDIA H200") == 4.8 and pp.peak_tbps("NVIDIA H100 80GB HBM3") == 3.35
    full = pp.profile(700, 256, 0.0, dev="cpu", impl="torch", hq=4, hkv=2, d=16, kernels=False)
    assert full["density"] == 1.0 and full["kept_flops"] == 4 * 4 * 16 * 700 * 701 / 2
    assert full["kept_bytes"] == pp.kept_bytes([(torch.tensor([[b + 1] * 2 for b in range(4)]), 0, 0, 256),
                                                (torch.tensor([[b + 1] * 2 for b in range(4, 8)]), 4, 256, 512),
                                                (torch.tensor([[b + 1] * 2 for b in range(8, 11)]), 8, 512, 700)],
                                               4, 16, 64, elem=4)
    sparse = pp.profile(700, 256, 0.9, dev="cpu", impl="torch", hq=4, hkv=2, d=16, kernels=False)
    assert 0 < sparse["density"] < 0.5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("policy", ["cab", "magnitude", "streaming"])
def test_chunked_prefill_path_never_synchronizes_the_stream(pp, policy, fused, monkeypatch):
    """No host sync in a layer's prefill (summaries, exact rows, selection, attention): each one would drain the
    GPU's queue mid-layer, for every chunk of every layer."""
    r = pp.profile(32768, 8192, 0.95, policy=policy, dev="cuda", impl="triton", kernels=False, fused=fused,
                   fa_prefill=fused and importlib.util.find_spec("vllm") is not None)
    assert r["syncs"] == {p: 0 for p in pp.PHASES}, r["syncs"]


class HostReads:
    """Records the calls that read a tensor's value on the host (each one a stream sync on CUDA) made from the
    backend's code (cab_vllm/, its PyTorch twins in ops/reference.py excepted): a CPU stand-in for
    torch.cuda.set_sync_debug_mode. Host-only arithmetic reads its tensors through .numpy(), which a CUDA tensor
    refuses, so it is not counted."""

    METHODS = ("item", "tolist", "__int__", "__float__", "__bool__")

    def __init__(self, monkeypatch):
        import sys

        self.calls: list[str] = []
        for name in self.METHODS:
            orig = getattr(torch.Tensor, name)

            def wrapped(t, *a, _orig=orig, _name=name, **kw):
                f = sys._getframe(1)
                path = f.f_code.co_filename.replace("\\", "/")
                if "/cab_vllm/" in path and not path.endswith("ops/reference.py"):
                    self.calls.append(f"{_name} at {path.split('/cab_vllm/')[-1]}:{f.f_lineno} ({f.f_code.co_name})")
                return _orig(t, *a, **kw)

            monkeypatch.setattr(torch.Tensor, name, wrapped)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("policy", ["cab", "magnitude", "streaming", "cab:adaptive"])
def test_chunked_prefill_path_reads_no_tensor_on_the_host(pp, policy, fused, monkeypatch):
    """The CPU side of the GPU test above: the kernel path (Triton, interpreted here) of every chunk reads no
    tensor value on the host (which on CUDA waits for the GPU's queue to drain)."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set by conftest when there is no GPU)")
    n, hq, hkv, d = 700, 4, 2, 32
    name, _, budget = policy.partition(":")
    cfg = CABConfig(sparsity=0.7, policy=name, budget="adaptive" if budget else "fixed")
    q, kc, vc, bt = pp.setup(n, hq, hkv, d, 16, "cpu", torch.float32, seed=1)
    store = KeySummaries(1, hkv, math.ceil(n / 64), d, cfg.estimator, torch.float32, torch.device("cpu"))
    reads = HostReads(monkeypatch)
    out = pp.prompt_pass(q, kc, vc, bt, n, 256, cfg, store, "triton", sel_impl="triton", fused=fused)
    assert not torch.isnan(out).any()
    assert reads.calls == []
    from cab_vllm.ops.select import select_topk

    select_topk(torch.randn(3, 4), torch.tensor([1, 2, 2]))  # the guard sees a sync-prone read (no width given)
    assert reads.calls and reads.calls[0].startswith("__int__ at ops/select.py")


def test_flash_attention_prefill_reads_no_tensor_on_the_host(pp, monkeypatch):
    """The chunked prefill with the sparse attention in FlashAttention's paged varlen call (its PyTorch twin here):
    building its tables reads no tensor value on the host either, and the output is the Triton kernel's."""
    import os

    from conftest import varlen_twin

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set by conftest when there is no GPU)")
    n, hq, hkv, d = 700, 4, 2, 32
    cfg = CABConfig(sparsity=0.7)
    q, kc, vc, bt = pp.setup(n, hq, hkv, d, 16, "cpu", torch.float16, seed=1)
    outs = []
    for fa in (None, (varlen_twin, 3)):
        store = KeySummaries(1, hkv, math.ceil(n / 64), d, cfg.estimator, torch.float16, torch.device("cpu"))
        reads = HostReads(monkeypatch)
        outs.append(pp.prompt_pass(q, kc, vc, bt, n, 256, cfg, store, "triton", sel_impl="triton", fused=True, fa=fa))
        assert reads.calls == []
        monkeypatch.undo()
    assert not torch.isnan(outs[1]).any()
    assert float((outs[1].float() - outs[0].float()).norm() / outs[0].float().norm()) < 2e-3


@pytest.mark.parametrize("policy", ["cab", "magnitude"])
def test_fused_selection_gives_the_chunked_prefill_the_same_output(pp, policy, monkeypatch):
    """CAB_FUSED_SELECT: every chunk (kept summaries, exact rows in the last) selects the same blocks, so the
    prompt's attention output is the same."""
    import os

    import cab_vllm.backend.attention as attention

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set by conftest when there is no GPU)")
    n, hq, hkv, d = 1100, 4, 2, 32
    cfg = CABConfig(sparsity=0.8, policy=policy)
    q, kc, vc, bt = pp.setup(n, hq, hkv, d, 16, "cpu", torch.float32, seed=2)
    outs, sels = [], []
    real = attention.prefill_selection
    for fused in (False, True):
        got = []
        monkeypatch.setattr(pp, "prefill_selection", lambda *a, **kw: got.append(real(*a, **kw)) or got[-1])
        store = KeySummaries(1, hkv, math.ceil(n / 64), d, cfg.estimator, torch.float32, torch.device("cpu"))
        outs.append(pp.prompt_pass(q, kc, vc, bt, n, 256, cfg, store, "triton", sel_impl="triton", fused=fused))
        sels.append(got)
    assert len(sels[0]) == len(sels[1]) == 5
    for (i0, c0, f0), (i1, c1, f1) in zip(*sels):
        assert f0 == f1 and torch.equal(c0, c1) and torch.equal(i0, i1)
    assert torch.equal(outs[0], outs[1])


def test_profile_main_runs_each_fused_select_variant(pp, monkeypatch, capsys):
    """--tile-rows and --key-tile lists: one profile per variant and sparsity, labelled with the fused predictor's settings
    when it runs (--fused-select 0 here, the unfused path: the labels stay off)."""
    from cab_vllm.ops import fused_select as fs

    for name in ("TILE_ROWS", "KEY_TILE", "KEY_SPLIT"):
        monkeypatch.setattr(fs, name, getattr(fs, name))
    pp.main(["--n", "1000", "--chunk", "256", "--sparsities", "0.5,0.8", "--device", "cpu", "--impl", "torch",
             "--heads", "4,2,32", "--no-kernels", "--fused-select", "0", "--tile-rows", "16,32", "--key-tile", "32,64",
             "--key-split", "128,256"])
    heads = [line for line in capsys.readouterr().out.splitlines() if line.startswith("==")]
    assert len(heads) == 16 and not any("tile_rows" in h or "pool_warps" in h for h in heads)
    assert (fs.TILE_ROWS, fs.KEY_TILE, fs.KEY_SPLIT) == (32, 64, 256)  # the last variant's


def test_profile_main_sweeps_the_pooling_warps(pp, monkeypatch, capsys):
    """--pool-warps: one profile per value, labelled, the module's setting left at the last one; the pooling
    launches take their warps from it (the Triton path, interpreted here), with the same features whatever the
    warps."""
    from cab_vllm.ops import coarsen

    monkeypatch.setattr(coarsen, "POOL_WARPS", coarsen.POOL_WARPS)
    monkeypatch.setattr(coarsen, "POOL_BOUNDS_WARPS", coarsen.POOL_BOUNDS_WARPS)
    seen = []
    real = coarsen._pool_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append(kw["num_warps"])
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(coarsen, "_pool_kernel", Spy())
    pp.main(["--n", "300", "--chunk", "128", "--sparsities", "0.5", "--device", "cpu", "--impl", "triton",
             "--heads", "4,2,16", "--no-kernels", "--pool-warps", "2,8", "--pool-bounds-warps", "4"])
    heads = [line for line in capsys.readouterr().out.splitlines() if line.startswith("==")]
    assert [h.split(" pool_warps=")[1].split()[0] for h in heads] == ["2", "8"] and coarsen.POOL_WARPS == 8
    assert all(" pool_bounds_warps=4 " in h for h in heads) and coarsen.POOL_BOUNDS_WARPS == 4
    k = torch.randn(1, 2, 130, 16, generator=torch.Generator().manual_seed(1))
    coarsen.key_summary(k, 64, "bounds", impl="triton")  # the keys' bounds: their own warps
    assert seen[-1] == 4
    from cab_vllm.ops import fused_select as fs  # the fused predictor's settings label the run that reads them

    assert all(f"logits_warps={fs.LOGITS_WARPS} " in h and f"select_warps={fs.SELECT_WARPS} " in h for h in heads)
    q = torch.randn(1, 4, 130, 16, generator=torch.Generator().manual_seed(0))
    feats = []
    for warps in (2, 8):
        coarsen.POOL_WARPS = warps
        feats.append(coarsen.query_features(q, 64, "bounds", impl="triton"))
        assert seen[-1] == warps
    assert torch.equal(feats[0], feats[1])


def test_profile_main_sweeps_the_flash_attention_streams_and_prints_the_floor(pp, monkeypatch, capsys):
    """--fa-streams sets ops.fa_prefill.FA_STREAMS for each run and labels only runs that read it (the FlashAttention
    prefill, not CAB's Triton kernel here); every run prints the kept FLOPs against the floor."""
    from cab_vllm.ops import fa_prefill

    monkeypatch.setattr(fa_prefill, "FA_STREAMS", fa_prefill.FA_STREAMS)
    pp.main(["--n", "300", "--chunk", "128", "--sparsities", "0.5", "--device", "cpu", "--impl", "torch",
             "--heads", "4,2,16", "--no-kernels", "--fa-streams", "1,3", "--fa-prefill", "0"])
    out = capsys.readouterr().out.splitlines()
    heads = [line for line in out if line.startswith("==")]
    assert len(heads) == 2 and not any("fa_streams" in h for h in heads) and fa_prefill.FA_STREAMS == 3
    assert sum(line.startswith("sparse attention: ") and "TFLOP kept (density 0." in line for line in out) == 2
