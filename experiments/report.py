"""The replication's table (the paper's Table 3 layout) and plots, from runs.jsonl."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
from methods import METHODS
from protocol import TASKS, best_lr

LABEL = {"full": "Full fine-tuning", "bitfit": "BitFit (all biases)", "bq,bm2": "bq + bm2", "bm2": "bm2 only",
         "bq": "bq only", "frozen": "Frozen encoder (head only)", "rand_uniform": "Random (uniform), same count",
         "rand_row_col": "Random (rows/columns), same count"}
PAPER_AVG = {"full": 82.3, "bitfit": 82.4, "bq,bm2": 81.1, "bm2": 80.0, "bq": 76.6, "frozen": 62.1,
             "rand_uniform": 78.5, "rand_row_col": 79.5}
KINDS = ("bq", "bk", "bv", "bm1", "bLN1", "bm2", "bm3", "bLN2")


def final_runs(runs: list[dict], train_size: int, epochs: int) -> dict[tuple[str, str], list[dict]]:
    """(method, task) -> runs at the best dev LR (all seeds)."""
    out = {}
    for m in METHODS:
        for t in TASKS:
            lr = best_lr(runs, m, t, train_size, epochs)
            if lr is not None:
                out[(m, t)] = [r for r in runs if r["method"] == m and r["task"] == t and r["lr"] == lr
                               and r["train_size"] == train_size and r["epochs"] == epochs]
    return out


def table(runs: list[dict], train_size: int, epochs: int) -> str:
    final = final_runs(runs, train_size, epochs)
    # An average over different task sets would compare methods on different things: while the grid is
    # partial, every method is averaged over the tasks that all methods have.
    common = [t for t in TASKS if all(final.get((m, t)) for m in METHODS)]
    head = "| method | params (movie-sentiment) | " + " | ".join(TASKS) + " | avg | paper avg (GLUE, BERT-base) |"
    lines = [head, "|" + "---|" * (len(TASKS) + 4)]
    for m in METHODS:
        cells, share = [], None
        for t in TASKS:
            rs = final.get((m, t), [])
            if not rs:
                cells.append("-")
                continue
            vals = np.array([r["test_metric"] for r in rs])
            # the head grows with the labels: the share shown is the first task's (binary movie sentiment)
            share = rs[0]["trainable_share"] if share is None else share
            spread = f" ± {vals.std(ddof=1):.1f}" if len(vals) > 1 else ""  # sample std over seeds
            cells.append(f"{vals.mean():.1f}{spread} (n={len(vals)}, lr {rs[0]['lr']:g})")
        means = [np.mean([r["test_metric"] for r in final[(m, t)]]) for t in common]
        avg = (f"{np.mean(means):.1f}" if len(common) == len(TASKS)
               else f"({np.mean(means):.1f}, {len(common)} tasks)" if common else "-")
        lines.append(f"| {LABEL[m]} | {'' if share is None else f'{share:.3%}'} | " + " | ".join(cells)
                     + f" | {avg} | {PAPER_AVG[m]} |")
    return "\n".join(lines)


def edge_table(runs: list[dict], edge_runs: list[dict], train_size: int, epochs: int) -> str:
    """Seed-0 dev metric at the grid's best LR against one step past the grid's top."""
    lines = ["| method | task | grid best dev (lr) | dev one step past the grid (lr) | test there |", "|---|---|---|---|---|"]
    for e in sorted(edge_runs, key=lambda r: (r["method"], TASKS.index(r["task"]))):
        if (e["train_size"], e["epochs"]) != (train_size, epochs):
            continue
        lr = best_lr(runs, e["method"], e["task"], train_size, epochs)
        grid = [r for r in runs if (r["method"], r["task"], r["seed"], r["lr"], r["train_size"], r["epochs"])
                == (e["method"], e["task"], 0, lr, train_size, epochs)]
        cell = f"{grid[0]['dev_metric']:.1f} ({lr:g})" if grid else "-"
        lines.append(f"| {LABEL[e['method']]} | {e['task']} | {cell} | {e['dev_metric']:.1f} ({e['lr']:g}) | "
                     f"{e['test_metric']:.1f} |")
    return "\n".join(lines)


def write_report(runs: list[dict], out: Path, train_size: int, epochs: int, edge_runs: list[dict] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    text = [
        "# Replication on all-MiniLM-L6-v2 (not BERT-base, not GLUE)",
        "",
        f"Test metric in percent (accuracy; SMS spam: F1; movie-score: Spearman), mean ± sample std over seeds at the "
        f"best dev LR of seed 0; {train_size} training examples, {epochs} epochs, batch 16, max length 64. "
        f"{len(runs)} runs in runs.jsonl. A '-' is a cell not run yet; while any is, 'avg' is over the tasks every method has (their number in brackets).",
        "",
        table(runs, train_size, epochs),
    ]

    # Figure 1: mean absolute change per bias kind and layer, over BitFit (all biases) runs
    changes = defaultdict(list)
    for r in runs:
        if r["method"] == "bitfit" and "bias_change" in r:
            for name, v in r["bias_change"].items():
                changes[name].append(v)
    if changes:
        layers = sorted({int(n.split(".")[1]) for n in changes if n.startswith("layer.")})
        grid = np.array([[np.mean(changes.get(f"layer.{i}.{k}", [np.nan])) for i in layers] for k in KINDS])
        fig, ax = plt.subplots(figsize=(1 + 0.6 * len(layers), 4))
        im = ax.imshow(grid, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(layers)), [str(i) for i in layers])
        ax.set_yticks(range(len(KINDS)), KINDS)
        ax.set_xlabel("layer")
        ax.set_title("BitFit: mean |change| per bias")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(out / "bias_change.png", dpi=120)
        plt.close(fig)
        text += ["", "![bias change](bias_change.png)"]

    # Figure 2: data size curve on movie-sentiment, at the LR `sizes` trained with (the best dev LR at the
    # main train size): the other LRs of the search are not points of the curve
    curve = defaultdict(dict)
    for m in ("bitfit", "full"):
        lr = best_lr(runs, m, "movie-sentiment", train_size, epochs)
        for r in runs:
            if (r["task"], r["method"], r["seed"], r["lr"], r["epochs"]) == ("movie-sentiment", m, 0, lr, epochs):
                curve[m][r["train_size"]] = r["test_metric"]
    if any(len(v) > 1 for v in curve.values()):
        sizes = sorted({n for points in curve.values() for n in points})
        text += ["", "Data size (movie-sentiment, seed 0, test accuracy):", "",
                 "| method | " + " | ".join(str(n) for n in sizes) + " |", "|" + "---|" * (len(sizes) + 1)]
        text += [f"| {LABEL[m]} | " + " | ".join(f"{points[n]:.1f}" if n in points else "-" for n in sizes) + " |"
                 for m, points in curve.items()]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for m, points in curve.items():
            xs = sorted(points)
            ax.plot(xs, [points[x] for x in xs], marker="o", label=LABEL[m])
        ax.set_xscale("log")
        ax.set_xlabel("training examples")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("movie-sentiment: BitFit vs full fine-tuning")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "data_size.png", dpi=120)
        plt.close(fig)
        text += ["", "![data size](data_size.png)"]

    # train vs dev gap per method
    final = final_runs(runs, train_size, epochs)
    gaps = {m: np.mean([r["train_metric"] - r["dev_metric"] for t in TASKS for r in final.get((m, t), [])])
            for m in METHODS if any((m, t) in final for t in TASKS)}
    if gaps:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(range(len(gaps)), list(gaps.values()))
        ax.set_xticks(range(len(gaps)), list(gaps), rotation=30, ha="right")
        ax.set_ylabel("train - dev (points)")
        ax.set_title("generalisation gap per method")
        fig.tight_layout()
        fig.savefig(out / "train_dev_gap.png", dpi=120)
        plt.close(fig)
        text += ["", "Train minus dev metric (points, mean over the table's runs): "
                 + ", ".join(f"{LABEL[m]} {g:.1f}" for m, g in gaps.items()), "", "![train-dev gap](train_dev_gap.png)"]
    if edge_runs:
        text += ["", "LR edge check (`replicate.py edge`, seed 0, edge.jsonl; not part of the table above):", "",
                 edge_table(runs, list(edge_runs), train_size, epochs)]
    (out / "table.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))
    print(f"wrote {out / 'table.md'}")
