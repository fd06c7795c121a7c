"""bitfit export-triton: a Triton model repository whose one ONNX model serves every task, rows of different
tasks in one batch. The config is checked against Triton's own schema and against the graph; the model is
run in onnxruntime as Triton's onnxruntime backend would run it."""
from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from bitfit.exporters.triton import CONFIG_FILE, TASKS_FILE, export_triton
from bitfit.runtime import TaskSession, load_pack
from bitfit.runtime.compiled import (
    LOGITS,
    MODEL_FILE,
    OUTPUT_NAME,
    TASK_IDS,
    TOKEN_LOGITS,
    TOKENIZER_FILE,
    read_manifest,
)
from bitfit.runtime.errors import BitFitError, CompiledModelError, IncompatibleError
from conftest import QUIET
from head_refs import numpy_head, variant_pack

from bitfit.cli import main

TOL = 1e-5


@pytest.fixture(scope="module")
def mixed(bert_model, tmp_path_factory):
    from bitfit.compiler.compile import compile as compile_model

    return compile_model(bert_model, tmp_path_factory.mktemp("triton") / "mixed", mixed=True, log=QUIET["log"])


@pytest.fixture(scope="module")
def packs(pack_all, pack_pairs, pack_scores):
    """Three trained tasks (2 labels, 3 labels, regression) and two made-up head shapes (BERT pooler, tokens)."""
    base = load_pack(pack_all)
    return [load_pack(pack_all), load_pack(pack_pairs), load_pack(pack_scores),
            variant_pack(base, task="tags", task_kind="token-classification", pooling="none",
                         labels=["O", "X", "Y", "Z"], seed=7),
            variant_pack(base, task="pooled", task_kind="classification", pooling="pooler", labels=["a", "b"], seed=8)]


@pytest.fixture(scope="module")
def repo(mixed, packs, tmp_path_factory):
    out = tmp_path_factory.mktemp("repo")
    return export_triton(mixed, packs, out, name="tasks", max_batch_size=16)


def onnx_dims(value: ir.Value) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in value.shape]


def test_layout_and_tasks_json(repo, packs):
    assert sorted(p.name for p in repo.iterdir()) == ["1", CONFIG_FILE, TASKS_FILE, TOKENIZER_FILE]
    assert [p.name for p in (repo / "1").iterdir()] == [MODEL_FILE]
    tasks = json.loads((repo / TASKS_FILE).read_text())
    assert tasks["max_logits"] == 4
    assert [(t["task"], t["task_id"], t["num_logits"], t["output"]) for t in tasks["tasks"]] == [
        (packs[0].name, 0, 2, LOGITS), (packs[1].name, 1, 3, LOGITS), (packs[2].name, 2, 1, LOGITS),
        ("tags", 3, 4, TOKEN_LOGITS), ("pooled", 4, 2, LOGITS)]
    assert [t["labels"] for t in tasks["tasks"]] == [p.manifest.labels for p in packs]


def test_config_follows_tritons_schema_and_the_graph(repo):
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    # Parse is strict: an unknown field or a wrong enum value is an error
    config = text_format.Parse((repo / CONFIG_FILE).read_text(), model_config_pb2.ModelConfig())
    assert config.name == "tasks" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 16
    assert config.HasField("dynamic_batching")
    assert len(config.instance_group) == 1 and config.instance_group[0].count == 1
    graph = ir.load(repo / "1" / MODEL_FILE).graph
    types = {ir.DataType.INT64: model_config_pb2.TYPE_INT64, ir.DataType.FLOAT: model_config_pb2.TYPE_FP32}
    for declared, values in ((config.input, graph.inputs), (config.output, graph.outputs)):
        by_name = {v.name: v for v in values}
        assert [t.name for t in declared] == list(by_name)  # every graph input/output, nothing else
        for t in declared:
            v = by_name[t.name]
            assert t.data_type == types[v.dtype], t.name
            # with max_batch_size > 0 Triton adds the batch axis; a reshape is what the model gets instead of dims
            model_dims = list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)
            assert [-1, *model_dims] == onnx_dims(v), t.name
    assert [t.name for t in config.input] == ["input_ids", "attention_mask", "token_type_ids", TASK_IDS]
    ids = config.input[-1]
    assert list(ids.dims) == [1] and list(ids.reshape.shape) == []  # clients send [batch, 1]; the model gets [batch]
    assert {v.name for v in graph.inputs if v.const_value is not None} == set()  # tables baked: no optional inputs


