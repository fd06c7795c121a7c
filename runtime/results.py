"""What a session call returns, one type per shape of output, each with `records()`: one JSON-ready dict
per input, the form `bitfit predict --json` prints and the server answers with."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Predictions:
    """Sequence kinds, a batch of texts: logits [n, k]; scores are probabilities over `label_names`, or, for
    a kind without label names (regression), the predicted value itself."""

    task: str
    task_kind: str
    label_names: list[str]
    logits: np.ndarray
    scores: np.ndarray
    labels: list[Any]
    digest: str = ""  # TaskPack.digest of the pack that ran (the session fills it): which version answered

    def records(self) -> list[dict[str, Any]]:
        """One dict per text: label, scores by label name (or {"value": v}), logits."""
        out = []
        for i, label in enumerate(self.labels):
            if self.label_names:
                scores = {n: float(s) for n, s in zip(self.label_names, self.scores[i])}
            else:
                scores = {"value": float(self.scores[i, 0])}
            out.append({"label": label, "scores": scores, "logits": [float(x) for x in self.logits[i]]})
        return out


@dataclass(frozen=True)
class TokenPredictions:
    """Token classification: per text, its words, one label per word (its first sub-token's), that label's
    probability, and for raw texts each word's character span. A word cut off by max_length gets None."""

    task: str
    label_names: list[str]
    words: list[list[str]]
    labels: list[list[str | None]]
    scores: list[list[float | None]]
    logits: list[np.ndarray]  # [n_words, K] per text, NaN rows for words without a token
    offsets: list[list[tuple[int, int]] | None]  # None for pre-split words
    truncated: list[bool]
    digest: str = ""  # TaskPack.digest of the pack that ran

    def records(self) -> list[dict[str, Any]]:
        out = []
        for i, words in enumerate(self.words):
            record: dict[str, Any] = {"tokens": list(words), "labels": list(self.labels[i]),
                                      "scores": list(self.scores[i])}
            if self.offsets[i] is not None:
                record["offsets"] = [list(o) for o in self.offsets[i]]
            record["truncated"] = self.truncated[i]
            out.append(record)
        return out


@dataclass(frozen=True)
class Answers:
    """Extractive question answering: per question, the best span of its context as text, with its
    character offsets in the context (end exclusive) and score (start logit + end logit)."""

    task: str
    answers: list[str]
    starts: list[int]
    ends: list[int]
    scores: list[float]
    truncated: list[bool]  # the context was cut at max_length (windows=False): the answer may lie beyond it
    digest: str = ""  # TaskPack.digest of the pack that ran

    def records(self) -> list[dict[str, Any]]:
        # score -inf: the context has no token (e.g. only characters the tokenizer drops), so no span
        return [{"answer": a, "start": s, "end": e, "score": score if np.isfinite(score) else None, "truncated": t}
                for a, s, e, score, t in zip(self.answers, self.starts, self.ends, self.scores, self.truncated)]
