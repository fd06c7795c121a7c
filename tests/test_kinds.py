"""Task kinds as data (runtime/kinds.py): the registry is complete where other parts key on it, and a new
kind is one entry plus its decoder: packs of it validate, register, run through the session, `predict`
and the CLI without another edit."""
from __future__ import annotations

import json

import numpy as np
import pytest
from bitfit.runtime import (
    KINDS,
    TaskKind,
    TaskPack,
    TaskSession,
    WrongCallError,
    load_pack,
)
from bitfit.runtime.calls import SEQUENCE
from bitfit.runtime.errors import PackError
from bitfit.runtime.results import Predictions


def test_every_kind_is_served_and_trainable():
    from bitfit.training.objectives import OBJECTIVES, objective, trainable

    from bitfit.serve.app import BODIES

    assert set(trainable()) == set(KINDS)  # every kind names an objective that exists
    assert all(objective(name) is OBJECTIVES[k.objective] for name, k in KINDS.items())
    for k in KINDS.values():
        assert k.route in BODIES
        assert hasattr(TaskSession, k.call)
        assert (k.decode is not None) == (not k.token_level)  # sequence kinds decode [n, k] logits


def sigmoid_labels(call, logits) -> Predictions:
    """Multi-label: an independent probability per label; the labels over one half are the prediction."""
    scores = 1 / (1 + np.exp(-logits))
    labels = [",".join(n for n, s in zip(call.labels, row) if s > 0.5) for row in scores]
    return Predictions(call.task, call.kind, list(call.labels), logits, scores, labels, call.digest)


MULTI = TaskKind("multi-label", SEQUENCE, "names", "accuracy", False,
                 lambda record, text: f"[{record['label']}]\t{text}", decode=sigmoid_labels)


@pytest.fixture
def multi_label(monkeypatch, pack_all):
    monkeypatch.setitem(KINDS, MULTI.name, MULTI)
    pack = load_pack(pack_all)
    manifest = type(pack.manifest).from_json({**pack.manifest.to_json(), "task_kind": MULTI.name, "task": "multi"})
    return TaskPack(manifest, pack.tensors)


def test_a_new_kind_is_one_entry(multi_label, bert_compiled, tmp_path, capsys):
    from bitfit.runtime import save_pack

    from bitfit.cli import main

    session = TaskSession(bert_compiled)
    session.register(multi_label)
    texts = ["a good fun movie", "awful boring plot"]
    out = session.predict("multi", texts)
    expect = 1 / (1 + np.exp(-session.logits("multi", session.encode(texts, max_length=128))))
    np.testing.assert_allclose(out.scores, expect, rtol=0, atol=1e-6)
    mixed = session.run_mixed([("multi", t) for t in texts])
    assert [r["label"] for r in mixed] == out.labels
    with pytest.raises(WrongCallError, match=r"'multi' is a multi-label task: call run\(\) for it, not run_tokens"):
        session.run_tokens("multi", texts)

    path = save_pack(multi_label, tmp_path / "multi")
    assert main(["predict", "--compiled", str(bert_compiled), "--pack", str(path), "--text", texts[0]]) == 0
    assert capsys.readouterr().out.startswith(f"[{out.labels[0]}]\t{texts[0]}")
    assert main(["predict", "--compiled", str(bert_compiled), "--pack", str(path), "--text", texts[0], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["scores"].keys() == set(multi_label.manifest.labels)


def test_an_unregistered_kind_is_refused(pack_all):
    pack = load_pack(pack_all)
    with pytest.raises(PackError, match=r"task_kind must be one of classification, regression, .*; got 'multi-label'"):
        type(pack.manifest).from_json({**pack.manifest.to_json(), "task_kind": "multi-label"})


# -- call shapes: what the server and v2 will ask instead of switching on kinds --------------------------------
def test_call_shapes_say_what_the_server_tables_say():
    """The call shapes hold the /v1 bodies and v2 signatures as data; until the server reads them (issue 24,
    server side), they must agree with its own tables, so the switch changes no answer."""
    from types import SimpleNamespace

    from bitfit.runtime.calls import SHAPES, by_route

    from bitfit.serve import v2
    from bitfit.serve.app import BODIES

    # the wire contract, pinned: what /v1 takes and what a v2 model declares (tritonclient users rely on it)
    assert {route: (b.fields, b.required, b.answer) for route, b in BODIES.items()} == {
        "/v1/predict": (("task", "texts", "text_pairs"), ("task", "texts"), "predictions"),
        "/v1/tokens": (("task", "texts"), ("task", "texts"), "predictions"),
        "/v1/answer": (("task", "questions", "contexts"), ("task", "questions", "contexts"), "answers")}
    assert set(BODIES) == set(by_route())
    sequence = ["logits FP32 (-1, 3)", "label BYTES (-1,)", "scores FP32 (-1, 3)"]
    expected = {("classification", False): (["text BYTES (-1,)"], sequence),
                ("classification", True): (["text BYTES (-1,)", "text_pair BYTES (-1,)"], sequence),
                ("regression", False): (["text BYTES (-1,)"], ["logits FP32 (-1, 1)", "value FP32 (-1,)"]),
                ("token-classification", False): (["text BYTES (-1,)"], ["record BYTES (-1,)"]),
                ("question-answering", False): (["question BYTES (-1,)", "context BYTES (-1,)"],
                                                ["answer BYTES (-1,)", "record BYTES (-1,)"])}
    for k in KINDS.values():
        assert k.shape in SHAPES.values() and k.call in k.shape.calls and hasattr(TaskSession, k.call)
        labels = list(k.labels) if isinstance(k.labels, tuple) else [] if k.labels == "value" else ["a", "b", "c"]
        for pair in (False, True):
            manifest = SimpleNamespace(text_pair=pair, labels=labels)  # all v2's signature reads of a manifest
            got = tuple([f"{t.name} {t.datatype} {tuple(t.shape)}" for t in ts]
                        for ts in (v2.inputs_of(k, manifest), v2.outputs_of(k, manifest)))
            if (k.name, pair) in expected:
                assert got == expected[(k.name, pair)], (k.name, pair)


def test_check_call_binds_the_task_for_its_decoder(bert_compiled, pack_all):
    """Decoders get a Bound handle (pack fields, digest, encoder, forward), not the session."""
    from bitfit.runtime.decode import Bound

    session = TaskSession(bert_compiled)
    session.register(pack_all, name="s")
    call = session.check_call("run", "s", ["a film"])
    assert isinstance(call, Bound) and call.task == "s" and call.digest == session.digest("s")
    assert call.labels == tuple(session.pack("s").manifest.labels) and call.encoder is session.encoder
    inputs = session.encode(["a film"], max_length=call.max_length)
    np.testing.assert_array_equal(call.forward(inputs), session.logits("s", inputs))
    with pytest.raises(WrongCallError, match=r"call run\(\) for it, not answer\(\)"):
        session.check_call("answer", "s", ["q"], ["c"])
