"""Property-based: mutated manifests and safetensors headers (types, shapes, missing and extra keys, huge
values, non-UTF-8, truncation) are either refused with a BitFitError that has a message, or give exactly
the unmutated pack's outputs. No other exception, no hang (an alarm per example).

Two threats, two properties:
- an edit or corruption that leaves the checksums as they were (a person with an editor, a bad copy):
  refused, or no change at all in what the pack computes;
- a forged edit that also recomputes every checksum: the checks behind them (schema, rules, headers,
  fit to the graph) refuse it, or the pack runs cleanly (a forger may legitimately make another pack); a
  forged compiled manifest cannot make another graph, so it is refused or gives exactly the reference outputs.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np
import pytest
from bitfit.runtime import BitFitError, TaskSession, load_pack
from bitfit.runtime.compiled import MANIFEST_FILE
from bitfit.runtime.fs import sha256_file
from bitfit.runtime.pack import TENSORS_FILE
from conftest import write_sealed
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

TEXTS = ["a good fun movie", "awful boring plot", "who won the prize"]
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-3, 130),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["", "float64", "bq", "none", "pooler", "classification", "layer.0.bq"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)


@contextlib.contextmanager
def time_limit(seconds: int):
    def hung(*_):
        raise TimeoutError(f"an example took over {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def outputs(session: TaskSession, task: str) -> tuple:
    out = session.run(task, TEXTS)
    return out.logits.tolist(), out.labels, out.label_names


@pytest.fixture(scope="module")
def session(bert_compiled) -> TaskSession:
    return TaskSession(bert_compiled, threads=1)


@pytest.fixture(scope="module")
def reference(session, pack_all) -> tuple:
    name = session.register(pack_all, name="reference")
    return outputs(session, name)


def mutate(data: dict, draw) -> dict:
    """One edit of a manifest: a key set to any JSON value, a key deleted, an unknown key added, or a field of
    one tensor spec changed."""
    data = json.loads(json.dumps(data))
    op = draw(st.sampled_from(["set", "delete", "add", "spec", "plausible", "plausible"]))
    if op == "plausible":  # a well-formed edit: only the seal (or nothing, for provenance) can catch it
        key = draw(st.sampled_from(sorted({"labels", "pooling", "max_length", "tool_version", "metrics", "task",
                                           "base_model", "hidden_size", "precision", "max_positions"} & set(data))))
        data[key] = {"labels": list(reversed(data.get("labels", []))), "pooling": "cls", "tool_version": "9.9",
                     "metrics": {"note": "edited"}, "task": "renamed", "base_model": "elsewhere",
                     "max_length": draw(st.integers(1, 200)), "hidden_size": draw(st.integers(1, 64)),
                     "precision": "int8-dynamic-per-channel", "max_positions": draw(st.integers(1, 100))}[key]
    elif op == "set":
        data[draw(st.sampled_from(sorted(data)))] = draw(values)
    elif op == "delete":
        del data[draw(st.sampled_from(sorted(data)))]
    elif op == "add":
        data[draw(st.text(min_size=1, max_size=10))] = draw(values)
    else:
        specs = data.get("biases") or data.get("bias_inputs") or []
        if specs:
            spec = specs[draw(st.integers(0, len(specs) - 1))]
            spec[draw(st.sampled_from(["name", "shape", "dtype", "kind", "layer", "source", "extra"]))] = draw(values)
    return data


def write_json(path: Path, data: dict, reseal: bool, encoding: str) -> None:
    if reseal:
        with contextlib.suppress(ValueError):  # NaN / inf have no canonical JSON to seal: written as they are
            return write_sealed(path, data)
        path.write_text(json.dumps(data))
    else:
        text = json.dumps(data, indent=1)  # NaN and Infinity come out as bare literals: not JSON
        path.write_bytes(text.encode("utf-8") if encoding == "utf-8" else text.encode("utf-16"))


def run_pack(session: TaskSession, directory: Path) -> tuple:
    pack = load_pack(directory)
    name = session.register(pack, name="mutant", replace=True)
    try:
        return outputs(session, name)
    finally:
        session.remove(name)


def _note(text: str) -> None:
    with contextlib.suppress(InvalidArgument):  # outside a hypothesis example (the checker's own test)
        event(text)


def _stage(message: str) -> str:
    """Which check refused, for hypothesis' statistics (--hypothesis-show-statistics)."""
    for key in ("own checksum", "required checksum", "is invalid", "does not hold", "declares", "not valid JSON",
                "not UTF-8", "inconsistent", "task_kind", "labels", "does not fit", "bytes where", "checksum",
                "format", "header", "overlap", "beyond its tensors", "provenance", "too short"):
        if key in message:
            return key
    return message[:40]


