"""Bias banks: every task's biases in one flat binary, for hardware whose weights are fixed.

A fixed-weight accelerator holds the frozen encoder once; switching tasks means loading another set of
bias vectors. A bank lays those sets out for that: ``bank.bin`` holds one block per task, every block
with the SAME layout -- each bias input of the compiled graph, in graph order, little-endian float32.
Biases a pack did not train are filled with the base model's values, so a block is complete on its own
and a task switch is one block copy (base address = task id x block size).

Alignment: each block starts on a 4096-byte boundary (``block_align``), so a block is a whole number of
pages -- it can be mmap-ed, pinned or handed to a DMA engine's page-granular scatter-gather list on its own.
Inside a block every tensor starts on a 64-byte boundary (a cache line, and the burst size of common DMA
engines and AXI buses; BERT-size vectors are multiples of 64 bytes anyway, so it costs nothing there).

Heads (the small per-task output layers, applied on the host) differ in size between tasks, so they
live in a separate region after all blocks, each tensor 64-byte aligned, at offsets given per task;
that keeps every bias block the same size.

``bank.json`` is the memory map (what a reader needs, nothing else), ``bank.h`` the same map as a C
header. Reading needs numpy only (plus this module's JSON): see `read_bank`, or follow bank.json by hand.
This module is the format and its reader; the writer is bitfit.exporters.bank.

Why rows of a block ARE a mixed graph's table rows: bias `b` of task `t` starts at
``t * block_bytes + offset_b``; viewed with a row stride of block_bytes that is a [tasks, dim] table
whose row `t` is what a --mixed graph reads for task_ids == t (`Bank.table`).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from . import schema as S
from .errors import BitFitError, IncompatibleError, PackError, UnknownTaskError
from .fs import regular_size, sha256_file
from .heads import POOLINGS
from .manifest import Format, read_versioned
from .pack import BIAS_KINDS, PackManifest, TaskPack

FORMAT = "bitfit-bias-bank"
# 2: bank.json carries its own sha256 (a hand edit of a label or an offset is refused), bank.h repeats it
FORMAT_VERSION = 2
BANK_FILE = "bank.bin"
MAP_FILE = "bank.json"
HEADER_FILE = "bank.h"
DTYPE = np.dtype("<f4")  # little-endian float32, whatever the writing machine's byte order
BLOCK_ALIGN = 4096
TENSOR_ALIGN = 64
_FIX = "the bank is damaged or was edited by hand; re-copy it, or export it again (bitfit export-bank)"
_BIG = 1 << 48
TENSOR_FIELDS = {
    "name": S.text(256), "shape": S.SHAPE, "offset": S.integer(0, _BIG), "length": S.integer(1, _BIG),
    "bytes": S.integer(4, _BIG), "dtype": S.equal("float32"), "kind": S.one_of(BIAS_KINDS, required=False),
    "layer": S.Field(lambda v: v is None or S.integer(0, 1 << 16).check(v), "a layer number or null", required=False),
}
TASK_FIELDS = {
    "id": S.integer(0, 1 << 20), "name": S.text(256), "offset": S.integer(0, _BIG), "task_kind": S.text(64),
    "labels": S.list_of(S.text(256), 1 << 16), "pooling": S.one_of(POOLINGS), "max_length": S.integer(1, 1 << 20),
    "text_pair": S.boolean(), "base_fingerprint": S.hexdigest(),
    "bias_subset": S.list_of(S.one_of(BIAS_KINDS), len(BIAS_KINDS), unique=True),
    "trained": S.list_of(S.text(256), 1 << 16, unique=True), "heads": S.list_of(S.record(TENSOR_FIELDS), 8),
    "pack": S.Field(lambda v: isinstance(v, dict), "the source pack's manifest (an object)"),
}
MAP_FIELDS = {
    "tool_version": S.string(256),
    "byte_order": S.equal("little"), "dtype": S.equal("float32"), "base_model": S.string(),
    "base_model_type": S.string(256), "base_fingerprint": S.hexdigest(), "hidden_size": S.integer(1, 1 << 16),
    "block_align": S.integer(64, 1 << 30), "tensor_align": S.integer(1, 1 << 20), "block_bytes": S.integer(1, _BIG),
    "block_used_bytes": S.integer(0, _BIG), "num_tasks": S.integer(1, 1 << 20), "heads_offset": S.integer(0, _BIG),
    "heads_bytes": S.integer(0, _BIG), "total_bytes": S.integer(1, _BIG), "bank_sha256": S.hexdigest(),
    "biases": S.list_of(S.record(TENSOR_FIELDS), 1 << 16), "tasks": S.list_of(S.record(TASK_FIELDS), 1 << 20),
}
MAP_FORMAT = Format(
    FORMAT, FORMAT_VERSION, MAP_FIELDS, "bias-bank map", PackError, _FIX,
    newer="{root} is bank format {version}, newer than this bitfit reads: upgrade",
    older="{root} is bank format {version}, older than this bitfit reads ({current}): export the bank again "
          "(bitfit export-bank)")


@dataclass(frozen=True)
class BankTensor:
    """One tensor in bank.bin. offset: bytes from its block's start (biases) or from the file's start (heads)."""

    name: str
    shape: tuple[int, ...]
    offset: int
    length: int  # elements
    bytes: int
    dtype: str = "float32"
    kind: str | None = None
    layer: int | None = None

    def to_json(self) -> dict[str, Any]:
        # a bias always says its layer (null: the embeddings); heads have neither kind nor layer
        return {k: (list(v) if k == "shape" else v) for k, v in asdict(self).items()
                if v is not None or (k == "layer" and self.kind is not None)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BankTensor:
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in data.items() if k in known}, "shape": tuple(data["shape"])})


@dataclass
class BankTask:
    id: int
    name: str
    offset: int  # the block's base address in bank.bin, bytes
    task_kind: str
    labels: list[str]
    pooling: str
    max_length: int
    text_pair: bool
    base_fingerprint: str
    bias_subset: list[str]
    trained: list[str]  # the biases the pack holds; the block's others are the base model's values
    heads: list[BankTensor]
    pack: dict[str, Any] = field(default_factory=dict)  # the source pack's manifest, for provenance

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["heads"] = [h.to_json() for h in self.heads]
        return out


class Bank:
    """A bank on disk, memory-mapped read-only: blocks, tables and task packs are views or small copies."""

    def __init__(self, directory: Path, layout: dict[str, Any], data: np.memmap) -> None:
        self.directory = directory
        self.layout = layout
        self.biases = [BankTensor.from_json(b) for b in layout["biases"]]
        known = {f.name for f in fields(BankTask)}
        self.tasks = [BankTask(**{**{k: v for k, v in t.items() if k in known},
                                  "heads": [BankTensor.from_json(h) for h in t["heads"]]}) for t in layout["tasks"]]
        self.block_bytes = int(layout["block_bytes"])
        self.base_fingerprint = str(layout["base_fingerprint"])
        self._floats = data.view(DTYPE)  # a view keeps the memory map open
        self._by_name = {t.name: t for t in self.tasks}

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str | int) -> BankTask:
        if isinstance(name, int) and 0 <= name < len(self.tasks):
            return self.tasks[name]
        try:
            return self._by_name[name]  # type: ignore[index]
        except KeyError:
            raise UnknownTaskError(f"no task {name!r} in the bank at {self.directory}: it holds {', '.join(self.names)}") from None

    def _view(self, offset: int, length: int, shape: tuple[int, ...]) -> np.ndarray:
        return self._floats[offset // DTYPE.itemsize : offset // DTYPE.itemsize + length].reshape(shape)

    def block(self, name: str | int) -> np.ndarray:
        """The task's whole block as float32 (padding included): what one DMA transfer moves."""
        t = self.task(name)
        return self._view(t.offset, self.block_bytes // DTYPE.itemsize, (self.block_bytes // DTYPE.itemsize,))

    def task_biases(self, name: str | int) -> dict[str, np.ndarray]:
        """Every bias input's value for the task (trained or base), as read-only views into bank.bin."""
        t = self.task(name)
        return {b.name: self._view(t.offset + b.offset, b.length, b.shape) for b in self.biases}

    def heads(self, name: str | int) -> dict[str, np.ndarray]:
        return {h.name: self._view(h.offset, h.length, h.shape) for h in self.task(name).heads}

    def table(self, bias: str) -> np.ndarray:
        """[tasks, dim] view of one bias across all tasks, row i = task id i: a --mixed graph's table, no copy."""
        spec = next((b for b in self.biases if b.name == bias), None)
        if spec is None:
            raise BitFitError(f"the bank has no bias {bias!r}")
        start = self._floats[spec.offset // DTYPE.itemsize :]
        return np.lib.stride_tricks.as_strided(
            start, shape=(len(self.tasks), spec.length), strides=(self.block_bytes, DTYPE.itemsize), writeable=False
        )

    def tables(self) -> dict[str, np.ndarray]:
        return {b.name: self.table(b.name) for b in self.biases}

    def pack(self, name: str | int) -> TaskPack:
        """The task as an in-memory TaskPack: its trained biases and head, copied out of the bank."""
        t = self.task(name)
        manifest = PackManifest.from_json(t.pack)
        values = self.task_biases(t.id)
        tensors = {b: np.array(values[b]) for b in t.trained}
        tensors.update({k: np.array(v) for k, v in self.heads(t.id).items()})
        pack = TaskPack(manifest, tensors)
        pack.validate(f"task {t.name!r} of the bank at {self.directory}")
        return pack


def read_bank(directory: str | os.PathLike, *, check_integrity: bool = True) -> Bank:
    """Open a bank: bank.json checked (schema, its own seal, every offset and length inside bank.bin) and
    bank.bin against it (size and, by default, its sha256)."""
    root = Path(directory)
    path, map_path = root / BANK_FILE, root / MAP_FILE
    if not os.path.lexists(map_path) or not os.path.lexists(path):
        raise PackError(f"{root} is not a bias bank (it needs {MAP_FILE} and {BANK_FILE}): write one with "
                        "`bitfit export-bank`")
    layout = read_versioned(map_path, MAP_FORMAT)
    size = regular_size(path, error=PackError, fix=_FIX)
    if size != layout["total_bytes"]:
        raise PackError(f"{path} is {size} bytes but {MAP_FILE} says {layout['total_bytes']}: truncated or from "
                        "another export; re-copy the bank")
    if check_integrity and sha256_file(path) != layout["bank_sha256"]:
        raise PackError(
            f"{path} does not match the sha256 in {MAP_FILE}: it is corrupt or was changed after export; re-copy "
            "or re-export the bank"
        )
    problems = _layout_problems(layout, size)
    if problems:
        raise PackError(f"{map_path} is inconsistent: {'; '.join(problems[:4])}: {_FIX}")
    return Bank(root, layout, np.memmap(path, dtype=np.uint8, mode="r"))


def _layout_problems(layout: dict[str, Any], size: int) -> list[str]:
    """Every offset, length and id of a schema-valid map that does not fit the file or the layout rules."""
    out = []
    block, heads_at, tasks = layout["block_bytes"], layout["heads_offset"], layout["tasks"]
    for t in (*layout["biases"], *(h for task in tasks for h in task["heads"])):
        if t["bytes"] != t["length"] * DTYPE.itemsize or t["length"] != int(np.prod(t["shape"])):
            out.append(f"{t['name']}: {t['length']} elements of shape {t['shape']} in {t['bytes']} bytes")
    for b in layout["biases"]:
        if b["offset"] + b["bytes"] > block or b["offset"] % DTYPE.itemsize:
            out.append(f"bias {b['name']} lies outside its block")
    if layout["num_tasks"] != len(tasks) or heads_at != block * len(tasks) or len({t["name"] for t in tasks}) != len(tasks):
        out.append(f"{len(tasks)} tasks (names unique?) do not fill the {layout['num_tasks']} blocks before the heads")
    for i, t in enumerate(tasks):
        if t["id"] != i or t["offset"] != i * block:
            out.append(f"task {t['name']} has id {t['id']} at offset {t['offset']}, not {i} at {i * block}")
        for h in t["heads"]:
            if h["offset"] < heads_at or h["offset"] + h["bytes"] > size or h["offset"] % DTYPE.itemsize:
                out.append(f"head {h['name']} of {t['name']} lies outside the heads region of {BANK_FILE}")
    return out


def register_bank(
    session: Any, directory: str | os.PathLike | Bank, *, tasks: Sequence[str] | None = None, replace: bool = False
) -> list[str]:
    """Register a bank's tasks (all, or `tasks`) on a runtime.session.TaskSession: no pack directories needed."""
    bank = directory if isinstance(directory, Bank) else read_bank(directory)
    if bank.base_fingerprint != session.manifest.base_fingerprint:
        raise IncompatibleError(
            f"the bank at {bank.directory} belongs to base fingerprint {bank.base_fingerprint[:12]} "
            f"({bank.layout.get('base_model')!r}) but the session's graph has "
            f"{session.manifest.base_fingerprint[:12]}: export the bank for this compiled model"
        )
    names = list(tasks) if tasks is not None else bank.names
    return session.register_many([bank.pack(n) for n in names], names=names, replace=replace)
