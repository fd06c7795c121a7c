"""The task head inside the graph, so that any onnxruntime binding (C, C#, Java, JS) gets logits from the
graph alone, without our numpy head.

Plain graphs (`AddHeadPass`): the head's tensors are OPTIONAL inputs (overridable initializers), like the
biases. Their defaults are zeros (pooling: mean), so a run that feeds none of them is still the base model
and costs one [*, H] x [H, 1] product more. A user feeds a pack's head (`runtime.compiled.head_feeds`),
or puts it in an onnxruntime adapter file with the pack's biases (bitfit.exporters.adapter):

    head.weight [labels, H], head.bias [labels], head.pooler.weight [H, H], head.pooler.bias [H],
    head.pooling [3] = weights of the (mean, cls, pooler) poolings
    logits [B, labels]           = (p0 * masked-mean + p1 * cls + p2 * tanh(cls Wp^T + bp)) W^T + b
    token_logits [B, T, labels]  = hidden W^T + b

`labels` is a symbolic axis: a default of one row is overridden by a feed of any number of rows.

Serving a fixed set of tasks (`BakeBiasTablesPass` + `AddTaskHeadsPass`, used for Triton): on a mixed graph
the bias tables become constants and each row's head is gathered from [tasks, ...] head tables by task_ids,
so the graph's only inputs are tokens and task_ids.

The head is added after every other transformation (fusion, int8, fp16): it is never fused, quantized or
cast, so it is fp32 in every variant and matches the numpy head to float rounding.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from bitfit.runtime import compiled as cm
from bitfit.runtime.heads import (
    HEAD_BIAS,
    HEAD_POOLER_BIAS,
    HEAD_POOLER_WEIGHT,
    HEAD_WEIGHT,
)
from bitfit.runtime.pack import TensorSpec
from onnx_ir.passes import (
    InPlacePass,
    PassResult,
    PostconditionError,
    PreconditionError,
)

MIN_OPSET = 13  # Squeeze, Unsqueeze and ReduceSum take their axes as inputs from 13 on
LABELS_AXIS = "labels"
HEAD_OUTPUTS = (cm.LOGITS, cm.TOKEN_LOGITS)
HEAD_INPUT_NAMES = (HEAD_WEIGHT, HEAD_BIAS, HEAD_POOLER_WEIGHT, HEAD_POOLER_BIAS, cm.HEAD_POOLING)


def head_input_specs(hidden_size: int) -> list[TensorSpec]:
    """The plain graph's head inputs; -1 stands for the symbolic labels axis."""
    h = hidden_size
    return [
        TensorSpec(HEAD_WEIGHT, (-1, h)),
        TensorSpec(HEAD_BIAS, (-1,)),
        TensorSpec(HEAD_POOLER_WEIGHT, (h, h)),
        TensorSpec(HEAD_POOLER_BIAS, (h,)),
        TensorSpec(cm.HEAD_POOLING, (len(cm.POOLING_COLUMNS),)),
    ]


def _default(spec: TensorSpec) -> np.ndarray:
    if spec.name == cm.HEAD_POOLING:
        return cm.pooling_weights("mean")
    return np.zeros(tuple(1 if d == -1 else d for d in spec.shape), np.float32)


@dataclass
class _Head:
    """The head's tensors as graph values: shared ([K, H], [K], ...) or per row ([B, K, H], [B, K], ...)."""

    weight: ir.Value
    bias: ir.Value
    pooling: ir.Value
    pooler_weight: ir.Value | None  # None: no pooler branch (no task uses it)
    pooler_bias: ir.Value | None
    per_row: bool


