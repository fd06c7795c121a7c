"""Task packs: one task's trained biases and head, with a manifest that says what they fit.

A pack is a directory holding ``manifest.json`` and ``tensors.safetensors``. It needs numpy and
safetensors only, so the deployment runtime reads it without torch. Loading is strict: every
mismatch between the manifest and the tensors is an error, never a silent skip.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from .errors import PackError
from .fs import output_dir, sha256_file
from .heads import HEAD_POOLER_BIAS, HEAD_POOLER_WEIGHT, HEAD_WEIGHT, POOLINGS
from .kinds import KINDS, TaskKind, kind

FORMAT = "bitfit-task-pack"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TENSORS_FILE = "tensors.safetensors"
METADATA_KEY = "bitfit"  # safetensors metadata: provenance JSON, checked against the manifest


@dataclass(frozen=True)
class TensorSpec:
    """One tensor's canonical name, shape and dtype; biases also carry where they live in the model."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    kind: str | None = None  # paper notation: bq bk bv bm1 bLN1 bm2 bm3 bLN2 (bLNe: embeddings)
    layer: int | None = None
    source: str | None = None  # the model's own parameter name

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    def to_json(self) -> dict[str, Any]:
        return {k: (list(v) if k == "shape" else v) for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass
class PackManifest:
    """What a pack holds and what it was trained on. Saved as manifest.json beside the tensors."""

    task: str
    task_kind: str
    labels: list[str]
    pooling: str
    max_length: int
    text_pair: bool
    base_model: str
    base_model_type: str
    base_fingerprint: str
    hidden_size: int
    tokenizer: str
    bias_subset: list[str]
    biases: list[TensorSpec]
    head: list[TensorSpec]
    trainable_params: int
    base_params: int
    metrics: dict[str, Any] = field(default_factory=dict)
    # question answering trained with unanswerable questions (SQuAD 2.0): "" wins when CLS beats every span
    no_answer: bool = False
    tool_version: str = ""
    tensors_sha256: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        k = kind(self.task_kind)
        if self.pooling not in POOLINGS:
            raise PackError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if k.token_level and self.pooling != "none":
            raise PackError(
                f"a {self.task_kind} task has logits per token, so its pooling must be 'none', got {self.pooling!r}"
            )
        if not k.token_level and self.pooling == "none":
            token_kinds = tuple(n for n, v in KINDS.items() if v.token_level)
            raise PackError(
                f"a {self.task_kind} task pools the tokens: pooling 'none' is only for {token_kinds}; "
                "use mean, cls or pooler"
            )
        k.check_labels(self.labels)
        if self.no_answer and not k.no_answer:
            raise PackError(f"no_answer is for question-answering tasks only, not {self.task_kind}")
        self.biases = [b if isinstance(b, TensorSpec) else TensorSpec.from_json(b) for b in self.biases]
        self.head = [h if isinstance(h, TensorSpec) else TensorSpec.from_json(h) for h in self.head]

    @property
    def kind(self) -> TaskKind:
        return kind(self.task_kind)

    @property
    def num_outputs(self) -> int:
        return self.kind.outputs(self.labels)

    @property
    def token_level(self) -> bool:
        return self.kind.token_level

    @property
    def specs(self) -> list[TensorSpec]:
        return [*self.biases, *self.head]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["biases"] = [b.to_json() for b in self.biases]
        out["head"] = [h.to_json() for h in self.head]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PackManifest:
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - data.keys())
        if missing:
            raise PackError(f"manifest.json lacks the keys {missing}: the pack is incomplete; save it again")
        return cls(**{k: v for k, v in data.items() if k in names})



@dataclass
class TaskPack:
    """A manifest plus its tensors (biases and head) as float32 numpy arrays."""

    manifest: PackManifest
    tensors: dict[str, np.ndarray]

    @property
    def name(self) -> str:
        return self.manifest.task

    @property
    def biases(self) -> dict[str, np.ndarray]:
        return {s.name: self.tensors[s.name] for s in self.manifest.biases}

    @property
    def nbytes(self) -> int:
        return sum(int(t.nbytes) for t in self.tensors.values())

    def validate(self, where: str = "the pack") -> None:
        check_tensors(self.manifest, self.tensors, where)


def check_tensors(manifest: PackManifest, tensors: dict[str, np.ndarray], where: str) -> None:
    """Raise PackError listing every way `tensors` differs from what `manifest` declares."""
    problems: list[str] = []
    declared = {s.name: s for s in manifest.specs}
    missing = sorted(declared.keys() - tensors.keys())
    extra = sorted(tensors.keys() - declared.keys())
    if missing:
        problems.append(f"missing tensors {_short(missing)}")
    if extra:
        problems.append(f"unexpected tensors {_short(extra)} (not in the manifest)")
    for name in sorted(declared.keys() & tensors.keys()):
        spec, t = declared[name], tensors[name]
        if tuple(t.shape) != spec.shape:
            problems.append(f"{name} has shape {tuple(t.shape)}, the manifest says {spec.shape}")
        if str(t.dtype) != spec.dtype:
            problems.append(f"{name} has dtype {t.dtype}, the manifest says {spec.dtype}")
        elif np.issubdtype(t.dtype, np.floating) and not np.isfinite(t).all():
            problems.append(f"{name} holds NaN or inf values (training diverged? lower the learning rate)")
    w = tensors.get(HEAD_WEIGHT)
    if w is not None and w.ndim == 2 and w.shape != (manifest.num_outputs, manifest.hidden_size):
        problems.append(
            f"{HEAD_WEIGHT} has shape {tuple(w.shape)} but the task has {manifest.num_outputs} outputs "
            f"and hidden size {manifest.hidden_size}"
        )
    if manifest.pooling == "pooler":
        h = manifest.hidden_size
        want = {HEAD_POOLER_WEIGHT: (h, h), HEAD_POOLER_BIAS: (h,)}
        head = {s.name: s for s in manifest.head}
        for name, shape in want.items():
            if name not in head:
                problems.append(f"pooling is 'pooler' but the manifest's head lacks {name} {shape}")
            elif name not in tensors:
                pass  # already reported as missing above
            elif tuple(tensors[name].shape) != shape:
                problems.append(f"{name} has shape {tuple(tensors[name].shape)}, the pooler needs {shape}")
    if problems:
        raise PackError(f"{where} is invalid: " + "; ".join(problems))


