"""Token-level tasks on the torch side: batches with per-token targets, losses, and evaluation.

Token classification trains on each word's first sub-token (the others are -100, ignored by the loss).
QA encodes (question, context) as a text pair truncated only in the context, and targets the tokens
holding the answer's first and last characters; an answer cut off by truncation targets token 0 (CLS),
as in the HF examples. Evaluation decodes with runtime.heads, the runtime's own functions.
"""
from __future__ import annotations

import collections
import re
import string

import numpy as np
import torch
from bitfit.runtime.errors import BitFitError
from bitfit.runtime.heads import (
    DEFAULT_MAX_ANSWER_TOKENS,
    answers_nothing,
    best_span,
    first_subtokens,
    null_score,
    word_logits,
)
from torch.nn import functional as F

from .data import QAExample, TaskData, TokenExample, is_bio

IGNORE = -100  # torch's cross-entropy ignore_index: tokens that carry no target


def _tokenize(tokenizer, *args, **kwargs):
    try:
        return tokenizer(*args, padding=True, return_tensors="pt", return_token_type_ids=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - tokenizers raise plain Exceptions / ValueErrors
        text = str(e)
        if "truncat" in text.lower():
            raise BitFitError(f"a question leaves no room for its context within max_length ({e}): raise "
                              "--max-length or shorten the questions") from e
        if "add_prefix_space" in text:
            raise BitFitError(f"this tokenizer cannot take pre-split words as it is configured ({e}): "
                              "token classification needs a tokenizer that accepts words (e.g. BERT's)") from e
        raise BitFitError(f"cannot tokenize the batch ({e})") from e


def _inputs(enc) -> dict[str, torch.Tensor]:
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}


def encode_tokens(tokenizer, batch: list[TokenExample], labels: list[str], max_length: int):
    """(inputs, targets [B, T], encoding): targets hold the tag index at each word's first sub-token."""
    enc = _tokenize(tokenizer, [list(e.tokens) for e in batch], is_split_into_words=True, truncation=True,
                    max_length=max_length)
    index = {name: i for i, name in enumerate(labels)}
    targets = torch.full(enc["input_ids"].shape, IGNORE, dtype=torch.long)
    for i, e in enumerate(batch):
        first = first_subtokens(enc.word_ids(i), len(e.tokens))
        for w, position in enumerate(first):
            if position >= 0:
                targets[i, position] = index[e.tags[w]]
    return _inputs(enc), targets, enc


def encode_qa(tokenizer, batch: list[QAExample], max_length: int):
    """(inputs, targets [B, 2] of start and end token, encoding)."""
    enc = _tokenize(tokenizer, [e.question for e in batch], [e.context for e in batch], truncation="only_second",
                    max_length=max_length, return_offsets_mapping=True)
    targets = torch.zeros((len(batch), 2), dtype=torch.long)
    for i, e in enumerate(batch):
        if not e.answers:
            continue  # the context does not answer (SQuAD 2.0): target CLS (0, 0)
        a, b = e.starts[0], e.starts[0] + len(e.answers[0])
        offsets = enc["offset_mapping"][i].tolist()
        context = [t for t, s in enumerate(enc.sequence_ids(i)) if s == 1]
        if not context or offsets[context[0]][0] > a or offsets[context[-1]][1] < b:
            continue  # the answer was truncated away: target CLS (0, 0)
        start = max(t for t in context if offsets[t][0] <= a)
        end = min(t for t in context if offsets[t][1] >= b)
        targets[i] = torch.tensor([start, max(start, end)])
    return _inputs(enc), targets, enc


def encode_tags_batch(task: TaskData, tokenizer, batch: list[TokenExample], max_length: int):
    """(inputs, targets [B, T]) for one training batch of token classification."""
    inputs, targets, _ = encode_tokens(tokenizer, batch, task.labels, max_length)
    return inputs, targets


def encode_spans_batch(task: TaskData, tokenizer, batch: list[QAExample], max_length: int):
    """(inputs, targets [B, 2]) for one training batch of extractive QA."""
    inputs, targets, _ = encode_qa(tokenizer, batch, max_length)
    return inputs, targets


def tags_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the labelled tokens (each word's first sub-token)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)


def spans_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean of the start and end cross-entropy over the sequence positions."""
    return (F.cross_entropy(logits[..., 0], targets[:, 0]) + F.cross_entropy(logits[..., 1], targets[:, 1])) / 2


def labelled_tokens(targets: torch.Tensor) -> int:
    """How many terms a token-classification batch's mean loss averages."""
    return int((targets != IGNORE).sum())


# -- evaluation --------------------------------------------------------------------------------------
def trains_no_answer(task: TaskData) -> bool:
    """SQuAD 2.0: some training question has no answer, so the model learns to point at CLS for those, and
    a span must beat CLS (the "no answer" score) to be given."""
    return any(isinstance(e, QAExample) and not e.answers for e in task.train)


def _logits_by_batch(model, examples: list, batch_size: int, encode):
    """(batch, its logits as numpy, its encoding) over `examples`, the model in eval mode meanwhile."""
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(examples), batch_size):
            batch = examples[s : s + batch_size]
            inputs, _, enc = encode(batch)
            with torch.no_grad():
                yield batch, inputs, model(**inputs).float().numpy(), enc
    finally:
        model.train(was_training)


