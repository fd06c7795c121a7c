"""How task kinds train: the torch side of runtime.kinds. Per objective: a batch's inputs and targets, the
loss, how many terms that loss averages (DDP weighs each process's shard by it), and the metrics on a split.
A kind names its objective (TaskKind.objective: the pointer goes from the kind to here, as the runtime cannot
import training); train() asks `objective(kind)`. A new kind that trains like an existing one names that
objective; one that trains in a new way adds its entry here.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from bitfit.runtime.errors import BitFitError
from bitfit.runtime.kinds import KINDS
from torch.nn import functional as F

from . import tokens
from .data import TaskData
from .metrics import evaluate
from .sequence import encode_batch, predict


@dataclass(frozen=True)
class Objective:
    encode: Callable[[TaskData, Any, list, int], tuple[dict[str, torch.Tensor], torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (model output, targets) -> mean loss
    terms: Callable[[torch.Tensor], int]  # targets -> how many terms the mean averages
    evaluate: Callable[[torch.nn.Module, Any, TaskData, list, int], dict[str, float]]  # -> metrics in percent


def _encode_texts(task: TaskData, tokenizer: Any, batch: list, max_length: int):
    return encode_batch(tokenizer, batch, max_length), torch.from_numpy(task.targets(batch))


def _evaluate_texts(model: torch.nn.Module, tokenizer: Any, task: TaskData, examples: list, max_length: int):
    return evaluate(task.metric, predict(model, tokenizer, examples, max_length), task.targets(examples))


def _classes_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, target)


def _value_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(output[:, 0], target)


def _rows(target: torch.Tensor) -> int:
    return len(target)  # QA too: its loss averages start and end within each row


OBJECTIVES: dict[str, Objective] = {  # by TaskKind.objective
    "classes": Objective(_encode_texts, _classes_loss, _rows, _evaluate_texts),
    "value": Objective(_encode_texts, _value_loss, _rows, _evaluate_texts),
    "tags": Objective(tokens.encode_tags_batch, tokens.tags_loss, tokens.labelled_tokens, tokens.evaluate_tags),
    "spans": Objective(tokens.encode_spans_batch, tokens.spans_loss, _rows, tokens.evaluate_spans),
}


def trainable() -> list[str]:
    """The registered kinds that name an objective here."""
    return [name for name, k in KINDS.items() if k.objective in OBJECTIVES]


def objective(kind: str) -> Objective:
    """How a kind trains: the objective its registry entry names."""
    k = KINDS.get(kind) if isinstance(kind, str) else None
    found = OBJECTIVES.get(k.objective) if k is not None and k.objective is not None else None
    if found is None:
        raise BitFitError(f"task kind {kind!r} cannot be trained here: trainable kinds are {', '.join(trainable())}")
    return found
