"""The load generator against a fake OpenAI SSE server with fixed delays: timing, percentiles, scheduling, failure
accounting, files and the CLI."""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
from pathlib import Path

import httpx
import pytest

# the repo root (loadtests is not an installed package) and this folder (fake_openai) on sys.path; kept out of a
# conftest.py here, whose module name would shadow tests/conftest.py's helpers for `from conftest import ...`
for _p in (str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from fake_openai import FakeServer  # noqa: E402
from loadtests import client as lc  # noqa: E402
from loadtests import prompts as lp  # noqa: E402
from loadtests import report  # noqa: E402
from loadtests.__main__ import main  # noqa: E402

TTFT, ITL = 0.2, 0.05  # the fake server's delays (s)
SLACK = 0.15  # scheduling slack allowed on a busy 2-core machine (s)


@pytest.fixture(scope="module")
def fake_server():
    with FakeServer() as server:
        yield server


@pytest.fixture
def bodies(fake_server):
    """The request bodies the fake server receives during one test."""
    fake_server.app.state.bodies.clear()
    return fake_server.app.state.bodies


def run_cli(fake_server, tmp_path, *extra, fake=None, n=4, conc=2, out=8, prompt=200, label="t"):
    args = ["run", "--base-url", fake_server.url, "--prompt-tokens", str(prompt), "--output-tokens", str(out),
            "--num-requests", str(n), "--concurrency", str(conc), "--text", "synthetic", "--warmup", "0",
            "--out-dir", str(tmp_path), "--label", label, "--quiet", *extra]
    if fake is not None:
        args += ["--extra-body", json.dumps({"fake": fake})]
    rc = main(args)
    summary = sorted(tmp_path.glob(f"{label}_*.json"))
    lines = sorted(tmp_path.glob(f"{label}_*.jsonl"))
    assert len(summary) == 1 and len(lines) == 1
    rows = [json.loads(x) for x in lines[0].read_text().splitlines()]
    return rc, json.loads(summary[0].read_text()), rows


# ------------------------------------------------------------------------------------------------------------
# percentiles and the summary, on exact numbers
# ------------------------------------------------------------------------------------------------------------
def test_percentile_hand_values():
    assert report.percentile([1, 2, 3, 4], 50) == 2.5
    assert report.percentile([10], 99) == 10
    assert report.percentile(list(range(1, 12)), 90) == pytest.approx(10.0)  # rank 9 of 0..10
    assert report.percentile([5, 1, 3], 0) == 1 and report.percentile([5, 1, 3], 100) == 5
    assert math.isnan(report.percentile([], 50))
    with pytest.raises(ValueError):
        report.percentile([1.0], 101)


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
def test_percentile_matches_numpy(n):
    np = pytest.importorskip("numpy")
    xs = [random.Random(n).lognormvariate(0, 1) for _ in range(n)]
    for p in (0, 1, 50, 90, 99, 99.9, 100):
        assert report.percentile(xs, p) == pytest.approx(float(np.percentile(xs, p)), rel=1e-12)


def _rec(i, ttft, itl, out, ok=True, kind=None):
    r = lc.RequestRecord(i, 100, ok=ok, ttft=ttft if ok else None, itl=list(itl), output_tokens=out if ok else None,
                         error_kind=kind, error=None if ok else "boom")
    if ok:
        r.last_token = ttft + sum(itl)
        r.e2e = r.last_token + 0.001
        r.prompt_tokens = 100
    return r


def test_summary_exact_values_and_failures_excluded():
    recs = [_rec(0, 0.1, [0.01, 0.03], 3), _rec(1, 0.3, [0.02], 2), _rec(2, 0.2, [0.04, 0.05, 0.06], 4),
            _rec(3, 0, [], 0, ok=False, kind="http"), _rec(4, 0, [], 0, ok=False, kind="connection")]
    s = report.summarize(recs, duration=2.0, label="x", config={})
    assert s["requests"] == {"total": 5, "ok": 3, "failed": 2, "errors": {"http": 1, "connection": 1},
                             "first_errors": [{"index": 3, "kind": "http", "error": "boom"},
                                              {"index": 4, "kind": "connection", "error": "boom"}]}
    assert s["ttft_ms"]["n"] == 3 and s["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert s["ttft_ms"]["p90"] == pytest.approx(280.0) and s["ttft_ms"]["mean"] == pytest.approx(200.0)
    # ITL pools the gaps of all successful requests: 10, 20, 30, 40, 50, 60 ms
    assert s["itl_ms"]["n"] == 6 and s["itl_ms"]["p50"] == pytest.approx(35.0)
    assert s["itl_ms"]["p99"] == pytest.approx(59.5)
    # TPOT per request: (last - ttft) / (out - 1) = 20, 20, 50 ms
    assert s["tpot_ms"]["p50"] == pytest.approx(20.0) and s["tpot_ms"]["max"] == pytest.approx(50.0)
    assert s["output_tokens_total"] == 9
    assert s["throughput"]["output_tokens_per_s"] == pytest.approx(4.5)
    assert s["throughput"]["requests_per_s"] == pytest.approx(1.5)
    assert s["throughput"]["total_tokens_per_s"] == pytest.approx((9 + 300) / 2.0)


def test_summary_all_failed_has_no_latencies():
    s = report.summarize([_rec(0, 0, [], 0, ok=False, kind="timeout")], 1.0, "x", {})
    assert s["requests"]["failed"] == 1 and s["ttft_ms"] == {"n": 0, "mean": None, "min": None, "max": None,
                                                             "p50": None, "p90": None, "p99": None}
    assert s["throughput"]["output_tokens_per_s"] == 0


def test_arrival_times():
    assert lc.arrival_times(5, math.inf) == [0.0] * 5
    a = lc.arrival_times(4000, 20.0, seed=3)
    gaps = [b - x for x, b in zip(a, a[1:])]
    assert a[0] == 0 and all(g >= 0 for g in gaps)
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 20, rel=0.06)  # exponential, mean 1/rate
    assert sum(g > 0.1 for g in gaps) / len(gaps) == pytest.approx(math.exp(-2), abs=0.03)  # P(gap > 2/rate)
    assert a == lc.arrival_times(4000, 20.0, seed=3) and a != lc.arrival_times(4000, 20.0, seed=4)
    with pytest.raises(ValueError):
        lc.arrival_times(3, 0.0)


# ------------------------------------------------------------------------------------------------------------
# against the fake server
# ------------------------------------------------------------------------------------------------------------
def test_ttft_itl_e2e_measured(fake_server, tmp_path, bodies):
    rc, s, rows = run_cli(fake_server, tmp_path, fake={"ttft": TTFT, "itl": ITL}, n=4, conc=2, out=8)
    assert rc == 0 and s["requests"]["ok"] == 4 and len(rows) == 4
    for r in rows:
        assert r["ok"] and r["status"] == 200 and r["chunks"] == 8
        assert TTFT <= r["ttft"] < TTFT + SLACK
        assert len(r["itl"]) == 7 and all(ITL * 0.9 <= g < ITL + SLACK for g in r["itl"])
        assert r["e2e"] >= TTFT + 7 * ITL and r["e2e"] >= r["last_token"]
        assert r["output_tokens"] == 8 and r["output_tokens_from"] == "usage"
        body = next(b for b in bodies if f"-{r['index']}] " in b["prompt"][:40])
        assert r["prompt_tokens"] == len(body["prompt"].split()) + 1  # the server's usage count
        assert r["tpot"] == pytest.approx((r["last_token"] - r["ttft"]) / 7)
    assert TTFT * 1000 <= s["ttft_ms"]["p50"] < (TTFT + SLACK) * 1000
    assert ITL * 900 <= s["itl_ms"]["p50"] < (ITL + SLACK) * 1000
    assert s["itl_ms"]["n"] == 28 and s["e2e_ms"]["n"] == 4


def test_closed_loop_keeps_concurrency(fake_server, tmp_path, bodies):
    fake_server.app.state.max_in_flight = 0
    one = TTFT + 3 * ITL  # one request with 4 tokens
    rc, s, rows = run_cli(fake_server, tmp_path, fake={"ttft": TTFT, "itl": ITL}, n=6, conc=2, out=4)
    assert rc == 0 and fake_server.app.state.max_in_flight == 2
    assert 3 * one <= s["duration_s"] < 3 * one + 3 * SLACK  # three waves of two
    assert s["config"]["concurrency"] == 2 and s["config"]["rate"] is None
    sent = sorted(r["sent_at"] for r in rows)
    assert sent[2] >= one - 0.01  # the third request waits for a free slot
    fake_server.app.state.max_in_flight = 0
    rc, s, _ = run_cli(fake_server, tmp_path, fake={"ttft": TTFT, "itl": ITL}, n=6, conc=6, out=4, label="c6")
    assert rc == 0 and fake_server.app.state.max_in_flight == 6 and s["duration_s"] < one + 2 * SLACK


def test_poisson_schedule_followed(fake_server, tmp_path, bodies):
    rc, s, rows = run_cli(fake_server, tmp_path, "--rate", "8", "--seed", "5", fake={"ttft": 0.05, "itl": 0.01},
                          n=8, out=2)
    assert rc == 0 and s["config"]["rate"] == 8.0
    expect = lc.arrival_times(8, 8.0, seed=5)
    for r in rows:  # released on the Poisson schedule; sent once a slot is free (never earlier)
        assert r["scheduled_at"] >= expect[r["index"]] - 1e-3
        assert r["scheduled_at"] < expect[r["index"]] + SLACK
        assert r["sent_at"] >= r["scheduled_at"]


@pytest.mark.parametrize("mode, kind, status, message", [
    ("http400", "http", 400, "bad sparsity"),
    ("drop", "connection", 200, "incomplete"),
    ("no_done", "stream", 200, "[DONE]"),
    ("error_event", "stream", 200, "engine died"),
])
def test_failures_counted_not_lost(fake_server, tmp_path, bodies, mode, kind, status, message):
    rc, s, rows = run_cli(fake_server, tmp_path, fake={"ttft": 0.02, "itl": 0.01, "mode": mode, "fail_every": 2},
                          n=6, out=6)
    assert rc == 1  # some requests failed
    assert len(rows) == 6 and s["requests"]["total"] == 6
    failed = [r for r in rows if not r["ok"]]
    assert sorted(r["index"] for r in failed) == [0, 2, 4]  # the tags the server failed
    assert all(r["error_kind"] == kind and r["status"] == status and message in r["error"] for r in failed)
    if mode == "http400":
        assert all(r["ttft"] is None and r["chunks"] == 0 for r in failed)
    else:  # tokens arrived before the failure: kept in the row for debugging, still a failure
        assert all(r["chunks"] >= 1 for r in failed)
    assert s["requests"]["ok"] == 3 and s["requests"]["failed"] == 3 and s["requests"]["errors"] == {kind: 3}
    assert s["ttft_ms"]["n"] == 3 and s["e2e_ms"]["n"] == 3  # failed requests stay out of the latencies
    assert s["output_tokens_total"] == 3 * 6


def test_chat_role_chunk_is_not_a_token(fake_server, tmp_path, bodies):
    rc, s, rows = run_cli(fake_server, tmp_path, "--endpoint", "chat",
                          fake={"ttft": TTFT, "itl": ITL, "mode": "role_first"}, n=2, out=5)
    assert rc == 0 and all(b["messages"][0]["role"] == "user" for b in bodies)
    for r in rows:  # the role-only chunk arrives at once; TTFT waits for content
        assert r["ttft"] >= TTFT and r["chunks"] == 5 and len(r["itl"]) == 4


def test_extra_body_and_request_shape(fake_server, tmp_path, bodies):
    extra = {"sparsity": 0.9, "attention_policy": "cab", "vllm_xargs": {"cab_sparsity": 0.9}, "fake": {"ttft": 0}}
    rc, s, _ = run_cli(fake_server, tmp_path, "--extra-body", json.dumps(extra), "--ignore-eos", n=3, out=4,
                       prompt=300)
    assert rc == 0 and len(bodies) == 3
    for b in bodies:
        assert b["sparsity"] == 0.9 and b["attention_policy"] == "cab" and b["vllm_xargs"] == {"cab_sparsity": 0.9}
        assert b["stream"] is True and b["max_tokens"] == 4 and b["ignore_eos"] is True
        assert b["model"] == "fake-model"  # from GET /v1/models
        assert len(b["prompt"].split()) + 1 == 300  # /tokenize of the fake server counts words + 1
    assert len({b["prompt"][:40] for b in bodies}) == 3
    assert s["config"]["extra_body"] == extra and s["config"]["token_counter"] == "server"


def test_warmup_not_recorded_and_prompts_unique_across_runs(fake_server, tmp_path, bodies):
    rc, s, rows = run_cli(fake_server, tmp_path, "--warmup", "2", fake={"ttft": 0, "itl": 0}, n=3, out=2)
    assert rc == 0 and len(bodies) == 5 and len(rows) == 3
    rc, _, _ = run_cli(fake_server, tmp_path, fake={"ttft": 0, "itl": 0}, n=3, out=2, label="again")
    tags = [b["prompt"].split("]")[0] for b in bodies]
    assert len(set(tags)) == 8  # a second run with the same seed still sends new prefixes


def test_unreachable_server(tmp_path, capsys):
    args = ["run", "--base-url", "http://127.0.0.1:9", "--num-requests", "2", "--text", "synthetic",
            "--out-dir", str(tmp_path), "--quiet"]
    assert main(args) == 3 and "cannot reach" in capsys.readouterr().err
    # with --model and no warm-up every request is attempted and counted as a connection failure
    assert main([*args, "--model", "m", "--warmup", "0", "--label", "down"]) == 1
    s = json.loads(next(tmp_path.glob("down_*.json")).read_text())
    assert s["requests"]["failed"] == 2 and s["requests"]["errors"] == {"connection": 2}
    assert s["config"]["token_counter"] == "chars/4"


def test_warmup_failure_stops_the_run(fake_server, tmp_path, capsys):
    rc = main(["run", "--base-url", fake_server.url, "--num-requests", "2", "--text", "synthetic", "--prompt-tokens",
               "50", "--out-dir", str(tmp_path), "--extra-body", '{"fake": {"mode": "http400"}}'])
    assert rc == 3 and "warm-up request failed (http): HTTP 400" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_request_timeout_counted(fake_server, tmp_path, bodies):
    rc, s, rows = run_cli(fake_server, tmp_path, "--timeout", "0.3", fake={"ttft": 1.0, "itl": 0}, n=2, out=2)
    assert rc == 1 and s["requests"]["errors"] == {"timeout": 2}


def test_send_direct_protocol_error():
    """A body that is not SSE JSON is a protocol failure, not a crash."""
    async def go():
        def handler(request):
            return httpx.Response(200, content=b"data: not json\n\ndata: [DONE]\n\n")
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as c:
            rec = lc.RequestRecord(0, 1)
            return await lc.send(c, "http://x/v1/completions", {}, rec, "completions", 0.0)
    rec = asyncio.run(go())
    assert not rec.ok and rec.error_kind == "protocol" and "not JSON" in rec.error


def test_sse_multiline_and_comments():
    async def go():
        def handler(request):
            body = (b": ping\n\n"
                    b'data: {"choices": [{"text": "a"}]}\n\n'
                    b"event: message\n"
                    b'data: {"choices": \ndata: [{"text": "b"}]}\n\n'
                    b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}\n\n'
                    b"data: [DONE]\n\n")
            return httpx.Response(200, content=body)
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as c:
            return await lc.send(c, "http://x/v1/completions", {}, lc.RequestRecord(0, 1), "completions", 0.0)
    rec = asyncio.run(go())
    assert rec.ok and rec.chunks == 2 and rec.text == "ab" and rec.output_tokens == 2 and rec.prompt_tokens == 7


