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

Why rows of a block ARE a mixed graph's table rows: bias `b` of task `t` starts at
``t * block_bytes + offset_b``; viewed with a row stride of block_bytes that is a [tasks, dim] table
whose row `t` is what a --mixed graph reads for task_ids == t (`Bank.table`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from . import compiled as cm
from .errors import BitFitError, CompiledModelError, IncompatibleError, PackError, UnknownTaskError
from .pack import HEAD_BIAS, HEAD_POOLER_BIAS, HEAD_POOLER_WEIGHT, HEAD_WEIGHT, PackManifest, TaskPack, load_pack, replace_dir, sha256_file
from .version import __version__

FORMAT = "bitfit-bias-bank"
FORMAT_VERSION = 1
BANK_FILE = "bank.bin"
MAP_FILE = "bank.json"
HEADER_FILE = "bank.h"
DTYPE = np.dtype("<f4")  # little-endian float32, whatever the writing machine's byte order
BLOCK_ALIGN = 4096
TENSOR_ALIGN = 64
_REQUIRED = ("format_version", "byte_order", "dtype", "base_fingerprint", "block_bytes", "heads_offset", "total_bytes",
             "bank_sha256", "biases", "tasks")


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


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _bias_layout(specs: Sequence[Any]) -> tuple[list[BankTensor], int]:
    out, pos = [], 0
    for s in specs:
        pos = _align(pos, TENSOR_ALIGN)
        length = int(np.prod(s.shape))
        out.append(BankTensor(s.name, tuple(s.shape), pos, length, length * DTYPE.itemsize, "float32", s.kind, s.layer))
        pos += length * DTYPE.itemsize
    return out, pos


def write_bank(
    compiled_dir: str | os.PathLike,
    packs: Sequence[TaskPack | str | os.PathLike],
    out: str | os.PathLike,
    *,
    block_align: int = BLOCK_ALIGN,
    overwrite: bool = False,
) -> Path:
    """Write bank.bin, bank.json and bank.h for `packs` (task ids in the order given) on `compiled_dir`'s graph."""
    if block_align < TENSOR_ALIGN or block_align & (block_align - 1):
        raise BitFitError(f"block_align must be a power of two >= {TENSOR_ALIGN}, got {block_align}")
    if not packs:
        raise BitFitError("a bank needs at least one task pack")
    compiled = cm.read_manifest(compiled_dir)
    base = _base_biases(Path(compiled_dir), compiled)
    loaded = [p if isinstance(p, TaskPack) else load_pack(p) for p in packs]
    seen: dict[str, int] = {}
    for i, p in enumerate(loaded):
        p.validate(f"task pack {p.name!r}")
        cm.check_pack_fits(compiled, p)
        if p.name in seen:
            raise BitFitError(
                f"packs {seen[p.name]} and {i} are both named {p.name!r}: a bank addresses tasks by name; "
                "re-save one under another task name"
            )
        seen[p.name] = i
    for spec in compiled.bias_inputs:
        if spec.dtype != "float32":
            raise CompiledModelError(f"bias input {spec.name} is {spec.dtype}: a bank holds float32 biases only")

    biases, used = _bias_layout(compiled.bias_inputs)
    block_bytes = _align(max(used, 1), block_align)
    heads_offset = block_bytes * len(loaded)
    tasks, pos = [], heads_offset
    for i, p in enumerate(loaded):
        heads = []
        for spec in p.manifest.head:
            pos = _align(pos, TENSOR_ALIGN)
            length = int(np.prod(spec.shape))
            heads.append(BankTensor(spec.name, tuple(spec.shape), pos, length, length * DTYPE.itemsize))
            pos += length * DTYPE.itemsize
        m = p.manifest
        tasks.append(BankTask(
            i, m.task, i * block_bytes, m.task_kind, list(m.labels), m.pooling, m.max_length, m.text_pair,
            m.base_fingerprint, list(m.bias_subset), [b.name for b in m.biases], heads,
            {**m.to_json(), "tensors_sha256": ""},  # the tensors now live here, not in the pack's file
        ))
    total = _align(pos, TENSOR_ALIGN)

    out = Path(out)
    _check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        digest = hashlib.sha256()
        with open(tmp / BANK_FILE, "wb") as fh:
            def emit(buf: np.ndarray) -> None:
                data = buf.tobytes()
                digest.update(data)
                fh.write(data)

            for p in loaded:  # one block at a time: a bank of many tasks never sits in memory whole
                block = np.zeros(block_bytes, np.uint8)
                for t in biases:
                    value = p.tensors.get(t.name, base[t.name])
                    block[t.offset : t.offset + t.bytes] = np.ascontiguousarray(value, DTYPE).reshape(-1).view(np.uint8)
                emit(block)
            region = np.zeros(total - heads_offset, np.uint8)
            for task, p in zip(tasks, loaded):
                for h in task.heads:
                    at = h.offset - heads_offset
                    region[at : at + h.bytes] = np.ascontiguousarray(p.tensors[h.name], DTYPE).reshape(-1).view(np.uint8)
            emit(region)
        layout = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tool_version": __version__,
            "byte_order": "little",
            "dtype": "float32",
            "base_model": compiled.base_model,
            "base_model_type": compiled.base_model_type,
            "base_fingerprint": compiled.base_fingerprint,
            "hidden_size": compiled.hidden_size,
            "block_align": block_align,
            "tensor_align": TENSOR_ALIGN,
            "block_bytes": block_bytes,
            "block_used_bytes": used,
            "num_tasks": len(tasks),
            "heads_offset": heads_offset,
            "heads_bytes": total - heads_offset,
            "total_bytes": total,
            "bank_sha256": digest.hexdigest(),
            "biases": [b.to_json() for b in biases],
            "tasks": [t.to_json() for t in tasks],
        }
        (tmp / MAP_FILE).write_text(json.dumps(layout, indent=2) + "\n")
        (tmp / HEADER_FILE).write_text(c_header(layout))
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def export_bank(
    compiled_dir: str | os.PathLike,
    packs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    block_align: int = BLOCK_ALIGN,
    overwrite: bool = False,
) -> Bank:
    """`bitfit export-bank`: write the bank and read it back (so what was written is proven readable)."""
    write_bank(compiled_dir, packs, out, block_align=block_align, overwrite=overwrite)
    return read_bank(out)


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not overwrite:
        raise BitFitError(f"{out} already exists: choose another output directory, or pass --overwrite to replace it")
    if not (out / MAP_FILE).is_file():
        raise BitFitError(f"{out} exists and is not a bias bank: refusing to replace it; choose another path")


