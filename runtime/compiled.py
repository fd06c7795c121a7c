"""The compiled directory: model.onnx, tokenizer.json and a manifest that is the contract between them
and every task pack. Names, shapes and the base fingerprint are written here and checked, never assumed.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import args as A
from . import schema as S
from .errors import CompiledModelError, IncompatibleError
from .fs import MAX_TOKENIZER_BYTES, open_regular, regular_size, sha256_file, write_file
from .heads import HEAD_BIAS, HEAD_POOLER_BIAS, HEAD_POOLER_WEIGHT, HEAD_WEIGHT
from .manifest import Format, read_versioned
from .pack import SPEC_FIELDS, PackManifest, TaskPack, TensorSpec, locate_base_model, value_problems
from .tensorfile import load_tensors, size_problem

FORMAT = "bitfit-compiled"
# 2: every file is under a required checksum, the manifest under its own, and it states the vocabulary sizes
FORMAT_VERSION = 2
MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
OUTPUT_NAME = "last_hidden_state"
TASK_IDS = "task_ids"  # mixed graphs: int64 [batch], each row's row in the bias tables
BASE_BIASES_FILE = "base_biases.safetensors"  # the base model's bias values, by canonical name
FILES = (MODEL_FILE, TOKENIZER_FILE, BASE_BIASES_FILE)  # what a compiled directory holds besides its manifest
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
DEFAULT_OPSET = 17  # LayerNormalization is a single op from 17 on
OPSETS = (17, 20)  # the opsets compile accepts: torch's exporter writes up to 20
# The in-graph head (plain graphs): optional inputs, so a run that feeds none of them is the base model.
HEAD_POOLING = "head.pooling"  # float [3]: weights of the (mean, cls, pooler) poolings; one-hot for a pack
POOLING_COLUMNS = ("mean", "cls", "pooler")
LOGITS = "logits"  # [batch, labels] = pooled @ head.weight^T + head.bias
TOKEN_LOGITS = "token_logits"  # [batch, sequence, labels] = hidden @ head.weight^T + head.bias
MAX_ONNX_BYTES = 2 << 30  # protobuf's limit: a larger graph keeps its weights in external files, which ours never does
_FIX = "the compiled directory is damaged or was edited by hand; compile it again (bitfit compile)"

# IREE targets (compiler/iree.py): an ahead-of-time module per shape bucket, the weights inside as constants and
# the arguments token inputs + biases (+ task_ids) in the graph's input order. model.onnx stays beside the modules:
# it is what they were compiled from (checksummed, onnxruntime runs it too) and what verify and other targets read.
IREE_TARGETS = ("iree-cpu", "iree-cuda", "iree-rocm", "iree-vulkan")
IREE_FUNCTION = "main_graph"
_MODULE_FILE = S.Field(lambda v: isinstance(v, str) and re.fullmatch(r"module[-a-z0-9x]*\.vmfb", v) is not None,
                       "a module file name (module*.vmfb)")
IREE_FIELDS = {
    "target": S.one_of(IREE_TARGETS),
    "hal_backend": S.string(64),  # iree-compile's backend: llvm-cpu, cuda, rocm, vulkan-spirv
    "cpu": S.string(256),  # --iree-llvmcpu-target-cpu (or the GPU architecture) the modules were compiled for
    "cpu_features": S.list_of(S.string(64), 256),  # host features compiled for (llvm-cpu, target cpu "host")
    "iree_version": S.string(256),
    "flags": S.list_of(S.string(4096), 256),  # every iree-compile flag, so a module can be rebuilt
    "arguments": S.list_of(S.string(4096), 1 << 16, unique=True),  # the function's arguments, in order
    # one module per shape bucket; batch and sequence 0: dynamic (any size)
    "modules": S.list_of(S.record({"file": _MODULE_FILE, "batch": S.integer(0), "sequence": S.integer(0),
                                   "sha256": S.hexdigest()}), 64),
}

_HEAD_SPEC = {**SPEC_FIELDS, "shape": S.Field(
    lambda v: isinstance(v, list) and 0 < len(v) <= 4 and all(S.integer(-1).check(d) and d != 0 for d in v),
    "a shape: 1 to 4 whole numbers >= 1, or -1 for any size")}
MANIFEST_FIELDS = {
    "base_model": S.string(),
    "base_model_path": S.string(required=False),  # absent in directories compiled before it (a hint only)
    "base_model_type": S.string(256),
    "base_fingerprint": S.hexdigest(),
    "hidden_size": S.integer(1, 1 << 16),
    "num_layers": S.integer(1, 1 << 16),
    "max_positions": S.integer(1, 1 << 20),
    "vocab_size": S.integer(1, 1 << 24),
    "type_vocab_size": S.integer(0, 1 << 16),
    "opset": S.integer(1, 1000),
    "token_inputs": S.Field(lambda v: isinstance(v, list) and v[:2] == list(TOKEN_INPUTS[:2]) and
                            v in (list(TOKEN_INPUTS[:2]), list(TOKEN_INPUTS)),
                            f"{list(TOKEN_INPUTS[:2])} or {list(TOKEN_INPUTS)}"),
    "bias_inputs": S.list_of(S.record(SPEC_FIELDS), 1 << 16),
    "pad_token": S.string(256),
    "pad_token_id": S.integer(0, 1 << 24),
    "files": S.record({name: S.hexdigest() for name in FILES}),
    "output": S.equal(OUTPUT_NAME),
    "precision": S.text(64),
    "passes": S.list_of(S.string(256), 256),
    "fused_ops": S.mapping(S.integer(0)),
    "optimized_with": S.string(256),
    "bias_defaults": S.boolean(),
    "mixed": S.boolean(),
    "head_inputs": S.list_of(S.record(_HEAD_SPEC), 16),
    "outputs": S.list_of(S.one_of((OUTPUT_NAME, LOGITS, TOKEN_LOGITS)), 3, unique=True),
    "tool_version": S.string(256, required=False),
    "iree": S.record(IREE_FIELDS, required=False),
}
MANIFEST_FORMAT = Format(
    FORMAT, FORMAT_VERSION, MANIFEST_FIELDS, "compiled-model manifest", CompiledModelError, _FIX,
    newer="{root} was compiled by a newer bitfit (format {version}): upgrade",
    older="{root} was compiled by an older bitfit (format {version}, without the checksums this version requires): "
          "compile it again")


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
    vocab_size: int  # rows of the word embedding: input ids must lie below it
    type_vocab_size: int = 0  # rows of the token type embedding (0: the graph takes no token_type_ids)
    files: dict[str, str] = field(default_factory=dict)  # sha256 of every file beside the manifest (write_manifest)
    output: str = OUTPUT_NAME
    precision: str = "fp32"
    passes: list[str] = field(default_factory=list)
    fused_ops: dict[str, int] = field(default_factory=dict)  # onnxruntime fused kernels in the graph, by op
    # the onnxruntime that optimised the graph offline (its contrib ops are then in it), or "" (plain ONNX)
    optimized_with: str = ""
    # every bias input has the base value as its default (False: plain required inputs, which graph compilers
    # such as OpenVINO do not freeze; the runtime then always feeds every bias)
    bias_defaults: bool = True
    mixed: bool = False  # biases are [tasks, dim] tables picked per row by task_ids
    # Optional inputs of the in-graph head (-1 in a shape: any size, the number of labels); empty for mixed
    # graphs and graphs compiled with --no-head. outputs: every graph output, `output` first.
    head_inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[str] = field(default_factory=lambda: [OUTPUT_NAME])
    # base_model names the model on any machine (runtime.pack.model_identity); this is the directory it was
    # compiled from, a hint only ("" for an HF id and in old manifests). What is checked is base_fingerprint.
    base_model_path: str = ""
    tool_version: str = ""
    # an ahead-of-time IREE target (IREE_FIELDS), or None: the graph alone, run by onnxruntime or OpenVINO
    iree: dict[str, Any] | None = None
    manifest_sha256: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.bias_inputs = [b if isinstance(b, TensorSpec) else TensorSpec.from_json(b) for b in self.bias_inputs]
        self.head_inputs = [h if isinstance(h, TensorSpec) else TensorSpec.from_json(h) for h in self.head_inputs]
        names = [b.name for b in self.bias_inputs]
        if len(set(names)) != len(names) or any(b.kind is None or len(b.shape) != 1 for b in self.bias_inputs):
            raise CompiledModelError(f"the compiled manifest's bias inputs must be distinct vectors with a kind: {_FIX}")
        if (self.type_vocab_size > 0) != ("token_type_ids" in self.token_inputs):
            raise CompiledModelError(f"type_vocab_size {self.type_vocab_size} contradicts token inputs "
                                     f"{self.token_inputs}: {_FIX}")
        if self.pad_token_id >= self.vocab_size:
            raise CompiledModelError(f"pad_token_id {self.pad_token_id} is outside the vocabulary of {self.vocab_size}: "
                                     f"{_FIX}")

    @property
    def bias_specs(self) -> dict[str, TensorSpec]:
        return {b.name: b for b in self.bias_inputs}

    def base_model_source(self) -> str:
        """Where to load the base model from on this machine (runtime.pack.locate_base_model)."""
        return locate_base_model(self.base_model, self.base_model_path, self.base_fingerprint, "the compiled graph")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["bias_inputs"] = [b.to_json() for b in self.bias_inputs]
        out["head_inputs"] = [h.to_json() for h in self.head_inputs]
        if self.iree is None:  # optional: a manifest without a module reads (and seals) as before
            del out["iree"]
        if not self.base_model_path:  # an old manifest keeps its JSON as written
            del out["base_model_path"]
        return out

    @property
    def module_files(self) -> list[str]:
        """The IREE module files beside the graph (none for a plain compiled directory)."""
        return [m["file"] for m in self.iree["modules"]] if self.iree else []


def write_manifest(directory: str | os.PathLike, manifest: CompiledManifest) -> Path:
    """Write manifest.json for a directory whose other files are complete: their checksums go in, and the
    manifest's own seal over everything."""
    root = Path(directory)
    manifest.files = {name: sha256_file(root / name) for name in FILES}
    for module in (manifest.iree or {}).get("modules", []):
        module["sha256"] = sha256_file(root / module["file"])
    data = S.seal(manifest.to_json())
    manifest.manifest_sha256 = data[S.SEAL]
    return write_file(root / MANIFEST_FILE, json.dumps(data, indent=2) + "\n", what="compiled manifest")


