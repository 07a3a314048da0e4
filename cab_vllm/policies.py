"""Block-selection policies, side by side, all at the same budget (CABConfig.keep_counts; with
CABConfig.budget="adaptive", cab/magnitude/h2o/curvature split the same total over KV heads and query blocks by
estimated attention mass: config.adaptive_keep_counts).

Every policy keeps the sink and local blocks, then fills the rest of each query block's budget by its own
rule. Selections are per KV head (Hsel = Hkv): the G query heads of a group share one selection, so a
kernel reads each selected key block once per group.

  dense      every causal block (sparsity ignored).
  streaming  sink + the most recent blocks (StreamingLLM).
  random     sink + local + uniformly random causal blocks (seeded).
  magnitude  highest estimated attention mass, max over the group's heads (keeps a block any head needs).
  curvature  most-negative curvature F of the group's mean graph (the seed's bridges).
  h2o        heavy hitters: largest attention mass accumulated over all earlier query blocks, plus a recent
             window (h2o_recent_share of the free budget) — coarse, block-level H2O.
  cab        the product default: magnitude on the configured estimator, with the answer-producing rows
             (the sequence's last ``exact_rows`` query tokens, i.e. the last query block) scored exactly
             against every key, and ``curvature_share`` of the free budget given to most-negative F first.

Row-local policies (rows_only): dense, streaming, magnitude and cab without a curvature share choose a query
block's key blocks from that block's own row of the estimate, so the selection of query blocks first .. M-1
(a chunk of a prompt) needs only those rows: estimate(..., q_block_offset=first) and
select_from_attention(..., q_block_offset=first) compute them at O((M - first) M) cost, identical to the
rows first .. M-1 of the square. curvature and h2o read other rows (column sums, A.A, the cumulative mass)
and random draws its noise over the whole square: they need the full [M, M] estimate.
"""

from __future__ import annotations

import functools
import math

import torch

from cab_vllm.config import SUMMARY_ESTIMATORS, CABConfig, adaptive_keep_counts, keep_counts
from cab_vllm.ops.coarsen import estimate_grouped, group_reduce, sampled_block_attention
from cab_vllm.ops.curvature import curvature
from cab_vllm.ops.blocks import causal_block_mask, num_blocks
from cab_vllm.ops.select import decode_priority, forced_mask, is_forced, select_tiered, select_topk


