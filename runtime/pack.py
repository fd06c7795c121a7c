"""Task packs: one task's trained biases and head, with a manifest that says what they fit.

A pack is a directory holding ``manifest.json`` and ``tensors.safetensors``. It needs numpy and
safetensors only, so the deployment runtime reads it without torch. Loading is strict: the manifest is a
schema (runtime.schema) sealed by its own sha256, the tensors file is under a sha256 the manifest holds
(both required), its header is checked against the manifest before any tensor is read, and every
mismatch between the manifest and the tensors is an error, never a silent skip.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from . import args as A
from . import schema as S
from .errors import IncompatibleError, PackError
from .fs import output_dir, regular_size, sha256_file
from .heads import (
    HEAD_BIAS,
    HEAD_POOLER_BIAS,
    HEAD_POOLER_WEIGHT,
    HEAD_WEIGHT,
    POOLINGS,
)
from .kinds import KINDS, TaskKind
from .kinds import kind as task_kind_of
from .manifest import Format, read_versioned
from .tensorfile import load_tensors, size_problem

FORMAT = "bitfit-task-pack"
# 2: the manifest carries its own sha256 and both checksums are required (format 1 had neither required)
FORMAT_VERSION = 2
MANIFEST_FILE = "manifest.json"
TENSORS_FILE = "tensors.safetensors"
METADATA_KEY = "bitfit"  # safetensors metadata: provenance JSON, checked against the manifest
# Bias kinds in the paper's notation (plus bLNe, the embeddings' LayerNorm): the names packs and graphs use.
LAYER_KINDS = ("bq", "bk", "bv", "bm1", "bLN1", "bm2", "bm3", "bLN2")
EMBEDDING_KIND = "bLNe"
BIAS_KINDS = (*LAYER_KINDS, EMBEDDING_KIND)
_FIX = "the pack is damaged or was edited by hand; re-save it (train, extract or import-peft again) or re-copy it"
# The largest |value| any bias or head tensor may hold: in a pack, a bias bank, or a compiled directory's base
# biases. Trained values are O(1)-O(10) (all-MiniLM-L6-v2's largest bias is 1.64; BERT-family LayerNorm shifts
# stay in the tens), and Adam moves a bias by about one learning rate per step (10,000 steps at 1e-3: 10), so no
# trained tensor comes near 1e4, and below it no head product comes near float32's 3.4e38. Beyond it the file
# is corrupt or forged, and finiteness alone cannot tell: a LayerNorm rescales whatever reaches it, so a bias
# x 1e30 gives finite answers that mean nothing, while a head weight of 3e38 overflows to NaN.
MAX_ABS_VALUE = 1e4
# What a BERT-style tokenizer adds around one text ([CLS] a [SEP]) and two ([CLS] a [SEP] b [SEP]): the floor
# where the tokenizer is not at hand (a manifest alone); with it, min_max_length takes the tokenizer's own count.
SPECIAL_TOKENS = {False: 2, True: 3}


def min_max_length(pair: bool, special_tokens: int | None = None) -> int:
    """The shortest max_length that holds the tokenizer's special tokens plus one token of each text (two
    texts for pairs and question answering). Less truncates every text to nothing, so every input is refused,
    or cannot truncate at all."""
    specials = SPECIAL_TOKENS[bool(pair)] if special_tokens is None else special_tokens
    return specials + (2 if pair else 1)


def model_identity(model: str | os.PathLike) -> tuple[str, str]:
    """(the name that identifies a base model on another machine, where it is on this one): an HF id as given,
    with no path; a local directory by its own name, with its absolute path as a hint. Manifests record both
    (base_model, base_model_path); the base fingerprint beside them is what is checked."""
    if Path(model).is_dir():
        path = os.path.abspath(model)
        return Path(path).name, path
    return str(model), ""


def locate_base_model(name: str, path: str, fingerprint: str, what: str) -> str:
    """Where to load a manifest's base model from here: its recorded directory if that exists on this machine,
    its name when no directory was recorded (an HF id; an old manifest's absolute path); otherwise a BitFitError
    asking for the model (only the fingerprint can tell it is the right one)."""
    if not path:
        return name
    if Path(path).is_dir():
        return path
    raise IncompatibleError(f"{what} was made from the base model {name!r} in {path}, a directory that is not on this "
                            f"machine: give the base model explicitly (--model); its fingerprint must start with "
                            f"{fingerprint[:12]}")


def two_texts(task_kind: str, text_pair: bool) -> bool:
    """Whether a task's rows are two texts: sentence pairs, or question answering's question and context."""
    return task_kind_of(task_kind).two_texts(text_pair)


SPEC_FIELDS = {
    "name": S.text(256),
    "shape": S.SHAPE,
    "dtype": S.one_of(("float32",)),
    "kind": S.one_of(BIAS_KINDS, required=False),
    "layer": S.integer(0, 1 << 16, required=False),
    "source": S.string(required=False),
}
_CHECKSUM = S.Field(lambda v: v == "" or S.hexdigest().check(v), "a sha256 hex digest", required=False)
MANIFEST_FIELDS = {
    "task": S.task_name(),
    "task_kind": S.text(64),  # a registered kind: checked by runtime.kinds, which names them
    "labels": S.list_of(S.text(256), 1 << 16),
    "pooling": S.one_of(POOLINGS),
    "max_length": S.integer(1, 1 << 20),
    "text_pair": S.boolean(),
    "base_model": S.string(),
    "base_model_path": S.string(required=False),  # absent in packs written before it (a hint only)
    "base_model_type": S.string(256),
    "base_fingerprint": S.hexdigest(),
    "hidden_size": S.integer(1, 1 << 16),
    "tokenizer": S.string(),
    "bias_subset": S.list_of(S.one_of(BIAS_KINDS), len(BIAS_KINDS), unique=True),
    "biases": S.list_of(S.record(SPEC_FIELDS), 1 << 16),
    "head": S.list_of(S.record(SPEC_FIELDS), 8),
    "trainable_params": S.integer(0),
    "base_params": S.integer(1),
    "metrics": S.Field(lambda v: isinstance(v, dict) and S.json_value().check(v), "an object of JSON values",
                       required=False),
    "no_answer": S.boolean(required=False),
    "tool_version": S.string(256, required=False),
    "tensors_sha256": _CHECKSUM,
}
MANIFEST_FORMAT = Format(
    FORMAT, FORMAT_VERSION, MANIFEST_FIELDS, "task-pack manifest", PackError, _FIX,
    newer="{root} uses pack format {version}, newer than this bitfit reads ({current}): upgrade bitfit",
    older="{root} uses pack format {version}, written by an older bitfit without the checksums this version requires: "
          "re-save it with this version (train, extract or import-peft again)",
    checksums=("tensors_sha256", S.SEAL), seal=_CHECKSUM)


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
        return {f.name: (list(v) if f.name == "shape" else v) for f in fields(self)
                if (v := getattr(self, f.name)) is not None}

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
    # base_model names the model on any machine (an HF id, or a local directory's name: model_identity); this is
    # where the directory was on the machine that wrote the pack, a hint only ("" for an HF id, and in old packs,
    # whose base_model is that absolute path). What is checked is base_fingerprint.
    base_model_path: str = ""
    tool_version: str = ""
    tensors_sha256: str = ""
    manifest_sha256: str = ""  # set by save_pack: the sha256 of the rest of the manifest (runtime.schema)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.biases = [b if isinstance(b, TensorSpec) else TensorSpec.from_json(b) for b in self.biases]
        self.head = [h if isinstance(h, TensorSpec) else TensorSpec.from_json(h) for h in self.head]
        problems = self.problems()
        if problems:
            raise PackError(f"the manifest of task pack {self.task!r} is inconsistent: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Every way the manifest's fields contradict each other (types are the schema's job)."""
        k = self.kind
        out = []
        name_problem = S.task_name_problem(self.task)
        if name_problem:  # a manifest built in memory; one read from disk was refused by the schema already
            out.append(name_problem)
        pair = two_texts(self.task_kind, self.text_pair)
        if isinstance(self.max_length, int) and self.max_length < min_max_length(pair):
            out.append(f"max_length {self.max_length} cannot hold the special tokens and one token of "
                       f"{'each text' if pair else 'the text'}: it must be at least {min_max_length(pair)}")
        if k.token_level and self.pooling != "none":
            out.append(f"a {self.task_kind} task has logits per token, so its pooling must be 'none', got "
                       f"{self.pooling!r}")
        if not k.token_level and self.pooling == "none":
            token_kinds = tuple(n for n, v in KINDS.items() if v.token_level)
            out.append(f"a {self.task_kind} task pools the tokens: pooling 'none' is only for {token_kinds}; use "
                       "mean, cls or pooler")
        k.check_labels(self.labels)
        if self.no_answer and not k.no_answer:
            out.append(f"no_answer is for question-answering tasks only, not {self.task_kind}")
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            out.append(f"tensors listed twice: {sorted({n for n in names if names.count(n) > 1})[:4]}")
        for b in self.biases:
            if b.kind is None or b.kind not in self.bias_subset or len(b.shape) != 1:
                out.append(f"bias {b.name} must be a vector of one of the pack's bias kinds {self.bias_subset}, got "
                           f"kind {b.kind} shape {list(b.shape)}")
        absent = [s for s in self.bias_subset if not any(b.kind == s for b in self.biases)]
        if absent:
            out.append(f"bias_subset names {absent} but no tensor of that kind is listed")
        n, h = self.num_outputs, self.hidden_size
        want = {HEAD_WEIGHT: (n, h), HEAD_BIAS: (n,)}
        if self.pooling == "pooler":
            want |= {HEAD_POOLER_WEIGHT: (h, h), HEAD_POOLER_BIAS: (h,)}
        have = {s.name: s.shape for s in self.head}
        if have != want:
            out.append(f"the head must be {_shapes(want)} for {n} outputs, hidden size {h} and pooling "
                       f"{self.pooling!r}; the manifest lists {_shapes(have)}")
        return out

    @property
    def kind(self) -> TaskKind:
        """The task kind (runtime.kinds) named by task_kind; a bias's kind (bq, bm2, ...) is TensorSpec.kind."""
        return task_kind_of(self.task_kind)

    @property
    def num_outputs(self) -> int:
        return self.kind.outputs(self.labels)

    @property
    def token_level(self) -> bool:
        return self.kind.token_level

    @property
    def specs(self) -> list[TensorSpec]:
        return [*self.biases, *self.head]

    def base_model_source(self) -> str:
        """Where to load the base model from on this machine (locate_base_model)."""
        return locate_base_model(self.base_model, self.base_model_path, self.base_fingerprint,
                                 f"task pack {self.task!r}")

    def to_json(self) -> dict[str, Any]:
        # shallow, not asdict(): asdict deep-copies ~50 specs, and this runs for every pack registered
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name not in ("biases", "head")}
        out["biases"] = [b.to_json() for b in self.biases]
        out["head"] = [h.to_json() for h in self.head]
        if not self.base_model_path:  # an old pack keeps its JSON, so its digest and seal, as written
            del out["base_model_path"]
        return out

    @classmethod
    def from_json(cls, data: Any, where: str = "the pack's manifest") -> PackManifest:
        """A manifest from parsed JSON, checked against the schema first (types, ranges, keys)."""
        data = S.validate(data, MANIFEST_FORMAT.schema, where, PackError, _FIX)
        return cls(**data)


