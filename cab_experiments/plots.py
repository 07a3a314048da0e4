"""Plots and markdown tables from the experiments' JSONL rows (matplotlib, Agg backend)."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from cab_experiments.niah import accuracy_table
from cab_experiments.ppl import summary as ppl_summary
from cab_experiments.tasks import TASKS, score_table


def read_jsonl(*paths) -> list[dict]:
    rows = []
    for p in paths:
        for line in Path(p).read_text().splitlines():
            if line.strip():
                rows.append(json.loads(line))
    return rows


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _len_label(n: int, yarn) -> str:
    s = f"{n // 1024}k" if n % 1024 == 0 else str(n)
    return f"{s}*" if yarn else s


def niah_heatmaps(rows: list[dict], outdir: str | Path) -> list[Path]:
    """One figure per model: a depth x length heatmap of accuracy per (variant, sparsity); * = YaRN lengths."""
    plt = _plt()
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for model in sorted({r["model"] for r in rows}):
        mr = [r for r in rows if r["model"] == model]
        cols = sorted({(r["length"], r.get("yarn")) for r in mr}, key=lambda c: (c[0], c[1] or 0))
        depths = sorted({r["depth"] for r in mr})
        variants = list(dict.fromkeys(r["variant"] for r in mr))
        sparsities = sorted({r["sparsity"] for r in mr if r["sparsity"] > 0})
        panels = [(v, s) for v in variants for s in ([0.0] if v == "dense" else sparsities)]
        ncol = max(1, len(sparsities))
        nrow = math.ceil(len(panels) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(2.2 + 0.45 * len(cols) * ncol, 0.4 + 1.9 * nrow),
                                 squeeze=False)
        grid = defaultdict(lambda: [0, 0])
        for r in mr:
            c = grid[(r["variant"], r["sparsity"], r["depth"], (r["length"], r.get("yarn")))]
            c[0] += bool(r["correct"])
            c[1] += 1
        for ax in axes.flat:
            ax.axis("off")
        for i, (v, s) in enumerate(panels):
            ax = axes.flat[i]
            ax.axis("on")
            img = [[(grid[(v, s, d, c)][0] / grid[(v, s, d, c)][1]) if grid[(v, s, d, c)][1] else math.nan
                    for c in cols] for d in depths]
            ax.imshow(img, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_title(f"{v} @ {s:g}" if s else v, fontsize=8)
            ax.set_xticks(range(len(cols)), [_len_label(*c) for c in cols], fontsize=6, rotation=90)
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=6)
        fig.suptitle(f"passkey accuracy, {model} (rows: needle depth; *: YaRN)", fontsize=9)
        paths.append(_save(plt, fig, outdir / f"niah_{model}.png"))
    return paths


def pareto_plot(rows: list[dict], outdir: str | Path, metric: str = "ppl_last_quarter") -> list[Path]:
    """Per (model, length): perplexity against all-layer attention time (predictor included), dense starred."""
    plt = _plt()
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    summ = ppl_summary(rows)
    paths = []
    by = defaultdict(list)
    for (model, yarn, n, v, s), d in summ.items():
        if d[metric] is not None and d["attention_s"] is not None:
            by[(model, yarn, n)].append((v, s, d["attention_s"] * 1e3, d[metric]))
    for (model, yarn, n), pts in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][2])):
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for v in dict.fromkeys(p[0] for p in pts):
            xs = [p for p in pts if p[0] == v]
            ax.plot([p[2] for p in xs], [p[3] for p in xs], "*" if v == "dense" else "o-", label=v, ms=9 if v == "dense" else 4)
            for p in xs:
                if p[1]:
                    ax.annotate(f"{p[1]:g}", (p[2], p[3]), fontsize=6)
        ax.set_xscale("log")
        ax.set_xlabel("attention time, all layers (ms, predictor included)")
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_title(f"{model}, {_len_label(n, yarn)} tokens", fontsize=9)
        ax.legend(fontsize=6)
        paths.append(_save(plt, fig, outdir / f"pareto_{model}_{n}.png"))
    return paths


def niah_markdown(rows: list[dict]) -> str:
    acc = accuracy_table(rows)
    cols = sorted({(r["length"], r.get("yarn")) for r in rows}, key=lambda c: (c[0], c[1] or 0))
    head = "| model | variant | sparsity | " + " | ".join(_len_label(*c) for c in cols) + " | mean |"
    lines = [head, "|" + "---|" * (len(cols) + 4)]
    for (model, yarn, v, s) in sorted({(k[0], None, k[2], k[3]) for k in acc},
                                      key=lambda k: (k[0], k[3], k[2] != "dense", k[2])):
        vals, cells = [], []
        for n, y in cols:
            a = acc.get((model, y, v, s), {}).get(n)
            cells.append("" if a is None else f"{a:.2f}")
            if a is not None:
                vals.append(a)
        mean = f"{sum(vals) / len(vals):.2f}" if vals else ""
        lines.append(f"| {model} | {v} | {s:g} | " + " | ".join(cells) + f" | {mean} |")
    return "\n".join(lines)


def _score(r: dict) -> float:
    """A row's accuracy: a task's string-match score, or 1/0 for a pass key found / missed."""
    return float(r["score"]) if "score" in r else float(bool(r["correct"]))


def density_table(rows: list[dict]) -> dict:
    """{(model, yarn, variant, sparsity): (mean achieved density or None, mean accuracy, prompts)} over every
    length, depth and task of the rows (niah or tasks rows; density = kept / causal key blocks of the runs)."""
    acc: dict = defaultdict(lambda: [[], []])
    for r in rows:
        c = acc[(r["model"], r.get("yarn"), r["variant"], r["sparsity"])]
        c[0].append(_score(r))
        if r.get("density") is not None:
            c[1].append(float(r["density"]))
    return {k: (sum(d) / len(d) if d else None, sum(a) / len(a), len(a)) for k, (a, d) in acc.items()}


def density_plot(rows: list[dict], outdir: str | Path, name: str = "density") -> list[Path]:
    """Per (model, YaRN or not): accuracy against the achieved density, a line per variant through its
    sparsities (dense at density 1). Log density axis."""
    plt = _plt()
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    table = density_table(rows)
    paths = []
    for model, yarn in sorted({(k[0], k[1]) for k in table}, key=lambda k: (k[0], k[1] or 0)):
        fig, ax = plt.subplots(figsize=(5.5, 4))
        cells = {k: v for k, v in table.items() if (k[0], k[1]) == (model, yarn) and v[0] is not None}
        for variant in dict.fromkeys(k[2] for k in cells):
            pts = sorted((v[0], v[1], k[3]) for k, v in cells.items() if k[2] == variant)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "*" if variant == "dense" else "o-", label=variant,
                    ms=9 if variant == "dense" else 4)
            for x, y, sp in pts:
                if sp:
                    ax.annotate(f"{sp:g}", (x, y), fontsize=6)
        ax.set_xscale("log")
        ax.set_xlabel("achieved density (kept / causal key blocks)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"{model}{' (YaRN)' if yarn else ''}: accuracy vs density", fontsize=9)
        ax.legend(fontsize=6)
        paths.append(_save(plt, fig, outdir / f"{name}_{model}{'_yarn' if yarn else ''}.png"))
    return paths


def density_markdown(rows: list[dict]) -> str:
    lines = ["| model | variant | sparsity | achieved density | accuracy | prompts |", "|---|---|---|---|---|---|"]
    table = density_table(rows)
    for k in sorted(table, key=lambda k: (k[0], k[1] or 0, k[3], k[2] != "dense", k[2])):
        d, a, n = table[k]
        label = f"{k[2]}{' (YaRN)' if k[1] else ''}"
        lines.append(f"| {k[0]} | {label} | {k[3]:g} | {'' if d is None else f'{d:.3f}'} | {a:.2f} | {n} |")
    return "\n".join(lines)


def _task_order(rows: list[dict]) -> list[str]:
    seen = {r["task"] for r in rows}
    return [t for t in TASKS if t in seen] + sorted(seen - set(TASKS))


def _cells(rows: list[dict]) -> list[tuple[str, float]]:
    """(variant, sparsity) in the rows' order, dense first, each variant's sparsities ascending."""
    variants = sorted(dict.fromkeys(r["variant"] for r in rows), key=lambda v: v != "dense")
    return [(v, s) for v in variants for s in sorted({r["sparsity"] for r in rows if r["variant"] == v})]


def tasks_heatmaps(rows: list[dict], outdir: str | Path) -> list[Path]:
    """One figure per model, a panel per task: mean score per (variant @ sparsity) x length; * = YaRN lengths."""
    plt = _plt()
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    table = score_table(rows)
    paths = []
    for model in sorted({r["model"] for r in rows}):
        mr = [r for r in rows if r["model"] == model]
        cols = sorted({(r["length"], r.get("yarn")) for r in mr}, key=lambda c: (c[0], c[1] or 0))
        tasks, panels = _task_order(mr), _cells(mr)
        ncol = min(3, len(tasks))
        nrow = math.ceil(len(tasks) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(1.6 + (1.0 + 0.45 * len(cols)) * ncol,
                                                      0.6 + (0.5 + 0.18 * len(panels)) * nrow), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, task in zip(axes.flat, tasks):
            ax.axis("on")
            img = [[table.get((model, y, task, v, s), {}).get(n, math.nan) for n, y in cols] for v, s in panels]
            ax.imshow(img, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_title(task, fontsize=8)
            ax.set_xticks(range(len(cols)), [_len_label(*c) for c in cols], fontsize=6, rotation=90)
            ax.set_yticks(range(len(panels)), [f"{v} @ {s:g}" if s else v for v, s in panels], fontsize=5)
        fig.suptitle(f"task scores, {model} (string match; *: YaRN)", fontsize=9)
        paths.append(_save(plt, fig, outdir / f"tasks_{model}.png"))
    return paths


def tasks_markdown(rows: list[dict]) -> str:
    """Mean score per (model, task, variant, sparsity) and length, with the mean over lengths."""
    table = score_table(rows)
    cols = sorted({(r["length"], r.get("yarn")) for r in rows}, key=lambda c: (c[0], c[1] or 0))
    lines = ["| model | task | variant | sparsity | " + " | ".join(_len_label(*c) for c in cols) + " | mean |",
             "|" + "---|" * (len(cols) + 5)]
    for model in sorted({r["model"] for r in rows}):
        mr = [r for r in rows if r["model"] == model]
        for task in _task_order(mr):
            for v, s in _cells([r for r in mr if r["task"] == task]):
                vals = [table.get((model, y, task, v, s), {}).get(n) for n, y in cols]
                got = [x for x in vals if x is not None]
                mean = f"{sum(got) / len(got):.2f}" if got else ""
                lines.append(f"| {model} | {task} | {v} | {s:g} | "
                             + " | ".join("" if x is None else f"{x:.2f}" for x in vals) + f" | {mean} |")
    return "\n".join(lines)


def ppl_markdown(rows: list[dict]) -> str:
    summ = ppl_summary(rows)
    dense_t = {(k[0], k[1], k[2]): d["attention_s"] for k, d in summ.items() if k[3] == "dense"}
    lines = ["| model | length | variant | sparsity | ppl | ppl (last quarter) | attention ms | vs dense |",
             "|---|---|---|---|---|---|---|---|"]
    for k in sorted(summ, key=lambda k: (k[0], k[2], k[4], k[3] != "dense", k[3])):
        d = summ[k]
        t, t0 = d["attention_s"], dense_t.get((k[0], k[1], k[2]))
        f = lambda x, p=2: "" if x is None else f"{x:.{p}f}"  # noqa: E731
        ratio = f"{t0 / t:.1f}x" if t and t0 else ""
        lines.append(f"| {k[0]} | {_len_label(k[2], k[1])} | {k[3]} | {k[4]:g} | {f(d['ppl'])} | "
                     f"{f(d['ppl_last_quarter'])} | {f(None if t is None else t * 1e3, 1)} | {ratio} |")
    return "\n".join(lines)


def bridge_markdown(rows: list[dict]) -> str:
    seed = [r for r in rows if r["experiment"] == "seed_graph"]
    syn = [r for r in rows if r["experiment"] == "synthetic_retrieval"]
    out = []
    if seed:
        sps = sorted({r["sparsity"] for r in seed})
        out += ["| variant | " + " | ".join(f"keeps needle @ {s:g}" for s in sps) + " |",
                "|---|" + "---|" * len(sps)]
        for v in dict.fromkeys(r["variant"] for r in seed):
            cells = [next(("yes" if r["keeps_needle"] else "no") for r in seed if r["variant"] == v and r["sparsity"] == s)
                     for s in sps]
            out.append(f"| {v} | " + " | ".join(cells) + " |")
        out.append("")
    if syn:
        agg = defaultdict(list)
        for r in syn:
            agg[(r["variant"], r["sparsity"], r["length"])].append(r)
        lengths = sorted({r["length"] for r in syn})
        out += ["| variant | sparsity | " + " | ".join(f"{_len_label(n, None)}: kept / err / cos" for n in lengths) + " |",
                "|---|---|" + "---|" * len(lengths)]
        for v, s in dict.fromkeys((r["variant"], r["sparsity"]) for r in syn):
            cells = []
            for n in lengths:
                rs = agg.get((v, s, n), [])
                if not rs:
                    cells.append("")
                    continue
                m = lambda key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
                cells.append(f"{m('needle_kept'):.2f} / {m('rel_err_last_block'):.3f} / {m('needle_cosine'):.2f}")
            out.append(f"| {v} | {s:g} | " + " | ".join(cells) + " |")
    return "\n".join(out)
