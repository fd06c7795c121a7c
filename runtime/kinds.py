"""Task kinds as data: one registry that every part reads (pack validation, session calls, decoding,
`bitfit predict`, verify, the server's routes, inspect, training).

A kind says what its head outputs (one logit per label, one value, or logits per token), which session
call serves it and which server route, how its labels are checked, which metric training reports by
default, and how `bitfit predict` prints one record. Its decoder and input check live in
runtime.decode. Adding a kind is one entry here plus its decoder there (and, to train it, its objective
in training.objectives).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import decode
from .errors import BitFitError, PackError


@dataclass(frozen=True)
class TaskKind:
    name: str
    call: str  # the TaskSession method that serves it: run, run_tokens or answer
    route: str  # the HTTP endpoint of `bitfit serve`
    token_level: bool  # logits per token (pooling "none", the graph's token_logits); not in mixed batches
    labels: str | tuple[str, ...]  # "names": >= 2 label names, a logit each; "value": one output, no names;
    #                                 a tuple: exactly these names (QA: start, end)
    metric: str  # what training reports when the data set names none
    argmax: bool  # outputs score labels: verify compares argmax labels and probabilities
    run: Callable[..., Any]  # (session, task, texts, pairs, batch_size=) -> results: what `predict` calls
    check: Callable[..., None]  # (task, manifest, texts, pairs) -> None or BitFitError: the call's inputs
    describe: Callable[[dict[str, Any], Any], str]  # one record of results.records() and its input -> a line
    decode: Callable[..., Any] | None = None  # sequence kinds: (task, manifest, logits [n, k]) -> Predictions
    pairs: str = "text_pairs"  # what the second texts are called for this kind (QA: contexts)
    no_answer: bool = False  # may be trained with unanswerable questions (SQuAD 2.0)

    def outputs(self, labels: Sequence[str]) -> int:
        """How many logits the head has (per text, or per token for token kinds)."""
        return 1 if self.labels == "value" else len(labels)

    def check_labels(self, labels: Any) -> None:
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise PackError(f"labels must be a list of strings, got {labels!r}"[:300])
        if isinstance(self.labels, tuple):
            if tuple(labels) != self.labels:
                raise PackError(f"a {self.name} task has the labels {list(self.labels)}, got {labels!r}"[:300])
        elif self.labels == "names" and len(labels) < 2:
            raise PackError(f"a {self.name} task needs at least 2 labels, got {labels!r}"[:300])
        if len(set(labels)) != len(labels):
            dupes = sorted({x for x in labels if labels.count(x) > 1})
            raise PackError(f"labels {dupes} appear more than once: every label needs its own name and logit")


def _label_line(record: dict[str, Any], text: Any) -> str:
    return f"{record['label']}\t{max(record['scores'].values()):.3f}\t{text}"


def _value_line(record: dict[str, Any], text: Any) -> str:
    return f"{record['label']:.4f}\t{text}"


def _tags_line(record: dict[str, Any], text: Any) -> str:
    return " ".join(f"{w}/{label}" for w, label in zip(record["tokens"], record["labels"]))


def _answer_line(record: dict[str, Any], text: Any) -> str:
    score = "" if record["score"] is None else f"{record['score']:.3f}"
    return f"{record['answer']}\t{score}\t{text}"


KINDS: dict[str, TaskKind] = {k.name: k for k in (
    TaskKind("classification", "run", "/v1/predict", False, "names", "accuracy", True,
             decode.run_sequence, decode.check_sequence, _label_line, decode=decode.classes),
    TaskKind("regression", "run", "/v1/predict", False, "value", "spearman", False,
             decode.run_sequence, decode.check_sequence, _value_line, decode=decode.value),
    TaskKind("token-classification", "run_tokens", "/v1/tokens", True, "names", "accuracy", True,
             decode.run_tokens, decode.check_words, _tags_line),
    TaskKind("question-answering", "answer", "/v1/answer", True, ("start", "end"), "f1", False,
             decode.answer, decode.check_questions, _answer_line, pairs="contexts", no_answer=True),
)}
TOKEN_KINDS = tuple(k for k, v in KINDS.items() if v.token_level)


def kind(name: Any) -> TaskKind:
    """The registered kind called `name`; PackError naming the known ones otherwise."""
    found = KINDS.get(name) if isinstance(name, str) else None
    if found is None:
        raise PackError(f"task_kind must be one of {', '.join(KINDS)}; got {name!r}"[:300])
    return found


class WrongCallError(BitFitError):
    """A task was called through another kind's call (or route): the message names the right one."""

    def __init__(self, task: str, kind_name: str, call: str) -> None:
        right = KINDS[kind_name].call
        if call == "run_mixed":
            text = f"task {task!r} is a {kind_name} task: run_mixed serves sequence tasks only; call {right}() for it"
        else:
            text = f"task {task!r} is a {kind_name} task: call {right}() for it, not {call}()"
        super().__init__(text)
        self.task, self.kind, self.call = task, kind_name, call
