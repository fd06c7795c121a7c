"""The fused-kernel graph (compiler.fuse): onnxruntime's fused ops AND every bias a live input.

Built once per module on tiny BERT (hidden 32, 2 heads, 2 layers). Parity is checked against PyTorch
with task biases that differ from the base, on padded batches of two shapes; every slot is checked to
be wired to its own input, and the graph is served through TaskSession unchanged.
"""
from __future__ import annotations

import shutil

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from bitfit.compiler.fuse import (
    LiftPlaceholderBiasesPass,
    NoBakedBiasPass,
    export_fused,
    make_placeholders,
)
from bitfit.compiler.passes import CheckBiasInputsPass
from bitfit.encoder.biases import find_biases
from bitfit.encoder.model import load_encoder, uses_token_types
from bitfit.runtime.compiled import MODEL_FILE, read_manifest
from bitfit.runtime.errors import BitFitError
from bitfit.runtime.pack import load_pack
from bitfit.runtime.session import TaskSession
from conftest import ATOL, make_inputs, reseal_compiled
from onnx_ir.passes import PostconditionError

LAYERS = 2
SHAPES = [(3, 9), (2, 16)]  # padded batches (make_inputs pads every row but the first)


class Fused:
    """A fused tiny-BERT graph, its session, and a torch encoder of the same base to compare with."""

    def __init__(self, model_dir, path, kinds="all"):
        self.model_dir = model_dir
        self.path = path
        self.encoder = load_encoder(model_dir, attn_implementation="eager")
        self.slots = find_biases(self.encoder, kinds)
        self.token_inputs = ["input_ids", "attention_mask"] + (
            ["token_type_ids"] if uses_token_types(self.encoder) else []
        )
        self.base = {s.name: s.parameter.detach().numpy().copy() for s in self.slots}
        self.counts = export_fused(self.encoder, self.slots, self.token_inputs, path, 17)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # bias inputs are initializers on purpose
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.vocab = self.encoder.config.vocab_size

    def inputs(self, batch, length, seed=0):
        return make_inputs(batch, length, self.token_inputs, self.vocab, 0, seed)

    def run(self, inputs, biases=None):
        return self.session.run(None, {**inputs, **(biases or {})})[0]

    def torch(self, inputs, biases=None):
        """last_hidden_state of the torch encoder with `biases` loaded over the base (restored after)."""
        slots = {s.name: s for s in find_biases(self.encoder, "all")}
        saved = {k: slots[k].parameter.detach().clone() for k in biases or {}}
        try:
            with torch.no_grad():
                for k, v in (biases or {}).items():
                    slots[k].parameter.copy_(torch.from_numpy(v))
                return self.encoder(**{k: torch.from_numpy(v) for k, v in inputs.items()}).last_hidden_state.numpy()
        finally:
            with torch.no_grad():
                for k, v in saved.items():
                    slots[k].parameter.copy_(v)


def task_biases(base, seed=1, scale=0.1):
    rng = np.random.default_rng(seed)
    return {k: (v + rng.normal(0, scale, v.shape)).astype(np.float32) for k, v in base.items()}


def max_diff(a, b, mask):
    return float(np.abs(a - b)[mask.astype(bool)].max())  # padded positions are not compared


@pytest.fixture(scope="module")
def fused(bert_model, tmp_path_factory):
    return Fused(bert_model, tmp_path_factory.mktemp("fused") / "model.onnx")


@pytest.fixture(scope="module")
def fused_min(bert_model, tmp_path_factory):
    """Only bq and bm2 are inputs: fused Attention's bias is Concat(bq input, constant k|v)."""
    return Fused(bert_model, tmp_path_factory.mktemp("fused-min") / "model.onnx", "bq,bm2")


# -- the graph ---------------------------------------------------------------------------------------
def test_fused_op_counts(fused):
    # tiny BERT: one Attention and BiasGelu per layer, two SkipLayerNorms per layer, one EmbedLayerNorm
    assert fused.counts == {
        "Attention": LAYERS,
        "EmbedLayerNormalization": 1,
        "SkipLayerNormalization": 2 * LAYERS,
        "BiasGelu": LAYERS,
    }
    ops = {n.op_type for n in ir.load(fused.path).graph}
    assert not ops & {"Add", "LayerNormalization", "Softmax", "Erf"}, "unfused ops left in the graph"


def test_inputs_are_the_unfused_graphs(fused, bert_compiled):
    graph = ir.load(fused.path).graph
    assert [v.name for v in graph.inputs] == [*fused.token_inputs, *(s.name for s in fused.slots)]
    head = {h.name for h in read_manifest(bert_compiled).head_inputs}  # compile adds the head after fusing
    assert [v.name for v in graph.inputs] == [v.name for v in ir.load(bert_compiled / MODEL_FILE).graph.inputs
                                              if v.name not in head]
    assert [v.name for v in graph.outputs] == ["last_hidden_state"]
    # every bias input defaults to the base value (an overridable initializer)
    defaults = {v.name: v.const_value.numpy() for v in graph.inputs if v.const_value is not None}
    assert defaults.keys() == fused.base.keys()
    for name, value in fused.base.items():
        np.testing.assert_array_equal(defaults[name], value)
    assert {i.name for i in fused.session.get_overridable_initializers()} == fused.base.keys()