# ------------------------------------------------------------------------------------------------------------
# prompts
# ------------------------------------------------------------------------------------------------------------
WORDS = lp.TokenCounter(lambda t: len(t.split()) + 1, "words", True)


@pytest.mark.parametrize("n_tokens", [20, 333, 4096])
def test_prompts_exact_length_distinct_reproducible(n_tokens):
    ps, source = lp.build_prompts(5, n_tokens, WORDS, text="synthetic", seed=1, nonce="abc")
    assert source == "synthetic" and len(ps) == 5
    assert all(p.tokens == n_tokens == WORDS.count(p.text) for p in ps)
    assert len({p.text.split("] ", 1)[1][:50] for p in ps}) == 5  # different text, not just different tags
    again, _ = lp.build_prompts(5, n_tokens, WORDS, text="synthetic", seed=1, nonce="abc")
    assert [p.text for p in again] == [p.text for p in ps]
    other, _ = lp.build_prompts(5, n_tokens, WORDS, text="synthetic", seed=1, nonce="xyz")
    assert [p.text.split("] ", 1)[1] for p in other] == [p.text.split("] ", 1)[1] for p in ps]


def test_prompts_austen_when_cached():
    from cab_models.models import cache_root

    if not (cache_root() / "text" / "austen.json").exists():
        pytest.skip("Austen text not cached on this machine (cab_models.text.austen_books downloads it)")
    ps, source = lp.build_prompts(2, 500, lp.heuristic_counter(), text="auto")
    # chars/4 moves in steps of whole words, so the fit lands within a word of the target
    assert source == "austen" and all(abs(p.tokens - 500) <= 5 for p in ps)
    assert all(p.text.split("] ", 1)[1][:1].isalnum() or p.text.split("] ", 1)[1][:1] in "\"'_(" for p in ps)