def check(call, reference, forged: bool) -> None:
    """The property: a BitFitError with a message, else the reference outputs (or, forged, a clean run)."""
    try:
        with time_limit(20):
            got = call()
    except BitFitError as e:
        assert str(e).strip(), "a refusal without a message"
        _note(f"refused: {type(e).__name__}: {_stage(str(e))}")
        return
    _note("ran" + (" (forged)" if forged else ""))
    if forged:
        logits, labels, names = got
        assert all(math.isfinite(x) for row in logits for x in row) and len(labels) == len(TEXTS)
    else:
        assert got == reference, "an edit that was not refused changed the outputs"


@SETTINGS
@given(data=st.data(), reseal=st.booleans(), encoding=st.sampled_from(["utf-8", "utf-8", "utf-16"]))
def test_mutated_pack_manifests(session, reference, pack_all, data, reseal, encoding):
    with tempfile.TemporaryDirectory() as tmp:
        pack = Path(shutil.copytree(pack_all, Path(tmp) / "pack"))
        manifest = json.loads((pack / MANIFEST_FILE).read_text())
        write_json(pack / MANIFEST_FILE, mutate(manifest, data.draw), reseal, encoding)
        check(lambda: run_pack(session, pack), reference, forged=reseal)


@st.composite
def header_edits(draw, header: dict) -> tuple[dict | None, bytes | None]:
    """(a new header, or None) and (raw bytes to put in place of the whole file, or None)."""
    header = json.loads(json.dumps(header))
    names = sorted(k for k in header if k != "__metadata__")
    name = draw(st.sampled_from(names))
    op = draw(st.sampled_from(["dtype", "shape", "offsets", "add", "delete", "metadata", "prefix", "truncate",
                               "append", "garbage", "swap"]))
    if op == "dtype":
        header[name]["dtype"] = draw(st.sampled_from(["F64", "F16", "I64", "BF16", "U8", "Q4", 7]))
    elif op == "shape":
        header[name]["shape"] = draw(st.one_of(st.lists(st.integers(-2, 2**40), max_size=3), values))
    elif op == "offsets":
        header[name]["data_offsets"] = draw(st.one_of(st.lists(st.integers(-5, 2**40), min_size=2, max_size=2),
                                                      values))
    elif op == "add":
        header[draw(st.text(min_size=1, max_size=8))] = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    elif op == "delete":
        del header[name]
    elif op == "metadata":
        header["__metadata__"] = draw(values)
    elif op == "swap":
        other = draw(st.sampled_from(names))
        header[name]["data_offsets"], header[other]["data_offsets"] = (header[other]["data_offsets"],
                                                                       header[name]["data_offsets"])
    else:
        return None, {"prefix": b"\xff" * 8, "truncate": b"", "append": b"\x00" * 9,
                      "garbage": draw(st.binary(max_size=64))}[op]
    return header, None


