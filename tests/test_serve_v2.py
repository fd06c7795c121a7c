"""The Open Inference Protocol (KServe v2 / Triton HTTP) on `bitfit serve` (bitfit.serve.v2), talked to by
tritonclient.http, Triton's own client, on a real uvicorn server: metadata, infer of several texts with
`bitfit predict`'s numbers (binary and JSON tensors), pairs, regression, token and QA tasks, versions, and
the refusals (unknown task 404, bad datatype 400, malformed binary data, limits)."""
from __future__ import annotations

import contextlib
import json
import shutil
import socket
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from bitfit.runtime import TaskSession, read_pack_manifest
from starlette.testclient import TestClient

from bitfit.cli import main
from bitfit.serve import ServeConfig, create_app

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException

ATOL = 1e-4  # batching changes padding, which moves logits by ~1e-6
TEXTS = ["good fun movie", "awful boring plot", "the actor", "love the city"]


@pytest.fixture(scope="module")
def head_packs(bert_model, tmp_path_factory) -> dict[str, Path]:
    from bitfit.training.train import train
    from head_data import write_qa_data, write_token_data

    root = tmp_path_factory.mktemp("v2-heads")
    tags = train(bert_model, write_token_data(root / "tags.jsonl"), root / "tags", epochs=1, batch_size=8,
                 task_name="tags", log=lambda *_: None, progress=False).pack_path
    qa = train(bert_model, write_qa_data(root / "qa.jsonl"), root / "qa", epochs=1, batch_size=8,
               task_kind="question-answering", task_name="qa", log=lambda *_: None, progress=False).pack_path
    return {"tags": Path(tags), "qa": Path(qa)}


@pytest.fixture(scope="module")
def packs_dir(tmp_path_factory, pack_all, pack_pairs, pack_scores, head_packs) -> Path:
    root = tmp_path_factory.mktemp("v2-packs")
    for key, path in {"single": pack_all, "pairs": pack_pairs, "scores": pack_scores, **head_packs}.items():
        shutil.copytree(path, root / key)
    return root


@pytest.fixture(scope="module")
def names(packs_dir) -> dict[str, str]:
    return {d.name: read_pack_manifest(d).task for d in packs_dir.iterdir()}


