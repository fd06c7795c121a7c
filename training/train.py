"""BitFit training: freeze the encoder, train the chosen bias kinds and a small head, save a task pack."""
from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bitfit.encoder.biases import BiasSlot, find_biases, parse_subset
from bitfit.encoder.model import (
    BitFitModel,
    base_fingerprint,
    count_parameters,
    load_encoder,
    load_pooler,
    load_tokenizer,
    max_positions,
)
from bitfit.runtime.errors import BitFitError, PackError
from bitfit.runtime.fs import check_target
from bitfit.runtime.heads import POOLINGS
from bitfit.runtime.kinds import kind
from bitfit.runtime.pack import (
    FORMAT,
    MANIFEST_FILE,
    PackManifest,
    TaskPack,
    TensorSpec,
    min_max_length,
    save_pack,
    two_texts,
)
from bitfit.runtime.schema import check_task_name
from bitfit.runtime.version import __version__
from tqdm.auto import tqdm

from .data import TaskData, load_task_data
from .objectives import objective
from .sequence import batches
from .tokens import trains_no_answer


# linear: warm-up over `warmup` of the steps, then linear decay to 0; constant: the LR throughout (the BitFit
# authors' code; `warmup` is then ignored)
SCHEDULES = ("linear", "constant")


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
    model: BitFitModel | None = None  # the trained model, at its best epoch (on the CPU)
    is_main_process: bool = True  # False in the other processes of a multi-process run: they write nothing


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


class OnDevice(torch.nn.Module):
    """`net` fed CPU batches and answering on the CPU, as the objectives' evaluate functions expect, while
    it lives on a GPU."""

    def __init__(self, net: torch.nn.Module, device: torch.device):
        super().__init__()
        self.net, self.device = net, device

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.net(**{k: v.to(self.device) for k, v in inputs.items()}).cpu()


