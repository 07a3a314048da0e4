"""Zero-shot swap of CAB (or any baseline policy) into a pretrained transformers model.

    import cab_vllm.hf as cab_hf
    cab_hf.register()                                        # adds attn_implementation="cab"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="cab")
    with cab_hf.using(CABConfig(sparsity=0.95, policy="h2o")):
        model.generate(...)

Prefill (query length == key length) runs select_blocks + sparse_attention on the model's post-RoPE Q/K.
Decode (one query token): with the prompt rule (CABConfig.decode_rule "prompt", or "auto" for cab/h2o/curvature)
a step keeps the key blocks chosen for the prompt's last query block plus every block that starts after the
prompt; with "bounds" (and "auto" for magnitude) it re-selects per step from Quest-style bounds with the real
query (h2o/curvature through cab's rule); streaming/random/dense keep their own rules.
Outside ``using(...)`` (or with cfg None, or policy "dense") the layer computes dense causal attention (SDPA).
``capture()`` records each layer's post-RoPE (query, key) of a prefill, for calibration.
Only unpadded causal batches are supported (a padding mask raises).
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from cab_vllm.api import select_blocks, sparse_attention
from cab_vllm.config import CABConfig
from cab_vllm.ops.coarsen import pool
from cab_vllm.ops.decode import paged_sparse_decode
from cab_vllm.ops.blocks import block_lengths, causal_block_mask, num_blocks, selection_to_block_mask
from cab_vllm.ops.reference import sparse_attention_ref
from cab_vllm.ops.select import forced_mask
from cab_vllm.policies import extend_prompt_selection, select_decode_blocks

ATTN_NAME = "cab"


def _new_stats() -> dict:
    return {"prefill_calls": 0, "decode_calls": 0, "kept": 0, "causal": 0}


VERTICAL_ROWS = 64  # prefill="vertical": the prompt's last rows whose exact attention ranks the keys
VERTICAL_LOCAL = 64  # prefill="vertical": each row's most recent keys, always kept


@dataclass
class _State:
    cfg: CABConfig | None = None
    impl: str = "auto"
    phases: str = "both"
    layers: tuple[int, int] | None = None
    early: tuple[int, float] | None = None
    compensate: str | None = None
    tokens: tuple[str, int, bool] | None = None
    prefill: str | None = None
    prefill_chunk: int | None = None
    prefill_rows: int = VERTICAL_ROWS
    prefill_pooled: bool = False
    prefill_est: TokenSpec | None = None
    prefill_within: float | None = None
    prefill_cand: str = "cab"
    captures: list | None = None
    prompt_sel: dict = field(default_factory=dict)  # layer -> (indices [B, Hkv, K], counts, prompt blocks)
    stats: dict = field(default_factory=lambda: _new_stats())


_STATE = _State()


PHASES = ("both", "prefill", "decode")
COMPENSATIONS = ("mean", "mass")
ORACLES = ("token",)
PREFILLS = ("vertical", "vslash")
CANDIDATES = ("cab", "rowbounds")  # prefill_within's candidate blocks: cab's selection, or each row's box bounds
_TOKENS_RE = re.compile(r"(?:(exact)|(pca|sparqb|sparqg|sparq|dims)([1-9][0-9]*)|(intc|int)([2-8]))"
                        r"(?:x([1-9][0-9]*))?(kv)?")
CHANNEL_GROUP = 16  # intcB: tokens per group of a channel's quantization range (a vLLM page of 16 tokens)
DIM_GROUP = 16  # dimsR ranks keys by whole groups of this many dimensions (32 bytes of a bf16 key: one DRAM sector)


class TokenSpec(NamedTuple):
    """A token selector (parse_tokens): its kind, parameter (dimensions or bits), whether the KV group shares one set
    of keys, and the rerank factor (0: the estimate picks the keys; F: it picks F times as many candidates, which
    their exact scores narrow down)."""

    kind: str
    param: int
    shared: bool
    rerank: int = 0


def parse_tokens(spec: str) -> TokenSpec:
    """A token selector's name -> TokenSpec(kind, parameter, shared, rerank): "exact" (the oracle: every key's exact
    score), "pcaR" (scores of the keys and query projected on the layer's R leading key directions, key_basis),
    "sparqR" (each query's R largest-magnitude dimensions, SparQ's first step), "sparqgR" (the same R dimensions for
    every query head of a KV group: the largest of the group's summed |q|, so a group reads R dimensions of each
    key, not up to G x R), "sparqbR" (the same R dimensions for every query head of a KV group and every row ranked
    together: one query block's with prefill_chunk = the block size, what a tiled kernel gathers once per block;
    prefill_est only), "dimsR" (R fixed dimensions per layer and KV head, in aligned groups of DIM_GROUP, chosen
    once from a dense calibration pass (key_dims): what a kernel reads in whole 32-byte sectors of the cache as it
    is; R a multiple of DIM_GROUP), "intB" (keys rounded to B bits, per token and group of 32 dimensions, against
    the exact query), "intcB" (keys rounded to B bits per channel, each channel's range over groups of CHANNEL_GROUP
    tokens, asymmetric: what outlier channels need, quantize_keys_channel); an "xF" suffix (rerank F) makes the
    estimate pick F times the budget as candidates and keeps the budget's best of them by exact score (what a kernel
    that scores a compressed key copy, then reads the candidates' keys, keeps: "int4x4"); a "kv" suffix (shared)
    keeps one set of keys per KV head and query token, the largest of the group's summed (estimated) softmax,
    instead of one per query head (what a kernel that serves the group's heads from one gather needs). ValueError
    for anything else."""
    m = _TOKENS_RE.fullmatch(spec) if isinstance(spec, str) else None
    if m is None:
        raise ValueError(f"tokens={spec!r} must be 'exact', 'pcaR', 'sparqR', 'sparqgR', 'sparqbR' (R >= 1 "
                         f"dimensions) or 'intB' or 'intcB' (2 <= B <= 8 bits), each with an optional 'xF' (rerank) or "
                         f"'kv' suffix")
    shared, rerank = m.group(7) is not None, int(m.group(6) or 0)
    if rerank and (m.group(1) or shared):
        raise ValueError(f"tokens={spec!r}: 'xF' reranks an estimate's candidates per query head: not with 'exact' "
                         f"or 'kv'")
    if m.group(1):
        return TokenSpec("exact", 0, shared)
    if m.group(2) == "dims" and int(m.group(3)) % DIM_GROUP:
        raise ValueError(f"tokens={spec!r}: dimsR takes R a multiple of {DIM_GROUP} (whole groups of dimensions)")
    if m.group(2):
        return TokenSpec(m.group(2), int(m.group(3)), shared, rerank)
    return TokenSpec(m.group(4), int(m.group(5)), shared, rerank)


def parse_row_tokens(spec: str) -> TokenSpec:
    """The tokens= selector (each row's own keys): parse_tokens' names but sparqbR, whose dimensions are shared by the
    rows ranked together (a prefill_est selector) -> TokenSpec; ValueError for anything else."""
    t = parse_tokens(spec)
    if t.kind == "sparqb":
        raise ValueError(f"tokens={spec!r}: sparqbR shares dimensions across the rows ranked together: a prefill_est "
                         f"selector (with prefill='vertical'), not a per-row one")
    return t


def parse_prefill_est(spec: str) -> TokenSpec:
    """prefill_est's selector (parse_tokens' names without a suffix, not "exact": exact scores are the default) ->
    TokenSpec; ValueError for anything else."""
    t = parse_tokens(spec)
    if t.kind == "exact" or t.shared or t.rerank:
        raise ValueError(f"prefill_est={spec!r} must be an estimate without a suffix (e.g. 'sparqb16', 'pca16'): the "
                         f"ranking rows' exact scores are the default, and their mass is summed over the group anyway")
    return t


@contextlib.contextmanager
def using(cfg: CABConfig | None, impl: str = "auto", phases: str = "both", layers: tuple[int, int] | None = None,
          early: tuple[int, float] | None = None, compensate: str | None = None, oracle: str | None = None,
          tokens: str | None = None, prefill: str | None = None, prefill_chunk: int | None = None,
          prefill_rows: int | None = None, prefill_pooled: bool = False, prefill_est: str | None = None,
          prefill_within: float | None = None, prefill_cand: str = "cab"):
    """Run the model's "cab" attention layers with ``cfg`` (None = dense) inside the block; yields a dict
    counting prefill/decode calls and kept/causal key blocks (achieved density = kept / causal).
    phases: "both", or "prefill" / "decode" to sparsify only that phase (the other runs dense) — an ablation
    of where sparsity costs accuracy. "decode" needs a policy with a decode rule of its own.
    layers: (lo, hi) sparsifies only layers lo <= layer_idx < hi; the others attend densely and are counted in
    kept/causal as keeping every causal block (the density is the whole model's) — an ablation of which layers'
    sparsity costs accuracy. early: (n, s) runs layers below n at sparsity s, the others at cfg's (a budget moved
    between layers: the achieved density counts what each layer kept). compensate: "mean" or "mass" adds to every
    sparse prefill row the key blocks it dropped, each as one token (its block's mean key and mean value), with the
    estimated ("mean": exp of the score against the mean key, times the block's length) or exact ("mass": an oracle
    that scores every key) share of the softmax — an ablation of whether what sparse attention loses is the dropped
    blocks' average (PyTorch only; the achieved density counts the kept blocks). oracle: "token" makes every sparse
    row (prefill and decode) attend to its own highest-scoring keys, token by token and per query head, as many as
    the blocks its policy kept hold (token_oracle_attention) — an ablation of what 64-token blocks cost at the
    same density (PyTorch; the achieved density is the block selection's). tokens: the same with the keys ranked by
    an estimate instead of their exact scores (parse_tokens: "exact" = oracle="token", "pcaR", "sparqR", "sparqgR",
    "dimsR", "intB", each with a "kv" suffix for one set per KV group; the kept keys' exact scores enter the
    softmax) — what a training-free token selector keeps of the oracle's accuracy. "pcaR" and "dimsR" need each
    attention module's key basis and dimension order (calibrate_key_basis). prefill: "vertical" makes every sparse
    prefill row keep, as many keys as its kept blocks hold, its VERTICAL_LOCAL most recent keys and the rest from
    one ranking of the keys per KV head, their attention mass in the prompt's last VERTICAL_ROWS rows (exact scores,
    summed over the group's query heads): MInference's vertical lines at token granularity, a set a tiled kernel
    can gather once per head (vertical_attention; decode follows the policy's own rule). "vslash" ranks key j for
    row i by the larger of j's and of the offset i - j's mass in those rows (MInference's vertical and slash lines).
    prefill_chunk: with either, the prompt's rows in chunks of this many rows, each ranking the keys by its own last
    rows, as a chunked prefill must (chunked_vertical_attention; None: the whole prompt's last rows rank for all).
    prefill_rows: with either, how many of those last rows rank (default VERTICAL_ROWS; with prefill_chunk set to the
    block size, each query block's keys chosen by a few of its own rows). prefill_pooled: those rows' mean query
    ranks instead (one row per head: 1/R of the rows' products; vertical only). prefill_est: those rows' scores
    estimated by a token selector (parse_prefill_est: e.g. "sparqb16", the R dimensions of largest |q| over the
    rows and the group, or "pca16") instead of exact: what a cheaper ranking keeps (not with prefill_pooled).
    prefill_within: F >= 1, with prefill='vertical' and prefill_chunk = the block size (one query block per chunk):
    the ranking reads first among the tokens of the blocks cab's own selection keeps for that query block at F times
    the budget (sparsity 1 - F * (1 - s)), every other key after them: the keys a kernel would score exactly
    (F x the budget of each block's rows' products) to pick the budget's tokens from (the kept count is the
    selection's at s, as without it). prefill_cand: which blocks are those candidates, "cab" (its selection, above)
    or "rowbounds" (as many blocks per query block and KV head as that selection keeps, ranked row by row by every
    query row's box bound on each key block: row_bound_candidates)."""
    if prefill_cand not in CANDIDATES:
        raise ValueError(f"prefill_cand={prefill_cand!r} must be one of {CANDIDATES}")
    if prefill_cand != "cab" and prefill_within is None:
        raise ValueError(f"prefill_cand={prefill_cand!r} chooses prefill_within's candidates: it needs prefill_within")
    if prefill_chunk is not None and (prefill is None or prefill_chunk < 1):
        raise ValueError(f"prefill_chunk={prefill_chunk!r} needs prefill='vertical' or 'vslash' and a positive size")
    if prefill_rows is not None and (prefill is None or prefill_rows < 1):
        raise ValueError(f"prefill_rows={prefill_rows!r} needs prefill='vertical' or 'vslash' and a positive count")
    if prefill_pooled and prefill != "vertical":
        raise ValueError(f"prefill_pooled ranks vertical lines by a mean query: it needs prefill='vertical', got "
                         f"{prefill!r}")
    if prefill_est is not None and (prefill is None or prefill_pooled):
        raise ValueError(f"prefill_est={prefill_est!r} estimates the ranking rows' scores: it needs prefill='vertical' "
                         f"or 'vslash' and not prefill_pooled")
    est_sel = parse_prefill_est(prefill_est) if prefill_est is not None else None
    if prefill_within is not None:
        bs = None if cfg is None else cfg.block_size
        if not prefill_within >= 1:
            raise ValueError(f"prefill_within={prefill_within!r} must be >= 1 (times the budget)")
        if prefill != "vertical" or (cfg is not None and prefill_chunk != bs):
            raise ValueError(f"prefill_within={prefill_within!r} ranks each query block's keys among its wider "
                             f"selection's: it needs prefill='vertical' and prefill_chunk = the block size ({bs}), got "
                             f"prefill={prefill!r}, prefill_chunk={prefill_chunk!r}")
    if prefill is not None and prefill not in PREFILLS:
        raise ValueError(f"prefill={prefill!r} must be one of {PREFILLS} or None")
    if prefill is not None and (oracle or tokens or compensate) is not None:
        raise ValueError(f"prefill={prefill!r} chooses the prompt rows' keys itself: not with oracle, tokens or "
                         "compensate")
    if oracle is not None and oracle not in ORACLES:
        raise ValueError(f"oracle={oracle!r} must be one of {ORACLES} or None")
    if oracle is not None and tokens is not None:
        raise ValueError("oracle='token' is tokens='exact': give one of them")
    token_sel = parse_row_tokens("exact" if oracle == "token" else tokens) if (oracle or tokens) is not None else None
    if token_sel is not None and compensate is not None:
        raise ValueError("token selection (oracle/tokens) and compensate are two ablations of the sparse rows: "
                         "pick one")
    if compensate is not None and compensate not in COMPENSATIONS:
        raise ValueError(f"compensate={compensate!r} must be one of {COMPENSATIONS} or None")
    if phases not in PHASES:
        raise ValueError(f"phases={phases!r} must be one of {PHASES}")
    if phases == "decode" and cfg is not None and cfg.decodes_from_prompt:
        raise ValueError(f"policy {cfg.policy!r} decodes from its prompt selection; it cannot run decode-only")
    if layers is not None:
        lo, hi = layers
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo < hi):
            raise ValueError(f"layers={layers!r} must be (lo, hi) with 0 <= lo < hi")
    if early is not None and cfg is not None:
        cfg.replace(sparsity=early[1])  # a bad sparsity fails here, not in the first layer
    prev = (_STATE.cfg, _STATE.impl, _STATE.phases, _STATE.layers, _STATE.early, _STATE.compensate, _STATE.tokens,
            _STATE.prefill, _STATE.prefill_chunk, _STATE.prefill_rows, _STATE.prefill_pooled, _STATE.prefill_est,
            _STATE.prefill_within, _STATE.prefill_cand, _STATE.prompt_sel, _STATE.stats)
    _STATE.cfg, _STATE.impl, _STATE.phases, _STATE.layers, _STATE.early = cfg, impl, phases, layers, early
    _STATE.compensate, _STATE.tokens = compensate, token_sel
    _STATE.prefill, _STATE.prefill_chunk = prefill, prefill_chunk
    _STATE.prefill_rows = VERTICAL_ROWS if prefill_rows is None else prefill_rows
    _STATE.prefill_pooled = bool(prefill_pooled)
    _STATE.prefill_est = est_sel
    _STATE.prefill_within = None if prefill_within is None else float(prefill_within)
    _STATE.prefill_cand = prefill_cand
    _STATE.prompt_sel, _STATE.stats = {}, _new_stats()
    try:
        yield _STATE.stats
    finally:
        (_STATE.cfg, _STATE.impl, _STATE.phases, _STATE.layers, _STATE.early, _STATE.compensate, _STATE.tokens,
         _STATE.prefill, _STATE.prefill_chunk, _STATE.prefill_rows, _STATE.prefill_pooled, _STATE.prefill_est,
         _STATE.prefill_within, _STATE.prefill_cand, _STATE.prompt_sel, _STATE.stats) = prev


@contextlib.contextmanager
def capture():
    """Collect (layer_idx, query [B, Hq, N, D], key [B, Hkv, N, D]) of every prefill inside the block."""
    prev = _STATE.captures
    _STATE.captures = []
    try:
        yield _STATE.captures
    finally:
        _STATE.captures = prev


def _check_mask(attention_mask, nq: int, nk: int) -> None:
    if attention_mask is None:
        return
    m = attention_mask
    if m.dtype != torch.bool:
        m = m >= 0  # additive float mask: 0 = attend, -inf = masked
    m = m[..., -nq:, -nk:]
    qpos = torch.arange(nk - nq, nk, device=m.device)
    causal = torch.arange(nk, device=m.device)[None, :] <= qpos[:, None]
    if not torch.equal(m.expand(m.shape[0], m.shape[1], nq, nk), causal.expand(m.shape[0], m.shape[1], nq, nk)):
        raise ValueError("CAB attention supports unpadded causal batches only (got a padding or custom mask)")


def _decode(module, q, k, v, cfg: CABConfig, scale: float, impl: str) -> torch.Tensor:
    b, hq, _, d = q.shape
    n = k.shape[2]
    bs = cfg.block_size
    kc, vc = k.transpose(1, 2), v.transpose(1, 2)  # [B, N, Hkv, D]: one page per sequence
    bt = torch.arange(b, device=q.device, dtype=torch.int32)[:, None]
    seq_lens = torch.full((b,), n, device=q.device, dtype=torch.int32)
    layer = getattr(module, "layer_idx", 0)
    if cfg.decode_scoring == "tokens":  # each query head's own best keys, as many as the bounds rule's blocks hold
        m = num_blocks(n, bs)
        _STATE.stats["decode_calls"] += 1
        _STATE.stats["kept"] += b * k.shape[1] * cfg.decode_blocks(n)
        _STATE.stats["causal"] += b * k.shape[1] * m
        keep = torch.full((b, k.shape[1], 1), cfg.decode_tokens(n), device=q.device)
        if _STATE.tokens is not None:  # ranked by the selector of using(tokens=...)
            return token_oracle_attention(q, k, v, keep, scale, estimate=_estimate(module, k),
                                          shared=_STATE.tokens.shared, rerank=_STATE.tokens.rerank)
        return token_oracle_attention(q, k, v, keep, scale)
    if cfg.decode_scoring != "prompt":  # the policy's own per-step rule (CABConfig.decode_scoring)
        bnd = pool(k, bs, bounds=True, impl=impl)
        idx, cnt = select_decode_blocks(q[:, :, 0], bnd["lo"], bnd["hi"], seq_lens, cfg, impl=impl)
    else:
        if layer not in _STATE.prompt_sel:
            raise ValueError(f"policy {cfg.policy!r} decodes from its prompt selection, but layer {layer} saw no prompt")
        pidx, pcnt, pblocks = _STATE.prompt_sel[layer]
        idx, cnt = extend_prompt_selection(pidx, pcnt, pblocks, num_blocks(n, bs))
    _STATE.stats["decode_calls"] += 1
    _STATE.stats["kept"] += int(cnt.sum())
    _STATE.stats["causal"] += cnt.numel() * num_blocks(n, bs)
    if _STATE.tokens is not None:
        kept = selection_to_block_mask(idx, cnt, num_blocks(n, bs))
        return token_oracle_attention(q, k, v, (kept * block_lengths(n, bs, q.device)).sum(-1, keepdim=True), scale,
                                      estimate=_estimate(module, k), shared=_STATE.tokens.shared,
                                      rerank=_STATE.tokens.rerank)
    qd = q[:, :, 0].contiguous()
    k_impl = impl if impl != "auto" else ("triton" if q.is_cuda else "torch")
    out, _ = paged_sparse_decode(qd, kc, vc, bt, seq_lens, idx, cnt, bs, scale, impl=k_impl)
    return out[:, :, None]


def with_dropped_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sel, scale: float, mode: str) -> torch.Tensor:
    """Sparse causal attention over ``sel`` plus every dropped key block (an earlier block the row's query block did
    not keep) as one token: its mean value, weighted by exp(score against its mean key) x its length ("mean") or by
    its exact softmax mass ("mass"). q [B, Hq, N, D], k/v [B, Hkv, N, D] -> [B, Hq, N, D] in q.dtype (the ablation of
    ``using(compensate=...)``; PyTorch, float32)."""
    b, hq, n, d = q.shape
    hkv, bs, m = k.shape[1], sel.block_size, sel.num_blocks
    g = hq // hkv
    out, lse = sparse_attention_ref(q, k, v, sel.indices, sel.counts, bs, scale)
    blk = torch.arange(m, device=q.device)
    dropped = (blk[None, :] < blk[:, None]) & ~selection_to_block_mask(sel.indices, sel.counts, m)  # [B, Hkv, M, M]
    mean_v = pool(v, bs, mean=True, impl="torch")["mean"]  # [B, Hkv, M, D] float32, a short last block's own mean
    qf = q.float().view(b, hkv, g, n, d)
    if mode == "mean":
        length = block_lengths(n, bs, q.device).float()
        logit = (scale * torch.einsum("bhgnd,bhmd->bhgnm", qf, pool(k, bs, mean=True, impl="torch")["mean"])
                 + length.log())
    else:  # "mass": log of the block's exact sum of exp(score) (the padding of the last block scores -inf)
        pad = m * bs - n
        kb = torch.nn.functional.pad(k.float(), (0, 0, 0, pad)).view(b, hkv, m, bs, d)
        s = scale * torch.einsum("bhgnd,bhmtd->bhgnmt", qf, kb)
        s[..., -1, bs - pad:] = float("-inf")
        logit = torch.logsumexp(s, dim=-1)
    logit = logit.masked_fill(~dropped[:, :, None, blk.repeat_interleave(bs)[:n]], float("-inf"))
    lse_s = lse.view(b, hkv, g, n)
    total = torch.logaddexp(lse_s, torch.logsumexp(logit, dim=-1))
    mixed = (torch.exp(lse_s - total)[..., None] * out.float().view(b, hkv, g, n, d)
             + torch.einsum("bhgnm,bhmd->bhgnd", torch.exp(logit - total[..., None]), mean_v))
    return mixed.view(b, hq, n, d).to(q.dtype)


def _top_mask(est: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Bool mask of est's shape: in each row of est's last dimension, its ``counts`` highest entries (counts
    broadcastable to est.shape[:-1]; ties broken by topk's order)."""
    kmax = int(counts.max())
    order = est.topk(kmax, dim=-1).indices
    first = (torch.arange(kmax, device=est.device) < counts[..., None]).expand_as(order)
    return torch.zeros_like(est, dtype=torch.bool).scatter_(-1, order, first)


def token_oracle_scores(q: torch.Tensor, k: torch.Tensor, keep: torch.Tensor, scale: float, r0: int, r1: int,
                        estimate=None, shared: bool = False, rerank: int = 0) -> torch.Tensor:
    """Scores of query rows r0..r1-1 with everything but each (query head, row)'s ``keep`` highest-scoring causal keys
    at -inf: q [B, Hq, Nq, D] (the last Nq of the Nk positions), k [B, Hkv, Nk, D], keep [B, Hkv, Nq] int (per row,
    shared by the KV head's query heads; clamped to the row's causal keys) -> [B, Hkv, G, r1 - r0, Nk] float32,
    G = Hq / Hkv. estimate: None ranks the keys by their exact scores (ties at the threshold all kept); else a
    function of the rows' queries [B, Hkv, G, R, D] float32 -> [B, Hkv, G, R, Nk] estimated scores that rank them
    (key_estimate; exactly ``keep`` kept), and the kept keys keep their exact scores. shared: the KV group's query
    heads keep the same keys, the ``keep`` largest of their summed softmax (of the estimate, else the exact scores).
    rerank F > 0 (with an estimate, per query head): the estimate's F x keep best are candidates, and the ``keep``
    of them with the highest exact scores are kept."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    if rerank and (estimate is None or shared):
        raise ValueError("rerank narrows an estimate's candidates per query head: it needs an estimate and "
                         "shared=False")
    if keep.shape != (b, hkv, nq):
        raise ValueError(f"keep must be [{b}, {hkv}, {nq}], got {tuple(keep.shape)}")
    g = hq // hkv
    pos = torch.arange(nk - nq + r0, nk - nq + r1, device=q.device)
    causal = torch.arange(nk, device=q.device)[None, :] <= pos[:, None]  # [R, Nk]
    kt = torch.minimum(keep[:, :, r0:r1].long(), pos + 1).clamp(min=1)  # [B, Hkv, R]
    qr = q[:, :, r0:r1].float().view(b, hkv, g, r1 - r0, d)
    s = scale * torch.einsum("bhgrd,bhnd->bhgrn", qr, k.float())
    s = s.masked_fill(~causal, float("-inf"))
    kmax = int(kt.max())
    if estimate is None and not shared:
        top = s.topk(kmax, dim=-1).values  # [B, Hkv, G, R, kmax]
        thr = top.gather(-1, (kt - 1)[:, :, None, :, None].expand(b, hkv, g, r1 - r0, 1))
        return s.masked_fill(s < thr, float("-inf"))
    est = s if estimate is None else estimate(qr).masked_fill(~causal, float("-inf"))
    if rerank:
        kc = torch.minimum(kt * rerank, pos + 1)  # candidates per row, [B, Hkv, R]
        est = s.masked_fill(~_top_mask(est, kc[:, :, None]), float("-inf"))
    if shared:  # the group's (estimated) attention mass per key: [B, Hkv, 1, R, Nk]
        est = torch.softmax(est, dim=-1).sum(2, keepdim=True).masked_fill(~causal, float("-inf"))
    return s.masked_fill(~_top_mask(est, kt[:, :, None]), float("-inf"))  # each row's kt best (G or 1 sets)


def token_oracle_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, scale: float,
                           rows: int = 256, estimate=None, shared: bool = False, rerank: int = 0) -> torch.Tensor:
    """Causal attention where query token i of every query head keeps only its ``keep`` highest-scoring keys
    (token_oracle_scores; ranked by ``estimate`` when given, its rerank x keep best narrowed by exact score when
    rerank, shared by the KV group when ``shared``) -> [B, Hq, Nq, D]
    in q.dtype. The token-level selection of ``using(oracle="token")`` and ``using(tokens=...)`` (PyTorch, float32,
    ``rows`` query rows at a time)."""
    b, hq, nq, d = q.shape
    out = torch.empty(b, hq, nq, d, dtype=torch.float32, device=q.device)
    for r0 in range(0, nq, rows):
        r1 = min(nq, r0 + rows)
        p = torch.softmax(token_oracle_scores(q, k, keep, scale, r0, r1, estimate, shared, rerank), dim=-1)
        out[:, :, r0:r1] = torch.einsum("bhgrn,bhnd->bhgrd", p, v.float()).reshape(b, hq, r1 - r0, d)
    return out.to(q.dtype)


def _last_rows_attention(q: torch.Tensor, k: torch.Tensor, scale: float, rows: int,
                         pooled: bool = False, estimate=None) -> torch.Tensor:
    """[B, Hkv, R, N] float32: the causal softmax of the prompt's last R = min(rows, N) rows, summed over the KV
    group's query heads; pooled: of one row instead, their mean query (each head's), over every key ([B, Hkv, 1, N]:
    what one pooled query per head and tile costs, 1/R of the rows' products). estimate: the rows' scores from
    key_estimate's function (of keys that begin with these N) instead of exact."""
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    r = min(rows, n)
    qr = q[:, :, n - r:].float().view(b, hkv, hq // hkv, r, d)
    if pooled:
        qr = qr.mean(3, keepdim=True)
    if estimate is not None:
        s = scale * estimate(qr)[..., :n]
    else:
        s = scale * torch.einsum("bhgrd,bhnd->bhgrn", qr, k.float())
    last = torch.arange(n - qr.shape[3], n, device=q.device)
    causal = torch.arange(n, device=q.device)[None, :] <= last[:, None]
    return torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1).sum(2)


def vertical_rank(q: torch.Tensor, k: torch.Tensor, scale: float, rows: int = VERTICAL_ROWS,
                  pooled: bool = False) -> torch.Tensor:
    """[B, Hkv, N] float32: each key's attention mass in the prompt's last ``rows`` rows (causal softmax of their
    exact scores), summed over those rows and the KV group's query heads; pooled: in their mean query's softmax
    instead (one row per head). q [B, Hq, N, D], k [B, Hkv, N, D]."""
    return _last_rows_attention(q, k, scale, rows, pooled).sum(2)


def slash_rank(q: torch.Tensor, k: torch.Tensor, scale: float, rows: int = VERTICAL_ROWS) -> torch.Tensor:
    """[B, Hkv, N] float32: each offset o's attention mass in the prompt's last ``rows`` rows: the mass row i gives
    key i - o, summed over those rows and the KV group's query heads (MInference's slash lines)."""
    return _by_offset(_last_rows_attention(q, k, scale, rows))


def _by_offset(p: torch.Tensor) -> torch.Tensor:
    """The last rows' attention p [B, Hkv, R, N] (rows N - R .. N - 1) summed by offset row - key -> [B, Hkv, N]."""
    n, r = p.shape[-1], p.shape[-2]
    pos = torch.arange(n - r, n, device=p.device)[:, None]  # [R, 1]
    j = pos - torch.arange(n, device=p.device)[None, :]  # key of offset o for row r: [R, N], negative past the start
    got = p.gather(-1, j.clamp(min=0).expand(p.shape[:2] + j.shape)) * (j >= 0)
    return got.sum(2)


def vertical_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, scale: float,
                       rank: torch.Tensor | None = None, local: int = VERTICAL_LOCAL, rows: int = 256,
                       slash: torch.Tensor | None = None, first_row: int = 0) -> torch.Tensor:
    """Causal prefill where query token i keeps ``keep[b, h, i]`` keys (clamped to 1..i+1): its ``local`` most recent
    keys, and the rest the highest of ``rank`` [B, Hkv, N] among its earlier keys (one ranking per KV head, shared by
    every row and query head: vertical_rank when None); with ``slash`` [B, Hkv, N] (a rank per offset, slash_rank)
    key j ranks for row i by the larger of rank[j] and slash[i - j]. The kept keys enter the softmax with their
    exact scores. q [B, Hq, N, D], k/v [B, Hkv, N, D], keep [B, Hkv, N] int -> [B, Hq, N - first_row, D] (the rows
    from ``first_row`` on) in q.dtype (PyTorch, float32)."""
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    if keep.shape != (b, hkv, n):
        raise ValueError(f"keep must be [{b}, {hkv}, {n}], got {tuple(keep.shape)}")
    if local < 1:
        raise ValueError(f"local must be >= 1, got {local}")
    rank = vertical_rank(q, k, scale) if rank is None else rank.float()
    if rank.shape != (b, hkv, n) or (slash is not None and slash.shape != (b, hkv, n)):
        raise ValueError(f"rank and slash must be [{b}, {hkv}, {n}], got {tuple(rank.shape)}"
                         f"{'' if slash is None else ', ' + str(tuple(slash.shape))}")
    if not 0 <= first_row < n:
        raise ValueError(f"first_row must be in [0, {n}), got {first_row}")
    out = torch.empty(b, hq, n, d, dtype=torch.float32, device=q.device)
    top = _above_ranks(rank, slash)  # once, not per row block
    for r0 in range(first_row, n, rows):
        r1 = min(n, r0 + rows)
        pos = torch.arange(r0, r1, device=q.device)
        kept = vertical_kept(rank, pos, keep[:, :, r0:r1], local, slash, top)  # [B, Hkv, R, N]
        qr = q[:, :, r0:r1].float().view(b, hkv, g, r1 - r0, d)
        sc = scale * torch.einsum("bhgrd,bhnd->bhgrn", qr, k.float())
        p = torch.softmax(sc.masked_fill(~kept[:, :, None], float("-inf")), dim=-1)
        out[:, :, r0:r1] = torch.einsum("bhgrn,bhnd->bhgrd", p, v.float()).reshape(b, hq, r1 - r0, d)
    return out[:, :, first_row:].to(q.dtype)


def _above_ranks(rank: torch.Tensor, slash: torch.Tensor | None) -> float:
    """A value above every rank and offset rank: the recent keys rank there (most recent first), above the others."""
    return max(float(rank.max()), float(slash.max()) if slash is not None else float("-inf")) + 2.0


def vertical_kept(rank: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor, local: int = VERTICAL_LOCAL,
                  slash: torch.Tensor | None = None, top: float | None = None) -> torch.Tensor:
    """[B, Hkv, R, N] bool: the keys query rows ``pos`` [R] keep under vertical_attention's rule: keep [B, Hkv, R]
    keys each (clamped to 1..pos+1), the ``local`` most recent first, then the highest of ``rank`` [B, Hkv, N] (or
    [B, Hkv, R, N]: a ranking of each row's own) among the earlier causal keys (with ``slash`` [B, Hkv, N], key j ranks
    for row i by the larger of rank[j] and slash[i - j]); top: a value above every rank and slash value (computed here
    when None)."""
    b, hkv, n = rank.shape[0], rank.shape[1], rank.shape[-1]
    if top is None:
        top = _above_ranks(rank, slash)
    j = torch.arange(n, device=rank.device)
    causal = j[None, :] <= pos[:, None]  # [R, N]
    recent = causal & (j[None, :] > pos[:, None] - local)
    kt = torch.minimum(keep.long(), pos + 1).clamp(min=1)  # [B, Hkv, R]
    score = rank[:, :, None, :] if rank.dim() == 3 else rank  # [B, Hkv, 1 or R, N]
    if slash is not None:  # row i, key j: the offset i - j's rank (0 past the causal keys: masked below)
        off = (pos[:, None] - j[None, :]).clamp(min=0)
        score = torch.maximum(score, slash.gather(-1, off.reshape(1, 1, -1).expand(b, hkv, -1)).view(
            b, hkv, pos.numel(), n))
    est = torch.where(recent, top + j.float(), score)  # [B, Hkv, R, N]
    return _top_mask(est.masked_fill(~causal, float("-inf")), kt)


def chunked_vertical_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, scale: float,
                               chunk: int | None = None, slash: bool = False,
                               local: int = VERTICAL_LOCAL, rows: int = VERTICAL_ROWS,
                               pooled: bool = False, estimate=None,
                               within: torch.Tensor | None = None) -> torch.Tensor:
    """vertical_attention as a chunked prefill runs it: the prompt's rows in chunks of ``chunk`` (None: one chunk),
    each chunk's rows ranking the keys by the chunk's own last ``rows`` rows (vertical_rank, and slash_rank when
    ``slash``; pooled: by those rows' mean query, vertical lines only; estimate: by their scores as key_estimate's
    function of the whole prompt's keys estimates them), since the prompt's later rows do not exist yet when a chunk
    runs -> [B, Hq, N, D] in q.dtype. within [B, Hkv, M, M] bool: a block mask whose blocks are the chunks
    (M = ceil(N / chunk)); each chunk's ranking reads first among the tokens of its own row of blocks, the other keys
    after all of them (hf.using's prefill_within)."""
    n = q.shape[2]
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be >= 1 or None, got {chunk}")
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    if pooled and slash:
        raise ValueError("pooled ranks keys by one mean query per head: no slash lines (offsets need rows)")
    if pooled and estimate is not None:
        raise ValueError("pooled ranks keys by exact scores of one mean query: not with an estimate")
    step = n if chunk is None else chunk
    if within is not None and (slash or within.shape[:2] != k.shape[:2] or within.shape[-1] != within.shape[-2]
                               or chunk is None or -(-n // chunk) != within.shape[-1]):
        raise ValueError(f"within must be a [B, Hkv, M, M] block mask with M = ceil(N / chunk), N = {n}, chunk = "
                         f"{chunk}, vertical lines only; got {tuple(within.shape)}")
    outs = []
    for c0 in range(0, n, step):
        c1 = min(n, c0 + step)
        p = _last_rows_attention(q[:, :, :c1], k[:, :, :c1], scale, rows, pooled, estimate)  # once for both ranks
        rank = p.sum(2)
        if within is not None:  # the query block's candidate tokens first
            cand = within[:, :, c0 // step].repeat_interleave(step, -1)[..., :c1]
            rank = rank - (~cand) * (float(rank.max()) + 2.0)
        outs.append(vertical_attention(q[:, :, :c1], k[:, :, :c1], v[:, :, :c1], keep[..., :c1], scale,
                                       rank=rank, local=local, slash=_by_offset(p) if slash else None,
                                       first_row=c0))
    return torch.cat(outs, dim=2)


def row_bound_candidates(q: torch.Tensor, k: torch.Tensor, counts: torch.Tensor, block_size: int,
                         sink_blocks: int = 1, local_blocks: int = 1, rows_per_step: int = 4096) -> torch.Tensor:
    """Candidate key blocks per query block from every query row's box bound (Quest's, per row rather than per
    pooled query): row i's bound on key block j is sum_d max(q_id lo_jd, q_id hi_jd) (lo / hi: the block's
    per-dimension key minima and maxima), scaled as a logit, plus the log of the block's length; each row's softmax
    over its causal blocks; a query block ranks key blocks by the largest of its rows' and the KV group's heads'.
    The sink and local blocks come first. q [B, Hq, N, D], k [B, Hkv, N, D], counts [B, Hkv, M] (blocks to keep per
    query block) -> [B, Hkv, M, M] bool (causal). Costs N x M x 2D products per query head: 1/32 of QK^T at
    64-token blocks."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must be [B, Hq, N, D] / [B, Hkv, N, D]")
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    if k.shape[0] != b or k.shape[2] != n or k.shape[3] != d or hq % hkv:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must be [B, Hq, N, D] / [B, Hkv, N, D]")
    m = num_blocks(n, block_size)
    if counts.shape != (b, hkv, m):
        raise ValueError(f"counts must be [{b}, {hkv}, {m}], got {tuple(counts.shape)}")
    g = hq // hkv
    st = pool(k, block_size, bounds=True, impl="torch")
    lo, hi = st["lo"].float(), st["hi"].float()  # [B, Hkv, M, D]
    loglen = block_lengths(n, block_size, device=q.device).float().log()  # [M]
    score = torch.full((b, hkv, m, m), float("-inf"), device=q.device)
    qg = q.float().reshape(b, hkv, g, n, d)
    blk = torch.arange(m, device=q.device)
    step = max(block_size, rows_per_step // block_size * block_size)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        qr = qg[:, :, :, r0:r1]
        s = (qr.clamp(min=0) @ hi[:, :, None].transpose(-1, -2) + qr.clamp(max=0) @ lo[:, :, None].transpose(-1, -2))
        s = s / math.sqrt(d) + loglen  # [B, Hkv, G, rows, M]
        rb = torch.arange(r0, r1, device=q.device) // block_size  # each row's query block
        s = s.masked_fill(blk[None, :] > rb[:, None], float("-inf")).softmax(-1)
        s = s.amax(2)  # over the group's heads: [B, Hkv, rows, M]
        q0, q1 = r0 // block_size, -(-r1 // block_size)
        pad = q1 * block_size - r1
        if pad:
            s = torch.nn.functional.pad(s, (0, 0, 0, pad))
        score[:, :, q0:q1] = s.reshape(b, hkv, q1 - q0, block_size, m).amax(3)
    causal = causal_block_mask(m, q.device)
    forced = forced_mask(m, sink_blocks, local_blocks, q.device)
    score = score.masked_fill(forced, float("inf")).masked_fill(~causal, float("-inf"))
    rank = score.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # each block's place in its row
    return (rank < counts[..., None]) & causal


def quantize_keys(k: torch.Tensor, bits: int, group: int = 32) -> torch.Tensor:
    """k [..., D] rounded to signed ``bits``-bit integers with one absmax scale per ``group`` dimensions of each
    token (a head dim below ``group`` is one group; else D % group == 0), dequantized -> float32 of k's shape."""
    d = k.shape[-1]
    group = min(group, d)
    if d % group:
        raise ValueError(f"head dim {d} is not a multiple of the quantization group {group}")
    kg = k.float().unflatten(-1, (d // group, group))
    top = 2 ** (bits - 1) - 1
    step = kg.abs().amax(-1, keepdim=True).clamp(min=1e-12) / top
    return ((kg / step).round().clamp(-top, top) * step).flatten(-2)


def quantize_keys_channel(k: torch.Tensor, bits: int, group: int = CHANNEL_GROUP) -> torch.Tensor:
    """k [..., N, D] rounded to ``bits``-bit unsigned integers per channel: each channel's minimum and range over
    groups of ``group`` consecutive tokens (the last group may be short), 2^bits - 1 steps between them, minimum
    and step held as float16 (KIVI's key quantization; post-RoPE keys have outlier channels that a per-token scale
    lets swamp the others), dequantized -> float32 of k's shape. The engine's 4-bit copy rounds the same way
    (ops.key_codes.round_keys: one rule for both)."""
    from cab_vllm.ops.key_codes import round_keys

    return round_keys(k, bits, group)


def key_estimate(kind: str, param: int, k: torch.Tensor, basis: torch.Tensor | None = None):
    """The estimated scores a token selector ranks keys by (parse_tokens' kinds but "exact"): a function of queries
    [B, Hkv, G, R, D] float32 -> [B, Hkv, G, R, Nk], for keys k [B, Hkv, Nk, D]. basis [Hkv, D, D] (pca: the key
    directions, leading first; key_basis). The scale is left out: it does not change the ranking."""
    kf = k.float()
    if kind == "pca":
        if basis is None:
            raise ValueError("tokens='pca...' needs the layer's key basis: calibrate_key_basis(model, input_ids) first")
        p = basis[:, :, :param].to(kf.device, torch.float32)  # [Hkv, D, R]
        kp = torch.einsum("bhnd,hdr->bhnr", kf, p)
        return lambda qr: torch.einsum("bhgqr,bhnr->bhgqn", torch.einsum("bhgqd,hdr->bhgqr", qr, p), kp)
    if kind in ("sparq", "sparqg", "sparqb"):
        def sparq(qr):
            # per head / group / group and every row given at once
            mag = (qr.abs() if kind == "sparq" else qr.abs().sum(2, keepdim=True) if kind == "sparqg"
                   else qr.abs().sum((2, 3), keepdim=True)).expand_as(qr)
            dims = mag.topk(min(param, qr.shape[-1]), dim=-1).indices
            return torch.einsum("bhgqd,bhnd->bhgqn", torch.zeros_like(qr).scatter_(-1, dims, qr.gather(-1, dims)), kf)
        return sparq
    if kind in ("int", "intc"):
        kq = quantize_keys(kf, param) if kind == "int" else quantize_keys_channel(kf, param)
        return lambda qr: torch.einsum("bhgqd,bhnd->bhgqn", qr, kq)
    if kind == "dims":
        if basis is None:
            raise ValueError("tokens='dims...' needs the layer's key dimensions: calibrate_key_basis(model, input_ids) "
                             "first")
        if param > basis.shape[-1]:
            raise ValueError(f"tokens='dims{param}' asks for more than the head's {basis.shape[-1]} dimensions")
        idx = basis[:, :param].to(kf.device, torch.long)  # [Hkv, R]
        kd = kf.gather(-1, idx[None, :, None, :].expand(kf.shape[0], -1, kf.shape[2], -1))  # [B, Hkv, Nk, R]
        return lambda qr: torch.einsum("bhgqr,bhnr->bhgqn", qr.gather(-1, idx[None, :, None, None, :].expand(
            *qr.shape[:-1], param)), kd)
    raise ValueError(f"no estimate for token selector kind {kind!r}")


def _estimate(module, k: torch.Tensor, spec: TokenSpec | None = None):
    """The estimate of ``using(tokens=...)`` (or of the TokenSpec ``spec``: prefill_est's) for this layer (None:
    exact scores)."""
    kind, param = (_STATE.tokens if spec is None else spec)[:2]
    if kind == "exact":
        return None
    return key_estimate(kind, param, k, getattr(module, "cab_key_dims" if kind == "dims" else "cab_key_basis", None))


def key_basis(keys: torch.Tensor) -> torch.Tensor:
    """keys [B, Hkv, N, D] of one layer -> [Hkv, D, D] float32: per KV head the eigenvectors of the keys' second
    moment (sum of k kᵀ), in columns, largest eigenvalue first: the directions on which projected keys keep the
    most of their dot products (Loki's low-rank keys, uncentred)."""
    kf = keys.float().transpose(0, 1).flatten(1, 2)  # [Hkv, B*N, D]
    vecs = torch.linalg.eigh(kf.transpose(1, 2) @ kf).eigenvectors  # eigenvalues ascending
    return vecs.flip(-1).contiguous()


def key_dims(queries: torch.Tensor, keys: torch.Tensor, group: int = DIM_GROUP) -> torch.Tensor:
    """queries [B, Hq, N, D] and keys [B, Hkv, N, D] of one layer -> [Hkv, D] int64: per KV head the dimensions in
    aligned groups of ``group`` (the whole head when it is narrower), the groups in decreasing order of their share of
    the scores' energy (sum over the group's dimensions of E[q_d^2] E[k_d^2], q over the KV group's query heads), each
    group's dimensions ascending: the first R are the R dimensions tokens="dimsR" reads."""
    b, hq, n, d = queries.shape
    hkv = keys.shape[1]
    group = min(group, d)
    if d % group:
        raise ValueError(f"head dim {d} is not a multiple of the dimension group {group}")
    eq = queries.float().pow(2).mean(2).view(b, hkv, hq // hkv, d).sum(2).mean(0)  # [Hkv, D]
    ek = keys.float().pow(2).mean(2).mean(0)
    energy = (eq * ek).view(hkv, d // group, group).sum(-1)  # [Hkv, groups]
    order = energy.argsort(dim=-1, descending=True)
    return (order[..., None] * group + torch.arange(group)).flatten(1)


def calibrate_key_basis(model, input_ids: torch.Tensor) -> int:
    """Run ``model`` densely on ``input_ids`` [1, N] and store on each attention module (by layer_idx) the basis of
    its post-RoPE keys (key_basis) as ``cab_key_basis``, which ``tokens="pcaR"`` projects on, and the order of its
    dimension groups by score energy (key_dims) as ``cab_key_dims``, which ``tokens="dimsR"`` reads. Returns the
    number of layers calibrated; ValueError if the model has no "cab" attention layers."""
    with torch.no_grad(), using(None), capture() as caps:
        model(input_ids)
    bases = {layer: key_basis(k) for layer, _, k in caps}
    dims = {layer: key_dims(q, k) for layer, q, k in caps}
    if not bases:
        raise ValueError("the model ran no 'cab' attention layer (load it with attn_implementation='cab')")
    done = 0
    for mod in model.modules():
        layer = getattr(mod, "layer_idx", None)
        if layer in bases and hasattr(mod, "k_proj"):
            mod.cab_key_basis, mod.cab_key_dims = bases[layer], dims[layer]
            done += 1
    if done != len(bases):
        raise ValueError(f"found attention modules for {done} of the {len(bases)} layers that ran (expected modules "
                         f"with layer_idx and k_proj)")
    return done


def kept_tokens(sel) -> torch.Tensor:
    """[B, Hkv, N] the causal keys each query token's kept blocks hold (the diagonal block up to the token)."""
    bs, m, n = sel.block_size, sel.num_blocks, sel.seq_len
    mask = selection_to_block_mask(sel.indices, sel.counts, m)  # [B, Hkv, M, M]
    blk = torch.arange(m, device=mask.device)
    before = ((mask & (blk[None, :] < blk[:, None])) * block_lengths(n, bs, mask.device)).sum(-1)  # [B, Hkv, M]
    i = torch.arange(n, device=mask.device)
    diag = mask.diagonal(dim1=-2, dim2=-1).long()  # [B, Hkv, M]
    return before[..., i // bs] + diag[..., i // bs] * (i % bs + 1)


def cab_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers attention function: query [B, Hq, Nq, D], key/value [B, Hkv, Nk, D] ->
    (output [B, Nq, Hq, D], None)."""
    if dropout:
        raise ValueError("CAB attention is inference-only (dropout must be 0)")
    nq, nk = query.shape[2], key.shape[2]
    _check_mask(attention_mask, nq, nk)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scaling is None else float(scaling)
    cfg, impl = _STATE.cfg, _STATE.impl
    if (_STATE.phases == "prefill" and nq != nk) or (_STATE.phases == "decode" and nq == nk):
        cfg = None  # this phase runs dense
    if cfg is not None and cfg.policy != "dense":
        layer, rng = getattr(module, "layer_idx", 0), _STATE.layers
        if (cfg.dense_layer(layer) or (rng is not None and not rng[0] <= layer < rng[1])
                or (cfg.dense_prefill and nq == nk)):
            # a dense layer (CABConfig.dense_layers, or outside the ablation's range) or a dense prompt
            # (CABConfig.dense_prefill): every causal block counted
            m = num_blocks(nk, cfg.block_size)
            n_causal = key.shape[0] * key.shape[1] * (m * (m + 1) // 2 if nq == nk else m)
            _STATE.stats["kept"] += n_causal
            _STATE.stats["causal"] += n_causal
            cfg = None
        elif _STATE.early is not None and layer < _STATE.early[0]:
            cfg = cfg.replace(sparsity=_STATE.early[1])
    if _STATE.captures is not None and nq == nk:
        _STATE.captures.append((getattr(module, "layer_idx", len(_STATE.captures)), query.detach(), key.detach()))
    if cfg is None or cfg.policy == "dense":
        # dense: the same causal attention through SDPA (fast on CPU; the kernels are tested equal to it)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=nq == nk, scale=scale, enable_gqa=query.shape[1] != key.shape[1])
        if nq != nk and nq != 1:
            raise ValueError(f"CAB attention handles prefill (Nq == Nk) or one-token decode, got Nq={nq}, Nk={nk}")
        _STATE.stats["prefill_calls" if nq == nk else "decode_calls"] += 1
        return out.transpose(1, 2).contiguous(), None
    if nq == nk:
        sel = select_blocks(query, key, cfg, impl=impl)
        if _STATE.compensate is not None:
            out = with_dropped_blocks(query, key, value, sel, scale, _STATE.compensate)
        elif _STATE.prefill is not None:  # "vertical" / "vslash", the prompt in chunks of prefill_chunk rows
            within = None
            if _STATE.prefill_within is not None:  # cab's blocks at F x the budget, each query block's candidates
                wide = select_blocks(query, key, cfg.replace(
                    sparsity=max(0.0, 1 - _STATE.prefill_within * (1 - cfg.sparsity))), impl=impl)
                within = (selection_to_block_mask(wide.indices, wide.counts, wide.num_blocks)
                          if _STATE.prefill_cand == "cab" else
                          row_bound_candidates(query, key, wide.counts, cfg.block_size, cfg.sink_blocks,
                                               cfg.local_blocks))
            out = chunked_vertical_attention(query, key, value, kept_tokens(sel), scale, chunk=_STATE.prefill_chunk,
                                             slash=_STATE.prefill == "vslash", rows=_STATE.prefill_rows,
                                             pooled=_STATE.prefill_pooled,
                                             estimate=None if _STATE.prefill_est is None else _estimate(
                                                 module, key, _STATE.prefill_est), within=within)
        elif _STATE.tokens is not None:
            out = token_oracle_attention(query, key, value, kept_tokens(sel), scale, estimate=_estimate(module, key),
                                         shared=_STATE.tokens.shared, rerank=_STATE.tokens.rerank)
        else:
            out = sparse_attention(query, key, value, sel, scale=scale, impl=impl)
        _STATE.stats["prefill_calls"] += 1
        _STATE.stats["kept"] += int(sel.counts.sum())
        m = sel.num_blocks
        _STATE.stats["causal"] += sel.counts[..., 0].numel() * m * (m + 1) // 2
        layer = getattr(module, "layer_idx", 0)
        _STATE.prompt_sel[layer] = (sel.indices[:, :, -1], sel.counts[:, :, -1], m)
    elif nq == 1:
        out = _decode(module, query, key, value, cfg, scale, impl)
    else:
        raise ValueError(f"CAB attention handles prefill (Nq == Nk) or one-token decode, got Nq={nq}, Nk={nk}")
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register attn_implementation="cab" with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, cab_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