def test_every_bias_is_live_and_none_is_baked(fused):
    model = ir.load(fused.path)
    CheckBiasInputsPass({k: v.shape for k, v in fused.base.items()})(model)
    NoBakedBiasPass(make_placeholders(fused.slots))(model)  # the seed is fixed: the placeholders used
    for node in model.graph:
        if node.op_type == "Attention":
            concat = node.inputs[2].producer()
            assert concat is not None and concat.op_type == "Concat", "Attention's bias is baked"
            layer = [v.name.split(".")[1] for v in concat.inputs]
            assert [v.name for v in concat.inputs] == [f"layer.{layer[0]}.{k}" for k in ("bq", "bk", "bv")]


def test_export_leaves_the_encoder_as_it_was(fused):
    for s in fused.slots:
        np.testing.assert_array_equal(s.parameter.detach().numpy(), fused.base[s.name])


# -- numbers -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch,length", SHAPES)
def test_parity_with_task_biases(fused, batch, length):
    x = fused.inputs(batch, length)
    task = task_biases(fused.base)
    assert max_diff(fused.run(x, task), fused.torch(x, task), x["attention_mask"]) < ATOL
    # feeding nothing is the base model
    assert max_diff(fused.run(x), fused.torch(x), x["attention_mask"]) < ATOL


def test_each_bias_reaches_its_own_input(fused):
    """Perturb one slot at a time: the fused graph must follow PyTorch, and the output must change.

    bk is the exception to the change: a key bias adds the same q.bk to every score of a query row,
    which softmax cancels, so it has no effect in any BERT (nor in the unfused graph).
    """
    x = fused.inputs(2, 16)
    mask = x["attention_mask"]
    base = fused.run(x)
    rng = np.random.default_rng(3)
    for name, value in fused.base.items():
        one = {name: (value + rng.normal(0, 1.0, value.shape)).astype(np.float32)}
        out = fused.run(x, one)
        assert max_diff(out, fused.torch(x, one), mask) < ATOL, name
        if not name.endswith(".bk"):
            assert max_diff(out, base, mask) > 1e-4, f"{name} changes nothing"


def test_swapping_tasks_changes_the_output(fused):
    x = fused.inputs(3, 9)
    before = fused.run(x)
    a, b = fused.run(x, task_biases(fused.base, seed=1)), fused.run(x, task_biases(fused.base, seed=2))
    assert max_diff(a, b, x["attention_mask"]) > 1e-2
    assert max_diff(a, before, x["attention_mask"]) > 1e-2
    np.testing.assert_array_equal(fused.run(x), before)  # and back to the base: no task state is left


@pytest.mark.parametrize("batch,length", SHAPES)
def test_subset_of_kinds(fused_min, batch, length):
    assert fused_min.counts["Attention"] == LAYERS
    assert [i.name for i in fused_min.session.get_inputs()] == fused_min.token_inputs
    x = fused_min.inputs(batch, length)
    task = task_biases(fused_min.base)
    assert max_diff(fused_min.run(x, task), fused_min.torch(x, task), x["attention_mask"]) < ATOL
    assert max_diff(fused_min.run(x), fused_min.torch(x), x["attention_mask"]) < ATOL


def test_task_session_serves_the_fused_graph(fused, bert_compiled, pack_all, tmp_path, torch_logits, token_inputs):
    """Swap the fused graph into a compiled directory: TaskSession runs it unchanged and matches PyTorch."""
    directory = tmp_path / "fused-compiled"
    shutil.copytree(bert_compiled, directory)
    shutil.copy(fused.path, directory / MODEL_FILE)
    reseal_compiled(directory, head_inputs=[], outputs=["last_hidden_state"])  # export_fused adds no head

    session, plain = TaskSession(directory), TaskSession(bert_compiled)
    name = session.register(pack_all)
    plain.register(pack_all)
    pack = load_pack(pack_all)
    for batch, length in SHAPES:
        x = token_inputs(session, batch, length)
        logits = session.logits(name, x)
        np.testing.assert_allclose(logits, torch_logits(pack, fused.model_dir, x), atol=ATOL)
        np.testing.assert_allclose(logits, plain.logits(name, x), atol=ATOL)
        np.testing.assert_allclose(
            session.hidden_states(x), fused.torch(x), atol=ATOL
        )  # task=None: the defaults, the base model


@pytest.mark.parametrize("kind", ["roberta", "electra", "distilbert"])
def test_other_bert_style_models(kind, tiny_model, tmp_path):
    f = Fused(tiny_model(kind), tmp_path / "model.onnx")
    assert f.counts["Attention"] == LAYERS and f.counts["SkipLayerNormalization"] == 2 * LAYERS
    CheckBiasInputsPass({k: v.shape for k, v in f.base.items()})(ir.load(f.path))
    x = f.inputs(3, 9)
    task = task_biases(f.base)
    assert max_diff(f.run(x, task), f.torch(x, task), x["attention_mask"]) < ATOL
    assert max_diff(f.run(x), f.torch(x), x["attention_mask"]) < ATOL