def _shapes(specs: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{k} {list(v)}" for k, v in sorted(specs.items())) or "nothing"


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

    def digest(self) -> str:
        """sha256 of what the pack computes: its manifest (less its checksums, which depend on how it was
        saved) and every tensor's name, shape and float32 bytes. The same pack gives the same digest in
        memory, saved, and loaded again; servers report it so a caller can tell which version answered."""
        h = hashlib.sha256()
        meta = {k: v for k, v in self.manifest.to_json().items() if k not in ("tensors_sha256", S.SEAL)}
        h.update(json.dumps(_jsonable(meta), sort_keys=True).encode())
        for name in sorted(self.tensors):
            array = np.ascontiguousarray(self.tensors[name], dtype="<f4")
            h.update(f"\n{name}{array.shape}".encode())
            h.update(array.tobytes())
        return h.hexdigest()

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
        else:
            problems += value_problems({name: t})
    if problems:
        raise PackError(f"{where} is invalid: " + "; ".join(problems))


def value_problems(tensors: Mapping[str, np.ndarray]) -> list[str]:
    """Each tensor that holds NaN or inf, or a value beyond MAX_ABS_VALUE: the one check of the values of every
    bias and head the forward pass reads (check_tensors for packs and banks, runtime.compiled for base biases)."""
    out = []
    for name, t in tensors.items():
        if not np.isfinite(t).all():
            out.append(f"{name} holds NaN or inf values (training diverged? lower the learning rate)")
        elif t.size and (top := float(np.abs(t).max())) > MAX_ABS_VALUE:
            out.append(f"{name} holds values up to |{top:.3g}|, beyond {MAX_ABS_VALUE:g}, the bound on every bias "
                       "and head value (trained ones are O(1)-O(10)): the values are corrupt or were not written "
                       "by training; retrain the task, or re-copy the original")
    return out


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
    with output_dir(path, overwrite=overwrite, marker=MANIFEST_FILE, format=FORMAT, what="task pack",
                    error=PackError) as tmp:
        m = pack.manifest
        # One metadata key holding sorted JSON: safetensors writes several keys in hash-map order, which
        # changes between calls, and the same pack must always give the same bytes (and tensors_sha256).
        provenance = {"format": FORMAT, "task": m.task, "base_fingerprint": m.base_fingerprint}
        tensors = {k: np.ascontiguousarray(v) for k, v in pack.tensors.items()}
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={METADATA_KEY: json.dumps(provenance, sort_keys=True)})
        m.tensors_sha256 = sha256_file(tmp / TENSORS_FILE)
        m.metrics = _jsonable(m.metrics)
        data = S.seal(m.to_json())
        m.manifest_sha256 = data[S.SEAL]
        (tmp / MANIFEST_FILE).write_text(json.dumps(data, indent=2) + "\n")
    return path


