"""The Open Inference Protocol (KServe v2, Triton's HTTP API) for `bitfit serve`: one model per task.

The protocol and its routes live here: what a task's model looks like as tensors (its kind's signature),
reading an infer request (JSON, or JSON plus binary tensors: the `binary_tensor_data` extension that
tritonclient uses by default), writing the response, and the /v2 handlers over the app's state (`ROUTES`,
which app.py mounts beside /v1). They share /v1's doors, limits, batcher and error type (state.route,
web.HTTPError); errors are `{"error": message}` with a 4xx status, which is also the protocol's error shape,
and an invalid request is 400 here (web.V2) where /v1 answers 422.

A task's model, by its kind (`TaskKind.call`):

    run (classification, regression)  in:  text BYTES [-1], text_pair BYTES [-1] (pair tasks only)
                                      out: logits FP32 [-1, K]; classification: label BYTES [-1],
                                           scores FP32 [-1, K] (softmax); regression: value FP32 [-1]
    run_tokens (token classification) in:  text BYTES [-1]
                                      out: record BYTES [-1]: one JSON document per text, /v1/tokens' record
    answer (question answering)       in:  question BYTES [-1], context BYTES [-1]
                                      out: answer BYTES [-1], record BYTES [-1] (/v1/answer's record)

The model's version is the first 16 hex digits of the pack's digest (TaskPack.digest): a reload that
changes a pack changes its version, and a request for another version is answered 404.
"""
from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from bitfit.runtime.calls import SEQUENCE
from bitfit.runtime.errors import BitFitError, UnknownTaskError
from bitfit.runtime.kinds import KINDS, TaskKind
from bitfit.runtime.pack import PackManifest, TaskPack
from bitfit.runtime.version import __version__

from .batcher import ServiceUnavailable
from .state import AppState, route
from .web import NON_FINITE, V2, HTTPError, check_limits, dumps, error, json_response, kind_of, parse_json, strings

VERSION_DIGITS = 16
HEADER_LENGTH = "inference-header-content-length"


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


# -- a task's signature: its kind's call shape (runtime.calls) says it ---------------------------------------
def inputs_of(kind: TaskKind, manifest: PackManifest) -> list[Tensor]:
    """The model's inputs (required, all of them: text_pair appears only for pair tasks)."""
    return [Tensor(t.name, t.datatype, t.shape) for t in kind.v2_signature(manifest.text_pair, manifest.labels)[0]]


def outputs_of(kind: TaskKind, manifest: PackManifest) -> list[Tensor]:
    return [Tensor(t.name, t.datatype, t.shape) for t in kind.v2_signature(manifest.text_pair, manifest.labels)[1]]


def version_of(digest: str) -> str:
    return digest[:VERSION_DIGITS]


def model_metadata(task: str, digest: str, kind: TaskKind, manifest: PackManifest, platform: str) -> dict[str, Any]:
    return {"name": task, "versions": [version_of(digest)], "platform": platform,
            "inputs": [t.to_json() for t in inputs_of(kind, manifest)],
            "outputs": [t.to_json() for t in outputs_of(kind, manifest)]}


# what each output tensor holds, read from the session's records (floats as arrays, strings as lists)
_VALUES: dict[str, Callable[[Sequence[dict[str, Any]]], Any]] = {
    "answer": lambda rs: [r["answer"] for r in rs],
    "record": lambda rs: [dumps(r) for r in rs],
    "label": lambda rs: [r["label"] for r in rs],
    "logits": lambda rs: np.asarray([r["logits"] for r in rs], dtype=np.float32).reshape(len(rs), -1),
    "value": lambda rs: np.asarray([r["label"] for r in rs], dtype=np.float32),
    "scores": lambda rs: np.asarray([list(r["scores"].values()) for r in rs], np.float32).reshape(len(rs), -1),
}


def output_tensors(kind: TaskKind, records: Sequence[dict[str, Any]]) -> dict[str, tuple[str, tuple[int, ...], Any]]:
    """Every output of the model as (datatype, shape, values), from the records the session returned (so the
    numbers are /v1's, and the shapes are those of the pack that ran, even across a reload)."""
    out = {}
    for t in kind.shape.outputs(kind.labels == "value", 0):  # the names; the shapes come from the records
        values = _VALUES[t.name](records)
        out[t.name] = (t.datatype, values.shape if isinstance(values, np.ndarray) else (len(records),), values)
    return out