def test_a_mixed_batch_gives_each_row_its_tasks_logits(repo, packs, bert_compiled, token_inputs):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    model = ort.InferenceSession(str(repo / "1" / MODEL_FILE), options, providers=["CPUExecutionProvider"])
    plain = TaskSession(bert_compiled)
    for p in packs:
        plain.register(p)
    task_ids = np.array([0, 1, 2, 3, 4, 4, 2, 0, 1], np.int64)  # every task, in mixed order
    x = token_inputs(plain, len(task_ids), 10)
    hidden, logits, tokens = model.run([OUTPUT_NAME, LOGITS, TOKEN_LOGITS], {**x, TASK_IDS: task_ids})
    assert logits.shape == (9, 4) and tokens.shape == (9, 10, 4)
    for row, task in enumerate(task_ids):
        pack = packs[task]
        k = pack.manifest.num_outputs
        one = {name: v[row : row + 1] for name, v in x.items()}
        np.testing.assert_allclose(hidden[row : row + 1], plain.hidden_states(one, pack.name), rtol=0, atol=TOL)
        ref_logits, ref_tokens = numpy_head(pack, hidden[row : row + 1], one["attention_mask"])
        np.testing.assert_allclose(logits[row, :k], ref_logits[0], rtol=0, atol=TOL, err_msg=f"row {row}")
        np.testing.assert_allclose(tokens[row, :, :k], ref_tokens[0], rtol=0, atol=TOL, err_msg=f"row {row}")
        ours = tokens[row, :, :k] if pack.manifest.token_level else logits[row, :k]  # the TaskSession's head
        np.testing.assert_allclose(ours, plain.logits(pack.name, one)[0], rtol=0, atol=TOL, err_msg=f"row {row}")
        assert not logits[row, k:].any() and not tokens[row, :, k:].any()  # padding past the task's labels


def test_refusals(mixed, bert_compiled, packs, pack_other_base, repo, tmp_path):
    with pytest.raises(CompiledModelError, match="--mixed"):
        export_triton(bert_compiled, packs[:1], tmp_path / "r")
    with pytest.raises(IncompatibleError, match="fingerprint"):
        export_triton(mixed, [packs[0], pack_other_base], tmp_path / "r")
    with pytest.raises(IncompatibleError, match="twice"):
        export_triton(mixed, [packs[0], packs[0]], tmp_path / "r")
    assert not (tmp_path / "r" / "bitfit").exists()
    before = (repo / TASKS_FILE).read_text()
    with pytest.raises(BitFitError, match="--overwrite"):
        export_triton(mixed, packs[:2], repo.parent, name=repo.name)
    assert (repo / TASKS_FILE).read_text() == before
    (tmp_path / "r" / "other").mkdir(parents=True)
    with pytest.raises(BitFitError, match="not a model written by bitfit"):
        export_triton(mixed, packs[:1], tmp_path / "r", name="other", overwrite=True)