@contextlib.contextmanager
def running(app):
    """The app on a real uvicorn server on a free loopback port (tritonclient needs a socket)."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the server did not start"
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def server(bert_compiled, packs_dir):
    app = create_app(TaskSession(bert_compiled, threads=1), packs_dir, ServeConfig(max_texts=8))
    with running(app) as url:
        yield url, app


@pytest.fixture
def client(server):
    c = httpclient.InferenceServerClient(server[0])
    yield c
    c.close()


def predict_json(compiled: Path, pack: Path, texts: list[str], capsys) -> list[dict]:
    """What `bitfit predict --json` prints for these texts: a JSON line per text."""
    args = ["predict", "--compiled", str(compiled), "--pack", str(pack), "--json"]
    for t in texts:
        args += ["--text", t]
    assert main(args) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def strings(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(values).reshape(-1)]


def text_input(name: str, texts: list[str], binary: bool = True):
    t = httpclient.InferInput(name, [len(texts)], "BYTES")
    t.set_data_from_numpy(np.array([s.encode() for s in texts], dtype=np.object_), binary_data=binary)
    return t


def test_health_and_metadata_declare_each_kind(client, server, names):
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata()["name"] == "bitfit"
    session = server[1].state.session
    single = client.get_model_metadata(names["single"])
    assert single["versions"] == [session.digest(names["single"])[:16]]
    assert single["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    labels = len(read_pack_manifest_of(session, names["single"]).labels)
    assert single["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, labels]},
                                 {"name": "label", "datatype": "BYTES", "shape": [-1]},
                                 {"name": "scores", "datatype": "FP32", "shape": [-1, labels]}]
    assert [i["name"] for i in client.get_model_metadata(names["pairs"])["inputs"]] == ["text", "text_pair"]
    assert [o["name"] for o in client.get_model_metadata(names["scores"])["outputs"]] == ["logits", "value"]
    assert [o["name"] for o in client.get_model_metadata(names["tags"])["outputs"]] == ["record"]
    assert [i["name"] for i in client.get_model_metadata(names["qa"])["inputs"]] == ["question", "context"]
    for task in names.values():
        assert client.is_model_ready(task)


def read_pack_manifest_of(session: TaskSession, task: str):
    return session.pack(task).manifest


@pytest.mark.parametrize("binary", [True, False], ids=["binary tensors", "json tensors"])
def test_infer_gives_bitfit_predicts_numbers(client, names, packs_dir, bert_compiled, capsys, binary):
    want = predict_json(bert_compiled, packs_dir / "single", TEXTS, capsys)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("logits", "label", "scores")]
    result = client.infer(names["single"], [text_input("text", TEXTS, binary)], outputs=outputs, request_id="r-1")
    logits = result.as_numpy("logits")
    assert logits.shape == (len(TEXTS), len(want[0]["logits"])) and logits.dtype == np.float32
    assert np.allclose(logits, [w["logits"] for w in want], atol=ATOL, rtol=0)
    assert strings(result.as_numpy("label")) == [w["label"] for w in want]
    assert np.allclose(result.as_numpy("scores"), [list(w["scores"].values()) for w in want], atol=ATOL)
    assert result.get_response()["id"] == "r-1"


def test_pairs_and_regression(client, names, server):
    session = server[1].state.session
    pairs = ["a bad plot", "great fun"]
    r = client.infer(names["pairs"], [text_input("text", TEXTS[:2]), text_input("text_pair", pairs)])
    want = session.run(names["pairs"], TEXTS[:2], pairs).records()
    assert np.allclose(r.as_numpy("logits"), [w["logits"] for w in want], atol=ATOL, rtol=0)
    assert strings(r.as_numpy("label")) == [w["label"] for w in want]
    r = client.infer(names["scores"], [text_input("text", TEXTS)])
    want = session.run(names["scores"], TEXTS).records()
    assert np.allclose(r.as_numpy("value"), [w["label"] for w in want], atol=ATOL, rtol=0)


def test_token_and_qa_tasks(client, names, server):
    session = server[1].state.session
    r = client.infer(names["tags"], [text_input("text", ["the movie in the city"])])
    assert [json.loads(x) for x in strings(r.as_numpy("record"))] == \
        session.run_tokens(names["tags"], ["the movie in the city"]).records()
    questions, contexts = ["what is the answer ?"], ["good fun answer movie plot"]
    r = client.infer(names["qa"], [text_input("question", questions), text_input("context", contexts)])
    want = session.answer(names["qa"], questions, contexts).records()
    assert strings(r.as_numpy("answer")) == [w["answer"] for w in want]
    assert json.loads(strings(r.as_numpy("record"))[0])["start"] == want[0]["start"]


def test_unknown_task_is_404_in_the_protocols_error_shape(client, names):
    with pytest.raises(InferenceServerException) as e:
        client.infer("no-such-task", [text_input("text", TEXTS)])
    assert e.value.status() == "404" and "unknown task 'no-such-task'" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("no-such-task")
    assert e.value.status() == "404"
    assert not client.is_model_ready("no-such-task")


def test_a_bad_datatype_is_400(client, names):
    bad = httpclient.InferInput("text", [2], "FP32")
    bad.set_data_from_numpy(np.zeros(2, np.float32))
    with pytest.raises(InferenceServerException) as e:
        client.infer(names["single"], [bad])
    assert e.value.status() == "400" and "input 'text' has datatype 'FP32'" in e.value.message()
    with pytest.raises(InferenceServerException) as e:  # a pair input for a single-text task
        client.infer(names["single"], [text_input("text", TEXTS[:1]), text_input("text_pair", ["x"])])
    assert e.value.status() == "400" and "unknown input 'text_pair'" in e.value.message()


def test_versions_are_the_pack_digest(client, names, server):
    digest = server[1].state.session.digest(names["single"])
    r = client.infer(names["single"], [text_input("text", TEXTS[:1])], model_version=digest[:16])
    assert r.get_response()["model_version"] == digest[:16]
    with pytest.raises(InferenceServerException) as e:
        client.infer(names["single"], [text_input("text", TEXTS[:1])], model_version="0" * 16)
    assert e.value.status() == "404" and f"served at version {digest[:16]}" in e.value.message()


@pytest.mark.parametrize("key", ["single", "tags"])
def test_the_version_is_the_pack_that_ran_when_a_swap_follows_the_run(bert_compiled, packs_dir, names, key):
    """A reload landing between a run and its response (seen once in 2,000 requests under load on Ray) must
    not label the old pack's outputs with the new pack's version: the version is read with the run."""
    from bitfit.runtime import load_pack
    from bitfit.runtime.pack import TaskPack

    session = TaskSession(bert_compiled, threads=1)
    app = create_app(session, packs_dir, ServeConfig(max_texts=8))
    task = names[key]
    old = load_pack(packs_dir / key)
    new = TaskPack(old.manifest, {**old.tensors, "head.bias": old.tensors["head.bias"] + np.float32(0.5)})
    new.manifest.manifest_sha256 = new.manifest.tensors_sha256 = ""
    call = "run_tokens" if key == "tags" else "run_mixed"
    real = getattr(session, call)

    def then_swap(*args, **kwargs):  # the run sees the old pack; a reload lands right after it
        out = real(*args, **kwargs)
        session.register(new, name=task, replace=True)
        return out

    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": TEXTS[:1]}]}
    with TestClient(app) as c:
        session.register(old, name=task, replace=True)
        before = c.post(f"/v2/models/{task}/infer", json=body).json()
        setattr(session, call, then_swap)
        raced = c.post(f"/v2/models/{task}/infer", json=body).json()
        setattr(session, call, real)
        after = c.post(f"/v2/models/{task}/infer", json=body).json()
    assert session.digest(task) == new.digest() != old.digest()
    assert raced["model_version"] == before["model_version"] == old.digest()[:16]
    assert raced["outputs"] == before["outputs"]  # the old pack's numbers, labelled as the old pack
    assert after["model_version"] == new.digest()[:16]
    if key == "single":  # its logits move with the head's bias (a tagger's labels need not)
        assert after["outputs"] != before["outputs"]


@pytest.mark.parametrize("key, swap", [("tags", "single"), ("single", "scores"), ("single", "pairs"),
                                       ("single", "single")])
def test_a_reload_between_reading_and_running_a_request(bert_compiled, packs_dir, names, key, swap, monkeypatch):
    """A request is read against one pack's signature; a reload landing before it runs may change the task's
    kind (or its pairs). Then the answer is a 503 to retry, never the other kind's refusal ('POST it to
    /v1/...'), a crash, or the other kind's outputs under this signature. A reload that keeps the signature
    is answered by the new pack, labelled with its version."""
    from bitfit.runtime import load_pack
    from bitfit.runtime.pack import TaskPack
    from bitfit.serve import v2

    session = TaskSession(bert_compiled, threads=1)
    app = create_app(session, packs_dir, ServeConfig(max_texts=8))
    task = names[key]
    new = load_pack(packs_dir / swap)
    if swap == key:  # the same task retrained: same signature, other numbers
        new = TaskPack(new.manifest, {**new.tensors, "head.bias": new.tensors["head.bias"] + np.float32(0.5)})
        new.manifest.manifest_sha256 = new.manifest.tensors_sha256 = ""
    real = v2.parse_infer

    def read_then_reload(*args, **kwargs):
        req = real(*args, **kwargs)
        session.register(new, name=task, replace=True)
        return req

    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": TEXTS[:1]}]}
    with TestClient(app) as c:
        monkeypatch.setattr(v2, "parse_infer", read_then_reload)
        raced = c.post(f"/v2/models/{task}/infer", json=body)
        monkeypatch.setattr(v2, "parse_infer", real)
        if swap == key:
            after = c.post(f"/v2/models/{task}/infer", json=body).json()
    assert session.digest(task) == new.digest()
    if swap != key:
        assert raced.status_code == 503, raced.text
        assert f"task {task!r} was reloaded as a" in raced.json()["error"] and "retry" in raced.json()["error"]
    else:
        assert raced.status_code == 200, raced.text
        assert raced.json()["model_version"] == after["model_version"] == new.digest()[:16]
        assert raced.json()["outputs"] == after["outputs"]


def test_v2_and_v1_requests_share_the_batcher(server, names):
    import httpx

    url, app = server
    before = app.state.batcher.stats.rows
    body = {"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": TEXTS[:3]}]}
    r = httpx.post(f"http://{url}/v2/models/{names['single']}/infer", json=body)
    assert r.status_code == 200, r.text
    assert app.state.batcher.stats.rows == before + 3


def binary_body(header: dict, blob: bytes) -> tuple[bytes, dict]:
    h = json.dumps(header).encode()
    return h + blob, {"inference-header-content-length": str(len(h)), "content-type": "application/octet-stream"}


def elements(*texts: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(t)) + t for t in texts)


REFUSED = [
    # (name, body or (header, blob), status, part of the error)
    ("not json", b"{", 400, "invalid JSON"),
    ("no inputs", {"inputs": []}, 400, "'inputs' must be a non-empty list"),
    ("unknown field", {"inputs": [], "model": "x"}, 400, "unknown fields ['model']"),
    ("shape mismatch", {"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": ["a", "b"]}]}, 400,
     "has shape [3] (3 elements) but 2 values"),
    ("2-d shape", {"inputs": [{"name": "text", "shape": [2, 2], "datatype": "BYTES", "data": ["a"] * 4}]}, 400,
     "give [n] (or [n, 1])"),
    ("a number as text", {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [5]}]}, 400,
     "inputs[0].data[0] must be a string, got number 5"),
    ("twice", {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}] * 2}, 400,
     "given twice"),
    ("unknown output", {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
                        "outputs": [{"name": "hidden"}]}, 400, "unknown outputs ['hidden']"),
    ("over max_texts", {"inputs": [{"name": "text", "shape": [9], "datatype": "BYTES", "data": ["a"] * 9}]}, 413,
     "over the limit of 8"),
    ("empty text", {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [""]}]}, 400,
     "texts[0] is empty"),
    ("binary cut short", ({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                                       "parameters": {"binary_data_size": 12}}]}, elements(b"good fun")[:-3]), 400,
     "does not fit the 9 binary bytes left"),
    ("binary element overruns", ({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                                              "parameters": {"binary_data_size": 8}}]},
                                 struct.pack("<I", 100) + b"good"), 400, "claims 100 bytes, 4 remain"),
    ("binary not utf-8", ({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                                       "parameters": {"binary_data_size": 6}}]}, elements(b"\xff\xfe")), 400,
     "is not UTF-8 text"),
    ("unclaimed bytes", ({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                                      "parameters": {"binary_data_size": 8}}]}, elements(b"good") + b"xx"), 400,
     "2 binary bytes after the inputs"),
]


@pytest.mark.parametrize("body, status, message", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_malformed_infer_requests_are_refused(bert_compiled, packs_dir, names, body, status, message):
    app = create_app(TaskSession(bert_compiled, threads=1), packs_dir, ServeConfig(max_texts=8))
    with TestClient(app) as c:
        path = f"/v2/models/{names['single']}/infer"
        if isinstance(body, tuple):
            raw, headers = binary_body(*body)
        else:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers = {"content-type": "application/json"}
        r = c.post(path, content=raw, headers=headers)
        assert r.status_code == status and message in r.json()["error"], r.text
        ok = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["good"]}]}
        assert c.post(path, json=ok).status_code == 200  # and it keeps serving


def test_a_bad_header_length_is_refused(bert_compiled, packs_dir, names):
    app = create_app(TaskSession(bert_compiled, threads=1), packs_dir, ServeConfig())
    with TestClient(app) as c:
        path = f"/v2/models/{names['single']}/infer"
        for value, message in (("abc", "invalid Inference-Header-Content-Length"), ("9999", "does not fit a body")):
            r = c.post(path, content=b"{}", headers={"inference-header-content-length": value})
            assert r.status_code == 400 and message in r.json()["error"]


def text(**changes) -> dict:
    """A valid input tensor for the single-text task, with `changes` (a value of ... deletes the field)."""
    tensor = {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["good"], **changes}
    return {k: v for k, v in tensor.items() if v is not ...}


def infer(**changes) -> dict:
    return {"inputs": [text()], **changes}


def binary_text(**params) -> dict:
    return {"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 8, **params}}


MISTYPED = [
    # (name, body or (header, blob), the error's start): every field of a body, each with a wrong type, gets a 400
    # naming the field's path (the first two were 500 `TypeError: unhashable type`)
    ("name a list", {"inputs": [text(name=["text"])]}, "inputs[0].name must be a string, got list"),
    ("name an object", {"inputs": [text(name={"a": 1})]}, "inputs[0].name must be a string, got object"),
    ("name a number", {"inputs": [text(name=3)]}, "inputs[0].name must be a string, got number 3"),
    ("name missing", {"inputs": [text(name=...)]}, "inputs[0].name is missing: it must be a string"),
    ("datatype a list", {"inputs": [text(datatype=["BYTES"])]}, "inputs[0].datatype must be a string, got list"),
    ("datatype null", {"inputs": [text(datatype=None)]}, "inputs[0].datatype must be a string, got null"),
    ("shape a string", {"inputs": [text(shape="1")]}, "inputs[0].shape must be a list, got string"),
    ("shape of a float", {"inputs": [text(shape=[1.0])]},
     "inputs[0].shape[0] must be a whole number, got number 1.0"),
    ("shape of a boolean", {"inputs": [text(shape=[True])]},
     "inputs[0].shape[0] must be a whole number, got boolean true"),
    ("data a string", {"inputs": [text(data="good")]}, "inputs[0].data must be a list of strings, got string"),
    ("data null", {"inputs": [text(data=None)]}, "inputs[0].data must be a list of strings, got null"),
    ("data an object", {"inputs": [text(data={"0": "good"})]}, "inputs[0].data must be a list of strings, got object"),
    ("a row of a number", {"inputs": [text(shape=[2, 1], data=[["a"], [5]])]},
     "inputs[0].data[1][0] must be a string, got number 5"),
    ("a list among strings", {"inputs": [text(shape=[2], data=["a", ["b"]])]},
     "inputs[0].data[1] must be a string, got list"),
    ("parameters a list", {"inputs": [text(parameters=[1])]}, "inputs[0].parameters must be an object, got list"),
    ("content_type a number", {"inputs": [text(parameters={"content_type": 1})]},
     "inputs[0].parameters.content_type must be a string, got number 1"),
    ("a base64 codec", {"inputs": [text(data=["Z29vZA=="], parameters={"content_type": "base64"})]},  # was a 200
     "inputs[0].parameters.content_type 'base64' is not served"),
    ("an output codec", infer(outputs=[{"name": "label", "parameters": {"content_type": "np"}}]),
     "outputs[0].parameters.content_type 'np' is not served"),
    ("an unknown input parameter", {"inputs": [text(parameters={"shared_memory_region": "r"})]},
     "inputs[0].parameters has unsupported parameters ['shared_memory_region']"),
    ("an unknown tensor field", {"inputs": [text(contents=["good"])]},
     "inputs[0] has unknown fields ['contents']: it takes name, shape, datatype, parameters, data"),
    ("a tensor a string", {"inputs": ["text"]}, "inputs[0] must be an object (name, shape, datatype, parameters, "),
    ("the second tensor a list", {"inputs": [text(), []]}, "inputs[1] must be an object"),
    ("inputs an object", {"inputs": {"text": ["good"]}}, "'inputs' must be a non-empty list of tensors, got object"),
    ("id a number", infer(id=7), "id must be a string, got number 7"),
    ("id a list", infer(id=["r"]), "id must be a string, got list"),
    ("id a lone surrogate", infer(id="\ud800"), "id is not valid Unicode ('\\ud800' at character 0"),  # was 500
    ("parameters a list", infer(parameters=[]), "parameters must be an object, got list"),
    ("binary_data_output a string", infer(parameters={"binary_data_output": "yes"}),
     "parameters.binary_data_output must be true or false, got string"),
    ("outputs an object", infer(outputs={"name": "logits"}), "outputs must be a list, got object"),
    ("an output a string", infer(outputs=["logits"]), "outputs[0] must be an object (name, parameters), got string"),
    ("output name a list", infer(outputs=[{"name": ["logits"]}]), "outputs[0].name must be a string, got list"),
    ("output name missing", infer(outputs=[{"parameters": {}}]), "outputs[0].name is missing"),
    ("an unknown output field", infer(outputs=[{"name": "logits", "shape": [1]}]),
     "outputs[0] has unknown fields ['shape']"),
    ("output parameters a list", infer(outputs=[{"name": "logits", "parameters": [True]}]),
     "outputs[0].parameters must be an object, got list"),
    ("binary_data a number", infer(outputs=[{"name": "logits", "parameters": {"binary_data": 1}}]),
     "outputs[0].parameters.binary_data must be true or false, got number 1"),
    # was a 200 with every logit, as if the top-2 classes had not been asked for
    ("the classification extension", infer(outputs=[{"name": "logits", "parameters": {"classification": 2}}]),
     "outputs[0].parameters has unsupported parameters ['classification']"),
    ("an output twice", infer(outputs=[{"name": "label"}, {"name": "label", "parameters": {"binary_data": True}}]),
     "output 'label' is asked for twice"),
    # the binary extension: the JSON header is checked the same way
    ("binary: name a list", ({"inputs": [{**binary_text(), "name": ["text"]}]}, elements(b"good")),
     "inputs[0].name must be a string, got list"),
    ("binary: size a string", ({"inputs": [binary_text(binary_data_size="8")]}, elements(b"good")),
     "inputs[0].parameters.binary_data_size must be a whole number, got string"),
    ("binary: size a float", ({"inputs": [binary_text(binary_data_size=8.0)]}, elements(b"good")),
     "inputs[0].parameters.binary_data_size must be a whole number, got number 8.0"),
    ("binary: size a boolean", ({"inputs": [binary_text(binary_data_size=True)]}, elements(b"good")),
     "inputs[0].parameters.binary_data_size must be a whole number, got boolean true"),
    ("binary: size an object", ({"inputs": [binary_text(binary_data_size={})]}, elements(b"good")),
     "inputs[0].parameters.binary_data_size must be a whole number, got object"),
    ("binary: output name an object", ({"inputs": [binary_text()], "outputs": [{"name": {}}]}, elements(b"good")),
     "outputs[0].name must be a string, got object"),
]


def test_kserve_string_codec_hints_are_served(v2_client, names):
    """KServe and MLServer clients mark string tensors `content_type: str`: that is what is served here."""
    body = infer(inputs=[text(parameters={"content_type": "str"})],
                 outputs=[{"name": "label", "parameters": {"content_type": "str"}}])
    r = v2_client.post(f"/v2/models/{names['single']}/infer", json=body)
    assert r.status_code == 200 and [o["name"] for o in r.json()["outputs"]] == ["label"], r.text


@pytest.fixture(scope="module")
def v2_client(bert_compiled, packs_dir):
    app = create_app(TaskSession(bert_compiled, threads=1), packs_dir, ServeConfig(max_texts=8))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize("body, message", [r[1:] for r in MISTYPED], ids=[r[0] for r in MISTYPED])
def test_a_field_of_the_wrong_type_is_400_naming_its_path(v2_client, names, body, message):
    path = f"/v2/models/{names['single']}/infer"
    if isinstance(body, tuple):
        raw, headers = binary_body(*body)
    else:
        raw, headers = json.dumps(body).encode(), {"content-type": "application/json"}
    r = v2_client.post(path, content=raw, headers=headers)
    assert r.status_code == 400 and r.json()["error"].startswith(message), r.text
    assert v2_client.post(path, json=infer()).status_code == 200  # and it keeps serving


def test_metrics_label_v2_routes_by_template_not_by_task(bert_compiled, packs_dir, names):
    """/v2 traffic was all counted as endpoint "other". Each route is its own label now, its template: the
    task and version in a path never become label values (a client must not grow the registry at will)."""
    from prometheus_client.parser import text_string_to_metric_families

    app = create_app(TaskSession(bert_compiled, threads=1), packs_dir, ServeConfig(max_texts=8))
    task = names["single"]
    version = app.state.session.digest(task)[:16]
    with TestClient(app) as c:
        assert c.get("/v2").status_code == c.get("/v2/health/ready").status_code == 200
        assert c.get(f"/v2/models/{task}").status_code == c.get(f"/v2/models/{task}/ready").status_code == 200
        assert c.post(f"/v2/models/{task}/infer", json=infer()).status_code == 200
        assert c.post(f"/v2/models/{task}/versions/{version}/infer", json=infer()).status_code == 200
        for i in range(20):  # unknown tasks and versions: 404s under the route's label, not 20 new labels
            assert c.post(f"/v2/models/no-such-task-{i}/infer", json=infer()).status_code == 404
            assert c.get(f"/v2/models/{task}/versions/{i}").status_code == 404
        assert c.get("/v2/models/x/y/z").status_code == 404
        text = c.get("/metrics").text
    counts = {(s.labels["endpoint"], s.labels["status"]): s.value for family in text_string_to_metric_families(text)
              if family.name == "bitfit_requests" for s in family.samples if s.name == "bitfit_requests_total"}
    assert counts == {("/v2", "200"): 1, ("/v2/health/ready", "200"): 1, ("/v2/models/{model}", "200"): 1,
                      ("/v2/models/{model}/ready", "200"): 1, ("/v2/models/{model}/infer", "200"): 1,
                      ("/v2/models/{model}/versions/{version}/infer", "200"): 1,
                      ("/v2/models/{model}/infer", "404"): 20, ("/v2/models/{model}/versions/{version}", "404"): 20,
                      ("other", "404"): 1}
    assert task not in text and version not in text
