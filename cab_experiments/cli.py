"""python -m cab_experiments: the experiments (needle grid, task suite, perplexity vs latency, ablation, bridge check)
from one command line.

    python -m cab_experiments niah     --model qwen2.5-coder-0.5b-instruct --lengths 4096 8192 --trials 5   (A: needle grid)
    python -m cab_experiments ppl      --model qwen2.5-coder-0.5b-instruct --lengths 4096 8192 --windows 4  (B: ppl vs latency)
    python -m cab_experiments ablation --model qwen2.5-coder-0.5b-instruct                                   (D: equal-budget ablation)
    python -m cab_experiments tasks    --model qwen2.5-coder-0.5b-instruct --tasks single vartrack           (E: RULER-style tasks)
    python -m cab_experiments bridge   --lengths 16384 65536 131072                                          (seed graph + planted needles)
    python -m cab_experiments granularity --lengths 4096 --sparsities 0.9 0.98                           (oracle's tiles)
    python -m cab_experiments granularity --bounds --lengths 4096 8192 --sparsities 0.98        (blocks bounds rule out)
    python -m cab_experiments granularity --rerank-bits 4 --lengths 4096 --sparsities 0.98      (int4 candidates' recall)
    python -m cab_experiments granularity --reuse-lags 1 2 4 8 --lengths 4096 --sparsities 0.98 (a step's keys reused)
    python -m cab_experiments granularity --rule-passes --lengths 4096 8192 (the token decode's one-pass rule)
    python -m cab_experiments granularity --prefill-mass 0 1024 4096 --lengths 8192 (prompt rows' mass kept)
    python -m cab_experiments plot     experiments/results/*.jsonl --outdir experiments/plots               (heatmaps, Pareto, tables)

Every run appends one JSONL row per setting to --out and skips settings already there (resume after a stop).
``--config FILE`` reads defaults for any flag from a JSON file (experiments/configs/); flags given win.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cab_vllm import argtypes

TASKS = ("single", "multikey", "multivalue", "multiquery", "vartrack", "freqwords")  # cab_experiments.tasks.TASKS

POLICY_GRID = ["dense", "cab", "h2o", "streaming", "magnitude", "random"]
SEED = "curvature:estimator=max_l2"  # the seed pipeline
ABLATION = ["cab", "curvature", "magnitude", "random", "cab:curvature_share=0.25", "cab:curvature_share=0.5",
            "cab:curvature_share=1.0", "cab:estimator=max_l2", "cab:estimator=mean", "cab:estimator=topr",
            "cab:estimator=sampled", "cab:exact_rows=0", SEED]


_unit = argtypes.sparsity
_depth = argtypes.fraction
_positive_int = argtypes.positive_int


def _variant(s: str):
    from cab_experiments.common import Variant

    try:
        return Variant.parse(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _model_args(p: argparse.ArgumentParser, lengths: list[int]) -> None:
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct",
                   help="a prepared model name (cab_models.models) or a Hugging Face model folder")
    p.add_argument("--lengths", type=_positive_int, nargs="+", default=lengths, help="prompt/window tokens")
    p.add_argument("--sparsities", type=_unit, nargs="+", default=[0.9, 0.95, 0.98, 0.99])
    p.add_argument("--yarn", type=float, default=None, help="YaRN rope-scaling factor (e.g. 2 for 64k, 4 for 128k)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--impl", choices=["auto", "triton", "torch", "flex"], default="auto")
    p.add_argument("--time-budget", type=float, default=None, help="stop cleanly after this many seconds")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                   help="hf: the transformers adapter (every CABConfig field per cell); vllm: the serving path, a "
                        "vLLM engine with the CAB backend (policy, sparsity and budget per request; results go to "
                        "--out with _vllm before .jsonl unless --out is given)")
    p.add_argument("--gpu-memory-utilization", type=_unit, default=None, help="vllm: the engine's memory share")
    p.add_argument("--max-num-batched-tokens", type=_positive_int, default=None,
                   help="vllm: tokens per engine step (chunked prefill below the prompt length)")
    p.add_argument("--dense-threshold", type=argtypes.nonneg_int, default=None,
                   help="vllm: contexts of fewer tokens run dense (CAB_DENSE_THRESHOLD; default the backend's: "
                        "16384 on CUDA, where vLLM's FlashAttention takes them, so every policy is dense below "
                        "it); each row records it")


def _niah_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--depths", type=_depth, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--trials", type=_positive_int, default=5)
    p.add_argument("--haystack", choices=["austen", "filler"], default="austen")
    p.add_argument("--max-new-tokens", type=_positive_int, default=16)
    p.add_argument("--batch-tokens", type=_positive_int, default=131072, help="prompt tokens per generate() batch")
    p.add_argument("--seed", type=int, default=0)


def _ppl_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--windows", type=_positive_int, default=4)
    p.add_argument("--latency", action=argparse.BooleanOptionalAction, default=None,
                   help="time attention per cell (default: on CUDA only)")
    p.add_argument("--latency-reps", type=_positive_int, default=5)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m cab_experiments", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("niah", help="A: passkey grid (lengths x depths x trials x policies x sparsities)")
    _model_args(p, [4096, 8192, 16384, 32768])
    _niah_args(p)
    p.add_argument("--policies", type=_variant, nargs="+", default=POLICY_GRID,
                   help="variants: policy[:field=value,...], e.g. cab:curvature_share=0.5")
    p.add_argument("--out", default=None, help="default experiments/results/niah.jsonl (_vllm: the engine)")
    _engine_args(p)

    p = sub.add_parser("ppl", help="B: perplexity vs attention latency on Austen windows")
    _model_args(p, [4096, 8192, 16384, 32768])
    _ppl_args(p)
    p.add_argument("--policies", type=_variant, nargs="+", default=POLICY_GRID)
    p.add_argument("--out", default="experiments/results/ppl.jsonl")

    p = sub.add_parser("ablation", help="D: equal-budget ablation (policies, curvature share, estimators)")
    _model_args(p, [8192])
    _niah_args(p)
    _ppl_args(p)
    p.add_argument("--policies", type=_variant, nargs="+", default=ABLATION)
    p.add_argument("--skip", choices=["niah", "ppl"], default=None, help="run only one of the two measurements")
    p.add_argument("--out", default="experiments/results/ablation", help="prefix: PREFIX_niah.jsonl, PREFIX_ppl.jsonl")

    p = sub.add_parser("tasks", help="E: RULER-style tasks on Austen (tasks x lengths x depths x policies x "
                                     "sparsities)")
    _model_args(p, [4096, 8192, 16384, 32768])
    p.add_argument("--tasks", choices=TASKS, nargs="+", default=list(TASKS))
    p.add_argument("--depths", type=_depth, nargs="+", default=[0.1, 0.5, 0.9],
                   help="relative depth of the asked needle (freqwords has none)")
    p.add_argument("--trials", type=_positive_int, default=2)
    p.add_argument("--max-new-tokens", type=_positive_int, default=None,
                   help="default: per task (tasks.MAX_NEW_TOKENS)")
    p.add_argument("--batch-tokens", type=_positive_int, default=131072, help="prompt tokens per generate() batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policies", type=_variant, nargs="+", default=POLICY_GRID + [SEED],
                   help="variants: policy[:field=value,...]; the seed pipeline is " + SEED)
    p.add_argument("--out", default=None, help="default experiments/results/tasks.jsonl (_vllm: the engine)")
    _engine_args(p)

    p = sub.add_parser("bridge", help="the seed's bridge graph + planted low-norm needles at long lengths")
    p.add_argument("--lengths", type=_positive_int, nargs="+", default=[16384, 32768, 65536, 131072])
    p.add_argument("--sparsities", type=_unit, nargs="+", default=[0.9, 0.95, 0.98, 0.99])
    p.add_argument("--policies", type=_variant, nargs="+",
                   default=POLICY_GRID + ["curvature", "curvature:estimator=max_l2", "cab:curvature_share=0.5"])
    p.add_argument("--seeds", type=_positive_int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto")
    p.add_argument("--impl", choices=["auto", "triton", "torch", "flex"], default="auto")
    p.add_argument("--out", default="experiments/results/bridge.jsonl")

    p = sub.add_parser("granularity", help="the (query tile x key block) tiles a token-level oracle's choices touch, "
                                           "per layer of one real prompt")
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--lengths", type=_positive_int, nargs="+", default=[4096])
    p.add_argument("--sparsities", type=_unit, nargs="+", default=[0.9, 0.98])
    p.add_argument("--tiles", type=_positive_int, nargs="+", default=[64, 16], help="query rows per tile")
    p.add_argument("--task", choices=TASKS, default="multikey")
    p.add_argument("--depth", type=_depth, default=0.5)
    p.add_argument("--per-head", action="store_true",
                   help="tiles per query head (default: per KV head, the group's heads together)")
    p.add_argument("--bounds", action="store_true",
                   help="instead: how many key blocks an exact token decode (the prompt's last query token, "
                        "CABConfig.decode_tokens keys per head) could skip by their box bounds")
    p.add_argument("--rerank-bits", type=int, choices=range(2, 9), nargs="+", default=None, metavar="{2..8}",
                   help="instead: how many of an exact token decode's keys (the prompt's last query token, "
                        "CABConfig.decode_tokens per head) a selector keeps that scores keys rounded to these many bits "
                        "and reranks its F x budget best by exact score (--rerank-factors F)")
    p.add_argument("--rerank-factors", type=_positive_int, nargs="+", default=[1, 2, 4, 8],
                   help="candidates per kept key (--rerank-bits, --reuse-lags)")
    p.add_argument("--reuse-lags", type=_positive_int, nargs="+", default=None, metavar="R",
                   help="instead: how many of a decode step's exact best keys (CABConfig.decode_tokens per head) are "
                        "among the F x budget best of the step R steps before, plus the keys written since (the dense "
                        "model's own answer, up to max(R) tokens; --rerank-factors F)")
    p.add_argument("--rule-passes", action="store_true",
                   help="instead: the attention mass the token decode's one-pass rule (CAB_TOKEN_PASSES=1) loses "
                        "against the two-pass rule, and how often the tie cap cuts (the prompt's last query token, "
                        "CABConfig.decode_tokens keys per head)")
    p.add_argument("--prefill-mass", type=int, nargs="+", default=None, metavar="C",
                   help="instead: the share of prompt rows' exact attention mass cab's blocks, vertical lines ranked "
                        "by the last rows of each chunk of C rows (0: the whole prompt) and each row's own best keys "
                        "keep at the same count per row")
    p.add_argument("--rank-rows", type=_positive_int, nargs="+", default=None, metavar="R",
                   help="with --prefill-mass: rank each chunk's vertical lines by its last R rows (each value one "
                        "column, vertical@C/R; default 64, vertical@C)")
    p.add_argument("--within", type=float, nargs="+", default=(), metavar="F",
                   help="with --prefill-mass: also rank each chunk's vertical lines among the tokens of cab's blocks "
                        "at F times the budget first (withinF@C/R: the keys a kernel would score)")
    p.add_argument("--within-rowbounds", action="store_true",
                   help="with --within: also among as many blocks per query block ranked by every row's box bounds "
                        "(withinrbF@C/R)")
    p.add_argument("--pooled-rows", type=_positive_int, nargs="+", default=(), metavar="R",
                   help="with --prefill-mass: also rank each chunk's vertical lines by the mean query of its last R "
                        "rows (pooled@C/R: one row per head)")
    p.add_argument("--no-block-oracle", action="store_true",
                   help="with --prefill-mass: leave out the block oracle (every query block's rows scored against "
                        "every key: the slow part at 16k and longer)")
    p.add_argument("--rerank-quant", choices=["channel", "token", "fp8", "fp8qk", "fp8c"], nargs="+",
                   default=["channel"],
                   help="the key copy's quantizer: each channel's range per 16-token page, a scale per token and 32 "
                        "dimensions, or float8 e4m3 with a scale per token (fp8qk: the queries in float8 too; fp8c: "
                        "each channel centered per group of --center-groups tokens first; --rerank-bits unused)")
    p.add_argument("--center-groups", type=_positive_int, nargs="+", default=[16], metavar="N",
                   help="tokens per centering group of the fp8c copy (each value one row; 16: a cache page)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto")
    p.add_argument("--out", default=None, help="default experiments/results/granularity.jsonl (with --bounds: "
                                              "experiments/results/bounds.jsonl, with --rerank-bits: "
                                              "experiments/results/rerank.jsonl, with --reuse-lags: "
                                              "experiments/results/reuse.jsonl, with --rule-passes: "
                                              "experiments/results/passes.jsonl, with --prefill-mass: "
                                              "experiments/results/prefill_mass.jsonl)")

    p = sub.add_parser("plot", help="heatmaps, Pareto plots and markdown tables from JSONL files")
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--outdir", type=Path, default=Path("experiments/plots"))
    return ap


def _engine_model(a, dtype):
    """(EngineModel, tokenizer): a vLLM engine with the CAB backend long enough for every prompt and answer."""
    from transformers import AutoTokenizer

    from cab_experiments.common import EngineModel
    from cab_models.models import prepare_model

    for v in a.policies:  # refuse what the engine cannot take per request before it starts
        try:
            EngineModel.request_args(v, 0.9)
        except ValueError as e:
            raise SystemExit(f"python -m cab_experiments {a.cmd}: {e}") from None
    path = prepare_model(a.model)
    room = (a.max_new_tokens or 64) + 64
    positions = engine_positions(path, a.yarn)
    if max(a.lengths) + room > positions:
        raise SystemExit(f"python -m cab_experiments {a.cmd} --engine vllm: a prompt of {max(a.lengths)} tokens and "
                         f"its answer ({room} tokens of room) need {max(a.lengths) + room} positions; the engine's "
                         f"rotary table holds {positions} (the model's context"
                         f"{f' with YaRN x{a.yarn:g}' if a.yarn else ''}): use --lengths up to {positions - room}")
    model = EngineModel(path, max(a.lengths) + room, a.yarn, a.gpu_memory_utilization,
                        str(dtype).replace("torch.", ""), a.max_num_batched_tokens, dense_threshold=a.dense_threshold)
    return model, AutoTokenizer.from_pretrained(path)


def engine_positions(path, yarn: float | None = None) -> int:
    """Positions a vLLM engine can hold for this model (prompt and answer together): its config's
    max_position_embeddings, times the YaRN factor when one is asked for (vLLM sizes its rotary table by it;
    past it a position indexes out of the table)."""
    from transformers import AutoConfig

    from cab_experiments.common import yarn_overrides

    if yarn:
        return int(yarn_overrides(path, yarn)["max_position_embeddings"])
    return int(AutoConfig.from_pretrained(path).max_position_embeddings)


def _resolve(device: str, dtype: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"python -m cab_experiments: --device {device} but CUDA is not available here")
    if dtype == "auto":
        dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    return device, getattr(torch, dtype)


def _config_defaults(argv: list[str]) -> list[str]:
    """Expand ``--config FILE`` into flags placed before the command line's own (which then win)."""
    if "--config" not in argv:
        return argv
    i = argv.index("--config")
    if i + 1 >= len(argv):
        raise SystemExit("python -m cab_experiments: --config needs a file")
    path = Path(argv[i + 1])
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"python -m cab_experiments: cannot read config {path}: {e}") from None
    if not isinstance(cfg, dict):
        raise SystemExit(f"python -m cab_experiments: {path} must hold a JSON object of flag: value")
    rest = argv[:i] + argv[i + 2:]
    cmd, tail = rest[:1], rest[1:]
    flags = []
    for k, v in cfg.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            flags.append(flag if v else "--no-" + k.replace("_", "-"))
        elif isinstance(v, list):
            flags += [flag, *map(str, v)]
        else:
            flags += [flag, str(v)]
    return cmd + flags + tail


