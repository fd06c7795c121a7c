"""The compiler's graph passes, and the optimiser trap: a bias baked into a fused kernel leaves its graph
input dead, so swapping that bias would silently change nothing. CheckBiasInputsPass must refuse it."""
from __future__ import annotations

import importlib

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from bitfit.compiler.passes import (
    BiasDefaultsPass,
    CheckBiasInputsPass,
    CheckTokenInputsPass,
)
from bitfit.runtime import CompiledModelError, read_manifest
from bitfit.runtime.compiled import MODEL_FILE
from onnx import TensorProto, helper
from onnx_ir.passes import PostconditionError, PreconditionError

compile_module = importlib.import_module("bitfit.compiler.compile")


def bias_shapes(compiled) -> dict[str, tuple[int, ...]]:
    return {b.name: b.shape for b in read_manifest(compiled).bias_inputs}


def bake(model: ir.Model, name: str) -> None:
    """Do what a fusing optimiser does to a bias: read a constant copy of its value, leave the input dead."""
    v = {x.name: x for x in model.graph.inputs}[name]
    value = v.const_value.numpy().copy() if v.const_value is not None else np.zeros(tuple(v.shape), np.float32)
    baked = ir.Value(name=f"baked.{name}", shape=ir.Shape(v.shape), type=v.type,
                     const_value=ir.tensor(value, name=f"baked.{name}"))
    model.graph.register_initializer(baked)
    ir.convenience.replace_all_uses_with(v, baked)
    assert not v.uses()


def consumed_names(graph: onnx.GraphProto) -> set[str]:
    names = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g, *attr.graphs] if attr.type in (onnx.AttributeProto.GRAPH,
                                                                onnx.AttributeProto.GRAPHS) else []:
                names |= consumed_names(sub)
    return names


# -- our compiled graph passes ----------------------------------------------------------------------
def test_compiled_graph_passes_every_check(bert_compiled):
    model = ir.load(bert_compiled / MODEL_FILE)
    shapes = bias_shapes(bert_compiled)
    assert len(shapes) == 17
    CheckBiasInputsPass(shapes)(model)
    CheckBiasInputsPass(shapes)(model)
    CheckTokenInputsPass(read_manifest(bert_compiled).token_inputs)(model)
    assert read_manifest(bert_compiled).passes == [
        "export(bias inputs)", "BiasDefaultsPass", "CheckBiasInputsPass", "CheckTokenInputsPass", "AddHeadPass"]


# -- the trap ---------------------------------------------------------------------------------------
def test_onnxruntime_transformer_optimizer_output_is_checked(bert_compiled, tmp_path):
    """Run onnxruntime's transformer optimiser on the compiled graph. Whether it fuses (and bakes) depends on
    the onnxruntime version and on the exported pattern; the pass must flag exactly the inputs left dead."""
    from onnxruntime.transformers.optimizer import optimize_model

    shapes = bias_shapes(bert_compiled)
    for level in (0, 1):
        optimized = optimize_model(str(bert_compiled / MODEL_FILE), model_type="bert", num_heads=2, hidden_size=32,
                                   opt_level=level)
        path = tmp_path / f"optimized{level}.onnx"
        optimized.save_model_to_file(str(path))
        dead = sorted(set(shapes) - consumed_names(onnx.load(str(path)).graph))
        model = ir.load(path)
        if dead:
            with pytest.raises(PostconditionError, match=rf"{dead[0]} is an input that no node reads"):
                CheckBiasInputsPass(shapes)(model)
        else:
            CheckBiasInputsPass(shapes)(model)


def test_baked_bias_in_compiled_graph_is_refused(bert_compiled):
    model = ir.load(bert_compiled / MODEL_FILE)
    bake(model, "layer.0.bq")
    with pytest.raises(PostconditionError, match=r"1 bias inputs are not live: layer\.0\.bq is an input that no node "
                                                 r"reads \(baked into a fused kernel\?\)"):
        CheckBiasInputsPass(bias_shapes(bert_compiled))(model)


def test_why_it_matters_a_dead_input_ignores_swapped_values(bert_compiled, tmp_path, token_inputs):
    """On the baked graph, feeding another bq changes nothing; on the compiled graph it changes the output."""
    from bitfit.runtime import TaskSession

    model = ir.load(bert_compiled / MODEL_FILE)
    bake(model, "layer.0.bq")
    ir.save(model, tmp_path / "baked.onnx")
    inputs = token_inputs(TaskSession(bert_compiled), 2, 6)
    other = {"layer.0.bq": np.full((32,), 3.0, np.float32)}

    def run(path, extra):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        s = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return s.run(None, {**inputs, **extra})[0]

    baked = tmp_path / "baked.onnx"
    assert np.array_equal(run(baked, {}), run(baked, other))
    live = bert_compiled / MODEL_FILE
    assert np.abs(run(live, {}) - run(live, other)).max() > 1e-3