def test_cli_adds_a_task_by_re_exporting(mixed, pack_all, pack_pairs, tmp_path, capsys):
    args = ["export-triton", "--compiled", str(mixed), str(pack_all), "--out", str(tmp_path), "--name", "m"]
    assert main(args) == 0
    assert "tritonserver --model-repository" in capsys.readouterr().out
    assert main([*args[:3], str(pack_all), str(pack_pairs), *args[4:], "--overwrite"]) == 0
    tasks = json.loads((tmp_path / "m" / TASKS_FILE).read_text())["tasks"]
    assert [t["task_id"] for t in tasks] == [0, 1]  # appended: the first task keeps its id
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary or old copies left behind


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_int8_and_fp16_mixed_graphs_carry_over(precision, bert_model, packs, token_inputs, tmp_path):
    """Compile choices carry over: the model runs the int8 / fp16 graph, with the fp32 per-row head."""
    from bitfit.compiler.compile import compile as compile_model

    mixed = compile_model(bert_model, tmp_path / "mixed", mixed=True, quantize="int8" if precision == "int8" else None,
                          fp16=precision == "fp16", log=QUIET["log"])
    repo = export_triton(mixed, packs[:2], tmp_path / "repo")
    assert json.loads((repo / TASKS_FILE).read_text())["precision"] == read_manifest(mixed).precision
    options = ort.SessionOptions()
    options.log_severity_level = 3
    model = ort.InferenceSession(str(repo / "1" / MODEL_FILE), options, providers=["CPUExecutionProvider"])
    session = TaskSession(mixed)
    for task_id, pack in enumerate(packs[:2]):
        session.register(pack)
        x = token_inputs(session, 3, 9)  # one task per batch: int8 activations are quantized per batch
        logits, = model.run([LOGITS], {**x, TASK_IDS: np.full(3, task_id, np.int64)})
        k = pack.manifest.num_outputs
        np.testing.assert_allclose(logits[:, :k], session.logits(pack.name, x), rtol=0, atol=TOL)


def test_the_example_client_sends_what_the_config_declares_and_gets_each_tasks_logits(repo, packs, bert_compiled):
    """examples/triton_client.py builds its request with tritonclient.http; every tensor matches config.pbtxt
    (name, type, dims after Triton's batch axis), and the model fed those bytes, reshaped as the config says,
    gives each row its task's logits: what a tritonserver would answer, short of running one (none here)."""
    pytest.importorskip("tritonclient.http")  # the client example needs it
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    import importlib.util
    from pathlib import Path

    from google.protobuf import text_format

    spec = importlib.util.spec_from_file_location(
        "triton_client", Path(__file__).resolve().parents[1] / "examples" / "triton_client.py")
    client = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(client)
    tasks, tokenizer = client.load_repo(repo.parent, repo.name)
    rows = [(packs[0].name, "good fun movie"), (packs[4].name, "the city"), (packs[0].name, "awful plot"),
            (packs[2].name, "love money")]
    inputs = client.build_inputs(tasks, tokenizer, rows)
    config = text_format.Parse((repo / CONFIG_FILE).read_text(), model_config_pb2.ModelConfig())
    declared = {t.name: t for t in config.input}
    assert [i.name() for i in inputs] == [t.name for t in config.input]
    feed = {}
    for i in inputs:
        t = declared[i.name()]
        assert i.datatype() == "INT64" and t.data_type == model_config_pb2.TYPE_INT64
        shape = i.shape()
        assert shape[0] == len(rows) <= config.max_batch_size
        assert all(d in (-1, s) for d, s in zip(t.dims, shape[1:])) and len(t.dims) == len(shape) - 1, i.name()
        array = np.frombuffer(i._get_binary_data(), np.int64).reshape(shape)  # the bytes on the wire
        feed[i.name()] = array.reshape([shape[0], *t.reshape.shape]) if t.HasField("reshape") else array
    model = ort.InferenceSession(str(repo / "1" / MODEL_FILE), providers=["CPUExecutionProvider"])
    logits = model.run([LOGITS], feed)[0]
    session = TaskSession(bert_compiled)
    for p in packs:
        session.register(p)
    for row, (task, text) in enumerate(rows):
        want = session.run(task, [text]).records()[0]
        k = len(want["logits"])
        np.testing.assert_allclose(logits[row, :k], want["logits"], rtol=0, atol=1e-4, err_msg=task)
    kinds = {t["task"]: t["task_kind"] for t in tasks["tasks"]}
    got = client.answers(tasks, rows, logits)
    assert kinds[packs[2].name] == "regression"
    for (task, text), answer in zip(rows, got):
        result = session.run(task, [text])
        if kinds[task] == "regression":
            assert abs(float(answer) - float(result.records()[0]["logits"][0])) < 1e-3
        else:
            assert answer == result.labels[0]
    with pytest.raises(SystemExit, match="token_logits"):
        client.answers(tasks, [(packs[3].name, "x")], logits[:1])
