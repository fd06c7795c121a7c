"""Silent NaN answers (issue 23, class 2): both halves.

At load: a pack (or bank, or compiled directory's base biases) whose values are finite but far outside anything
training produces, sealed consistently (every checksum recomputed, as a forger would), is refused naming the
tensor, its largest |value|, the bound and the fix. A head weight of 3e38 overflows to NaN; a LayerNorm bias
x 1e30 gives finite answers that mean nothing, so a NaN check alone would not catch it.

At run time: a forward pass that gives NaN or inf is refused (NonFiniteOutputError) on every path that answers:
the session's calls (run, run_mixed on plain and mixed graphs, run_tokens, answer, logits), `bitfit predict
--json` (exit 2, no traceback, nothing printed), /v1 and /v2 (JSON and binary outputs) with a 4xx and the
message (never a 200 with a number, never a 500), the Ray replica's app, and OpenVINO.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from bitfit.runtime import TaskSession, load_pack
from bitfit.runtime.compiled import BASE_BIASES_FILE
from bitfit.runtime.errors import CompiledModelError, NonFiniteOutputError, PackError
from bitfit.runtime.fs import sha256_file
from bitfit.runtime.pack import MANIFEST_FILE, MAX_ABS_VALUE, TENSORS_FILE
from safetensors import safe_open
from safetensors.numpy import save_file
from starlette.testclient import TestClient

from bitfit.cli import main
from bitfit.serve import ServeConfig, create_app
from conftest import reseal_compiled, write_sealed

TEXTS = ["good fun movie", "awful boring plot"]


def rewrite_tensors(path: Path, change) -> None:
    """Change a safetensors file's tensors in place, keeping its metadata (provenance): `change(tensors)`."""
    with safe_open(str(path), "numpy") as fh:
        metadata = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)


def forge(pack: Path, change) -> Path:
    """A pack whose tensors were edited and every checksum recomputed: the seal cannot catch it."""
    rewrite_tensors(pack / TENSORS_FILE, change)
    data = json.loads((pack / MANIFEST_FILE).read_text())
    write_sealed(pack / MANIFEST_FILE, {**data, "tensors_sha256": sha256_file(pack / TENSORS_FILE)})
    return pack


def set_to(name: str, value: float):
    def change(tensors: dict) -> None:
        tensors[name] = np.full_like(tensors[name], value)
    return change


def scale(name: str, factor: float):
    def change(tensors: dict) -> None:
        tensors[name] = (tensors[name] * factor).astype(np.float32)
    return change


def bln_e(directory: Path) -> str:
    """The name of the embeddings' LayerNorm bias (kind bLNe) in a pack or a compiled directory."""
    data = json.loads((directory / MANIFEST_FILE).read_text())
    return next(b["name"] for b in data.get("biases", data.get("bias_inputs")) if b.get("kind") == "bLNe")


@pytest.fixture
def pack(pack_all, copy_dir) -> Path:
    return copy_dir(pack_all, "pack")


