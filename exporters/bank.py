"""Write a bias bank (bank.bin, bank.json, bank.h) for fixed-weight hardware: every task's biases in one
flat binary, one equal-layout block per task. The format, and its reader, are in runtime.bank.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from bitfit.runtime.bank import (
    BANK_FILE,
    BLOCK_ALIGN,
    DTYPE,
    FORMAT,
    FORMAT_VERSION,
    HEADER_FILE,
    MAP_FILE,
    TENSOR_ALIGN,
    Bank,
    BankTask,
    BankTensor,
    read_bank,
)
from bitfit.runtime import args as A
from bitfit.runtime import schema as S
from bitfit.runtime.compiled import CompiledModel
from bitfit.runtime.errors import BitFitError, CompiledModelError
from bitfit.runtime.fs import check_target, output_dir
from bitfit.runtime.heads import HEAD_BIAS, HEAD_POOLER_BIAS, HEAD_POOLER_WEIGHT, HEAD_WEIGHT
from bitfit.runtime.pack import TaskPack, load_pack
from bitfit.runtime.schema import seal
from bitfit.runtime.version import __version__


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
    A.check("compiled_dir", compiled_dir, A.PATH)
    A.check("packs", packs, A.PACKS)
    A.check("out", out, A.PATH)
    A.check("block_align", block_align, A.COUNT)
    A.check("overwrite", overwrite, S.boolean())
    if block_align < TENSOR_ALIGN or block_align & (block_align - 1):
        raise BitFitError(f"block_align must be a power of two >= {TENSOR_ALIGN}, got {block_align}")
    if not packs:
        raise BitFitError("a bank needs at least one task pack")
    opened = CompiledModel.open(compiled_dir)
    compiled, base = opened.manifest, opened.base_biases
    check_target(out, overwrite=overwrite, marker=MAP_FILE, format=FORMAT, what="bias bank")  # before any work
    loaded = [p if isinstance(p, TaskPack) else load_pack(p) for p in packs]
    seen: dict[str, int] = {}
    for i, p in enumerate(loaded):
        p.validate(f"task pack {p.name!r}")
        opened.check_pack(p)
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
            # the tensors now live here, not in the pack's file: its checksums no longer apply
            {**m.to_json(), "tensors_sha256": "", "manifest_sha256": ""},
        ))
    total = _align(pos, TENSOR_ALIGN)

    with output_dir(out, overwrite=overwrite, marker=MAP_FILE, format=FORMAT, what="bias bank") as tmp:
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
        layout = seal(layout)  # a hand edit of the map is refused by read_bank
        (tmp / MAP_FILE).write_text(json.dumps(layout, indent=2) + "\n")
        (tmp / HEADER_FILE).write_text(c_header(layout))
    return Path(out)


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
        f"#define BITFIT_BANK_MAP_SHA256 {_c_string(layout['manifest_sha256'])} /* bank.json's own checksum */",
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
