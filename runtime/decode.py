"""Decoding per call shape: each shape's input check and the way its logits become results.

A decoder receives a `Bound` handle (made by TaskSession.check_call: the task as it is in one state of the
session, its encoder and its forward pass), never the session, so this module imports nothing of the
session's. runtime.calls names, per call shape, which of these functions serve it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
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

if TYPE_CHECKING:  # tokenize imports nothing of the decoders
    from .tokenize import TextEncoder


@dataclass(frozen=True)
class Bound:
    """One call's view of one task, made by TaskSession.check_call: the pack's fields a decoder reads, the
    digest of the pack version that runs, the encoder, and `forward` (token inputs -> the task's logits, with
    the biases and head of that same version, whatever registrations happen meanwhile)."""

    task: str
    kind: str  # the task kind's name
    labels: tuple[str, ...]
    text_pair: bool
    max_length: int
    no_answer: bool
    digest: str  # TaskPack.digest of the pack that runs
    decode: Callable[[Bound, np.ndarray], Predictions] | None  # the kind's decoder of [n, k] logits
    encoder: TextEncoder
    forward: Callable[[dict[str, np.ndarray]], np.ndarray]


# -- input checks (called by TaskSession.check_call, the one validator of a call) ----------------------
def check_sequence(call: Bound, texts: Any, pairs: Any) -> None:
    check_texts(texts, "texts")
    if pairs is not None:
        check_texts(pairs, "text_pairs")
        if len(pairs) != len(texts):
            raise BitFitError(f"text_pairs has {len(pairs)} items but texts has {len(texts)}: give one pair per text")
    if call.text_pair and pairs is None:
        raise BitFitError(f"task {call.task!r} takes sentence pairs: give text_pairs, one per text")
    if not call.text_pair and pairs is not None:
        raise BitFitError(f"task {call.task!r} takes single sentences: do not give text_pairs")


def check_words(call: Bound, texts: Any, pairs: Any) -> None:
    """Strings, or lists of words (as in the training data): one form for all."""
    if pairs is not None:
        raise BitFitError(f"task {call.task!r} labels the words of single texts: do not give text pairs")
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


def check_questions(call: Bound, questions: Any, contexts: Any) -> None:
    if contexts is None:
        raise BitFitError(f"task {call.task!r} answers questions from contexts: give a context for every question")
    check_texts(questions, "questions")
    check_texts(contexts, "contexts")
    if len(questions) != len(contexts):
        raise BitFitError(f"got {len(questions)} questions but {len(contexts)} contexts: give one context per question")


# -- option checks (made before the task is looked up, so a bad option is the first thing reported) ------
# a call shape's options: name -> (default, what it accepts)
BATCH_OPTIONS: dict[str, tuple[Any, S.Field]] = {"batch_size": (32, A.COUNT)}
ANSWER_OPTIONS: dict[str, tuple[Any, S.Field]] = {
    "max_answer_tokens": (DEFAULT_MAX_ANSWER_TOKENS, A.COUNT), "batch_size": (32, A.COUNT),
    "windows": (True, S.boolean()), "stride": (None, A.optional(S.integer(0))),
    "no_answer": (None, A.optional(S.boolean())), "null_threshold": (0.0, A.number()),
}


def check_options(spec: dict[str, tuple[Any, S.Field]], given: dict[str, Any]) -> dict[str, Any]:
    """Every option of `spec`, the given ones checked, the others at their defaults."""
    for name, value in given.items():
        if name not in spec:
            raise BitFitError(f"unknown option {name!r}: this call takes {', '.join(spec)}")
        A.check(name, value, spec[name][1])
    return {name: given.get(name, default) for name, (default, _) in spec.items()}


# -- sequence kinds: logits [n, k] -> Predictions ------------------------------------------------------
def classes(call: Bound, logits: np.ndarray) -> Predictions:
    scores = softmax(logits)
    labels = [call.labels[i] for i in scores.argmax(axis=-1)]
    return Predictions(call.task, call.kind, list(call.labels), logits, scores, labels, call.digest)


def value(call: Bound, logits: np.ndarray) -> Predictions:
    return Predictions(call.task, call.kind, [], logits, logits, [float(v) for v in logits[:, 0]], call.digest)


def run_sequence(call: Bound, texts: Sequence[str], text_pairs: Sequence[str] | None = None,
                 *, batch_size: int = 32) -> Predictions:
    """Tokenize, run in batches of `batch_size`, apply the task's head and its kind's decoder."""
    chunks = []
    for start in range(0, len(texts), batch_size):
        pairs = None if text_pairs is None else text_pairs[start : start + batch_size]
        inputs = call.encoder(texts[start : start + batch_size], pairs, max_length=call.max_length,
                              index=range(start, start + len(texts[start : start + batch_size])))
        chunks.append(call.forward(inputs))
    return _decode(call, np.concatenate(chunks))


def _decode(call: Bound, logits: np.ndarray) -> Predictions:
    if call.decode is None:
        raise BitFitError(f"task {call.task!r} is a {call.kind} task, which has no decoder of sequence logits")
    return call.decode(call, logits)


def run_mixed(
    rows: Sequence[tuple[str, str] | tuple[str, str, str | None]],
    bind: Callable[[str, list[str], list[str] | None], Bound],
    forward_rows: Callable[[list[str], list[str], list[str | None]], list[np.ndarray]] | None,
    *,
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """Rows of (task, text) or (task, text, text_pair), any sequence tasks mixed: one record per row, in order,
    each with task, label, scores and logits (the numbers run_sequence gives for that row's task).

    `bind(task, texts, pairs)` checks each task's rows and binds it (TaskSession.check_call, all in one state).
    `forward_rows(tasks, texts, pairs)` (a mixed graph) runs rows of different tasks together, `batch_size`
    at a time, each with its own task's biases; without it, one pass per task present."""
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence) or not rows:
        raise BitFitError("rows must be a non-empty list of (task, text) or (task, text, text_pair)")
    A.check("batch_size", batch_size, A.COUNT)
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, (tuple, list)) or len(row) not in (2, 3):
            raise BitFitError(f"rows[{i}] must be (task, text) or (task, text, text_pair), got {row!r}"[:300])
        A.check(f"rows[{i}][0] (the task)", row[0], S.string())  # a list is no task name, nor a dict key
        groups.setdefault(row[0], []).append(i)
    pairs = [row[2] if len(row) == 3 else None for row in rows]
    calls: dict[str, Bound] = {}
    for task, index in groups.items():
        given = sum(pairs[i] is not None for i in index)
        if given not in (0, len(index)):
            raise BitFitError(f"rows of task {task!r} mix single texts and pairs: give text_pair for all or none")
        calls[task] = bind(task, [rows[i][1] for i in index], [pairs[i] for i in index] if given else None)
    logits: list[np.ndarray | None] = [None] * len(rows)
    if forward_rows is not None:
        for start in range(0, len(rows), batch_size):
            chunk = range(start, min(start + batch_size, len(rows)))
            out = forward_rows([rows[i][0] for i in chunk], [rows[i][1] for i in chunk], [pairs[i] for i in chunk])
            logits[start : start + len(chunk)] = out
    else:
        for task, index in groups.items():
            call = calls[task]
            texts = [rows[i][1] for i in index]
            task_pairs = [pairs[i] for i in index] if pairs[index[0]] is not None else None
            for start in range(0, len(index), batch_size):
                sl = slice(start, start + batch_size)
                inputs = call.encoder(texts[sl], None if task_pairs is None else task_pairs[sl],
                                      max_length=call.max_length)
                for i, row_logits in zip(index[sl], call.forward(inputs)):
                    logits[i] = row_logits
    return [{"task": row[0], **_decode(calls[row[0]], row_logits[None, :]).records()[0]}
            for row, row_logits in zip(rows, logits)]


