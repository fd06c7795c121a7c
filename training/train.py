"""BitFit training: freeze the encoder, train the chosen bias kinds and a small head, save a task pack."""
from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from runtime.errors import BitFitError, PackError
from runtime.pack import HEAD_BIAS, HEAD_WEIGHT, MANIFEST_FILE, PackManifest, TaskPack, TensorSpec, save_pack

from runtime.version import __version__
from .biases import BiasSlot, find_biases, parse_subset
from .data import Example, TaskData, load_task_data
from .metrics import evaluate
from .model import BitFitModel, base_fingerprint, count_parameters, load_encoder, load_tokenizer, max_positions


@dataclass
class TrainResult:
    pack_path: Path | None
    pack: TaskPack | None  # None when `select` chose other than bias parameters (research runs)
    history: list[dict[str, Any]]
    best_epoch: int
    dev: dict[str, float]
    test: dict[str, float] = field(default_factory=dict)
    train: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    trainable_params: int = 0  # encoder parameters trained (masked entries only) + head
    base_params: int = 0
    model: BitFitModel | None = None  # the trained model, at its best epoch


@dataclass
class Selection:
    """What a research method trains: encoder parameters, and optional 0/1 gradient masks for them (by
    position in `params`) when only some entries of a tensor may change. The head always trains."""

    params: list[torch.nn.Parameter]
    masks: dict[int, torch.Tensor] = field(default_factory=dict)

    def count(self) -> int:
        return sum(int(self.masks[i].sum()) if i in self.masks else p.numel() for i, p in enumerate(self.params))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def mark_trainable(model: BitFitModel, slots: list[BiasSlot]) -> list[torch.nn.Parameter]:
    """Freeze everything, then unfreeze the chosen biases and the head (chosen by module, not by name)."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = [s.parameter for s in slots] + list(model.head.parameters())
    for p in params:
        p.requires_grad_(True)
    return params


def train(
    model: str | os.PathLike,
    data: str | os.PathLike | TaskData,
    out: str | os.PathLike | None,
    *,
    biases: str = "all",
    epochs: int = 5,
    lr: float = 1e-3,
    batch_size: int = 16,
    warmup: float = 0.1,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    max_length: int = 128,
    pooling: str = "mean",
    task_kind: str = "auto",
    task_name: str | None = None,
    dev: str | os.PathLike | None = None,
    train_size: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = tqdm.write,
    select: Callable[[BitFitModel], Selection] | None = None,
) -> TrainResult:
    """BitFit-train `model` on `data` and save a task pack to `out` (None: keep it in memory only).

    data: a CSV/TSV/JSONL file (`text`, `label`, optional `text_pair`), a built-in name (see
    training.data), or a TaskData. The best epoch on the dev split is what the pack keeps.

    select: research use only (experiments/): train other parameters than biases, e.g. full fine-tuning
    or random masks. Such a run makes no task pack (out must be None); `biases` is then ignored.
    """
    if select is not None and out is not None:
        raise BitFitError("a run with select= trains more than biases and makes no task pack: pass out=None")
    started = time.perf_counter()
    if out is not None and Path(out).exists() and not overwrite:
        raise PackError(f"{out} already exists: choose another --out, or pass --overwrite to replace it")
    if epochs < 1 or batch_size < 1 or lr <= 0 or not 0 <= warmup < 1:
        raise BitFitError("need epochs >= 1, batch_size >= 1, lr > 0 and 0 <= warmup < 1")
    if pooling not in ("mean", "cls"):
        raise BitFitError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
    kinds = parse_subset(biases)
    task = data if isinstance(data, TaskData) else load_task_data(data, dev=dev, task_kind=task_kind, train_size=train_size)
    if not task.train or not task.dev:
        raise BitFitError(f"{task.name}: need non-empty train and dev splits")

    seed_everything(seed)
    tokenizer = load_tokenizer(model)
    encoder = load_encoder(model)
    fingerprint = base_fingerprint(encoder)
    limit = max_positions(encoder, tokenizer)
    if max_length > limit:
        log(f"max_length {max_length} is more than {model} takes: using {limit}")
        max_length = limit
    slots = find_biases(encoder, kinds)
    num_outputs = len(task.labels) if task.kind == "classification" else 1
    net = BitFitModel(encoder, num_outputs, pooling)
    masks: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    if select is None:
        params = mark_trainable(net, slots)
        n_bias = sum(s.parameter.numel() for s in slots)
        what = f"bias parameters ({','.join(kinds)}"
    else:
        chosen = select(net)
        for p in net.parameters():
            p.requires_grad_(False)
        params = list(dict.fromkeys([*chosen.params, *net.head.parameters()]))
        for p in params:
            p.requires_grad_(True)
        masks = [(chosen.params[i], m.to(chosen.params[i].dtype)) for i, m in chosen.masks.items()]
        n_bias = chosen.count()
        what = "selected parameters (research run"
    n_head = sum(p.numel() for p in net.head.parameters())
    n_base = count_parameters(encoder)
    log(
        f"BitFit on {task.name}: training {n_bias:,} {what}; {n_bias / n_base:.3%} of "
        f"{n_base:,}) + {n_head:,} head parameters; {len(task.train)} train / {len(task.dev)} dev examples"
    )

    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(task.train) + batch_size - 1) // batch_size)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(warmup * steps), steps)
    y_train = task.targets(task.train)
    loss_fn = torch.nn.MSELoss() if task.kind == "regression" else torch.nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)

    history: list[dict[str, Any]] = []
    best: tuple[float, int] | None = None
    best_tensors: list[torch.Tensor] = []
    for epoch in range(1, epochs + 1):
        net.train()
        order = torch.randperm(len(task.train), generator=generator).tolist()
        losses = []
        bar = tqdm(batches(task.train, batch_size, order), desc=f"{task.name} epoch {epoch}/{epochs}",
                   disable=not progress, leave=False)
        for s, batch in zip(range(0, len(order), batch_size), bar):
            inputs = encode_batch(tokenizer, batch, max_length)
            target = torch.from_numpy(y_train[order[s : s + batch_size]])
            output = net(**inputs)
            loss = loss_fn(output[:, 0], target) if task.kind == "regression" else loss_fn(output, target)
            if not torch.isfinite(loss):
                raise BitFitError(f"the loss became {loss.item()} at epoch {epoch}: lower the learning rate (now {lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for p, mask in masks:  # entries outside a mask never move: AdamW steps 0 for a gradient always 0
                p.grad.mul_(mask)
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        dev_metrics = evaluate(task.metric, predict(net, tokenizer, task.dev, max_length), task.targets(task.dev))
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), **{f"dev_{k}": v for k, v in dev_metrics.items()}})
        log(f"  epoch {epoch}: loss {np.mean(losses):.4f}, dev {task.metric} {dev_metrics[task.metric]:.2f}")
        if best is None or dev_metrics[task.metric] > best[0]:
            best = (dev_metrics[task.metric], epoch)
            best_tensors = [p.detach().clone() for p in params]

    with torch.no_grad():  # restore the best epoch
        for p, saved in zip(params, best_tensors):
            p.copy_(saved)
    dev_metrics = evaluate(task.metric, predict(net, tokenizer, task.dev, max_length), task.targets(task.dev))
    test_metrics = (
        evaluate(task.metric, predict(net, tokenizer, task.test, max_length), task.targets(task.test)) if task.test else {}
    )
    train_sample = task.train[:2000]
    train_metrics = evaluate(task.metric, predict(net, tokenizer, train_sample, max_length), task.targets(train_sample))

    if select is not None:
        return TrainResult(None, None, history, best[1], dev_metrics, test_metrics, train_metrics,
                           time.perf_counter() - started, n_bias + n_head, n_base, net)
    tensors = {s.name: s.parameter.detach().float().numpy().copy() for s in slots}
    tensors[HEAD_WEIGHT] = net.head.weight.detach().float().numpy().copy()
    tensors[HEAD_BIAS] = net.head.bias.detach().float().numpy().copy()
    base_id = os.path.abspath(model) if Path(model).is_dir() else str(model)
    manifest = PackManifest(
        task=task_name or task.name,
        task_kind=task.kind,
        labels=list(task.labels),
        pooling=pooling,
        max_length=max_length,
        text_pair=task.text_pair,
        base_model=base_id,
        base_model_type=encoder.config.model_type,
        base_fingerprint=fingerprint,
        hidden_size=encoder.config.hidden_size,
        tokenizer=base_id,
        bias_subset=list(kinds),
        biases=[TensorSpec(s.name, tuple(s.parameter.shape), "float32", s.kind, s.layer, s.source) for s in slots],
        head=[TensorSpec(k, tensors[k].shape) for k in (HEAD_WEIGHT, HEAD_BIAS)],
        trainable_params=n_bias + n_head,
        base_params=n_base,
        metrics={
            "metric": task.metric,
            "best_epoch": best[1],
            "dev": dev_metrics,
            "test": test_metrics,
            "train": train_metrics,
            "history": history,
            "data": task.source,
            "train_examples": len(task.train),
            "hyperparameters": {"lr": lr, "epochs": epochs, "batch_size": batch_size, "warmup": warmup,
                                "weight_decay": weight_decay, "seed": seed, "max_grad_norm": max_grad_norm},
        },
        tool_version=__version__,
    )
    pack = TaskPack(manifest, tensors)
    path = save_pack(pack, out, overwrite=overwrite) if out is not None else None
    if path is not None:
        log(f"saved task pack {manifest.task!r} to {path} ({pack.nbytes / 1024:.1f} KiB of tensors, {MANIFEST_FILE})")
    return TrainResult(path, pack, history, best[1], dev_metrics, test_metrics, train_metrics,
                       time.perf_counter() - started, n_bias + n_head, n_base, net)
