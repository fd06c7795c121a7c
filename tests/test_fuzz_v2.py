"""Property-based: random and mutated /v2 infer bodies against a real server app (bitfit.serve.v2 behind
create_app, through starlette's TestClient). Valid bodies of every shape the protocol allows (JSON or binary
tensors, [n] or [n, 1], outputs asked for or not, in binary or not), then edits: any field set to any JSON
value, deleted, unknown keys added, wrong and huge shapes, texts at and over the length limit, bodies over
the size limit, bytes that are not UTF-8, binary bodies with a wrong Inference-Header-Content-Length or
cut-short, overlong or mislabelled tensors.

The properties, for every body:
- never a 5xx;
- a 4xx is the protocol's error shape, {"error": message} with a non-empty message;
- a 200 answers exactly the texts the request carried (read back here, independently of the server's
  parser) with the numbers the TaskSession computes for them, in the outputs asked for, JSON or binary as
  asked, under the pack's version and the request's id.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import struct
from typing import Any

import numpy as np
import pytest
from bitfit.runtime import TaskSession, read_pack_manifest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from starlette.testclient import TestClient

from bitfit.serve import ServeConfig, create_app

ATOL = 1e-4  # as in test_serve_v2: batching may change padding
MAX_TEXTS, MAX_CHARS = 4, 64
KEYS = ("single", "pairs", "scores")
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                    phases=[Phase.explicit, Phase.generate, Phase.shrink])  # explaining a failure took minutes

WORDS = ["good", "fun", "movie", "awful", "boring", "plot", "the", "actor", "city", "love", "été", "日本", "🙂"]
words = st.lists(st.sampled_from(WORDS), min_size=1, max_size=5).map(" ".join)
texts = st.one_of(words, words, words, words,  # mostly texts that are answered; then the odd ones:
                  st.text(max_size=MAX_CHARS + 2),  # empty, control and combining characters, the length limit
                  st.sampled_from(["x" * MAX_CHARS, "x" * (MAX_CHARS + 1), "\ud800", "a\x00b", "[UNK]"]))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-2, 6),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                    st.sampled_from(["text", "text_pair", "BYTES", "FP32", "logits", "label", "scores", "value",
                                     "binary_data_size", "binary_data", "\ud800", ""]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=10)


@pytest.fixture(scope="module")
def served(bert_compiled, pack_all, pack_pairs, pack_scores, tmp_path_factory):
    """(client, reference session, {key: task}, max_body_bytes): the app on its own session; the reference on
    another one, with the same packs."""
    root = tmp_path_factory.mktemp("fuzz-v2-packs")
    reference = TaskSession(bert_compiled, threads=1)
    tasks = {}
    for key, path in zip(KEYS, (pack_all, pack_pairs, pack_scores)):
        shutil.copytree(path, root / key)
        tasks[key] = reference.register(path)
        assert tasks[key] == read_pack_manifest(path).task
    config = ServeConfig(max_texts=MAX_TEXTS, max_text_chars=MAX_CHARS)
    app = create_app(TaskSession(bert_compiled, threads=1), root, config)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, reference, tasks, int(config.max_body_bytes or 0)


def encode_elements(items: list[str]) -> bytes:
    out = b""
    for s in items:
        b = s.encode("utf-8", "surrogatepass")  # a lone surrogate becomes bytes that are not UTF-8
        out += struct.pack("<I", len(b)) + b
    return out


@st.composite
def valid_requests(draw, key: str) -> tuple[dict, list[bytes]]:
    """A well-formed request for the task of `key` (the texts may still be refused: empty, too long, ...):
    its JSON header and the binary blobs of its binary inputs, in order."""
    names = ["text", "text_pair"] if key == "pairs" else ["text"]
    outputs = ["logits", "value"] if key == "scores" else ["logits", "label", "scores"]
    n = draw(st.integers(1, MAX_TEXTS + 1))
    header: dict[str, Any] = {}
    blobs = []
    for name in draw(st.permutations(names)):
        items = draw(st.lists(texts, min_size=n, max_size=n))
        two_d = draw(st.booleans())
        tensor: dict[str, Any] = {"name": name, "datatype": "BYTES", "shape": [n, 1] if two_d else [n]}
        if draw(st.booleans()):
            blob = encode_elements(items)
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = [[s] for s in items] if two_d and draw(st.booleans()) else items
        header.setdefault("inputs", []).append(tensor)
    if draw(st.booleans()):
        asked = draw(st.lists(st.sampled_from(outputs), unique=True, max_size=len(outputs)))
        header["outputs"] = [{"name": o, **draw(st.sampled_from([{}, {"parameters": {"binary_data": True}},
                                                                 {"parameters": {"binary_data": False}}]))}
                             for o in asked]
    if draw(st.booleans()):
        header["parameters"] = {"binary_data_output": draw(st.booleans())}
    if draw(st.booleans()):
        header["id"] = draw(st.sampled_from(["r-1", "", "日本", "\ud800", "x" * 300]))
    return header, blobs


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a field or element of a JSON value."""
    out = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        out.append((*prefix, k))
        out.extend(paths(v, (*prefix, k)))
    return out