def read_pack_manifest(path: str | os.PathLike) -> PackManifest:
    """Read and check a pack's manifest.json (no tensors): bounded read, format and version, both checksums
    present, the schema, and its seal (the sha256 of the rest of it), so a hand edit is refused however
    well-formed (runtime.manifest)."""
    root = _pack_dir(path)
    where = root / MANIFEST_FILE
    if not os.path.lexists(where):
        raise PackError(f"{root} has no {MANIFEST_FILE}: it is not a task pack (train one with `bitfit train`)")
    return PackManifest(**read_versioned(where, MANIFEST_FORMAT))


# the name before the compiled reader got its own: bitfit.serve.packdir and tests import it
read_manifest = read_pack_manifest


def load_pack(path: str | os.PathLike) -> TaskPack:
    """Load a pack strictly: the manifest (read_pack_manifest), then the tensors file: its checksum, its header
    against the manifest before any tensor is read, provenance, names, shapes, dtypes and finiteness."""
    root = _pack_dir(path)
    manifest = read_pack_manifest(root)
    tensors_path = root / TENSORS_FILE
    if not os.path.lexists(tensors_path):
        raise PackError(f"{root} has no {TENSORS_FILE}: the pack is incomplete; save it again")
    check_tensors_size(root, manifest)
    if sha256_file(tensors_path) != manifest.tensors_sha256:
        raise PackError(
            f"{tensors_path} does not match the checksum in {MANIFEST_FILE}: the file is truncated, corrupt "
            "or was changed after saving; re-save or re-copy the pack"
        )
    expected = {s.name: (s.shape, s.dtype) for s in manifest.specs}
    tensors, metadata = load_tensors(tensors_path, expected, error=PackError, fix=_FIX)
    try:
        provenance = json.loads(metadata.get(METADATA_KEY, "{}"))
    except ValueError:
        provenance = {}
    if not isinstance(provenance, dict) or "base_fingerprint" not in provenance:
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


def check_tensors_size(root: Path, manifest: PackManifest) -> int:
    """The size of a pack's tensors file, refused (PackError) unless it is a regular file of the size the manifest's
    shapes imply: checked before the file is hashed, so a huge or sparse file is refused at the cost of a stat."""
    path = root / TENSORS_FILE
    size = regular_size(path, error=PackError, fix=_FIX)
    problem = size_problem(size, (s.shape for s in manifest.specs))
    if problem:
        raise PackError(f"{path}: {problem}: it is truncated, corrupt or was changed after saving (it cannot match "
                        f"the checksum in {MANIFEST_FILE}); re-save or re-copy the pack")
    return size


def _pack_dir(path: str | os.PathLike) -> Path:
    path = Path(A.check("path", path, A.PATH))
    if path.is_file() and path.name in (MANIFEST_FILE, TENSORS_FILE):
        return path.parent
    if not path.exists():
        raise PackError(f"no task pack at {path}: check the path (train one with `bitfit train`)")
    if not path.is_dir():
        raise PackError(f"{path} is a file, not a task pack directory (a pack holds {MANIFEST_FILE} and {TENSORS_FILE})")
    return path
