"""Which packs fit which graphs, and what a broken compiled directory or bad input says."""
from __future__ import annotations

import json

import numpy as np
import pytest
from bitfit.runtime import (
    BitFitError,
    CompiledModelError,
    IncompatibleError,
    TaskSession,
    TensorSpec,
    UnknownTaskError,
    check_pack_fits,
    load,
    load_pack,
    read_manifest,
)
from bitfit.runtime.compiled import MANIFEST_FILE, MODEL_FILE, TOKENIZER_FILE
from conftest import write_sealed


def test_pack_from_another_base_is_refused(bert_compiled, pack_other_base, pack_all):
    session = TaskSession(bert_compiled)
    other, ours = load_pack(pack_other_base), load_pack(pack_all)
    assert other.manifest.base_fingerprint != ours.manifest.base_fingerprint
    with pytest.raises(IncompatibleError, match=r"fingerprint .*their frozen weights differ; train the pack on the "
                                                r"compiled model, or compile the pack's base model"):
        session.register(other)
    assert session.tasks == []
    session.register(ours)  # the same graph takes a pack of its own base


def test_fingerprint_ignores_biases_but_not_weights(bert_model, tiny_model):
    """Packs of every bias subset share their base's fingerprint; another base differs."""
    import torch
    from bitfit.encoder.biases import find_biases
    from bitfit.encoder.model import base_fingerprint, load_encoder

    encoder = load_encoder(bert_model)
    fp = base_fingerprint(encoder)
    assert fp == base_fingerprint(load_encoder(bert_model))
    assert fp != base_fingerprint(load_encoder(tiny_model("bert", 1)))
    with torch.no_grad():
        for s in find_biases(encoder, "all"):
            s.parameter.add_(1.0)
    assert base_fingerprint(encoder) == fp
    with torch.no_grad():
        encoder.encoder.layer[1].intermediate.dense.weight[0, 0] += 1e-3
    assert base_fingerprint(encoder) != fp


def test_graph_with_fewer_biases_refuses_an_all_pack(bert_compiled_min, pack_all):
    session = TaskSession(bert_compiled_min)
    assert {b.kind for b in session.manifest.bias_inputs} == {"bq", "bm2"}
    with pytest.raises(IncompatibleError, match=r"does not fit the compiled graph: the graph has no input for biases "
                                                r".*recompile with --biases all \(or include .*bm3"):
        session.register(pack_all)
    with pytest.raises(IncompatibleError, match=r"recompile with --biases"):
        check_pack_fits(session.manifest, load_pack(pack_all))


def test_min_pack_runs_on_min_graph_and_matches_pytorch(bert_model, bert_compiled_min, pack_min, token_inputs,
                                                        torch_logits):
    session = TaskSession(bert_compiled_min)
    pack = load_pack(pack_min)
    task = session.register(pack)
    for batch, length in ((1, 5), (4, 23)):
        inputs = token_inputs(session, batch, length)
        assert np.abs(session.logits(task, inputs) - torch_logits(pack, bert_model, inputs)).max() <= 1e-4


def test_min_pack_runs_on_all_graph_and_matches_pytorch(bert_model, bert_compiled, pack_min, token_inputs,
                                                        torch_logits):
    """Biases the pack did not train keep the graph's defaults, which are the base model's."""
    session = TaskSession(bert_compiled)
    pack = load_pack(pack_min)
    assert len(pack.manifest.biases) < len(session.manifest.bias_inputs)
    task = session.register(pack)
    for batch, length in ((1, 5), (2, 7), (4, 23), (3, 60)):
        inputs = token_inputs(session, batch, length)
        ours, ref = session.logits(task, inputs), torch_logits(pack, bert_model, inputs)
        assert ours.shape == (batch, 2)
        assert np.abs(ours - ref).max() <= 1e-4, (batch, length)


def test_pack_that_does_not_fit_lists_each_problem(bert_compiled, pack_all):
    pack = load_pack(pack_all)
    pack.manifest.max_length = 500
    first = pack.manifest.biases[0]
    pack.manifest.biases[0] = TensorSpec(first.name, (99,), "float32", first.kind)
    manifest = read_manifest(bert_compiled)
    with pytest.raises(IncompatibleError) as info:
        check_pack_fits(manifest, pack.manifest)
    message = str(info.value)
    assert "max_length 500 exceeds the model's 64 positions" in message
    assert f"{pack.manifest.biases[0].name} is float32[99] in the pack but float32[" in message


