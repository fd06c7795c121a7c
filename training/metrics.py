"""Task metrics in percent, with numpy only."""
from __future__ import annotations

import numpy as np


def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    return float((pred == gold).mean() * 100)


def f1(pred: np.ndarray, gold: np.ndarray, num_classes: int) -> float:
    """Binary: F1 of class 1 (the positive class: 'spam', 'positive'). More classes: macro F1."""
    classes = [1] if num_classes == 2 else range(num_classes)
    scores = []
    for c in classes:
        tp = float(((pred == c) & (gold == c)).sum())
        fp = float(((pred == c) & (gold != c)).sum())
        fn = float(((pred != c) & (gold == c)).sum())
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores) * 100)


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    # ties share their mean rank
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1] * 100)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return pearson(_ranks(np.asarray(a, float)), _ranks(np.asarray(b, float)))


def evaluate(metric: str, outputs: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """All metrics for a task kind; `metric` names the one that picks the best epoch."""
    if metric == "spearman":
        pred = outputs[:, 0]
        return {"spearman": spearman(pred, gold), "pearson": pearson(pred, gold), "mse": float(((pred - gold) ** 2).mean())}
    pred = outputs.argmax(axis=-1)
    return {"accuracy": accuracy(pred, gold), "f1": f1(pred, gold, outputs.shape[-1])}
