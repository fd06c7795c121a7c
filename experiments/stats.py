"""The replication's statistics: intervals over seeds, seed-paired gaps, paired bootstraps over test examples.

Every interval is a 95% one. Over seeds: Student's t on the seed means (n is small: 3 to 5). Between two
methods: seeds are paired (seed s fixes the data order and the head's initialisation for every method),
so a gap's interval is the t interval of the per-seed differences. That interval treats each test set as
fixed; `two_level` adds the test set's own sampling: from the saved test predictions, a bootstrap that
resamples seeds and, within each round, test examples (the same examples for both methods and every seed:
all of them were scored on the one test set), so both sources of chance are in it. `slope` is the trend of
a per-seed gap against log2 of the data size.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from bitfit.training import metrics as M
from scipy import stats as sp


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int

    @property
    def half(self) -> float:
        return (self.high - self.low) / 2

    def text(self, digits: int = 2) -> str:
        # one seed has no interval over seeds (t), but the two-level bootstrap still resamples its test examples:
        # whatever interval a verdict is judged by is printed
        if self.n < 1 or not math.isfinite(self.half):
            return f"{self.mean:.{digits}f} (n={self.n})"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}] (n={self.n})"

    def verdict(self, goal: float, below: bool) -> str:
        """Whether the interval supports `value < goal` (below=True) or `value > goal`: reproduced when all of
        it is on the goal's side, not reproduced when all of it is on the other, undetermined otherwise."""
        inside = self.high < goal if below else self.low > goal
        outside = self.low > goal if below else self.high < goal
        return "reproduced" if inside else "not reproduced" if outside else "undetermined"


def t_interval(values: Sequence[float]) -> Interval:
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    if n == 1:
        return Interval(float(x[0]), float("nan"), float("nan"), 1)
    half = float(sp.t.ppf(0.975, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return Interval(float(x.mean()), float(x.mean() - half), float(x.mean() + half), n)


def paired_gap(a: dict[int, float], b: dict[int, float]) -> Interval:
    """a - b over the seeds both have, paired by seed."""
    seeds = sorted(set(a) & set(b))
    return t_interval([a[s] - b[s] for s in seeds])


def metric_fn(metric: str, num_classes: int) -> Callable[[np.ndarray, np.ndarray], float]:
    """The task's metric on saved predictions (labels, or values for regression), in percent."""
    if metric == "spearman":
        return lambda pred, gold: M.spearman(pred, gold)
    if metric == "f1":
        return lambda pred, gold: M.f1(pred, gold, num_classes)
    return lambda pred, gold: M.accuracy(pred, gold)


Preds = dict[str, dict[int, np.ndarray]]  # task -> seed -> the test predictions of one run
Gold = dict[str, tuple[np.ndarray, Callable[[np.ndarray, np.ndarray], float]]]  # task -> (test gold, metric)
NONE = Interval(float("nan"), float("nan"), float("nan"), 0)


def paired_seeds(a: Preds, b: Preds, tasks) -> list[int]:
    """The seeds with predictions of both methods on every one of `tasks` (a task average needs them all)."""
    sets = [set(a.get(t, {})) & set(b.get(t, {})) for t in tasks]
    return sorted(set.intersection(*sets)) if sets else []


def two_level(a: Preds, b: Preds, gold: Gold, rounds: int = 2000, seed: int = 0) -> Interval:
    """a - b averaged over the tasks of `gold` and over the seeds both have on all of them, with a 95%
    percentile interval from a two-level bootstrap: each round draws the seeds with replacement, and for
    each task one resample of its test examples, scored for both methods and every drawn seed (paired by
    seed between the methods, and by example: one test set). n is the number of seeds; NONE without any.
    Deterministic for a given `seed`. With 2 or 3 seeds the seed level of a bootstrap is coarse (it cannot
    widen for a small sample as Student's t does): read it beside the seed-only interval, not instead."""
    tasks = sorted(gold)
    seeds = paired_seeds(a, b, tasks)
    if not seeds:
        return NONE

    def diff(s: int, t: str, idx: np.ndarray | None) -> float:
        truth, score = gold[t]
        pick = slice(None) if idx is None else idx
        return score(a[t][s][pick], truth[pick]) - score(b[t][s][pick], truth[pick])

    observed = float(np.mean([np.mean([diff(s, t, None) for t in tasks]) for s in seeds]))
    rng = np.random.default_rng(seed)
    draws = np.empty(rounds)
    for i in range(rounds):
        drawn = rng.choice(seeds, len(seeds))
        per_task = []
        for t in tasks:
            idx = rng.integers(0, len(gold[t][0]), len(gold[t][0]))
            by = {s: diff(s, t, idx) for s in set(drawn.tolist())}  # a seed drawn twice is scored once
            per_task.append(np.mean([by[s] for s in drawn]))
        draws[i] = np.mean(per_task)
    low, high = np.percentile(draws, [2.5, 97.5])
    return Interval(observed, float(low), float(high), len(seeds))


def slope(points: Sequence[tuple[float, float]]) -> Interval:
    """Least-squares slope of y on log2(x) (so: per doubling of x) over (x, y) points, with its 95% t
    interval (n - 2 degrees of freedom); n is the number of points."""
    x = np.log2(np.asarray([p[0] for p in points], float))
    y = np.asarray([p[1] for p in points], float)
    n = len(x)
    if n < 3 or np.ptp(x) == 0:
        return Interval(float("nan"), float("nan"), float("nan"), n)
    xc = x - x.mean()
    b = float((xc * (y - y.mean())).sum() / (xc ** 2).sum())
    resid = y - y.mean() - b * xc
    se = math.sqrt(float((resid ** 2).sum()) / (n - 2) / float((xc ** 2).sum()))
    half = float(sp.t.ppf(0.975, n - 2)) * se
    return Interval(b, b - half, b + half, n)


def kendall_tau(first: Sequence[float], second: Sequence[float]) -> float:
    return float(sp.kendalltau(first, second).statistic)
