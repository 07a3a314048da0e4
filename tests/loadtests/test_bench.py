"""The load tests through `vllm bench serve` against a fake OpenAI SSE server: the scenario grid and its bench serve
arguments, an end-to-end run (requests, CAB fields, concurrency, the saved JSON in bench serve's metric names),
failures, and the comparison table read from saved results."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fake_openai (no conftest.py here: see tests/conftest.py)

from fake_openai import FakeServer  # noqa: E402
from loadtests import bench, report  # noqa: E402
from loadtests.__main__ import main  # noqa: E402

FAST = {"fake": {"ttft": 0.05, "itl": 0.01}}


@pytest.fixture(scope="module")
def fake_server():
    with FakeServer() as server:
        yield server


@pytest.fixture
def bodies(fake_server):
    fake_server.app.state.bodies.clear()
    fake_server.app.state.max_in_flight = 0
    return fake_server.app.state.bodies


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    """A word-level tokenizer folder (one token per whitespace-separated word), made offline: bench serve draws the
    prompts' token ids from it, and the fake server's /tokenize counts words the same way."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {w: i for i, w in enumerate(["[UNK]", "<s>", *(f"w{i}" for i in range(500))])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    path = tmp_path_factory.mktemp("tokenizer")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>").save_pretrained(path)
    return str(path)


def run(fake_server, tokenizer, out_dir, *extra, prompt=("40",), conc=("2",), n=3, out=4, body=FAST):
    pytest.importorskip("vllm.benchmarks.serve")
    return main(["run", "--base-url", fake_server.url + "/v1", "--model", "fake-model", "--tokenizer", tokenizer,
                 "--prompt-tokens", *prompt, "--output-tokens", str(out), "--num-requests", str(n),
                 "--concurrency", *conc, "--out-dir", str(out_dir), "--quiet", "--extra-body", json.dumps(body),
                 *extra])


# ------------------------------------------------------------------------------------------------------------
# the scenarios and their bench serve command lines (no server)
# ------------------------------------------------------------------------------------------------------------
def test_scenarios_grid_and_labels():
    args = __import__("loadtests.__main__", fromlist=["parser"]).parser().parse_args(
        ["run", "--prompt-tokens", "4096", "7168", "--concurrency", "1", "4", "--sparsity", "0", "0.9",
         "--label", "cab", "--extra-body", '{"vllm_xargs": {"cab_policy": "cab"}, "x": 1}'])
    runs = __import__("loadtests.__main__", fromlist=["scenarios"]).scenarios(args)
    assert [(s.prompt_tokens, s.concurrency, s.label) for s in runs] == [
        (p, c, lab) for p in (4096, 7168) for c in (1, 4) for lab in ("cab-0", "cab-0.9")]
    assert runs[1].extra_body == {"vllm_xargs": {"cab_policy": "cab", "cab_sparsity": 0.9}, "x": 1}
    assert runs[1].stem == "cab-0.9_completions-p4096-o128-c1"
    assert args.extra_body == {"vllm_xargs": {"cab_policy": "cab"}, "x": 1}  # not mutated
    poisson = bench.Scenario("dense", 512, 16, None, 2.5)
    assert poisson.workload == "completions-p512-o16-r2.5"