def at(value: Any, path: tuple) -> Any:
    for k in path:
        value = value[k]
    return value


def mutate(header: dict, blobs: list[bytes], draw, limit: int) -> tuple[dict, list[bytes], str]:
    """One edit of the header or the blobs; the op's name, for hypothesis' statistics."""
    header = json.loads(json.dumps(header))
    inputs = header.get("inputs")
    tensors = [t for t in inputs if isinstance(t, dict)] if isinstance(inputs, list) else []
    ops = ["set", "set", "delete", "add", "oversize"] + ["shape", "huge"] * bool(tensors) + ["blob"] * bool(blobs)
    op = draw(st.sampled_from(ops))
    where = paths(header)
    if not where and op in ("set", "delete"):
        op = "add"
    if op == "set":
        path = draw(st.sampled_from(where))
        at(header, path[:-1])[path[-1]] = draw(values)
    elif op == "delete":
        path = draw(st.sampled_from(where))
        del at(header, path[:-1])[path[-1]]
    elif op == "add":
        parents = [()] + [p for p in where if isinstance(at(header, p), dict)]
        at(header, draw(st.sampled_from(parents)))[draw(st.text(min_size=1, max_size=8))] = draw(values)
    elif op == "shape":
        tensor = draw(st.sampled_from(tensors))
        tensor["shape"] = draw(st.lists(st.one_of(st.integers(-1, 6), st.just(2**62), st.just(2**64)), max_size=3))
    elif op == "huge":  # a text at, and just over, the length limit; or a shape far over the count limit
        tensor = draw(st.sampled_from(tensors))
        if isinstance(tensor.get("data"), list) and tensor["data"] and isinstance(tensor["data"][0], str):
            tensor["data"][0] = "x" * draw(st.sampled_from([MAX_CHARS, MAX_CHARS + 1, 10 * MAX_CHARS]))
        else:
            tensor["shape"] = [draw(st.sampled_from([MAX_TEXTS, MAX_TEXTS + 1, 10**6]))]
    elif op == "oversize":  # a body over the server's size limit
        header["id"] = "x" * (limit + 1)
    else:
        i = draw(st.integers(0, len(blobs) - 1))
        edit = draw(st.sampled_from(["truncate", "extend", "length", "not utf-8"]))
        blob = blobs[i]
        blobs = list(blobs)
        blobs[i] = {"truncate": blob[: max(0, len(blob) - draw(st.integers(1, 6)))],
                    "extend": blob + draw(st.binary(min_size=1, max_size=6)),
                    "length": struct.pack("<I", draw(st.sampled_from([0, 1, 2**31, 2**32 - 1]))) + blob[4:],
                    "not utf-8": blob[:4] + b"\xff" + blob[5:]}[edit]
        op = f"blob {edit}"
    return header, blobs, op


def serialize(header: dict, blobs: list[bytes], draw) -> tuple[bytes, dict[str, str], str | None]:
    """The body and its headers; maybe with raw bytes spoiled or a wrong Inference-Header-Content-Length."""
    text = json.dumps(header, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    raw, length = text + b"".join(blobs), len(text)
    spoil = draw(st.sampled_from([None] * 6 + ["bytes", "length", "no length", "extra length"]))
    headers = {"content-type": "application/octet-stream" if blobs else "application/json"}
    if spoil == "bytes":  # bytes that are not UTF-8 (or not JSON) somewhere in the header
        i = draw(st.integers(0, length - 1))
        raw = raw[:i] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"}"])) + raw[i + 1 :]
    if blobs or spoil == "extra length":
        headers["inference-header-content-length"] = str(length)
    if spoil == "length":
        headers["inference-header-content-length"] = draw(st.sampled_from(
            [str(length + draw(st.integers(-6, 6))), "0", "-1", str(len(raw) + 1), "abc", "", " 12", "1e3",
             "9" * 5000]))
    elif spoil == "no length":
        headers.pop("inference-header-content-length", None)
    return raw, headers, spoil


# -- the oracle: what a request that was answered 200 carried, read without the server's parser ------------
def carried(raw: bytes, headers: dict[str, str]) -> tuple[dict, dict[str, list[str]]]:
    n = int(headers.get("inference-header-content-length", len(raw)))
    header, blob = json.loads(raw[:n]), raw[n:]
    texts, offset = {}, 0
    for tensor in header["inputs"]:
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is None:
            data = tensor["data"]
            texts[tensor["name"]] = [x for row in data for x in row] if isinstance(data[0], list) else list(data)
            continue
        part, offset, items, i = blob[offset : offset + size], offset + size, [], 0
        while i < len(part):
            (k,) = struct.unpack_from("<I", part, i)
            items.append(part[i + 4 : i + 4 + k].decode("utf-8"))
            i += 4 + k
        texts[tensor["name"]] = items
    assert offset == len(blob), "the server answered a body with bytes no input claims"
    return header, texts