def _short(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _jsonable(obj: Any) -> Any:
    """Metrics come from numpy and torch: make them plain JSON (NaN becomes null)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(float(obj)) else float(obj)
    return obj


def save_pack(pack: TaskPack, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write `pack` to directory `path`. An existing pack is replaced only with overwrite=True."""
    path = Path(path)
    pack.validate(f"task pack {pack.name!r}")
    with output_dir(path, overwrite=overwrite, marker=MANIFEST_FILE, what="task pack", error=PackError) as tmp:
        m = pack.manifest
        # One metadata key holding sorted JSON: safetensors writes several keys in hash-map order, which
        # changes between calls, and the same pack must always give the same bytes (and tensors_sha256).
        provenance = {"format": FORMAT, "task": m.task, "base_fingerprint": m.base_fingerprint}
        tensors = {k: np.ascontiguousarray(v) for k, v in pack.tensors.items()}
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={METADATA_KEY: json.dumps(provenance, sort_keys=True)})
        m.tensors_sha256 = sha256_file(tmp / TENSORS_FILE)
        m.metrics = _jsonable(m.metrics)
        (tmp / MANIFEST_FILE).write_text(json.dumps(m.to_json(), indent=2) + "\n")
    return path


def read_manifest(path: str | os.PathLike) -> PackManifest:
    """Read and check a pack's manifest.json (no tensors)."""
    root = _pack_dir(Path(path))
    try:
        data = json.loads((root / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        raise PackError(f"{root} has no {MANIFEST_FILE}: it is not a task pack (train one with `bitfit train`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PackError(f"{root / MANIFEST_FILE} is not valid JSON ({e}): the pack is corrupt; save it again") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise PackError(f"{root / MANIFEST_FILE} is not a bitfit task-pack manifest (format is not {FORMAT!r})")
    if _version(data, root / MANIFEST_FILE, PackError) > FORMAT_VERSION:
        raise PackError(
            f"{root} uses pack format {data['format_version']}, newer than this bitfit reads ({FORMAT_VERSION}): "
            "upgrade bitfit"
        )
    try:
        return PackManifest.from_json(data)
    except TypeError as e:
        raise PackError(f"{root / MANIFEST_FILE} has malformed entries ({e}): the pack is corrupt") from e


def _version(data: dict, where: Path, error: type[Exception]) -> int:
    try:
        return int(data.get("format_version", 0))
    except (TypeError, ValueError):
        raise error(f"{where} has format_version {data.get('format_version')!r}, not an integer: it is corrupt") from None


def load_pack(path: str | os.PathLike) -> TaskPack:
    """Load a pack strictly: checksum, metadata, names, shapes, dtypes and finiteness are all checked."""
    root = _pack_dir(Path(path))
    manifest = read_manifest(root)
    tensors_path = root / TENSORS_FILE
    if not tensors_path.is_file():
        raise PackError(f"{root} has no {TENSORS_FILE}: the pack is incomplete; save it again")
    if manifest.tensors_sha256 and sha256_file(tensors_path) != manifest.tensors_sha256:
        raise PackError(
            f"{tensors_path} does not match the checksum in {MANIFEST_FILE}: the file is truncated, corrupt "
            "or was changed after saving; re-save or re-copy the pack"
        )
    try:
        from safetensors import safe_open

        with safe_open(str(tensors_path), framework="np") as fh:
            metadata = fh.metadata() or {}
        tensors = load_file(str(tensors_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise PackError(f"{tensors_path} is not a readable safetensors file ({e}): re-save or re-copy the pack") from e
    try:
        provenance = json.loads(metadata.get(METADATA_KEY, "{}"))
    except json.JSONDecodeError:
        provenance = {}
    if "base_fingerprint" not in provenance:
        raise PackError(
            f"{tensors_path} carries no bitfit provenance metadata: it was not written by bitfit's save_pack "
            "(or by a pre-release version); re-save the pack"
        )
    if provenance.get("base_fingerprint") != manifest.base_fingerprint:
        raise PackError(
            f"{tensors_path} was saved for base fingerprint {provenance.get('base_fingerprint')!r} but "
            f"{MANIFEST_FILE} says {manifest.base_fingerprint!r}: files from two packs were mixed"
        )
    pack = TaskPack(manifest, tensors)
    pack.validate(f"task pack {root}")
    return pack


def _pack_dir(path: Path) -> Path:
    if path.is_file() and path.name in (MANIFEST_FILE, TENSORS_FILE):
        return path.parent
    if not path.exists():
        raise PackError(f"no task pack at {path}: check the path (train one with `bitfit train`)")
    if not path.is_dir():
        raise PackError(f"{path} is a file, not a task pack directory (a pack holds {MANIFEST_FILE} and {TENSORS_FILE})")
    return path