def evaluate_tags(model, tokenizer, task: TaskData, examples: list[TokenExample], max_length: int,
                  batch_size: int = 64) -> dict[str, float]:
    """Token classification in percent: word accuracy (+ entity_f1 for BIO tags)."""
    gold, pred = [], []
    for batch, _, logits, enc in _logits_by_batch(
            model, examples, batch_size, lambda b: encode_tokens(tokenizer, b, task.labels, max_length)):
        for i, e in enumerate(batch):
            wl = word_logits(logits[i], enc.word_ids(i), len(e.tokens))
            pred.append([None if np.isnan(row[0]) else task.labels[int(row.argmax())] for row in wl])
            gold.append(list(e.tags))
    out = {"accuracy": word_accuracy(pred, gold)}
    if is_bio(task.labels):
        out["entity_f1"] = entity_f1(pred, gold)
    return out


def evaluate_spans(model, tokenizer, task: TaskData, examples: list[QAExample], max_length: int,
                   batch_size: int = 64) -> dict[str, float]:
    """Extractive QA in percent: SQuAD exact_match and f1 (SQuAD 2.0 rules when trained with unanswerable
    questions), decoded with the runtime's own functions."""
    gold, pred = [], []
    no_answer = trains_no_answer(task)
    for batch, inputs, logits, enc in _logits_by_batch(
            model, examples, batch_size, lambda b: encode_qa(tokenizer, b, max_length)):
        mask = inputs["attention_mask"].numpy() == 1
        for i, e in enumerate(batch):
            allowed = np.array([s == 1 for s in enc.sequence_ids(i)]) & mask[i]
            start, end, score = best_span(logits[i, :, 0], logits[i, :, 1], allowed, DEFAULT_MAX_ANSWER_TOKENS)
            offsets = enc["offset_mapping"][i].tolist()
            null = null_score(logits[i, :, 0], logits[i, :, 1])
            answered = allowed.any() and not (no_answer and answers_nothing(null, score))
            pred.append(e.context[offsets[start][0] : offsets[end][1]] if answered else "")
            gold.append(list(e.answers))
    return squad_metrics(pred, gold)


def word_accuracy(pred: list[list[str | None]], gold: list[list[str]]) -> float:
    pairs = [(p, g) for ps, gs in zip(pred, gold) for p, g in zip(ps, gs)]
    return 100.0 * sum(p == g for p, g in pairs) / max(len(pairs), 1)


def entities(tags: list[str | None]) -> set[tuple[str, int, int]]:
    """(type, first word, last word) of each entity in a BIO sequence, conlleval-style: an I-X that does
    not continue an X entity starts one. A word without a prediction counts as O."""
    found, current = set(), None
    for i, tag in enumerate([t or "O" for t in tags] + ["O"]):
        kind = tag[2:] if tag[:2] in ("B-", "I-") else None
        if current is not None and (kind != current[0] or tag.startswith("B-")):
            found.add((current[0], current[1], i - 1))
            current = None
        if kind is not None and current is None:
            current = (kind, i)
    return found


def entity_f1(pred: list[list[str | None]], gold: list[list[str]]) -> float:
    tp = n_pred = n_gold = 0
    for p, g in zip(pred, gold):
        ep, eg = entities(p), entities(g)
        tp, n_pred, n_gold = tp + len(ep & eg), n_pred + len(ep), n_gold + len(eg)
    return 0.0 if tp == 0 else 100.0 * 2 * tp / (n_pred + n_gold)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _f1(prediction: str, truth: str) -> float:
    p, t = normalize_answer(prediction).split(), normalize_answer(truth).split()
    if not p or not t:  # SQuAD 2.0: "no answer" scores 1 against "no answer" only
        return float(p == t)
    common = sum((collections.Counter(p) & collections.Counter(t)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(t)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(pred: list[str], gold: list[list[str]]) -> dict[str, float]:
    """Exact match and token F1 in percent, each the best over an example's gold answers (SQuAD v1.1); an
    example without gold answers is right only for an empty prediction (SQuAD 2.0)."""
    gold = [list(gs) or [""] for gs in gold]
    em = [max(float(normalize_answer(p) == normalize_answer(g)) for g in gs) for p, gs in zip(pred, gold)]
    f1 = [max(_f1(p, g) for g in gs) for p, gs in zip(pred, gold)]
    return {"exact_match": 100.0 * float(np.mean(em)), "f1": 100.0 * float(np.mean(f1))}
