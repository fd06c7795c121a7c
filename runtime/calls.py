"""Call shapes: the ways a task is called (sequence, tokens, answer). A task kind (runtime.kinds) points at
one; the shape owns what every caller of that kind needs, as data: the TaskSession method that serves it,
its input check and decoder (runtime.decode), its /v1 body (route and request keys) and its KServe v2
signature (input and output tensors). The server, `predict` and the session ask the shape instead of
comparing kind names.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import decode


@dataclass(frozen=True)
class Tensor:
    """One tensor of a v2 signature. A dimension "K" is the head's outputs per row (TaskKind.outputs)."""

    name: str
    datatype: str
    shape: tuple[int | str, ...]

    def resolve(self, k: int) -> Tensor:
        return Tensor(self.name, self.datatype, tuple(k if d == "K" else d for d in self.shape))


@dataclass(frozen=True)
class Body:
    """The JSON body of a /v1 POST: its fields (lists of strings but `task`), which are required, and the key
    of the answer's list."""

    fields: tuple[str, ...]
    required: tuple[str, ...]
    answer: str


@dataclass(frozen=True)
class CallShape:
    name: str
    method: str  # the TaskSession method that serves it
    calls: tuple[str, ...]  # every session call that may serve it (sequence kinds: run and run_mixed)
    route: str  # the /v1 endpoint of `bitfit serve`
    body: Body
    check: Callable[..., None]  # (Bound, texts, pairs) -> None or BitFitError: the call's inputs
    options: dict[str, tuple[Any, Any]]  # name -> (default, Field): checked before the task is looked up
    run: Callable[..., Any]  # (Bound, texts, pairs, **options) -> results: the decoder
    token_level: bool  # logits per token (pooling "none", the graph's token_logits); not in mixed batches
    paired: bool  # always two texts (question, context), whatever the pack's text_pair says
    pairs: str  # what the second texts are called (text_pairs, contexts)
    v2_inputs: tuple[Tensor, ...]
    v2_pair: Tensor | None  # the input that only pair tasks have
    v2_outputs: tuple[Tensor, ...]
    v2_value_outputs: tuple[Tensor, ...] | None = None  # kinds whose head gives one value, no label names

    def inputs(self, text_pair: bool) -> list[Tensor]:
        """The v2 model's inputs (required, all of them: the pair input appears only for pair tasks)."""
        return [*self.v2_inputs, *([self.v2_pair] if text_pair and self.v2_pair else [])]

    def outputs(self, value: bool, k: int) -> list[Tensor]:
        """The v2 model's outputs for a head of `k` outputs per row (`value`: no label names)."""
        chosen = self.v2_value_outputs if value and self.v2_value_outputs is not None else self.v2_outputs
        return [t.resolve(k) for t in chosen]

    def option_names(self) -> list[str]:
        """The keyword options its call takes (batch_size, ...)."""
        return list(self.options)


_TEXTS = Tensor("text", "BYTES", (-1,))
_RECORD = Tensor("record", "BYTES", (-1,))
_LOGITS = Tensor("logits", "FP32", (-1, "K"))

SEQUENCE = CallShape(
    "sequence", "run", ("run", "run_mixed"), "/v1/predict",
    Body(("task", "texts", "text_pairs"), ("task", "texts"), "predictions"),
    decode.check_sequence, decode.BATCH_OPTIONS, decode.run_sequence, token_level=False, paired=False,
    pairs="text_pairs", v2_inputs=(_TEXTS,), v2_pair=Tensor("text_pair", "BYTES", (-1,)),
    v2_outputs=(_LOGITS, Tensor("label", "BYTES", (-1,)), Tensor("scores", "FP32", (-1, "K"))),
    v2_value_outputs=(_LOGITS, Tensor("value", "FP32", (-1,))),
)
TOKENS = CallShape(
    "tokens", "run_tokens", ("run_tokens",), "/v1/tokens", Body(("task", "texts"), ("task", "texts"), "predictions"),
    decode.check_words, decode.BATCH_OPTIONS, decode.run_tokens, token_level=True, paired=False, pairs="text_pairs",
    v2_inputs=(_TEXTS,), v2_pair=None, v2_outputs=(_RECORD,),
)
ANSWER = CallShape(
    "answer", "answer", ("answer",), "/v1/answer",
    Body(("task", "questions", "contexts"), ("task", "questions", "contexts"), "answers"),
    decode.check_questions, decode.ANSWER_OPTIONS, decode.answer, token_level=True, paired=True, pairs="contexts",
    v2_inputs=(Tensor("question", "BYTES", (-1,)), Tensor("context", "BYTES", (-1,))), v2_pair=None,
    v2_outputs=(Tensor("answer", "BYTES", (-1,)), _RECORD),
)
SHAPES: dict[str, CallShape] = {s.name: s for s in (SEQUENCE, TOKENS, ANSWER)}


def by_route() -> dict[str, CallShape]:
    """The /v1 POST endpoints and the shape each serves."""
    return {s.route: s for s in SHAPES.values()}
