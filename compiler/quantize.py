"""Smaller weights, fp32 bias inputs: int8 through onnxruntime's quantizer, fp16 through its converter.

Dynamic quantisation rewrites MatMul weights to int8 and leaves the bias Adds (fed by our bias
inputs) in fp32, so task switching keeps working. Measured on all-MiniLM-L6-v2 with three real tasks
(test sets, 1,500 examples each): per-channel weights kept accuracy within 0.1 point of fp32
(movie 79.53 vs 79.47, TREC-6 90.20 vs 90.00, SMS F1 93.89 vs 93.89); per-tensor lost 1.5 points on
movie (77.93). Per-channel is the default.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx_ir as ir

QUANTIZE_MODES = {
    "int8": "int8-dynamic-per-channel",
    "int8-per-tensor": "int8-dynamic-per-tensor",
}


def quantize_int8(src: str | Path, dst: str | Path, *, per_channel: bool = True) -> None:
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantizer logs a pre-processing hint on the root logger for every call: it is about static
    # quantisation of image models, not this graph.
    with _quiet_root_logger():
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            # Only ops whose int8 weights are frozen, and never a node that reads a bias input: left to its
            # defaults the quantizer rewrote EmbedLayerNormalization and swallowed its beta (bLNe), and it
            # would quantize a mixed graph's Gather from a bias table the same way.
            op_types_to_quantize=["MatMul", "Attention", "Gather"],
            nodes_to_exclude=nodes_reading_defaults(src),
            # Without it, graphs that went through onnxruntime's transformer optimiser fail with
            # "Unable to find data type for weight_name" (shared/ONNX-NOTES).
            extra_options={"DefaultTensorType": TensorProto.FLOAT},
        )


@contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def to_fp16_model(model: ir.Model) -> ir.Model:
    """The graph with fp16 weights. keep_io_types keeps every graph input fp32, so a bias input and its default
    stay fp32 and a Cast inside the graph feeds the fp16 compute: packs are the same for every precision."""
    import onnx_ir as ir
    from onnxruntime.transformers.onnx_model import OnnxModel

    converted = OnnxModel(ir.to_proto(model))
    converted.convert_float_to_float16(keep_io_types=True)
    converted.topological_sort()  # what OnnxModel.save_model_to_file did before the graph stayed in memory
    return ir.from_proto(converted.model)


def nodes_reading_defaults(path: str | Path) -> list[str]:
    """Names of nodes fed by a graph input that has a default (an overridable initializer: a bias or a head
    input), or by a value computed from head inputs and constants alone.

    The second kind is for the in-graph head: its MatMul reads Transpose(head.weight), which a quantizer
    that folds constants would take for a frozen weight and bake. (Compile adds the head after quantizing;
    this keeps a head graph that is quantized again live.) Values computed from bias inputs alone are not
    followed: fused Attention reads Concat(bq, bk, bv) and its int8 weights are what --quantize is for.
    """
    import onnx_ir as ir

    from .head import HEAD_INPUT_NAMES

    graph = ir.load(str(path)).graph
    overridable = {v.name for v in graph.inputs if v.const_value is not None}
    derived = overridable & set(HEAD_INPUT_NAMES)
    constant = set(graph.initializers) - overridable
    out = []
    for node in graph:  # topological order: a derived value is known before its readers
        names = [i.name for i in node.inputs if i is not None]
        if any(n in overridable or n in derived for n in names):
            out.append(node.name)
            if any(n in derived for n in names) and all(n in derived or n in constant for n in names):
                derived.update(o.name for o in node.outputs)
    return out


def optimise_offline(src: str | Path, dst: str | Path) -> str:
    """onnxruntime's graph optimisations applied once and saved (ORT_ENABLE_EXTENDED: its fusions and contrib
    ops, none of the hardware-specific layouts of ORT_ENABLE_ALL); returns what did it, for the manifest."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(dst)
    options.log_severity_level = 3
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    return f"onnxruntime {ort.__version__} ORT_ENABLE_EXTENDED (CPUExecutionProvider)"


def export_int8_live(encoder, slots, token_inputs: list[str], opset: int, *, per_channel: bool = True,
                     defaults: bool = True) -> tuple[ir.Model, dict[str, int], str]:
    """int8 weights with onnxruntime's int8 kernels fused around every bias, each bias still a live input.

    With a bias input, onnxruntime cannot fold the bias Add into DynamicQuantizeMatMul / MatMulIntegerToFloat
    (it folds constants only) and leaves 30 Adds in MiniLM: about 10% slower than a baked int8 graph. So the
    encoder is exported with placeholder biases, quantized, optimised offline by onnxruntime (the Adds fold
    into the kernels' bias inputs), and each placeholder lifted back to its input (compiler.fuse). The graph
    then holds onnxruntime contrib ops: it is for onnxruntime's CPU provider. Returns (the graph, in memory;
    fused op counts; what optimised it)."""
    import onnx_ir as ir

    from .fuse import fused_op_counts, with_placeholders

    optimised = ""

    def transform(raw: Path) -> ir.Model:
        nonlocal optimised
        quantized, fused = raw.with_name("int8.onnx"), raw.with_name("int8-optimised.onnx")
        quantize_int8(raw, quantized, per_channel=per_channel)  # both work on files: onnxruntime's tools
        optimised = optimise_offline(quantized, fused)
        return ir.load(fused)

    model = with_placeholders(encoder, slots, token_inputs, opset, transform, "fusing int8 kernels around live biases",
                              "the plain int8 graph serves instead", defaults=defaults)
    return model, fused_op_counts(model), optimised