def make_accelerator():
    """This process's accelerate.Accelerator: one of several DDP processes under `accelerate launch` or
    torchrun, else a lone process. CPU unless CUDA is there: given a GPU-less launch, accelerate would leave
    each process alone instead of joining them over gloo, and MPS / XPU machines keep the CPU as before."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:  # each would train alone and all would write the pack
        raise BitFitError(f"launched as {launched} processes but accelerate joined {accelerator.num_processes}: "
                          "start multi-process runs with `accelerate launch` or torchrun")
    return accelerator


def loss_terms(kind: str, target: torch.Tensor) -> int:
    """How many terms a batch's mean loss averages: labelled tokens, else rows (QA averages start and end
    within each row)."""
    return objective(kind).terms(target)


def shard(inputs: dict[str, torch.Tensor], target: torch.Tensor, kind: str, rank: int,
          world: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, float]:
    """Process `rank`'s contiguous rows of a global batch, and the weight for its loss (a mean over its own
    terms) that makes DDP's average of the processes' gradients the gradient of the whole batch's mean loss:
    world * terms here / terms in the batch, exact for uneven shards and token-level losses. A process left
    without terms still runs one row, weighted 0 (DDP needs every process in each backward); a batch
    without any terms weighs NaN, so it stops the run as the NaN mean does in one process."""
    if world == 1:
        return inputs, target, 1.0
    n = len(target)
    lo, hi = n * rank // world, n * (rank + 1) // world
    total, here = loss_terms(kind, target), loss_terms(kind, target[lo:hi])
    if here == 0:
        lo, hi = 0, 1
    weight = world * here / total if total else float("nan")
    return {k: v[lo:hi] for k, v in inputs.items()}, target[lo:hi], weight


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
    schedule: str = "linear",
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    max_length: int = 128,
    pooling: str = "auto",
    task_kind: str = "auto",
    task_name: str | None = None,
    dev: str | os.PathLike | None = None,
    train_size: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = tqdm.write,
    select: Callable[[BitFitModel], Selection] | None = None,
    train_pooler: bool = False,
) -> TrainResult:
    """BitFit-train `model` on `data` and save a task pack to `out` (None: keep it in memory only).

    data: a CSV/TSV/JSONL file (`text`, `label`, optional `text_pair`), a built-in name (see
    training.data), or a TaskData; token-level JSONL files (see training.data) are recognised by their
    keys, or named with task_kind "token-classification" / "question-answering". The best epoch on the
    dev split is what the pack keeps.

    pooling: "auto" (mean for sequence kinds, "none" for token kinds), "mean", "cls", or "pooler" (the base
    checkpoint's own BERT pooler, frozen unless train_pooler=True; refused if the checkpoint has none).

    schedule: "linear" (warm-up for `warmup` of the steps, then linear decay) or "constant" (the LR throughout,
    as the BitFit authors' code trains).

    select: research use only (experiments/): train other parameters than biases, e.g. full fine-tuning
    or random masks. Such a run makes no task pack (out must be None); `biases` is then ignored.

    Under `accelerate launch` (or torchrun) the processes train one model with DDP: batch_size stays the
    global batch, every process draws the same order and takes its share of each batch's rows, and the
    result equals a one-process run up to float rounding (dropout draws differ, so with dropout it matches
    in distribution). Only the main process logs and writes the pack; all return once it is written.
    """
    if select is not None and out is not None:
        raise BitFitError("a run with select= trains more than biases and makes no task pack: pass out=None")
    started = time.perf_counter()
    if out is not None:  # before any work: an existing pack without overwrite, or an unwritable place
        check_target(out, overwrite=overwrite, marker=MANIFEST_FILE, format=FORMAT, what="task pack", error=PackError)
    if task_name is not None:
        check_task_name(task_name, fix="pass another --name")
    if epochs < 1 or batch_size < 1 or not lr > 0 or not math.isfinite(lr) or not 0 <= warmup < 1 or max_length < 1:
        raise BitFitError(f"need epochs >= 1, batch_size >= 1, a finite lr > 0, 0 <= warmup < 1 and max_length >= 1; "
                          f"got {epochs}, {batch_size}, {lr}, {warmup}, {max_length}")
    if schedule not in SCHEDULES:
        raise BitFitError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if train_size is not None and train_size < 1:
        raise BitFitError(f"train_size must be at least 1 (or None: all), got {train_size}")
    if pooling != "auto" and pooling not in POOLINGS:
        raise BitFitError(f"pooling must be auto, {', '.join(POOLINGS)}; got {pooling!r}")
    kinds = parse_subset(biases)
    task = data if isinstance(data, TaskData) else load_task_data(data, dev=dev, task_kind=task_kind, train_size=train_size)
    if not task.train or not task.dev:
        raise BitFitError(f"{task.name}: need non-empty train and dev splits")
    if task_name is None:  # the data set's name, e.g. a file's stem: "my data" cannot be served
        check_task_name(task.name, fix="name the task with --name")
    token_level = kind(task.kind).token_level
    trains = objective(task.kind)
    if pooling == "auto":
        pooling = "none" if token_level else "mean"
    if token_level != (pooling == "none"):
        raise BitFitError(f"a {task.kind} task cannot use pooling {pooling!r}: token-level tasks take pooling 'none' "
                          "(or auto), sequence tasks mean, cls or pooler")
    if train_pooler and pooling != "pooler":
        raise BitFitError(f"train_pooler needs pooling 'pooler', got {pooling!r}")

    accelerator = make_accelerator()
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    if not accelerator.is_main_process:
        log, progress = (lambda _: None), False
    seed_everything(seed)
    tokenizer = load_tokenizer(model)
    pair = two_texts(task.kind, task.text_pair)
    least = min_max_length(pair, tokenizer.num_special_tokens_to_add(pair=pair))
    if max_length < least:  # every text would be truncated to nothing (or not truncated at all)
        raise BitFitError(f"max_length {max_length} cannot hold the tokenizer's special tokens and one token of "
                          f"{'each text' if pair else 'the text'}: give --max-length {least} or more")
    encoder = load_encoder(model)
    fingerprint = base_fingerprint(encoder)
    limit = max_positions(encoder, tokenizer)
    if max_length > limit:
        log(f"max_length {max_length} is more than {model} takes: using {limit}")
        max_length = limit
    slots = find_biases(encoder, kinds)
    num_outputs = kind(task.kind).outputs(task.labels)
    net = BitFitModel(encoder, num_outputs, pooling, pooler=load_pooler(model) if pooling == "pooler" else None)
    n_base = count_parameters(encoder)  # before `select`, which may add parameters (LoRA)
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
    if train_pooler:
        net.pooler.requires_grad_(True)
        params = [*params, *net.pooler.parameters()]
    n_head = sum(p.numel() for p in net.head.parameters())
    if train_pooler:
        n_head += sum(p.numel() for p in net.pooler.parameters())
    log(
        f"BitFit on {task.name}: training {n_bias:,} {what}; {n_bias / n_base:.3%} of "
        f"{n_base:,}) + {n_head:,} head parameters; {len(task.train)} train / {len(task.dev)} dev examples"
    )

    from transformers import get_constant_schedule, get_linear_schedule_with_warmup

    net.to(device)  # before the optimizer and masks are made; prepare() would move it too
    masks = [(p, m.to(device)) for p, m in masks]
    # DDP syncs only the parameters that require grad; all of them take part in every forward
    ddp, optimizer = accelerator.prepare(net, torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay))
    steps = epochs * ((len(task.train) + batch_size - 1) // batch_size)
    # not prepared: accelerate would step it once per process, but `steps` counts global batches
    scheduler = (get_linear_schedule_with_warmup(optimizer.optimizer, int(warmup * steps), steps) if schedule == "linear"
                 else get_constant_schedule(optimizer.optimizer))
    scorer = net if device.type == "cpu" else OnDevice(net, device)

    def score(examples: list) -> dict[str, float]:
        # every process scores the whole split alike, so all agree on the best epoch
        return trains.evaluate(scorer, tokenizer, task, examples, max_length)

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
        for batch in bar:
            # the whole global batch is encoded, so the shards keep its padding, as one process would
            inputs, target, weight = shard(*trains.encode(task, tokenizer, batch, max_length), task.kind, rank, world)
            output = ddp(**{k: v.to(device) for k, v in inputs.items()})
            if weight == 0:  # a stand-in row: it joins the gradient exchange and adds nothing
                loss = output.sum() * 0.0
            else:
                loss = trains.loss(output, target.to(device)) * weight
            batch_loss = accelerator.reduce(loss.detach(), "mean")  # the global batch's mean loss, everywhere
            if not torch.isfinite(batch_loss):  # all processes stop alike
                raise BitFitError(f"the loss became {batch_loss.item()} at epoch {epoch}: lower the learning "
                                  f"rate (now {lr})")
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            for p, mask in masks:  # entries outside a mask never move: AdamW steps 0 for a gradient always 0
                p.grad.mul_(mask)
            accelerator.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            scheduler.step()
            losses.append(batch_loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        dev_metrics = score(task.dev)
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), **{f"dev_{k}": v for k, v in dev_metrics.items()}})
        log(f"  epoch {epoch}: loss {np.mean(losses):.4f}, dev {task.metric} {dev_metrics[task.metric]:.2f}")
        if best is None or dev_metrics[task.metric] > best[0]:
            best = (dev_metrics[task.metric], epoch)
            best_tensors = [p.detach().clone() for p in params]

    with torch.no_grad():  # restore the best epoch
        for p, saved in zip(params, best_tensors):
            p.copy_(saved)
    dev_metrics = score(task.dev)
    test_metrics = score(task.test) if task.test else {}
    train_metrics = score(task.train[:2000])
    net.to("cpu")

    if select is not None:
        return TrainResult(None, None, history, best[1], dev_metrics, test_metrics, train_metrics,
                           time.perf_counter() - started, n_bias + n_head, n_base, net, accelerator.is_main_process)
    tensors = {s.name: s.parameter.detach().float().numpy().copy() for s in slots}
    head = net.head_tensors()
    tensors.update(head)
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
        head=[TensorSpec(k, v.shape) for k, v in head.items()],
        no_answer=trains_no_answer(task),
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
                                "schedule": schedule,
                                "weight_decay": weight_decay, "seed": seed, "max_grad_norm": max_grad_norm,
                                **({"train_pooler": True} if train_pooler else {})},
        },
        tool_version=__version__,
    )
    pack = TaskPack(manifest, tensors)
    path = save_pack(pack, out, overwrite=overwrite) if out is not None and accelerator.is_main_process else None
    if path is not None:
        log(f"saved task pack {manifest.task!r} to {path} ({pack.nbytes / 1024:.1f} KiB of tensors, {MANIFEST_FILE})")
    accelerator.wait_for_everyone()  # so that on every process, a returned train() means the pack is on disk
    return TrainResult(path, pack, history, best[1], dev_metrics, test_metrics, train_metrics,
                       time.perf_counter() - started, n_bias + n_head, n_base, net, accelerator.is_main_process)
