"""The Triton kernels compile for a Hopper GPU (sm_90) on this machine: launches captured from CPU runs (the
interpreter accepts more than the GPU compiler does) are compiled by Triton's own pipeline and ptxas in a process
without TRITON_INTERPRET (tests/ops/hopper_compile.py), at the test's shapes and at an 8B model's 128k shapes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
                                reason="captures launches through the Triton interpreter (CPU machines)")


def _ptxas_available() -> bool:
    try:
        import triton

        return (Path(triton.__file__).parent / "backends/nvidia/bin/ptxas").exists()
    except ImportError:
        return False


class Capture:
    """Replaces module.kernel: records each launch's arguments (tensors by dtype) and constexprs, then runs it."""

    def __init__(self, monkeypatch, module, name: str):
        self.real, self.module, self.name, self.launches = getattr(module, name), module.__name__, name, []
        monkeypatch.setattr(module, name, self)

    def __getitem__(self, grid):
        def launch(*args, **kw):
            enc = []
            for a in args:
                if a is None:
                    enc.append(["none"])
                elif hasattr(a, "block_shape") and hasattr(a, "base"):  # a host tensor descriptor
                    enc.append(["tensordesc", str(a.base.dtype).replace("torch.", ""), list(a.block_shape)])
                elif isinstance(a, torch.Tensor):
                    enc.append(["tensor", str(a.dtype).replace("torch.", "")])
                elif isinstance(a, bool):
                    enc.append(["bool", a])
                elif isinstance(a, int):
                    enc.append(["int", a])
                else:
                    enc.append(["float", float(a)])
            opts = {k: kw.pop(k) for k in ("num_warps", "num_stages") if k in kw}
            self.launches.append({"module": self.module, "kernel": self.name, "args": enc, "constexprs": kw, **opts})
            return self.real[grid](*args, **kw, **opts)

        return launch


def _compile(tmp_path, launches) -> str:
    uniq = {json.dumps(x, sort_keys=True): x for x in launches}
    f = tmp_path / "launches.json"
    f.write_text(json.dumps(list(uniq.values())))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    p = subprocess.run([sys.executable, str(ROOT / "tests/ops/hopper_compile.py"), str(f)], capture_output=True,
                       text=True, cwd=ROOT, env=env, timeout=1800)
    assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
    return p.stdout


