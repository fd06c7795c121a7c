"""An NVIDIA Triton model repository serving many task packs from one ONNX model (onnxruntime backend).

Layout: REPO/NAME/config.pbtxt, REPO/NAME/1/model.onnx, REPO/NAME/tasks.json, REPO/NAME/tokenizer.json.

One model serves every task, and Triton's dynamic batcher may put rows of different tasks in one batch:
the model is built from a `--mixed` compiled graph (bias tables [tasks, dim] picked per row by task_ids),
with the packs' stacked tables baked in as constants and a per-row head gathered by task_ids. So its
inputs are the token inputs and task_ids only, all batched along the first axis, which is what Triton's
batcher concatenates. A --mixed graph is required rather than built here: building needs torch and the
base model, and the user's compile choices (int8, fp16) carry over unchanged.

Outputs: logits [batch, K] (K = the most labels of any task; a task with fewer has zeros past its own, and
tasks.json says how many are real), token_logits [batch, sequence, K] (token kinds), and
last_hidden_state.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from bitfit.runtime import args as A
from bitfit.runtime import compiled as cm
from bitfit.runtime import schema as S
from bitfit.runtime.compiled import CompiledModel
from bitfit.runtime.errors import BitFitError, CompiledModelError, IncompatibleError
from bitfit.runtime.fs import check_target, output_dir, sha256_file
from bitfit.runtime.heads import HEAD_BIAS, HEAD_POOLER_BIAS, HEAD_POOLER_WEIGHT, HEAD_WEIGHT
from bitfit.runtime.pack import TaskPack, load_pack
from bitfit.runtime.version import __version__

TASKS_FILE = "tasks.json"
CONFIG_FILE = "config.pbtxt"
VERSION = "1"
TASKS_FORMAT = "bitfit-triton-tasks"
INSTANCE_KINDS = {"auto": "KIND_AUTO", "cpu": "KIND_CPU", "gpu": "KIND_GPU"}
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def stacked_tables(manifest: cm.CompiledManifest, base: dict[str, np.ndarray], packs: Sequence[TaskPack]
                   ) -> dict[str, np.ndarray]:
    """Bias tables [tasks, dim], row i = pack i's bias, or the base model's where the pack did not train it."""
    return {s.name: np.stack([p.tensors.get(s.name, base[s.name]) for p in packs]).astype(np.float32)
            for s in manifest.bias_inputs}


def head_tables(packs: Sequence[TaskPack], hidden_size: int) -> dict[str, np.ndarray]:
    """Per-task head tables, padded with zero rows to the most labels of any task."""
    feeds = [cm.head_feeds(p) for p in packs]
    k = max(f[HEAD_WEIGHT].shape[0] for f in feeds)
    n, h = len(packs), hidden_size
    tables = {HEAD_WEIGHT: np.zeros((n, k, h), np.float32), HEAD_BIAS: np.zeros((n, k), np.float32),
              cm.HEAD_POOLING: np.stack([f[cm.HEAD_POOLING] for f in feeds])}
    for i, f in enumerate(feeds):
        rows = f[HEAD_WEIGHT].shape[0]
        tables[HEAD_WEIGHT][i, :rows] = f[HEAD_WEIGHT]
        tables[HEAD_BIAS][i, :rows] = f[HEAD_BIAS]
    if any(p.manifest.pooling == "pooler" for p in packs):  # [tasks, H, H]: only when some task needs it
        tables[HEAD_POOLER_WEIGHT] = np.stack([f.get(HEAD_POOLER_WEIGHT, np.zeros((h, h), np.float32)) for f in feeds])
        tables[HEAD_POOLER_BIAS] = np.stack([f.get(HEAD_POOLER_BIAS, np.zeros(h, np.float32)) for f in feeds])
    return tables


def config_text(name: str, manifest: cm.CompiledManifest, max_logits: int, *, max_batch_size: int,
                instance_kind: str = "auto", instances: int = 1) -> str:
    """config.pbtxt. With max_batch_size > 0, Triton owns the first axis: dims leave it out. task_ids is
    [batch] in the model; Triton needs a non-empty dims, so clients send [batch, 1] and the reshape to []
    drops the 1 before the model sees it (Triton's documented idiom for a [batch] input)."""
    def tensor(n: str, dtype: str, dims: Sequence[int], reshape: bool = False) -> str:
        extra = "\n    reshape: { shape: [ ] }" if reshape else ""
        shape = ", ".join(map(str, dims))
        return f"  {{\n    name: \"{n}\"\n    data_type: {dtype}\n    dims: [ {shape} ]{extra}\n  }}"

    inputs = [tensor(t, "TYPE_INT64", [-1]) for t in manifest.token_inputs]
    inputs.append(tensor(cm.TASK_IDS, "TYPE_INT64", [1], reshape=True))
    outputs = [tensor(cm.OUTPUT_NAME, "TYPE_FP32", [-1, manifest.hidden_size]),
               tensor(cm.LOGITS, "TYPE_FP32", [max_logits]),
               tensor(cm.TOKEN_LOGITS, "TYPE_FP32", [-1, max_logits])]
    return (
        f"# Written by bitfit {__version__} (bitfit export-triton). Task ids, labels and how many logits are\n"
        f"# real per task: {TASKS_FILE}. Requests batch together only at equal sequence lengths: pad to one.\n"
        f"name: \"{name}\"\n"
        "platform: \"onnxruntime_onnx\"\n"
        f"max_batch_size: {max_batch_size}\n"
        "input [\n" + ",\n".join(inputs) + "\n]\n"
        "output [\n" + ",\n".join(outputs) + "\n]\n"
        "dynamic_batching { }\n"
        f"instance_group [\n  {{\n    count: {instances}\n    kind: {INSTANCE_KINDS[instance_kind]}\n  }}\n]\n"
    )


def export_triton(
    compiled_dir: str | os.PathLike,
    packs: Sequence[str | os.PathLike | TaskPack],
    out: str | os.PathLike,
    *,
    name: str = "bitfit",
    max_batch_size: int = 32,
    instance_kind: str = "auto",
    instances: int = 1,
    overwrite: bool = False,
) -> Path:
    """Write a Triton model repository `out` with one model `name` serving every pack in `packs` (task ids in
    the given order). Returns out/name. Needs a graph compiled with --mixed; onnx-ir (the compile extra)."""
    import onnx_ir as ir
    from bitfit.compiler.head import AddTaskHeadsPass, BakeBiasTablesPass
    from bitfit.compiler.passes import run_passes

    compiled_dir, out = Path(A.check("compiled_dir", compiled_dir, A.PATH)), Path(A.check("out", out, A.PATH))
    A.check("packs", packs, A.PACKS)
    A.check("name", name, S.string(256))
    A.check("max_batch_size", max_batch_size, A.COUNT)
    A.check("instance_kind", instance_kind, S.string(64))
    A.check("instances", instances, A.COUNT)
    A.check("overwrite", overwrite, S.boolean())
    if not _NAME.match(name):
        raise BitFitError(f"model name {name!r}: use letters, digits, '_', '-' and '.' only (it is a directory)")
    if max_batch_size < 1:
        raise BitFitError(f"--max-batch-size must be at least 1, got {max_batch_size}: the dynamic batcher needs it")
    if instance_kind not in INSTANCE_KINDS or instances < 1:
        raise BitFitError(f"instance kind must be one of {sorted(INSTANCE_KINDS)} and count >= 1")
    if not packs:
        raise BitFitError("give at least one task pack")
    target = check_target(out / name, overwrite=overwrite, marker=TASKS_FILE, format=TASKS_FORMAT,
                          what="model written by bitfit export-triton")
    opened = CompiledModel.open(compiled_dir)
    manifest, base = opened.manifest, opened.base_biases
    if not manifest.mixed:
        raise CompiledModelError(
            f"{compiled_dir} is not a --mixed graph: a Triton batch may hold rows of several tasks, which needs bias "
            f"tables picked per row; compile with `bitfit compile --mixed` (any --quantize/--fp16 carries over)")
    loaded = [p if isinstance(p, TaskPack) else load_pack(p) for p in packs]
    for p in loaded:
        p.validate(f"task pack {p.name!r}")
        opened.check_pack(p)
    names = [p.name for p in loaded]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise IncompatibleError(f"tasks {dupes} are given twice: each task name must be unique (rename the pack)")
    heads = head_tables(loaded, manifest.hidden_size)
    max_logits = int(heads[HEAD_WEIGHT].shape[1])

    model = ir.load(opened.model_path)
    run_passes(model, [BakeBiasTablesPass(stacked_tables(manifest, base, loaded)), AddTaskHeadsPass(heads)],
               f"building the Triton model from {compiled_dir}", "compile again with --mixed")
    left = sorted({v.name for v in model.graph.inputs} - {*manifest.token_inputs, cm.TASK_IDS})
    if left:
        raise CompiledModelError(f"the Triton model still has inputs {left}: the graph differs from its manifest")

    # Built beside the repository, not in it: a Triton polling REPO would try to load a half-written model.
    with output_dir(target, overwrite=overwrite, marker=TASKS_FILE, format=TASKS_FORMAT,
                    what="model written by bitfit export-triton", staging=out.parent) as tmp:
        (tmp / VERSION).mkdir()
        ir.save(model, tmp / VERSION / cm.MODEL_FILE)
        (tmp / CONFIG_FILE).write_text(config_text(name, manifest, max_logits, max_batch_size=max_batch_size,
                                                   instance_kind=instance_kind, instances=instances))
        shutil.copyfile(opened.tokenizer_path, tmp / cm.TOKENIZER_FILE)
        tasks = {
            "format": TASKS_FORMAT,
            "format_version": 1,
            "model": name,
            "base_model": manifest.base_model,
            "base_fingerprint": manifest.base_fingerprint,
            "precision": manifest.precision,
            "model_sha256": sha256_file(tmp / VERSION / cm.MODEL_FILE),
            "token_inputs": list(manifest.token_inputs),
            "pad_token_id": manifest.pad_token_id,
            "max_logits": max_logits,
            "tasks": [_task_record(i, p) for i, p in enumerate(loaded)],
            "tool_version": __version__,
        }
        (tmp / TASKS_FILE).write_text(json.dumps(tasks, indent=2) + "\n")
    return target


def _task_record(task_id: int, pack: TaskPack) -> dict:
    m = pack.manifest
    return {
        "task": m.task,
        "task_id": task_id,
        "task_kind": m.task_kind,
        "labels": list(m.labels),
        "num_logits": m.num_outputs,  # logits[:, :num_logits] (or token_logits[..., :num_logits]) are real
        "output": cm.TOKEN_LOGITS if m.token_level else cm.LOGITS,
        "pooling": m.pooling,
        "max_length": m.max_length,
        "text_pair": m.text_pair,
        "pack_tensors_sha256": m.tensors_sha256,
    }