def _free_counts(keep: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    return (keep - forced.sum(-1)).clamp(min=0)


def rows_only(cfg: CABConfig) -> bool:
    """Whether cfg.policy selects each query block from its own row of the estimate alone (see the module
    docstring): then a subset of the rows can be estimated and selected without the full square."""
    return cfg.policy in ("dense", "streaming", "magnitude") or (cfg.policy == "cab" and cfg.curvature_share == 0)


def uses_exact_rows(cfg: CABConfig) -> bool:
    """Whether cfg's estimate scores the last query block from its last query tokens exactly (reads every key)."""
    return cfg.policy == "cab" and cfg.exact_rows > 0


def uses_vertical_blocks(cfg: CABConfig) -> bool:
    """Whether every chunk of cfg's prompts scores its last query tokens exactly and every query block ranks key blocks
    by the larger of its estimate and those scores (CABConfig.vertical_blocks; the cab policy only)."""
    return cfg.vertical_blocks and uses_exact_rows(cfg)


def scores_chunk_end(cfg: CABConfig, final: bool) -> bool:
    """Whether a chunk's selection scores its last query tokens exactly against every key (the only selection step
    that reads every key): cab's exact rows in the chunk that ends the prompt (final), in every chunk with
    vertical_blocks."""
    return uses_exact_rows(cfg) and (final or cfg.vertical_blocks)


def fused_select_ok(cfg: CABConfig) -> bool:
    """Whether ops.fused_select.estimate_select can select for cfg: a row-local policy ranking by the estimate's
    group max (cab without a curvature share, magnitude), the fixed budget, an estimator with key summaries."""
    return (cfg.policy in ("cab", "magnitude") and cfg.curvature_share == 0 and not cfg.adaptive
            and cfg.estimator in SUMMARY_ESTIMATORS)


def estimate_and_select(q: torch.Tensor, k: torch.Tensor | None, cfg: CABConfig, q_block_offset: int,
                        summary: torch.Tensor, n_keys: int, exact: bool = True, impl: str = "auto",
                        rows_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """select_from_attention(*estimate(q, k, cfg, summary=summary, ...), cfg) in two Triton launches
    (ops.fused_select) for a cfg that fused_select_ok accepts: the same return, the same selection except among
    tied scores. q [1, Hq, N - q_block_offset * bs, D]; summary [1, Hkv, M, W] of the n_keys keys; k [1, Hkv, N,
    D] (or ops.blocks.PagedKeys) is read only for cab's exact rows (when scores_chunk_end(cfg, exact)). rows_first:
    indices [Mq, Hkv, K] and counts [Mq, Hkv] instead (ops.fused_select.estimate_select)."""
    from cab_vllm.ops.fused_select import estimate_select

    if not fused_select_ok(cfg):
        raise ValueError(f"estimate_and_select cannot select for {cfg}")
    m = num_blocks(n_keys, cfg.block_size)
    mq = m - q_block_offset
    vertical = uses_vertical_blocks(cfg)
    ex = exact_last_row(q, k, cfg, q_block_offset, impl)[0][0, :, 0] if scores_chunk_end(cfg, exact) else None
    keep = cfg.keep_counts(m, q.device, answer=exact, prompt=True)[q_block_offset:]  # the prompt's end: the answer row
    return estimate_select(q, summary, n_keys, keep, max_keep(cfg, q_block_offset, mq, exact), cfg.block_size,
                           cfg.estimator, cfg.sink_blocks, cfg.local_blocks, q_block_offset, ex, rows_first=rows_first,
                           exact_last=exact, blend=vertical)


def select_from_attention(a_max: torch.Tensor, a_mean: torch.Tensor, cfg: CABConfig, impl: str = "auto",
                          q_block_offset: int = 0, answer: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply cfg.policy to estimated block attention (both [B, Hkv, Mq, M], row-stochastic, causal).

    Row r is query block q_block_offset + r; q_block_offset = 0 with Mq = M is the full square, any other
    row subset needs a rows_only policy (ValueError otherwise) and gives the rows q_block_offset ..
    q_block_offset + Mq - 1 of the square's selection (the adaptive budget too when the rows hold whole windows
    of cfg.budget_window query blocks, the prompt's last window excepted).
    Counts: CABConfig.keep_counts per query block (budget="fixed"), or with cfg.adaptive per (sequence, KV
    head, query block) from config.adaptive_keep_counts on a_max, each window of query blocks keeping the fixed
    total.
    answer: the last row is the prompt's last query block (it produces the answer): it keeps at least
    cfg.answer_blocks (CABConfig.answer_keep), on top of either budget, and every causal block with answer_dense.
    Returns (indices [B, Hkv, Mq, K] int32 ascending -1 padded, counts [B, Hkv, Mq] int32).
    """
    mq, m, dev = a_max.shape[-2], a_max.shape[-1], a_max.device
    first = q_block_offset
    if first < 0 or first + mq > m:
        raise ValueError(f"{mq} query blocks from block {first} do not fit {m} key blocks")
    if (first, mq) != (0, m) and not rows_only(cfg):
        raise ValueError(f"policy {cfg.policy!r} (curvature_share={cfg.curvature_share}) needs the full "
                         f"[M, M] estimate, got rows {first}..{first + mq - 1} of {m}")
    allowed = causal_block_mask(m, dev, first, mq)
    policy = cfg.policy
    budget = cfg.replace(sparsity=0.0) if policy == "dense" else cfg
    keep = budget.keep_counts(first + mq, dev)[first:]
    kmax = max_keep(budget, first, mq, answer)  # on the host: no device sync in the selection
    forced = forced_mask(m, cfg.sink_blocks, cfg.local_blocks, dev, first, mq)
    if cfg.adaptive:  # per (KV head, query block) counts [B, Hkv, Mq] from the estimated mass, same total
        keep = adaptive_keep_counts(a_max, allowed, forced, keep, cfg.top_p, cfg.budget_floor, cfg.budget_cap,
                                    first, cfg.budget_window)
    if answer and cfg.raises_answer_row and mq > 0:  # the answer row (CABConfig.answer_keep)
        keep = keep.clone()
        keep[..., -1] = cfg.answer_floor(keep[..., -1], first + mq, prompt=True)
    fx = forced.expand_as(a_max)
    if policy == "dense":
        return select_topk(torch.where(allowed, 0.0, float("-inf")).expand_as(a_max), keep, kmax)
    if policy == "streaming":
        recency = torch.arange(m, device=dev, dtype=torch.float32).expand_as(a_max)
        return select_tiered([fx, recency], keep, allowed, kmax)
    if policy == "random":
        gen = torch.Generator().manual_seed(cfg.seed)
        noise = torch.rand(a_max.shape, generator=gen).to(dev)
        return select_tiered([fx, noise], keep, allowed, kmax)
    if policy == "magnitude":
        return select_tiered([fx, a_max], keep, allowed, kmax)
    if policy == "curvature":
        return select_tiered([fx, -curvature(a_mean, impl=impl)], keep, allowed, kmax)
    if policy == "h2o":
        acc = a_mean.cumsum(dim=-2)  # mass each key block has collected from query blocks <= i
        n_recent = torch.round(_free_counts(keep, forced) * cfg.h2o_recent_share).long()
        i = torch.arange(m, device=dev)
        # the n_recent blocks just left of the local window
        lo = (i - cfg.local_blocks + 1 - n_recent)[..., None]
        recent = (i[None, :] >= lo) & allowed
        return select_tiered([fx, recent.expand_as(a_max), acc], keep, allowed, kmax)
    if policy == "cab":
        tiers = [fx]
        if cfg.curvature_share > 0:
            n_curv = torch.round(_free_counts(keep, forced) * cfg.curvature_share).long()
            curv_pri = torch.where(fx, float("-inf"), -curvature(a_mean, impl=impl))
            ci, cc = select_topk(curv_pri.masked_fill(~allowed, float("-inf")), torch.minimum(n_curv, keep), kmax)
            chosen = torch.zeros(*a_max.shape[:-1], m + 1, dtype=torch.bool, device=dev)
            chosen.scatter_(-1, torch.where(ci >= 0, ci.long(), m), True)
            tiers.append(chosen[..., :m])
        return select_tiered(tiers + [a_max], keep, allowed, kmax)
    raise ValueError(f"unknown policy {policy!r}")


def max_keep(cfg: CABConfig, first: int, mq: int, answer: bool = False) -> int:
    """The most key blocks any (KV head, query block) of rows first .. first+mq-1 keeps under cfg's budget,
    from host arithmetic (no device sync): the fixed rule's count grows with the row, so its last row's; the
    adaptive rule keeps at most floor(budget_cap * fixed) of a row's causal blocks (config.adaptive_keep_counts);
    answer: the last row (the prompt's) keeps at least cfg.answer_blocks, every block with cfg.answer_dense
    (select_from_attention)."""
    if mq <= 0:
        return 0
    last = first + mq - 1
    fixed = int(keep_counts(cfg.sparsity, cfg.sink_blocks + cfg.local_blocks, last + 1).numpy()[-1])  # host
    most = fixed if not cfg.adaptive else min(last + 1, max(fixed, math.floor(fixed * cfg.budget_cap + 1e-9)))
    return cfg.answer_keep(most, last + 1, prompt=True) if answer else most


def estimate(q: torch.Tensor, k: torch.Tensor | None, cfg: CABConfig, impl: str = "auto", q_block_offset: int = 0,
             summary: torch.Tensor | None = None, n_keys: int | None = None, exact: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimated block attention per KV head for cfg: (max over the group's heads, mean), each
    [B, Hkv, Mq, M]. k [B, Hkv, N, D] holds all keys; q [B, Hq, N - q_block_offset * bs, D] the queries of
    query blocks q_block_offset .. M-1 (Mq = M - q_block_offset; 0: the full square; see
    coarsen.estimate_block_attention). The cab policy replaces the last query block's row by exact scores
    of its last ``exact_rows`` query tokens (the rows that produce the answer), when ``exact``; with
    CABConfig.vertical_blocks every row takes, per key block, the larger of its estimate and those scores.
    summary: the keys' block summaries (coarsen.key_summary for cfg.estimator) of n_keys keys, used instead of
    pooling k; k is then read only for the exact rows (None when scores_chunk_end(cfg, exact) is False)."""
    a_max, a_mean = estimate_grouped(q, k, cfg.block_size, cfg.estimator, cfg.num_reps, cfg.sample_rows, impl=impl,
                                     q_block_offset=q_block_offset, summary=summary, n_keys=n_keys)
    if scores_chunk_end(cfg, exact):
        emax, emean = exact_last_row(q, k, cfg, q_block_offset, impl)
        if uses_vertical_blocks(cfg):  # every row: the larger of its estimate and the chunk end's, causal blocks only
            mq, m = a_max.shape[-2:]
            allowed = causal_block_mask(m, a_max.device, q_block_offset, mq)
            a_max = torch.where(allowed, torch.maximum(a_max, emax), a_max)
            a_mean = torch.where(allowed, torch.maximum(a_mean, emean), a_mean)
        if exact:
            a_max[:, :, -1], a_mean[:, :, -1] = emax[:, :, 0], emean[:, :, 0]
    return a_max, a_mean


def exact_last_row(q: torch.Tensor, k: torch.Tensor | None, cfg: CABConfig, q_block_offset: int = 0,
                   impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """cab's exact scores of the last query block from its last cfg.exact_rows query tokens against every key,
    reduced over each GQA group: (max, mean), each [B, Hkv, 1, M]. q as in estimate; k [B, Hkv, N, D] or
    ops.blocks.PagedKeys (read in place)."""
    if k is None:
        raise ValueError("the cab policy's exact rows need the keys (k is None)")
    last = torch.full((1,), num_blocks(k.shape[2], cfg.block_size) - 1, device=q.device)  # no host copy
    ex = sampled_block_attention(q, k, cfg.block_size, cfg.exact_rows, last, impl=impl,
                                 q_offset=q_block_offset * cfg.block_size)
    return group_reduce(ex, k.shape[1])


def extend_prompt_selection(indices: torch.Tensor, counts: torch.Tensor, prompt_blocks: int, num_blocks_now: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt decode rule (CABConfig.decode_rule): a prompt's last-query-block selection plus every key
    block that starts after the prompt.

    indices [..., K] int32 ascending, -1 padded (all < prompt_blocks); counts [...] int32 ->
    (indices [..., K + num_blocks_now - prompt_blocks] ascending, -1 padded; counts + the new blocks).
    """
    new = torch.arange(prompt_blocks, num_blocks_now, device=indices.device, dtype=torch.int32)
    big = torch.iinfo(torch.int32).max
    idx = torch.cat([torch.where(indices < 0, big, indices), new.expand(*indices.shape[:-1], -1)], dim=-1)
    idx = idx.sort(-1).values
    return torch.where(idx == big, -1, idx).contiguous(), counts + new.numel()


@functools.lru_cache(maxsize=64)
def _keep_table(cfg: CABConfig, num_blocks: int, device: str) -> torch.Tensor:
    """Device-resident decode budgets: entry m is what a decode query in block m keeps (keep_counts, at least
    cfg.answer_blocks: decode queries produce the answer); decode steps index it without a host-to-device copy."""
    t = cfg.keep_counts(num_blocks)
    if cfg.answer_blocks:
        t = torch.minimum(torch.arange(1, num_blocks + 1), t.clamp(min=cfg.answer_blocks))
    return t.to(device)


def select_decode_blocks(q: torch.Tensor, k_lo: torch.Tensor, k_hi: torch.Tensor, seq_lens: torch.Tensor,
                         cfg: CABConfig, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Key blocks for one decode query per sequence (Quest-style: the real query against block bounds).

    q [S, Hq, D]; k_lo, k_hi [S, Hkv, Mmax, D]: per-block elementwise min/max of the keys (as ops.coarsen.pool
    gives, cached per full block by the backend); seq_lens [S] int32 (the query sits at seq_lens - 1).
    The query's block m = (seq_len - 1) // block_size keeps CABConfig.keep_counts(m + 1)[-1] blocks.
    Returns (indices [S, Hkv, K] int32 ascending -1 padded, counts [S, Hkv] int32); no host sync.
    """
    # a prompt-rule policy without its prompt selection decodes by the bounds, as the engine's rows do
    scoring = "bounds" if cfg.decode_scoring == "prompt" else cfg.decode_scoring
    s, hkv, mmax = q.shape[0], k_lo.shape[1], k_lo.shape[2]
    dev = q.device
    keep_all = _keep_table(cfg.replace(sparsity=0.0) if scoring == "all" else cfg, mmax, str(dev))
    keep = keep_all[(seq_lens.long() - 1) // cfg.block_size]  # [S]
    if scoring == "bounds":
        pri = decode_priority(q, k_lo, k_hi, seq_lens, cfg.block_size, cfg.sink_blocks, cfg.local_blocks, impl)
    else:
        jj = torch.arange(mmax, device=dev)
        if scoring == "recent":
            score = jj.float().expand(s, hkv, mmax)
        elif scoring == "random":
            score = torch.rand(s, hkv, mmax, generator=torch.Generator().manual_seed(cfg.seed)).to(dev)
        else:
            score = torch.zeros(s, hkv, mmax, device=dev)
        last = (seq_lens.long() - 1) // cfg.block_size
        forced = is_forced(jj[None, :], last[:, None], cfg.sink_blocks, cfg.local_blocks)
        pri = score.masked_fill(forced[:, None], float("inf"))
        pri = pri.masked_fill((jj[None, :] > last[:, None])[:, None], float("-inf"))
    idx, cnt = select_topk(pri.transpose(0, 1), keep, kmax=int(keep_all[-1]))  # rows = sequences
    return idx.transpose(0, 1).contiguous(), cnt.transpose(0, 1).contiguous()