assert all(t.name in _VALUES for k in KINDS.values() for value in (False, True)
           for t in k.shape.outputs(value, 0)), "every output tensor of a call shape needs its values here"


# -- requests ------------------------------------------------------------------------------------------
@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, list[str]]
    outputs: dict[str, bool | None] = field(default_factory=dict)  # requested -> binary (None: default); {}: all
    binary_default: bool = False  # the request's binary_data_output


TENSOR_FIELDS = ("name", "shape", "datatype", "parameters", "data")  # an input tensor (the protocol's)
OUTPUT_FIELDS = ("name", "parameters")  # a requested output
# The only tensor parameters served: the binary extension's, and KServe's codec hint for plain strings. Any other
# (classification, shared memory, a base64 codec) asks for an answer this server does not give, so it is refused
# rather than ignored.
INPUT_PARAMETERS = ("binary_data_size", "content_type")
OUTPUT_PARAMETERS = ("binary_data", "content_type")
CONTENT_TYPES = ("str",)


def parse_infer(raw: bytes, header_length: str | None, expected: Sequence[Tensor], max_items: int,
                max_chars: int) -> InferRequest:
    """An infer request's JSON (and binary tensors after it when `header_length` is given), checked against
    the model's inputs: every field's type (a 400 naming its path, e.g. `inputs[0].name`), names,
    datatypes, shapes, element counts, UTF-8, and the server's limits."""
    header, binary = _split(raw, header_length)
    body = parse_json(header, "invalid JSON in the inference request")
    if not isinstance(body, dict):
        raise HTTPError("the inference request must be a JSON object with 'inputs'")
    unknown = sorted(set(body) - {"id", "inputs", "outputs", "parameters"})
    if unknown:
        raise HTTPError(f"unknown fields {unknown} in the inference request: it takes id, inputs, outputs "
                        "and parameters"[:300])
    request_id = _field(body, "id", str, "id", required=False)
    if request_id is not None:
        _unicode(request_id, "id")  # echoed in the response, which must encode
    params = _params(body, "parameters", None)
    binary_default = _field(params, "binary_data_output", bool, "parameters.binary_data_output", required=False)

    wanted = {t.name: t for t in expected}
    names = ", ".join(wanted)
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        got = "an empty list" if inputs == [] else kind_of(inputs)
        raise HTTPError(f"'inputs' must be a non-empty list of tensors, got {got}; this model takes {names}")
    out: dict[str, list[str]] = {}
    offset = 0
    for i, tensor in enumerate(inputs):
        name, values, offset = _input(tensor, f"inputs[{i}]", wanted, out, binary, offset)
        out[name] = check_limits(f"input {name!r}", values, max_items, max_chars)
    if offset != len(binary):
        raise HTTPError(f"{len(binary) - offset} binary bytes after the inputs that no input claims "
                        "(binary_data_size)")
    missing = [n for n in wanted if n not in out]
    if missing:
        raise HTTPError(f"missing inputs {missing}: this model takes {names}")
    return InferRequest(request_id, out, _requested(body), bool(binary_default))


