"""The replication's report from runs.jsonl: the table (the paper's Table 3 layout) with 95% intervals, the
final LR grids, one verdict per finding of the paper (judged by two intervals, over seeds and over seeds and
test examples, under one rule: `judge`), the convergence control, the data-size curve and its trend, the
controls, which runs have predictions, the knife-edge grids and pending runs, and the plots (Figure 1 per
task, the data-size curve, the generalisation gap). The findings' words also go, generated, into
docs/replication.md and the README (`splice`), so all three say the same."""
from __future__ import annotations

import json
import textwrap
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from methods import CONTROLS, LORA_METHODS, METHODS
from protocol import (
    EPOCHS,
    LADDER,
    LONG_EPOCHS,
    SEEDS,
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
    NONE,
    Interval,
    Preds,
    kendall_tau,
    metric_fn,
    paired_gap,
    slope,
    t_interval,
    two_level,
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

MODEL_NOTE = ("all-MiniLM-L6-v2 is a contrastively trained sentence-embedding model read through mean pooling, "
              "not a masked-LM BERT with a CLS pooler as in the paper: its frozen features are already strong "
              "(the frozen encoder's 76.4 here), which narrows every gap to the frozen baseline")


# -- which runs the report reads ----------------------------------------------------------------------------
def in_protocol(row: dict) -> bool:
    """The rule every table reads runs by: a size the protocol runs (SIZES; 1,000 is the main grid's) at that
    size's budget (epochs_for), or the convergence control's 10 epochs at 1,000. The first pass's
    5,000-example runs and its 4-epoch runs at 250 and 500 fall outside it and are listed, not used."""
    n, e = row["train_size"], row["epochs"]
    return n in SIZES and (e == epochs_for(n) or (n == TRAIN_SIZE and e == LONG_EPOCHS))


def stray_note(runs: list[dict]) -> str:
    out = [r for r in runs if not in_protocol(r)]
    if not out:
        return f"{len(runs)} runs, all inside the protocol."
    listed = ", ".join(sorted({f"{r['method']} {r['task']} {r['train_size']} examples {r['epochs']} epochs"
                               for r in out}))
    return (f"{len(runs)} runs; {len(out)} outside the protocol are left out by rule (a size the protocol runs at "
            f"that size's epoch budget, or 10 epochs at {TRAIN_SIZE:,}): {listed}.")


def share_text(row: dict) -> str:
    """Trainable parameters over the encoder's. Full fine-tuning trains the whole encoder plus the head, which
    is not part of the encoder: printed as 100% + the head's share, never as 100.003%."""
    share, params = row["trainable_share"], row.get("trainable_params")
    if params and share >= 1:
        base = round(params / share)
        return f"100% + head {(params - base) / base:.3%}"
    return f"{share:.3%}"


# -- predictions and the one verdict rule --------------------------------------------------------------------
def predictions(rows: list[dict]) -> dict[int, np.ndarray]:
    """Seed -> saved test predictions, for the rows that have a file (the others are metric only)."""
    return {r["seed"]: np.load(p)["pred"] for r in rows if (p := predictions_path(r)).is_file()}


def preds_of(cells: dict, method: str, tasks) -> Preds:
    return {t: predictions(cells.get((method, t), [])) for t in tasks}


def scorers(gold: Gold | None, tasks) -> dict | None:
    if gold is None:
        return None
    out = {}
    for t in tasks:
        truth, metric, classes = gold(t)
        out[t] = (truth, metric_fn(metric, classes))
    return out


def seed_and_test(cells: dict, a: str, b: str, tasks, gold: Gold | None) -> Interval:
    """a - b over `tasks` from the prediction files: the two-level bootstrap (NONE without predictions)."""
    scores = scorers(gold, tasks) if tasks else None
    if not scores:
        return NONE
    return two_level(preds_of(cells, a, tasks), preds_of(cells, b, tasks), scores)


def judge(seed_only: Interval, both: Interval, goal: float, below: bool) -> str:
    """The one verdict rule (the report, docs/replication.md and the README all print its words): reproduced
    or not reproduced only when the interval over seeds and the one over seeds and test examples agree;
    undetermined when either straddles the goal or they disagree. Without prediction files the seed-only
    verdict stands, marked as such."""
    if seed_only.n < 2:
        return "one seed: no interval"
    first = seed_only.verdict(goal, below)
    if both.n == 0:
        return f"{first} (seed-only: no test predictions)"
    return first if both.verdict(goal, below) == first else "undetermined"


def both_text(seed_only: Interval, both: Interval, of: int | None = None) -> str:
    """The two intervals a finding is judged by, side by side."""
    two = ("no seed has predictions of both" if both.n == 0 else
           f"{both.text()} over seeds and test examples ({both.n} of {of or seed_only.n} seeds have predictions)")
    return f"{seed_only.text()} over seeds; {two}"


@dataclass(frozen=True)
class Finding:
    short: str  # the README's and docs' name for it
    text: str  # the report's, with the paper's figure and the goal
    seed_only: Interval
    both: Interval
    verdict: str
    tasks: tuple[str, ...]

    def line(self, long: bool = True) -> str:
        over = "" if len(self.tasks) == len(TASKS) else f" (over {', '.join(self.tasks)})"
        name = self.text if long else self.short
        return f"- {name}: {both_text(self.seed_only, self.both)}{over}: **{self.verdict}**"


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
            share = share or share_text(rows[0])
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


CHECKS = (  # (short name, the report's text, a, b: the gap a - b, goal, below: whether the paper says gap < goal)
    ("BitFit matches full fine-tuning (goal: full - BitFit < 1.5)",
     "BitFit matches full fine-tuning on average (paper: 82.4 vs 82.3; goal: full - BitFit < 1.5)",
     "full", "bitfit", 1.5, True),
    ("`bq,bm2` comes close to BitFit (goal: BitFit - bq,bm2 < 1.5)",
     "bq + bm2 comes close to BitFit (paper: 81.1 vs 82.4; goal: BitFit - bq,bm2 < 1.5)",
     "bitfit", "bq,bm2", 1.5, True),
    ("the frozen encoder is far below BitFit (goal: BitFit - frozen > 10)",
     "the frozen encoder is far below BitFit (paper: 20 points; goal: BitFit - frozen > 10)",
     "bitfit", "frozen", 10.0, False),
    ("random uniform entries at BitFit's count are below BitFit (goal: > 0)",
     "random parameters at BitFit's count are below BitFit, uniform (paper: 3.9 below; goal: > 0)",
     "bitfit", "rand_uniform", 0.0, False),
    ("random rows/columns at BitFit's count are below BitFit (goal: > 0)",
     "random parameters at BitFit's count are below BitFit, rows/columns (paper: 2.9 below; goal: > 0)",
     "bitfit", "rand_row_col", 0.0, False),
    ("rows/columns beat uniform entries (goal: > 0)",
     "whole rows/columns beat uniform random entries (paper: 79.5 vs 78.5; goal: > 0)",
     "rand_row_col", "rand_uniform", 0.0, False),
)
SIZE_TEXT = ("BitFit leads with little data, full fine-tuning with more (paper: Figures 2-3, BitFit ahead on small "
             "training sets, the trend reversed with more data; goal: BitFit - full > 0 at the smallest size, < 0 at "
             "the largest)")
SIZE_SHORT = ("BitFit leads with little data, full fine-tuning with more (goal: BitFit - full > 0 at the smallest "
              "size, < 0 at the largest)")
GEN_TEXT = "bias-only training overfits less (paper: a smaller train-dev gap; goal: BitFit's gap - full's < 0)"
GEN_SHORT = "bias-only training overfits less (goal: BitFit's train-dev gap - full's < 0)"


def main_findings(cells: dict, gold: Gold | None = None) -> list[Finding]:
    """The paper's Table 3 findings: each gap over the tasks both methods finished, by the one rule."""
    out = []
    for short, text, a, b, goal, below in CHECKS:
        common = tuple(t for t in TASKS if (a, t) in cells and (b, t) in cells)
        if not common:
            out.append(Finding(short, text, NONE, NONE, "not run yet", common))
            continue
        seed_only = paired_gap(seed_average(cells, a, common), seed_average(cells, b, common))
        both = seed_and_test(cells, a, b, common, gold)
        out.append(Finding(short, text, seed_only, both, judge(seed_only, both, goal, below), common))
    return out


def findings(cells: dict, runs: list[dict], gold: Gold | None = None) -> list[str]:
    """One line per finding of the paper: our intervals (over seeds; over seeds and test examples), the paper's
    figure, the verdict by `judge`."""
    return [f.line() if f.seed_only.n else f"- {f.text}: not run yet" for f in main_findings(cells, gold)] \
        + size_and_generalisation(cells, runs, gold, long=True)


def size_and_generalisation(cells: dict, runs: list[dict], gold: Gold | None, long: bool) -> list[str]:
    out = []
    curve = {t: g for t, g in size_gaps(runs).items() if g}
    if curve:
        tests = size_tests(runs, gold)
        per_task = []
        for t, g in curve.items():
            ends = curve_ends(g)
            goals = {ends[0]: False, ends[-1]: True}  # BitFit ahead (> 0) at the smallest, behind at the largest
            parts = [f"{n} examples {both_text(g[n], tests[t].get(n, NONE))} ({'full' if goals[n] else 'BitFit'} "
                     f"ahead: {judge(g[n], tests[t].get(n, NONE), 0.0, goals[n])})" for n in ends]
            trend = size_slope(runs, t)
            per_task.append(f"{t}: " + "; ".join(parts) + f": **{data_size_verdict(g, tests[t])}**; trend of "
                            f"BitFit - full {trend.text()} points per doubling of the data (over seeds)")
        out.append(f"- {SIZE_TEXT if long else SIZE_SHORT}: BitFit - full " + "; ".join(per_task))
    gen = generalisation(cells)
    if gen.n:
        verdict = gen.verdict(0.0, True) if gen.n > 1 else "one seed"
        out.append(f"- {GEN_TEXT if long else GEN_SHORT}: {gen.text()} points over seeds (train and dev metrics: no "
                   f"test predictions involved), **{verdict}**")
    return out


def size_tests(runs: list[dict], gold: Gold | None) -> dict[str, dict[int, Interval]]:
    """BitFit - full per task and size over seeds and test examples, from the prediction files."""
    out: dict[str, dict[int, Interval]] = defaultdict(dict)
    for t in SIZE_TASKS:
        for n in SIZES:
            e = epochs_for(n)
            cells = {(m, t): at_best(runs, m, t, n, e) for m in ("bitfit", "full")}
            if all(cells.values()):
                out[t][n] = seed_and_test(cells, "bitfit", "full", (t,), gold)
    return out


def size_slope(runs: list[dict], task: str) -> Interval:
    """The trend of BitFit - full with data on one task: least-squares slope of the per-seed gaps on log2 of
    the training-set size, points per doubling, with its t interval (every seed at every size counts)."""
    points = []
    for n in SIZES:
        e = epochs_for(n)
        b, f = by_seed(at_best(runs, "bitfit", task, n, e)), by_seed(at_best(runs, "full", task, n, e))
        points += [(n, b[s] - f[s]) for s in sorted(set(b) & set(f))]
    return slope(points)


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
    """Full fine-tuning minus BitFit per task: over seeds (every seed run), and over seeds and test examples
    (the seeds with prediction files of both), with the one rule's verdict against 0."""
    lines = ["| task | full - BitFit over seeds | over seeds and test examples | seeds with predictions | verdict |",
             "|---|---|---|---|---|"]
    words = {"reproduced": "full ahead", "not reproduced": "BitFit ahead", "undetermined": "not separable"}
    for t in TASKS:
        if ("full", t) not in cells or ("bitfit", t) not in cells:
            continue
        seed_only = paired_gap(by_seed(cells[("full", t)]), by_seed(cells[("bitfit", t)]))
        both = seed_and_test(cells, "full", "bitfit", (t,), gold)
        verdict = judge(seed_only, both, 0.0, below=False)
        word = words.get(verdict.split(" (")[0], verdict)
        lines.append(f"| {t} | {seed_only.text()} | {both.text() if both.n else 'no predictions'} | "
                     f"{both.n} of {seed_only.n} | {word} |")
    return lines


def coverage(cells: dict, methods) -> tuple[list[str], int, int]:
    """Which runs of the tables have test predictions: per method and task the seeds with a file, and the
    others marked "metric only" (they predate saved predictions; their logged metric is all there is)."""
    lines = ["| method | " + " | ".join(TASKS) + " |", "|" + "---|" * (len(TASKS) + 1)]
    have = total = 0
    for m in methods:
        row = []
        for t in TASKS:
            rows = cells.get((m, t), [])
            with_file = sorted(r["seed"] for r in rows if predictions_path(r).is_file())
            without = sorted(r["seed"] for r in rows if r["seed"] not in with_file)
            have, total = have + len(with_file), total + len(rows)
            row.append("-" if not rows else f"{len(with_file)} of {len(rows)}"
                       + (f" (metric only: seeds {', '.join(map(str, without))})" if without else ""))
        lines.append(f"| {LABEL[m]} | " + " | ".join(row) + " |")
    return lines, have, total


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


def data_size_verdict(gaps: dict[int, Interval], tests: dict[int, Interval] | None = None) -> str:
    """The paper's data-size trend on one task is two claims: BitFit ahead with the least data (BitFit - full > 0)
    and full fine-tuning ahead with the most (< 0). Each end is judged by `judge` (over seeds, and over seeds
    and test examples where `tests` has predictions); the trend is reproduced when both ends are, not
    reproduced when either end's intervals lie on the wrong side, undetermined otherwise."""
    ends = curve_ends(gaps)
    if len(ends) < 2 or any(gaps[n].n < 2 for n in ends):
        return "undetermined (needs two sizes with 2+ seeds)"
    tests = tests or {}
    parts = [judge(gaps[n], tests.get(n, NONE), 0.0, below=n == ends[-1]).split(" (")[0] for n in ends]
    if all(p == "reproduced" for p in parts):
        return "reproduced"
    return "not reproduced" if "not reproduced" in parts else "undetermined"


def size_curve(runs: list[dict], gold: Gold | None = None) -> tuple[list[str], dict]:
    """BitFit vs full fine-tuning per size: means, and the seed-paired difference with its intervals (over
    seeds; over seeds and test examples), judged against 0 by the one rule."""
    lines = ["| task | examples | epochs | BitFit | full | BitFit - full over seeds | over seeds and test examples "
             "| verdict |", "|---|---|---|---|---|---|---|---|"]
    points = defaultdict(dict)
    gaps, tests = size_gaps(runs), size_tests(runs, gold)
    words = {"reproduced": "BitFit ahead", "not reproduced": "full ahead", "undetermined": "not separable"}
    for t in SIZE_TASKS:
        for n in SIZES:
            e = epochs_for(n)
            b, f = at_best(runs, "bitfit", t, n, e), at_best(runs, "full", t, n, e)
            if n not in gaps[t]:
                lines.append(f"| {t} | {n} | {e} | {'-' if not b else t_interval(list(by_seed(b).values())).text()} | "
                             f"{'-' if not f else t_interval(list(by_seed(f).values())).text()} | | | not run yet |")
                continue
            bi, fi = t_interval(list(by_seed(b).values())), t_interval(list(by_seed(f).values()))
            d, both = gaps[t][n], tests[t].get(n, NONE)
            verdict = judge(d, both, 0.0, below=False)
            word = words.get(verdict.split(" (")[0], verdict) + (" (seed-only)" if "seed-only" in verdict else "")
            points[t][n] = (bi, fi)
            lines.append(f"| {t} | {n} | {e} | {bi.text()} | {fi.text()} | {d.text()} | "
                         f"{both.text() if both.n else 'no predictions'} | {word} |")
    trends = [f"{t} {size_slope(runs, t).text()}" for t in SIZE_TASKS if gaps[t]]
    if trends:
        lines += ["", "Trend of BitFit - full with data, least-squares slope per doubling of the training set over "
                  "every seed at every size (a negative slope: BitFit falls further behind with more data, the "
                  "paper's direction for the large end): " + "; ".join(trends)]
    return lines, points


def per_task_gaps(cells: dict, a: str, b: str, gold: Gold | None = None) -> str:
    """a - b on each task both have finished ('' when none): over seeds, and over seeds and test examples."""
    return "; ".join(f"{t} " + both_text(paired_gap(by_seed(cells[(a, t)]), by_seed(cells[(b, t)])),
                                         seed_and_test(cells, a, b, (t,), gold))
                     for t in TASKS if (a, t) in cells and (b, t) in cells)


def detected(cells: dict, a: str, b: str, gold: Gold | None) -> str:
    """Whether a - b differs from 0 on any task by the one rule; when not, how wide the seed intervals were:
    "not detected" is as strong as the intervals are narrow, never "explains nothing"."""
    found, halves = [], []
    for t in TASKS:
        if (a, t) in cells and (b, t) in cells:
            seed_only = paired_gap(by_seed(cells[(a, t)]), by_seed(cells[(b, t)]))
            verdict = judge(seed_only, seed_and_test(cells, a, b, (t,), gold), 0.0, below=False).split(" (")[0]
            halves.append(seed_only.half)
            if verdict != "undetermined":
                found.append(t)
    if not halves:
        return ""
    if found:
        return f"a difference detected on {', '.join(found)}"
    return (f"no difference detected on any of {len(halves)} tasks (intervals over seeds of "
            f"+-{min(halves):.1f} to +-{max(halves):.1f} points: an effect that size is not excluded)")


def controls(cells_main: dict, cells_ctl: dict, gold: Gold | None = None) -> list[str]:
    lines = []
    pairs = [("bitfit_constlr", "bitfit", "BitFit at a constant LR (the authors' schedule) minus BitFit with "
                                          "warm-up and linear decay"),
             ("rand_row_col_authors", "rand_row_col", "random rows/columns the authors' way minus ours")]
    merged = {**cells_main, **cells_ctl}
    for a, b, text in pairs:
        gap = paired_gap(seed_average(merged, a), seed_average(merged, b))
        per_task = per_task_gaps(merged, a, b, gold)
        if gap.n:
            lines.append(f"- {text}: {gap.text()} points (4-task average, paired by seed); "
                         f"{detected(merged, a, b, gold)}")
        elif per_task:  # a control finished on some tasks: its gap there, never passed off as the average
            lines.append(f"- {text}, per task (paired by seed; the other tasks not run yet): {per_task}; "
                         f"{detected(merged, a, b, gold)}")
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


# -- robustness of the LR choices, and what is still to run -------------------------------------------------
def mean_dev_lr(runs: list[dict], method: str, task: str, train_size: int = TRAIN_SIZE, epochs: int = EPOCHS,
                model: str = "minilm") -> float | None:
    """The LR with the best dev score averaged over every seed run at it (most LRs have seed 0 only; ties: the
    smaller LR), among those the search tried; None while the search is unfinished."""
    chosen, _, tried = search(runs, method, task, train_size, epochs, model)
    if chosen is None:
        return None
    dev = {lr: float(np.mean([r["dev_metric"] for r in runs if r["lr"] == lr and r["method"] == method
                              and r["task"] == task and r["train_size"] == train_size and r["epochs"] == epochs
                              and r.get("model", "minilm") == model])) for lr in tried}
    return max(sorted(dev), key=lambda lr: dev[lr])


def robustness(runs: list[dict], cells: dict) -> list[str]:
    """The headline (full - BitFit, 4-task average, paired by seed) with each LR chosen by mean dev over seeds
    instead of seed 0's dev: how much the headline leans on choices decided by a dev example or two."""
    alt, moved = {}, []
    for m in ("full", "bitfit"):
        for t in TASKS:
            lr = mean_dev_lr(runs, m, t)
            if lr is None:
                return []
            alt[(m, t)] = [r for r in runs if r["lr"] == lr and r["method"] == m and r["task"] == t
                           and r["train_size"] == TRAIN_SIZE and r["epochs"] == EPOCHS
                           and r.get("model", "minilm") == "minilm"]
            if (m, t) in cells and lr != cells[(m, t)][0]["lr"]:
                moved.append(f"{LABEL[m]} on {t} {cells[(m, t)][0]['lr']:g} -> {lr:g} "
                             f"(seeds run there: {len(alt[(m, t)])})")
    gap = paired_gap(seed_average(alt, "full"), seed_average(alt, "bitfit"))
    base = paired_gap(seed_average(cells, "full"), seed_average(cells, "bitfit"))
    return [f"- Robustness of the headline: with every LR chosen by mean dev over the seeds run at it instead of "
            f"seed 0's dev, full - BitFit is {gap.text()} over seeds (seed-0 choice: {base.text()}); LRs that move: "
            + ("; ".join(moved) if moved else "none")]


def knife_edges(runs: list[dict], methods=(*METHODS, *CONTROLS)) -> list[tuple[str, str, int, float, float]]:
    """(method, task, size, the tied top LR, the next ladder step) of every search whose best seed-0 dev is
    tied with the highest LR it tried: the tie went to the smaller LR, so whether the top of the grid is really
    past the peak is untested; one step more settles it."""
    out = []
    for m in methods:
        ladder = LADDER[family(m)]
        for t in TASKS:
            for n in SIZES:
                tried = {r["lr"]: r["dev_metric"] for r in runs if r["seed"] == 0 and r["method"] == m
                         and r["task"] == t and r["train_size"] == n and r["epochs"] == epochs_for(n)
                         and r.get("model", "minilm") == "minilm"}
                chosen = search(runs, m, t, n, epochs_for(n))[0]
                if chosen is None or len(tried) < 2:
                    continue
                top = max(tried)
                if top != chosen and abs(tried[top] - tried[chosen]) < 1e-9 and top in ladder \
                        and ladder.index(top) + 1 < len(ladder):
                    out.append((m, t, n, top, ladder[ladder.index(top) + 1]))
    return out


RERUNS = "reruns.jsonl"  # replicate.py rerun-sample's log: a metric-only row run again, logged vs re-run


def seconds_for(runs: list[dict], method: str, task: str, size: int, epochs: int, model: str = "minilm") -> float:
    """The mean time of the logged runs of that cell (any LR, any seed): an estimate of one more run there."""
    same = [r["seconds"] for r in runs if "seconds" in r and r["method"] == method and r["task"] == task
            and r["train_size"] == size and r["epochs"] == epochs and r.get("model", "minilm") == model]
    return float(np.mean(same)) if same else float("nan")


def pending(runs: list[dict], reruns: list[dict]) -> list[tuple[str, list[dict], str]]:
    """What items 3, 4 and 6 of issue 28 still need: (what, the run specs, the command that runs them). Each
    spec carries its estimated seconds (`seconds_for`)."""
    done = {tuple(r[k] for k in ("method", "task", "seed", "lr", "epochs", "train_size")) for r in reruns}
    sample = [r for t in TASKS for m in ("bitfit", "full") for r in at_best(runs, m, t)
              if r["seed"] == 0 and not predictions_path(r).is_file()
              and tuple(r[k] for k in ("method", "task", "seed", "lr", "epochs", "train_size")) not in done]
    edges = [{"method": m, "task": t, "seed": 0, "lr": nxt, "epochs": epochs_for(n), "train_size": n,
              "model": "minilm"} for m, t, n, _, nxt in knife_edges(runs)]
    mp = []
    for t in SIZE_TASKS:
        for m in ("bitfit", "full"):
            lr = base_search(runs, m, t)[0]
            have = {r["seed"] for r in runs if r.get("model") == "mpnet" and r["method"] == m and r["task"] == t
                    and r["lr"] == lr}
            mp += [{"method": m, "task": t, "seed": s, "lr": lr, "epochs": EPOCHS, "train_size": TRAIN_SIZE,
                    "model": "mpnet"} for s in SEEDS if lr is not None and s not in have]
    out = []
    for what, specs, command in (
            ("item 3: BitFit and full fine-tuning at seed 0 on every task, re-run to check they reproduce their "
             "logged metric (and to give them predictions)", sample, "rerun-sample"),
            ("item 4: one LR step above each tied top of a grid (seed 0; then `grid`, `controls` or `sizes` runs "
             "the seeds if the choice moves)", edges, "edges"),
            ("item 6: seeds 1-2 at the four chosen all-mpnet-base-v2 points", mp, "mpnet-seeds")):
        for sp in specs:
            sp["estimated_seconds"] = seconds_for(runs, sp["method"], sp["task"], sp["train_size"], sp["epochs"],
                                                  sp.get("model", "minilm"))
        out.append((what, specs, command))
    return out


def pending_lines(runs: list[dict], reruns: list[dict]) -> list[str]:
    lines = []
    for what, specs, command in pending(runs, reruns):
        if not specs:
            lines.append(f"- {what}: none left")
            continue
        hours = sum(s["estimated_seconds"] for s in specs) / 3600
        lines.append(f"- {what}: {len(specs)} runs, about {hours:.1f} CPU-hours on these 2 cores (the mean time of "
                     f"the logged runs of each cell); `python experiments/replicate.py {command}`")
        lines += [f"  - {s.get('model', 'minilm')} {s['method']} {s['task']} {s['train_size']} examples "
                  f"{s['epochs']} epochs "
                  f"seed {s['seed']} lr {s['lr']:g} (~{s['estimated_seconds'] / 60:.0f} min)" for s in specs]
    return lines


def rerun_lines(reruns: list[dict]) -> list[str]:
    if not reruns:
        return ["No metric-only row has been re-run yet (`replicate.py rerun-sample`; see Pending runs)."]
    same = [r for r in reruns if abs(r["logged_test"] - r["rerun_test"]) < 0.01]
    return [f"{len(same)} of {len(reruns)} re-run metric-only rows reproduced their logged test metric to 0.01:"] + [
        f"- {r['method']} {r['task']} seed {r['seed']} lr {r['lr']:g}: logged {r['logged_test']:.2f}, re-run "
        f"{r['rerun_test']:.2f}" for r in reruns]


# -- the words shared by table.md, docs/replication.md and the README ---------------------------------------
def markers(name: str = "findings") -> tuple[str, str]:
    """The comment pair around a generated block of a doc: `splice` rewrites what lies between them."""
    return (f"<!-- replication {name}: generated by experiments/replicate.py report -->",
            f"<!-- end of the generated {name} -->")


BEGIN, END = markers()


def shared_block(cells: dict, runs: list[dict], gold: Gold | None) -> str:
    """The findings in the words docs/replication.md and the README both carry (`splice` writes them there)."""
    found = main_findings(cells, gold)
    lines = [f"Model: {MODEL_NOTE}. Each finding with the intervals it is judged by (95%; over seeds, and over "
             "seeds and test examples from the saved predictions); verdict: reproduced or not reproduced only when "
             "both intervals agree, undetermined otherwise.", ""]
    lines += [f.line(long=False) for f in found if f.seed_only.n]
    lines += size_and_generalisation(cells, runs, gold, long=False)
    lines += base_size_short(runs, gold)
    return "\n".join(wrap(line) for line in lines)


def wrap(line: str, width: int = 110) -> str:
    """A markdown paragraph or list item at the docs' line width (a list item's lines indented under it)."""
    if not line:
        return line
    return textwrap.fill(line, width, subsequent_indent="  " if line.startswith("- ") else "",
                         break_long_words=False, break_on_hyphens=False)


def splice(path: Path, block: str, name: str = "findings") -> None:
    """Put `block` between the `markers(name)` of `path` (a doc or the README); refuses a file without exactly
    one pair, so a hand edit that lost them fails loudly instead of leaving stale words."""
    begin, end = markers(name)
    text = path.read_text()
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"{path} needs exactly one {begin!r} ... {end!r} pair: put them back around its {name}")
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    path.write_text(f"{head}{begin}\n{block}\n{end}{tail}")


