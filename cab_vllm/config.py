"""CABConfig: every knob of block selection in one frozen, validated dataclass."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

POLICIES = ("cab", "curvature", "magnitude", "h2o", "streaming", "random", "dense")
ESTIMATORS = ("max_l2", "mean", "topr", "bounds", "sampled")
DECODE_RULES = ("auto", "bounds", "prompt")


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
                      "bounds" for magnitude; experiments/RESULTS.md). streaming/random/dense keep their own.
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

    @property
    def decodes_from_prompt(self) -> bool:
        """Whether decode steps use the prompt rule (see decode_rule; "auto" resolved per policy)."""
        rule = self.decode_rule
        if rule == "auto":
            rule = "bounds" if self.policy == "magnitude" else "prompt"
        return rule == "prompt" and self.policy in ("cab", "magnitude", "h2o", "curvature")

    @property
    def decode_scoring(self) -> str:
        """How a decode step picks its key blocks, the one dispatch the engine and the adapter share: "all"
        (dense), "prompt" (the prompt's stored selection, decodes_from_prompt), "recent" (streaming), "random",
        or "bounds" (Quest-style upper bounds with the real query: cab, magnitude, and h2o/curvature off the prompt
        rule). A "prompt" row whose prompt selection is not stored falls back to "bounds"."""
        if self.policy == "dense":
            return "all"
        if self.decodes_from_prompt:
            return "prompt"
        return {"streaming": "recent", "random": "random"}.get(self.policy, "bounds")

    def replace(self, **changes: object) -> "CABConfig":
        """A copy with ``changes`` applied (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"CABConfig has no field(s) {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def keep_counts(self, num_q_blocks: int, device=None):
        """Key blocks kept by query blocks 0..num_q_blocks-1, as an int64 tensor [num_q_blocks]."""
        return keep_counts(self.sparsity, self.sink_blocks + self.local_blocks, num_q_blocks, device)


def keep_counts(sparsity: float, forced: int, num_q_blocks: int, device=None):
    """The budget rule, the one place it is written: query block m (0-based) keeps
    min(m + 1, max(min(m + 1, forced), ceil((1 - sparsity) * (m + 1)))) key blocks; forced = sink + local blocks.
    int64 tensor [num_q_blocks] (CABConfig.keep_counts; the step metrics sum it)."""
    import torch

    m1 = torch.arange(1, num_q_blocks + 1, device=device, dtype=torch.float64)
    want = torch.ceil((1.0 - sparsity) * m1 - 1e-9)
    return torch.minimum(m1, torch.maximum(torch.clamp(m1, max=float(forced)), want)).to(torch.int64)
