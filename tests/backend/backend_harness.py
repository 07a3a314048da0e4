"""Drive the backend's kernel path (cab_vllm.backend.attention.attend) with vLLM's exact per-batch tensors, without
vLLM: query_start_loc, seq_lens, a randomly permuted block table (page 0 = null page), slot_mapping, and the KV
cache written through the slots step by step, the way the engine fills it.
Shared by the CPU tests (small sizes) and the GPU test (4k-128k, bf16)."""

from __future__ import annotations

import math

import torch

from cab_vllm.backend.plan import PromptSlots, SummarySlots, plan_batch, route_rows
from cab_vllm.backend.attention import KeySummaries, PromptTable, attend, write_kv
from cab_vllm.config import CABConfig


class PagedSim:
    """A vLLM-style paged KV cache for S sequences with their full K/V/Q known up front.

    k, v: lists of [Hkv, n_s, D]; q: list of [Hq, n_s, D] (the query every position would issue).
    The cache is one logical [num_pages, Hkv, page_size, 2*D] tensor like vLLM 0.32 hands the backend, split
    into key/value [num_pages, page_size, Hkv, D] views (K in [..., :D], V in [..., D:]).
    """

    def __init__(self, q, k, v, page_size: int, cfg: CABConfig, seed: int = 0, extra_pages: int = 5,
                 summary_slots: int = 0, token_rerank: int | None = None, token_scorer: str = "int4"):
        self.q, self.k, self.v = q, k, v
        self.page_size, self.cfg = page_size, cfg
        hkv, d = k[0].shape[0], k[0].shape[-1]
        dev, dtype = k[0].device, k[0].dtype
        pages = [math.ceil(x.shape[1] / page_size) for x in k]
        total = 1 + sum(pages) + extra_pages
        gen = torch.Generator().manual_seed(seed)
        ids = (torch.randperm(total - 1, generator=gen)[: sum(pages)] + 1).tolist()
        self.block_table = torch.zeros(len(k), max(pages), dtype=torch.int32)
        off = 0
        for s, p in enumerate(pages):
            self.block_table[s, :p] = torch.tensor(ids[off: off + p], dtype=torch.int32)
            off += p
        self.block_table = self.block_table.to(dev)
        # token_rerank (CAB_TOKEN_SCORER=int4 or fp8, token_scorer): each page ends with that key copy, as the
        # engine's padded pages
        self.token_rerank, self.codes = token_rerank, None
        page_elems = hkv * page_size * 2 * d
        if token_rerank is not None:
            from cab_vllm.ops.key_codes import page_tail_bytes

            page_elems += page_tail_bytes(page_size, hkv, d, token_scorer) * 8 // torch.finfo(dtype).bits
        flat = torch.full((total * page_elems,), float("nan"), dtype=dtype, device=dev)
        self.kv = flat.as_strided((total, hkv, page_size, 2 * d), (page_elems, page_size * 2 * d, 2 * d, 1))
        if token_rerank is not None:
            from cab_vllm.backend.compat import key_codes_view

            self.codes = key_codes_view(self.kv, d, token_scorer)
        kv = self.kv.transpose(1, 2)
        self.key_cache, self.value_cache = kv[..., :d], kv[..., d:]
        self.done = [0] * len(k)  # tokens already in the cache per sequence
        self.prompt_lens: dict = {}  # sequence -> prompt length (unknown: a chunk's end is taken as the prompt's)
        self.prompt_slots = PromptSlots(len(k) + 2)  # request id of sequence s: f"req-{s}"
        self.table = PromptTable(len(k) + 2, hkv, max(pages) * page_size // cfg.block_size + 1, dev)
        # key summaries kept across chunks (the engine's default is on; 0 here keeps the older tests' path)
        self.summary_slots = SummarySlots(summary_slots) if summary_slots else None
        self.summaries = (KeySummaries(summary_slots, hkv, max(pages) * page_size // cfg.block_size + 1, d,
                                       cfg.estimator, dtype, dev) if summary_slots else None)

    def slots(self, s: int, a: int, b: int) -> torch.Tensor:
        pos = torch.arange(a, b, device=self.block_table.device)
        return self.block_table[s].long()[pos // self.page_size] * self.page_size + pos % self.page_size

    def step(self, rows: list[tuple[int, int]], cfgs: list[CABConfig] | None = None, dense_threshold: int = 0,
             impl: str = "auto", scale: float | None = None, fa_prefill=None) -> tuple[torch.Tensor, dict]:
        """Run one engine step: rows = [(sequence, new tokens)], in batch order. Writes the new K/V through
        slot_mapping, plans, and runs attend (fa_prefill: attend's). Returns (out [T, Hq, D], the metadata
        tensors used)."""
        dev = self.block_table.device
        hq, d = self.q[0].shape[0], self.q[0].shape[-1]
        qsl, sl, slots, qs, ks, vs = [0], [], [], [], [], []
        for s, n_new in rows:
            a, b = self.done[s], self.done[s] + n_new
            qsl.append(qsl[-1] + n_new)
            sl.append(b)
            slots.append(self.slots(s, a, b))
            qs.append(self.q[s][:, a:b].transpose(0, 1))
            ks.append(self.k[s][:, a:b].transpose(0, 1))
            vs.append(self.v[s][:, a:b].transpose(0, 1))
            self.done[s] = b
        slot_mapping = torch.cat(slots)
        q, k, v = torch.cat(qs), torch.cat(ks), torch.cat(vs)
        write_kv(k, v, self.key_cache, self.value_cache, slot_mapping)
        qsl_t = torch.tensor(qsl, dtype=torch.int32)
        sl_t = torch.tensor(sl, dtype=torch.int32)
        bt = self.block_table[torch.tensor([s for s, _ in rows], device=dev)]
        if self.codes is not None:  # every step, as the engine's layers do
            from cab_vllm.ops.key_codes import encode_keys

            encode_keys(self.key_cache, self.codes, bt, sl_t.to(dev), torch.diff(qsl_t).to(dev, torch.int32),
                        impl=impl)
        cfgs = cfgs or [self.cfg] * len(rows)
        live = frozenset(f"req-{s}" for s in range(len(self.k)) if s not in getattr(self, "finished", ()))
        plan = plan_batch(qsl_t, sl_t, cfgs, dense_threshold, count=False, req_ids=[f"req-{s}" for s, _ in rows],
                          live=live, prompt_lens=[self.prompt_lens.get(s) for s, _ in rows])
        route_rows(plan, self.prompt_slots, fa_dense=False, summaries=self.summary_slots)
        out = torch.full((q.shape[0], hq, d), float("nan"), dtype=q.dtype, device=dev)
        scale = 1.0 / math.sqrt(d) if scale is None else scale
        record: dict = {}
        attend(q, self.key_cache, self.value_cache, bt, sl_t.to(dev), plan, scale, out, impl, record=record,
               table=self.table, summaries=self.summaries, fa_prefill=fa_prefill,
               key_codes=(self.codes, self.token_rerank) if self.codes is not None else None)
        return out, dict(query_start_loc=qsl_t, seq_lens=sl_t, block_table=bt, slot_mapping=slot_mapping, plan=plan,
                         rows=rows, **record)


def check_step(sim: "PagedSim", out: torch.Tensor, md: dict, max_rows: int = 256, seed: int = 0) -> float:
    """Largest relative error, over the batch's rows, of ``out`` against float32 attention restricted to the
    recorded selection (dense rows: all causal keys). Long rows are checked on up to ``max_rows`` sampled
    query positions (always including the first and the last)."""
    bs = sim.cfg.block_size
    plan = md["plan"]
    sel = {r: ("decode", i) for i, r in enumerate(plan.decode_rows)}
    sel.update({r: ("prefill", i) for i, r in enumerate(plan.prefill_rows)})
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for r, (s, n_new) in enumerate(md["rows"]):
        if n_new == 0:
            continue
        n = int(md["seq_lens"][r])
        ctx = n - n_new
        rel = torch.arange(n_new)
        if n_new > max_rows:
            rel = torch.cat([torch.tensor([0, n_new - 1]), torch.randperm(n_new, generator=gen)[: max_rows - 2]])
        pos = (rel + ctx).to(sim.block_table.device)
        kind, i = sel[r]
        m = (n - 1) // bs + 1
        by_row = kind == "prefill" and md["prefill"][i] is None  # a chunk run as decode rows: a selection per row
        if kind == "decode":
            idx, cnt = md["decode"][0][i][None], md["decode"][1][i][None]  # [1, Hkv, K]
            first = (n - 1) // bs
        elif by_row:
            pieces = md["as_decode"][r]
            width = max(p[0].shape[-1] for p in pieces)
            idx = torch.cat([torch.nn.functional.pad(p[0], (0, width - p[0].shape[-1]), value=-1) for p in pieces])
            cnt = torch.cat([p[1] for p in pieces])  # [n_new, Hkv]
        else:
            idx, cnt, first = md["prefill"][i]
        live = torch.arange(idx.shape[-1], device=idx.device) < cnt[..., None]
        blk = torch.zeros(*idx.shape[:2], m + 1, dtype=torch.bool, device=idx.device)
        blk.scatter_(-1, torch.where(live, idx.long(), m), True)
        blk = blk[..., :m]  # [R, Hkv, m]
        q = sim.q[s][:, pos].float()  # [Hq, P, D]
        k, v = sim.k[s][:, :n].float(), sim.v[s][:, :n].float()
        g = q.shape[0] // k.shape[0]
        kpos = torch.arange(n, device=q.device)
        allowed = (blk[rel.to(blk.device)] if by_row else blk[pos // bs - first])[..., kpos // bs]  # [P, Hkv, n]
        allowed = allowed & (kpos[None, None, :] <= pos[:, None, None])
        allowed = allowed.permute(1, 0, 2).repeat_interleave(g, 0)  # [Hq, P, n]
        sc = (q @ k.repeat_interleave(g, 0).transpose(-1, -2)) / math.sqrt(q.shape[-1])
        ref = torch.softmax(sc.masked_fill(~allowed, float("-inf")), -1) @ v.repeat_interleave(g, 0)
        got = out[md["query_start_loc"][r].item() + rel.to(out.device)].transpose(0, 1)
        worst = max(worst, rel_err(got, ref))
    return worst


def dense_rows(q, k, v, s: int, a: int, b: int, scale: float | None = None) -> torch.Tensor:
    """Dense causal attention (float64) of sequence s's queries a..b-1 over its keys 0..b-1: [b-a, Hq, D]."""
    qq, kk, vv = q[s][:, a:b].double(), k[s][:, :b].double(), v[s][:, :b].double()
    g = qq.shape[0] // kk.shape[0]
    kk, vv = kk.repeat_interleave(g, 0), vv.repeat_interleave(g, 0)
    d = qq.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    sc = qq @ kk.transpose(-1, -2) * scale
    pos_q = torch.arange(a, b, device=sc.device)[:, None]
    pos_k = torch.arange(b, device=sc.device)[None, :]
    sc = sc.masked_fill(pos_k > pos_q, float("-inf"))
    return (torch.softmax(sc, -1) @ vv).transpose(0, 1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))
