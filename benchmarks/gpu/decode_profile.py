"""One decode step of CAB on a GPU, kernel by kernel, to see where its time goes (no vLLM needed).

    python benchmarks/gpu/decode_profile.py [--lens 4096,32768,131072] [--rows 1,8] [--sparsity 0.95]
        [--min-per 1,4] [--score-programs 64,128] [--merge-splits 1,16] [--target-programs 264,528,1056]
        [--warps 2,4] [--maxnreg 0,128] [--page 16,64] [--columns prompt,prompt1,skip1] [--max-len 131072]
        [--page-order asc,desc,spread,random] [--cache-gib 3] [--between gemm] [--tok CHUNK=512,1024]
        [--tok ATTEND_TILE=32,64] [--tok SCAN_TILE=256,512] ...

Llama-3.1-8B attention geometry (32/8 heads, head dim 128, bf16), a paged cache (page 16 unless --page), one layer. For each
context length and batch it times, in a CUDA graph (as the engine replays it), the routed decode of the engine
(ops.decode.routed_decode: a selection launch, then attention + merge) in the modes the engine uses:
  prompt   the request's stored prompt selection (the default rule) + the blocks after the prompt
  bounds   the step's own selection by key bounds (scores + top-k)
  skip     every row left to FlashAttention (what short requests pay for CAB being in the graph)
  all      every row dense in CAB's kernel (what a dense row costs with CAB_DENSE_DECODE=1, against
           FlashAttention's dense decode: fa_gather_profile.py's "dense" column)
the same four with selection and attention in ONE launch (prompt1, bounds1, skip1, all1: step_launch with both roles;
the engine's routed_decode takes it for batches of up to ops.decode.ONE_LAUNCH_MAX_ROWS rows),
and, for comparison, the plain split-K kernel on the same blocks (ops.decode.paged_sparse_decode, no routing,
no selection role) and dense decode through the same kernel (every block); and the token decode of
decode_rule="tokens" (ops.token_decode, every row keeping CABConfig.decode_tokens keys per head: tokens; its first
launch alone, the exact logits of every key: tok_logits; with the counting and threshold launches: tok_select;
the same with the 4-bit key copy ranking the keys (CAB_TOKEN_SCORER=int4, ops.key_codes; rerank x keep candidates
rescored exactly, --tok RERANK=1,2,4): tok4, its first launch (every key's estimate) tok4_logits, up to the final
thresholds (with the rescoring) tok4_select, and the copy's encode of a decode step's new key per row: tok4_encode;
the same with the float8 key copy (CAB_TOKEN_SCORER=fp8: each head's keep best by the estimate, attended by exact
score, no rescoring): tok8, tok8_logits, tok8_select, tok8_encode);
--tok NAME=v1,v2 (repeatable) times each value of ops.token_decode's constant NAME, one of TOKEN_KNOBS: keys per
logits program, tiles per attention split and programs per step, the attention's steps, warps and registers per launch).
Prints microseconds per step. By
default L2 is flushed before every call (the engine's other 31 layers evict a layer's KV); --warm-l2 keeps it.
--max-len sizes the decode workspace, the prompt table and the block table's rows as an engine of that max_model_len
does (default: the context timed), --engine-rows the workspace's and prompt table's rows (an engine's: max(max_num_seqs,
its largest CUDA-graph batch), 512 with vLLM's defaults), so a short row is timed as a long-context engine runs it;
the kernels' registers per thread, spills and shared memory follow the table (REGS lines, one per compiled variant).
--page-order lays each row's pages out as an engine may (asc: a fresh engine's; desc: pages a finished request freed,
handed out again last-first; spread: evenly over the cache; random) in a cache of --cache-gib (K and V together).
--between gemm runs a decode layer's four GEMMs before each timed call (their time subtracted), as the engine does.
"""

from __future__ import annotations

import argparse
import itertools
import math

import torch

from cab_vllm.backend.attention import DecodeWorkspace, PromptTable
from cab_vllm.config import CABConfig
from cab_vllm.ops.decode import (MODE_ALL, MODE_BOUNDS, MODE_PROMPT, MODE_SKIP, DecodeRoutes, Selection, paged_sparse_decode,
                                 routed_decode, step_launch)

