"""The replication's report from runs.jsonl: the table (the paper's Table 3 layout) with 95% intervals, the
final LR grids, one verdict per finding of the paper, the convergence control, the data-size curve, the
controls, and the plots (Figure 1 per task, the data-size curve, the generalisation gap)."""
from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
from methods import CONTROLS, LORA_METHODS, METHODS
from protocol import (
    EPOCHS,
    LADDER,
    LONG_EPOCHS,
    SIZE_TASKS,
    SIZES,
    TASKS,
    TRAIN_SIZE,
    at_best,
    base_search,
    best_lr,
    by_seed,
    epochs_for,
    family,
    predictions_path,
    search,
    size_gap,
)
from stats import (
    Interval,
    kendall_tau,
    metric_fn,
    paired_bootstrap,
    paired_gap,
    t_interval,
)

LABEL = {"full": "Full fine-tuning", "bitfit": "BitFit (all biases)", "bq,bm2": "bq + bm2", "bm2": "bm2 only",
         "bq": "bq only", "frozen": "Frozen encoder (head only)", "rand_uniform": "Random (uniform), same count",
         "rand_row_col": "Random (rows/columns), same count", "bitfit_constlr": "BitFit, constant LR",
         "rand_row_col_authors": "Random rows/columns, authors' way", "lora_matched": "LoRA r=3 q,v (BitFit's count)",
         "lora_r8": "LoRA r=8 q,v"}
PAPER_AVG = {"full": 82.3, "bitfit": 82.4, "bq,bm2": 81.1, "bm2": 80.0, "bq": 76.6, "frozen": 62.1,
             "rand_uniform": 78.5, "rand_row_col": 79.5}
KINDS = ("bq", "bk", "bv", "bm1", "bLN1", "bm2", "bm3", "bLN2")
Gold = Callable[[str], tuple[np.ndarray, str, int]]  # task -> (test gold, metric, number of classes)


def final(runs: list[dict], methods=METHODS, tasks=TASKS, **where) -> dict[tuple[str, str], list[dict]]:
    """(method, task) -> the runs at the chosen LR (every seed); absent while the search is unfinished."""
    return {(m, t): rows for m in methods for t in tasks if (rows := at_best(runs, m, t, **where))}


def seed_average(cells: dict, method: str, tasks=TASKS) -> dict[int, float]:
    """Per seed, the average over `tasks` (only seeds every task has)."""
    if not all((method, t) in cells for t in tasks):
        return {}
    per_task = [by_seed(cells[(method, t)]) for t in tasks]
    seeds = set.intersection(*(set(p) for p in per_task))
    return {s: float(np.mean([p[s] for p in per_task])) for s in sorted(seeds)}


def table(cells: dict, methods=METHODS) -> str:
    head = "| method | params | " + " | ".join(TASKS) + " | avg (4 tasks) | paper avg (GLUE, BERT-base) |"
    lines = [head, "|" + "---|" * (len(TASKS) + 4)]
    for m in methods:
        row, share = [], ""
        for t in TASKS:
            rows = cells.get((m, t))
            if not rows:
                row.append("-")
                continue
            share = share or f"{rows[0]['trainable_share']:.3%}"
            row.append(f"{t_interval([r['test_metric'] for r in rows]).text()} lr {rows[0]['lr']:g}")
        avg = seed_average(cells, m)
        row.append(t_interval(list(avg.values())).text() if avg else "-")
        lines.append(f"| {LABEL[m]} | {share} | " + " | ".join(row) + f" | {PAPER_AVG.get(m, '')} |")
    return "\n".join(lines)