@SETTINGS
@given(data=st.data(), reseal=st.booleans())
def test_mutated_safetensors_headers(session, reference, pack_all, data, reseal):
    with tempfile.TemporaryDirectory() as tmp:
        pack = Path(shutil.copytree(pack_all, Path(tmp) / "pack"))
        raw = (pack / TENSORS_FILE).read_bytes()
        length = int.from_bytes(raw[:8], "little")
        header, replacement = data.draw(header_edits(json.loads(raw[8 : 8 + length])))
        if replacement is not None:
            tail = {b"": raw[: len(raw) // 2], b"\x00" * 9: raw + replacement}.get(replacement)
            new = tail if tail is not None else (replacement + raw[8:] if replacement.startswith(b"\xff" * 8)
                                                 else replacement)
        else:
            text = json.dumps(header).encode()
            new = len(text).to_bytes(8, "little") + text + raw[8 + length :]
        (pack / TENSORS_FILE).write_bytes(new)
        if reseal:
            manifest = json.loads((pack / MANIFEST_FILE).read_text())
            write_sealed(pack / MANIFEST_FILE, {**manifest, "tensors_sha256": sha256_file(pack / TENSORS_FILE)})
        check(lambda: run_pack(session, pack), reference, forged=reseal)


@st.composite
def compiled_edits(draw, data: dict) -> dict:
    """A compiled manifest's well-formed edits (values its schema accepts, so only the seal or the rules behind it
    can catch them), or any of `mutate`'s."""
    data = json.loads(json.dumps(data))
    if draw(st.integers(0, 2)) == 0:  # two in three edits are these: the generic ones rarely pass the schema
        return mutate(data, draw)
    key = draw(st.sampled_from(["pad_token_id", "vocab_size", "type_vocab_size", "num_layers", "hidden_size",
                                "max_positions", "bias_defaults", "mixed", "token_inputs", "outputs", "output",
                                "head_inputs", "files", "fused_ops", "optimized_with", "opset", "pad_token",
                                "bias_inputs"]))
    spec = {"name": "layer.0.bq", "shape": [draw(st.integers(1, 64))], "dtype": "float32", "kind": "bq",
            "layer": draw(st.integers(0, 3)), "source": "x"}
    data[key] = draw(st.sampled_from({
        "pad_token_id": [0, 1, 5, 99], "vocab_size": [1, 6, 99, 100, 101, 1 << 20], "type_vocab_size": [0, 1, 2, 7],
        "num_layers": [1, 3, 64], "hidden_size": [16, 31, 33], "max_positions": [1, 8, 64, 1 << 20],
        "bias_defaults": [False, True], "mixed": [True, False],
        "token_inputs": [["input_ids", "attention_mask"], ["input_ids", "attention_mask", "token_type_ids"]],
        "outputs": [["last_hidden_state"], ["last_hidden_state", "logits"], ["logits", "last_hidden_state"]],
        "output": ["last_hidden_state", "logits"], "head_inputs": [[]],
        "files": [{k: "0" * 64 for k in data.get("files", {})}, {**data.get("files", {}), "model.onnx": "f" * 64}],
        "fused_ops": [{}, {"Attention": 2}], "optimized_with": ["", "onnxruntime 0.1"], "opset": [1, 17, 20, 999],
        "pad_token": ["[PAD]", "[UNK]", "<pad>"],
        "bias_inputs": [data.get("bias_inputs", [])[:-1], [*data.get("bias_inputs", []), spec],
                        [spec, *data.get("bias_inputs", [])[1:]], list(reversed(data.get("bias_inputs", [])))],
    }[key]))
    return data


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data(), reseal=st.booleans(), encoding=st.sampled_from(["utf-8", "utf-8", "utf-16"]))
def test_mutated_compiled_manifests(bert_compiled, pack_all, reference, data, reseal, encoding):
    """As for packs, with and without a recomputed seal (the files are untouched, so their checksums stand).
    Stricter than for packs: a forger cannot make another graph by editing its manifest (model.onnx computes
    what it computes), so whatever is not refused must give exactly the reference outputs."""
    with tempfile.TemporaryDirectory() as tmp:
        graph = Path(shutil.copytree(bert_compiled, Path(tmp) / "graph"))
        manifest = data.draw(compiled_edits(json.loads((graph / MANIFEST_FILE).read_text())))
        write_json(graph / MANIFEST_FILE, manifest, reseal, encoding)

        def run():
            session = TaskSession(graph, threads=1)
            name = session.register(pack_all)
            return outputs(session, name)

        check(run, reference, forged=False)


def test_the_properties_can_fail():
    """The checker itself: an unrefused change of outputs, or a non-BitFitError, fails it."""
    reference = ([[0.0, 1.0]], ["a"], ["a", "b"])
    with pytest.raises(AssertionError, match="changed the outputs"):
        check(lambda: ([[0.0, 2.0]], ["a"], ["a", "b"]), reference, forged=False)
    with pytest.raises(KeyError):
        check(lambda: {}["x"], reference, forged=False)
    check(lambda: (_ for _ in ()).throw(BitFitError("refused: fix it")), reference, forged=False)
    assert np.isfinite(1.0)
