"""BitFit training: freeze the encoder, train the chosen bias kinds and a small head, save a task pack."""
from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
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
from bitfit.runtime import args as A
from bitfit.runtime import schema as S
from bitfit.runtime.errors import BitFitError, PackError
from bitfit.runtime.fs import check_target
from bitfit.runtime.heads import POOLINGS
from bitfit.runtime.kinds import kind as task_kind_of
from bitfit.runtime.pack import (
    FORMAT,
    MANIFEST_FILE,
    PackManifest,
    TaskPack,
    TensorSpec,
    min_max_length,
    model_identity,
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


def loss_terms(task_kind: str, target: torch.Tensor) -> int:
    """How many terms a batch's mean loss averages: labelled tokens, else rows (QA averages start and end
    within each row)."""
    return objective(task_kind).terms(target)


def shard(inputs: dict[str, torch.Tensor], target: torch.Tensor, task_kind: str, rank: int,
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
    total, here = loss_terms(task_kind, target), loss_terms(task_kind, target[lo:hi])
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


def _positive(v: Any) -> bool:
    return A.number().check(v) and v > 0


# Every option of a training run, with what it accepts: checked when a TrainConfig is made, so a wrong type or
# range is a BitFitError naming the option (never a TypeError from range() or torch deep inside the run).
OPTION_FIELDS: dict[str, S.Field] = {
    "biases": S.text(256),
    "epochs": A.COUNT,
    "lr": S.Field(_positive, "a finite number > 0"),
    "batch_size": A.COUNT,
    "warmup": S.Field(lambda v: A.number(0, 1).check(v) and v < 1, "a finite number from 0 to below 1"),
    "schedule": S.one_of(SCHEDULES),
    "weight_decay": A.number(0),
    # inf: no clipping (torch's clip_grad_norm_ takes it); NaN or <= 0 would zero or poison every step
    "max_grad_norm": S.Field(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
                             "a number > 0 (inf: no clipping)"),
    "max_length": S.integer(1, 1 << 20),
    "pooling": S.text(64),  # its values: __post_init__ (the message lists auto and every pooling)
    "task_kind": S.text(64),  # "auto" or a registered kind: checked where the data is read (training.data)
    "task_name": A.optional(A.ANY),  # the task-name alphabet: __post_init__ (runtime.schema.check_task_name)
    "dev": A.optional(A.PATH),
    "train_size": A.optional(A.COUNT),
    "seed": S.integer(0, 2**32 - 1),  # numpy's seed takes no more
    "overwrite": S.boolean(),
    "progress": S.boolean(),
    "log": A.CALLABLE,
    "select": A.optional(A.CALLABLE),
    "train_pooler": S.boolean(),
}
# the ranges of the numeric options together, in each one's message (tests and users know this wording)
_RANGED = ("epochs", "batch_size", "lr", "warmup", "max_length")
_RANGES = "need epochs >= 1, batch_size >= 1, a finite lr > 0, 0 <= warmup < 1 and max_length >= 1"


@dataclass
class TrainConfig:
    """The options of one training run, checked when made (as peft's configs are): `train(model, data, out,
    **options)` builds one, `bitfit train` too.

    pooling: "auto" (mean for sequence kinds, "none" for token kinds), "mean", "cls", or "pooler" (the base
    checkpoint's own BERT pooler, frozen unless train_pooler=True; refused if the checkpoint has none).
    schedule: "linear" (warm-up for `warmup` of the steps, then linear decay) or "constant" (the LR throughout,
    as the BitFit authors' code trains). task_kind: "auto" (from the data) or a registered task kind.
    select: research use only (experiments/): train other parameters than biases, e.g. full fine-tuning or
    random masks. Such a run makes no task pack (out must be None); `biases` is then ignored.
    """

    biases: str = "all"  # "all", or bias kinds: bq,bk,bv,bm1,bLN1,bm2,bm3,bLN2,bLNe
    epochs: int = 5
    lr: float = 1e-3  # bias-only training wants a high learning rate
    batch_size: int = 16  # the global batch (split across processes under DDP)
    warmup: float = 0.1  # share of the steps with linear warm-up (schedule "linear")
    schedule: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 128
    pooling: str = "auto"
    task_kind: str = "auto"
    task_name: str | None = None  # default: the data set's name
    dev: str | os.PathLike | None = None  # a dev file (default: a seeded 10% of the data)
    train_size: int | None = None  # only the first N training examples
    seed: int = 0
    overwrite: bool = False
    progress: bool = True
    log: Callable[[str], None] = tqdm.write
    select: Callable[[BitFitModel], Selection] | None = None
    train_pooler: bool = False

    def __post_init__(self) -> None:
        for name, check in OPTION_FIELDS.items():
            try:
                A.check(name, getattr(self, name), check)
            except BitFitError as e:
                raise BitFitError(f"{e} ({_RANGES})" if name in _RANGED else str(e)) from None
        if self.pooling != "auto" and self.pooling not in POOLINGS:
            raise BitFitError(f"pooling must be auto, {', '.join(POOLINGS)}; got {self.pooling!r}")
        if self.train_pooler and self.pooling != "pooler":
            raise BitFitError(f"train_pooler needs pooling 'pooler', got {self.pooling!r}")
        if self.task_name is not None:
            check_task_name(self.task_name, fix="pass another --name")

    @classmethod
    def of(cls, config: TrainConfig | None = None, **options: Any) -> TrainConfig:
        """`config` (default: the defaults) with `options` replacing its fields; unknown names refused."""
        if config is not None and not isinstance(config, TrainConfig):
            raise BitFitError(f"config must be a TrainConfig or None, got {type(config).__name__}")
        unknown = sorted(set(options) - set(OPTION_FIELDS))
        if unknown:
            raise BitFitError(f"train() takes no option {', '.join(unknown)}: its options are "
                              f"{', '.join(OPTION_FIELDS)}")
        return replace(config, **options) if config is not None else cls(**options)

    def hyperparameters(self) -> dict[str, Any]:
        """What the pack's metrics record of the run."""
        return {"lr": self.lr, "epochs": self.epochs, "batch_size": self.batch_size, "warmup": self.warmup,
                "schedule": self.schedule, "weight_decay": self.weight_decay, "seed": self.seed,
                "max_grad_norm": self.max_grad_norm, **({"train_pooler": True} if self.train_pooler else {})}


def train(
    model: str | os.PathLike,
    data: str | os.PathLike | TaskData,
    out: str | os.PathLike | None,
    config: TrainConfig | None = None,
    **options: Any,
) -> TrainResult:
    """BitFit-train `model` on `data` and save a task pack to `out` (None: keep it in memory only).

    config: a TrainConfig; `options` are its fields by name (epochs=3, lr=1e-2, ...), replacing config's.

    data: a CSV/TSV/JSONL file (`text`, `label`, optional `text_pair`), a built-in name (see
    training.data), or a TaskData; token-level JSONL files (see training.data) are recognised by their
    keys, or named with task_kind "token-classification" / "question-answering". The best epoch on the
    dev split is what the pack keeps.

    Under `accelerate launch` (or torchrun) the processes train one model with DDP: batch_size stays the
    global batch, every process draws the same order and takes its share of each batch's rows, and the
    result equals a one-process run up to float rounding (dropout draws differ, so with dropout it matches
    in distribution). Only the main process logs and writes the pack; all return once it is written.
    """
    cfg = TrainConfig.of(config, **options)
    A.check("model", model, A.PATH)
    if not isinstance(data, TaskData):
        A.check("data", data, A.PATH)
    if out is not None:
        A.check("out", out, A.PATH)
    if cfg.select is not None and out is not None:
        raise BitFitError("a run with select= trains more than biases and makes no task pack: pass out=None")
    started = time.perf_counter()
    if out is not None:  # before any work: an existing pack without overwrite, or an unwritable place
        check_target(out, overwrite=cfg.overwrite, marker=MANIFEST_FILE, format=FORMAT, what="task pack",
                     error=PackError)
    bias_kinds = parse_subset(cfg.biases)
    task = data if isinstance(data, TaskData) else load_task_data(data, dev=cfg.dev, task_kind=cfg.task_kind,
                                                                  train_size=cfg.train_size)
    if not task.train or not task.dev:
        raise BitFitError(f"{task.name}: need non-empty train and dev splits")
    if cfg.task_name is None:  # the data set's name, e.g. a file's stem: "my data" cannot be served
        check_task_name(task.name, fix="name the task with --name")
    token_level = task_kind_of(task.kind).token_level
    pooling = ("none" if token_level else "mean") if cfg.pooling == "auto" else cfg.pooling
    if token_level != (pooling == "none"):
        raise BitFitError(f"a {task.kind} task cannot use pooling {pooling!r}: token-level tasks take pooling 'none' "
                          "(or auto), sequence tasks mean, cls or pooler")

    accelerator = make_accelerator()
    if not accelerator.is_main_process:
        cfg = replace(cfg, log=lambda _: None, progress=False)
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(model)
    max_length = _max_length(cfg, task, tokenizer)
    encoder = load_encoder(model)
    fingerprint = base_fingerprint(encoder)
    limit = max_positions(encoder, tokenizer)
    if max_length > limit:
        cfg.log(f"max_length {max_length} is more than {model} takes: using {limit}")
        max_length = limit
    slots = find_biases(encoder, bias_kinds)
    net = BitFitModel(encoder, task_kind_of(task.kind).outputs(task.labels), pooling,
                      pooler=load_pooler(model) if pooling == "pooler" else None)
    chosen = _choose(net, slots, bias_kinds, cfg)
    cfg.log(f"BitFit on {task.name}: training {chosen.n_trained:,} {chosen.what}; "
            f"{chosen.n_trained / chosen.n_base:.3%} of {chosen.n_base:,}) + {chosen.n_head:,} head parameters; "
            f"{len(task.train)} train / {len(task.dev)} dev examples")
    fit = _fit(net, chosen, task, tokenizer, max_length, cfg, accelerator)
    net.to("cpu")
    counts = (chosen.n_trained + chosen.n_head, chosen.n_base)
    if cfg.select is not None:
        return TrainResult(None, None, fit.history, fit.best_epoch, fit.dev, fit.test, fit.train,
                           time.perf_counter() - started, *counts, net, accelerator.is_main_process)
    pack = _pack(model, task, net, slots, bias_kinds, pooling, max_length, fingerprint, encoder, fit, counts, cfg)
    path = save_pack(pack, out, overwrite=cfg.overwrite) if out is not None and accelerator.is_main_process else None
    if path is not None:
        cfg.log(f"saved task pack {pack.name!r} to {path} ({pack.nbytes / 1024:.1f} KiB of tensors, {MANIFEST_FILE})")
    accelerator.wait_for_everyone()  # so that on every process, a returned train() means the pack is on disk
    return TrainResult(path, pack, fit.history, fit.best_epoch, fit.dev, fit.test, fit.train,
                       time.perf_counter() - started, *counts, net, accelerator.is_main_process)


def _max_length(cfg: TrainConfig, task: TaskData, tokenizer) -> int:
    """cfg.max_length, refused when it cannot hold the tokenizer's special tokens and one token of each text."""
    pair = two_texts(task.kind, task.text_pair)
    least = min_max_length(pair, tokenizer.num_special_tokens_to_add(pair=pair))
    if cfg.max_length < least:  # every text would be truncated to nothing (or not truncated at all)
        raise BitFitError(f"max_length {cfg.max_length} cannot hold the tokenizer's special tokens and one token of "
                          f"{'each text' if pair else 'the text'}: give --max-length {least} or more")
    return cfg.max_length


@dataclass
class _Chosen:
    """What a run trains: the parameters (biases or a research selection, then the head and maybe the
    pooler), gradient masks, and the counts the log and the pack report."""

    params: list[torch.nn.Parameter]
    masks: list[tuple[torch.nn.Parameter, torch.Tensor]]
    n_trained: int  # encoder parameters trained (masked entries only)
    n_head: int
    n_base: int
    what: str


def _choose(net: BitFitModel, slots: list[BiasSlot], bias_kinds: list[str], cfg: TrainConfig) -> _Chosen:
    n_base = count_parameters(net.encoder)  # before `select`, which may add parameters (LoRA)
    masks: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    if cfg.select is None:
        params = mark_trainable(net, slots)
        n_trained = sum(s.parameter.numel() for s in slots)
        what = f"bias parameters ({','.join(bias_kinds)}"
    else:
        chosen = cfg.select(net)
        for p in net.parameters():
            p.requires_grad_(False)
        params = list(dict.fromkeys([*chosen.params, *net.head.parameters()]))
        for p in params:
            p.requires_grad_(True)
        masks = [(chosen.params[i], m.to(chosen.params[i].dtype)) for i, m in chosen.masks.items()]
        n_trained = chosen.count()
        what = "selected parameters (research run"
    n_head = sum(p.numel() for p in net.head.parameters())
    if cfg.train_pooler:
        net.pooler.requires_grad_(True)
        params = [*params, *net.pooler.parameters()]
        n_head += sum(p.numel() for p in net.pooler.parameters())
    return _Chosen(params, masks, n_trained, n_head, n_base, what)


@dataclass
class _Fit:
    history: list[dict[str, Any]]
    best_epoch: int
    dev: dict[str, float]
    test: dict[str, float]
    train: dict[str, float]


def _fit(net: BitFitModel, chosen: _Chosen, task: TaskData, tokenizer, max_length: int, cfg: TrainConfig,
         accelerator) -> _Fit:
    """Train for cfg.epochs, keep the best epoch on dev (restored into `net`), and score it on every split."""
    from transformers import get_constant_schedule, get_linear_schedule_with_warmup

    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    trains = objective(task.kind)
    params = chosen.params
    net.to(device)  # before the optimizer and masks are made; prepare() would move it too
    masks = [(p, m.to(device)) for p, m in chosen.masks]
    # DDP syncs only the parameters that require grad; all of them take part in every forward
    ddp, optimizer = accelerator.prepare(net, torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay))
    steps = cfg.epochs * ((len(task.train) + cfg.batch_size - 1) // cfg.batch_size)
    # not prepared: accelerate would step it once per process, but `steps` counts global batches
    scheduler = (get_linear_schedule_with_warmup(optimizer.optimizer, int(cfg.warmup * steps), steps)
                 if cfg.schedule == "linear" else get_constant_schedule(optimizer.optimizer))
    scorer = net if device.type == "cpu" else OnDevice(net, device)

    def score(examples: list) -> dict[str, float]:
        # every process scores the whole split alike, so all agree on the best epoch
        return trains.evaluate(scorer, tokenizer, task, examples, max_length)

    generator = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, Any]] = []
    best: tuple[float, int] | None = None
    best_tensors: list[torch.Tensor] = []
    for epoch in range(1, cfg.epochs + 1):
        net.train()
        order = torch.randperm(len(task.train), generator=generator).tolist()
        losses = []
        bar = tqdm(batches(task.train, cfg.batch_size, order), desc=f"{task.name} epoch {epoch}/{cfg.epochs}",
                   disable=not cfg.progress, leave=False)
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
                                  f"rate (now {cfg.lr})")
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            for p, mask in masks:  # entries outside a mask never move: AdamW steps 0 for a gradient always 0
                p.grad.mul_(mask)
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            losses.append(batch_loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        dev_metrics = score(task.dev)
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)),
                        **{f"dev_{k}": v for k, v in dev_metrics.items()}})
        cfg.log(f"  epoch {epoch}: loss {np.mean(losses):.4f}, dev {task.metric} {dev_metrics[task.metric]:.2f}")
        if best is None or dev_metrics[task.metric] > best[0]:
            best = (dev_metrics[task.metric], epoch)
            best_tensors = [p.detach().clone() for p in params]

    with torch.no_grad():  # restore the best epoch
        for p, saved in zip(params, best_tensors):
            p.copy_(saved)
    return _Fit(history, best[1], score(task.dev), score(task.test) if task.test else {}, score(task.train[:2000]))