class _Builder:
    """Appends named nodes to a graph; every value is called head/<name>, so nothing clashes with the encoder."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph

    def op(self, op_type: str, inputs: list[ir.Value], name: str, **attributes) -> ir.Value:
        out = ir.Value(name=f"head/{name}")
        attrs = ir.convenience.convert_attributes(attributes) if attributes else ()
        self.graph.append(ir.Node("", op_type, inputs, attrs, outputs=[out], name=f"head/{op_type}/{name}"))
        return out

    def const(self, name: str, value: np.ndarray) -> ir.Value:
        v = ir.Value(name=f"head/{name}", const_value=ir.tensor(value, name=f"head/{name}"))
        v.shape, v.dtype = ir.Shape(value.shape), v.const_value.dtype
        self.graph.register_initializer(v)
        return v


def _build(graph: ir.Graph, hidden: ir.Value, mask: ir.Value, head: _Head) -> tuple[ir.Value, ir.Value]:
    """(logits, token_logits) from hidden [B, T, H] and the attention mask [B, T]."""
    b = _Builder(graph)
    one = b.const("axis1", np.array([1], np.int64))
    last = b.const("axis_last", np.array([-1], np.int64))
    # mean over real tokens, as runtime.session.pool: sum(hidden * mask) / max(sum(mask), 1)
    m = b.op("Unsqueeze", [b.op("Cast", [mask], "mask", to=ir.DataType.FLOAT), last], "mask3")
    total = b.op("ReduceSum", [b.op("Mul", [hidden, m], "masked"), one], "sum", keepdims=0)
    count = b.op("Max", [b.op("ReduceSum", [m, one], "count", keepdims=0), b.const("one", np.ones(1, np.float32))],
                 "count1")
    mean = b.op("Div", [total, count], "mean")
    cls = b.op("Gather", [hidden, b.const("first", np.array(0, np.int64))], "cls", axis=1)

    def column(i: int) -> ir.Value:  # head.pooling[..., i]: [1] shared or [B, 1] per row, broadcast over H
        starts, ends = b.const(f"col{i}", np.array([i], np.int64)), b.const(f"col{i}_end", np.array([i + 1], np.int64))
        return b.op("Slice", [head.pooling, starts, ends, last], f"p{i}")

    def transposed(w: ir.Value, name: str) -> ir.Value:
        return b.op("Transpose", [w], name, perm=[0, 2, 1] if head.per_row else [1, 0])

    def linear(x: ir.Value, wt: ir.Value, bias: ir.Value, name: str) -> ir.Value:
        """x [B, H] -> x W^T + b [B, K]; through [B, 1, H] so that a per-row W [B, H, K] is a batched MatMul."""
        y = b.op("Squeeze", [b.op("MatMul", [b.op("Unsqueeze", [x, one], f"{name}_in"), wt], f"{name}_mm"), one],
                 f"{name}_out")
        return b.op("Add", [y, bias], name)

    pooled = b.op("Add", [b.op("Mul", [mean, column(0)], "w_mean"), b.op("Mul", [cls, column(1)], "w_cls")], "pooled2")
    if head.pooler_weight is not None:
        pooler_wt = transposed(head.pooler_weight, "pooler_wt")
        pooler = b.op("Tanh", [linear(cls, pooler_wt, head.pooler_bias, "pooler_lin")], "pooler")
        pooled = b.op("Add", [pooled, b.op("Mul", [pooler, column(2)], "w_pooler")], "pooled")
    wt = transposed(head.weight, "weight_t")
    logits = linear(pooled, wt, head.bias, "logits")
    token_bias = b.op("Unsqueeze", [head.bias, one], "token_bias") if head.per_row else head.bias
    token_logits = b.op("Add", [b.op("MatMul", [hidden, wt], "token_mm"), token_bias], "token_logits")
    return logits, token_logits


def _check_graph(model: ir.Model) -> tuple[ir.Value, ir.Value]:
    graph = model.graph
    opset = model.opset_imports.get("", 0)
    if opset < MIN_OPSET:
        raise PreconditionError(f"the in-graph head needs opset >= {MIN_OPSET}, the graph has {opset}: "
                                f"compile with --opset {MIN_OPSET} or later")
    outputs = {v.name: v for v in graph.outputs}
    inputs = {v.name: v for v in graph.inputs}
    if cm.OUTPUT_NAME not in outputs or "attention_mask" not in inputs:
        raise PreconditionError(f"the graph has no {cm.OUTPUT_NAME} output or no attention_mask input")
    taken = sorted((set(outputs) | set(inputs) | set(graph.initializers)) & {*HEAD_OUTPUTS, *HEAD_INPUT_NAMES})
    if taken:
        raise PreconditionError(f"the graph already has values named {taken}: it has a head already")
    return outputs[cm.OUTPUT_NAME], inputs["attention_mask"]


def _name_outputs(graph: ir.Graph, logits: ir.Value, token_logits: ir.Value, labels: int | str) -> None:
    hidden = next(v for v in graph.outputs if v.name == cm.OUTPUT_NAME)
    batch, sequence = hidden.shape[0], hidden.shape[1]
    shapes = {cm.LOGITS: [batch, labels], cm.TOKEN_LOGITS: [batch, sequence, labels]}
    for v, name in ((logits, cm.LOGITS), (token_logits, cm.TOKEN_LOGITS)):
        v.name, v.dtype, v.shape = name, ir.DataType.FLOAT, ir.Shape(shapes[name])
        graph.outputs.append(v)


class AddHeadPass(InPlacePass):
    """Add the head to a plain graph: optional head.* inputs (zero defaults, mean pooling), outputs logits and
    token_logits after last_hidden_state. `specs` (after the call) are the inputs added, for the manifest."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.specs = head_input_specs(hidden_size)

    def call(self, model: ir.Model) -> PassResult:
        hidden, mask = _check_graph(model)
        graph = model.graph
        values = {}
        for spec in self.specs:
            shape = [LABELS_AXIS if d == -1 else d for d in spec.shape]
            v = ir.Value(name=spec.name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(shape))
            v.const_value = ir.tensor(_default(spec), name=spec.name)  # an overridable initializer
            graph.inputs.append(v)
            graph.register_initializer(v)
            values[spec.name] = v
        head = _Head(values[HEAD_WEIGHT], values[HEAD_BIAS], values[cm.HEAD_POOLING], values[HEAD_POOLER_WEIGHT],
                     values[HEAD_POOLER_BIAS], per_row=False)
        _name_outputs(graph, *_build(graph, hidden, mask, head), LABELS_AXIS)
        dead = [s.name for s in self.specs if not values[s.name].uses()]
        if dead:
            raise PostconditionError(f"head inputs {dead} are read by no node")
        return PassResult(model, modified=True)


