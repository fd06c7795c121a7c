"""bitfit export-adapter: a task pack as an onnxruntime adapter file, run by a plain onnxruntime session
(what any binding does) with no bitfit code: token inputs in, the task's logits out."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from bitfit.exporters.adapter import (
    adapter_fits,
    adapter_tensors,
    export_adapter,
    fingerprint_version,
    sidecar_path,
)
from bitfit.runtime import TaskSession, load_pack
from bitfit.runtime.compiled import (
    LOGITS,
    MODEL_FILE,
    OUTPUT_NAME,
    TOKEN_LOGITS,
    read_manifest,
)
from bitfit.runtime.errors import BitFitError, CompiledModelError, IncompatibleError
from bitfit.runtime.fs import sha256_file
from conftest import ATOL, QUIET
from head_refs import numpy_head, variant_pack

from bitfit.cli import main

TOL = 1e-5


def plain_session(compiled) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(compiled / MODEL_FILE), options, providers=["CPUExecutionProvider"])


KEEP = []  # RunOptions does not keep its LoraAdapter alive: once collected, the adapter silently stops applying


def with_adapter(path) -> ort.RunOptions:
    adapter = ort.LoraAdapter()
    adapter.Load(str(path))
    KEEP.append(adapter)
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    return options


@pytest.fixture(scope="module")
def adapters(bert_compiled, pack_all, pack_pairs, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {path: export_adapter(bert_compiled, path, root / f"{load_pack(path).name}.onnx_adapter")
            for path in (pack_all, pack_pairs)}


def test_two_tasks_logits_equal_the_task_session(bert_compiled, adapters, token_inputs):
    task_session = TaskSession(bert_compiled)
    graph = plain_session(bert_compiled)  # knows nothing of bitfit: the graph and the adapter file only
    x = token_inputs(task_session, 5, 12)
    results = []
    for pack_path, adapter in adapters.items():
        name = task_session.register(pack_path)
        logits, = graph.run([LOGITS], x, with_adapter(adapter))  # token inputs only
        ref = task_session.logits(name, x)
        assert logits.shape == ref.shape
        np.testing.assert_allclose(logits, ref, rtol=0, atol=TOL)
        results.append(logits)
    assert results[0].shape != results[1].shape  # 2 and 3 labels: the head's labels axis follows the adapter


def test_a_run_without_adapter_is_the_base_model(bert_compiled, bert_model, adapters, token_inputs, torch_hidden):
    graph = plain_session(bert_compiled)
    x = token_inputs(TaskSession(bert_compiled), 3, 9)
    graph.run([LOGITS], x, with_adapter(next(iter(adapters.values()))))  # an adapter on one run leaves no state
    hidden, logits = graph.run([OUTPUT_NAME, LOGITS], x)
    np.testing.assert_array_equal(hidden, TaskSession(bert_compiled).hidden_states(x))
    np.testing.assert_allclose(hidden, torch_hidden(bert_model, x), rtol=0, atol=ATOL)
    assert not logits.any()  # the zero default head


def test_file_round_trips_and_sidecar_names_the_base(bert_compiled, pack_all, adapters):
    path = adapters[pack_all]
    pack = load_pack(pack_all)
    assert path.stat().st_size > 0
    back = ort.AdapterFormat.read_adapter(str(path))
    params = {k: v.numpy() for k, v in back.get_parameters().items()}
    expected = adapter_tensors(pack)
    assert params.keys() == expected.keys() == {*pack.biases, "head.weight", "head.bias", "head.pooling"}
    for k, v in expected.items():
        np.testing.assert_array_equal(params[k], v)
    np.testing.assert_array_equal(params["head.pooling"], [1, 0, 0])  # mean pooling, one-hot
    compiled = read_manifest(bert_compiled)
    assert back.get_model_version() == fingerprint_version(compiled.base_fingerprint)
    side = json.loads(sidecar_path(path).read_text())
    assert sidecar_path(path) == path.with_suffix(".json")
    assert side["task"] == pack.name and side["labels"] == pack.manifest.labels
    assert side["task_kind"] == "classification" and side["output"] == LOGITS and side["num_logits"] == 2
    assert side["base_fingerprint"] == compiled.base_fingerprint
    assert side["checked_graph_sha256"] == sha256_file(bert_compiled / MODEL_FILE)
    adapter_fits(bert_compiled, path)


def test_pooler_and_token_packs(bert_compiled, pack_all, token_inputs, tmp_path):
    base = load_pack(pack_all)
    graph = plain_session(bert_compiled)
    task_session = TaskSession(bert_compiled)
    x = token_inputs(task_session, 3, 10)
    for pack in (variant_pack(base, task="pooled", task_kind="classification", pooling="pooler", labels=["a", "b"],
                              seed=5),
                 variant_pack(base, task="tags", task_kind="token-classification", pooling="none",
                              labels=["O", "X", "Y"], seed=6)):
        adapter = export_adapter(bert_compiled, pack, tmp_path / f"{pack.name}.onnx_adapter")
        task_session.register(pack)
        hidden, logits, tokens = graph.run([OUTPUT_NAME, LOGITS, TOKEN_LOGITS], x, with_adapter(adapter))
        np.testing.assert_allclose(hidden, task_session.hidden_states(x, pack.name), rtol=0, atol=TOL)
        ref_logits, ref_tokens = numpy_head(pack, hidden, x["attention_mask"])
        np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=TOL)
        np.testing.assert_allclose(tokens, ref_tokens, rtol=0, atol=TOL)
        ours = tokens if pack.manifest.token_level else logits
        np.testing.assert_allclose(ours, task_session.logits(pack.name, x), rtol=0, atol=TOL)
        side = json.loads(adapter.with_suffix(".json").read_text())
        assert side["output"] == (TOKEN_LOGITS if pack.manifest.token_level else LOGITS)


def test_the_adapter_fits_other_graphs_of_the_base(bert_model, pack_all, adapters, token_inputs, tmp_path):
    """No graph identity in the file: the same adapter runs on the int8 graph of the same base."""
    from bitfit.compiler.compile import compile as compile_model

    int8 = compile_model(bert_model, tmp_path / "int8", quantize="int8", log=QUIET["log"])
    task_session = TaskSession(int8)
    name = task_session.register(pack_all)
    x = token_inputs(task_session, 2, 8)
    logits, = plain_session(int8).run([LOGITS], x, with_adapter(adapters[pack_all]))
    np.testing.assert_allclose(logits, task_session.logits(name, x), rtol=0, atol=TOL)


def test_traps_of_the_adapter_mechanism(bert_compiled, pack_all, pack_pairs, adapters, token_inputs):
    """What the docs warn about, pinned: an adapter wins over an explicit feed of the same name, and of two
    active adapters the first one's values win, silently. Hence: one adapter per run."""
    graph = plain_session(bert_compiled)
    x = token_inputs(TaskSession(bert_compiled), 2, 8)
    a, b = adapters[pack_all], adapters[pack_pairs]
    alone, = graph.run([LOGITS], x, with_adapter(a))
    hidden_size = read_manifest(bert_compiled).hidden_size
    fed = {"head.bias": np.full(3, 100.0, np.float32), "head.weight": np.zeros((3, hidden_size), np.float32)}
    overridden, = graph.run([LOGITS], {**x, **fed}, with_adapter(a))
    np.testing.assert_array_equal(overridden, alone)  # the explicit feed was ignored
    options = with_adapter(a)
    second = ort.LoraAdapter()
    second.Load(str(b))
    KEEP.append(second)
    options.add_active_adapter(second)
    both, = graph.run([LOGITS], x, options)
    np.testing.assert_array_equal(both, alone)  # b's head and biases were ignored