def _pack(model: str | os.PathLike, task: TaskData, net: BitFitModel, slots: list[BiasSlot], bias_kinds: list[str],
          pooling: str, max_length: int, fingerprint: str, encoder, fit: _Fit, counts: tuple[int, int],
          cfg: TrainConfig) -> TaskPack:
    """The trained biases and head as a task pack, its manifest recording the run."""
    tensors = {s.name: s.parameter.detach().float().numpy().copy() for s in slots}
    head = net.head_tensors()
    tensors.update(head)
    base_id, base_path = model_identity(model)
    manifest = PackManifest(
        task=cfg.task_name or task.name,
        task_kind=task.kind,
        labels=list(task.labels),
        pooling=pooling,
        max_length=max_length,
        text_pair=task.text_pair,
        base_model=base_id,
        base_model_path=base_path,
        base_model_type=encoder.config.model_type,
        base_fingerprint=fingerprint,
        hidden_size=encoder.config.hidden_size,
        tokenizer=base_id,
        bias_subset=list(bias_kinds),
        biases=[TensorSpec(s.name, tuple(s.parameter.shape), "float32", s.kind, s.layer, s.source) for s in slots],
        head=[TensorSpec(k, v.shape) for k, v in head.items()],
        no_answer=trains_no_answer(task),
        trainable_params=counts[0],
        base_params=counts[1],
        metrics={
            "metric": task.metric,
            "best_epoch": fit.best_epoch,
            "dev": fit.dev,
            "test": fit.test,
            "train": fit.train,
            "history": fit.history,
            "data": task.source,
            "train_examples": len(task.train),
            "hyperparameters": cfg.hyperparameters(),
        },
        tool_version=__version__,
    )
    return TaskPack(manifest, tensors)
