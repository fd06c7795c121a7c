"""Task metrics (training.metrics), checked against scipy and by hand."""
from __future__ import annotations

import numpy as np
import pytest
from bitfit.training import metrics
from scipy import stats


def test_spearman_and_pearson_match_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=50)
    b = a + rng.normal(scale=0.5, size=50)
    ties = np.round(b)  # ties get their mean rank
    assert metrics.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic * 100)
    assert metrics.spearman(a, ties) == pytest.approx(stats.spearmanr(a, ties).statistic * 100)
    assert metrics.pearson(a, b) == pytest.approx(stats.pearsonr(a, b).statistic * 100)
    assert metrics.spearman(a, np.exp(a)) == pytest.approx(100.0)
    assert metrics.pearson(a, np.zeros(50)) == 0.0  # constant: defined as 0, not NaN


def test_accuracy_and_f1():
    gold = np.array([1, 1, 0, 0, 1, 0])
    pred = np.array([1, 0, 0, 1, 1, 0])
    assert metrics.accuracy(pred, gold) == pytest.approx(100 * 4 / 6)
    assert metrics.f1(pred, gold, 2) == pytest.approx(100 * 2 * 2 / (2 * 2 + 1 + 1))  # class 1: tp 2, fp 1, fn 1
    three_gold, three_pred = np.array([0, 1, 2, 2]), np.array([0, 2, 2, 2])
    per_class = [1.0, 0.0, 2 * 2 / (2 * 2 + 1)]
    assert metrics.f1(three_pred, three_gold, 3) == pytest.approx(100 * np.mean(per_class))


def test_evaluate_picks_outputs_by_task_kind():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    out = metrics.evaluate("accuracy", logits, np.array([1, 0, 0]))
    assert out["accuracy"] == pytest.approx(100 * 2 / 3) and "f1" in out
    values = np.array([[0.1], [0.5], [0.9]])
    out = metrics.evaluate("spearman", values, np.array([1.0, 2.0, 3.0]))
    assert out["spearman"] == pytest.approx(100.0)
    assert out["mse"] == pytest.approx(np.mean((values[:, 0] - [1, 2, 3]) ** 2))