def _input(tensor: Any, path: str, wanted: dict[str, Tensor], seen: dict[str, list[str]], binary: bytes,
           offset: int) -> tuple[str, list[str], int]:
    """One input tensor: its name, its strings (from its JSON data, or from `binary` at `offset`), and the
    offset of the next binary tensor."""
    names = ", ".join(wanted)
    _object(tensor, path, TENSOR_FIELDS)
    name = _field(tensor, "name", str, f"{path}.name")
    if name not in wanted:
        raise HTTPError(f"unknown input {name!r}: this model takes {names}"[:300])
    if name in seen:
        raise HTTPError(f"input {name!r} is given twice")
    datatype = _field(tensor, "datatype", str, f"{path}.datatype")
    if datatype != wanted[name].datatype:
        raise HTTPError(f"input {name!r} has datatype {datatype!r}: this model takes "
                        f"{wanted[name].datatype} (strings)"[:300])
    count = _count(_field(tensor, "shape", list, f"{path}.shape"), name, f"{path}.shape")
    params = _params(tensor, "parameters", INPUT_PARAMETERS, path)
    size = _field(params, "binary_data_size", int, f"{path}.parameters.binary_data_size", required=False)
    if size is not None:
        if "data" in tensor:
            raise HTTPError(f"input {name!r} has both data and binary_data_size: give one")
        if size < 0 or offset + size > len(binary):
            raise HTTPError(f"input {name!r}: binary_data_size {size!r} does not fit the "
                            f"{len(binary) - offset} binary bytes left in the request"[:300])
        values = _bytes_elements(binary[offset : offset + size], name)
        offset += size
    else:
        if "data" not in tensor:
            raise HTTPError(f"input {name!r} needs 'data' (a list of strings) or binary data "
                            f"({path}.parameters.binary_data_size)")
        values = _json_elements(tensor["data"], f"{path}.data")
    if len(values) != count:
        raise HTTPError(f"input {name!r} has shape {tensor['shape']} ({count} elements) but "
                        f"{len(values)} values"[:300])
    return name, values, offset