def main(argv: list[str] | None = None) -> int:
    argv = _config_defaults(list(sys.argv[1:] if argv is None else argv))
    a = build_parser().parse_args(argv)
    if hasattr(a, "policies"):  # list defaults bypass argparse's type=
        a.policies = [_variant(p) if isinstance(p, str) else p for p in a.policies]
    if a.cmd == "plot":
        return _plot(a)
    if a.cmd == "bridge":
        return _bridge(a)
    if a.cmd == "granularity":
        return _granularity(a)

    from cab_experiments.common import Jsonl, load_model

    device, dtype = _resolve(a.device, a.dtype)
    engine = getattr(a, "engine", "hf")
    if getattr(a, "out", "") is None:
        a.out = f"experiments/results/{a.cmd}{'_vllm' if engine == 'vllm' else ''}.jsonl"
    if engine == "vllm":
        model, tok = _engine_model(a, dtype)
    else:
        model, tok, _ = load_model(a.model, device, dtype, yarn=a.yarn)
    name = Path(a.model).name if Path(a.model).is_dir() else a.model
    progress = not a.quiet
    if a.cmd in ("ppl", "ablation") and a.latency is None:
        a.latency = device.startswith("cuda")
    n = 0
    if a.cmd == "niah" or (a.cmd == "ablation" and a.skip != "niah"):
        from cab_experiments.niah import KEY, run_niah

        out = Jsonl(a.out if a.cmd == "niah" else f"{a.out}_niah.jsonl", KEY)
        n += run_niah(model, tok, name, out, a.lengths, a.depths, a.trials, a.policies, a.sparsities, a.haystack,
                      a.yarn, a.max_new_tokens, a.batch_tokens, a.impl, a.seed, a.time_budget, progress)
    if a.cmd == "ppl" or (a.cmd == "ablation" and a.skip != "ppl"):
        from cab_experiments.ppl import KEY, run_ppl

        out = Jsonl(a.out if a.cmd == "ppl" else f"{a.out}_ppl.jsonl", KEY)
        n += run_ppl(model, tok, name, out, a.lengths, a.windows, a.policies, a.sparsities, a.yarn, a.latency,
                     a.latency_reps, a.impl, a.time_budget, progress)
    if a.cmd == "tasks":
        from cab_experiments.plots import tasks_markdown
        from cab_experiments.tasks import KEY, run_tasks

        out = Jsonl(a.out, KEY)
        n += run_tasks(model, tok, name, out, a.tasks, a.lengths, a.depths, a.trials, a.policies, a.sparsities,
                       a.yarn, a.max_new_tokens, a.batch_tokens, a.impl, a.seed, a.time_budget, progress)
        print(tasks_markdown([r for r in out.rows if r["model"] == name]), end="\n\n")
    print(f"python -m cab_experiments {a.cmd}: {n} new rows")
    return 0