def test_fit_prompt_rejects_impossible():
    with pytest.raises(ValueError, match="too short"):
        lp.fit_prompt("[t] ", "only a few words here", 100, WORDS)
    with pytest.raises(ValueError, match="shorter than the prompt tag"):
        lp.fit_prompt("[a long tag of words] ", "x " * 100, 2, WORDS)


def test_server_root():
    assert lp.server_root("http://h:1/v1/") == "http://h:1" and lp.server_root("http://h:1") == "http://h:1"


# ------------------------------------------------------------------------------------------------------------
# compare and the command line
# ------------------------------------------------------------------------------------------------------------
def _summary(label, ttft, itl, e2e, tps, prompt=4096, conc=1, ok=4):
    dist = lambda v: {"n": ok, "mean": v, "min": v, "max": v, "p50": v, "p90": v, "p99": v}  # noqa: E731
    return {"version": report.SUMMARY_VERSION, "label": label,
            "config": {"endpoint": "completions", "prompt_tokens": prompt, "output_tokens": 16, "concurrency": conc,
                       "rate": None},
            "requests": {"total": 4, "ok": ok, "failed": 4 - ok, "errors": {}}, "prompt_tokens_mean": prompt,
            "ttft_ms": dist(ttft), "itl_ms": dist(itl), "tpot_ms": dist(itl), "e2e_ms": dist(e2e),
            "throughput": {"output_tokens_per_s": tps}}


