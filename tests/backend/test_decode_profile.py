"""benchmarks/gpu/decode_profile.py runs its decode step variants on CPU tensors (interpreted Triton), with the
merge's splits per load set as the script sets them (--merge-splits)."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import load_script

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="Triton on CPU tensors needs TRITON_INTERPRET=1")

def _script():
    return load_script("benchmarks/gpu/decode_profile.py")


@pytest.mark.parametrize("merge", [1, 16], ids=lambda m: f"merge{m}")
def test_decode_profile_runs_every_variant(merge, monkeypatch):
    import cab_vllm.ops.decode as decode_ops

    prof = _script()
    monkeypatch.setattr(prof, "HQ", 4)
    monkeypatch.setattr(prof, "HKV", 2)
    monkeypatch.setattr(prof, "D", 32)
    monkeypatch.setattr(decode_ops, "MERGE_SPLITS", merge)
    calls = []

    def timer(fn):
        fn()
        calls.append(1)
        return float(len(calls))

    r = prof.profile(700, 2, 0.5, dev="cpu", timer=timer, min_per=1)
    assert len(calls) == 21
    assert r["kept_blocks"] <= r["blocks"] == 11 and r["kept_tokens"] < 700
    assert [r[k] for k in ("prompt_us", "bounds_us", "skip_us", "all_us", "prompt1_us", "bounds1_us", "skip1_us",
                           "all1_us", "plain_us", "dense_us", "tokens_us", "tok_logits_us", "tok_select_us", "tok4_us",
                           "tok4_logits_us", "tok4_select_us", "tok4_encode_us", "tok8_us", "tok8_logits_us",
                           "tok8_select_us", "tok8_encode_us")] == [float(i) for i in range(1, 22)]
    r = prof.profile(700, 2, 0.5, dev="cpu", timer=timer, min_per=1, columns=("prompt1", "skip1"))
    assert len(calls) == 23 and (r["prompt1_us"], r["skip1_us"]) == (22.0, 23.0) and r["prompt_us"] is None


def test_decode_profile_takes_the_page_size(monkeypatch):
    """--page: the cache's pages hold that many tokens (64: whole key blocks, one page-table read per block)."""
    prof = _script()
    monkeypatch.setattr(prof, "HQ", 4)
    monkeypatch.setattr(prof, "HKV", 2)
    monkeypatch.setattr(prof, "D", 32)
    shapes = []

    def timer(fn):
        fn()
        return 1.0

    real = torch.randn

    def randn(*shape, **kw):
        shapes.append(shape)
        return real(*shape, **kw)

    monkeypatch.setattr(prof.torch, "randn", randn)
    r = prof.profile(700, 2, 0.5, dev="cpu", timer=timer, min_per=1, page=64, columns=("prompt1",))
    assert r["prompt1_us"] == 1.0
    assert shapes[0] == (2 * 11 + 1, 64, 2, 32)  # 11 pages of 64 tokens per row, page 0 unused
    with pytest.raises(ValueError, match="page size"):
        prof.profile(700, 2, 0.5, dev="cpu", timer=timer, page=0)


def test_kept_blocks_keep_sink_and_current_block():
    """The prompt selections decode_profile.py and fa_gather_profile.py time."""
    mod = _script()
    gen = torch.Generator().manual_seed(0)
    for m, keep in ((2048, 103), (64, 4), (3, 5), (1, 1)):
        b = mod.kept_blocks(m, keep, gen)
        assert b == sorted(set(b)) and b[0] == 0 and b[-1] == m - 1 and len(b) == min(keep, m)


