"""The compiled directory: model.onnx, tokenizer.json and a manifest that is the contract between them
and every task pack. Names, shapes and the base fingerprint are written here and checked, never assumed.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CompiledModelError, IncompatibleError
from .fs import sha256_file
from .heads import HEAD_BIAS, HEAD_POOLER_BIAS, HEAD_POOLER_WEIGHT, HEAD_WEIGHT
from .pack import PackManifest, TaskPack, TensorSpec, _version

FORMAT = "bitfit-compiled"
FORMAT_VERSION = 1
MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
OUTPUT_NAME = "last_hidden_state"
TASK_IDS = "task_ids"  # mixed graphs: int64 [batch], each row's row in the bias tables
BASE_BIASES_FILE = "base_biases.safetensors"  # the base model's bias values, by canonical name
# The in-graph head (plain graphs): optional inputs, so a run that feeds none of them is the base model.
HEAD_POOLING = "head.pooling"  # float [3]: weights of the (mean, cls, pooler) poolings; one-hot for a pack
POOLING_COLUMNS = ("mean", "cls", "pooler")
LOGITS = "logits"  # [batch, labels] = pooled @ head.weight^T + head.bias
TOKEN_LOGITS = "token_logits"  # [batch, sequence, labels] = hidden @ head.weight^T + head.bias


@dataclass
class CompiledManifest:
    base_model: str
    base_model_type: str
    base_fingerprint: str
    hidden_size: int
    num_layers: int
    max_positions: int
    opset: int
    token_inputs: list[str]
    bias_inputs: list[TensorSpec]
    pad_token: str
    pad_token_id: int
    model_sha256: str
    output: str = OUTPUT_NAME
    precision: str = "fp32"
    passes: list[str] = field(default_factory=list)
    fused_ops: dict[str, int] = field(default_factory=dict)  # onnxruntime fused kernels in the graph, by op
    mixed: bool = False  # biases are [tasks, dim] tables picked per row by task_ids
    # Optional inputs of the in-graph head (-1 in a shape: any size, the number of labels); empty for graphs
    # compiled before the head existed and for mixed graphs. outputs: every graph output, `output` first.
    head_inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[str] = field(default_factory=lambda: [OUTPUT_NAME])
    tool_version: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.bias_inputs = [b if isinstance(b, TensorSpec) else TensorSpec.from_json(b) for b in self.bias_inputs]
        self.head_inputs = [h if isinstance(h, TensorSpec) else TensorSpec.from_json(h) for h in self.head_inputs]

    @property
    def bias_specs(self) -> dict[str, TensorSpec]:
        return {b.name: b for b in self.bias_inputs}

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["bias_inputs"] = [b.to_json() for b in self.bias_inputs]
        out["head_inputs"] = [h.to_json() for h in self.head_inputs]
        return out


def write_manifest(directory: str | os.PathLike, manifest: CompiledManifest) -> Path:
    path = Path(directory) / MANIFEST_FILE
    path.write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    return path


def _root(directory: str | os.PathLike) -> Path:
    root = Path(directory)
    if root.name == MANIFEST_FILE and root.is_file():  # the manifest's own path names its directory
        root = root.parent
    return root


def read_manifest(directory: str | os.PathLike) -> CompiledManifest:
    root = _root(directory)
    if not root.is_dir():
        raise CompiledModelError(f"no compiled model at {root}: run `bitfit compile --model M --out {root}` first")
    for name in (MANIFEST_FILE, MODEL_FILE, TOKENIZER_FILE):
        if not (root / name).is_file():
            raise CompiledModelError(f"{root} has no {name}: it is not a complete compiled model; compile it again")
    try:
        data = json.loads((root / MANIFEST_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CompiledModelError(f"{root / MANIFEST_FILE} is not valid JSON ({e}): compile again") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CompiledModelError(f"{root / MANIFEST_FILE} is not a bitfit compiled-model manifest")
    if _version(data, root / MANIFEST_FILE, CompiledModelError) > FORMAT_VERSION:
        raise CompiledModelError(f"{root} was compiled by a newer bitfit (format {data['format_version']}): upgrade")
    known = {f.name for f in fields(CompiledManifest)}
    try:
        return CompiledManifest(**{k: v for k, v in data.items() if k in known})
    except TypeError as e:
        raise CompiledModelError(f"{root / MANIFEST_FILE} is incomplete ({e}): compile again") from e


@dataclass(frozen=True)
class CompiledModel:
    """A compiled directory, opened and checked once: the manifest, the graph's checksum, and the base
    model's bias values (names and shapes as the manifest declares, finite). What every reader of a compiled
    directory starts from: the session, the bias bank, the Triton and adapter exporters."""

    directory: Path
    manifest: CompiledManifest
    base_biases: dict[str, np.ndarray]

    @property
    def model_path(self) -> Path:
        return self.directory / MODEL_FILE

    @property
    def tokenizer_path(self) -> Path:
        return self.directory / TOKENIZER_FILE

    @classmethod
    def open(cls, directory: str | os.PathLike, *, check_integrity: bool = True) -> CompiledModel:
        root = _root(directory)
        manifest = read_manifest(root)
        model_path = root / MODEL_FILE
        if check_integrity and manifest.model_sha256 and sha256_file(model_path) != manifest.model_sha256:
            raise CompiledModelError(
                f"{model_path} does not match the checksum in {MANIFEST_FILE}: it is corrupt or was replaced; "
                "compile again"
            )
        return cls(root, manifest, _read_base_biases(root, manifest))

    def check_pack(self, pack: TaskPack | PackManifest, where: str = "") -> None:
        check_pack_fits(self.manifest, pack, where)


def _read_base_biases(root: Path, manifest: CompiledManifest) -> dict[str, np.ndarray]:
    path = root / BASE_BIASES_FILE
    if not path.is_file():
        raise CompiledModelError(
            f"{root} has no {BASE_BIASES_FILE}, the base values of the biases a pack does not train: compile it "
            "again with this bitfit"
        )
    from safetensors.numpy import load_file

    try:
        base = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise CompiledModelError(f"{path} is unreadable ({e}): compile again") from e
    for spec in manifest.bias_inputs:
        value = base.get(spec.name)
        if value is None or tuple(value.shape) != spec.shape or value.dtype != np.float32:
            raise CompiledModelError(f"{path} lacks {spec.name} as float32 {list(spec.shape)}: compile again")
        if not np.isfinite(value).all():
            raise CompiledModelError(f"{path}: {spec.name} holds NaN or inf: compile again")
    return base


def check_pack_fits(compiled: CompiledManifest, pack: TaskPack | PackManifest, where: str = "") -> None:
    """Raise IncompatibleError naming every reason `pack` cannot run on this graph."""
    m = pack.manifest if isinstance(pack, TaskPack) else pack
    label = where or f"task pack {m.task!r}"
    if m.base_fingerprint != compiled.base_fingerprint:
        raise IncompatibleError(
            f"{label} was trained on base model {m.base_model!r} (fingerprint {m.base_fingerprint[:12]}) but the "
            f"graph was compiled from {compiled.base_model!r} (fingerprint {compiled.base_fingerprint[:12]}): "
            "their frozen weights differ; train the pack on the compiled model, or compile the pack's base model"
        )
    problems: list[str] = []
    graph = compiled.bias_specs
    absent = [b.name for b in m.biases if b.name not in graph]
    if absent:
        kinds = sorted({b.kind or "?" for b in m.biases if b.name in absent})
        problems.append(
            f"the graph has no input for biases {', '.join(absent[:4])}{' ...' if len(absent) > 4 else ''}: "
            f"recompile with --biases all (or include {','.join(kinds)})"
        )
    for b in m.biases:
        g = graph.get(b.name)
        if g is not None and (g.shape != b.shape or g.dtype != b.dtype):
            problems.append(f"{b.name} is {b.dtype}{list(b.shape)} in the pack but {g.dtype}{list(g.shape)} in the graph")
    head = {h.name: h for h in m.head}.get(HEAD_WEIGHT)
    if head is not None and head.shape[-1] != compiled.hidden_size:
        problems.append(f"the head expects hidden size {head.shape[-1]}, the graph has {compiled.hidden_size}")
    if m.max_length > compiled.max_positions:
        problems.append(f"max_length {m.max_length} exceeds the model's {compiled.max_positions} positions")
    if problems:
        raise IncompatibleError(f"{label} does not fit the compiled graph: " + "; ".join(problems))


def pooling_weights(pooling: str) -> np.ndarray:
    """The head.pooling feed for a pack's pooling: one-hot over POOLING_COLUMNS; zeros for "none" (token
    kinds read token_logits, whose head does not pool)."""
    out = np.zeros(len(POOLING_COLUMNS), np.float32)
    if pooling != "none":
        if pooling not in POOLING_COLUMNS:
            raise IncompatibleError(f"the in-graph head has no {pooling!r} pooling: it pools by {POOLING_COLUMNS}")
        out[POOLING_COLUMNS.index(pooling)] = 1.0
    return out


def head_feeds(pack: TaskPack) -> dict[str, np.ndarray]:
    """A pack's values for the in-graph head's inputs, by input name: with them (and the pack's biases) a plain
    onnxruntime run gives the pack's logits (sequence kinds) or token_logits (token kinds)."""
    feeds = {
        HEAD_WEIGHT: pack.tensors[HEAD_WEIGHT],
        HEAD_BIAS: pack.tensors[HEAD_BIAS],
        HEAD_POOLING: pooling_weights(pack.manifest.pooling),
    }
    for name in (HEAD_POOLER_WEIGHT, HEAD_POOLER_BIAS):
        if name in pack.tensors:
            feeds[name] = pack.tensors[name]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feeds.items()}