def test_compare_table_ratios_by_workload():
    runs = [_summary("dense", 100, 20, 400, 40), _summary("cab", 50, 30, 500, 32),
            _summary("dense", 200, 20, 800, 20, prompt=8192), _summary("cab", 100, 10, 200, 80, prompt=8192),
            _summary("cab", 10, 10, 10, 10, conc=4)]  # no dense run at concurrency 4
    table = report.compare_table(runs, baseline="dense")
    rows = [line for line in table.splitlines() if line.startswith("| cab")]
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    assert cells[0][-4:] == ["0.50×", "1.50×", "1.25×", "0.80×"]  # 4096, c1
    assert cells[1][-4:] == ["—", "—", "—", "—"]  # 4096, c4: no baseline
    assert cells[2][-4:] == ["0.50×", "0.50×", "0.25×", "4.00×"]  # 8192, c1
    assert "| dense | 4096 | 1 | 4/4 | 100.0 |" in table
    header = table.splitlines()[0]
    assert "TTFT p50 ×dense" in header and header.count("|") == len(cells[0]) + 1


def test_compare_errors():
    a, b = _summary("dense", 1, 1, 1, 1), _summary("cab", 1, 1, 1, 1)
    with pytest.raises(ValueError, match="two or more"):
        report.compare_table([a])
    with pytest.raises(ValueError, match="none of the runs' labels"):
        report.compare_table([a, b], baseline="flash")
    with pytest.raises(ValueError, match="same workload"):
        report.compare_table([a, a, b], baseline="dense")