def test_decode_profile_sizes_buffers_for_the_engine(monkeypatch):
    """--max-len / --engine-rows: the workspace, the prompt table and the block table are an engine's of that
    max_model_len and batch (the selection's scores as wide as its longest context, a block-table row as wide as its
    pages), whatever the context and rows timed; shorter than the context or fewer rows are refused."""
    from cab_vllm.backend import attention

    prof = _script()
    monkeypatch.setattr(prof, "HQ", 4)
    monkeypatch.setattr(prof, "HKV", 2)
    monkeypatch.setattr(prof, "D", 32)
    made = []
    real = attention.DecodeWorkspace.__init__

    def init(self, *a, **kw):
        real(self, *a, **kw)
        made.append(self.mpad)

    tables = []
    real_launch = prof.step_launch

    def launch(q, kc, vc, bt, *a, **kw):
        tables.append(tuple(bt.shape))
        return real_launch(q, kc, vc, bt, *a, **kw)

    monkeypatch.setattr(prof.DecodeWorkspace, "__init__", init)
    monkeypatch.setattr(prof, "step_launch", launch)
    r = prof.profile(700, 1, 0.5, dev="cpu", timer=lambda fn: (fn(), 1.0)[1], columns=("all1",), max_len=4096)
    assert made == [64] and r["blocks"] == 11 and r["all1_us"] == 1.0
    assert tables == [(1, 4096 // prof.PAGE)]
    ws_rows = []
    monkeypatch.setattr(prof.PromptTable, "__init__",
                        lambda self, rows, *a, _real=prof.PromptTable.__init__: (ws_rows.append(rows),
                                                                                 _real(self, rows, *a))[1])
    prof.profile(700, 2, 0.5, dev="cpu", timer=lambda fn: (fn(), 1.0)[1], columns=("all1",), max_len=4096,
                 engine_rows=5)
    assert ws_rows == [5] and made[-1] == 64
    with pytest.raises(ValueError, match="fewer than the rows"):
        prof.profile(700, 2, 0.5, dev="cpu", timer=lambda fn: 1.0, columns=("all1",), engine_rows=1)
    made.clear()
    prof.profile(700, 1, 0.5, dev="cpu", timer=lambda fn: (fn(), 1.0)[1], columns=("all1",))
    assert made == [16]
    with pytest.raises(ValueError, match="shorter than the context"):
        prof.profile(700, 1, 0.5, dev="cpu", timer=lambda fn: 1.0, columns=("all1",), max_len=512)


@pytest.mark.parametrize("order", ["asc", "desc", "spread", "random"])
def test_page_ids_are_distinct_pages_past_the_null_page(order):
    """--page-order: each layout lists `count` distinct physical pages in 1..num_pages-1 (page 0 is vLLM's null
    page), asc / desc in order, spread over the whole cache; too many pages or an unknown order are refused."""
    prof = _script()
    ids = prof.page_ids(37, 200, order)
    assert ids.dtype == torch.int32 and ids.numel() == 37 and len(set(ids.tolist())) == 37
    assert int(ids.min()) >= 1 and int(ids.max()) <= 199
    if order == "asc":
        assert ids.tolist() == list(range(1, 38))
    if order == "desc":
        assert ids.tolist() == list(range(37, 0, -1))
    if order == "spread":
        assert ids.tolist() == sorted(ids.tolist()) and int(ids.max()) > 150
    with pytest.raises(ValueError, match="do not fit"):
        prof.page_ids(200, 200, order)
    with pytest.raises(ValueError, match="not one of"):
        prof.page_ids(3, 200, "backwards")


def test_decode_profile_lays_pages_out_in_a_cache_of_the_size_asked(monkeypatch):
    """--page-order / --cache-gib: the block table the kernel gets lists the layout's pages of a cache of that many
    pages, and a cache too small for the rows timed is refused."""
    prof = _script()
    monkeypatch.setattr(prof, "HQ", 4)
    monkeypatch.setattr(prof, "HKV", 2)
    monkeypatch.setattr(prof, "D", 32)
    seen = []
    real_launch = prof.step_launch

    def launch(q, kc, vc, bt, *a, **kw):
        seen.append((kc.shape[0], bt.clone()))
        return real_launch(q, kc, vc, bt, *a, **kw)

    monkeypatch.setattr(prof, "step_launch", launch)
    r = prof.profile(700, 2, 0.5, dev="cpu", timer=lambda fn: (fn(), 1.0)[1], columns=("all1",), page_order="desc",
                     cache_pages=300)
    pages = -(-700 // prof.PAGE)
    assert r["all1_us"] == 1.0 and seen[0][0] == 300
    assert seen[0][1].flatten().tolist() == list(range(2 * pages, 0, -1))
    with pytest.raises(ValueError, match="fewer than"):
        prof.profile(700, 2, 0.5, dev="cpu", timer=lambda fn: 1.0, columns=("all1",), cache_pages=2 * pages)


def test_layer_gemms_run_a_decode_layers_four_products(monkeypatch):
    """--between gemm: one callable runs a layer's QKV, O, gate-up and down products at batch 1 (bf16, the shapes of
    the geometry asked), the same each call."""
    prof = _script()
    monkeypatch.setattr(prof, "HQ", 4)
    monkeypatch.setattr(prof, "HKV", 2)
    monkeypatch.setattr(prof, "D", 16)
    run = prof.layer_gemms(torch.device("cpu"), hidden=64, inter=96)
    out = run()
    assert out.shape == (1, 64) and out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert torch.equal(run(), out)


def test_token_knobs_are_every_combination_of_their_values():
    prof = _script()
    assert prof.token_knob_variants([]) == [{}]
    assert prof.token_knob_variants(["ATTEND_TILE=32,64", "CHUNK=512,1024"]) == [
        {"ATTEND_TILE": 32, "CHUNK": 512}, {"ATTEND_TILE": 32, "CHUNK": 1024},
        {"ATTEND_TILE": 64, "CHUNK": 512}, {"ATTEND_TILE": 64, "CHUNK": 1024}]
    for bad in ("CHUNKS=512", "CHUNK=", "CHUNK"):
        with pytest.raises(ValueError, match="expected NAME=V1,V2"):
            prof.token_knob_variants([bad])


def test_every_token_knob_is_a_constant_of_the_token_decode():
    import cab_vllm.ops.token_decode as td

    assert all(hasattr(td, name) for name in _script().TOKEN_KNOBS)
