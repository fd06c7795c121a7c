"""Task heads in numpy, and the decoding of token-level logits into words' labels and answer spans.

The head contract (see runtime.pack): sequence kinds pool the hidden states (mean, cls, or the BERT
pooler tanh(hidden[:, 0] @ Wp.T + bp)) and apply one linear layer; token kinds apply the linear layer
to every token. Training evaluates with these same decoding functions, so a metric measured in PyTorch
is the metric the runtime gives.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .pack import HEAD_BIAS, HEAD_POOLER_BIAS, HEAD_POOLER_WEIGHT, HEAD_WEIGHT, TaskPack

DEFAULT_MAX_ANSWER_TOKENS = 30  # the SQuAD scripts' default answer length limit


def softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def pool(hidden: np.ndarray, attention_mask: np.ndarray, pooling: str) -> np.ndarray:
    """mean (over the mask) or cls pooling; "pooler" needs weights, see Head."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask[..., None].astype(hidden.dtype)
    return (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1.0)


@dataclass(frozen=True)
class Head:
    """A pack's head, its matrices transposed once so a call is `x @ weight + bias`."""

    pooling: str
    weight: np.ndarray  # [H, K]
    bias: np.ndarray  # [K]
    pooler_weight: np.ndarray | None = None  # [H, H], transposed
    pooler_bias: np.ndarray | None = None

    @classmethod
    def from_pack(cls, pack: TaskPack) -> Head:
        t, pooling = pack.tensors, pack.manifest.pooling
        pooler = pooling == "pooler"
        return cls(
            pooling,
            np.ascontiguousarray(t[HEAD_WEIGHT].T, dtype=np.float32),
            np.asarray(t[HEAD_BIAS], dtype=np.float32),
            np.ascontiguousarray(t[HEAD_POOLER_WEIGHT].T, dtype=np.float32) if pooler else None,
            np.asarray(t[HEAD_POOLER_BIAS], dtype=np.float32) if pooler else None,
        )

    def __call__(self, hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Logits [B, K] for sequence kinds, [B, T, K] for token kinds (pooling "none")."""
        if self.pooling == "none":
            return hidden @ self.weight + self.bias
        if self.pooling == "pooler":
            pooled = np.tanh(hidden[:, 0] @ self.pooler_weight + self.pooler_bias)
        else:
            pooled = pool(hidden, attention_mask, self.pooling)
        return pooled @ self.weight + self.bias


# -- decoding ----------------------------------------------------------------------------------------
def first_subtokens(word_ids: Sequence[int | None], n_words: int) -> np.ndarray:
    """For each word, the position of its first sub-token, or -1 where the word has none (truncated away,
    or a word the tokenizer drops). Training labels exactly these positions."""
    first = np.full(n_words, -1, dtype=np.int64)
    for position, w in enumerate(word_ids):
        if w is not None and w < n_words and first[w] < 0:
            first[w] = position
    return first


def word_logits(logits: np.ndarray, word_ids: Sequence[int | None], n_words: int) -> np.ndarray:
    """[n_words, K] logits of each word's first sub-token; NaN rows for words without a token."""
    first = first_subtokens(word_ids, n_words)
    out = np.full((n_words, logits.shape[-1]), np.nan, dtype=np.float32)
    out[first >= 0] = logits[first[first >= 0]]
    return out


def best_span(
    start_logits: np.ndarray, end_logits: np.ndarray, allowed: np.ndarray, max_answer_tokens: int
) -> tuple[int, int, float]:
    """The (start, end) token pair, start <= end < start + max_answer_tokens, both where `allowed` (the
    context's tokens), with the highest start + end logit (the SQuAD convention); (0, 0, -inf) when no
    token is allowed."""
    if max_answer_tokens < 1:
        raise ValueError("max_answer_tokens must be >= 1")
    idx = np.flatnonzero(allowed)
    if idx.size == 0:
        return 0, 0, float("-inf")
    s, e = start_logits[idx].astype(np.float64), end_logits[idx].astype(np.float64)
    scores = s[:, None] + e[None, :]
    gap = idx[None, :] - idx[:, None]  # token distance end - start
    scores[(gap < 0) | (gap >= max_answer_tokens)] = -np.inf
    i, j = np.unravel_index(int(np.argmax(scores)), scores.shape)
    return int(idx[i]), int(idx[j]), float(scores[i, j])


def null_score(start_logits: np.ndarray, end_logits: np.ndarray) -> float:
    """The "no answer" score of one window (SQuAD 2.0): CLS (token 0) as both start and end."""
    return float(start_logits[0]) + float(end_logits[0])


def answers_nothing(null: float, span_score: float, threshold: float = 0.0) -> bool:
    """SQuAD 2.0's decision: no answer when the null score beats the best span's by more than `threshold`."""
    return null > span_score + threshold


# -- results -----------------------------------------------------------------------------------------
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

    def records(self) -> list[dict[str, Any]]:
        # score -inf: the context has no token (e.g. only characters the tokenizer drops), so no span
        return [{"answer": a, "start": s, "end": e, "score": score if np.isfinite(score) else None, "truncated": t}
                for a, s, e, score, t in zip(self.answers, self.starts, self.ends, self.scores, self.truncated)]