def grids(runs: list[dict], methods=METHODS) -> str:
    lines = ["| method | " + " | ".join(TASKS) + " |", "|" + "---|" * (len(TASKS) + 1)]
    for m in methods:
        cells = []
        for t in TASKS:
            chosen, nxt, tried = search(runs, m, t)
            if not tried:
                cells.append("-")
            else:
                shown = ", ".join(f"**{lr:g}**" if lr == chosen else f"{lr:g}" for lr in tried)
                ladder = LADDER[family(m)]
                edge = chosen is not None and chosen in (ladder[0], ladder[-1])
                cells.append(shown + ("" if chosen is not None else f" (next {nxt:g})")
                             + (" (at the ladder's end: an untested edge)" if edge else ""))
        lines.append(f"| {LABEL[m]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def findings(cells: dict, runs: list[dict]) -> list[str]:
    """One line per finding of the paper: our interval, the paper's figure, the verdict."""
    out = []

    def gap(a: str, b: str) -> tuple[Interval, list[str]]:
        """a - b over the tasks both have finished (all four once the grid is done), paired by seed."""
        common = [t for t in TASKS if (a, t) in cells and (b, t) in cells]
        if not common:
            return Interval(0.0, 0.0, 0.0, 0), common
        return paired_gap(seed_average(cells, a, common), seed_average(cells, b, common)), common

    checks = [
        ("BitFit matches full fine-tuning on average (paper: 82.4 vs 82.3; goal: full - BitFit < 1.5)",
         gap("full", "bitfit"), 1.5, True),
        ("bq + bm2 comes close to BitFit (paper: 81.1 vs 82.4; goal: BitFit - bq,bm2 < 1.5)",
         gap("bitfit", "bq,bm2"), 1.5, True),
        ("the frozen encoder is far below BitFit (paper: 20 points; goal: BitFit - frozen > 10)",
         gap("bitfit", "frozen"), 10.0, False),
        ("random parameters at BitFit's count are below BitFit, uniform (paper: 3.9 below; goal: > 0)",
         gap("bitfit", "rand_uniform"), 0.0, False),
        ("random parameters at BitFit's count are below BitFit, rows/columns (paper: 2.9 below; goal: > 0)",
         gap("bitfit", "rand_row_col"), 0.0, False),
        ("whole rows/columns beat uniform random entries (paper: 79.5 vs 78.5; goal: > 0)",
         gap("rand_row_col", "rand_uniform"), 0.0, False),
    ]
    for text, (interval, common), goal, below in checks:
        if interval.n == 0:
            out.append(f"- {text}: not run yet")
            continue
        verdict = interval.verdict(goal, below) if interval.n > 1 else "one seed: no interval"
        over = "" if len(common) == len(TASKS) else f" (over {len(common)} of {len(TASKS)} tasks: {', '.join(common)})"
        out.append(f"- {text}: {interval.text()} points{over}, **{verdict}**")
    curve = {t: g for t, g in size_gaps(runs).items() if g}
    if curve:
        per_task = []
        for t, g in curve.items():
            per_task.append(f"{t}: " + ", ".join(f"{n} examples {g[n].text()}" for n in curve_ends(g))
                            + f" **{data_size_verdict(g)}**")
        out.append("- BitFit leads with little data, full fine-tuning with more (paper: Figures 2-3, BitFit ahead on "
                   "small training sets, the trend reversed with more data; goal: BitFit - full > 0 at the smallest "
                   "size, < 0 at the largest): BitFit - full " + "; ".join(per_task))
    gen = generalisation(cells)
    if gen.n:
        out.append(f"- bias-only training overfits less (paper: a smaller train-dev gap; goal: BitFit's gap - full's "
                   f"< 0): {gen.text()} points, **{gen.verdict(0.0, True) if gen.n > 1 else 'one seed'}**")
    return out


def generalisation(cells: dict) -> Interval:
    """BitFit's train-dev gap minus full fine-tuning's, averaged over tasks, paired by seed."""
    per = {}
    for m in ("bitfit", "full"):
        if all((m, t) in cells for t in TASKS):
            rows = [{r["seed"]: r["train_metric"] - r["dev_metric"] for r in cells[(m, t)]} for t in TASKS]
            seeds = set.intersection(*(set(g) for g in rows))
            per[m] = {s: float(np.mean([g[s] for g in rows])) for s in seeds}
    return paired_gap(per.get("bitfit", {}), per.get("full", {}))


def paired_tests(cells: dict, gold: Gold | None) -> list[str]:
    """BitFit vs full fine-tuning per task from the saved test predictions: paired bootstrap."""
    lines = ["| task | full - BitFit (paired bootstrap over test examples, mean over seeds) | p | seeds |",
             "|---|---|---|---|"]
    for t in TASKS:
        preds = {}
        for m in ("full", "bitfit"):
            preds[m] = {r["seed"]: np.load(p)["pred"] for r in cells.get((m, t), [])
                        if (p := predictions_path(r)).is_file()}
        if gold is None or not preds["full"] or not preds["bitfit"]:
            lines.append(f"| {t} | predictions not saved yet | | |")
            continue
        truth, metric, classes = gold(t)
        interval, p = paired_bootstrap(preds["full"], preds["bitfit"], truth, metric_fn(metric, classes))
        lines.append(f"| {t} | {interval.text()} | {p:.3f} | {interval.n} |")
    return lines


def convergence(runs: list[dict]) -> list[str]:
    """Seed 0 at the chosen LR: 4 vs 10 epochs, and whether the ranking of the methods changes."""
    lines = ["| task | method | dev @4 | dev @10 | test @4 | test @10 |", "|---|---|---|---|---|---|"]
    verdicts = []
    for t in SIZE_TASKS:
        short, long = {}, {}
        for m in METHODS:
            rows = [r for r in at_best(runs, m, t) if r["seed"] == 0]
            longer = [r for r in runs if r["method"] == m and r["task"] == t and r["epochs"] == LONG_EPOCHS
                      and r["seed"] == 0 and rows and r["lr"] == rows[0]["lr"] and r["train_size"] == TRAIN_SIZE]
            if rows and longer:
                short[m], long[m] = rows[0], longer[0]
                lines.append(f"| {t} | {LABEL[m]} | {rows[0]['dev_metric']:.2f} | {longer[0]['dev_metric']:.2f} | "
                             f"{rows[0]['test_metric']:.2f} | {longer[0]['test_metric']:.2f} |")
        if len(short) >= 2:
            ms = sorted(short)
            tau = kendall_tau([short[m]["test_metric"] for m in ms], [long[m]["test_metric"] for m in ms])
            order4 = sorted(ms, key=lambda m: -short[m]["test_metric"])
            order10 = sorted(ms, key=lambda m: -long[m]["test_metric"])
            verdicts.append(f"- {t}: Kendall tau of the test ranking 4 vs 10 epochs {tau:.2f} over {len(ms)} methods; "
                            f"order at 4: {', '.join(order4)}; at 10: {', '.join(order10)}")
    return lines + [""] + verdicts if verdicts else lines


def size_gaps(runs: list[dict]) -> dict[str, dict[int, Interval]]:
    """BitFit minus full fine-tuning per task and size, paired by seed, where both finished their LR search."""
    out: dict[str, dict[int, Interval]] = defaultdict(dict)
    for t in SIZE_TASKS:
        for n in SIZES:
            if (gap := size_gap(runs, t, n)) is not None:
                out[t][n] = gap
    return out


def curve_ends(gaps: dict[int, Interval]) -> list[int]:
    """The smallest and the largest size run (one size: just it)."""
    return sorted(set(sorted(gaps)[:1] + sorted(gaps)[-1:]))


def data_size_verdict(gaps: dict[int, Interval]) -> str:
    """The paper's data-size trend on one task: BitFit ahead with the least data (its interval above 0) and
    full fine-tuning ahead with the most (below 0). Partly: one end holds; not reproduced: full fine-tuning is
    ahead even at the smallest size."""
    ends = curve_ends(gaps)
    if len(ends) < 2 or any(gaps[n].n < 2 for n in ends):
        return "undetermined (needs two sizes with 2+ seeds)"
    small, large = gaps[ends[0]], gaps[ends[-1]]
    if small.high < 0:
        return "not reproduced"
    if small.low > 0 and large.high < 0:
        return "reproduced"
    return "partly" if small.low > 0 or large.high < 0 else "undetermined"


def size_curve(runs: list[dict]) -> tuple[list[str], dict]:
    """BitFit vs full fine-tuning per size: means, and the seed-paired difference with its interval."""
    lines = ["| task | examples | epochs | BitFit | full | BitFit - full | verdict |", "|---|---|---|---|---|---|---|"]
    points = defaultdict(dict)
    gaps = size_gaps(runs)
    for t in SIZE_TASKS:
        for n in SIZES:
            e = epochs_for(n)
            b, f = at_best(runs, "bitfit", t, n, e), at_best(runs, "full", t, n, e)
            if n not in gaps[t]:
                lines.append(f"| {t} | {n} | {e} | {'-' if not b else t_interval(list(by_seed(b).values())).text()} | "
                             f"{'-' if not f else t_interval(list(by_seed(f).values())).text()} | | not run yet |")
                continue
            bi, fi = t_interval(list(by_seed(b).values())), t_interval(list(by_seed(f).values()))
            d = gaps[t][n]
            verdict = ("BitFit ahead" if d.low > 0 else "full ahead" if d.high < 0 else "no difference shown") \
                if d.n > 1 else "one seed"
            points[t][n] = (bi, fi)
            lines.append(f"| {t} | {n} | {e} | {bi.text()} | {fi.text()} | {d.text()} | {verdict} |")
    return lines, points


def per_task_gaps(cells: dict, a: str, b: str) -> str:
    """a - b paired by seed on each task both have finished ('' when none)."""
    return "; ".join(f"{t} {paired_gap(by_seed(cells[(a, t)]), by_seed(cells[(b, t)])).text()}"
                     for t in TASKS if (a, t) in cells and (b, t) in cells)


def controls(cells_main: dict, cells_ctl: dict) -> list[str]:
    lines = []
    pairs = [("bitfit_constlr", "bitfit", "BitFit at a constant LR (the authors' schedule) minus BitFit with "
                                          "warm-up and linear decay"),
             ("rand_row_col_authors", "rand_row_col", "random rows/columns the authors' way minus ours")]
    merged = {**cells_main, **cells_ctl}
    for a, b, text in pairs:
        gap = paired_gap(seed_average(merged, a), seed_average(merged, b))
        per_task = per_task_gaps(merged, a, b)
        if gap.n:
            lines.append(f"- {text}: {gap.text()} points (4-task average, paired by seed)")
        elif per_task:  # a control finished on some tasks: its gap there, never passed off as the average
            lines.append(f"- {text}, per task (paired by seed; the other tasks not run yet): {per_task}")
        else:
            lines.append(f"- {text}: not run yet")
    return lines


def against_lora(cells: dict, cells_lora: dict) -> list[str]:
    """BitFit against LoRA (issue 16): LoRA minus BitFit, 4-task average paired by seed, and per task."""
    merged, lines = {**cells, **cells_lora}, []
    for m in LORA_METHODS:
        gap = paired_gap(seed_average(merged, m), seed_average(merged, "bitfit"))
        per_task = per_task_gaps(merged, m, "bitfit")
        subset = paired_gap(seed_average(merged, m), seed_average(merged, "bq,bm2"))
        if gap.n:
            lines.append(f"- {LABEL[m]} minus BitFit: {gap.text()} points (4-task average, paired by seed)"
                         + (f"; minus bq + bm2: {subset.text()}" if subset.n else ""))
        elif per_task:
            lines.append(f"- {LABEL[m]} minus BitFit, per task (paired by seed): {per_task}")
        else:
            lines.append(f"- {LABEL[m]}: not run yet")
    return lines


SERVING = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "lora_serving.json"
# (method whose scores the row shows, serving variant timed, its mixed-task variant, label); full fine-tuning
# is served as a whole graph per task, which is what the benchmark's merged LoRA graph is
COMPARED = (("full", "lora merged", None, "Full fine-tuning (a graph per task)"),
            ("bitfit", "bitfit", "bitfit mixed", "BitFit (bias inputs)"),
            ("bq,bm2", None, None, "BitFit, bq + bm2 only (bias inputs)"),
            ("lora_matched", None, None, "LoRA r=3 q,v (BitFit's count)"),
            ("lora_r8", "lora inputs", "lora mixed", "LoRA r=8 q,v (A/B inputs)"),
            ("lora_r8", "lora merged", None, "LoRA r=8 q,v merged (a graph per task)"))


def _size(n: float) -> str:  # KB = 1,024 bytes, as the serving benchmark prints them
    return f"{n / 2**10:,.0f} KB" if n < 10 * 2**20 else f"{n / 2**20:,.0f} MB"


def comparison(cells: dict, serving: dict | None) -> list[str]:
    """Issue 16's one table: each method's score (the replication's runs) beside what serving a task costs
    (benchmarks/lora_serving.py's JSON): latency against the frozen graph over every model and batch timed,
    bytes per task, and whether rows of different tasks share one forward pass."""
    head = ["| method | trainable share | test score, task average | minus BitFit (paired by seed) | "
            "latency vs frozen graph | bytes per task (MiniLM / bert-base) | mixed-task batch |",
            "|---|---|---|---|---|---|---|"]
    models = [m for m in ("minilm", "bert-base") if m in (serving or {}).get("models", {})]
    if serving:  # the names are lora_serving.py's: a renamed variant must fail here, not print "not timed"
        timed = {r["variant"] for r in serving["rows"]}
        for m in models:
            missing = sorted({v for _, v, _, _ in COMPARED if v} - (timed & set(serving["models"][m]["task_bytes"])))
            missing += [f"{x} rows vs each task alone" for _, _, x, _ in COMPARED
                        if x and f"{x} rows vs each task alone" not in serving["models"][m]["parity"]]
            if missing:
                raise ValueError(f"the serving benchmark's JSON has no {', '.join(map(repr, missing))} for {m}: "
                                 "re-run benchmarks/lora_serving.py, or rename them in report.COMPARED")
    lines = []
    for method, variant, mixed, label in COMPARED:
        done = [t for t in TASKS if (method, t) in cells]
        if not done:
            lines.append(f"| {label} | - | not run | - | - | - | - |")
            continue
        which = "" if len(done) == len(TASKS) else " (" + ", ".join(done) + " only)"
        score = t_interval(list(seed_average(cells, method, done).values()))
        gap = paired_gap(seed_average(cells, method, done), seed_average(cells, "bitfit", done)) \
            if method != "bitfit" and all(("bitfit", t) in cells for t in done) else None
        share = f"{cells[(method, done[0])][0]['trainable_share']:.3%}"
        latency = size = batch = "not timed"
        if serving and variant:
            ratios = [r["vs_frozen"] for r in serving["rows"] if r["variant"] == variant]
            latency = f"{min(ratios):.3f}-{max(ratios):.3f}x" if ratios else "not timed"
            size = " / ".join(_size(serving["models"][m]["task_bytes"][variant]) for m in models)
            parity = [serving["models"][m]["parity"].get(f"{mixed} rows vs each task alone") for m in models] \
                if mixed else []
            if not mixed:
                batch = "no: a graph per task"
            else:  # a mixed batch counts only when its rows match each task run alone
                batch = (f"yes (rows within {max(parity):.1e} of each task alone)" if max(parity) <= 1e-4 else
                         f"no: mixed rows {max(parity):.1e} from each task alone")
        lines.append(f"| {label} | {share} | {score.text()}{which} | {gap.text() if gap else '-'} | {latency} | "
                     f"{size} | {batch} |")
    note = (f"Serving: {serving['machine']}, sequence {serving['seq']}, {' and '.join(models)} at batch 1 and 8; "
            "the latency column is the range of the medians' ratios over those four. LoRA was timed at r=8 only."
            if serving else "Serving columns: benchmarks/results/lora_serving.json not found.")
    return head + lines + ["", note]


def bias_change_figure(cells: dict, out: Path, plt) -> list[str]:
    """Figure 1 per task: mean |change| per bias kind and layer at the chosen LR, BitFit and bq + bm2."""
    methods = [m for m in ("bitfit", "bq,bm2") if any((m, t) in cells for t in TASKS)]
    if not methods:
        return []
    fig, axes = plt.subplots(len(methods), len(TASKS), figsize=(3.2 * len(TASKS), 2.8 * len(methods)),
                             squeeze=False)
    ranking = []
    for i, m in enumerate(methods):
        for j, t in enumerate(TASKS):
            ax = axes[i][j]
            rows = [r for r in cells.get((m, t), []) if "bias_change" in r]
            if not rows:
                ax.axis("off")
                continue
            names = rows[0]["bias_change"]
            layers = sorted({int(n.split(".")[1]) for n in names if n.startswith("layer.")})
            grid = np.array([[np.mean([r["bias_change"].get(f"layer.{k}.{kind}", np.nan) for r in rows])
                              for k in layers] for kind in KINDS])
            ax.imshow(grid, cmap="viridis", aspect="auto")
            ax.set_xticks(range(len(layers)), [str(k) for k in layers])
            ax.set_yticks(range(len(KINDS)), KINDS)
            ax.set_title(f"{LABEL[m]}: {t}", fontsize=8)
            if m == "bitfit":
                means = {kind: float(np.nanmean(grid[KINDS.index(kind)])) for kind in KINDS}
                top = sorted(means, key=lambda k: -means[k])
                ranking.append(f"{t}: " + " > ".join(f"{k} {means[k]:.3f}" for k in top[:4]))
    fig.suptitle("mean |change| per bias (layer on x), at the chosen LR, mean over seeds")
    fig.tight_layout()
    fig.savefig(out / "bias_change.png", dpi=110)
    plt.close(fig)
    return ["Figure 1 per task (BitFit, kinds by mean |change|): " + "; ".join(ranking), "",
            "![bias change](bias_change.png)"]


def write_report(runs: list[dict], out: Path, gold: Gold | None = None, serving: Path | None = SERVING) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    gold = gold if gold is not None else builtin_gold
    cells = final(runs)
    cells_ctl = final(runs, CONTROLS)
    cells_lora = final(runs, tuple(LORA_METHODS))
    curve_lines, points = size_curve(runs)
    text = [
        "# Replication on all-MiniLM-L6-v2 (not BERT-base, not GLUE)",
        "",
        f"Test metric in percent (accuracy; SMS spam: F1 of spam; movie-score: Spearman) at the LR the dev search "
        f"chose (seed 0); mean [95% interval over seeds] (n seeds). {TRAIN_SIZE} training examples, {EPOCHS} epochs, "
        f"batch 16, max length 64. The average's interval is over seeds of the 4-task average. {len(runs)} runs.",
        "",
        table(cells),
        "",
        "## Findings of the paper",
        "",
        *findings(cells, runs),
        "",
        "Per task, full fine-tuning minus BitFit on the same test examples:",
        "",
        *paired_tests(cells, gold),
        "",
        "## Final LR grids (bold: chosen; the search moved any grid whose best was at its edge)",
        "",
        grids(runs),
        "",
        "## Convergence control: 10 epochs instead of 4 (seed 0, the 4-epoch LR)",
        "",
        *convergence(runs),
        "",
        "## Data size: BitFit vs full fine-tuning (>= 250 optimizer steps at every size, LR searched per size)",
        "",
        *curve_lines,
        "",
        "## Controls",
        "",
        table(cells_ctl, CONTROLS),
        "",
        *controls(cells, cells_ctl),
        "",
        "## What users pick instead: LoRA (PEFT, on query and value)",
        "",
        table(cells_lora, tuple(LORA_METHODS)),
        "",
        *against_lora(cells, cells_lora),
        "",
        "BitFit against LoRA in one table (issue 16): accuracy from these runs, cost from benchmarks/lora_serving.py:",
        "",
        *comparison({**cells, **cells_lora},
                    json.loads(serving.read_text()) if serving is not None and serving.is_file() else None),
        "",
        *bias_change_figure(cells, out, plt),
    ]
    if points:
        fig, axes = plt.subplots(1, len(points), figsize=(4.5 * len(points), 3.5), squeeze=False)
        for ax, (t, pts) in zip(axes[0], sorted(points.items())):
            xs = sorted(pts)
            for k, (name, color) in enumerate((("BitFit", "C0"), ("full fine-tuning", "C1"))):
                means = [pts[x][k].mean for x in xs]
                errs = [pts[x][k].half if pts[x][k].n > 1 else 0 for x in xs]
                ax.errorbar(xs, means, yerr=errs, marker="o", capsize=3, label=name, color=color)
            ax.set_xscale("log")
            ax.set_xticks(xs, [f"{x:,}" for x in xs])  # the sizes run, not 3x10^2-style minor ticks
            ax.minorticks_off()
            ax.set_xlabel("training examples")
            ax.set_ylabel("test metric (%)")
            ax.set_title(t)
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "data_size.png", dpi=110)
        plt.close(fig)
        text += ["", "![data size](data_size.png)"]
    gaps = {m: t_interval([r["train_metric"] - r["dev_metric"] for t in TASKS for r in cells.get((m, t), [])])
            for m in METHODS}
    gaps = {m: g for m, g in gaps.items() if g.n}
    if gaps:
        fig, ax = plt.subplots(figsize=(6.5, 3.5))
        ax.bar(range(len(gaps)), [g.mean for g in gaps.values()],
               yerr=[g.half if g.n > 1 else 0 for g in gaps.values()], capsize=3)
        ax.set_xticks(range(len(gaps)), list(gaps), rotation=30, ha="right")
        ax.set_ylabel("train - dev (points)")
        ax.set_title("generalisation gap per method (runs of the table)")
        fig.tight_layout()
        fig.savefig(out / "train_dev_gap.png", dpi=110)
        plt.close(fig)
        text += ["", "Train minus dev (points): " + ", ".join(f"{LABEL[m]} {g.text(1)}" for m, g in gaps.items()),
                 "", "![train-dev gap](train_dev_gap.png)"]
    text += base_size(runs)
    (out / "table.md").write_text("\n".join(text) + "\n")
    summary = {"runs": len(runs), "findings": findings(cells, runs)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n".join(text))
    print(f"wrote {out / 'table.md'}")


def base_size(runs: list[dict]) -> list[str]:
    """all-mpnet-base-v2 beside MiniLM: every run of its LR search (protocol.base_search), and BitFit - full
    per task at the chosen LRs once both searches are finished. One seed (a run is ~5x MiniLM's on the 2 CPU
    cores), so no interval of its own."""
    mp = sorted((r for r in runs if r.get("model") == "mpnet"), key=lambda r: (r["task"], r["method"], r["lr"]))
    if not mp:
        return []
    cells = {(m, t) for m in ("bitfit", "full") for t in SIZE_TASKS} | {(r["method"], r["task"]) for r in mp}
    search = {(m, t): base_search(runs, m, t) for m, t in cells}  # once per cell, not per row
    minilm = {(m, t): (best_lr(runs, m, t), by_seed(at_best(runs, m, t))) for m, t in cells}  # likewise
    lines = ["", "## all-mpnet-base-v2 (base size, 109M; seed 0; LR searched from MiniLM's choice and the step "
             "below it, off the edges)", "",
             "| method | task | LR | dev | test | MiniLM's LR, its test at seed 0 | seconds | |",
             "|---|---|---|---|---|---|---|---|"]
    for r in mp:
        m, t = r["method"], r["task"]
        chosen, _, tried = search[m, t]
        lr, mini = minilm[m, t][0], minilm[m, t][1].get(0)
        mark = "" if r["lr"] != chosen else "chosen, at an edge" if r["lr"] in (tried[0], tried[-1]) else "chosen"
        lines.append(f"| {LABEL[m]} | {t} | {r['lr']:g} | {r['dev_metric']:.2f} | {r['test_metric']:.2f} | "
                     f"{'-' if mini is None else f'{lr:g}: {mini:.2f}'} | {r['seconds']:.0f} | {mark} |")
    gaps = []
    for t in SIZE_TASKS:
        chosen = {m: search[m, t][0] for m in ("bitfit", "full")}
        if None in chosen.values():  # no gap at a half-searched LR: there a run may have diverged (chance level)
            if any(r["task"] == t for r in mp):
                gaps.append(f"{t}: LR search not finished")
            continue
        test = {m: next(r["test_metric"] for r in mp if (r["method"], r["task"], r["lr"]) == (m, t, chosen[m]))
                for m in chosen}
        mini = paired_gap(minilm["bitfit", t][1], minilm["full", t][1])
        gaps.append(f"{t} {test['bitfit'] - test['full']:.2f} (MiniLM, paired by seed: {mini.text()})")
    lines += ["", "BitFit - full fine-tuning on all-mpnet-base-v2 at the chosen LRs, seed 0 (one seed: no interval): "
              + "; ".join(gaps)]
    return lines


def builtin_gold(task: str) -> tuple[np.ndarray, str, int]:
    from bitfit.training.data import load_builtin

    data = load_builtin(task)
    return data.targets(data.test), data.metric, max(len(data.labels), 1)
