"""The predictor kernels' integer arguments that move with every prompt chunk (token counts, first blocks, key-block
counts) are left unspecialized, so no new compile happens while serving: Triton specializes an int argument on
being 1 or a multiple of 16, and a chunk whose count falls the other way than the warm-up's made a variant of its
own (seen by vLLM's JIT monitor during a load test). Read from the kernels' decorators, so it holds on CPU CI,
where the interpreter replaces the JIT."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

OPS = Path(__file__).resolve().parents[2] / "cab_vllm" / "ops"

# kernel -> arguments that change from one chunk (or step) of a request to the next
MOVING = {
    ("fused_select.py", "_logits_kernel"): {"n_tokens", "first", "rows", "m"},
    ("fused_select.py", "_select_rows_kernel"): {"first", "kmax", "exact_row", "m"},
    ("coarsen.py", "_pool_kernel"): {"n_tokens", "first_block"},
    ("coarsen.py", "_softmax_group_kernel"): {"n_tokens", "m", "q_block_offset"},
    ("coarsen.py", "_sampled_kernel"): {"n_tokens", "q_offset", "rows", "num_splits", "m_blocks"},
    ("coarsen.py", "_sampled_mass_kernel"): {"n_tokens", "rows", "num_splits", "m_blocks"},
}


def _unspecialized(path: Path, name: str) -> tuple[set, set]:
    """(the kernel's do_not_specialize names, its parameter names), from its @triton.jit decorator."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            params = {a.arg for a in node.args.args}
            for dec in node.decorator_list:
                if isinstance(dec, ast.Call):
                    for kw in dec.keywords:
                        if kw.arg == "do_not_specialize":
                            return set(ast.literal_eval(kw.value)), params
            return set(), params
    raise AssertionError(f"{name} not found in {path.name}")


@pytest.mark.parametrize("where", sorted(MOVING), ids=lambda w: w[1])
def test_chunk_moving_arguments_are_not_specialized(where):
    names, params = _unspecialized(OPS / where[0], where[1])
    assert MOVING[where] <= params, f"{where[1]}: the test names arguments the kernel does not have"
    assert MOVING[where] <= names, f"{where[1]} specializes {sorted(MOVING[where] - names)}"
    assert names <= params, f"{where[1]}: do_not_specialize names {sorted(names - params)}, not arguments"