def block_of(path: Path, name: str = "findings") -> str:
    begin, end = markers(name)
    text = path.read_text()
    return text.split(begin)[1].split(end)[0].strip("\n") if begin in text else ""


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
        share = share_text(cells[(method, done[0])][0])
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


def write_report(runs: list[dict], out: Path, gold: Gold | None = None, serving: Path | None = SERVING,
                 docs: tuple[Path, ...] = (), reruns: list[dict] | None = None) -> None:
    """table.md, summary.json and the plots into `out`; the shared findings into each of `docs` (between
    their markers: `splice`). Runs outside the protocol (`in_protocol`) are listed and left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    gold = lru_cache(maxsize=None)(gold if gold is not None else builtin_gold)  # one data load per task
    everything, runs = runs, [r for r in runs if in_protocol(r)]
    cells = final(runs)
    cells_ctl = final(runs, CONTROLS)
    cells_lora = final(runs, tuple(LORA_METHODS))
    curve_lines, points = size_curve(runs, gold)
    block = shared_block(cells, runs, gold)
    found = findings(cells, runs, gold)  # once: table.md and summary.json both print them (bootstraps are slow)
    coverage_lines, have, total = coverage({**cells, **cells_ctl, **cells_lora}, (*METHODS, *CONTROLS, *LORA_METHODS))
    text = [
        "# Replication on all-MiniLM-L6-v2 (not BERT-base, not GLUE)",
        "",
        f"Test metric in percent (accuracy; SMS spam: F1 of spam; movie-score: Spearman) at the LR the dev search "
        f"chose (seed 0); mean [95% interval over seeds] (n seeds). {TRAIN_SIZE} training examples, {EPOCHS} epochs, "
        f"batch 16, max length 64. The average's interval is over seeds of the 4-task average. "
        f"{stray_note(everything)} params: trainable parameters (the head included) over the encoder's.",
        "",
        f"Model: {MODEL_NOTE}.",
        "",
        table(cells),
        "",
        "## Findings of the paper",
        "",
        "Each finding with two 95% intervals: over seeds (Student's t on the seed-paired differences, every seed "
        "run), and over seeds and test examples (a two-level bootstrap from the saved predictions: seeds drawn "
        "with replacement, and the test examples resampled, the same for both methods and every seed; only seeds "
        "with prediction files of both methods on every task count, and the line says how many). The verdict "
        "rule: reproduced, or not reproduced, only when both intervals lie on the same side of the goal; "
        "undetermined otherwise; where no seed has predictions the seed-only verdict is marked as such.",
        "",
        *found,
        *robustness(runs, cells),
        "",
        "Per task, full fine-tuning minus BitFit, judged against 0 by the same rule:",
        "",
        *paired_tests(cells, gold),
        "",
        "The same findings in the words docs/replication.md and the README carry:",
        "",
        block,
        "",
        f"## Test predictions on file ({have} of {total} runs of the tables; the rest are metric only)",
        "",
        "Runs made before predictions were saved have only their logged metric (\"metric only\"): every "
        "interval over seeds and test examples uses the seeds with a file, and says how many.",
        "",
        *coverage_lines,
        "",
        *rerun_lines(reruns or []),
        "",
        "## Final LR grids (bold: chosen; the search moved any grid whose best was at its edge)",
        "",
        grids(runs),
        "",
        "Ties for the best seed-0 dev score whose tied LR is the top of the grid tried (the tie went to the smaller "
        "LR, so the top is untested; one more step each, pending): "
        + ("; ".join(f"{LABEL[m]} on {t} at {n:,} examples ({top:g} tied; next {nxt:g})"
                     for m, t, n, top, nxt in knife_edges(runs)) or "none") + ".",
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
        *controls(cells, cells_ctl, gold),
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
    text += base_size(runs, gold)
    text += ["", "## Pending runs (issue 28, items 3, 4 and 6)", "", *pending_lines(runs, reruns or [])]
    (out / "table.md").write_text("\n".join(text) + "\n")
    waiting = "\n".join(wrap(line) for line in pending_lines(runs, reruns or []))
    for doc in docs:  # the findings into each; the pending runs into those that hold a place for them
        splice(doc, block)
        if markers("pending runs")[0] in doc.read_text():
            splice(doc, waiting, "pending runs")
    summary = {"runs": len(everything), "in_protocol": len(runs), "findings": found,
               "shared": block}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n".join(text))
    print(f"wrote {out / 'table.md'}")


BASE_GOAL = CHECKS[0]  # the headline's words and goal, asked per task at base size


def base_cells(runs: list[dict]) -> dict[str, dict[tuple[str, str], list[dict]]]:
    """Task -> {(method, task): the all-mpnet-base-v2 runs at the chosen LR, every seed}, for the tasks whose
    two searches are finished (no gap at a half-searched LR: there a run may have diverged to chance level)."""
    mp = [r for r in runs if r.get("model") == "mpnet"]
    out = {}
    for t in SIZE_TASKS:
        chosen = {m: base_search(runs, m, t)[0] for m in ("bitfit", "full")}
        if None not in chosen.values():
            out[t] = {(m, t): [r for r in mp if (r["method"], r["task"], r["lr"]) == (m, t, lr)]
                      for m, lr in chosen.items()}
    return out


def base_gap(cells: dict, task: str, gold: Gold | None = None) -> tuple[Interval, Interval, str]:
    """full - BitFit at base size on one task: over seeds, over seeds and test examples, and the verdict by
    the headline's goal and the one rule."""
    _, _, a, b, goal, below = BASE_GOAL
    seed_only = paired_gap(by_seed(cells[a, task]), by_seed(cells[b, task]))
    both = seed_and_test(cells, a, b, (task,), gold)
    return seed_only, both, judge(seed_only, both, goal, below)


