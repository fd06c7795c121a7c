"""Decoding per task kind: each kind's input check and the way its logits become results.

The session (runtime.session) owns registration, the state swap, binding and the forward pass; these
functions take a session and use only `check_call`, `encoder` and `forward`. runtime.kinds names, per
kind, which of them serve it.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from . import args as A
from . import schema as S
from .errors import BitFitError
from .heads import (
    DEFAULT_MAX_ANSWER_TOKENS,
    answers_nothing,
    best_span,
    null_score,
    softmax,
    word_logits,
)
from .results import Answers, Predictions, TokenPredictions
from .tokenize import check_texts

if TYPE_CHECKING:  # the session imports this module, not the other way round
    from .pack import PackManifest
    from .session import TaskSession


# -- input checks (called by TaskSession.check_call, the one validator of a call) ----------------------
def check_sequence(task: str, manifest: PackManifest, texts: Any, pairs: Any) -> None:
    check_texts(texts, "texts")
    if pairs is not None:
        check_texts(pairs, "text_pairs")
        if len(pairs) != len(texts):
            raise BitFitError(f"text_pairs has {len(pairs)} items but texts has {len(texts)}: give one pair per text")
    if manifest.text_pair and pairs is None:
        raise BitFitError(f"task {task!r} takes sentence pairs: give text_pairs, one per text")
    if not manifest.text_pair and pairs is not None:
        raise BitFitError(f"task {task!r} takes single sentences: do not give text_pairs")


def check_words(task: str, manifest: PackManifest, texts: Any, pairs: Any) -> None:
    """Strings, or lists of words (as in the training data): one form for all."""
    if pairs is not None:
        raise BitFitError(f"task {task!r} labels the words of single texts: do not give text pairs")
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise BitFitError(f"texts must be a list of strings, or of lists of words, got {type(texts).__name__}")
    if not texts:
        raise BitFitError("texts is empty: give at least one text")
    if isinstance(texts[0], str):
        check_texts(texts, "texts")
        return
    for i, words in enumerate(texts):
        if isinstance(words, str):
            raise BitFitError(f"texts[{i}] is a string but texts[0] is a list of words: give one form for all")
        check_texts(words, f"texts[{i}]")


def check_questions(task: str, manifest: PackManifest, questions: Any, contexts: Any) -> None:
    if contexts is None:
        raise BitFitError(f"task {task!r} answers questions from contexts: give a context for every question")
    check_texts(questions, "questions")
    check_texts(contexts, "contexts")
    if len(questions) != len(contexts):
        raise BitFitError(f"got {len(questions)} questions but {len(contexts)} contexts: give one context per question")


# -- sequence kinds: logits [n, k] -> Predictions ------------------------------------------------------
def classes(task: str, manifest: PackManifest, logits: np.ndarray) -> Predictions:
    scores = softmax(logits)
    labels = [manifest.labels[i] for i in scores.argmax(axis=-1)]
    return Predictions(task, manifest.task_kind, list(manifest.labels), logits, scores, labels)


def value(task: str, manifest: PackManifest, logits: np.ndarray) -> Predictions:
    return Predictions(task, manifest.task_kind, [], logits, logits, [float(v) for v in logits[:, 0]])


def run_sequence(session: TaskSession, task: str, texts: Sequence[str], text_pairs: Sequence[str] | None = None,
                 *, batch_size: int = 32) -> Predictions:
    """Tokenize, run in batches of `batch_size`, apply the task's head and its kind's decoder."""
    A.check("batch_size", batch_size, A.COUNT)
    state, t = session.check_call("run", task, texts, text_pairs)
    m = t.pack.manifest
    chunks = []
    for start in range(0, len(texts), batch_size):
        pairs = None if text_pairs is None else text_pairs[start : start + batch_size]
        inputs = session.encoder(texts[start : start + batch_size], pairs, max_length=m.max_length,
                                 index=range(start, start + len(texts[start : start + batch_size])))
        chunks.append(session.forward(task, inputs, state))
    return t.kind.decode(task, m, np.concatenate(chunks))


# -- token classification: a label per word -----------------------------------------------------------
def run_tokens(session: TaskSession, task: str, texts: Sequence[str] | Sequence[Sequence[str]],
               text_pairs: None = None, *, batch_size: int = 32) -> TokenPredictions:
    """A label per word, from the word's first sub-token (as trained). Each item of `texts` is a string (words
    are then the tokenizer's own pre-tokenization, with character offsets) or a list of words."""
    A.check("batch_size", batch_size, A.COUNT)
    state, t = session.check_call("run_tokens", task, texts, text_pairs)
    m = t.pack.manifest
    pretokenized = not isinstance(texts[0], str)
    words_out, labels_out, scores_out, logits_out, offsets_out, truncated_out = [], [], [], [], [], []
    for start in range(0, len(texts), batch_size):
        batch = [list(x) if pretokenized else x for x in texts[start : start + batch_size]]
        inputs, encodings = session.encoder.encodings(batch, max_length=m.max_length, pretokenized=pretokenized,
                                                      index=range(start, start + len(batch)))
        logits = session.forward(task, inputs, state)
        for row, item, enc in zip(logits, batch, encodings):
            if pretokenized:
                words, offsets, word_ids = list(item), None, enc.word_ids
            else:
                offsets, word_ids = word_spans(enc)
                words = [item[a:b] for a, b in offsets]
            n_words = len(words)
            wl = word_logits(row, word_ids, n_words)
            probs = softmax(np.nan_to_num(wl, nan=0.0))
            has = ~np.isnan(wl[:, 0]) if n_words else np.zeros(0, bool)
            best = probs.argmax(axis=-1) if n_words else np.zeros(0, np.int64)
            words_out.append(words)
            labels_out.append([m.labels[k] if h else None for k, h in zip(best, has)])
            scores_out.append([float(p[k]) if h else None for p, k, h in zip(probs, best, has)])
            logits_out.append(wl)
            offsets_out.append(offsets)
            truncated_out.append(bool(enc.overflowing) or not bool(has.all()))
    return TokenPredictions(task, list(m.labels), words_out, labels_out, scores_out, logits_out, offsets_out,
                            truncated_out)