def _split(raw: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return raw, b""
    try:
        n = int(header_length)
    except ValueError:
        raise HTTPError(f"invalid Inference-Header-Content-Length {header_length!r}"[:300]) from None
    if not 0 < n <= len(raw):
        raise HTTPError(f"Inference-Header-Content-Length {n} does not fit a body of {len(raw)} bytes"[:300])
    return raw[:n], raw[n:]


# -- typed access: every field of a body is checked here before it is used ---------------------------------
_WHAT = {str: "a string", list: "a list", dict: "an object", bool: "true or false", int: "a whole number"}


def _field(obj: dict[str, Any], key: str, kind: type, path: str, required: bool = True) -> Any:
    """obj[key] when it is of `kind` (null or absent: None where not required); a 400 naming `path` otherwise."""
    value = obj.get(key)
    if value is None and not required:
        return None
    if key not in obj:
        raise HTTPError(f"{path} is missing: it must be {_WHAT[kind]}")
    return _typed(value, kind, path)


def _typed(value: Any, kind: type, path: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise HTTPError(f"{path} must be {_WHAT[kind]}, got {kind_of(value)}")
    return value


def _object(value: Any, path: str, known: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise HTTPError(f"{path} must be an object ({', '.join(known)}), got {kind_of(value)}")
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise HTTPError(f"{path} has unknown fields {unknown}: it takes {', '.join(known)}"[:300])
    return value


def _params(obj: dict[str, Any], key: str, known: tuple[str, ...] | None, where: str = "") -> dict[str, Any]:
    """obj's parameters object ({} when absent). `known`: the only keys served (None: any, as on a request,
    whose other parameters, e.g. priority or timeout, are scheduling hints that do not change an answer)."""
    path = f"{where}.{key}" if where else key
    value = _field(obj, key, dict, path, required=False) or {}
    if known is not None:
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise HTTPError(f"{path} has unsupported parameters {unknown}: this server reads "
                            f"{', '.join(known)} only (no classification or shared-memory extensions)"[:300])
        codec = _field(value, "content_type", str, f"{path}.content_type", required=False)
        if codec is not None and codec not in CONTENT_TYPES:
            raise HTTPError(f"{path}.content_type {codec!r} is not served: tensors here are plain UTF-8 "
                            f"strings (content_type {' or '.join(CONTENT_TYPES)})"[:300])
    return value


def _unicode(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise HTTPError(f"{path} is not valid Unicode ({text[e.start]!r} at character {e.start} is a lone "
                        "surrogate): send UTF-8 text") from None


def _count(shape: list[Any], name: str, path: str) -> int:
    for k, d in enumerate(shape):
        _typed(d, int, f"{path}[{k}]")
    if not shape or len(shape) > 2 or any(d < 0 for d in shape) or (len(shape) == 2 and shape[1] != 1):
        raise HTTPError(f"input {name!r} has shape {shape!r}: give [n] (or [n, 1]) for n strings"[:300])
    if shape[0] < 1:
        raise HTTPError(f"input {name!r} has no elements: give at least one string")
    return shape[0]


def _json_elements(data: Any, path: str) -> list[str]:
    if isinstance(data, list) and data and all(isinstance(row, list) for row in data):  # [[a], [b]]: shape [n, 1]
        return [x for j, row in enumerate(data) for x in strings(row, f"{path}[{j}]")]
    return strings(data, path)


def _bytes_elements(blob: bytes, name: str) -> list[str]:
    """BYTES in the binary extension: each element a 4-byte little-endian length, then that many bytes."""
    out, i = [], 0
    while i < len(blob):
        if i + 4 > len(blob):
            raise HTTPError(f"input {name!r}: its binary data ends inside an element's length")
        (n,) = struct.unpack_from("<I", blob, i)
        i += 4
        if i + n > len(blob):
            raise HTTPError(f"input {name!r}: element {len(out)} claims {n} bytes, {len(blob) - i} remain")
        try:
            out.append(blob[i : i + n].decode("utf-8"))
        except UnicodeDecodeError:
            raise HTTPError(f"input {name!r} element {len(out)} is not UTF-8 text") from None
        i += n
    return out


def _requested(body: dict[str, Any]) -> dict[str, bool | None]:
    outputs = _field(body, "outputs", list, "outputs", required=False)
    out: dict[str, bool | None] = {}
    for i, o in enumerate(outputs or []):
        path = f"outputs[{i}]"
        _object(o, path, OUTPUT_FIELDS)
        name = _field(o, "name", str, f"{path}.name")
        if name in out:
            raise HTTPError(f"output {name!r} is asked for twice"[:300])
        params = _params(o, "parameters", OUTPUT_PARAMETERS, path)
        out[name] = _field(params, "binary_data", bool, f"{path}.parameters.binary_data", required=False)
    return out


def check_outputs(request: InferRequest, available: Sequence[Tensor]) -> None:
    names = [t.name for t in available]
    unknown = [n for n in request.outputs if n not in names]
    if unknown:
        raise HTTPError(f"unknown outputs {unknown}: this model gives {', '.join(names)}")


# -- responses -----------------------------------------------------------------------------------------
def encode_response(task: str, digest: str, request: InferRequest,
                    tensors: dict[str, tuple[str, tuple[int, ...], Any]]) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: JSON, or JSON then binary tensors for outputs asked in binary."""
    names = list(request.outputs) or list(tensors)
    outputs, blobs = [], []
    for name in names:
        datatype, shape, values = tensors[name]
        binary = request.outputs.get(name)
        binary = request.binary_default if binary is None else binary
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(shape)}
        if binary:
            blob = _to_bytes(datatype, values)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = list(values) if datatype == "BYTES" else np.asarray(values).reshape(-1).tolist()
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": task, "model_version": version_of(digest), "outputs": outputs}
    if request.id is not None:
        body["id"] = request.id
    header = dumps(body).encode()
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {"content-type": "application/octet-stream",
                                      "inference-header-content-length": str(len(header))}


def _to_bytes(datatype: str, values: Any) -> bytes:
    if datatype == "BYTES":
        parts = []
        for v in values:
            b = v.encode("utf-8")
            parts.append(struct.pack("<I", len(b)) + b)
        return b"".join(parts)
    return np.ascontiguousarray(values, dtype="<f4").tobytes()


# -- the routes: one model per task -------------------------------------------------------------------------
async def server(request: Request, state: AppState) -> Response:
    return json_response({"name": "bitfit", "version": __version__, "extensions": ["binary_tensor_data"]})


async def live(request: Request, state: AppState) -> Response:
    return json_response({"live": True})


async def ready(request: Request, state: AppState) -> Response:
    is_ready = len(state.session) > 0
    return json_response({"ready": is_ready}, 200 if is_ready else 503)


def task_of(request: Request, state: AppState) -> tuple[str, str, TaskPack]:
    """The task a /v2/models/{model}[/versions/{version}] path names, its digest and pack (404 otherwise)."""
    task = request.path_params["model"]
    pack = state.session.pack(task)  # UnknownTaskError: 404
    digest = state.session.digest(task)
    version = request.path_params.get("version")
    if version is not None and version != version_of(digest):
        raise HTTPError(f"task {task!r} is served at version {version_of(digest)}, not {version!r} (a version is "
                        f"the start of the pack's digest; GET /v2/models/{task})", 404)
    return task, digest, pack


async def model(request: Request, state: AppState) -> Response:
    task, digest, pack = task_of(request, state)
    m = pack.manifest
    return json_response(model_metadata(task, digest, KINDS[m.task_kind], m, f"bitfit-{state.session.backend}"))


async def model_ready(request: Request, state: AppState) -> Response:
    task, _, _ = task_of(request, state)
    return json_response({"name": task, "ready": True})


def _signature(pack: TaskPack) -> tuple[list[Tensor], list[Tensor]]:
    kind = KINDS[pack.manifest.task_kind]
    return inputs_of(kind, pack.manifest), outputs_of(kind, pack.manifest)


def reloaded_under(state: AppState, task: str, parsed: TaskPack, ran: str | None) -> ServiceUnavailable | None:
    """A reload that changed the task's signature (its kind, or pairs) between parsing a request against one
    pack and running it on another: the request was read for a model that no longer exists, so the honest
    answer is a retry (the client re-reads the metadata), not the other kind's refusal or its outputs.
    `ran`: the digest of the pack that ran (None: the run failed)."""
    pack, digest = state.session.pack(task), state.session.digest(task)  # UnknownTaskError (removed): 404 as ever
    # reloaded again since the run: which pack ran is no longer known, so the signature cannot be vouched for
    same = (ran is None or digest == ran) and _signature(parsed) == _signature(pack)
    return None if same else ServiceUnavailable(
        f"task {task!r} was reloaded as a {pack.manifest.task_kind} task with another signature while this "
        f"request ran: retry it (GET /v2/models/{task} for the new inputs and outputs)")


async def _run(state: AppState, task: str, kind: TaskKind, req: InferRequest) -> tuple[list[dict[str, Any]], str]:
    """The records of one infer request and the digest of the pack that ran them (read on the inference
    thread with the run: a reload between the run and the response must not label old outputs with the new
    version)."""
    session, batcher = state.session, state.batcher

    def versioned(fn: Callable[..., Any]) -> Callable[..., tuple[Any, str]]:
        def call(task: str, *args: Any) -> tuple[Any, str]:
            digest = session.digest(task)
            return fn(task, *args), digest
        return call

    shape = kind.shape
    if shape is SEQUENCE:  # batched with every other sequence request, /v1 and /v2 alike
        records = await batcher.submit(task, req.inputs["text"], req.inputs.get("text_pair"))
        return records, records[0]["digest"]
    # the other shapes take their v2 inputs, in order, as the session call's arguments
    result, digest = await batcher.call(versioned(getattr(session, shape.method)), task,
                                        *(req.inputs[t.name] for t in shape.inputs(False)))
    return result.records(), digest


async def infer(request: Request, state: AppState) -> Response:
    task, parsed_digest, pack = task_of(request, state)
    kind = KINDS[pack.manifest.task_kind]
    config = state.config
    req = parse_infer(await state.body(request), request.headers.get(HEADER_LENGTH), inputs_of(kind, pack.manifest),
                      config.max_texts, config.max_text_chars)
    check_outputs(req, outputs_of(kind, pack.manifest))
    try:
        records, digest = await _run(state, task, kind, req)
    except UnknownTaskError:
        raise
    except BitFitError as exc:  # the pack's own refusal, unless a reload changed the task under the request
        if state.session.digest(task) != parsed_digest and (busy := reloaded_under(state, task, pack, None)):
            raise busy from exc
        raise
    if digest != parsed_digest and (busy := reloaded_under(state, task, pack, digest)):
        raise busy
    try:
        body, headers = encode_response(task, digest, req, output_tensors(kind, records))
    except ValueError:  # NaN or inf in an output: the pack is broken, not the request
        return error(500, NON_FINITE)
    return Response(body, headers=headers)


ROUTES = [
    route("/v2", server, protocol=V2),
    route("/v2/health/live", live, protocol=V2),
    route("/v2/health/ready", ready, protocol=V2),
    *(r for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}") for r in (
        route(base, model, protocol=V2),
        route(f"{base}/ready", model_ready, protocol=V2),
        route(f"{base}/infer", infer, "POST", protocol=V2),
    )),
]
