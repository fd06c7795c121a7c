"""Packs of every head shape for the graph-export tests, and the head in numpy as their reference."""
from __future__ import annotations

import dataclasses

import numpy as np
from bitfit.runtime.heads import (
    HEAD_BIAS,
    HEAD_POOLER_BIAS,
    HEAD_POOLER_WEIGHT,
    HEAD_WEIGHT,
)
from bitfit.runtime.pack import TaskPack, TensorSpec


def variant_pack(pack: TaskPack, *, task: str, task_kind: str, pooling: str, labels: list[str], seed: int) -> TaskPack:
    """`pack`'s biases plus noise, with a random head of len(labels) rows (and a pooler for pooling="pooler")."""
    rng = np.random.default_rng(seed)
    h = pack.manifest.hidden_size
    k = 1 if task_kind == "regression" else len(labels)
    tensors = {name: (v + rng.normal(0, 0.1, v.shape)).astype(np.float32) for name, v in pack.biases.items()}
    head = {HEAD_WEIGHT: rng.normal(0, 0.5, (k, h)), HEAD_BIAS: rng.normal(0, 0.5, k)}
    if pooling == "pooler":
        head |= {HEAD_POOLER_WEIGHT: rng.normal(0, 0.2, (h, h)), HEAD_POOLER_BIAS: rng.normal(0, 0.2, h)}
    head = {name: v.astype(np.float32) for name, v in head.items()}
    manifest = dataclasses.replace(
        pack.manifest, task=task, task_kind=task_kind, pooling=pooling, labels=labels, tensors_sha256="",
        head=[TensorSpec(name, v.shape) for name, v in head.items()],
    )
    out = TaskPack(manifest, {**tensors, **head})
    out.validate(task)
    return out


def numpy_head(pack: TaskPack, hidden: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits [B, K], token_logits [B, T, K]) of `pack`'s head over its hidden states."""
    t, m = pack.tensors, pack.manifest
    w, b = t[HEAD_WEIGHT], t[HEAD_BIAS]
    mask = attention_mask[..., None].astype(np.float32)
    if m.pooling == "cls":
        pooled = hidden[:, 0]
    elif m.pooling == "pooler":
        pooled = np.tanh(hidden[:, 0] @ t[HEAD_POOLER_WEIGHT].T + t[HEAD_POOLER_BIAS])
    elif m.pooling == "mean":
        pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1.0)
    else:  # "none": token kinds; the graph's logits are then the bias alone
        pooled = np.zeros_like(hidden[:, 0])
    return pooled @ w.T + b, hidden @ w.T + b