def _root(directory: str | os.PathLike) -> Path:
    root = Path(A.check("compiled directory", directory, A.PATH))
    if root.name == MANIFEST_FILE and root.is_file():  # the manifest's own path names its directory
        root = root.parent
    return root


def read_compiled_manifest(directory: str | os.PathLike) -> CompiledManifest:
    """The compiled manifest, checked: bounded read, format and version, the schema, its seal
    (runtime.manifest), and every file it lists present as a regular file (their contents: CompiledModel.open)."""
    root = _root(directory)
    if not root.is_dir():
        raise CompiledModelError(f"no compiled model at {root}: run `bitfit compile --model M --out {root}` first")
    for name in (MANIFEST_FILE, *FILES):
        if not os.path.lexists(root / name):
            raise CompiledModelError(f"{root} has no {name}: it is not a complete compiled model; compile it again")
    data = read_versioned(root / MANIFEST_FILE, MANIFEST_FORMAT)
    manifest = CompiledManifest(**data)
    for name in (*FILES, *manifest.module_files):
        os.close(open_regular(root / name, error=CompiledModelError, fix=_FIX)[0])
    return manifest


# the name before the pack reader got its own (read_pack_manifest): tests, benchmarks and exporters call it
read_manifest = read_compiled_manifest


@dataclass(frozen=True)
class CompiledModel:
    """A compiled directory, opened and checked once: the manifest, every file against its checksum, and the
    base model's bias values (exactly the bias inputs, float32, finite). What every reader of a compiled
    directory starts from: the session, the bias bank, the Triton and adapter exporters, verify."""

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
        """check_integrity=False skips hashing the files (verify does it as one of its checks)."""
        root = _root(directory)
        manifest = read_compiled_manifest(root)
        if check_integrity:
            changed = changed_files(root, manifest)
            if changed:
                raise CompiledModelError(
                    f"{', '.join(changed)} in {root} do not match the checksums in {MANIFEST_FILE}: corrupt, or "
                    "changed after compiling (a tokenizer or base bias edited by hand changes every answer); "
                    "compile again"
                )
        return cls(root, manifest, _read_base_biases(root, manifest))

    def check_pack(self, pack: TaskPack | PackManifest, where: str = "") -> None:
        check_pack_fits(self.manifest, pack, where)


