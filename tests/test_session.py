"""Serving many tasks from one onnxruntime session: swapping packs is binding other bias values."""
from __future__ import annotations

import numpy as np
import pytest
from bitfit.runtime import TaskPack, TaskSession, load, load_pack
from conftest import ATOL


@pytest.fixture
def two_tasks(bert_compiled, pack_all, trained_pack):
    """Two packs of the same base and bias subset that differ in their biases (trained on other seeds)."""
    session = TaskSession(bert_compiled)
    a = session.register(pack_all, name="A")
    b = session.register(trained_pack("bert", "all", seed=5, epochs=1), name="B")
    return session, a, b


def test_different_packs_give_different_outputs(two_tasks, token_inputs):
    session, a, b = two_tasks
    pa, pb = session.pack(a), session.pack(b)
    assert any(not np.array_equal(pa.tensors[k], pb.tensors[k]) for k in pa.biases)
    inputs = token_inputs(session, 3, 12)
    assert np.abs(session.hidden_states(inputs, a) - session.hidden_states(inputs, b)).max() > 1e-5
    assert np.abs(session.logits(a, inputs) - session.logits(b, inputs)).max() > 1e-5


def test_same_head_other_biases_change_the_logits(bert_compiled, pack_all, token_inputs):
    """Only the biases differ (same head): any change in the logits comes from the bias inputs."""
    pack = load_pack(pack_all)
    shifted = TaskPack(pack.manifest, {k: (v + 0.2 if k in pack.biases else v) for k, v in pack.tensors.items()})
    session = TaskSession(bert_compiled)
    session.register(pack, name="A")
    session.register(shifted, name="A-shifted")
    inputs = token_inputs(session, 2, 8)
    assert np.abs(session.logits("A", inputs) - session.logits("A-shifted", inputs)).max() > 1e-3


def test_alternating_tasks_reproduce_results_exactly(two_tasks, token_inputs):
    session, a, b = two_tasks
    inputs = token_inputs(session, 4, 19)
    first_a = session.logits(a, inputs)
    first_b = session.logits(b, inputs)
    again_a = session.logits(a, inputs)
    again_b = session.logits(b, inputs)
    assert np.array_equal(first_a, again_a)
    assert np.array_equal(first_b, again_b)
    assert not np.array_equal(first_a, first_b)


def test_the_session_is_never_reloaded(two_tasks, token_inputs, pack_min):
    session, a, b = two_tasks
    ort_session = session.session
    before = id(ort_session)
    inputs = token_inputs(session, 2, 6)
    for task in (a, b, a, None, b):
        session.hidden_states(inputs, task)
    session.register(pack_min, name="C")
    session.run("C", ["a new task"])
    session.remove("C")
    assert session.session is ort_session and id(session.session) == before


def test_no_task_is_the_base_encoder(bert_model, two_tasks, token_inputs, torch_hidden):
    session, a, b = two_tasks
    for batch, length in ((1, 5), (3, 30)):
        inputs = token_inputs(session, batch, length)
        ref = torch_hidden(bert_model, inputs)
        assert np.abs(session.hidden_states(inputs, None) - ref).max() <= ATOL
        # and a task run in between leaves nothing behind
        session.hidden_states(inputs, a)
        assert np.abs(session.hidden_states(inputs) - ref).max() <= ATOL


def test_subset_pack_after_full_pack_uses_base_values(bert_model, bert_compiled, pack_all, pack_min, token_inputs,
                                                      torch_logits):
    """After a pack that fed every bias, a bq,bm2 pack must see the base's values for the others, not the
    previous pack's."""
    session = TaskSession(bert_compiled)
    session.register(pack_all, name="all")
    session.register(pack_min, name="min")
    inputs = token_inputs(session, 3, 14)
    fresh = TaskSession(bert_compiled)
    fresh.register(pack_min, name="min")
    expected = fresh.logits("min", inputs)
    session.logits("all", inputs)
    assert np.array_equal(session.logits("min", inputs), expected)
    assert np.abs(expected - torch_logits(load_pack(pack_min), bert_model, inputs)).max() <= ATOL


def test_run_batches_give_the_same_predictions(bert_compiled, pack_all):
    session = load(bert_compiled, [pack_all])
    task = session.tasks[0]
    texts = [f"the movie was {w}" for w in ("good", "bad", "great fun", "awful", "ok", "boring")]
    one = session.run(task, texts, batch_size=64)
    many = session.run(task, texts, batch_size=2)
    assert one.labels == many.labels
    np.testing.assert_allclose(one.logits, many.logits, atol=ATOL)
    assert one.logits.shape == (6, 2) and one.scores.shape == (6, 2)
    np.testing.assert_allclose(one.scores.sum(1), 1.0, rtol=1e-6)
    assert one.labels == [session.pack(task).manifest.labels[i] for i in one.logits.argmax(1)]
    records = one.records()
    assert [set(r) for r in records] == [{"label", "scores", "logits"}] * 6
    assert set(records[0]["scores"]) == set(session.pack(task).manifest.labels)


def test_registering_from_a_path_and_an_object_is_the_same(bert_compiled, pack_all, token_inputs):
    session = TaskSession(bert_compiled, threads=1)
    session.register(pack_all, name="path")
    session.register(load_pack(pack_all), name="object")
    inputs = token_inputs(session, 2, 5)
    assert np.array_equal(session.logits("path", inputs), session.logits("object", inputs))


def test_device_option(bert_compiled):
    import onnxruntime as ort
    from bitfit.runtime import BitFitError, TaskSession

    assert TaskSession(bert_compiled, device="auto").device == (
        "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu")
    with pytest.raises(BitFitError, match="unknown device 'tpu': use cpu, cuda or auto"):
        TaskSession(bert_compiled, device="tpu")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(BitFitError, match="install onnxruntime-gpu"):
            TaskSession(bert_compiled, device="cuda")


def test_results_carry_the_digest_of_the_pack_that_ran(bert_compiled, pack_all, trained_pack):
    """A server reads which version answered from the result itself (one read, taken with the run): the digest
    of the pack registered when the call was bound, not of one registered since."""
    session = TaskSession(bert_compiled)
    session.register(pack_all, name="A")
    first = session.digest("A")
    assert session.run("A", ["a good film"]).digest == first
    assert session.predict("A", ["a good film"]).digest == first
    other = trained_pack("bert", "all", seed=5, epochs=1)
    session.register(other, name="A", replace=True)
    assert session.digest("A") != first
    assert session.run("A", ["a good film"]).digest == session.digest("A")
    # a call bound before the swap decodes with the pack it was bound to
    call = session.check_call("run", "A", ["x"])
    session.register(pack_all, name="A", replace=True)
    assert call.digest != session.digest("A") == first