def _base_biases(directory: Path, compiled: cm.CompiledManifest) -> dict[str, np.ndarray]:
    path = directory / cm.BASE_BIASES_FILE
    if not path.is_file():
        raise CompiledModelError(
            f"{directory} has no {cm.BASE_BIASES_FILE}, whose base values fill the biases a pack did not train: "
            "compile it again with this bitfit"
        )
    from safetensors.numpy import load_file

    try:
        base = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise CompiledModelError(f"{path} is unreadable ({e}): compile again") from e
    for spec in compiled.bias_inputs:
        if spec.name not in base or tuple(base[spec.name].shape) != spec.shape:
            raise CompiledModelError(f"{path} lacks {spec.name} {list(spec.shape)}: compile again")
    return base


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
        self._data = data
        self._floats = data.view(DTYPE)
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
    """Open a bank: bank.json checked against bank.bin (size, bounds and, by default, its sha256)."""
    root = Path(directory)
    path, map_path = root / BANK_FILE, root / MAP_FILE
    if not map_path.is_file() or not path.is_file():
        raise PackError(f"{root} is not a bias bank (it needs {MAP_FILE} and {BANK_FILE}): write one with "
                        "`bitfit export-bank`")
    try:
        layout = json.loads(map_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PackError(f"{map_path} is not valid JSON ({e}): re-export the bank") from e
    if not isinstance(layout, dict) or layout.get("format") != FORMAT:
        raise PackError(f"{map_path} is not a bitfit bias-bank map (format is not {FORMAT!r})")
    missing = [k for k in _REQUIRED if k not in layout]
    if missing:
        raise PackError(f"{map_path} lacks {', '.join(missing)}: the map is incomplete; re-export the bank")
    if int(layout.get("format_version", 0)) > FORMAT_VERSION:
        raise PackError(f"{root} is bank format {layout['format_version']}, newer than this bitfit reads: upgrade")
    if layout.get("byte_order") != "little" or layout.get("dtype") != "float32":
        raise PackError(f"{map_path} declares {layout.get('byte_order')}-endian {layout.get('dtype')}: "
                        "this reader takes little-endian float32 banks")
    size = path.stat().st_size
    if size != layout["total_bytes"]:
        raise PackError(f"{path} is {size} bytes but {MAP_FILE} says {layout['total_bytes']}: truncated or from "
                        "another export; re-copy the bank")
    if check_integrity and sha256_file(path) != layout["bank_sha256"]:
        raise PackError(
            f"{path} does not match the sha256 in {MAP_FILE}: it is corrupt or was changed after export; re-copy "
            "or re-export the bank"
        )
    block = int(layout["block_bytes"])
    for b in layout["biases"]:
        if b["offset"] + b["bytes"] > block or b["offset"] % DTYPE.itemsize:
            raise PackError(f"{map_path}: bias {b['name']} lies outside its block: the map is corrupt")
    for t in layout["tasks"]:
        for h in t["heads"]:
            if h["offset"] + h["bytes"] > size or h["offset"] % DTYPE.itemsize:
                raise PackError(f"{map_path}: head {h['name']} of {t['name']} lies outside {BANK_FILE}")
        if t["offset"] + block > layout["heads_offset"]:
            raise PackError(f"{map_path}: the block of {t['name']} overlaps the heads region")
    return Bank(root, layout, np.memmap(path, dtype=np.uint8, mode="r"))


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
    return [session.register(bank.pack(n), name=n, replace=replace) for n in names]


# -- the C header ------------------------------------------------------------------------------------
def _ident(text: str) -> str:
    out = re.sub(r"[^0-9A-Za-z]", "_", text).upper()
    return f"_{out}" if out[:1].isdigit() else out


def _c_string(text: str) -> str:
    """A C string literal: printable ASCII as is, every other byte as an octal escape (valid C89 and later)."""
    parts = []
    for byte in text.encode():
        ch = chr(byte)
        parts.append(f"\\{ch}" if ch in '"\\' else ch if 32 <= byte < 127 and ch != "?" else f"\\{byte:03o}")
    return '"' + "".join(parts) + '"'


def c_header(layout: dict[str, Any]) -> str:
    """bank.h: the map of bank.json as #defines and const arrays (C99, <stdint.h>)."""
    biases, tasks = layout["biases"], layout["tasks"]
    lines = [
        "/* Generated by bitfit export-bank: the memory map of bank.bin (see bank.json). Do not edit. */",
        "#ifndef BITFIT_BANK_H",
        "#define BITFIT_BANK_H",
        "#include <stdint.h>",
        "",
        f"#define BITFIT_BANK_FORMAT_VERSION {layout['format_version']}",
        "#define BITFIT_BANK_LITTLE_ENDIAN 1",
        "#define BITFIT_BANK_DTYPE_BYTES 4 /* float32 */",
        f"#define BITFIT_BANK_NUM_TASKS {layout['num_tasks']}",
        f"#define BITFIT_BANK_NUM_BIASES {len(biases)}",
        f"#define BITFIT_BANK_HIDDEN_SIZE {layout['hidden_size']}",
        f"#define BITFIT_BANK_BLOCK_ALIGN {layout['block_align']}",
        f"#define BITFIT_BANK_TENSOR_ALIGN {layout['tensor_align']}",
        f"#define BITFIT_BANK_BLOCK_BYTES {layout['block_bytes']}u /* task t's block: t * BLOCK_BYTES */",
        f"#define BITFIT_BANK_BLOCK_USED_BYTES {layout['block_used_bytes']}u",
        f"#define BITFIT_BANK_HEADS_OFFSET {layout['heads_offset']}ull",
        f"#define BITFIT_BANK_TOTAL_BYTES {layout['total_bytes']}ull",
        f"#define BITFIT_BANK_SHA256 {_c_string(layout['bank_sha256'])}",
        f"#define BITFIT_BANK_BASE_FINGERPRINT {_c_string(layout['base_fingerprint'])}",
        "",
        "/* Task ids: block base address = id * BITFIT_BANK_BLOCK_BYTES. */",
    ]
    used: set[str] = set()
    for t in tasks:
        name = f"BITFIT_TASK_{_ident(t['name'])}"
        if name in used:  # two names that differ only in punctuation or case
            name = f"{name}_{t['id']}"
        used.add(name)
        lines.append(f"#define {name} {t['id']}")
    lines += ["", "/* Bias tensors inside every block: byte offset from the block start, length in floats. */"]
    for b in biases:
        ident = f"BITFIT_BIAS_{_ident(b['name'])}"
        lines.append(f"#define {ident}_OFFSET {b['offset']}u")
        lines.append(f"#define {ident}_LENGTH {b['length']}u")

    def array(ctype: str, name: str, size: str, values: list[str]) -> list[str]:
        return [f"static const {ctype} {name}[{size}] = {{", *[f"    {v}," for v in values], "};"]

    def head_offset(t: dict[str, Any], name: str) -> str:
        h = next((h for h in t["heads"] if h["name"] == name), None)
        return f"{h['offset']}ll" if h else "-1ll"

    n_b, n_t = "BITFIT_BANK_NUM_BIASES", "BITFIT_BANK_NUM_TASKS"
    lines.append("")
    lines += array("char *const", "bitfit_bias_names", n_b, [_c_string(b["name"]) for b in biases])
    lines += array("char *const", "bitfit_bias_kinds", n_b, [_c_string(b.get("kind") or "") for b in biases])
    layers = [str(-1 if b.get("layer") is None else b["layer"]) for b in biases]  # -1: the embeddings
    lines += array("int32_t", "bitfit_bias_layers", n_b, layers)
    lines += array("uint32_t", "bitfit_bias_offsets", n_b, [f"{b['offset']}u" for b in biases])
    lines += array("uint32_t", "bitfit_bias_lengths", n_b, [f"{b['length']}u" for b in biases])
    lines += array("char *const", "bitfit_task_names", n_t, [_c_string(t["name"]) for t in tasks])
    lines += array("char *const", "bitfit_task_kinds", n_t, [_c_string(t["task_kind"]) for t in tasks])
    lines += array("char *const", "bitfit_task_poolings", n_t, [_c_string(t["pooling"]) for t in tasks])
    lines += array("uint64_t", "bitfit_task_offsets", n_t, [f"{t['offset']}ull" for t in tasks])
    outputs = [next(h for h in t["heads"] if h["name"] == HEAD_BIAS)["length"] for t in tasks]
    lines += array("uint32_t", "bitfit_task_num_outputs", n_t, [f"{k}u" for k in outputs])
    lines.append("/* Head tensors: byte offsets from the start of bank.bin; -1 where a task has none. */")
    for name, field_ in ((HEAD_WEIGHT, "head_weight"), (HEAD_BIAS, "head_bias"),
                         (HEAD_POOLER_WEIGHT, "pooler_weight"), (HEAD_POOLER_BIAS, "pooler_bias")):
        lines += array("int64_t", f"bitfit_task_{field_}_offsets", n_t, [head_offset(t, name) for t in tasks])
    lines += ["", "#endif /* BITFIT_BANK_H */", ""]
    return "\n".join(lines)