def _scaled(launches, **cx):
    """The launches again with some constexprs at GPU sizes."""
    return [{**x, "constexprs": {**x["constexprs"], **{k: v for k, v in cx.items() if k in x["constexprs"]}}}
            for x in launches]


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's bundled ptxas is missing")
def test_changed_kernels_compile_for_hopper(tmp_path, monkeypatch):
    import cab_vllm.ops.coarsen as coarsen
    import cab_vllm.ops.decode as dec
    import cab_vllm.ops.fused_select as fs
    from cab_vllm.backend.attention import DecodeWorkspace, PromptTable
    from cab_vllm.config import CABConfig
    from cab_vllm.ops.coarsen import key_summary
    from cab_vllm.ops.decode import MODE_BOUNDS, MODE_PROMPT, MODE_SKIP, DecodeRoutes, Selection, routed_decode
    from cab_vllm.policies import estimate_and_select

    caps = [Capture(monkeypatch, fs, "_logits_kernel"), Capture(monkeypatch, coarsen, "_sampled_kernel"),
            Capture(monkeypatch, coarsen, "_sampled_mass_kernel"),
            Capture(monkeypatch, dec, "_decode_step_kernel"), Capture(monkeypatch, fs, "_select_rows_kernel")]
    gen = torch.Generator().manual_seed(0)
    # the fused predictor and the exact rows (GQA 4 in bf16, GQA 7 in fp32)
    for hq, hkv, dt, policy in ((8, 2, torch.bfloat16, "cab"), (14, 2, torch.float32, "cab"),
                                (8, 2, torch.bfloat16, "magnitude")):  # magnitude: no exact rows
        n = 1100
        q = torch.randn(1, hq, n, 64, generator=gen).to(dt)
        k = torch.randn(1, hkv, n, 64, generator=gen).to(dt)
        cfg = CABConfig(sparsity=0.9, policy=policy)
        estimate_and_select(q, k, cfg, 0, key_summary(k, 64, cfg.estimator, impl="torch"), n, impl="triton")
    # the exact rows of a 64-query-head group over one KV head (an MQA model): 16 rows of 64 heads in one tile need
    # more shared memory than a Hopper GPU has, so the group is split over programs
    coarsen.sampled_block_attention(torch.randn(1, 64, 130, 64, generator=gen).to(torch.bfloat16),
                                    torch.randn(1, 1, 130, 64, generator=gen).to(torch.bfloat16), 64, 16,
                                    impl="triton")
    # the exact rows reading the keys in place from a paged cache (the engine's final prompt chunk)
    from cab_vllm.ops.blocks import PagedKeys
    kcp = torch.randn(12, 16, 2, 64, generator=gen).to(torch.bfloat16)
    coarsen.sampled_block_attention(torch.randn(1, 8, 130, 64, generator=gen).to(torch.bfloat16),
                                    PagedKeys(kcp, 1 + torch.arange(9, dtype=torch.int32)[None], 130), 64, 16,
                                    torch.tensor([2]), impl="triton")
    # a decode step: one launch (one row) and two launches (three rows, bounds / prompt / skip)
    n_blocks = 20
    kc = torch.randn(n_blocks * 4 + 1, 16, 2, 64, generator=gen).to(torch.bfloat16)
    ws = DecodeWorkspace(4, 8, 2, 64, n_blocks, "cpu")
    table = PromptTable(4, 2, n_blocks, "cpu")
    for rows, modes in ((1, [MODE_BOUNDS]), (3, [MODE_BOUNDS, MODE_PROMPT, MODE_SKIP])):
        q = torch.randn(rows, 8, 64, generator=gen).to(torch.bfloat16)
        bt = torch.arange(rows * 80, dtype=torch.int32).view(rows, 80) % (kc.shape[0] - 1) + 1  # 75 pages used
        sl = torch.full((rows,), 1200, dtype=torch.int32)
        z = torch.zeros(rows, dtype=torch.int32)
        routes = DecodeRoutes(torch.tensor(modes, dtype=torch.int32), z, table.idx, table.cnt, z + 10,
                              ws.sel_idx[:rows], ws.sel_cnt[:rows])
        sel = Selection(torch.full((rows,), 5, dtype=torch.int32), ws.scores[:rows], 1, 1, 0)
        routed_decode(q, kc, kc, bt, sl, routes, 64, 0.125, torch.zeros_like(q), ws.splits(rows), ws.partials(rows),
                      impl="triton", select=sel)
    # the launches without routing (plain split-K decode; the selection alone), and a page holding whole blocks
    from cab_vllm.ops.decode import paged_sparse_decode
    from cab_vllm.ops.select import decode_select
    q = torch.randn(2, 8, 64, generator=gen).to(torch.bfloat16)
    sl = torch.full((2,), 1200, dtype=torch.int32)
    idx = torch.arange(n_blocks, dtype=torch.int32).repeat(2, 2, 1)
    cnt = torch.full((2, 2), 7, dtype=torch.int32)
    kc64 = torch.randn(2 * 19 + 1, 64, 2, 64, generator=gen).to(torch.bfloat16)
    bt64 = 1 + torch.arange(2 * 19, dtype=torch.int32).view(2, 19)
    for cache, table_, page in ((kc, torch.arange(2 * 80, dtype=torch.int32).view(2, 80) % 75 + 1, 16),
                                (kc64, bt64, 64)):
        paged_sparse_decode(q, cache, cache, table_, sl, idx, cnt, 64, num_splits=3, impl="triton")
    decode_select(q, kc, torch.arange(2 * 80, dtype=torch.int32).view(2, 80) % 75 + 1, sl,
                  torch.full((2,), MODE_BOUNDS, dtype=torch.int32), torch.full((2,), 5, dtype=torch.int32), 64, 1, 2,
                  5, torch.zeros(2, 2, n_blocks, dtype=torch.int32), torch.zeros(2, 2, dtype=torch.int32),
                  torch.zeros(2, 2, 32), impl="triton")
    logits, sampled, mass, step, rows = (c.launches for c in caps)
    assert not all(x["constexprs"]["ROUTED"] for x in step)  # the launches without routing are compiled too
    assert {x["constexprs"]["PAGE_SIZE"] for x in step} >= {16, 64}
    assert logits and {x["constexprs"]["HAS_EXACT"] for x in rows} == {True, False}
    assert {x["num_stages"] for x in logits} == {1, 2}  # fp32 summaries (one key tile in flight) and bf16 (two)
    assert {x["constexprs"]["GPAD"] for x in sampled} == {4, 8}
    assert {x["constexprs"]["PAGED"] for x in sampled} == {True, False}
    assert mass and all(x["constexprs"]["BLOCK_LSE"] for x in sampled)  # the exact rows read the keys once
    # the mass kernel's constexprs do not follow the context's length (its split count): one compile per model
    assert len({json.dumps(x["constexprs"], sort_keys=True) for x in mass}) == 1
    assert len({x["args"][6][1] for x in mass}) > 1  # (the launches' split counts differ)
    assert {(x["constexprs"]["SELECT"], x["constexprs"]["ATTEND"]) for x in step} >= {(True, True), (True, False),
                                                                                         (False, True)}
    # the merge's tile: 20 splits here (20 blocks, one per split) read 16 per load (MERGE_SPLITS=16); the
    # selection-only launch has one split
    attend = [x for x in step if x["constexprs"]["ATTEND"]]
    assert {x["constexprs"]["MERGE_SPLITS"] for x in attend if x["constexprs"]["ROUTED"]} == {16}
    assert {x["constexprs"]["MERGE_SPLITS"] for x in step if not x["constexprs"]["ATTEND"]} == {1}
    # the merge split by split (merge_splits=1) and 16 splits per load (the default where a step has 16 or more)
    options = _scaled(attend, MERGE_SPLITS=1) + _scaled(attend, MERGE_SPLITS=16)
    # an 8B model at 128k: 2048 key blocks, head dim 128 (summaries 2 x 128 wide), 16 exact rows
    big = (_scaled(logits, W=256, WPAD=256) + _scaled(sampled, HEAD_DIM=128, BLOCK_D=128)
           + _scaled(step + options, MPAD=2048, HEAD_DIM=128, BLOCK_D=128) + _scaled(rows, MPAD=2048, KPAD=2048))
    # the two-pass exact rows (the sampled estimator over every query block keeps them)
    two = _scaled(sampled, BLOCK_LSE=False) + _scaled(sampled, BLOCK_LSE=False, MASS_PASS=True)
    every = logits + sampled + mass + two + step + options + rows + big
    out = _compile(tmp_path, every)
    assert out.count("ok ") == len({json.dumps(x, sort_keys=True) for x in every})


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's bundled ptxas is missing")
def test_prefill_path_kernels_compile_for_hopper(tmp_path, monkeypatch):
    """The rest of the prefill path (pooling, the estimate's softmax, the sparse prefill over the paged cache),
    as the chunked prefill of a GQA 4 prompt in bf16 launches them, at the test's and at 128k shapes."""
    import cab_vllm.ops.coarsen as coarsen
    import cab_vllm.ops.prefill as prefill
    from cab_vllm.backend.attention import KeySummaries, prefill_selection, run_prefill, update_key_summaries
    from cab_vllm.config import CABConfig

    caps = [Capture(monkeypatch, coarsen, "_pool_kernel"), Capture(monkeypatch, coarsen, "_softmax_group_kernel"),
            Capture(monkeypatch, prefill, "_sparse_prefill_kernel")]
    gen = torch.Generator().manual_seed(2)
    n, hq, hkv, d, page = 600, 8, 2, 64, 16
    pages = -(-n // page)
    kc = torch.randn(pages + 1, page, hkv, d, generator=gen).to(torch.bfloat16)
    vc = torch.randn(pages + 1, page, hkv, d, generator=gen).to(torch.bfloat16)
    bt = (1 + torch.arange(pages, dtype=torch.int32))[None]
    q = torch.randn(n, hq, d, generator=gen).to(torch.bfloat16)
    cfg = CABConfig(sparsity=0.7)
    store = KeySummaries(1, hkv, -(-n // 64), d, cfg.estimator, torch.bfloat16, "cpu")
    a = 256
    summ = update_key_summaries(store, 0, a // 64, kc, bt[0], n, 64, "triton")
    sel = prefill_selection(q[a:].transpose(0, 1), None, cfg, impl="triton", summary=summ, n=n, exact=False)
    out = torch.empty_like(q[a:])
    run_prefill(q[a:], kc, vc, bt, torch.tensor([0, n - a], dtype=torch.int32), torch.tensor([n], dtype=torch.int32),
                [sel], 64, d ** -0.5, out, "triton")
    pool, soft, sparse = (c.launches for c in caps)
    assert pool and soft and sparse
    assert {x["constexprs"]["PAGED"] for x in pool} == {True, False}  # keys from the paged cache, queries not
    assert {x["constexprs"]["SIGN_SPLIT"] for x in pool} == {True, False}  # the bounds' query features, key bounds
    # the default launch: tiles last to first (reverse_tiles), no lazy rescale, no tensor descriptors
    assert {tuple(x["constexprs"][c] for c in ("LAZY", "REVERSE", "TMA")) for x in sparse} == {(False, True, False)}
    # the tuning sweep's launch options (prefill.LAUNCH_OVERRIDE: lazy_rescale, reverse_tiles, tma) compile too;
    # tma over 64-token pages (its keys and values as tensor descriptors)
    monkeypatch.setitem(prefill.LAUNCH_OVERRIDE, "tma", 1)
    kc64, vc64 = (torch.randn(-(-n // 64) + 1, 64, hkv, d, generator=gen).to(torch.bfloat16) for _ in range(2))
    bt64 = (1 + torch.arange(-(-n // 64), dtype=torch.int32))[None]
    run_prefill(q[a:], kc64, vc64, bt64, torch.tensor([0, n - a], dtype=torch.int32),
                torch.tensor([n], dtype=torch.int32), [sel], 64, d ** -0.5, out, "triton")
    tma = sparse[-1:]
    assert tma[0]["constexprs"]["TMA"] and [a for a in tma[0]["args"] if a[0] == "tensordesc"] == [
        ["tensordesc", "bfloat16", [1, 64, 1, d]]] * 2

    def box128(launches):
        return [{**x, "args": [["tensordesc", a[1], [1, 64, 1, 128]] if a[0] == "tensordesc" else a
                               for a in x["args"]]} for x in launches]

    big = (_scaled(pool, HEAD_DIM=128, BLOCK_D=128) + _scaled(soft, COLS=2048)
           + _scaled(sparse[:-1], HEAD_DIM=128, BLOCK_D=128)
           + _scaled(sparse[:-1], HEAD_DIM=128, BLOCK_D=128, LAZY=True, REVERSE=False)
           + box128(_scaled(tma, HEAD_DIM=128, BLOCK_D=128)) + box128(_scaled(tma, HEAD_DIM=128, BLOCK_D=128, LAZY=True)))
    out = _compile(tmp_path, pool + soft + sparse + big)
    assert out.count("ok ") == len({json.dumps(x, sort_keys=True) for x in pool + soft + sparse + big})