def test_unknown_task_lists_registered_tasks(bert_compiled, pack_all, pack_min):
    session = load(bert_compiled, [pack_all, pack_min])
    assert len(session.tasks) == 2
    with pytest.raises(UnknownTaskError, match=r"unknown task 'nope': registered tasks are ") as info:
        session.run("nope", ["hello"])
    for name in session.tasks:
        assert name in str(info.value)
    empty = TaskSession(bert_compiled)
    with pytest.raises(UnknownTaskError, match=r"registered tasks are none"):
        empty.logits("nope", {})


def test_duplicate_registration_needs_replace(bert_compiled, pack_all, pack_min):
    session = TaskSession(bert_compiled)
    session.register(pack_all, name="t")
    with pytest.raises(BitFitError, match=r"a task named 't' is already registered: pass replace=True"):
        session.register(pack_min, name="t")
    session.register(pack_min, name="t", replace=True)
    assert session.pack("t").manifest.bias_subset == ["bq", "bm2"]
    session.remove("t")
    assert session.tasks == []
    with pytest.raises(UnknownTaskError):
        session.remove("t")


@pytest.fixture
def session(bert_compiled, pack_all):
    s = TaskSession(bert_compiled)
    s.register(pack_all, name="task")
    return s


def test_bad_token_inputs(session, token_inputs):
    good = token_inputs(session, 2, 6)
    with pytest.raises(BitFitError, match=r"input_ids has shape \(12,\): every token input must be \[batch, sequence\]"):
        session.logits("task", {**good, "input_ids": good["input_ids"].reshape(-1)})
    with pytest.raises(BitFitError, match=r"attention_mask has shape \(2, 5\): every token input must be"):
        session.logits("task", {**good, "attention_mask": good["attention_mask"][:, :5]})
    with pytest.raises(BitFitError, match=r"input_ids has dtype float32: token inputs must be integers"):
        session.logits("task", {**good, "input_ids": good["input_ids"].astype(np.float32)})
    with pytest.raises(BitFitError, match=r"missing token inputs \['token_type_ids'\]: the graph takes"):
        session.hidden_states({k: v for k, v in good.items() if k != "token_type_ids"})
    too_long = token_inputs(session, 1, 65)
    with pytest.raises(BitFitError, match=r"sequence length 65 exceeds the model's 64 positions"):
        session.hidden_states(too_long)
    # int32 is accepted and gives the int64 result
    as_int32 = {k: v.astype(np.int32) for k, v in good.items()}
    assert np.array_equal(session.logits("task", as_int32), session.logits("task", good))


@pytest.mark.parametrize("texts, match", [
    ("a single string", r"texts must be a list of strings, got str"),
    ([], r"texts is empty"),
    (["ok", 3], r"texts\[1\] is int, not a string"),
])
def test_bad_texts(session, texts, match):
    with pytest.raises(BitFitError, match=match):
        session.run("task", texts)


def test_bad_bias_override_is_refused(session, token_inputs):
    inputs = token_inputs(session, 1, 4)
    with pytest.raises(BitFitError, match=r"no bias input layer\.0\.bq of shape \(31,\)"):
        session.hidden_states(inputs, biases={"layer.0.bq": np.zeros(31, np.float32)})
    with pytest.raises(BitFitError, match=r"no bias input layer\.7\.bq"):
        session.hidden_states(inputs, biases={"layer.7.bq": np.zeros(32, np.float32)})


