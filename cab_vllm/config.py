"""CABConfig: every knob of block selection in one frozen, validated dataclass."""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

POLICIES = ("cab", "curvature", "magnitude", "h2o", "streaming", "random", "dense")
ESTIMATORS = ("max_l2", "mean", "topr", "bounds", "sampled")
SUMMARY_ESTIMATORS = ("max_l2", "mean", "bounds")  # one summary per key block, independent of the queries
DECODE_RULES = ("auto", "bounds", "prompt", "tokens")
BUDGETS = ("fixed", "adaptive")
# the policies that rank key blocks by estimated attention: they need the estimate, may decode from their prompt
# selection (decode_rule) and take the adaptive budget; streaming, random and dense do none of these
ESTIMATED_POLICIES = ("cab", "curvature", "magnitude", "h2o")


@dataclass(frozen=True)
class CABConfig:
    """Block-selection configuration.

    block_size        tokens per query/key block (the selection granularity).
    sparsity          fraction of the causal key blocks each query block drops, in [0, 1).
                      Query block m (0-based) keeps exactly
                      ``min(m + 1, max(forced, ceil((1 - sparsity) * (m + 1))))`` key blocks.
    sink_blocks       leading key blocks always kept (attention sinks).
    local_blocks      key blocks ending at the diagonal always kept (>= 1: the diagonal).
    policy            one of POLICIES; see cab_vllm.policies.
    estimator         how a (query block, key block) score is estimated; see cab_vllm.ops.coarsen.
    num_reps          representatives per block for estimator="topr".
    sample_rows       real query rows per query block scored exactly for estimator="sampled".
    exact_rows        cab policy: the last ``exact_rows`` query tokens of the sequence (the rows that
                      produce the answer) are scored exactly against every key; 0 disables.
    curvature_share   cab policy: fraction of the non-forced budget filled by most-negative curvature;
                      the rest goes to the highest estimated attention mass.
    h2o_recent_share  h2o policy: fraction of the non-forced budget given to the most recent blocks.
    seed              RNG seed of the random policy.
    decode_rule       how cab/magnitude/h2o/curvature pick blocks for a decode step: "bounds" (Quest-style
                      upper bounds with the step's real query, re-chosen every step; h2o/curvature use cab's),
                      "prompt" (SnapKV-style: the blocks the prompt's last query block kept, plus every block
                      after the prompt) or "auto" (the measured best: "prompt" for cab, h2o and curvature,
                      "bounds" for magnitude; experiments/RESULTS.md) or "tokens" (each query head keeps its own
                      highest-scoring keys by exact score, as many as the blocks the bounds rule keeps hold:
                      decode_tokens; token-level, not block-level: experiments/RESULTS.md, "Where the loss is: 64-token
                      blocks"). streaming/random/dense keep their own.
    decode_sparsity   decode_rule="tokens" only: the sparsity whose budget sets a decode step's keys per head
                      (decode_tokens), in place of ``sparsity``, which then sets the prompt's alone (a prompt sparse at
                      0.8 whose decode keeps 98%'s keys). None: ``sparsity`` for both.
    dense_prefill     prompts attend densely (vLLM's FlashAttention in the CUDA engine); only decode steps are sparse.
                      Needs a decode rule of its own ("tokens" or "bounds"): the prompt rule has no prompt selection
                      to reuse. The achieved density counts the prompt as dense.
    budget            "fixed" (every KV head and query block keeps the count above) or "adaptive" (top-p:
                      per (KV head, query block) the fewest highest-mass blocks reaching ``top_p`` of the
                      estimated attention mass, clamped to [budget_floor, budget_cap] x the fixed count, then
                      rescaled so each window of ``budget_window`` query blocks keeps the fixed rule's total:
                      ``sparsity`` stays the average). Prefill selection of cab, magnitude, h2o and curvature only;
                      see adaptive_keep_counts.
    top_p             adaptive budget: estimated attention mass a row's kept blocks must reach, in (0, 1].
    budget_floor      adaptive budget: a row keeps at least ceil(budget_floor x its fixed count), in [0, 1].
    budget_cap        adaptive budget: a row keeps at most floor(budget_cap x its fixed count), >= 1.
    budget_window     adaptive budget: query blocks whose rows share one total, counted from the prompt's first
                      block (blocks w*W .. w*W + W - 1 for W = budget_window), >= 1. 1: each query block keeps the
                      fixed rule's count over its KV heads, and only the split over the heads adapts; larger windows
                      also move blocks between a window's query blocks. A window is only ever selected whole when a
                      prefill chunk never ends inside one: CABScheduler ends an adaptive request's chunks on whole
                      windows, so its selections do not depend on how the other requests cut its prompt.
    answer_blocks     the rows that produce the answer keep at least this many key blocks (all their causal
                      blocks when fewer): the prompt's last query block (whose selection decode reuses under
                      the prompt rule) and every decode query. 0: the sparsity rule alone. One query block of a
                      prompt's prefill and its decode steps: the prefill's cost barely moves, and a decode step
                      reads this many blocks at most where the rule keeps fewer (short contexts). Counted in the
                      achieved density. See answer_keep.
    answer_dense      the prompt's last query block attends to every causal key block (its last row's output is the
                      first generated token; a block-sparse prompt otherwise picks that token from its estimate): one
                      query block of the prompt, ~1/M of a dense prompt's cost. Decode keeps its own budget, so it
                      needs a decode rule of its own ("tokens" or "bounds"; the prompt rule would reuse that dense
                      selection at every step). Counted in the achieved density.
    vertical_blocks   cab policy: every chunk of a prompt, not only the one that ends it, scores its last ``exact_rows``
                      query tokens exactly against every key, and every query block of the chunk ranks each key
                      block by the larger of its own estimate and those exact scores (block-level vertical lines: the
                      blocks the chunk's end attends to are kept by the rows before it, where the budget allows).
                      The budget is unchanged; one pass over the keys per chunk. Needs exact_rows > 0; the
                      other policies ignore it (as they ignore curvature_share), so a request may switch policy.
    dense_layers      the model's first ``dense_layers`` attention layers attend densely (every causal block, in
                      prefill and decode; Quest leaves its first two layers dense the same way). 0: every layer
                      follows the rule. The achieved density counts those layers as dense, so it is above
                      1 - sparsity: ``sparsity`` is the other layers'. Two dense layers did not help Qwen's
                      multi-key retrieval at 4k (experiments/RESULTS.md: its loss sits in layers 2-11 of 24).
                      See dense_layer.
    """

    block_size: int = 64
    sparsity: float = 0.9
    sink_blocks: int = 1
    local_blocks: int = 1
    policy: str = "cab"
    estimator: str = "bounds"
    num_reps: int = 4
    sample_rows: int = 4
    exact_rows: int = 16
    curvature_share: float = 0.0
    h2o_recent_share: float = 0.5
    seed: int = 0
    decode_rule: str = "auto"
    budget: str = "fixed"
    top_p: float = 0.95
    budget_floor: float = 0.25
    budget_cap: float = 4.0
    budget_window: int = 1
    answer_blocks: int = 0
    answer_dense: bool = False
    vertical_blocks: bool = False
    dense_layers: int = 0
    dense_prefill: bool = False
    decode_sparsity: float | None = None

    def __post_init__(self) -> None:
        def bad(field: str, allowed: str) -> ValueError:
            return ValueError(f"CABConfig.{field}={getattr(self, field)!r} is invalid: expected {allowed}")

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_real(v: object) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not is_int(self.block_size) or self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise bad("block_size", "a power of two >= 16 (64 is the default)")
        if not is_real(self.sparsity) or not 0.0 <= self.sparsity < 1.0:
            raise bad("sparsity", "a number in [0, 1)")
        if not is_int(self.sink_blocks) or self.sink_blocks < 0:
            raise bad("sink_blocks", "an integer >= 0")
        if not is_int(self.local_blocks) or self.local_blocks < 1:
            raise bad("local_blocks", "an integer >= 1 (the diagonal block is always kept)")
        if self.policy not in POLICIES:
            raise bad("policy", f"one of {', '.join(POLICIES)}")
        if self.estimator not in ESTIMATORS:
            raise bad("estimator", f"one of {', '.join(ESTIMATORS)}")
        if not is_int(self.num_reps) or not 1 <= self.num_reps <= self.block_size:
            raise bad("num_reps", f"an integer in [1, block_size={self.block_size}]")
        if not is_int(self.sample_rows) or not 1 <= self.sample_rows <= self.block_size:
            raise bad("sample_rows", f"an integer in [1, block_size={self.block_size}]")
        if not is_int(self.exact_rows) or not 0 <= self.exact_rows <= self.block_size:
            raise bad("exact_rows", f"an integer in [0, block_size={self.block_size}]")
        if not is_real(self.curvature_share) or not 0.0 <= self.curvature_share <= 1.0:
            raise bad("curvature_share", "a number in [0, 1]")
        if not is_real(self.h2o_recent_share) or not 0.0 <= self.h2o_recent_share <= 1.0:
            raise bad("h2o_recent_share", "a number in [0, 1]")
        if not is_int(self.seed):
            raise bad("seed", "an integer")
        if self.decode_rule not in DECODE_RULES:
            raise bad("decode_rule", f"one of {', '.join(DECODE_RULES)}")
        if self.budget not in BUDGETS:
            raise bad("budget", f"one of {', '.join(BUDGETS)}")
        if not is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "a number in (0, 1]")
        if not is_real(self.budget_floor) or not 0.0 <= self.budget_floor <= 1.0:
            raise bad("budget_floor", "a number in [0, 1] (a fraction of the fixed rule's count)")
        if not is_real(self.budget_cap) or self.budget_cap < 1.0:
            raise bad("budget_cap", "a finite number >= 1 (a multiple of the fixed rule's count)")
        if not is_int(self.budget_window) or self.budget_window < 1:
            raise bad("budget_window", "an integer >= 1 (query blocks that share one adaptive total)")
        if not is_int(self.answer_blocks) or self.answer_blocks < 0:
            raise bad("answer_blocks", "an integer >= 0 (key blocks; 0 = the sparsity rule alone)")
        if not is_int(self.dense_layers) or self.dense_layers < 0:
            raise bad("dense_layers", "an integer >= 0 (leading attention layers that attend densely; 0 = none)")
        if self.decode_sparsity is not None:
            if not is_real(self.decode_sparsity) or not 0.0 <= self.decode_sparsity < 1.0:
                raise bad("decode_sparsity", "None or a number in [0, 1)")
            if self.decode_rule != "tokens":
                raise ValueError(f"CABConfig.decode_sparsity={self.decode_sparsity!r} needs decode_rule='tokens' (the "
                                 f"rule whose budget it sets), got decode_rule={self.decode_rule!r}")
        if not isinstance(self.vertical_blocks, bool):
            raise bad("vertical_blocks", "True or False")
        if self.vertical_blocks and self.policy == "cab" and self.exact_rows == 0:
            raise ValueError("CABConfig.vertical_blocks=True ranks key blocks by the cab policy's exact rows: needs "
                             "exact_rows > 0, got 0")
        # flags that make (part of) the prompt dense: the prompt rule would have no selection to reuse, or reuse a
        # dense one at every decode step
        for flag, why in (("answer_dense", "the prompt's last selection, which would then be dense at every step"),
                          ("dense_prefill", "the prompt's selection, which a dense prompt does not make")):
            if not isinstance(getattr(self, flag), bool):
                raise bad(flag, "True or False")
            if getattr(self, flag) and self.decodes_from_prompt:
                raise ValueError(f"CABConfig.{flag}=True needs a decode rule of its own (decode_rule='tokens' or "
                                 f"'bounds'): decode_rule={self.decode_rule!r} with policy {self.policy!r} decodes "
                                 f"from {why}")

    @property
    def decodes_from_prompt(self) -> bool:
        """Whether decode steps use the prompt rule (see decode_rule; "auto" resolved per policy)."""
        rule = self.decode_rule
        if rule == "auto":
            rule = "bounds" if self.policy == "magnitude" else "prompt"
        return rule == "prompt" and self.policy in ESTIMATED_POLICIES

    @property
    def decode_scoring(self) -> str:
        """How a decode step picks its key blocks, the one dispatch the engine and the adapter share: "all"
        (dense), "prompt" (the prompt's stored selection, decodes_from_prompt), "recent" (streaming), "random",
        "tokens" (decode_rule="tokens": each query head's own best keys by exact score, decode_tokens of them), or
        "bounds" (Quest-style upper bounds with the real query: cab, magnitude, and h2o/curvature off the prompt
        rule). A "prompt" row whose prompt selection is not stored falls back to "bounds"."""
        if self.policy == "dense":
            return "all"
        if self.decodes_from_prompt:
            return "prompt"
        if self.decode_rule == "tokens" and self.policy in ESTIMATED_POLICIES:
            return "tokens"
        return {"streaming": "recent", "random": "random"}.get(self.policy, "bounds")

    @property
    def adaptive(self) -> bool:
        """Whether prefill selection uses the adaptive (top-p) budget: budget="adaptive" and a policy that
        ranks blocks by estimated attention (ESTIMATED_POLICIES); streaming/random/dense keep the fixed rule."""
        return self.budget == "adaptive" and self.policy in ESTIMATED_POLICIES

    def decode_tokens(self, seq_len: int) -> int:
        """Keys each query head keeps in a decode step at position seq_len - 1 under decode_rule="tokens": as many as
        the key blocks the bounds rule keeps hold (keep_counts of the query's block, an answer row), the query's own
        partial block counted by its length; at most seq_len. With decode_sparsity, that sparsity's blocks."""
        return decode_token_count(self.decode_blocks(seq_len), seq_len, self.block_size)

    def decode_blocks(self, seq_len: int) -> int:
        """Key blocks a decode step at position seq_len - 1 spends under decode_rule="tokens" (what its keys stand
        for in the figures): keep_counts of the query's block, an answer row, at decode_sparsity when set."""
        return int(self.decode_config.keep_counts(-(-seq_len // self.block_size), answer=True)[-1])

    @functools.cached_property
    def decode_config(self) -> "CABConfig":
        """The config whose budget a decode step spends: this one, or with decode_sparsity as its sparsity."""
        if self.decode_sparsity is None:
            return self
        return dataclasses.replace(self, sparsity=self.decode_sparsity, decode_sparsity=None)

    def dense_layer(self, layer: int) -> bool:
        """Whether attention layer ``layer`` (0-based, the model's order) attends densely: dense_layers."""
        return layer < self.dense_layers

    def replace(self, **changes: object) -> "CABConfig":
        """A copy with ``changes`` applied (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"CABConfig has no field(s) {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def keep_counts(self, num_q_blocks: int, device=None, answer: bool = False, prompt: bool = False):
        """Key blocks kept by query blocks 0..num_q_blocks-1, as an int64 tensor [num_q_blocks]; answer: the last
        of them produces the answer (the prompt's last query block, or a decode query's block): answer_keep;
        prompt: that row is the prompt's (answer_dense applies)."""
        t = keep_counts(self.sparsity, self.sink_blocks + self.local_blocks, num_q_blocks, device)
        if answer and num_q_blocks > 0:
            t[-1:] = self.answer_floor(t[-1:], num_q_blocks, prompt)
        return t

    @property
    def raises_answer_row(self) -> bool:
        """Whether the prompt's last query block keeps more than the rule's count (answer_blocks or answer_dense)."""
        return bool(self.answer_blocks) or self.answer_dense

    def answer_floor(self, counts, causal: int, prompt: bool = False):
        """answer_keep on a tensor of counts of answer rows with ``causal`` blocks each, without a device sync."""
        if prompt and self.answer_dense:
            return counts.clamp(min=causal)
        return counts.clamp(min=min(self.answer_blocks, causal)) if self.answer_blocks else counts

    def answer_keep(self, count: int, causal: int, prompt: bool = False) -> int:
        """What a row that produces the answer keeps, given the rule's ``count`` and its ``causal`` blocks:
        max(count, answer_blocks), at most causal; the prompt's last query block (prompt) with answer_dense: causal."""
        if prompt and self.answer_dense:
            return causal
        return min(causal, max(count, self.answer_blocks))


def decode_token_count(blocks: int, seq_len: int, block_size: int) -> int:
    """The keys that ``blocks`` key blocks hold for a decode query at position seq_len - 1, its own (last, partial)
    block among them, counted by its length; at least 1, at most seq_len (CABConfig.decode_tokens)."""
    pad = -(-seq_len // block_size) * block_size - seq_len
    return max(1, min(seq_len, blocks * block_size - pad))


def keep_counts(sparsity: float, forced: int, num_q_blocks: int, device=None):
    """The budget rule, the one place it is written: query block m (0-based) keeps
    min(m + 1, max(min(m + 1, forced), ceil((1 - sparsity) * (m + 1)))) key blocks; forced = sink + local blocks.
    int64 tensor [num_q_blocks] (CABConfig.keep_counts; the step metrics sum it)."""
    import torch

    m1 = torch.arange(1, num_q_blocks + 1, device=device, dtype=torch.float64)
    want = torch.ceil((1.0 - sparsity) * m1 - 1e-9)
    return torch.minimum(m1, torch.maximum(torch.clamp(m1, max=float(forced)), want)).to(torch.int64)


def _budget_multiplier(c, lo, hi, total):
    """The smallest lam >= 0 with sum(clamp(lam * c, lo, hi)) >= total, per leading index: c [..., n] > 0, lo, hi
    broadcastable to c, total broadcastable to c's leading shape, sum(lo) <= total <= sum(hi). The sum is piecewise
    linear in lam with kinks at lo / c and hi / c: a binary search over the sorted kinks (log2(2n) steps, each one
    sum) finds the segment, then one linear solve."""
    import torch

    lo, hi = lo.expand_as(c), hi.expand_as(c)

    def f(lam):  # [..., k] -> [..., k]
        return torch.minimum(torch.maximum(lam[..., :, None] * c[..., None, :], lo[..., None, :]),
                             hi[..., None, :]).sum(-1)

    kinks = torch.cat([lo / c, hi / c], -1).sort(-1).values  # [..., 2n]
    lead = kinks.shape[:-1]
    total = torch.as_tensor(total, dtype=c.dtype, device=c.device).expand(lead)
    lo_i = torch.zeros(lead, dtype=torch.long, device=c.device)  # invariant: f(kinks[hi_i]) >= total
    hi_i = torch.full(lead, kinks.shape[-1] - 1, dtype=torch.long, device=c.device)
    for _ in range(max(1, int(kinks.shape[-1]).bit_length())):
        mid = (lo_i + hi_i) // 2
        ok = f(kinks.gather(-1, mid[..., None]))[..., 0] >= total
        hi_i, lo_i = torch.where(ok, mid, hi_i), torch.where(ok, lo_i, mid + 1)
    right = kinks.gather(-1, hi_i[..., None])[..., 0]
    left = kinks.gather(-1, (hi_i - 1).clamp(min=0)[..., None])[..., 0]
    f_left, f_right = f(left[..., None])[..., 0], f(right[..., None])[..., 0]
    slope = (f_right - f_left) / (right - left).clamp(min=1e-300)
    solved = left + (total - f_left) / slope.clamp(min=1e-300)
    # at or before the first kink the sum is sum(lo) (>= total only when it equals it); on a flat segment, right
    return torch.where((hi_i == 0) | (f_left >= total), left, torch.where(slope > 0, solved.clamp(left, right), right))


def adaptive_keep_counts(mass, allowed, forced, fixed, top_p: float, floor: float, cap: float, first: int = 0,
                         window: int = 1):
    """The adaptive (top-p) budget rule, the one place it is written (CABConfig.budget="adaptive").

    mass [..., H, R, Mk] float >= 0: estimated attention mass of every (KV head, query block) row over the key
    blocks (any positive scale: each row is normalised over its allowed blocks; an all-zero row counts as
    uniform); allowed [R, Mk] bool (causal), forced [R, Mk] bool (sink/local, within allowed); fixed [R] int64:
    the fixed rule's counts of these rows (CABConfig.keep_counts); row r is query block first + r; window
    (CABConfig.budget_window): query blocks w * window .. w * window + window - 1 share one total. Returns int64
    [..., H, R]:

      1. need  = the fewest blocks, forced ones first then by mass, whose mass reaches top_p;
      2. bounds: lo = max(forced count, ceil(floor * fixed)), hi = min(allowed count, floor(cap * fixed));
      3. counts = clamp(lam * need, lo, hi) with one multiplier lam per leading index and window, solved exactly
         (_budget_multiplier) so that a window's counts sum to H x the fixed rule's counts of its rows; rounded
         down, then the window's rows with the largest remainders get one block more until its total is met exactly.

    So every window keeps exactly the fixed rule's number of blocks (the sparsity knob is the average) and only
    their split over its heads and query blocks adapts. A row's count depends on the rows of its window alone, so
    the rows given must hold whole windows (the prompt's last may end early) for the counts not to depend on how
    a prompt is cut into chunks. lo <= fixed <= hi always, so the total is feasible. Runs on the device of ``mass``
    without a host sync.
    """
    import torch

    if mass.dim() < 3 or tuple(mass.shape[-2:]) != tuple(allowed.shape) or allowed.shape != forced.shape \
            or tuple(fixed.shape) != (mass.shape[-2],):
        raise ValueError(f"adaptive_keep_counts: mass {tuple(mass.shape)} must be [..., H, R, Mk] with allowed and "
                         f"forced [R, Mk] (got {tuple(allowed.shape)}, {tuple(forced.shape)}) and fixed [R] "
                         f"(got {tuple(fixed.shape)})")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or first < 0:
        raise ValueError(f"adaptive_keep_counts: window must be an integer >= 1 and first >= 0, got window={window!r}, "
                         f"first={first!r}")
    lead, h, r = mass.shape[:-3], mass.shape[-3], mass.shape[-2]
    dev = mass.device
    if mass.numel() == 0:
        return fixed.to(dev, torch.int64).expand(*mass.shape[:-1]).clone()
    w = torch.nan_to_num(mass.float(), nan=0.0, posinf=0.0, neginf=0.0).clamp(min=0.0).masked_fill(~allowed, 0.0)
    w = torch.where(w.sum(-1, keepdim=True) > 0, w, allowed.float())
    p = w / w.sum(-1, keepdim=True).clamp(min=1e-30)
    # forced blocks first (the selection keeps them anyway), then by mass; disallowed blocks last (mass 0)
    order = p.masked_fill(forced, 2.0).masked_fill(~allowed, -1.0).argsort(dim=-1, descending=True, stable=True)
    cum = p.gather(-1, order).cumsum(-1)
    n_allowed = allowed.sum(-1)  # [R]
    n_forced = forced.sum(-1)
    need = (cum < top_p - 1e-6).sum(-1) + 1
    need = torch.maximum(torch.minimum(need, n_allowed), n_forced).clamp(min=1)

    # rows laid out by window: row r at slot (first + r) - window * (first // window) of G windows of `window` slots;
    # the slots before the first row and after the last are padding (lo = hi = 0: they keep 0 and never move)
    pad_l = first % window
    g = -(-(pad_l + r) // window)
    pad_r = g * window - pad_l - r

    def windows(x, value):  # [..., H, R] -> [..., G, H * window]
        x = torch.nn.functional.pad(x, (pad_l, pad_r), value=value)
        x = x.reshape(*x.shape[:-1], g, window)
        return x.movedim(-2, -3).reshape(*x.shape[:-3], g, x.shape[-3] * window)

    fx = fixed.to(dev, torch.float64)
    lo = torch.maximum(n_forced.double(), torch.ceil(fx * floor - 1e-9))  # [R]
    hi = torch.minimum(n_allowed.double(), torch.floor(fx * cap + 1e-9))
    c = windows(need.double(), 1.0)  # [*lead, G, H * window]
    lo, hi = windows(lo.expand(h, r), 0.0), windows(hi.expand(h, r), 0.0)  # [G, H * window]
    total = float(h) * torch.nn.functional.pad(fx, (pad_l, pad_r)).reshape(g, window).sum(-1)  # [G]

    lam = _budget_multiplier(c, lo, hi, total)
    x = torch.minimum(torch.maximum(lam[..., None] * c, lo), hi)
    n = torch.floor(x + 1e-9).clamp(min=lo, max=hi)
    short = total[:, None] - n.sum(-1, keepdim=True)  # > 0: blocks to add; < 0 (float slack): blocks to take away
    frac = x - n
    add = torch.where(n < hi, frac, float("-inf"))
    sub = torch.where(n > lo, -frac, float("-inf"))
    key = torch.where(short > 0, add, sub)
    slots = c.shape[-1]
    rank = torch.empty_like(c, dtype=torch.int64).scatter_(
        -1, key.argsort(dim=-1, descending=True, stable=True),
        torch.arange(slots, device=dev).expand_as(c).contiguous())
    move = (rank < short.abs()) & (key > float("-inf"))
    n = n + torch.sign(short) * move
    n = n.reshape(*n.shape[:-1], h, window).movedim(-3, -2).reshape(*n.shape[:-2], h, g * window)
    return n[..., pad_l:pad_l + r].to(torch.int64)
