"""A task pack as an onnxruntime adapter file (.onnx_adapter), for any onnxruntime binding without our code.

The file holds the pack's biases and head under the graph's input names; onnxruntime feeds them on a run
where the adapter is active (`RunOptions.add_active_adapter(LoraAdapter)`, onnxruntime >= 1.20), so a
C/C#/Java/JS user feeds token inputs only and reads `logits` (or `token_logits`). Every name must be an
OPTIONAL graph input (an overridable initializer): onnxruntime checks required inputs before adapters apply.

Traps of the adapter mechanism (measured with onnxruntime 1.32, see shared/ONNX-NOTES):
- an active adapter silently wins over an explicit feed of the same name;
- with two active adapters that share names, the first one's values win, silently. Use ONE adapter per run.
- RunOptions does not keep its LoraAdapter alive (Python binding): once the LoraAdapter object is collected,
  runs with those RunOptions silently use the defaults (the base model). Keep a reference to it.
- the format has no base-model identity: model_version holds the first 28 bits of the base fingerprint
  (`adapter_fits` checks it) and a sidecar FILE.json says task, labels, kind and the graph it was checked on.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from bitfit.runtime import args as A
from bitfit.runtime import compiled as cm
from bitfit.runtime import schema as S
from bitfit.runtime.compiled import CompiledModel
from bitfit.runtime.errors import BitFitError, CompiledModelError, IncompatibleError, PackError
from bitfit.runtime.fs import write_file
from bitfit.runtime.pack import TaskPack, load_pack
from bitfit.runtime.version import __version__

SIDECAR_FORMAT = "bitfit-adapter"
SIDECAR_VERSION = 1
ADAPTER_SUFFIX = ".onnx_adapter"
USAGE = ("feed the token inputs only, with this adapter active: RunOptions.add_active_adapter(LoraAdapter). "
         "One adapter per run: with two active adapters the first one's values win silently, and an active "
         "adapter wins over an explicit feed of the same name. Keep the LoraAdapter object alive while its RunOptions "
         "is used: the Python binding does not, and a collected adapter silently stops applying.")


def fingerprint_version(fingerprint: str) -> int:
    """The first 28 bits of a hex fingerprint: adapter versions are int32 in the format."""
    try:
        return int(fingerprint[:7], 16)
    except ValueError:
        raise PackError(f"base fingerprint {fingerprint!r} is not hex: the pack is corrupt") from None


def sidecar_path(adapter: str | os.PathLike) -> Path:
    return Path(adapter).with_suffix(".json")


def adapter_tensors(pack: TaskPack) -> dict[str, np.ndarray]:
    """What the adapter holds: the pack's biases and its head feeds (runtime.compiled.head_feeds), by graph input."""
    return {**{k: np.ascontiguousarray(v, dtype=np.float32) for k, v in pack.biases.items()}, **cm.head_feeds(pack)}


