"""Training (training.train): only the chosen biases and the head move; packs are deterministic."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from bitfit.encoder.biases import find_biases
from bitfit.encoder.model import load_encoder, model_from_pack
from bitfit.runtime import TaskSession, load_pack
from bitfit.runtime.errors import BitFitError, PackError
from bitfit.training.train import train
from conftest import QUIET

train_module = importlib.import_module("bitfit.training.train")


@pytest.fixture(scope="module")
def recorded_min(bert_model, data_files):
    """Train bq,bm2 in memory and keep the trained torch model (captured as it is built)."""
    built = []

    class Recording(train_module.BitFitModel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    mp = pytest.MonkeyPatch()
    mp.setattr(train_module, "BitFitModel", Recording)
    try:
        result = train(bert_model, data_files["sentiment"], None, biases="bq,bm2", epochs=2, lr=5e-3, **QUIET)
    finally:
        mp.undo()
    assert len(built) == 1
    return result, built[0]


def test_only_chosen_biases_and_head_change(bert_model, recorded_min):
    result, net = recorded_min
    base = dict(load_encoder(bert_model).named_parameters())
    chosen = {s.source for s in find_biases(net.encoder, "bq,bm2")}
    assert len(chosen) == 4
    trained = dict(net.encoder.named_parameters())
    assert trained.keys() == base.keys()
    for name, p in trained.items():
        if name in chosen:
            assert not torch.allclose(p, base[name]), f"{name} was chosen but did not train"
        else:
            assert torch.equal(p, base[name]), f"{name} is frozen but changed"
    # the head trained too (it starts random, so compare the pack with the live model it came from)
    assert np.array_equal(result.pack.tensors["head.weight"], net.head.weight.detach().numpy())


def test_pack_holds_exactly_the_chosen_biases(bert_model, recorded_min):
    result, net = recorded_min
    m = result.pack.manifest
    assert m.bias_subset == ["bq", "bm2"]
    assert {b.kind for b in m.biases} == {"bq", "bm2"}
    assert set(result.pack.tensors) == {b.name for b in m.biases} | {"head.weight", "head.bias"}
    base = {s.name: s.parameter.detach().numpy() for s in find_biases(load_encoder(bert_model), "all")}
    for spec in m.biases:
        assert spec.source and spec.layer is not None
        assert not np.allclose(result.pack.tensors[spec.name], base[spec.name]), spec.name
        # and the pack holds what the model holds
        assert np.array_equal(result.pack.tensors[spec.name], net.encoder.get_parameter(spec.source).detach().numpy())
    n_bias = sum(int(np.prod(b.shape)) for b in m.biases)
    assert m.trainable_params == n_bias + 32 * 2 + 2
    assert m.base_params == sum(p.numel() for p in load_encoder(bert_model).parameters())


def test_requires_grad_only_on_chosen(bert_model):
    encoder = load_encoder(bert_model)
    net = train_module.BitFitModel(encoder, 2)
    slots = find_biases(encoder, "bq,bm2")
    params = train_module.mark_trainable(net, slots)
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in params}
    assert trainable == {id(s.parameter) for s in slots} | {id(net.head.weight), id(net.head.bias)}


def test_same_seed_gives_identical_pack(bert_model, data_files):
    a = train(bert_model, data_files["sentiment"], None, epochs=1, seed=3, **QUIET).pack
    b = train(bert_model, data_files["sentiment"], None, epochs=1, seed=3, **QUIET).pack
    c = train(bert_model, data_files["sentiment"], None, epochs=1, seed=4, **QUIET).pack
    assert a.tensors.keys() == b.tensors.keys()
    for k in a.tensors:
        assert np.array_equal(a.tensors[k], b.tensors[k]), k
    assert a.manifest.to_json() == b.manifest.to_json()
    assert not all(np.array_equal(a.tensors[k], c.tensors[k]) for k in a.tensors)


def test_same_seed_gives_identical_pack_files(bert_model, data_files, tmp_path):
    for name in ("a", "b"):
        train(bert_model, data_files["sentiment"], tmp_path / name, epochs=1, seed=3, biases="bq,bm2", **QUIET)
    for file in ("manifest.json", "tensors.safetensors"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file


def test_trained_pack_matches_pytorch_dev_metrics(bert_model, pack_all, data_files):
    """The pack saves the best epoch; loading it back into PyTorch gives the recorded dev metric."""
    from bitfit.encoder.model import load_tokenizer
    from bitfit.training.data import load_task_data
    from bitfit.training.metrics import evaluate
    from bitfit.training.sequence import predict

    pack = load_pack(pack_all)
    m = pack.manifest
    task = load_task_data(data_files["sentiment"])
    model = model_from_pack(pack, base=bert_model)
    out = predict(model, load_tokenizer(bert_model), task.dev, m.max_length)
    assert evaluate("accuracy", out, task.targets(task.dev)) == pytest.approx(m.metrics["dev"])
    assert m.metrics["best_epoch"] in (1, 2) and len(m.metrics["history"]) == 2


def test_regression_data_gives_a_one_output_regression_pack(bert_compiled, pack_scores):
    pack = load_pack(pack_scores)
    m = pack.manifest
    assert m.task_kind == "regression"
    assert m.labels == [] and m.num_outputs == 1
    assert pack.tensors["head.weight"].shape == (1, 32) and pack.tensors["head.bias"].shape == (1,)
    assert m.metrics["metric"] == "spearman" and "mse" in m.metrics["dev"]
    session = TaskSession(bert_compiled)
    task = session.register(pack)
    out = session.run(task, ["good fun film", "awful boring plot", "ok"])
    assert out.logits.shape == (3, 1) and out.scores.shape == (3, 1)
    assert out.labels == [float(v) for v in out.logits[:, 0]]
    assert [set(r["scores"]) for r in out.records()] == [{"value"}] * 3


def test_sentence_pair_data_gives_a_pair_pack(bert_compiled, pack_pairs):
    pack = load_pack(pack_pairs)
    assert pack.manifest.text_pair is True
    assert pack.manifest.labels == ["contradict", "entail", "neutral"]
    session = TaskSession(bert_compiled)
    task = session.register(pack)
    with pytest.raises(BitFitError, match=r"takes sentence pairs: give text_pairs, one per text"):
        session.run(task, ["who is it", "a fun movie"])
    out = session.run(task, ["who is it", "a fun movie"], ["it is me", "not a fun movie"])
    assert out.logits.shape == (2, 3)
    assert set(out.labels) <= set(pack.manifest.labels)
    np.testing.assert_allclose(out.scores.sum(axis=1), 1.0, rtol=1e-6)
    with pytest.raises(BitFitError, match=r"text_pairs has 1 items but texts has 2: give one pair per text"):
        session.run(task, ["a", "b"], ["c"])


def test_single_sentence_task_refuses_pairs(bert_compiled, pack_all):
    session = TaskSession(bert_compiled)
    task = session.register(pack_all)
    with pytest.raises(BitFitError, match=r"takes single sentences: do not give text_pairs"):
        session.run(task, ["a"], ["b"])
    assert load_pack(pack_all).manifest.text_pair is False


def test_pair_pack_matches_pytorch_on_pairs(bert_model, bert_compiled, pack_pairs):
    from bitfit.encoder.model import load_tokenizer
    from bitfit.training.data import Example
    from bitfit.training.sequence import encode_batch

    pack = load_pack(pack_pairs)
    session = TaskSession(bert_compiled)
    task = session.register(pack)
    first, second = ["who is it", "the film was " * 20, "ok"], ["it is me", "not a fun movie", "a " * 70]
    ours = session.run(task, first, second).logits
    batch = [Example(a, "entail", b) for a, b in zip(first, second)]
    inputs = encode_batch(load_tokenizer(bert_model), batch, pack.manifest.max_length)
    with torch.no_grad():
        ref = model_from_pack(pack, base=bert_model)(**inputs).numpy()
    assert np.abs(ours - ref).max() <= 1e-4


@pytest.mark.parametrize("rows, match", [
    ('{"text": "a", "tag": "x"}\n', r"lacks the columns \['label'\]"),
    ("", r"holds no rows"),
])
def test_data_file_errors_surface_from_train(bert_model, tmp_path, rows, match):
    path = tmp_path / "d.jsonl"
    path.write_text(rows)
    with pytest.raises(BitFitError, match=match):
        train(bert_model, path, tmp_path / "out", epochs=1, **QUIET)
    assert not (tmp_path / "out").exists()


def test_train_rejects_unknown_extension_and_missing_file(bert_model, tmp_path):
    bad = tmp_path / "d.xlsx"
    bad.write_text("x")
    with pytest.raises(BitFitError, match=r"unknown data format '\.xlsx'"):
        train(bert_model, bad, None, epochs=1, **QUIET)
    with pytest.raises(BitFitError, match=r"no data file at"):
        train(bert_model, tmp_path / "nope.csv", None, epochs=1, **QUIET)


def test_train_rejects_unknown_bias_kind(bert_model, data_files):
    with pytest.raises(BitFitError, match=r"unknown bias kinds \['bz'\]"):
        train(bert_model, data_files["sentiment"], None, biases="bq,bz", epochs=1, **QUIET)


@pytest.mark.parametrize("kwargs, match", [
    ({"epochs": 0}, r"need epochs >= 1"),
    ({"lr": 0.0}, r"lr > 0"),
    ({"pooling": "max"}, r"pooling must be auto, mean, cls, pooler, none; got 'max'"),
])
def test_train_rejects_bad_hyperparameters(bert_model, data_files, kwargs, match):
    with pytest.raises(BitFitError, match=match):
        train(bert_model, data_files["sentiment"], None, **{"epochs": 1, **kwargs}, **QUIET)


def test_train_refuses_to_overwrite_without_overwrite(bert_model, data_files, tmp_path):
    out = tmp_path / "pack"
    train(bert_model, data_files["sentiment"], out, epochs=1, task_name="first", **QUIET)
    before = (out / "manifest.json").read_text()
    with pytest.raises(PackError, match=r"already exists: choose another output path \(--out\), or pass --overwrite"):
        train(bert_model, data_files["sentiment"], out, epochs=1, task_name="second", **QUIET)
    assert (out / "manifest.json").read_text() == before
    train(bert_model, data_files["sentiment"], out, epochs=1, task_name="second", overwrite=True, **QUIET)
    assert load_pack(out).manifest.task == "second"


def test_cls_pooling_pack_matches_pytorch(bert_model, bert_compiled, trained_pack, token_inputs, torch_logits):
    pack = load_pack(trained_pack("bert", "all", pooling="cls", epochs=1))
    assert pack.manifest.pooling == "cls"
    session = TaskSession(bert_compiled)
    task = session.register(pack)
    inputs = token_inputs(session, 3, 11)
    assert np.abs(session.logits(task, inputs) - torch_logits(pack, bert_model, inputs)).max() <= 1e-4


# -- issue 23: a max_length that cannot hold a token, and task names, refused before any model is loaded ----
@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if training reaches the model: the refusal must come first."""
    monkeypatch.setattr(train_module, "load_encoder", lambda *a, **k: pytest.fail("the model was loaded"))


