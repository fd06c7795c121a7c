"""Task kinds as data: one registry that every part reads (pack validation, session calls, decoding,
`bitfit predict`, verify, the server's routes, inspect, training, checkpoint extraction).

A kind says what its head outputs (one logit per label, one value, or logits per token), which call shape
serves it (runtime.calls: the session method, input check, decoder, /v1 body and v2 signature), how its
labels are checked, which metric and objective training uses, the format of its training data, and how
`bitfit predict` prints one record. Adding a kind is one entry here (plus its decoder in runtime.decode if
it decodes logits in a new way, and a new call shape only if it is called in a new way). Nothing outside
this file and runtime.calls names a kind or compares call shapes.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import decode
from .calls import ANSWER, SEQUENCE, TOKENS, CallShape, Tensor
from .errors import BitFitError, PackError


@dataclass(frozen=True)
class TaskKind:
    name: str
    shape: CallShape  # how it is called: session method, input check, decoder, /v1 body, v2 signature
    labels: str | tuple[str, ...]  # "names": >= 2 label names, a logit each; "value": one output, no names;
    #                                 a tuple: exactly these names (QA: start, end)
    metric: str  # what training reports when the data set names none
    argmax: bool  # outputs score labels: verify compares argmax labels and probabilities
    describe: Callable[[dict[str, Any], Any], str]  # one record of results.records() and its input -> a line
    decode: Callable[..., Any] | None = None  # sequence kinds: (decode.Bound, logits [n, k]) -> Predictions
    no_answer: bool = False  # may be trained with unanswerable questions (SQuAD 2.0)
    objective: str | None = None  # training.objectives.OBJECTIVES key: how it trains (None: not trainable)
    data: str = "texts"  # the format of its training rows (training.data.FORMATS): texts, tags or squad
    checkpoint: str = ""  # the transformers architecture suffix of a fine-tuned model of this kind (extract)
    web: str | None = None  # how web/bitfit.js decodes its logits ("classes", "value"); None: not in the browser

    # what the call shape owns, named here for the kind's callers (the server reads call and route)
    @property
    def call(self) -> str:
        """The TaskSession method that serves it: run, run_tokens or answer."""
        return self.shape.method

    @property
    def route(self) -> str:
        return self.shape.route

    @property
    def token_level(self) -> bool:
        return self.shape.token_level

    def two_texts(self, text_pair: Any) -> bool:
        """Whether its rows are two texts: sentence pairs, or question answering's question and context."""
        return bool(text_pair) or self.shape.paired

    def outputs(self, labels: Sequence[str]) -> int:
        """How many logits the head has (per text, or per token for token kinds)."""
        return 1 if self.labels == "value" else len(labels)

    def v2_signature(self, text_pair: bool, labels: Sequence[str]) -> tuple[list[Tensor], list[Tensor]]:
        """The KServe v2 model's (inputs, outputs) for a task of this kind."""
        return self.shape.inputs(text_pair), self.shape.outputs(self.labels == "value", self.outputs(labels))

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


CLASSIFICATION = TaskKind("classification", SEQUENCE, "names", "accuracy", True, _label_line, decode=decode.classes,
                          objective="classes", checkpoint="ForSequenceClassification", web="classes")
REGRESSION = TaskKind("regression", SEQUENCE, "value", "spearman", False, _value_line, decode=decode.value,
                      objective="value", checkpoint="ForSequenceClassification", web="value")
TOKEN_CLASSIFICATION = TaskKind("token-classification", TOKENS, "names", "accuracy", True, _tags_line,
                                objective="tags", data="tags", checkpoint="ForTokenClassification")
QUESTION_ANSWERING = TaskKind("question-answering", ANSWER, ("start", "end"), "f1", False, _answer_line,
                              no_answer=True, objective="spans", data="squad", checkpoint="ForQuestionAnswering")
KINDS: dict[str, TaskKind] = {k.name: k for k in (CLASSIFICATION, REGRESSION, TOKEN_CLASSIFICATION, QUESTION_ANSWERING)}


def kind(name: Any) -> TaskKind:
    """The registered kind called `name`; PackError naming the known ones otherwise."""
    found = KINDS.get(name) if isinstance(name, str) else None
    if found is None:
        raise PackError(f"task_kind must be one of {', '.join(KINDS)}; got {name!r}"[:300])
    return found


class WrongCallError(BitFitError):
    """A task was called through another kind's call (or route): the message names the right one."""

    def __init__(self, task: str, kind_name: str, call: str) -> None:
        right = KINDS[kind_name].shape.method
        if call == "run_mixed":
            text = f"task {task!r} is a {kind_name} task: run_mixed serves sequence tasks only; call {right}() for it"
        else:
            text = f"task {task!r} is a {kind_name} task: call {right}() for it, not {call}()"
        super().__init__(text)
        self.task, self.kind, self.call = task, kind_name, call