# -- broken compiled directories --------------------------------------------------------------------
def test_modified_model_fails_the_checksum(bert_compiled, copy_dir):
    broken = copy_dir(bert_compiled)
    data = bytearray((broken / MODEL_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (broken / MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(CompiledModelError, match=r"model\.onnx in .* do not match the checksums in manifest\.json: "
                                                 r".*compile again"):
        TaskSession(broken)


def test_replaced_model_fails_the_checksum(bert_compiled, bert_compiled_min, copy_dir):
    """A valid graph, but not the one the manifest describes."""
    broken = copy_dir(bert_compiled)
    (broken / MODEL_FILE).write_bytes((bert_compiled_min / MODEL_FILE).read_bytes())
    with pytest.raises(CompiledModelError, match=r"checksum"):
        TaskSession(broken)
    # skipping the checksum, the manifest/graph input comparison still catches it
    with pytest.raises(CompiledModelError, match=r"has inputs that differ from its manifest .*compile again"):
        TaskSession(broken, check_integrity=False)


def test_garbage_model_without_integrity_check(bert_compiled, copy_dir):
    broken = copy_dir(bert_compiled)
    (broken / MODEL_FILE).write_bytes(b"not an onnx model")
    with pytest.raises(CompiledModelError, match=r"onnxruntime cannot load .*compile again"):
        TaskSession(broken, check_integrity=False)


def test_missing_compiled_directory(tmp_path):
    with pytest.raises(CompiledModelError, match=r"no compiled model at .*run `bitfit compile --model M --out"):
        TaskSession(tmp_path / "absent")


@pytest.mark.parametrize("name", [MODEL_FILE, MANIFEST_FILE, TOKENIZER_FILE])
def test_incomplete_compiled_directory(bert_compiled, copy_dir, name):
    broken = copy_dir(bert_compiled)
    (broken / name).unlink()
    with pytest.raises(CompiledModelError, match=rf"has no {name}: it is not a complete compiled model"):
        TaskSession(broken)


def test_corrupt_or_newer_compiled_manifest(bert_compiled, copy_dir):
    broken = copy_dir(bert_compiled)
    text = (broken / MANIFEST_FILE).read_text()
    (broken / MANIFEST_FILE).write_text(text[:40])
    with pytest.raises(CompiledModelError, match=r"is not valid JSON"):
        TaskSession(broken)
    data = json.loads(text)
    data["format_version"] = 7
    (broken / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(CompiledModelError, match=r"compiled by a newer bitfit \(format 7\): upgrade"):
        TaskSession(broken)
    data["format_version"] = 1
    (broken / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(CompiledModelError, match=r"compiled by an older bitfit \(format 1, without the checksums .*compile"):
        TaskSession(broken)
    data["format_version"] = 2
    del data["bias_inputs"]
    write_sealed(broken / MANIFEST_FILE, data)
    with pytest.raises(CompiledModelError, match=r"is invalid: missing keys bias_inputs: .*compile it again"):
        TaskSession(broken)


# -- issue 24, item 7: provenance a machine other than the trainer's can use ---------------------------------
def test_manifests_name_the_base_by_its_directory_and_keep_the_path_as_a_hint(bert_model, bert_compiled, pack_all):
    """A local base model is recorded by its directory's name (what identifies it elsewhere, with the
    fingerprint); its absolute path on this machine is only base_model_path, which inspect shows."""
    import bitfit
    from bitfit.runtime.pack import model_identity

    for m in (load_pack(pack_all).manifest, read_manifest(bert_compiled)):
        assert m.base_model == bert_model.name and "/" not in m.base_model
        assert m.base_model_path == str(bert_model.resolve()) and m.base_model_source() == m.base_model_path
    assert load_pack(pack_all).manifest.tokenizer == bert_model.name
    for path in (pack_all, bert_compiled):
        assert f"base model     {bert_model.name} (bert" in bitfit.inspect(path)
        assert f"base path      {bert_model.resolve()} (where it was" in bitfit.inspect(path)
    assert model_identity("sentence-transformers/all-MiniLM-L6-v2") == ("sentence-transformers/all-MiniLM-L6-v2", "")


def _reseal(directory, drop: tuple[str, ...] = (), **changes) -> None:
    data = json.loads((directory / MANIFEST_FILE).read_text())
    write_sealed(directory / MANIFEST_FILE, {**{k: v for k, v in data.items() if k not in drop}, **changes})


def test_a_base_directory_not_on_this_machine_asks_for_the_model(bert_model, pack_all, copy_dir):
    from bitfit.encoder.model import model_from_pack

    moved = copy_dir(pack_all, "moved")
    _reseal(moved, base_model_path="/elsewhere/on/the/trainer/bert")
    pack = load_pack(moved)
    with pytest.raises(IncompatibleError, match=r"was made from the base model '[^']+' in /elsewhere/on/the/trainer/"
                                                r"bert, a directory that is not on this machine: give the base model "
                                                r"explicitly \(--model\); its fingerprint must start with [0-9a-f]{12}"):
        model_from_pack(pack)
    model_from_pack(pack, bert_model)  # given, and checked by its fingerprint


def test_a_manifest_written_before_base_model_path_still_loads(bert_compiled, pack_all, copy_dir):
    """Old packs and compiled directories: base_model an absolute path, no base_model_path. They load, keep their
    JSON (so a pack keeps its digest), and that path still locates the model."""
    old_pack = copy_dir(pack_all, "old-pack")
    path = load_pack(pack_all).manifest.base_model_path
    _reseal(old_pack, drop=("base_model_path",), base_model=path)
    m = load_pack(old_pack).manifest
    assert "base_model_path" not in m.to_json() and m.base_model_source() == path
    old_compiled = copy_dir(bert_compiled, "old-compiled")
    _reseal(old_compiled, drop=("base_model_path",), base_model=path)
    assert read_manifest(old_compiled).base_model_source() == path
    assert "base_model_path" not in read_manifest(old_compiled).to_json()
    TaskSession(old_compiled).register(old_pack)