def export_adapter(
    compiled_dir: str | os.PathLike,
    pack: str | os.PathLike | TaskPack,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> Path:
    """Write `pack` as an onnxruntime adapter file for the graph in `compiled_dir`, plus a sidecar JSON.

    Raises IncompatibleError when the pack does not fit the graph (other base, missing bias inputs) or a
    name is not an optional input of the graph; CompiledModelError for a mixed graph or one without the
    in-graph head; BitFitError when `out` (or its sidecar) exists and overwrite is False.
    """
    A.check("compiled_dir", compiled_dir, A.PATH)
    A.check("pack", pack, A.PACK)
    out = Path(A.check("out", out, A.PATH))
    A.check("overwrite", overwrite, S.boolean())
    side = sidecar_path(out)
    if out.suffix == ".json":
        raise BitFitError(f"{out}: the adapter's sidecar is FILE.json; name the adapter FILE{ADAPTER_SUFFIX}")
    for path in (out, side):
        if path.exists() and not overwrite:
            raise BitFitError(f"{path} already exists: choose another --out, or pass --overwrite to replace it")
        if path.is_dir():
            raise BitFitError(f"{path} is a directory: choose a file name for --out")
    opened = CompiledModel.open(compiled_dir)
    manifest = opened.manifest
    if manifest.mixed:
        raise CompiledModelError(f"{opened.directory} is a --mixed graph (bias tables + task_ids): adapters feed one "
                                 "task's vectors; compile without --mixed")
    if not manifest.head_inputs:
        raise CompiledModelError(f"{opened.directory} has no in-graph head (compiled with --no-head or by an older "
                                 "bitfit): compile again without --no-head")
    if not isinstance(pack, TaskPack):
        pack = load_pack(pack)
    pack.validate(f"task pack {pack.name!r}")
    opened.check_pack(pack)
    tensors = adapter_tensors(pack)
    session = _session(opened.model_path)
    _check_optional_inputs(session, tensors, opened.model_path)

    m = pack.manifest
    adapter = ort.AdapterFormat()
    adapter.set_model_version(fingerprint_version(manifest.base_fingerprint))
    adapter.set_adapter_version(fingerprint_version(m.tensors_sha256 or "0"))
    # OrtValues through set_parameters: assigning the attributes directly writes an empty file (shared notes)
    adapter.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in tensors.items()})
    # onnxruntime writes the file itself: to a scratch name, checked, then moved in with write_file's rename
    scratch = out.with_name(f".{out.name}.bitfit-export-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        adapter.export_adapter(str(scratch))
        _check_round_trip(scratch, tensors)
        _check_applies(session, scratch, tensors, manifest)
        data = scratch.read_bytes()
    finally:
        scratch.unlink(missing_ok=True)
    record = sidecar(manifest, pack, manifest.files[cm.MODEL_FILE], tensors)
    write_file(out, data, overwrite=overwrite, what="adapter file")
    write_file(side, json.dumps(record, indent=2) + "\n", overwrite=overwrite, what="adapter sidecar")
    return out


def sidecar(manifest: cm.CompiledManifest, pack: TaskPack, graph_sha: str, tensors: dict[str, np.ndarray]) -> dict:
    m = pack.manifest
    return {
        "format": SIDECAR_FORMAT,
        "format_version": SIDECAR_VERSION,
        "task": m.task,
        "task_kind": m.task_kind,
        "labels": list(m.labels),
        "pooling": m.pooling,
        "output": cm.TOKEN_LOGITS if m.token_level else cm.LOGITS,
        "num_logits": m.num_outputs,
        "max_length": m.max_length,
        "text_pair": m.text_pair,
        "token_inputs": list(manifest.token_inputs),
        "base_model": m.base_model,
        "base_fingerprint": m.base_fingerprint,
        "model_version": fingerprint_version(manifest.base_fingerprint),
        "pack_tensors_sha256": m.tensors_sha256,
        # The adapter fits every graph of this base with these inputs (fp32, int8, fp16, fused); this is the
        # one it was checked on.
        "checked_graph_sha256": graph_sha,
        "checked_graph_precision": manifest.precision,
        "parameters": sorted(tensors),
        "usage": USAGE,
        "tool_version": __version__,
    }


def adapter_fits(compiled_dir: str | os.PathLike, adapter: str | os.PathLike) -> None:
    """Raise IncompatibleError unless the adapter file was written for the base model of `compiled_dir`
    (model_version: the first 28 bits of the base fingerprint)."""
    manifest = cm.read_manifest(compiled_dir)
    path = Path(adapter)
    if not path.is_file():
        raise BitFitError(f"no adapter file at {path}")
    try:
        version = ort.AdapterFormat.read_adapter(str(path)).get_model_version()
    except Exception as e:  # onnxruntime raises its own untyped errors
        raise PackError(f"{path} is not a readable onnxruntime adapter file ({e})") from e
    if version != fingerprint_version(manifest.base_fingerprint):
        raise IncompatibleError(
            f"{path} was written for another base model (model_version {version}, the graph's base is "
            f"{fingerprint_version(manifest.base_fingerprint)}): export the adapter from a pack of this base"
        )


def _session(model_path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the optional inputs are initializers on purpose
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # a check, not a server
    try:
        return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own untyped errors
        raise CompiledModelError(f"onnxruntime cannot load {model_path} ({e}): compile again") from e


def _check_optional_inputs(session: ort.InferenceSession, tensors: dict[str, np.ndarray], model_path: Path) -> None:
    optional = {i.name: i for i in session.get_overridable_initializers()}
    required = {i.name for i in session.get_inputs()}
    problems = []
    for name, value in tensors.items():
        spec = optional.get(name)
        if spec is None:
            why = "a required input (adapters apply after required inputs are checked)" if name in required else \
                "not an input"
            problems.append(f"{name} is {why}")
        elif len(spec.shape) != value.ndim or any(isinstance(d, int) and d != n
                                                  for d, n in zip(spec.shape, value.shape)):
            problems.append(f"{name} is {list(value.shape)} but the graph's input is {spec.shape}")
    if problems:
        raise IncompatibleError(f"the adapter does not fit {model_path}: " + "; ".join(problems))


def _check_round_trip(path: Path, tensors: dict[str, np.ndarray]) -> None:
    if path.stat().st_size == 0:
        raise BitFitError(f"onnxruntime wrote an empty adapter file {path}")
    back = {k: v.numpy() for k, v in ort.AdapterFormat.read_adapter(str(path)).get_parameters().items()}
    if back.keys() != tensors.keys() or any(not np.array_equal(back[k], v) for k, v in tensors.items()):
        raise BitFitError(f"the adapter file {path} does not read back as written: onnxruntime's adapter format "
                          "changed; please report it")


def _check_applies(session: ort.InferenceSession, path: Path, tensors: dict[str, np.ndarray],
                   manifest: cm.CompiledManifest) -> None:
    """One tiny run with the adapter active must equal one with the same tensors fed explicitly."""
    tokens: dict[str, Any] = {name: np.zeros((1, 2), np.int64) for name in manifest.token_inputs}
    tokens["attention_mask"] = np.ones((1, 2), np.int64)
    adapter = ort.LoraAdapter()
    adapter.Load(str(path))
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    names = [cm.LOGITS, cm.TOKEN_LOGITS]
    try:
        with_adapter = session.run(names, tokens, options)
        fed = session.run(names, {**tokens, **tensors})
    except Exception as e:  # onnxruntime raises its own untyped errors
        raise IncompatibleError(f"onnxruntime refused the adapter on the graph ({e})") from e
    if any(not np.array_equal(a, b) for a, b in zip(with_adapter, fed)):
        raise BitFitError("a run with the adapter active differs from one feeding its tensors: onnxruntime did not "
                          "apply it; please report it")
