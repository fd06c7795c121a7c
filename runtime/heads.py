"""Task heads in numpy, and the math that turns token-level logits into words' labels and answer spans.

The head contract: sequence kinds pool the hidden states (mean, cls, or the BERT pooler
tanh(hidden[:, 0] @ Wp.T + bp)) and apply one linear layer; token kinds apply the linear layer to every
token. A pack stores the head under the names below. Training evaluates with these same functions, so a
metric measured in PyTorch is the metric the runtime gives.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

HEAD_WEIGHT = "head.weight"
HEAD_BIAS = "head.bias"
# The BERT pooler of HF *ForSequenceClassification models: pooled = tanh(hidden[:, 0] @ W.T + b).
HEAD_POOLER_WEIGHT = "head.pooler.weight"
HEAD_POOLER_BIAS = "head.pooler.bias"
POOLINGS = ("mean", "cls", "pooler", "none")  # none: token kinds, the linear layer on every token
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


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """x [..., H] @ weight[K, H].T + bias, in numpy's own single-threaded loops, never BLAS.

    A head is a small matrix product next to the encoder's, which onnxruntime runs on its own threads. numpy's
    matmul calls its bundled OpenBLAS, which wakes a thread pool of its own for products this small and
    leaves it spinning afterwards: measured in `bitfit serve` (benchmarks/serving.py) it doubled the server's
    CPU time per request (10.5 ms where the encoder took 5), a core taken from onnxruntime and the clients.
    einsum without `optimize` does the product itself on the calling thread (0.05 ms for a [3, 384] pooler
    head, 2.7 ms for 4,096 tokens x 768 x 9 labels) and leaves the process's BLAS settings alone.
    """
    return np.einsum("...h,kh->...k", x, weight) + bias


@dataclass(frozen=True)
class Head:
    """A pack's head as float32 arrays, each weight [out, in] as PyTorch stores it (see `linear`)."""

    pooling: str
    weight: np.ndarray  # [K, H]
    bias: np.ndarray  # [K]
    pooler_weight: np.ndarray | None = None  # [H, H]
    pooler_bias: np.ndarray | None = None

    @classmethod
    def from_tensors(cls, pooling: str, t: Mapping[str, np.ndarray]) -> Head:
        """A pack's head from its tensors (by the names above) and its pooling."""
        pooler = pooling == "pooler"
        return cls(
            pooling,
            np.ascontiguousarray(t[HEAD_WEIGHT], dtype=np.float32),
            np.asarray(t[HEAD_BIAS], dtype=np.float32),
            np.ascontiguousarray(t[HEAD_POOLER_WEIGHT], dtype=np.float32) if pooler else None,
            np.asarray(t[HEAD_POOLER_BIAS], dtype=np.float32) if pooler else None,
        )

    def __call__(self, hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Logits [B, K] for sequence kinds, [B, T, K] for token kinds (pooling "none")."""
        if self.pooling == "none":
            return linear(hidden, self.weight, self.bias)
        if self.pooling == "pooler":
            pooled = np.tanh(linear(np.ascontiguousarray(hidden[:, 0]), self.pooler_weight, self.pooler_bias))
        else:
            pooled = pool(hidden, attention_mask, self.pooling)
        return linear(pooled, self.weight, self.bias)


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