# -- what is refused ---------------------------------------------------------------------------------
def test_mpnet_is_refused_with_a_clear_error(tiny_model, tmp_path):
    encoder = load_encoder(tiny_model("mpnet"), attn_implementation="eager")
    slots = find_biases(encoder)
    before = [s.parameter.detach().clone() for s in slots]
    with pytest.raises(BitFitError, match="BERT-style models only"):
        export_fused(encoder, slots, ["input_ids", "attention_mask"], tmp_path / "m.onnx", 17)
    assert not (tmp_path / "m.onnx").exists()
    for s, b in zip(slots, before):  # the placeholders were taken out again
        assert torch.equal(s.parameter, b)


def test_sdpa_attention_is_refused(bert_model, tmp_path):
    encoder = load_encoder(bert_model, attn_implementation="sdpa")
    with pytest.raises(BitFitError, match="attn_implementation='eager'"):
        export_fused(encoder, find_biases(encoder), ["input_ids", "attention_mask"], tmp_path / "m.onnx", 17)


# -- the passes on hand-built graphs -----------------------------------------------------------------
def _graph(constants: dict[str, np.ndarray]) -> ir.Model:
    """y = x + c1 + c2 + ... with each constant an initializer."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 6]))
    nodes, current = [], x
    for name, array in constants.items():
        c = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(array.shape),
                     const_value=ir.tensor(array, name=name))
        node = ir.Node("", "Add", [current, c], name=f"add_{name}")
        nodes.append(node)
        current = node.outputs[0]
        current.name = f"after_{name}"
    graph = ir.Graph([x], [current], nodes=nodes, opset_imports={"": 17}, name="g")
    for node in nodes:
        graph.register_initializer(node.inputs[1])
    return ir.Model(graph, ir_version=10)


def _run(model: ir.Model, feeds: dict) -> np.ndarray:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_lift_pass_rewires_single_and_concatenated_placeholders():
    p = {"a": np.arange(1, 3, dtype=np.float32) / 7, "b": np.arange(3, 5, dtype=np.float32) / 7,
         "c": np.arange(5, 9, dtype=np.float32) / 7}
    other = np.array([10.0, 20.0], dtype=np.float32)
    model = _graph({"ab": np.concatenate([p["a"], p["b"], other]), "cc": np.concatenate([p["c"], other])})
    LiftPlaceholderBiasesPass(p)(model)
    NoBakedBiasPass(p)(model)
    assert [v.name for v in model.graph.inputs] == ["x", "a", "b", "c"]
    assert all(v.uses() for v in model.graph.inputs)
    assert [n.op_type for n in model.graph] == ["Concat", "Add", "Concat", "Add"]
    x = np.zeros((2, 6), np.float32)
    feeds = {"x": x, "a": np.ones(2, np.float32), "b": 2 * np.ones(2, np.float32), "c": 3 * np.ones(4, np.float32)}
    expected = np.array([1, 1, 2, 2, 10, 20], np.float32) + np.array([3, 3, 3, 3, 10, 20], np.float32)
    np.testing.assert_allclose(_run(model, feeds), np.broadcast_to(expected, (2, 6)), rtol=1e-6)


def test_no_baked_bias_pass_names_a_placeholder_it_finds():
    p = {"layer.0.bq": np.array([0.1, 0.2], np.float32)}
    model = _graph({"w": np.array([5.0, 0.1, 0.2, 7.0, 8.0, 9.0], np.float32)})
    with pytest.raises(PostconditionError, match=r"layer\.0\.bq is baked into w"):
        NoBakedBiasPass(p)(model)
    NoBakedBiasPass({"layer.0.bq": np.array([0.2, 0.1], np.float32)})(model)  # other order: not there


# -- through the product: `bitfit compile --fuse [--quantize int8]`, then verify -------------------
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_cli_compile_fuse_then_verify(bert_model, pack_all, tmp_path, capsys, quantize):
    from bitfit.compiler.verify import verify
    from bitfit.runtime.compiled import read_manifest

    from bitfit.cli import main

    out = tmp_path / "fused"
    argv = ["compile", "--model", str(bert_model), "--out", str(out), "--fuse"]
    assert main(argv + (["--quantize", quantize] if quantize else [])) == 0
    m = read_manifest(out)
    assert m.fused_ops["Attention"] == 2 and m.fused_ops["SkipLayerNormalization"] == 4
    assert "LiftPlaceholderBiasesPass" in m.passes and "NoBakedBiasPass" in m.passes
    assert m.precision == ("fp32" if quantize is None else "int8-dynamic-per-channel")
    report = verify(out, [pack_all], log=lambda *_: None)
    assert report.ok, report.table()
    liveness = [c for c in report.checks if "live" in c.case]
    assert liveness and all(c.passed for c in liveness)
    if quantize is None:  # fp32 fused graph: the same tolerance as the plain graph
        assert report.mode == "fp32" and max(c.max_abs for c in report.checks if c.subject != "graph") < 1e-4
