"""benchmarks/gpu/fa_prefill_profile.py (the sparse prefill through FlashAttention, timed on the GPU): its random
selections are what CAB's policies keep (ascending, the sink and the query's own block always, CAB's per-row
budget), so FlashAttention's bottom-right causal mask applies; without a GPU it stops with a clear message."""

from __future__ import annotations

import pytest
import torch

from conftest import load_script
from cab_vllm.config import CABConfig


@pytest.fixture(scope="module")
def fp():
    return load_script("benchmarks/gpu/fa_prefill_profile.py")


@pytest.mark.parametrize("m, sparsity", [(1, 0.95), (40, 0.9), (97, 0.99), (130, 0.5)])
def test_selections_are_what_cab_keeps(fp, m, sparsity):
    idx, cnt = fp.selection(m, sparsity, torch.Generator().manual_seed(m), "cpu")
    want = torch.minimum(CABConfig(sparsity=sparsity).keep_counts(m).clamp(min=1), torch.arange(1, m + 1))
    assert idx.shape[:2] == (m, fp.HKV) and idx.dtype == cnt.dtype == torch.int32
    assert torch.equal(cnt, want[:, None].expand(m, fp.HKV).to(torch.int32))
    for b in range(m):
        for h in range(fp.HKV):
            row = idx[b, h, : cnt[b, h]].tolist()
            assert row == sorted(set(row)) and row[0] == 0 and row[-1] == b, (b, h, row)
            assert (idx[b, h, cnt[b, h]:] == -1).all()


def test_main_needs_a_gpu(fp, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        monkeypatch.setattr("sys.argv", ["fa_prefill_profile.py", "--n", "1024"])
        fp.main()


@pytest.mark.parametrize("args, size", [(["--n", "1000"], 64), (["--chunk", "100"], 64), (["--n", "0"], 64),
                                        (["--block", "128", "--n", "4096", "--chunk", "192"], 128)])
def test_main_refuses_lengths_that_are_not_whole_blocks(fp, monkeypatch, capsys, args, size):
    monkeypatch.setattr("sys.argv", ["fa_prefill_profile.py", *args])
    with pytest.raises(SystemExit):
        fp.main()
    assert f"positive multiples of {size}" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--block", "96"], ["--block", "8", "--page", "8"],
                                  ["--block", "64", "--page", "128"], ["--block", "128", "--page", "48"],
                                  ["--page", "0"]])
def test_main_refuses_blocks_that_pages_do_not_tile(fp, monkeypatch, capsys, args):
    monkeypatch.setattr("sys.argv", ["fa_prefill_profile.py", *args])
    with pytest.raises(SystemExit):
        fp.main()
    assert "must be a power of two >= 16 and a multiple of --page" in capsys.readouterr().err