def test_bench_argv_is_bench_serve_flags():
    s = bench.Scenario("cab-0.9", 4096, 16, 4, math.inf, "chat", {"vllm_xargs": {"cab_sparsity": 0.9}})
    argv = bench.bench_argv(s, base_url="http://h:1", model="m", tokenizer="/tok", num_requests=8, seed=7,
                            result_dir="/out", goodput=["ttft:2000"], quiet=True, extra=["--burstiness", "0.5"])
    flags = dict(zip(argv, argv[1:]))
    assert flags["--backend"] == "openai-chat" and flags["--endpoint"] == "/v1/chat/completions"
    assert flags["--dataset-name"] == "random" and flags["--random-range-ratio"] == "0"
    assert flags["--random-input-len"] == "4096" and flags["--random-output-len"] == "16"
    assert flags["--max-concurrency"] == "4" and flags["--request-rate"] == "inf" and flags["--num-prompts"] == "8"
    assert json.loads(flags["--extra-body"]) == {"vllm_xargs": {"cab_sparsity": 0.9}}
    assert flags["--result-filename"] == "cab-0.9_chat-p4096-o16-c4.json" and "--save-detailed" in argv
    assert flags["--goodput"] == "ttft:2000" and argv[-2:] == ["--burstiness", "0.5"]
    serve = pytest.importorskip("vllm.benchmarks.serve")
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    p = FlexibleArgumentParser()
    serve.add_cli_args(p)
    ns = p.parse_args(argv)  # bench serve itself accepts every flag
    assert (ns.max_concurrency, ns.random_input_len, ns.extra_body, ns.label) == (4, 4096, s.extra_body, "cab-0.9")


# ------------------------------------------------------------------------------------------------------------
# end to end through bench serve
# ------------------------------------------------------------------------------------------------------------
def test_run_end_to_end(fake_server, tokenizer, tmp_path, bodies):
    rc = run(fake_server, tokenizer, tmp_path, "--sparsity", "0.9", "--label", "cab", "--warmup", "1",
             "--seed", "11", "--goodput", "ttft:5000", prompt=("40", "64"))
    assert rc == 0
    files = sorted(p.name for p in tmp_path.glob("*.json"))
    assert files == ["cab-0.9_completions-p40-o4-c2.json", "cab-0.9_completions-p64-o4-c2.json"]
    assert len(bodies) == 1 + 2 * 3  # the warm-up, then 3 requests per scenario
    assert [len(b["prompt"].split()) for b in bodies] == [40] * 4 + [64] * 3  # exact lengths (word tokens)
    assert len({b["prompt"] for b in bodies}) == len(bodies)  # no prompt repeats (prefix cache)
    for b in bodies:
        assert b["vllm_xargs"] == {"cab_sparsity": 0.9} and b["fake"] == FAST["fake"]
        assert b["ignore_eos"] is True and b["temperature"] == 0 and b["max_tokens"] == 4 and b["stream"] is True
    assert fake_server.app.state.max_in_flight == 2
    r = report.load_result(tmp_path / files[1])
    assert (r["label"], r["completed"], r["failed"], r["max_concurrency"]) == ("cab-0.9", 3, 0, 2)
    for m in report.METRICS:
        for stat in ("mean", "median", "p50", "p90", "p99"):
            assert f"{stat}_{m}_ms" in r, (stat, m)
    assert 40 <= r["median_ttft_ms"] < 1000 and 5 <= r["median_itl_ms"] < 500
    assert r["request_goodput"] is not None and r["output_throughput"] > 0
    assert len(r["ttfts"]) == 3 and len(r["itls"][0]) == 3 and "generated_texts" not in r  # per request, no text
    assert r["loadtests"]["scenario"]["prompt_tokens"] == 64 and r["loadtests"]["seed"] == 13
    assert report.workload(r) == ("completions", 64, 4, 2, None)


@pytest.mark.filterwarnings("ignore:All requests failed:UserWarning")
def test_failures_are_counted(fake_server, tokenizer, tmp_path, bodies, capsys):
    rc = run(fake_server, tokenizer, tmp_path, "--warmup", "0", body={"fake": {"mode": "http400"}})
    assert rc == 1
    (path,) = tmp_path.glob("*.json")
    r = json.loads(path.read_text())
    assert r["completed"] == 0 and r["failed"] == 3 and all(r["errors"])
    assert run(fake_server, tokenizer, tmp_path, "--warmup", "1", body={"fake": {"mode": "http400"}}) == 3
    assert "warm-up failed" in capsys.readouterr().err