def _graph(inputs, nodes, initializers=()):
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                          initializer=list(initializers))
    return ir.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def test_hand_built_graph_with_an_unread_bias_input():
    model = _graph(
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [4]),
         helper.make_tensor_value_info("unused", TensorProto.FLOAT, [4])],
        [helper.make_node("Add", ["x", "b"], ["y"])],
        [helper.make_tensor("unused", TensorProto.FLOAT, [4], [0.1, 0.2, 0.3, 0.4])],
    )
    CheckBiasInputsPass({"b": (4,)})(model)  # a read input is fine
    with pytest.raises(PostconditionError, match=r"1 bias inputs are not live: unused is an input that no node reads"):
        CheckBiasInputsPass({"b": (4,), "unused": (4,)})(model)


def test_hand_built_graph_with_wrong_dtype_shape_or_missing_input():
    model = _graph(
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
         helper.make_tensor_value_info("b64", TensorProto.DOUBLE, [4]),
         helper.make_tensor_value_info("b5", TensorProto.FLOAT, [5])],
        [helper.make_node("Cast", ["b64"], ["b32"], to=TensorProto.FLOAT),
         helper.make_node("Slice", ["b5", "starts", "ends"], ["b4"]),
         helper.make_node("Add", ["x", "b32"], ["t"]),
         helper.make_node("Add", ["t", "b4"], ["y"])],
        [helper.make_tensor("starts", TensorProto.INT64, [1], [0]), helper.make_tensor("ends", TensorProto.INT64, [1], [4])],
    )
    with pytest.raises(PostconditionError) as info:
        CheckBiasInputsPass({"b64": (4,), "b5": (4,), "nowhere": (4,)})(model)
    message = str(info.value)
    assert message.startswith("3 bias inputs are not live")
    assert "b64 is DOUBLE, not float32" in message
    assert "b5 has shape [5], expected [4]" in message
    assert "nowhere is not a graph input" in message


def test_token_input_checks():
    def model_with(dtype, shape):
        return _graph([helper.make_tensor_value_info("input_ids", dtype, shape)],
                      [helper.make_node("Cast", ["input_ids"], ["c"], to=TensorProto.FLOAT),
                       helper.make_node("Expand", ["c", "s"], ["y"])],
                      [helper.make_tensor("s", TensorProto.INT64, [2], [2, 4])])

    CheckTokenInputsPass(["input_ids"])(model_with(TensorProto.INT64, ["batch", "sequence"]))
    with pytest.raises(PostconditionError, match=r"token input input_ids has a fixed axis .*export froze a shape"):
        CheckTokenInputsPass(["input_ids"])(model_with(TensorProto.INT64, ["batch", 7]))
    with pytest.raises(PostconditionError, match=r"expected int64 \[batch, sequence\]"):
        CheckTokenInputsPass(["input_ids"])(model_with(TensorProto.INT32, ["batch", "sequence"]))
    with pytest.raises(PostconditionError, match=r"token input attention_mask is missing from the graph"):
        CheckTokenInputsPass(["input_ids", "attention_mask"])(model_with(TensorProto.INT64, ["batch", "sequence"]))


def test_bias_defaults_pass_sets_overridable_initializers():
    model = _graph(
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [4])],
        [helper.make_node("Add", ["x", "b"], ["y"])],
    )
    value = np.array([1, 2, 3, 4], np.float32)
    result = BiasDefaultsPass({"b": value})(model)
    assert result.modified
    assert np.array_equal(model.graph.initializers["b"].const_value.numpy(), value)
    assert "b" in [v.name for v in model.graph.inputs]  # still an input: a caller may override it
    with pytest.raises(PreconditionError, match=r"has no inputs \['c'\]: the export lost bias inputs"):
        BiasDefaultsPass({"c": value})(model)


# -- compile() runs the passes ----------------------------------------------------------------------
def test_compile_refuses_a_graph_with_a_dead_bias_input(bert_model, tmp_path, monkeypatch):
    """Simulate an export that bakes layer.0.bq: compile must fail, name the input, and leave nothing behind."""
    export = compile_module.export_onnx

    def baking_export(encoder, slots, token_inputs, path, opset, **kwargs):
        export(encoder, slots, token_inputs, path, opset, **kwargs)
        model = ir.load(path)
        bake(model, "layer.0.bq")
        ir.save(model, path)

    monkeypatch.setattr(compile_module, "export_onnx", baking_export)
    out = tmp_path / "compiled"
    with pytest.raises(CompiledModelError, match=r"compiling .* failed: 1 bias inputs are not live: layer\.0\.bq is an "
                                                 r"input that no node reads"):
        compile_module.compile(bert_model, out, log=lambda s: None)
    assert list(tmp_path.iterdir()) == []


def test_compile_refuses_existing_output(bert_model, bert_compiled, tmp_path):
    from bitfit.runtime import BitFitError

    with pytest.raises(BitFitError, match=r"already exists: choose another output path \(--out\), or pass --overwrite"):
        compile_module.compile(bert_model, bert_compiled, log=lambda s: None)
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(BitFitError, match=r"exists and is not a compiled model directory: refusing to replace it"):
        compile_module.compile(bert_model, other, overwrite=True, log=lambda s: None)
    assert (other / "keep.txt").exists()


def test_compile_overwrite_replaces_a_compiled_directory(bert_model, bert_compiled_min, copy_dir):
    target = copy_dir(bert_compiled_min)
    compile_module.compile(bert_model, target, biases="all", overwrite=True, log=lambda s: None)
    assert len(read_manifest(target).bias_inputs) == 17
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]
