"""A readable summary of a task pack or a compiled directory (runtime only: no torch)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from bitfit.runtime import args as A
from bitfit.runtime import compiled as cm
from bitfit.runtime import schema as S
from bitfit.runtime.errors import BitFitError
from bitfit.runtime.fs import read_json
from bitfit.runtime.pack import MANIFEST_FILE, TENSORS_FILE, load_pack


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return ""


def inspect(path: str | os.PathLike, *, as_json: bool = False) -> str:
    p = Path(A.check("path", path, A.PATH))
    A.check("as_json", as_json, S.boolean())
    manifest_path = p / MANIFEST_FILE if p.is_dir() else p
    try:  # which format: the readers below then check it strictly
        data = read_json(manifest_path, what="manifest", error=BitFitError, fix="give a pack or compiled directory")
        fmt = data.get("format") if isinstance(data, dict) else None
    except BitFitError:  # missing, a binary file, a FIFO...: not a manifest
        fmt = None
    if fmt == cm.FORMAT:
        return _compiled(p, as_json)
    if fmt is None and not (p / TENSORS_FILE).exists():
        raise BitFitError(f"{p} is neither a task pack nor a compiled model directory")
    return _pack(p, as_json)


def _pack(path: Path, as_json: bool) -> str:
    pack = load_pack(path)  # strict: inspecting a corrupt pack says so
    path = path.parent if path.is_file() else path  # load_pack also takes a file inside the pack
    m = pack.manifest
    on_disk = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    full = m.base_params * 4  # the whole model in fp32, what a full fine-tune would ship per task
    if as_json:
        return json.dumps({"manifest": m.to_json(), "pack_bytes": on_disk, "full_model_bytes": full}, indent=2)
    metrics = m.metrics or {}
    dev = metrics.get("dev", {})
    lines = [
        f"task pack      {path}",
        f"task           {m.task} ({m.task_kind}{', sentence pairs' if m.text_pair else ''})",
        f"labels         {', '.join(m.labels) if m.labels else '(regression: one value)'}",
        f"base model     {m.base_model} ({m.base_model_type}, hidden {m.hidden_size})",
        *_base_path(m, "trained"),
        f"fingerprint    {m.base_fingerprint}",
        f"biases         {','.join(m.bias_subset)}: {len(m.biases)} tensors, "
        f"{sum(int(np.prod(b.shape)) for b in m.biases):,} parameters",
        f"head           {_head(m)}",
        f"trainable      {m.trainable_params:,} of {m.base_params:,} ({m.trainable_params / m.base_params:.3%})",
        f"max length     {m.max_length} tokens",
        f"size           {_size(on_disk)} on disk vs {_size(full)} for the full model in fp32 "
        f"({full / max(on_disk, 1):,.0f}x smaller)",
        f"dev {metrics.get('metric', 'metric'):<10} {dev.get(metrics.get('metric', ''), float('nan')):.2f} "
        f"(best epoch {metrics.get('best_epoch', '?')})" if dev else "dev metric     (none recorded)",
        f"tool version   {m.tool_version}, format {m.format_version}",
    ]
    return "\n".join(lines)


def _base_path(m, verb: str) -> list[str]:
    """Where the base model was read from when it was a local directory: a hint (the fingerprint is checked)."""
    if not m.base_model_path:
        return []
    return [f"base path      {m.base_model_path} (where it was {verb}; a hint: the fingerprint below is checked)"]


def _head(m) -> str:
    linear = f"linear {m.hidden_size} x {m.num_outputs}"
    if m.token_level:
        fixed = m.kind.labels if isinstance(m.kind.labels, tuple) else ()  # QA: (start, end)
        return f"per token: {linear}" + (f" ({', '.join(fixed)})" if fixed else "")
    pooling = "BERT pooler (tanh dense on the first token)" if m.pooling == "pooler" else f"{m.pooling} pooling"
    return f"{pooling} -> {linear}"


def _compiled(path: Path, as_json: bool) -> str:
    m = cm.read_compiled_manifest(path)
    size = (path / cm.MODEL_FILE).stat().st_size
    if as_json:
        return json.dumps({"manifest": m.to_json(), "model_bytes": size}, indent=2)
    kinds = sorted({b.kind for b in m.bias_inputs}, key=lambda k: k or "")
    lines = [
        f"compiled model {path}",
        f"base model     {m.base_model} ({m.base_model_type}, {m.num_layers} layers, hidden {m.hidden_size})",
        *_base_path(m, "compiled"),
        f"fingerprint    {m.base_fingerprint}",
        f"graph          {cm.MODEL_FILE}, {_size(size)}, opset {m.opset}, {m.precision}",
        f"token inputs   {', '.join(m.token_inputs)} (int64 [batch, sequence], up to {m.max_positions} tokens)",
        f"bias inputs    {len(m.bias_inputs)} ({','.join(k or '?' for k in kinds)}), "
        f"{sum(int(np.prod(b.shape)) for b in m.bias_inputs):,} values, base values as defaults",
        f"outputs        {m.output} [batch, sequence, {m.hidden_size}]"
        + (f", {cm.LOGITS} [batch, labels], {cm.TOKEN_LOGITS} [batch, sequence, labels]" if m.head_inputs else ""),
        f"head inputs    {', '.join(h.name for h in m.head_inputs) + ' (optional: a pack or adapter feeds them)' if m.head_inputs else 'none (the runtime applies the head)'}",
        f"passes         {', '.join(m.passes)}",
        f"fused kernels  {', '.join(f'{k} x{v}' for k, v in m.fused_ops.items()) or 'none'}",
    ]
    return "\n".join(lines)