def _bridge(a) -> int:
    from cab_experiments.bridge import seed_graph_rows, synthetic_retrieval
    from cab_experiments.plots import bridge_markdown

    device, dtype = _resolve(a.device, a.dtype)
    rows = seed_graph_rows(a.sparsities) + synthetic_retrieval(a.lengths, a.policies, a.sparsities, a.seeds,
                                                                device, dtype, a.impl)
    _append_rows(a.out, rows, device)
    print(bridge_markdown(rows))
    return 0


def _append_rows(path, rows: list[dict], device: str) -> None:
    """Append rows (with the device they ran on) to the JSONL file at path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        for r in rows:
            f.write(json.dumps({**r, "device": device}) + "\n")


def _granularity(a) -> int:
    from cab_experiments.granularity import markdown, run

    device, dtype = _resolve(a.device, a.dtype)
    if any(256 % t for t in a.tiles):
        raise SystemExit(f"python -m cab_experiments granularity: --tiles {a.tiles}: each must divide 256")
    if sum(map(bool, (a.bounds, a.rerank_bits, a.reuse_lags, a.rule_passes, a.prefill_mass))) > 1:
        raise SystemExit("python -m cab_experiments granularity: --bounds, --rerank-bits, --reuse-lags, "
                         "--rule-passes and --prefill-mass are separate questions: ask one")
    if (a.rank_rows or a.no_block_oracle or a.within or a.pooled_rows) and not a.prefill_mass:
        raise SystemExit("python -m cab_experiments granularity: --rank-rows, --pooled-rows, --within and "
                         "--no-block-oracle go with --prefill-mass")
    if a.within_rowbounds and not a.within:
        raise SystemExit("python -m cab_experiments granularity: --within-rowbounds goes with --within")
    if any(f < 1 for f in a.within):
        raise SystemExit(f"python -m cab_experiments granularity: --within {a.within}: each must be >= 1 (times "
                         "the budget)")
    if a.prefill_mass:
        from cab_experiments.granularity import prefill_mass_markdown, run_prefill_mass

        if any(c < 0 for c in a.prefill_mass):
            raise SystemExit(f"python -m cab_experiments granularity: --prefill-mass {a.prefill_mass}: chunk sizes "
                             "must be >= 0 (0: the whole prompt)")
        rows = run_prefill_mass(a.model, a.lengths, a.sparsities, tuple(a.prefill_mass), a.task, a.depth, device,
                                dtype, rank_rows=a.rank_rows, block_oracle=not a.no_block_oracle, within=a.within,
                                pooled_rows=a.pooled_rows, within_rowbounds=a.within_rowbounds)
        _append_rows(a.out or "experiments/results/prefill_mass.jsonl", rows, device)
        print(prefill_mass_markdown(rows))
        return 0
    if a.rule_passes:
        from cab_experiments.granularity import passes_markdown, run_passes

        rows = run_passes(a.model, a.lengths, a.sparsities, a.task, a.depth, device, dtype)
        _append_rows(a.out or "experiments/results/passes.jsonl", rows, device)
        print(passes_markdown(rows))
        return 0
    if a.reuse_lags:
        from cab_experiments.granularity import reuse_markdown, run_reuse

        rows = run_reuse(a.model, a.lengths, a.sparsities, tuple(a.reuse_lags), tuple(a.rerank_factors), a.task,
                         a.depth, device, dtype, max(a.reuse_lags))
        _append_rows(a.out or "experiments/results/reuse.jsonl", rows, device)
        print(reuse_markdown(rows))
        return 0
    if a.rerank_bits:
        from cab_experiments.granularity import rerank_markdown, run_rerank

        rows = run_rerank(a.model, a.lengths, a.sparsities, tuple(a.rerank_bits), tuple(a.rerank_factors),
                          tuple(a.rerank_quant), a.task, a.depth, device, dtype, tuple(a.center_groups))
        _append_rows(a.out or "experiments/results/rerank.jsonl", rows, device)
        print(rerank_markdown(rows))
        return 0
    if a.bounds:
        from cab_experiments.granularity import bounds_markdown, run_bounds

        rows = run_bounds(a.model, a.lengths, a.sparsities, a.task, a.depth, device, dtype)
        _append_rows(a.out or "experiments/results/bounds.jsonl", rows, device)
        print(bounds_markdown(rows))
        return 0
    rows = run(a.model, a.lengths, a.sparsities, a.tiles, a.task, a.depth, device, dtype, per_head=a.per_head)
    _append_rows(a.out or "experiments/results/granularity.jsonl", rows, device)
    print(markdown(rows))
    return 0


def _plot(a) -> int:
    from cab_experiments.plots import (bridge_markdown, density_markdown, density_plot, niah_heatmaps, niah_markdown,
                                     pareto_plot, ppl_markdown, read_jsonl, tasks_heatmaps, tasks_markdown)

    missing = [str(f) for f in a.files if not f.exists()]
    if missing:
        raise SystemExit(f"python -m cab_experiments plot: no such file(s): {missing}")
    rows = read_jsonl(*a.files)
    niah = [r for r in rows if "passkey" in r]
    ppl = [r for r in rows if r.get("kind") in ("ppl", "latency")]
    bridge = [r for r in rows if "experiment" in r]
    tasks = [r for r in rows if "task" in r and "score" in r]
    if not (niah or ppl or bridge or tasks):
        raise SystemExit("python -m cab_experiments plot: the files hold no niah, ppl, bridge or tasks rows")
    a.outdir.mkdir(parents=True, exist_ok=True)
    made = []
    if niah:
        made += niah_heatmaps(niah, a.outdir)
        made += density_plot(niah, a.outdir, "density_niah")
        print(niah_markdown(niah), end="\n\n")
        print(density_markdown(niah), end="\n\n")
    if ppl:
        made += pareto_plot(ppl, a.outdir)
        print(ppl_markdown(ppl), end="\n\n")
    if bridge:
        print(bridge_markdown(bridge), end="\n\n")
    if tasks:
        made += tasks_heatmaps(tasks, a.outdir)
        made += density_plot(tasks, a.outdir, "density_tasks")
        print(tasks_markdown(tasks), end="\n\n")
        print(density_markdown(tasks), end="\n\n")
    for p in made:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