# -- token classification: a label per word -----------------------------------------------------------
def run_tokens(call: Bound, texts: Sequence[str] | Sequence[Sequence[str]], text_pairs: None = None, *,
               batch_size: int = 32) -> TokenPredictions:
    """A label per word, from the word's first sub-token (as trained). Each item of `texts` is a string (words
    are then the tokenizer's own pre-tokenization, with character offsets) or a list of words."""
    pretokenized = not isinstance(texts[0], str)
    words_out, labels_out, scores_out, logits_out, offsets_out, truncated_out = [], [], [], [], [], []
    for start in range(0, len(texts), batch_size):
        batch = [list(x) if pretokenized else x for x in texts[start : start + batch_size]]
        inputs, encodings = call.encoder.encodings(batch, max_length=call.max_length, pretokenized=pretokenized,
                                                   index=range(start, start + len(batch)))
        logits = call.forward(inputs)
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
            labels_out.append([call.labels[k] if h else None for k, h in zip(best, has)])
            scores_out.append([float(p[k]) if h else None for p, k, h in zip(probs, best, has)])
            logits_out.append(wl)
            offsets_out.append(offsets)
            truncated_out.append(bool(enc.overflowing) or not bool(has.all()))
    return TokenPredictions(call.task, list(call.labels), words_out, labels_out, scores_out, logits_out, offsets_out,
                            truncated_out, call.digest)


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
def answer(call: Bound, questions: Sequence[str], contexts: Sequence[str], **options: Any) -> Answers:
    """See TaskSession.answer; `options` are ANSWER_OPTIONS, all given and checked (check_options)."""
    max_answer_tokens, batch_size, windows, stride, no_answer, null_threshold = (options[k] for k in ANSWER_OPTIONS)
    stride = call.max_length // 4 if stride is None else stride
    pairs = list(zip(questions, contexts))
    best: list[tuple[float, int, int]] = [(float("-inf"), 0, 0)] * len(pairs)
    null = [float("inf")] * len(pairs)
    truncated = [False] * len(pairs)
    # `batch_size` questions at a time (bounded memory, padding to that group's longest), their windows
    # `batch_size` at a time through the graph
    for first in range(0, len(pairs), batch_size):
        group = pairs[first : first + batch_size]
        if windows:
            inputs, encodings, owner = call.encoder.windows(group, max_length=call.max_length, stride=stride,
                                                            first=first)
        else:
            inputs, encodings = call.encoder.encodings(group, max_length=call.max_length, strategy="only_second",
                                                       names=("questions", "contexts"),
                                                       index=range(first, first + len(group)))
            owner = list(range(len(group)))
            truncated[first : first + len(group)] = [bool(enc.overflowing) for enc in encodings]
        for start in range(0, len(encodings), batch_size):
            rows = slice(start, start + batch_size)
            logits = call.forward({k: v[rows] for k, v in inputs.items()})
            for row, enc, j in zip(logits, encodings[rows], owner[rows]):
                i = first + j
                allowed = np.array([s == 1 for s in enc.sequence_ids]) & (np.asarray(enc.attention_mask) == 1)
                if not allowed.any():
                    continue
                s, e, score = best_span(row[:, 0], row[:, 1], allowed, max_answer_tokens)
                if score > best[i][0]:
                    best[i] = (score, enc.offsets[s][0], enc.offsets[e][1])
                null[i] = min(null[i], null_score(row[:, 0], row[:, 1]))
    use_null = call.no_answer if no_answer is None else no_answer
    if use_null:
        best = [(n, 0, 0) if answers_nothing(n, b[0], null_threshold) else b for b, n in zip(best, null)]
    return Answers(call.task, [c[a:b] for c, (_, a, b) in zip(contexts, best)], [int(a) for _, a, _ in best],
                   [int(b) for _, _, b in best], [float(score) for score, _, _ in best], truncated, call.digest)