@pytest.mark.parametrize("data, max_length, least, what", [
    ("sentiment", 1, 3, "the text"),  # [CLS] a [SEP]
    ("sentiment", 2, 3, "the text"),
    ("pairs", 4, 5, "each text"),  # [CLS] a [SEP] b [SEP]
])
def test_a_max_length_without_room_for_a_token_is_refused(bert_model, data_files, no_model, data, max_length,
                                                          least, what):
    with pytest.raises(BitFitError, match=rf"max_length {max_length} cannot hold the tokenizer's special tokens and "
                                          rf"one token of {what}: give --max-length {least} or more"):
        train(bert_model, data_files[data], None, epochs=1, max_length=max_length, **QUIET)


def test_the_shortest_max_length_that_holds_a_token_trains(bert_model, data_files):
    result = train(bert_model, data_files["pairs"], None, epochs=1, max_length=5, train_size=20, **QUIET)
    assert result.pack.manifest.max_length == 5 and result.pack.manifest.text_pair


@pytest.mark.parametrize("name", ["a/b", "..", ".hidden", "a b", "x" * 65, "caf\u00e9", "-lead", ""])
def test_a_task_name_outside_the_alphabet_is_refused(bert_model, data_files, no_model, name):
    with pytest.raises(BitFitError, match=r"is not 1 to 64 letters, digits, '\.', '_' or '-', starting with a letter "
                                          r"or digit .*: pass another --name"):
        train(bert_model, data_files["sentiment"], None, epochs=1, task_name=name, **QUIET)


def test_a_data_file_whose_name_is_no_task_name_needs_a_name(bert_model, data_files, tmp_path, no_model):
    data = tmp_path / "my data.jsonl"
    data.write_bytes(data_files["sentiment"].read_bytes())
    with pytest.raises(BitFitError, match=r"task name 'my data' is not .*: name the task with --name"):
        train(bert_model, data, None, epochs=1, **QUIET)