def test_compare_cli(tmp_path, capsys):
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(_summary("dense", 100, 20, 400, 40)))
    pb.write_text(json.dumps(_summary("cab", 25, 20, 400, 40)))
    out = tmp_path / "t.md"
    assert main(["compare", str(pa), str(pb), "--out", str(out)]) == 0
    assert "0.25×" in capsys.readouterr().out and "0.25×" in out.read_text()
    (tmp_path / "c.jsonl").write_text('{"index": 0}\n')
    assert main(["compare", str(pa), str(tmp_path / "c.jsonl")]) == 2
    assert "not a load-test summary" in capsys.readouterr().err
    assert main(["compare", str(pa), str(tmp_path / "missing.json")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--concurrency", "0"], "argument --concurrency: expected an integer >= 1, got '0'"),
    (["--num-requests", "x"], "argument --num-requests: expected an integer >= 1, got 'x'"),
    (["--rate", "0"], "expected requests/s > 0, or inf for a closed loop"),
    (["--rate", "fast"], "expected requests/s > 0"),
    (["--extra-body", "[1, 2]"], "expected a JSON object such as"),
    (["--extra-body", "{bad"], "not valid JSON"),
    (["--prompt-tokens", "-5"], "expected an integer >= 1, got '-5'"),
    (["--label", "a/b"], "cannot name a file"),
    (["--endpoint", "embeddings"], "invalid choice"),
    (["--timeout", "nan"], "finite number"),
])
def test_cli_rejects_bad_input(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_cli_needs_a_command(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