def changed_files(root: Path, manifest: CompiledManifest) -> list[str]:
    """The files of a compiled directory whose sha256 is not the one its manifest records. A file whose size
    cannot be right (base biases of another size than the bias inputs imply, a tokenizer over the bound) is
    changed without being hashed: a huge or sparse file costs a stat, not minutes. (model.onnx: over protobuf's
    2 GB, which a graph without external data files cannot be.)"""
    out = []
    for name in FILES:
        path = root / name
        size = regular_size(path, error=CompiledModelError, fix=_FIX)
        if ((name == BASE_BIASES_FILE and size_problem(size, (b.shape for b in manifest.bias_inputs)))
                or (name == TOKENIZER_FILE and size > MAX_TOKENIZER_BYTES)
                or (name == MODEL_FILE and size > MAX_ONNX_BYTES)
                or sha256_file(path) != manifest.files.get(name)):
            out.append(name)
    for module in (manifest.iree or {}).get("modules", []):
        if sha256_file(root / module["file"]) != module["sha256"]:
            out.append(module["file"])
    return out


def _read_base_biases(root: Path, manifest: CompiledManifest) -> dict[str, np.ndarray]:
    path = root / BASE_BIASES_FILE
    expected = {spec.name: (spec.shape, "float32") for spec in manifest.bias_inputs}
    base, _ = load_tensors(path, expected, error=CompiledModelError, fix=_FIX)
    problems = value_problems(base)  # the same bound as a pack's: these biases feed the same forward
    if problems:
        raise CompiledModelError(f"{path} is invalid: {'; '.join(problems[:4])}; {_FIX}")
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
        bias_kinds = sorted({b.kind or "?" for b in m.biases if b.name in absent})
        problems.append(
            f"the graph has no input for biases {', '.join(absent[:4])}{' ...' if len(absent) > 4 else ''}: "
            f"recompile with --biases all (or include {','.join(bias_kinds)})"
        )
    held = {b.name for b in m.biases}
    partial = sorted(g.name for g in compiled.bias_inputs if g.kind in m.bias_subset and g.name not in held)
    if partial:  # the base value would stand in for a bias the pack says it trained
        problems.append(f"the pack trains {','.join(m.bias_subset)} but lacks {len(partial)} of the graph's inputs of "
                        f"those kinds ({', '.join(partial[:4])}{' ...' if len(partial) > 4 else ''}): the pack is "
                        "incomplete; re-save it")
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