def answered(response) -> dict[str, tuple[list[int], Any, bool]]:
    """The response's outputs: name -> (shape, values, sent in binary)."""
    raw = response.content
    n = int(response.headers.get("inference-header-content-length", len(raw)))
    body, blob, offset, out = json.loads(raw[:n]), raw[n:], 0, {}
    for o in body["outputs"]:
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is None:
            out[o["name"]] = (o["shape"], o["data"], False)
            continue
        part, offset = blob[offset : offset + size], offset + size
        if o["datatype"] == "FP32":
            values: Any = np.frombuffer(part, "<f4").tolist()
        else:
            values, i = [], 0
            while i < len(part):
                (k,) = struct.unpack_from("<I", part, i)
                values.append(part[i + 4 : i + 4 + k].decode("utf-8"))
                i += 4 + k
        out[o["name"]] = (o["shape"], values, True)
    assert offset == len(blob)
    return body, out


def check_answer(response, raw: bytes, headers: dict[str, str], key: str, served) -> None:
    _, reference, tasks, _ = served
    task = tasks[key]
    header, texts = carried(raw, headers)
    want = reference.run(task, texts["text"], texts.get("text_pair")).records()
    body, outputs = answered(response)
    assert body["model_name"] == task and body["model_version"] == reference.digest(task)[:16]
    assert body.get("id") == header.get("id")
    all_outputs = ["logits", "value"] if key == "scores" else ["logits", "label", "scores"]
    asked = {o["name"]: (o.get("parameters") or {}).get("binary_data") for o in header.get("outputs") or []}
    assert list(outputs) == (list(asked) or all_outputs)
    default = bool((header.get("parameters") or {}).get("binary_data_output"))
    n = len(texts["text"])
    for name, (shape, got, binary) in outputs.items():
        assert binary == (default if asked.get(name) is None else asked[name]), name
        if name == "label":
            assert shape == [n] and got == [w["label"] for w in want]
            continue
        expect = {"logits": [w["logits"] for w in want], "scores": [list(w["scores"].values()) for w in want],
                  "value": [w["label"] for w in want]}[name]
        expect = np.asarray(expect, np.float32)
        assert shape == list(expect.shape)
        assert np.allclose(np.asarray(got, np.float32).reshape(expect.shape), expect, atol=ATOL, rtol=0), name


def _note(text: str) -> None:
    with contextlib.suppress(InvalidArgument):  # outside a hypothesis example (the checker's own test)
        event(text)


def check(response, raw: bytes, headers: dict[str, str], key: str, served) -> None:
    """The property (see the module's docstring)."""
    assert response.status_code < 500, response.text[:500]
    _note(f"status {response.status_code}")
    if response.status_code == 200:
        check_answer(response, raw, headers, key, served)
        return
    assert 400 <= response.status_code < 500, response.status_code
    assert response.headers["content-type"].startswith("application/json"), response.headers
    error = response.json()
    assert list(error) == ["error"] and isinstance(error["error"], str) and error["error"].strip(), error
    _note(f"refused: {error['error'][:40]}")


@SETTINGS
@given(data=st.data(), key=st.sampled_from(KEYS), edits=st.sampled_from([0, 0, 1, 1, 2]))
def test_random_v2_bodies(served, data, key, edits):
    client, _, tasks, limit = served
    header, blobs = data.draw(valid_requests(key))
    for _ in range(edits):
        header, blobs, op = mutate(header, blobs, data.draw, limit)
        event(f"edit: {op}")
    raw, headers, spoil = serialize(header, blobs, data.draw)
    event(f"spoiled: {spoil}")
    version = served[1].digest(tasks[key])[:16]
    path = data.draw(st.sampled_from([f"/v2/models/{tasks[key]}/infer",
                                      f"/v2/models/{tasks[key]}/versions/{version}/infer"]))
    check(client.post(path, content=raw, headers=headers), raw, headers, key, served)


def test_the_property_can_fail(served):
    """The checker itself: a 5xx, an error without a message, or a 200 with other numbers fails it."""
    client, _, tasks, _ = served

    class Fake:
        def __init__(self, status: int, body: bytes, headers: dict | None = None):
            self.status_code, self.content = status, body
            self.headers = headers or {"content-type": "application/json"}
            self.text = body.decode()

        def json(self):
            return json.loads(self.content)

    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["good fun"]}]}
    raw = json.dumps(body).encode()
    good = client.post(f"/v2/models/{tasks['single']}/infer", content=raw)
    check(good, raw, {}, "single", served)
    with pytest.raises(AssertionError):
        check(Fake(500, b'{"error": "internal"}'), raw, {}, "single", served)
    with pytest.raises(AssertionError):
        check(Fake(400, b'{"error": " "}'), raw, {}, "single", served)
    with pytest.raises(AssertionError):
        check(Fake(400, b'{"detail": "x"}'), raw, {}, "single", served)
    moved = json.loads(good.content)
    moved["outputs"][0]["data"][0] += 0.01
    with pytest.raises(AssertionError):
        check(Fake(200, json.dumps(moved).encode()), raw, {}, "single", served)
    other = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["awful plot"]}]}
    with pytest.raises(AssertionError):  # the answer for another text
        check(good, json.dumps(other).encode(), {}, "single", served)