def test_unreachable_server(tokenizer, tmp_path, capsys):
    rc = main(["run", "--base-url", "http://127.0.0.1:9", "--tokenizer", tokenizer, "--out-dir", str(tmp_path)])
    assert rc == 3 and "cannot reach" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
# the comparison, from saved bench serve JSON
# ------------------------------------------------------------------------------------------------------------
def _result(label, conc, ttft, itl, tok_s, prompt=4096, failed=0):
    """The fields of a `vllm bench serve --save-result` JSON that the report reads (as bench serve names them)."""
    r = {"date": "20261128-091000", "backend": "openai", "label": label, "model_id": "smollm2",
         "num_prompts": 4, "request_rate": "inf", "burstiness": 1.0, "max_concurrency": conc, "duration": 10.0,
         "completed": 4 - failed, "failed": failed, "total_input_tokens": prompt * (4 - failed),
         "total_output_tokens": 16 * (4 - failed), "request_throughput": 0.4, "request_goodput": None,
         "output_throughput": tok_s, "total_token_throughput": 100.0}
    for m, v in (("ttft", ttft), ("tpot", itl), ("itl", itl), ("e2el", ttft + 15 * itl)):
        r |= {f"mean_{m}_ms": v, f"median_{m}_ms": v, f"std_{m}_ms": 0.0, f"p99_{m}_ms": 1.5 * v}
    return r


def test_compare_table_ratios_by_workload(tmp_path, capsys):
    runs = [_result("FLASH_ATTN", 1, 100.0, 10.0, 20.0), _result("cab-0.9", 1, 50.0, 20.0, 10.0),
            _result("FLASH_ATTN", 4, 400.0, 40.0, 40.0), _result("cab-0.9", 4, 200.0, 20.0, 80.0, failed=1)]
    paths = []
    for i, r in enumerate(runs):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(r))
    assert main(["compare", *map(str, paths), "--baseline", "FLASH_ATTN", "--out", str(tmp_path / "t.md")]) == 0
    table = capsys.readouterr().out
    lines = table.splitlines()
    assert lines[0].startswith("| run | prompt tok | conc | ok/total | median_ttft_ms | p99_ttft_ms | median_tpot_ms")
    assert "median_ttft_ms ×FLASH_ATTN" in lines[0] and "output_throughput ×FLASH_ATTN" in lines[0]
    rows = [ln.split(" | ") for ln in lines[2:6]]
    assert [(r[0].strip("| "), r[2]) for r in rows] == [("FLASH_ATTN", "1"), ("cab-0.9", "1"), ("FLASH_ATTN", "4"),
                                                       ("cab-0.9", "4")]
    assert rows[1][-5:] == ["0.50×", "2.00×", "2.00×", f"{(50 + 300) / (100 + 150):.2f}×", "0.50× |"]
    assert rows[3][3] == "3/4" and rows[3][-5] == "0.50×" and rows[3][-1] == "2.00× |"  # conc 4 vs conc 4
    assert (tmp_path / "t.md").read_text().strip() == table.strip()


def test_compare_errors(tmp_path, capsys):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"version": 1, "label": "dense", "ttft_ms": {}}))  # the former summary format
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_result("a", 1, 1.0, 1.0, 1.0)))
    assert main(["compare", str(old), str(good)]) == 2
    assert "not a `vllm bench serve` result" in capsys.readouterr().err
    assert main(["compare", str(good)]) == 2
    assert main(["compare", str(good), str(good), "--baseline", "zzz"]) == 2
    assert main(["compare", str(tmp_path / "missing.json"), str(good)]) == 2


@pytest.mark.parametrize("argv,message", [
    (["run", "--concurrency", "0"], "expected"),
    (["run", "--sparsity", "1.0"], "sparsity"),
    (["run", "--rate", "0"], "requests/s"),
    (["run", "--extra-body", "[1]"], "JSON object"),
    (["run", "--label", "a/b"], "cannot name a file"),
])
def test_cli_rejects_bad_input(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