def base_size(runs: list[dict], gold: Gold | None = None) -> list[str]:
    """all-mpnet-base-v2 beside MiniLM: every run of its LR search (protocol.base_search, seed 0), and full -
    BitFit per task at the chosen LRs once both searches are finished, over the seeds run there (a run is
    3-5x MiniLM's on the 2 CPU cores, so seeds 1-2 only at the chosen points)."""
    mp = sorted((r for r in runs if r.get("model") == "mpnet"), key=lambda r: (r["task"], r["method"], r["lr"]))
    if not mp:
        return []
    cells = {(m, t) for m in ("bitfit", "full") for t in SIZE_TASKS} | {(r["method"], r["task"]) for r in mp}
    search = {(m, t): base_search(runs, m, t) for m, t in cells}  # once per cell, not per row
    minilm = {(m, t): (best_lr(runs, m, t), by_seed(at_best(runs, m, t))) for m, t in cells}  # likewise
    lines = ["", "## all-mpnet-base-v2 (base size, 109M; LR searched at seed 0 from MiniLM's choice and the step "
             "below it, off the edges; seeds 1-2 at the chosen LRs)", "",
             "| method | task | LR | dev | test | MiniLM's LR, its test at seed 0 | seconds | |",
             "|---|---|---|---|---|---|---|---|"]
    for r in (r for r in mp if r["seed"] == 0):  # the search's runs; seeds 1-2 enter the gap below
        m, t = r["method"], r["task"]
        chosen, _, tried = search[m, t]
        lr, mini = minilm[m, t][0], minilm[m, t][1].get(0)
        mark = "" if r["lr"] != chosen else "chosen, at an edge" if r["lr"] in (tried[0], tried[-1]) else "chosen"
        lines.append(f"| {LABEL[m]} | {t} | {r['lr']:g} | {r['dev_metric']:.2f} | {r['test_metric']:.2f} | "
                     f"{'-' if mini is None else f'{lr:g}: {mini:.2f}'} | {r['seconds']:.0f} | {mark} |")
    finished = base_cells(runs)
    gaps = []
    for t in SIZE_TASKS:
        if t not in finished:
            if any(r["task"] == t for r in mp):
                gaps.append(f"{t}: LR search not finished")
            continue
        seed_only, both, verdict = base_gap(finished[t], t, gold)
        mini = paired_gap(minilm["full", t][1], minilm["bitfit", t][1])
        gaps.append(f"{t} {both_text(seed_only, both)}: **{verdict}** (MiniLM, over seeds: {mini.text()})")
    lines += ["", f"At the chosen LRs, paired by seed, {BASE_GOAL[0]}: " + "; ".join(gaps)]
    return lines


def base_size_short(runs: list[dict], gold: Gold | None = None) -> list[str]:
    """The base-size line of the shared findings: the headline's question asked per task at base size."""
    parts = []
    for t, cells in base_cells(runs).items():
        seed_only, both, verdict = base_gap(cells, t, gold)
        parts.append(f"{t} {both_text(seed_only, both)}: **{verdict}**")
    if not parts:
        return []
    return [f"- at base size (all-mpnet-base-v2), per task, {BASE_GOAL[0]}: " + "; ".join(parts)]


def builtin_gold(task: str) -> tuple[np.ndarray, str, int]:
    from bitfit.training.data import load_builtin

    data = load_builtin(task)
    return data.targets(data.test), data.metric, max(len(data.labels), 1)