HQ, HKV, D, PAGE, BS = 32, 8, 128, 16, 64


_FLUSH: torch.Tensor | None = None  # set by main: a 256 MiB buffer zeroed before each timed call (cold L2)
_BETWEEN = None  # set by main (--between gemm): kernels run before each timed call, as an engine's layer runs them


def _replay_us(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000.0 / reps


def graph_time_us(fn, reps: int = 200) -> float:
    """Mean time of one call of fn replayed in a CUDA graph, in µs. With _FLUSH set, every replay first zeroes a
    buffer larger than L2 (as the engine's other layers do between two calls of one layer's attention), and with
    _BETWEEN set also runs that (an engine layer's GEMMs: other kernels' code through the SMs' instruction caches);
    the time of what runs before fn alone is subtracted."""
    if _FLUSH is None and _BETWEEN is None:
        return _replay_us(fn, reps)
    flush, between = _FLUSH, _BETWEEN

    def before():
        if flush is not None:
            flush.zero_()
        if between is not None:
            between()

    def both():
        before()
        fn()

    return _replay_us(both, reps) - _replay_us(before, reps)


def kept_blocks(m: int, keep: int, gen: torch.Generator) -> list[int]:
    """Sink, the last (current) block, and random others: `keep` block indices of m, ascending (a stored prompt
    selection's shape)."""
    keep = min(keep, m)
    others = (torch.randperm(m - 2, generator=gen)[: max(keep - 2, 0)] + 1).tolist() if m > 2 else []
    return sorted({0, m - 1} | set(others))


COLUMNS = ("prompt", "bounds", "skip", "all", "prompt1", "bounds1", "skip1", "all1", "plain", "dense", "tokens",
           "tok_logits", "tok_select", "tok4", "tok4_logits", "tok4_select", "tok4_encode", "tok8", "tok8_logits",
           "tok8_select", "tok8_encode")


def profile(n: int, rows: int, sparsity: float, dev: str = "cuda", timer=graph_time_us, min_per: int | None = None,
            columns=COLUMNS, page: int = PAGE, max_len: int | None = None, engine_rows: int | None = None,
            page_order: str = "asc", cache_pages: int | None = None) -> dict:
    import cab_vllm.ops.decode as decode_ops

    min_per = decode_ops.MIN_BLOCKS_PER_SPLIT if min_per is None else min_per
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    if page <= 0:
        raise ValueError(f"page size must be positive, got {page}")
    pages_per_seq = math.ceil(n / page)
    need = rows * pages_per_seq + 1
    num_pages = need if cache_pages is None else cache_pages
    if num_pages < need:
        raise ValueError(f"cache_pages={cache_pages} is fewer than the {need} pages the rows need")
    kc = torch.randn(num_pages, page, HKV, D, device=dev, dtype=dt)
    vc = torch.randn_like(kc)
    bt = page_ids(rows * pages_per_seq, num_pages, page_order).to(dev).view(rows, pages_per_seq)
    if max_len is not None:  # vLLM's block table: a row as wide as max_model_len's pages, zeros past the context
        if max_len < n:
            raise ValueError(f"max_len={max_len} is shorter than the context timed ({n})")
        wide = torch.zeros(rows, math.ceil(max_len / page), device=dev, dtype=torch.int32)
        wide[:, :pages_per_seq] = bt
        bt = wide
    if engine_rows is not None and engine_rows < rows:
        raise ValueError(f"engine_rows={engine_rows} is fewer than the rows timed ({rows})")
    sl = torch.full((rows,), n, device=dev, dtype=torch.int32)
    q = torch.randn(rows, HQ, D, device=dev, dtype=dt)
    out = torch.empty_like(q)
    m = math.ceil(n / BS)
    m_engine = m if max_len is None else math.ceil(max_len / BS)  # the engine's buffers: its max_model_len
    cfg = CABConfig(sparsity=sparsity)
    keep = int(cfg.keep_counts(m)[-1])
    ws = DecodeWorkspace(engine_rows or rows, HQ, HKV, D, m_engine, dev)  # the engine's: every row it may batch
    table = PromptTable(engine_rows or rows, HKV, m_engine, dev)
    gen = torch.Generator(device="cpu").manual_seed(0)
    for r in range(rows):  # a stored prompt selection of `keep` blocks per head (sink + local + random others)
        for h in range(HKV):
            pick = kept_blocks(m, keep, gen)
            table.idx[r, h, : len(pick)] = torch.tensor(pick, dtype=table.idx.dtype)
            table.cnt[r, h] = len(pick)
    slots = torch.arange(rows, device=dev, dtype=torch.int32)
    pblocks = torch.full((rows,), m, device=dev, dtype=torch.int32)
    keep_t = torch.full((rows,), keep, device=dev, dtype=torch.int32)
    res = {"n": n, "rows": rows, "sparsity": sparsity, "kept_blocks": keep, "blocks": m, "splits": ws.splits(rows)}

    sel = Selection(keep_t, ws.scores[:rows], cfg.sink_blocks, cfg.local_blocks, cfg.seed)

    def routes_of(mode: int) -> DecodeRoutes:  # every row in `mode`
        modes = torch.full((rows,), mode, device=dev, dtype=torch.int32)
        flag = torch.tensor([1 if mode == MODE_BOUNDS else 0], device=dev, dtype=torch.int32)
        return DecodeRoutes(modes, slots, table.idx, table.cnt, pblocks, ws.sel_idx[:rows], ws.sel_cnt[:rows], flag)

    def routed(mode: int):
        routes = routes_of(mode)
        return lambda: routed_decode(q, kc, vc, bt, sl, routes, BS, 1 / math.sqrt(D), out, ws.splits(rows),
                                     ws.partials(rows), impl="triton", select=sel, min_blocks_per_split=min_per,
                                     one_launch=False)

    def one_launch(mode: int):  # selection and attention in one launch (programs take roles from a ticket)
        routes = routes_of(mode)
        scratch = ws.partials(rows)
        return lambda: step_launch(q, kc, vc, bt, sl, routes.sel_idx, routes.sel_cnt, block_size=BS, routes=routes,
                                   select=sel, scale=1 / math.sqrt(D), num_splits=ws.splits(rows), out=out,
                                   lse=ws.lse[:rows], scratch=scratch, min_blocks_per_split=min_per)

    idx = table.idx[:rows].to(torch.int32).contiguous()
    cnt = table.cnt[:rows].contiguous()
    all_idx = torch.arange(m, device=dev, dtype=torch.int32).expand(rows, HKV, m).contiguous()
    all_cnt = torch.full((rows, HKV), m, device=dev, dtype=torch.int32)
    runs = {
        "prompt": lambda: routed(MODE_PROMPT), "bounds": lambda: routed(MODE_BOUNDS), "skip": lambda: routed(MODE_SKIP),
        "prompt1": lambda: one_launch(MODE_PROMPT), "bounds1": lambda: one_launch(MODE_BOUNDS),
        "skip1": lambda: one_launch(MODE_SKIP), "all": lambda: routed(MODE_ALL), "all1": lambda: one_launch(MODE_ALL),
        "plain": lambda: lambda: paged_sparse_decode(q, kc, vc, bt, sl, idx, cnt, BS, num_splits=ws.splits(rows),
                                                     out=out),
        "dense": lambda: lambda: paged_sparse_decode(q, kc, vc, bt, sl, all_idx, all_cnt, BS,
                                                     num_splits=ws.splits(rows), out=out),
    }
    from cab_vllm.ops import token_decode as td

    tscratch = td.token_scratch(td.scratch_rows(HQ, max_len or n, engine_rows or rows), HQ, HKV, D, max_len or n,
                                dev) if any(c.startswith("tok") for c in columns) else None
    tkeep = torch.full((rows,), cfg.decode_tokens(n), device=dev, dtype=torch.int32)
    res["kept_tokens"] = cfg.decode_tokens(n)

    def tokens(stages: int):
        return lambda: td.token_decode(q, kc, vc, bt, sl, tkeep, 1 / math.sqrt(D), out, scratch=tscratch,
                                       impl="triton", stages=stages)

    from cab_vllm.ops.key_codes import encode_keys, key_codes

    one = torch.ones_like(sl)
    runs.update({"tokens": lambda: tokens(3), "tok_logits": lambda: tokens(1), "tok_select": lambda: tokens(2)})
    for prefix, fmt in (("tok4", "int4"), ("tok8", "fp8")):  # the key copies' columns: each copy made when asked for
        if not any(c.startswith(prefix) for c in columns):
            continue
        codes = key_codes(kc.shape[0], kc.shape[1], kc.shape[2], kc.shape[3], dev, fmt)
        encode_keys(kc, codes, bt, sl, sl)

        def copied(stages: int, codes=codes):
            return lambda: td.token_decode(q, kc, vc, bt, sl, tkeep, 1 / math.sqrt(D), out, scratch=tscratch,
                                           impl="triton", stages=stages, codes=codes, rerank=td.RERANK)

        runs.update({prefix: lambda f=copied: f(3), f"{prefix}_logits": lambda f=copied: f(1),
                     f"{prefix}_select": lambda f=copied: f(2),
                     f"{prefix}_encode": lambda c=codes: lambda: encode_keys(kc, c, bt, sl, one, max_new=1)})
    for c in COLUMNS:  # a column not asked for is None
        res[f"{c}_us"] = timer(runs[c]()) if c in columns else None
    return res


PAGE_ORDERS = ("asc", "desc", "spread", "random")


def page_ids(count: int, num_pages: int, order: str) -> torch.Tensor:
    """`count` distinct physical page ids in 1..num_pages-1 (page 0 is vLLM's null page) in the order a request's
    block table would list them: asc (a fresh engine hands out pages in order), desc (pages a finished request
    freed come back last-first), spread (ascending, evenly spaced over the whole cache), random."""
    if order not in PAGE_ORDERS:
        raise ValueError(f"page order {order!r} is not one of {', '.join(PAGE_ORDERS)}")
    if count > num_pages - 1:
        raise ValueError(f"{count} pages do not fit a cache of {num_pages} (page 0 is reserved)")
    if order == "asc":
        ids = torch.arange(1, count + 1)
    elif order == "desc":
        ids = torch.arange(count, 0, -1)
    elif order == "spread":
        ids = 1 + torch.arange(count) * ((num_pages - 1) // count)
    else:
        ids = 1 + torch.randperm(num_pages - 1, generator=torch.Generator().manual_seed(0))[:count]
    return ids.to(torch.int32)


def layer_gemms(dev, hidden: int = 4096, inter: int = 14336):
    """A decode layer's four GEMMs at batch 1 (Llama-3.1-8B: QKV, O, gate-up, down; bf16 weights as the engine
    holds them), as one callable."""
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(1, hidden, generator=g).to(dev, torch.bfloat16)
    qkv = torch.randn(hidden, (HQ + 2 * HKV) * D, generator=g).to(dev, torch.bfloat16)
    o = torch.randn(HQ * D, hidden, generator=g).to(dev, torch.bfloat16)
    up = torch.randn(hidden, 2 * inter, generator=g).to(dev, torch.bfloat16)
    down = torch.randn(inter, hidden, generator=g).to(dev, torch.bfloat16)

    def run():
        y = x @ qkv
        z = y[:, : HQ * D] @ o
        h = z @ up
        return h[:, :inter] @ down

    return run


def compiled_resources() -> list[str]:
    """Registers per thread and spilled bytes of each compiled variant of the decode kernel (Triton's device
    caches; empty where this Triton keeps them elsewhere)."""
    import cab_vllm.ops.decode as decode_ops

    lines = []
    for cache in getattr(decode_ops._decode_step_kernel, "device_caches", {}).values():
        kernels = cache[0] if isinstance(cache, tuple) else cache
        for key, k in getattr(kernels, "items", lambda: [])():
            meta = getattr(k, "metadata", None)
            lines.append(f"REGS {getattr(k, 'n_regs', '?')} spills {getattr(k, 'n_spills', '?')} "
                         f"shared {getattr(meta, 'shared', '?')} warps {getattr(meta, 'num_warps', '?')} "
                         f"{str(key)[:300]}")
    return lines


TOKEN_KNOBS = ("CHUNK", "COUNT_CHUNK", "TILES_PER_SPLIT", "MAX_SPLITS", "ATTEND_TILE", "SCAN_TILE", "MERGE_SPLITS",
               "LOGITS_TILE", "LOGITS_WARPS", "LOGITS_STAGES", "LOGITS_MAXNREG", "ATTEND_WARPS", "ATTEND_MAXNREG",
               "COUNT_ATOMIC", "RERANK", "CODE_ASM", "TARGET_PROGRAMS", "MIN_TILES_PER_SPLIT", "PASSES", "FP8_STAGES",
               "FP8_MAXNREG", "SAMPLE", "SAMPLE_Q", "SAMPLE_ITERS", "FUSED_CHUNK", "FUSED_TILE", "FUSED_WARPS",
               "FUSED_STAGES", "FUSED_MAXNREG")


def token_knob_variants(specs: list[str]) -> list[dict]:
    """--tok NAME=V1,V2 options -> every combination of their values, as {NAME: value} (ints where they parse):
    [{}] without options. A name that is not a knob, or a value list that is empty, is a ValueError."""
    axes = []
    for spec in specs:
        name, _, values = spec.partition("=")
        if name not in TOKEN_KNOBS or not values:
            raise ValueError(f"--tok {spec!r}: expected NAME=V1,V2 with NAME one of {', '.join(TOKEN_KNOBS)}")
        axes.append([(name, int(v) if v.lstrip("-").isdigit() else v) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lens", default="4096,32768,131072")
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--sparsity", type=float, default=0.95)
    ap.add_argument("--min-per", default=None, help="blocks per split at least (comma list to compare)")
    ap.add_argument("--target-programs", default=None,
                    help="split-K programs per step to aim for (comma list; ops.decode.TARGET_PROGRAMS)")
    ap.add_argument("--columns", default=",".join(COLUMNS),
                    help=f"what to time, comma list of {', '.join(COLUMNS)} (fewer: a faster sweep)")
    ap.add_argument("--score-programs", default=None,
                    help="programs per (row, KV head) scoring its blocks in a selection (bounds mode; comma list)")
    ap.add_argument("--merge-splits", default=None,
                    help="split partials merged per load (comma list of powers of two; ops.decode.MERGE_SPLITS)")
    ap.add_argument("--warps", default=None, help="warps per decode program (comma list; ops.decode.DECODE_WARPS)")
    ap.add_argument("--maxnreg", default=None,
                    help="registers per thread at most (comma list, 0: no limit; ops.decode.DECODE_MAXNREG)")
    ap.add_argument("--page", default=str(PAGE),
                    help="tokens per KV-cache page (comma list; vLLM's --block-size)")
    ap.add_argument("--max-len", default=None,
                    help="size the workspace, prompt table and block-table rows for this max_model_len (comma "
                         "list; default: each context's own length)")
    ap.add_argument("--engine-rows", default=None,
                    help="rows of the workspace and prompt table (comma list; default: the rows timed)")
    ap.add_argument("--page-order", default="asc",
                    help=f"physical order of each row's pages (comma list of {', '.join(PAGE_ORDERS)})")
    ap.add_argument("--cache-gib", type=float, default=None,
                    help="size of the K and V cache together in GiB (default: just the pages timed; an engine's "
                         "layer holds its share of the KV memory)")
    ap.add_argument("--between", choices=("none", "gemm"), default="none",
                    help="gemm: before each timed call also run a decode layer's GEMMs of the 8B geometry (QKV, O, "
                         "gate-up, down at batch 1), as the engine does between two attention calls")
    ap.add_argument("--tok", action="append", default=[], metavar="NAME=V1,V2",
                    help=f"token decode: values of ops.token_decode's constant NAME to time (repeatable; NAME one of "
                         f"{', '.join(TOKEN_KNOBS)})")
    ap.add_argument("--warm-l2", action="store_true",
                    help="do not flush L2 between calls (by default each call finds the KV cache cold, as in the engine)")
    a = ap.parse_args()
    import cab_vllm.ops.decode as decode_ops
    import cab_vllm.ops.token_decode as token_ops

    columns = a.columns.split(",")
    bad = [c for c in columns if c not in COLUMNS]
    if bad:
        ap.error(f"--columns: unknown {', '.join(bad)} (expected some of {', '.join(COLUMNS)})")
    if not torch.cuda.is_available():
        raise SystemExit("decode_profile.py needs a CUDA GPU")

    def ints(text, default):
        return [int(x) for x in text.split(",")] if text is not None else [default]

    variants = [(mp, sp, ms, tp, w, mr, pg) for mp in ints(a.min_per, decode_ops.MIN_BLOCKS_PER_SPLIT)
                for sp in ints(a.score_programs, decode_ops.MAX_SCORE_PROGRAMS)
                for ms in ints(a.merge_splits, decode_ops.MERGE_SPLITS)
                for tp in ints(a.target_programs, decode_ops.TARGET_PROGRAMS)
                for w in ints(a.warps, getattr(decode_ops, "DECODE_WARPS", 4))
                for mr in ints(a.maxnreg, getattr(decode_ops, "DECODE_MAXNREG", None) or 0)
                for pg in ints(a.page, PAGE)]
    try:
        token_variants = token_knob_variants(a.tok)
    except ValueError as e:
        ap.error(str(e))
    max_lens = [None] if a.max_len is None else [int(x) for x in a.max_len.split(",")]
    engine_rows = [None] if a.engine_rows is None else [int(x) for x in a.engine_rows.split(",")]
    orders = a.page_order.split(",")
    bad = [o for o in orders if o not in PAGE_ORDERS]
    if bad:
        ap.error(f"--page-order: unknown {', '.join(bad)} (expected some of {', '.join(PAGE_ORDERS)})")
    if a.cache_gib is not None and a.cache_gib <= 0:
        ap.error("--cache-gib must be positive")
    global _FLUSH, _BETWEEN
    if a.between == "gemm":
        _BETWEEN = layer_gemms(torch.device("cuda"))
    if not a.warm_l2:
        _FLUSH = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    print(f"{'n':>7} {'order':>6} {'max_len':>7} {'ws_rows':>7} {'rows':>4} {'min/split':>9} {'score':>5} {'merge':>5} {'target':>6} {'warps':>5} {'regs':>4} {'page':>4} "
          f"{'kept':>5} "
          f"{'splits':>6} " + " ".join(f"{c:>8}" for c in COLUMNS) + "  token knobs" +
          f"  (us per step, CUDA graph; 1: selection and attention in one launch; score: "
          f"scoring programs; merge: splits per merge load; dense: this kernel over every block; "
          f"L2 {'warm' if a.warm_l2 else 'flushed'}{'; GEMMs of a layer before each call' if a.between == 'gemm' else ''})")
    for n in (int(x) for x in a.lens.split(",")):
        for rows, (mp, sp, ms, tp, w, mr, pg), ml, er, order, knobs in itertools.product(
                [int(x) for x in a.rows.split(",")], variants, max_lens, engine_rows, orders, token_variants):
            if (ml is not None and ml < n) or (er is not None and er < rows):
                continue
            decode_ops.MAX_SCORE_PROGRAMS, decode_ops.MERGE_SPLITS, decode_ops.TARGET_PROGRAMS = sp, ms, tp
            decode_ops.DECODE_WARPS, decode_ops.DECODE_MAXNREG = w, mr or None
            for name, value in knobs.items():
                setattr(token_ops, name, value)
            cache_pages = None
            if a.cache_gib is not None:  # K and V pages of bf16 [page, Hkv, D]
                cache_pages = int(a.cache_gib * (1 << 30) // (2 * pg * HKV * D * 2))
            r = profile(n, rows, a.sparsity, min_per=mp, columns=columns, page=pg, max_len=ml, engine_rows=er,
                        page_order=order, cache_pages=cache_pages)
            cells = " ".join(f"{'-' if r[c + '_us'] is None else format(r[c + '_us'], '.1f'):>8}"
                             for c in COLUMNS)
            print(f"{n:>7} {order:>6} {ml or n:>7} {er or rows:>7} {rows:>4} {mp:>9} {sp:>5} {ms:>5} {tp:>6} {w:>5} {mr or '-':>4} {pg:>4} "
                  f"{r['kept_blocks']:>5} {r['splits']:>6} {cells}  "
                  + " ".join(f"{k}={v}" for k, v in knobs.items()))
    for line in compiled_resources():
        print(line)

if __name__ == "__main__":
    main()