class BakeBiasTablesPass(InPlacePass):
    """On a mixed graph, make every bias table a constant of the given [tasks, dim] value and no longer an
    input: the graph then serves exactly these tasks, picked by task_ids."""

    def __init__(self, tables: Mapping[str, np.ndarray]):
        super().__init__()
        self.tables = tables

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        inputs = {v.name: v for v in graph.inputs}
        missing = sorted(set(self.tables) - inputs.keys())
        if missing:
            raise PreconditionError(f"the graph has no bias-table inputs {missing[:4]}")
        for name, table in self.tables.items():
            v = inputs[name]
            if v.shape is None or len(v.shape) != 2 or v.shape[1] != table.shape[1]:
                raise PreconditionError(f"{name} is {v.shape} in the graph, the table is {list(table.shape)}")
            v.const_value = ir.tensor(np.ascontiguousarray(table, dtype=np.float32), name=name)
            v.shape = ir.Shape(table.shape)
            graph.register_initializer(v)
            graph.inputs.remove(v)
        return PassResult(model, modified=bool(self.tables))


class AddTaskHeadsPass(InPlacePass):
    """Per-row heads for a mixed graph: row i uses the head tables' row task_ids[i].

    tables: head.weight [tasks, K, H], head.bias [tasks, K], head.pooling [tasks, 3] and, when some task pools
    with the BERT pooler, head.pooler.weight [tasks, H, H] and head.pooler.bias [tasks, H]; constants. Tasks
    with fewer than K labels have zero rows (so zero logits) past their own.
    """

    def __init__(self, tables: Mapping[str, np.ndarray]):
        super().__init__()
        self.tables = tables

    def call(self, model: ir.Model) -> PassResult:
        hidden, mask = _check_graph(model)
        graph = model.graph
        task_ids = {v.name: v for v in graph.inputs}.get(cm.TASK_IDS)
        if task_ids is None:
            raise PreconditionError(f"the graph has no {cm.TASK_IDS} input: it is not a mixed graph")
        b = _Builder(graph)
        rows = {}
        for name, table in self.tables.items():
            const = b.const(f"table/{name}", np.ascontiguousarray(table, dtype=np.float32))
            rows[name] = b.op("Gather", [const, task_ids], f"rows/{name}", axis=0)
        head = _Head(rows[HEAD_WEIGHT], rows[HEAD_BIAS], rows[cm.HEAD_POOLING], rows.get(HEAD_POOLER_WEIGHT),
                     rows.get(HEAD_POOLER_BIAS), per_row=True)
        _name_outputs(graph, *_build(graph, hidden, mask, head), int(self.tables[HEAD_WEIGHT].shape[1]))
        return PassResult(model, modified=True)