def word_spans(encoding: Any) -> tuple[list[tuple[int, int]], list[int | None]]:
    """Character span of each word of a raw text that has tokens (first token's start to last token's end),
    and the tokens' word ids renumbered to index those spans (a pre-token that yields no token leaves a gap)."""
    spans: dict[int, list[int]] = {}
    for w, (a, b) in zip(encoding.word_ids, encoding.offsets):
        if w is None:
            continue
        if w in spans:
            spans[w][1] = max(spans[w][1], b)
        else:
            spans[w] = [a, b]
    rank = {w: i for i, w in enumerate(sorted(spans))}
    word_ids = [None if w is None else rank[w] for w in encoding.word_ids]
    return [(spans[w][0], spans[w][1]) for w in sorted(spans)], word_ids


# -- extractive question answering: the best span of each context -------------------------------------
def answer(
    session: TaskSession,
    task: str,
    questions: Sequence[str],
    contexts: Sequence[str],
    *,
    max_answer_tokens: int = DEFAULT_MAX_ANSWER_TOKENS,
    batch_size: int = 32,
    windows: bool = True,
    stride: int | None = None,
    no_answer: bool | None = None,
    null_threshold: float = 0.0,
) -> Answers:
    """See TaskSession.answer."""
    A.check("max_answer_tokens", max_answer_tokens, A.COUNT)
    A.check("batch_size", batch_size, A.COUNT)
    A.check("windows", windows, S.boolean())
    A.check("stride", stride, A.optional(S.integer(0)))
    A.check("no_answer", no_answer, A.optional(S.boolean()))
    A.check("null_threshold", null_threshold, A.number())
    state, t = session.check_call("answer", task, questions, contexts)
    m = t.pack.manifest
    stride = m.max_length // 4 if stride is None else stride
    pairs = list(zip(questions, contexts))
    best: list[tuple[float, int, int]] = [(float("-inf"), 0, 0)] * len(pairs)
    null = [float("inf")] * len(pairs)
    truncated = [False] * len(pairs)
    # `batch_size` questions at a time (bounded memory, padding to that group's longest), their windows
    # `batch_size` at a time through the graph
    for first in range(0, len(pairs), batch_size):
        group = pairs[first : first + batch_size]
        if windows:
            inputs, encodings, owner = session.encoder.windows(group, max_length=m.max_length, stride=stride,
                                                                    first=first)
        else:
            inputs, encodings = session.encoder.encodings(group, max_length=m.max_length, strategy="only_second",
                                                          names=("questions", "contexts"),
                                                          index=range(first, first + len(group)))
            owner = list(range(len(group)))
            truncated[first : first + len(group)] = [bool(enc.overflowing) for enc in encodings]
        for start in range(0, len(encodings), batch_size):
            rows = slice(start, start + batch_size)
            logits = session.forward(task, {k: v[rows] for k, v in inputs.items()}, state)
            for row, enc, j in zip(logits, encodings[rows], owner[rows]):
                i = first + j
                allowed = np.array([s == 1 for s in enc.sequence_ids]) & (np.asarray(enc.attention_mask) == 1)
                if not allowed.any():
                    continue
                s, e, score = best_span(row[:, 0], row[:, 1], allowed, max_answer_tokens)
                if score > best[i][0]:
                    best[i] = (score, enc.offsets[s][0], enc.offsets[e][1])
                null[i] = min(null[i], null_score(row[:, 0], row[:, 1]))
    use_null = m.no_answer if no_answer is None else no_answer
    if use_null:
        best = [(n, 0, 0) if answers_nothing(n, b[0], null_threshold) else b for b, n in zip(best, null)]
    return Answers(task, [c[a:b] for c, (_, a, b) in zip(contexts, best)], [int(a) for _, a, _ in best],
                   [int(b) for _, _, b in best], [float(score) for score, _, _ in best], truncated)