def test_refusals(bert_compiled, pack_all, pack_other_base, adapters, bert_model, tmp_path):
    with pytest.raises(IncompatibleError, match="fingerprint"):
        export_adapter(bert_compiled, pack_other_base, tmp_path / "other.onnx_adapter")
    assert not (tmp_path / "other.onnx_adapter").exists() and not (tmp_path / "other.json").exists()
    existing = adapters[pack_all]
    before = existing.read_bytes()
    with pytest.raises(BitFitError, match="--overwrite"):
        export_adapter(bert_compiled, pack_all, existing)
    assert existing.read_bytes() == before
    export_adapter(bert_compiled, pack_all, existing, overwrite=True)
    assert existing.read_bytes() == before  # the same pack gives the same bytes
    with pytest.raises(BitFitError, match="sidecar"):
        export_adapter(bert_compiled, pack_all, tmp_path / "x.json")

    from bitfit.compiler.compile import compile as compile_model

    mixed = compile_model(bert_model, tmp_path / "mixed", mixed=True, log=QUIET["log"])
    with pytest.raises(CompiledModelError, match="--mixed"):
        export_adapter(mixed, pack_all, tmp_path / "m.onnx_adapter")


def test_adapter_fits_refuses_another_base(compiled_dir, adapters, pack_all):
    with pytest.raises(IncompatibleError, match="another base"):
        adapter_fits(compiled_dir("bert", "all", seed=1), adapters[pack_all])


def test_cli(bert_compiled, pack_all, tmp_path, capsys):
    out = tmp_path / "task.onnx_adapter"
    assert main(["export-adapter", "--compiled", str(bert_compiled), str(pack_all), "--out", str(out)]) == 0
    assert out.stat().st_size > 0 and (tmp_path / "task.json").is_file()
    assert "one adapter per run" in capsys.readouterr().out.lower()
    assert main(["export-adapter", "--compiled", str(bert_compiled), str(pack_all), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