# -- at load: values far outside anything training produces --------------------------------------------------
@pytest.mark.parametrize("what", ["head.weight = 3e38", "bLNe x 1e30"])
def test_a_sealed_pack_with_huge_values_is_refused_at_load(pack, bert_compiled, what, capsys):
    name = "head.weight" if what.startswith("head") else bln_e(pack)
    forge(pack, set_to(name, 3e38) if what.startswith("head") else scale(name, 1e30))
    message = rf"{name} holds values up to \|[0-9.e+]+\|, beyond 10000, the bound on every bias and head value " \
              r"\(trained ones are O\(1\)-O\(10\)\): .*retrain the task, or re-copy the original"
    with pytest.raises(PackError, match=message):
        load_pack(pack)
    session = TaskSession(bert_compiled, threads=1)
    with pytest.raises(PackError, match=message):
        session.register(pack)
    assert session.tasks == []
    # the CLI: exit 2 with the reason, nothing printed on stdout (the NaN logits and a label, exit 0)
    assert main(["predict", "--compiled", str(bert_compiled), "--pack", str(pack), "--json", "--text", "a"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err and "beyond 10000, the bound" in err


def test_the_bound_is_exact_and_also_holds_for_packs_built_in_memory(pack, bert_compiled):
    """Just inside the bound loads (no trained pack is refused for a value the bound allows); just beyond is
    refused, also for a TaskPack handed to register without a file."""
    good = load_pack(forge(pack, set_to("head.bias", -0.99 * MAX_ABS_VALUE)))
    session = TaskSession(bert_compiled, threads=1)
    session.register(good)
    good.tensors["head.bias"] = np.array([-1.01 * MAX_ABS_VALUE, 0], np.float32)
    with pytest.raises(PackError, match=r"head\.bias holds values up to \|1\.01e\+04\|, beyond 10000"):
        session.register(good, name="in-memory")


def test_a_bank_with_a_huge_bias_is_refused(bert_compiled, pack_all, tmp_path):
    """A bias bank feeds the same forward: a forged bank.bin (its sha256 and the map's seal recomputed) is
    refused by the same check when its task is read."""
    from bitfit.exporters.bank import write_bank
    from bitfit.runtime.bank import BANK_FILE, MAP_FILE, read_bank, register_bank

    bank = write_bank(bert_compiled, [pack_all], tmp_path / "bank")
    layout = json.loads((bank / MAP_FILE).read_text())
    spec = next(b for b in layout["biases"] if b["name"] in layout["tasks"][0]["trained"])
    data = bytearray((bank / BANK_FILE).read_bytes())
    at = layout["tasks"][0]["offset"] + spec["offset"]
    data[at : at + 4] = np.float32(1e30).tobytes()
    (bank / BANK_FILE).write_bytes(bytes(data))
    write_sealed(bank / MAP_FILE, {**layout, "bank_sha256": sha256_file(bank / BANK_FILE)})
    with pytest.raises(PackError, match=rf"{spec['name']} holds values up to \|1e\+30\|, beyond 10000"):
        register_bank(TaskSession(bert_compiled, threads=1), read_bank(bank))


def test_a_compiled_directory_with_a_huge_base_bias_is_refused(bert_compiled, copy_dir):
    graph = copy_dir(bert_compiled, "graph")
    name = bln_e(graph)
    rewrite_tensors(graph / BASE_BIASES_FILE, scale(name, 1e30))
    reseal_compiled(graph)
    with pytest.raises(CompiledModelError, match=rf"{name} holds values up to \|[0-9.e+]+\|, beyond 10000.*"
                                                 r"compile it again"):
        TaskSession(graph, threads=1)


# -- at run time: a forward pass that gives NaN or inf --------------------------------------------------------
def poison(monkeypatch, session: TaskSession, value: float = np.nan) -> None:
    """Make the encoder give `value` everywhere, as a pack within the bound that still overflowed would."""
    run = session.engine.run
    monkeypatch.setattr(session.engine, "run", lambda feeds, values: np.full_like(run(feeds, values), value))


MESSAGE = r"task '{}' produced non-finite numbers \(NaN or inf\) in its logits for this input: its pack holds " \
          r"values that overflow float32 .*no answer is given"


@pytest.fixture(scope="module")
def head_packs(bert_model, tmp_path_factory) -> dict[str, Path]:
    from bitfit.training.train import train
    from head_data import write_qa_data, write_token_data

    root = tmp_path_factory.mktemp("nonfinite-heads")
    quiet = {"epochs": 1, "batch_size": 8, "log": lambda *_: None, "progress": False}
    tags = train(bert_model, write_token_data(root / "tags.jsonl"), root / "tags", task_name="tags", **quiet)
    qa = train(bert_model, write_qa_data(root / "qa.jsonl"), root / "qa", task_kind="question-answering",
               task_name="qa", **quiet)
    return {"tags": Path(tags.pack_path), "qa": Path(qa.pack_path)}


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_every_session_call_refuses_a_non_finite_output(bert_compiled, pack_all, head_packs, token_inputs,
                                                        monkeypatch, value):
    session = TaskSession(bert_compiled, threads=1)
    task = session.register(pack_all)
    session.register(head_packs["tags"])
    session.register(head_packs["qa"])
    inputs = token_inputs(session, 2, 7)
    poison(monkeypatch, session, value)
    calls = {
        "run": lambda: session.run(task, TEXTS),
        "run_mixed": lambda: session.run_mixed([(task, t) for t in TEXTS]),
        "logits": lambda: session.logits(task, inputs),
        "run_tokens": lambda: session.run_tokens("tags", TEXTS),
        "answer": lambda: session.answer("qa", ["who?"], ["the actor"]),
    }
    for call, fn in calls.items():
        name = {"run_tokens": "tags", "answer": "qa"}.get(call, task)
        with pytest.raises(NonFiniteOutputError, match=MESSAGE.format(name)):
            fn()


def test_run_mixed_on_a_mixed_graph_refuses_only_the_broken_task(bert_model, pack_all, pack_min, tmp_path,
                                                                 monkeypatch):
    """A mixed graph's rows go through the head without `forward`: the same check, per task. A batch holding a
    broken task's rows fails as a whole (the server's batcher then runs each request alone); rows of good tasks
    alone are answered."""
    from bitfit.compiler.compile import compile as compile_model

    graph = tmp_path / "mixed"
    compile_model(bert_model, graph, mixed=True, log=lambda s: None)
    session = TaskSession(graph, threads=1)
    good = session.register(pack_all)
    session.register(pack_min, name="broken")
    real = session._forward

    def forward(feeds, task_ids, values, biases=None):
        hidden = real(feeds, task_ids, values, biases)
        hidden[task_ids == session._state.tasks["broken"].row] = np.nan  # the broken task's rows only
        return hidden

    monkeypatch.setattr(session, "_forward", forward)
    with pytest.raises(NonFiniteOutputError, match=MESSAGE.format("broken")):
        session.run_mixed([(good, TEXTS[0]), ("broken", TEXTS[1])])
    assert [r["task"] for r in session.run_mixed([(good, TEXTS[0]), (good, TEXTS[1])])] == [good, good]


def test_predict_json_exits_2_and_prints_no_number(bert_compiled, pack_all, monkeypatch, capsys):
    """Exit 2, as for the same pack refused at load: the pack given is the bad input (exit 1 is a check that ran
    and failed, as in verify)."""
    from bitfit.runtime.backends import OrtEngine

    run = OrtEngine.run
    monkeypatch.setattr(OrtEngine, "run", lambda self, feeds, values: np.full_like(run(self, feeds, values), np.nan))
    task = load_pack(pack_all).name
    assert main(["predict", "--compiled", str(bert_compiled), "--pack", str(pack_all), "--json",
                 "--text", TEXTS[0]]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert err.startswith(f"bitfit predict: error: task '{task}' produced non-finite numbers (NaN or inf)")


def v2_binary(texts: list[str]) -> tuple[bytes, dict]:
    """An infer request as tritonclient sends it by default: binary input and binary outputs."""
    blob = b"".join(len(t.encode()).to_bytes(4, "little") + t.encode() for t in texts)
    header = json.dumps({"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(blob)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return header + blob, {"inference-header-content-length": str(len(header)),
                           "content-type": "application/octet-stream"}


def check_server(app, session: TaskSession, task: str, monkeypatch) -> None:
    """/v1 422 and /v2 400 (the protocol's status for every refused request) with the message, JSON and binary
    outputs alike (before the fix: 500, 500 and a 200 with NaN in its binary logits); a healthy call on the same
    server still answers."""
    body = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": TEXTS}]}
    raw, headers = v2_binary(TEXTS)
    with TestClient(app) as client:
        assert client.post("/v1/predict", json={"task": task, "texts": TEXTS}).status_code == 200
        poison(monkeypatch, session)
        answers = {"/v1": client.post("/v1/predict", json={"task": task, "texts": TEXTS}),
                   "/v2 json": client.post(f"/v2/models/{task}/infer", json=body),
                   "/v2 binary": client.post(f"/v2/models/{task}/infer", content=raw, headers=headers)}
        monkeypatch.undo()
        assert client.post(f"/v2/models/{task}/infer", content=raw, headers=headers).status_code == 200
    assert {k: r.status_code for k, r in answers.items()} == {"/v1": 422, "/v2 json": 400, "/v2 binary": 400}
    for r in answers.values():
        assert r.headers["content-type"] == "application/json"
        assert r.json()["error"].startswith(f"task '{task}' produced non-finite numbers (NaN or inf)"), r.text


def test_the_server_refuses_a_non_finite_output_on_v1_and_v2(bert_compiled, pack_all, tmp_path, monkeypatch):
    packs = tmp_path / "packs"
    shutil.copytree(pack_all, packs / "single")
    session = TaskSession(bert_compiled, threads=1)
    check_server(create_app(session, packs, ServeConfig()), session, load_pack(pack_all).name, monkeypatch)


def test_the_server_refuses_a_forged_pack_at_load(bert_compiled, pack_all, tmp_path):
    packs = tmp_path / "packs"
    forge(Path(shutil.copytree(pack_all, packs / "forged")), set_to("head.weight", 3e38))
    app = create_app(TaskSession(bert_compiled, threads=1), packs, ServeConfig())
    refused = app.state.initial_load.refused[load_pack(pack_all).name]
    assert "head.weight holds values up to |3e+38|, beyond 10000" in refused
    with TestClient(app) as client:
        assert client.get("/v1/tasks").json()["tasks"] == []


def test_the_ray_replica_app_refuses_a_non_finite_output(bert_compiled, pack_all, tmp_path, monkeypatch):
    """The app a Ray replica builds (BitFitReplica.__serve_build_asgi_app__, called here without a cluster: the
    replica's context is only its name) is create_app over a TaskSession: the same refusals."""
    pytest.importorskip("ray.serve")
    from bitfit.serve.ray_app import BitFitReplica

    packs = tmp_path / "packs"
    shutil.copytree(pack_all, packs / "single")
    replica = SimpleNamespace(compiled=str(bert_compiled), packs=str(packs), threads=1, backend="onnxruntime",
                              limits={}, replica="r-1", reload_everywhere=None)
    build = next(c.__dict__["__serve_build_asgi_app__"] for c in BitFitReplica.func_or_class.__mro__
                 if "__serve_build_asgi_app__" in c.__dict__)
    app = build(replica)
    check_server(app, app.state.session, load_pack(pack_all).name, monkeypatch)


def test_openvino_refuses_a_non_finite_output(bert_model, pack_all, tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    from bitfit.compiler.compile import compile as compile_model

    graph = tmp_path / "plain"
    compile_model(bert_model, graph, bias_defaults=False, log=lambda s: None)
    session = TaskSession(graph, backend="openvino")
    task = session.register(pack_all)
    assert session.backend == "openvino"
    poison(monkeypatch, session, np.inf)
    with pytest.raises(NonFiniteOutputError, match=MESSAGE.format(task)):
        session.run(task, TEXTS)

