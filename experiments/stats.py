"""The replication's statistics: intervals over seeds, seed-paired gaps, paired bootstraps over test examples.

Every interval is a 95% one. Over seeds: Student's t on the seed means (n is small: 3 to 5). Between two
methods: seeds are paired (seed s fixes the data order and the head's initialisation for every method),
so a gap's interval is the t interval of the per-seed differences. On one task, from the saved test
predictions: a paired bootstrap over test examples, the same resampled examples scored for both methods,
averaged over the seeds both have.
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
        if self.n < 2 or not math.isfinite(self.half):
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


def paired_bootstrap(a: dict[int, np.ndarray], b: dict[int, np.ndarray], gold: np.ndarray,
                     score: Callable[[np.ndarray, np.ndarray], float], rounds: int = 2000,
                     seed: int = 0) -> tuple[Interval, float]:
    """(interval of score(a) - score(b) averaged over the seeds both have, resampling test examples; the
    two-sided bootstrap p-value of no difference)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return Interval(float("nan"), float("nan"), float("nan"), 0), float("nan")
    rng = np.random.default_rng(seed)
    n = len(gold)
    observed = float(np.mean([score(a[s], gold) - score(b[s], gold) for s in seeds]))
    draws = np.empty(rounds)
    for i in range(rounds):
        idx = rng.integers(0, n, n)
        draws[i] = np.mean([score(a[s][idx], gold[idx]) - score(b[s][idx], gold[idx]) for s in seeds])
    low, high = np.percentile(draws, [2.5, 97.5])
    p = float(min(1.0, 2 * min((draws <= 0).mean(), (draws >= 0).mean())))
    return Interval(observed, float(low), float(high), len(seeds)), p


def kendall_tau(first: Sequence[float], second: Sequence[float]) -> float:
    return float(sp.kendalltau(first, second).statistic)
