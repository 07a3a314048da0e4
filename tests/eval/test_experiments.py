"""python -m cab_experiments: variants, resumable JSONL, YaRN, the chunked NLL, the needle grid / ppl / bridge runners on a real
small model (SmolLM2, CPU), plots and the CLI's input errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cab_vllm.config import CABConfig
from cab_experiments import cli
from cab_experiments.bridge import planted_needle, seed_graph_rows, synthetic_retrieval
from cab_experiments.common import Jsonl, Variant, cells, yarn_rope
from cab_experiments.ppl import window_offsets


# ------------------------------------------------------------------------------------------------ pure logic
def test_variant_parse():
    v = Variant.parse("cab:curvature_share=0.5,estimator=max_l2,exact_rows=0")
    cfg = v.config(0.95)
    assert cfg == CABConfig(policy="cab", sparsity=0.95, curvature_share=0.5, estimator="max_l2", exact_rows=0)
    assert Variant.parse("dense").config(0.9) is None
    assert Variant.parse("streaming").config(0.0) is None  # sparsity 0 is dense attention
    tok = Variant.parse("cab:decode_rule=tokens,dense_prefill=1").config(0.98)
    assert tok.dense_prefill is True and tok.decode_scoring == "tokens"
    assert Variant.parse("cab:dense_prefill=0").config(0.9).dense_prefill is False  # not bool("0")
    mixed = Variant.parse("cab:decode_rule=tokens,decode_sparsity=0.98").config(0.8)
    assert (mixed.sparsity, mixed.decode_sparsity) == (0.8, 0.98)


@pytest.mark.parametrize("spec, msg", [
    ("bogus", "unknown policy"),
    ("cab:nonsense=1", "not a CABConfig field"),
    ("cab:curvature_share", "not field=value"),
    ("cab:exact_rows=many", "is not a int"),
    ("cab:curvature_share=2", "curvature_share"),  # validated by CABConfig at parse time
    ("cab:sparsity=0.5", "not a CABConfig field"),  # sparsity comes from the grid, not the variant
    ("cab:decode_rule=tokens,dense_prefill=yes", "dense_prefill='yes' must be 0 or 1"),
    ("cab:dense_prefill=1", "needs a decode rule of its own"),
    ("cab:decode_rule=tokens,decode_sparsity=high", "decode_sparsity='high' is not a number"),
    ("cab:decode_sparsity=0.98", "needs decode_rule='tokens'"),
])
def test_variant_errors(spec, msg):
    with pytest.raises(ValueError, match=msg):
        Variant.parse(spec)


def test_cells_run_dense_once():
    vs = [Variant.parse(s) for s in ("dense", "cab", "h2o")]
    got = [(v.spec, s) for v, s in cells(vs, [0.0, 0.9, 0.95])]
    assert got == [("dense", 0.0), ("cab", 0.9), ("cab", 0.95), ("h2o", 0.9), ("h2o", 0.95)]


def test_jsonl_resume(tmp_path):
    p = tmp_path / "r.jsonl"
    j = Jsonl(p, ("a", "b"))
    j.write({"a": 1, "b": 0.5, "x": "first"})
    assert j.has(a=1, b=0.5) and not j.has(a=1, b=0.9)
    j2 = Jsonl(p, ("a", "b"))
    assert j2.has(a=1, b=0.5) and len(j2.rows) == 1
    p.write_text(p.read_text() + "{broken\n")
    with pytest.raises(ValueError, match="not JSON"):
        Jsonl(p, ("a",))


def test_window_offsets():
    assert window_offsets(1000, 100, 3) == [0, 450, 900]
    assert window_offsets(1000, 100, 1) == [0]
    with pytest.raises(ValueError, match="exceeds the corpus"):
        window_offsets(50, 100, 2)


def test_yarn_rope_config():
    from transformers import Qwen2Config

    c = Qwen2Config(max_position_embeddings=32768)
    yarn_rope(c, 4)
    assert c.max_position_embeddings == 131072
    assert c.rope_parameters["rope_type"] == "yarn" and c.rope_parameters["factor"] == 4.0
    assert c.rope_parameters["original_max_position_embeddings"] == 32768
    with pytest.raises(ValueError, match="already uses"):
        yarn_rope(c, 2)
    with pytest.raises(ValueError, match="> 1"):
        yarn_rope(Qwen2Config(), 1.0)


# ------------------------------------------------------------------------------------------------ bridge
def test_seed_graph_rows_match_the_bridge_check():
    rows = {(r["variant"], r["sparsity"]): r for r in seed_graph_rows((0.9,))}
    assert rows[("dense", 0.9)]["keeps_needle"]
    for v in ("cab", "curvature", "magnitude", "h2o", "streaming", "cab:curvature_share=1.0"):
        assert not rows[(v, 0.9)]["keeps_needle"], v
    assert rows[("cab", 0.9)]["needle_rank"]["curvature"] > 8  # outside the last row's 8 free slots


def test_planted_needle_is_low_norm_and_retrieved_by_dense():
    q, k, v, pos, vals = planted_needle(1024, seed=3)
    norms = k[0].norm(dim=-1)
    for h in range(k.shape[1]):
        assert norms[h, pos[h]] < norms[h].median()  # the needle key is below the typical key norm
    rows = synthetic_retrieval([4096], [Variant.parse("dense"), Variant.parse("cab"),
                                        Variant.parse("curvature:estimator=max_l2")], [0.9], seeds=1, impl="torch")
    by = {r["variant"]: r for r in rows}
    assert by["dense"]["needle_cosine"] > 0.95 and by["dense"]["rel_err_last_block"] == 0
    # cab scores the last rows exactly: it keeps the needle and matches dense; max-L2 pooling cannot see it
    assert by["cab"]["needle_kept"] == 1.0 and by["cab"]["rel_err_last_block"] < 1e-3
    assert by["curvature:estimator=max_l2"]["needle_kept"] == 0.0
    assert by["curvature:estimator=max_l2"]["needle_cosine"] < 0.5


# ------------------------------------------------------------------------------------------------ real model
@pytest.fixture(scope="module")
def smol():
    from cab_experiments.common import load_model

    model, tok, _ = load_model("smollm2-135m-instruct", "cpu", torch.float32)
    return model, tok


def test_token_nll_matches_transformers_loss(smol):
    from cab_experiments.ppl import token_nll

    model, tok = smol
    ids = torch.tensor(tok("It is a truth universally acknowledged, that a single man in possession of a good "
                           "fortune, must be in want of a wife. " * 8)["input_ids"])
    nll = token_nll(model, ids, chunk=37)  # chunks that do not divide the length
    with torch.no_grad():
        ref = model(input_ids=ids[None], labels=ids[None]).loss
    assert nll.shape == (ids.numel() - 1,)
    assert torch.allclose(nll.mean(), ref, rtol=1e-4)


def test_niah_runner_writes_and_resumes(smol, tmp_path):
    from cab_experiments.niah import KEY, run_niah

    model, tok = smol
    out = Jsonl(tmp_path / "niah.jsonl", KEY)
    vs = [Variant.parse("dense"), Variant.parse("streaming")]
    n = run_niah(model, tok, "smol", out, [768], [0.0, 1.0], 1, vs, [0.75], haystack="filler", max_new_tokens=10,
                 impl="torch", progress=False)
    assert n == 4
    rows = out.rows
    assert {(r["variant"], r["depth"]) for r in rows} == {("dense", 0.0), ("dense", 1.0), ("streaming", 0.0),
                                                         ("streaming", 1.0)}
    for r in rows:
        assert r["n_tokens"] == 768 and len(r["passkey"]) in (5, 6)
        assert r["correct"] == (r["passkey"] in r["answer"])
    dense = [r for r in rows if r["variant"] == "dense"]
    stream = [r for r in rows if r["variant"] == "streaming"]
    assert all(r["density"] == 1.0 for r in dense)
    assert all(0 < r["density"] < 0.6 for r in stream)  # 75% of the causal blocks dropped, sink/local forced
    again = run_niah(model, tok, "smol", Jsonl(tmp_path / "niah.jsonl", KEY), [768], [0.0, 1.0], 1, vs, [0.75],
                     haystack="filler", max_new_tokens=10, impl="torch", progress=False)
    assert again == 0  # every cell already there


def test_niah_rejects_lengths_past_the_context(smol, tmp_path):
    from cab_experiments.niah import KEY, run_niah

    model, tok = smol
    with pytest.raises(ValueError, match="exceed the model's context"):
        run_niah(model, tok, "smol", Jsonl(tmp_path / "x.jsonl", KEY), [9000], [0.5], 1, [Variant.parse("dense")],
                 [0.9], progress=False)


def test_ppl_runner_dense_vs_sparse(smol, tmp_path):
    from cab_experiments.ppl import KEY, run_ppl, summary

    model, tok = smol
    corpus = torch.tensor(tok("The grass is green. " * 300 + "Emma Woodhouse, handsome, clever, and rich. " * 60,
                              add_special_tokens=False)["input_ids"])
    out = Jsonl(tmp_path / "ppl.jsonl", KEY)
    n = run_ppl(model, tok, "smol", out, [1024], 2, [Variant.parse("dense"), Variant.parse("random")], [0.9],
                latency=True, latency_reps=1, impl="torch", progress=False, corpus=corpus)
    assert n == 2 * 2 + 2  # two windows per cell + a latency row per cell
    s = summary(out.rows)
    dense, rand = s[("smol", None, 1024, "dense", 0.0)], s[("smol", None, 1024, "random", 0.9)]
    assert math.isfinite(dense["ppl"]) and dense["attention_s"] > 0 and rand["attention_s"] > 0
    assert rand["ppl"] > dense["ppl"]  # dropping 90% of the blocks at random costs perplexity
    ppl_rows = [r for r in out.rows if r["kind"] == "ppl"]
    assert {r["offset"] for r in ppl_rows} == {0, corpus.numel() - 1024}


def test_yarn_model_loads(smol):
    from cab_experiments.common import load_model

    model, _, _ = load_model("smollm2-135m-instruct", "cpu", torch.float32, yarn=2.0)
    assert model.config.max_position_embeddings == 16384
    assert model.model.rotary_emb.rope_type == "yarn"
    base = smol[0].model.rotary_emb.inv_freq
    assert not torch.allclose(model.model.rotary_emb.inv_freq, base)  # YaRN rescales the frequencies


# ------------------------------------------------------------------------------------------------ CLI + plots
@pytest.mark.parametrize("argv, msg", [
    (["niah", "--sparsities", "1.0"], "argument --sparsities: expected a number in [0, 1), got '1.0'"),
    (["niah", "--depths", "1.5"], "argument --depths: expected a number in [0, 1], got '1.5'"),
    (["niah", "--trials", "0"], "expected an integer >= 1, got '0'"),
    (["niah", "--policies", "cab:oops=1"], "not a CABConfig field"),
    (["ppl", "--windows", "x"], "expected an integer >= 1, got 'x'"),
])
def test_cli_rejects_bad_input(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


def test_cli_config_file_defaults(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"lengths": [2048, 4096], "windows": 2, "latency": False}))
    argv = cli._config_defaults(["ppl", "--config", str(cfg), "--windows", "3"])
    a = cli.build_parser().parse_args(argv)
    assert a.lengths == [2048, 4096] and a.windows == 3 and a.latency is False  # the command line wins
    with pytest.raises(SystemExit):  # a key the subcommand does not have is an error, not ignored
        cli.build_parser().parse_args(cli._config_defaults(["niah", "--config", str(cfg)]))
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(SystemExit, match="JSON object"):
        cli._config_defaults(["niah", "--config", str(bad)])


def test_cli_plot(tmp_path, capsys):
    rows = []
    for v, s in [("dense", 0.0), ("cab", 0.95)]:
        for n in (4096, 8192):
            for d in (0.0, 0.5):
                rows.append({"model": "m", "yarn": None, "haystack": "austen", "length": n, "depth": d, "trial": 0,
                             "variant": v, "sparsity": s, "passkey": "12345", "correct": v == "dense" or d == 0.0,
                             "density": 1.0 if v == "dense" else (0.05 if n == 4096 else 0.07)})
            rows.append({"kind": "ppl", "model": "m", "yarn": None, "length": n, "window": 0, "variant": v,
                         "sparsity": s, "nll": 3.0 + s, "nll_last_quarter": 3.1 + s})
            rows.append({"kind": "latency", "model": "m", "yarn": None, "length": n, "window": 0, "variant": v,
                         "sparsity": s, "attention_s": 0.1 if v == "dense" else 0.02})
    f = tmp_path / "rows.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert cli.main(["plot", str(f), "--outdir", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert "| m | cab | 0.95 | 0.50 | 0.50 | 0.50 |" in out
    assert "5.0x" in out  # dense 100 ms / cab 20 ms
    assert (tmp_path / "plots" / "niah_m.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "pareto_m_4096.png").exists()
    # accuracy beside the achieved density (mean over the cell's prompts), table and plot
    assert "| m | cab | 0.95 | 0.060 | 0.50 | 4 |" in out and "| m | dense | 0 | 1.000 | 1.00 | 4 |" in out
    assert (tmp_path / "plots" / "density_niah_m.png").stat().st_size > 1000
    with pytest.raises(SystemExit, match="no such file"):
        cli.main(["plot", str(tmp_path / "missing.jsonl")])


def test_phases_sparsify_one_phase_only(smol):
    from cab_vllm import hf

    model, tok = smol
    ids = torch.tensor([tok("The grass is green. " * 120)["input_ids"][:600]])
    cfg = CABConfig(policy="cab", sparsity=0.8, decode_rule="bounds")  # decode-only needs a per-step rule
    kept = {}
    for phases in hf.PHASES:
        with torch.no_grad(), hf.using(cfg, impl="torch", phases=phases) as st:
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                           pad_token_id=tok.eos_token_id)
        kept[phases] = (st["kept"], st["causal"])
    layers = model.config.num_hidden_layers
    m = math.ceil(600 / 64)
    prefill_causal = layers * model.config.num_key_value_heads * m * (m + 1) // 2
    assert kept["prefill"][1] == prefill_causal  # only the prefill was sparse (and counted)
    assert kept["both"][1] > prefill_causal and kept["decode"][1] == kept["both"][1] - prefill_causal
    assert kept["both"][0] == kept["prefill"][0] + kept["decode"][0]
    with pytest.raises(ValueError, match="cannot run decode-only"):
        with hf.using(CABConfig(policy="h2o"), phases="decode"):  # auto: h2o decodes from its prompt selection
            pass
    with pytest.raises(ValueError, match="phases="):
        with hf.using(cfg, phases="sometimes"):
            pass
    assert Variant.parse("cab:phases=prefill").phases == "prefill"
    with pytest.raises(ValueError, match="phases="):
        Variant.parse("cab:phases=never")


def test_layers_sparsify_a_layer_range_only(smol):
    """layers=(lo, hi): layers outside the range attend densely and count every causal block as kept, those inside
    keep the sparsity rule's count; a range covering every layer is the plain run. CABConfig.dense_layers=N is
    the range (N, layers); N = every layer is dense attention. early=(n, s) moves the budget between layers."""
    from cab_vllm import hf

    model, tok = smol
    ids = torch.tensor([tok("The grass is green. " * 120)["input_ids"][:600]])
    cfg = CABConfig(policy="cab", sparsity=0.8)
    layers, hkv = model.config.num_hidden_layers, model.config.num_key_value_heads
    m = math.ceil(600 / 64)
    causal, sparse = hkv * m * (m + 1) // 2, hkv * int(cfg.keep_counts(m).sum())
    assert sparse < causal
    logits = {}
    for rng in (None, (0, layers), (2, layers), (0, 1)):
        with torch.no_grad(), hf.using(cfg, impl="torch", layers=rng) as st:
            logits[rng] = model(ids).logits[0, -1]
        n_sparse = layers if rng is None else rng[1] - rng[0]
        assert st["causal"] == layers * causal
        assert st["kept"] == n_sparse * sparse + (layers - n_sparse) * causal
    assert torch.equal(logits[None], logits[(0, layers)])
    with torch.no_grad():
        dense = model(ids).logits[0, -1]
    assert not torch.allclose(logits[(0, 1)], dense, atol=1e-4)  # one sparse layer still changes the output
    # CABConfig.dense_layers: the leading layers dense, counted as the range ablation counts them
    for n_dense, rng in ((2, (2, layers)), (layers, None)):
        with torch.no_grad(), hf.using(cfg.replace(dense_layers=n_dense), impl="torch") as st:
            got = model(ids).logits[0, -1]
        assert st["kept"] == (layers - n_dense) * sparse + n_dense * causal and st["causal"] == layers * causal
        assert torch.equal(got, logits[rng]) if rng else torch.allclose(got, dense, atol=1e-5)
    assert Variant.parse("cab:dense_layers=2").config(0.9).dense_layers == 2
    # early=(n, s): layers below n at sparsity s, counted as they kept
    with torch.no_grad(), hf.using(cfg, impl="torch", early=(2, 0.5)) as st:
        model(ids)
    assert st["kept"] == 2 * hkv * int(cfg.replace(sparsity=0.5).keep_counts(m).sum()) + (layers - 2) * sparse
    assert Variant.parse("cab:compensate=mass").compensate == "mass"
    assert Variant.parse("cab:compensate=mean").config(0.9) == CABConfig(policy="cab", sparsity=0.9)
    with pytest.raises(ValueError, match="compensate="):
        Variant.parse("cab:compensate=median")
    assert Variant.parse("cab:oracle=token").oracle == "token" and Variant.parse("cab").oracle is None
    assert Variant.parse("cab:prefill=vertical").prefill == "vertical" and Variant.parse("cab").prefill is None
    assert Variant.parse("cab:prefill=vertical").config(0.9) == CABConfig(policy="cab", sparsity=0.9)
    with pytest.raises(ValueError, match="prefill="):
        Variant.parse("cab:prefill=slash")
    assert Variant.parse("cab:prefill=vslash,prefill_chunk=1024").prefill_chunk == 1024
    assert Variant.parse("cab:prefill=vslash,prefill_chunk=1024").config(0.9) == CABConfig(policy="cab", sparsity=0.9)
    for bad in ("0", "-3", "1k"):
        with pytest.raises(ValueError, match="prefill_chunk="):
            Variant.parse(f"cab:prefill=vertical,prefill_chunk={bad}")
        with pytest.raises(ValueError, match="prefill_rows="):
            Variant.parse(f"cab:prefill=vertical,prefill_rows={bad}")
    v = Variant.parse("cab:prefill=vertical,prefill_chunk=64,prefill_rows=16")
    assert (v.prefill_chunk, v.prefill_rows) == (64, 16) and Variant.parse("cab").prefill_rows is None
    assert v.config(0.9) == CABConfig(policy="cab", sparsity=0.9)
    assert Variant.parse("cab:prefill=vertical,prefill_pooled=1").prefill_pooled is True
    assert Variant.parse("cab:prefill=vertical").prefill_pooled is False
    with pytest.raises(ValueError, match="prefill_pooled="):
        Variant.parse("cab:prefill=vertical,prefill_pooled=yes")
    v = Variant.parse("cab:prefill=vertical,prefill_chunk=64,prefill_est=sparqb16")
    assert v.prefill_est == "sparqb16" and Variant.parse("cab").prefill_est is None
    assert v.config(0.9) == CABConfig(policy="cab", sparsity=0.9)
    for bad in ("exact", "sparqb", "int4kv"):
        with pytest.raises(ValueError, match="prefill_est="):
            Variant.parse(f"cab:prefill=vertical,prefill_est={bad}")
    v = Variant.parse("cab:prefill=vertical,prefill_chunk=64,prefill_within=3")
    assert v.prefill_within == 3.0 and Variant.parse("cab").prefill_within is None
    assert v.config(0.9) == CABConfig(policy="cab", sparsity=0.9)
    for bad in ("0.5", "x", "nan"):
        with pytest.raises(ValueError, match="prefill_within="):
            Variant.parse(f"cab:prefill=vertical,prefill_chunk=64,prefill_within={bad}")
    v = Variant.parse("cab:prefill=vertical,prefill_chunk=64,prefill_within=3,prefill_cand=rowbounds")
    assert v.prefill_cand == "rowbounds" and Variant.parse("cab").prefill_cand == "cab"
    assert v.config(0.9) == CABConfig(policy="cab", sparsity=0.9)
    with pytest.raises(ValueError, match="prefill_cand="):
        Variant.parse("cab:prefill=vertical,prefill_chunk=64,prefill_within=3,prefill_cand=bounds")
    with pytest.raises(ValueError, match="sparqbR shares dimensions"):  # refused when parsed, not mid-sweep
        Variant.parse("cab:tokens=sparqb16")
    assert Variant.parse("cab:oracle=token").config(0.9) == CABConfig(policy="cab", sparsity=0.9)
    with pytest.raises(ValueError, match="oracle="):
        Variant.parse("cab:oracle=block")
    assert Variant.parse("cab:tokens=pca32").tokens == "pca32" and Variant.parse("cab").tokens is None
    assert Variant.parse("cab:tokens=dims16").tokens == "dims16"
    assert Variant.parse("cab:tokens=int4").config(0.9) == CABConfig(policy="cab", sparsity=0.9)
    with pytest.raises(ValueError, match="tokens="):
        Variant.parse("cab:tokens=pca")
    assert Variant.parse("cab:early=12@0.8").early == (12, 0.8)
    assert Variant.parse("cab:early=12@0.8").config(0.98) == CABConfig(policy="cab", sparsity=0.98)
    for bad in ("cab:early=12", "cab:early=0@0.5", "cab:early=3@1.0", "cab:early=x@y"):
        with pytest.raises(ValueError, match="early="):
            Variant.parse(bad)
    with pytest.raises(ValueError, match="sparsity"):
        with hf.using(cfg, early=(2, 1.5)):
            pass
    with pytest.raises(ValueError, match="layers="):
        with hf.using(cfg, layers=(3, 3)):
            pass
    assert Variant.parse("cab:layers=2-24").layers == (2, 24)
    assert Variant.parse("cab:layers=2-24").config(0.9) == CABConfig(policy="cab", sparsity=0.9)
    for bad in ("cab:layers=5", "cab:layers=4-2", "cab:layers=a-b"):
        with pytest.raises(ValueError, match="layers="):
            Variant.parse(bad)


def test_adaptive_budget_through_the_adapter_keeps_the_fixed_total(smol):
    """budget="adaptive" in the transformers adapter: each prefill layer keeps the fixed rule's total (split over KV
    heads and query blocks by estimated mass), decode steps reuse the prompt's adaptive last row, and the model
    still generates."""
    from cab_vllm import hf

    model, tok = smol
    ids = torch.tensor([tok("The grass is green. The sky is blue. " * 60)["input_ids"][:600]])
    layers, hkv = model.config.num_hidden_layers, model.config.num_key_value_heads
    m = math.ceil(600 / 64)
    kept = {}
    for budget in ("fixed", "adaptive"):
        cfg = CABConfig(policy="cab", sparsity=0.8, budget=budget)
        with torch.no_grad(), hf.using(cfg, impl="torch", phases="prefill") as st:
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                                 pad_token_id=tok.eos_token_id)
        kept[budget] = st["kept"]
        assert gen.shape == (1, 602)
    assert kept["adaptive"] == kept["fixed"] == layers * hkv * int(CABConfig(sparsity=0.8).keep_counts(m).sum())
    with torch.no_grad(), hf.using(CABConfig(policy="cab", sparsity=0.8, budget="adaptive"), impl="torch") as st:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                       pad_token_id=tok.eos_token_id)
    assert st["decode_calls"] == layers and st["kept"] > kept["adaptive"]


def test_prompt_decode_rule_keeps_the_prompt_selection(smol):
    from cab_vllm import hf

    model, tok = smol
    ids = torch.tensor([tok("The grass is green. " * 120)["input_ids"][:600]])  # 10 blocks; 3 new tokens stay in block 9
    cfg = CABConfig(policy="cab", sparsity=0.8, decode_rule="prompt")
    out = {}
    for phases in ("both", "prefill"):
        with torch.no_grad(), hf.using(cfg, impl="torch", phases=phases) as st:
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                                 pad_token_id=tok.eos_token_id)
        out[phases] = (st["kept"], gen)
    layers, hkv = model.config.num_hidden_layers, model.config.num_key_value_heads
    last_row = int(cfg.keep_counts(10)[-1])
    # two decode steps per layer and KV head, each keeping exactly the prompt's last-row blocks (no new block)
    assert out["both"][0] - out["prefill"][0] == 2 * layers * hkv * last_row
    with pytest.raises(ValueError, match="cannot run decode-only"):
        with hf.using(cfg, phases="decode"):
            pass
