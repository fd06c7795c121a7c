"""Compile + parity: the runtime's logits equal PyTorch's (fp32, atol 1e-4) on every architecture and on
shapes other than the export shape (2 x 7), with padding; the graph's inputs are what the manifest says."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch
from bitfit.encoder.biases import find_biases
from bitfit.encoder.model import load_encoder, load_tokenizer, model_from_pack
from bitfit.runtime import TaskSession, load_pack
from bitfit.runtime.compiled import MODEL_FILE
from conftest import ATOL, perturbed

KINDS = ("bert", "roberta", "distilbert", "mpnet", "electra")
SHAPES = ((1, 5), (2, 7), (4, 23), (3, 60), (2, 64))


@pytest.fixture(scope="module", params=KINDS)
def arch(request, tiny_model, compiled_dir, trained_pack):
    kind = request.param
    return kind, tiny_model(kind), compiled_dir(kind), load_pack(trained_pack(kind, "all", epochs=1))


def test_logits_match_pytorch_on_many_shapes(arch, token_inputs):
    kind, model_dir, compiled, pack = arch
    session = TaskSession(compiled)
    noisy = perturbed(pack, 0.3)
    session.register(pack, name="trained")
    session.register(noisy, name="noisy")
    model, noisy_model = model_from_pack(pack, base=model_dir), model_from_pack(noisy, base=model_dir)
    worst = 0.0
    for batch, length in SHAPES:
        inputs = token_inputs(session, batch, length)
        if batch > 1:
            assert inputs["attention_mask"].min() == 0  # padded rows are in the batch
        feeds = {k: torch.from_numpy(v) for k, v in inputs.items()}
        for name, ref_model in (("trained", model), ("noisy", noisy_model)):
            ours = session.logits(name, inputs)
            with torch.no_grad():
                ref = ref_model(**feeds).numpy()
            assert ours.shape == ref.shape == (batch, 2)
            diff = float(np.abs(ours - ref).max())
            assert diff <= ATOL, f"{kind} {name} {batch}x{length}: max |dlogit| {diff:.2e}"
            worst = max(worst, diff)
    # the noisy pack must actually change the outputs, or the comparison above proves little
    inputs = token_inputs(session, 3, 17)
    assert np.abs(session.logits("noisy", inputs) - session.logits("trained", inputs)).max() > 100 * ATOL


def test_hidden_states_match_pytorch_including_padding_positions(arch, token_inputs, torch_hidden):
    kind, model_dir, compiled, pack = arch
    session = TaskSession(compiled)
    session.register(perturbed(pack, 0.5, seed=1), name="noisy")
    biases = session.pack("noisy").biases
    for batch, length in SHAPES:
        inputs = token_inputs(session, batch, length, seed=7)
        ours = session.hidden_states(inputs, "noisy")
        ref = torch_hidden(model_dir, inputs, biases)
        assert ours.shape == ref.shape == (batch, length, 32)
        assert np.abs(ours - ref).max() <= ATOL, f"{kind} {batch}x{length}"


def test_run_on_texts_matches_pytorch_with_transformers_tokenization(arch):
    """The whole path: the runtime's own tokenization and head, against transformers + torch."""
    kind, model_dir, compiled, pack = arch
    session = TaskSession(compiled)
    noisy = perturbed(pack, 0.3, seed=2)
    session.register(noisy, name="noisy")
    texts = ["a good movie", "What a boring, awful plot!", "the " * 80, "Who won the prize? Call now.", "ok"]
    out = session.run("noisy", texts, batch_size=2)  # several batches of different padded lengths
    enc = load_tokenizer(model_dir)(texts, padding=True, truncation=True, max_length=pack.manifest.max_length,
                                    return_tensors="pt", return_token_type_ids=True)
    model = model_from_pack(noisy, base=model_dir)
    kwargs = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        ref = model(**kwargs).numpy()
    assert np.abs(out.logits - ref).max() <= ATOL
    assert out.labels == [pack.manifest.labels[i] for i in ref.argmax(-1)]
    ref_probs = np.exp(ref) / np.exp(ref).sum(-1, keepdims=True)
    assert np.abs(out.scores - ref_probs).max() <= ATOL


def test_graph_inputs_match_the_manifest(arch):
    kind, model_dir, compiled, pack = arch
    session = TaskSession(compiled)
    m = session.manifest
    encoder = load_encoder(model_dir)
    slots = find_biases(encoder, "all")
    assert [b.name for b in m.bias_inputs] == [s.name for s in slots]
    assert {b.source for b in m.bias_inputs} == {s.source for s in slots}
    expected_tokens = ["input_ids", "attention_mask"] + (["token_type_ids"] if kind in ("bert", "electra") else [])
    assert m.token_inputs == expected_tokens

    required = {i.name: i for i in session.session.get_inputs()}
    overridable = {i.name: i for i in session.session.get_overridable_initializers()}
    assert set(required) == set(expected_tokens)  # biases are not required: they have defaults
    head = {h.name for h in m.head_inputs}  # the in-graph head's optional inputs (tests/test_head.py)
    assert set(overridable) == {b.name for b in m.bias_inputs} | head
    for name, i in required.items():
        assert i.type == "tensor(int64)"
        assert len(i.shape) == 2 and all(isinstance(d, str) for d in i.shape), f"{name} has fixed axes {i.shape}"
    for b in m.bias_inputs:
        assert overridable[b.name].type == "tensor(float)"
        assert tuple(overridable[b.name].shape) == b.shape

    # each default is the base model's bias value
    graph = ir.load(compiled / MODEL_FILE).graph
    defaults = {v.name: v.const_value.numpy() for v in graph.inputs if v.const_value is not None and v.name not in head}
    assert set(defaults) == {s.name for s in slots}
    for s in slots:
        assert np.array_equal(defaults[s.name], s.parameter.detach().numpy()), s.name
    assert all(v.uses() for v in graph.inputs)  # every input is consumed by some node


def test_dynamic_axes_run_any_shape(arch, token_inputs):
    kind, model_dir, compiled, pack = arch
    session = TaskSession(compiled)
    shapes = {}
    for batch, length in ((1, 3), (5, 41)):
        out = session.hidden_states(token_inputs(session, batch, length))
        shapes[batch, length] = out.shape
    assert shapes == {(1, 3): (1, 3, 32), (5, 41): (5, 41, 32)}


def test_overriding_one_bias_input_matches_pytorch(arch, token_inputs, torch_hidden):
    """A bias input is overridable: feeding a value changes the output exactly as in PyTorch."""
    kind, model_dir, compiled, pack = arch
    session = TaskSession(compiled)
    inputs = token_inputs(session, 2, 9)
    base = session.hidden_states(inputs)
    spec = next(b for b in session.manifest.bias_inputs if b.name == "layer.1.bm2")
    value = np.random.default_rng(3).normal(0, 1, spec.shape).astype(np.float32)
    ours = session.hidden_states(inputs, biases={spec.name: value})
    assert np.abs(ours - base).max() > 1e-2
    assert np.abs(ours - torch_hidden(model_dir, inputs, {spec.name: value})).max() <= ATOL
