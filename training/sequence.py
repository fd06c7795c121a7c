"""Sequence kinds on the torch side: batches of texts (and pairs) and the model's outputs over a split."""
from __future__ import annotations

import numpy as np
import torch
from bitfit.encoder.model import BitFitModel

from .data import Example


def batches(examples: list[Example], size: int, order: list[int] | None = None) -> list[list[Example]]:
    idx = order if order is not None else list(range(len(examples)))
    return [[examples[i] for i in idx[s : s + size]] for s in range(0, len(idx), size)]


def encode_batch(tokenizer, batch: list[Example], max_length: int) -> dict[str, torch.Tensor]:
    texts = [e.text for e in batch]
    pairs = [e.text_pair or "" for e in batch] if any(e.text_pair is not None for e in batch) else None
    # token_type_ids always: the runtime feeds them to models that read them, so training must see the same
    enc = tokenizer(texts, pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt",
                    return_token_type_ids=True)
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}


@torch.no_grad()
def predict(model: BitFitModel, tokenizer, examples: list[Example], max_length: int, batch_size: int = 64) -> np.ndarray:
    """Model outputs (logits, or the value for regression) for `examples`, in eval mode."""
    was_training = model.training
    model.eval()
    outs = [model(**encode_batch(tokenizer, b, max_length)).float().numpy() for b in batches(examples, batch_size)]
    model.train(was_training)
    return np.concatenate(outs)
