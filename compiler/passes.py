"""Small onnx-ir passes over the exported graph. Each checks or changes one thing and says which.

They run in a PassManager, so an error names the pass that raised it.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx_ir as ir
from bitfit.runtime.errors import CompiledModelError
from onnx_ir.passes import (
    InPlacePass,
    PassError,
    PassManager,
    PassResult,
    PostconditionError,
    PreconditionError,
)


class BiasDefaultsPass(InPlacePass):
    """Give every bias input the base model's value as an overridable initializer.

    A run that feeds nothing is the base model, a pack feeds only what it trained, and onnxruntime
    does not constant-fold an initializer that is also a graph input, so the input stays live.
    """

    def __init__(self, defaults: Mapping[str, np.ndarray]):
        super().__init__()
        self.defaults = defaults

    def call(self, model: ir.Model) -> PassResult:
        inputs = {v.name: v for v in model.graph.inputs}
        missing = sorted(set(self.defaults) - inputs.keys())
        if missing:
            raise PreconditionError(f"the exported graph has no inputs {missing[:4]}: the export lost bias inputs")
        for name, value in self.defaults.items():
            v = inputs[name]
            v.const_value = ir.tensor(np.ascontiguousarray(value, dtype=np.float32), name=name)
            model.graph.register_initializer(v)
        return PassResult(model, modified=bool(self.defaults))


class RequiredInputsPass(InPlacePass):
    """Drop the default (initializer) of the named graph inputs: each becomes a plain required input.

    For runtimes that refuse a feed of an input with a default: onnxruntime-web 1.31 lists only required
    inputs in `inputNames` and rejects any other feed ("invalid input"), so the browser feeds every bias and
    head input of a graph without defaults (exporters/web.py).
    """

    def __init__(self, names: Iterable[str]):
        super().__init__()
        self.names = list(names)

    def call(self, model: ir.Model) -> PassResult:
        inputs = {v.name: v for v in model.graph.inputs}
        missing = [n for n in self.names if n not in inputs]
        if missing:
            raise PreconditionError(f"the graph has no inputs {missing[:4]}")
        modified = False
        for name in self.names:
            if name in model.graph.initializers:
                model.graph.initializers.pop(name)
                inputs[name].const_value = None
                modified = True
        return PassResult(model, modified=modified)


class CheckBiasInputsPass(InPlacePass):
    """Every expected bias is a float32 graph input of its shape that some node consumes (None in a shape:
    a dynamic axis).

    This is what catches a graph whose optimiser baked a bias into a fused kernel and left its input
    dead (onnxruntime's transformer optimiser does this to q/k/v when the bias is also an initializer):
    swapping that bias would then silently change nothing.
    """

    def __init__(self, shapes: Mapping[str, tuple[int | None, ...]]):
        super().__init__()
        self.shapes = shapes

    def call(self, model: ir.Model) -> PassResult:
        inputs = {v.name: v for v in model.graph.inputs}
        problems = []
        for name, shape in self.shapes.items():
            v = inputs.get(name)
            if v is None:
                problems.append(f"{name} is not a graph input")
                continue
            if v.dtype != ir.DataType.FLOAT:
                problems.append(f"{name} is {v.dtype}, not float32")
            if not _shape_matches(v.shape, shape):
                problems.append(f"{name} has shape {v.shape}, expected {list(shape)}")
            if not v.uses():
                problems.append(f"{name} is an input that no node reads (baked into a fused kernel?)")
        if problems:
            raise PostconditionError(f"{len(problems)} bias inputs are not live: {listing(problems)}")
        return PassResult(model, modified=False)


def listing(problems: list[str], most: int = 6) -> str:
    return "; ".join(problems[:most]) + ("; ..." if len(problems) > most else "")


def _shape_matches(actual: ir.Shape | None, expected: tuple[int | None, ...]) -> bool:
    """None in `expected` stands for a dynamic axis (a mixed graph's table rows)."""
    if actual is None or len(actual) != len(expected):
        return False
    return all(isinstance(a, int) and a == e if e is not None else not isinstance(a, int)
               for a, e in zip(actual, expected))


class CheckTokenInputsPass(InPlacePass):
    """Token inputs are int64 [batch, sequence] with both axes dynamic, so any shape runs."""

    def __init__(self, names: Iterable[str]):
        super().__init__()
        self.names = list(names)

    def call(self, model: ir.Model) -> PassResult:
        inputs = {v.name: v for v in model.graph.inputs}
        for name in self.names:
            v = inputs.get(name)
            if v is None:
                raise PostconditionError(f"token input {name} is missing from the graph")
            if v.dtype != ir.DataType.INT64 or v.shape is None or len(v.shape) != 2:
                raise PostconditionError(f"token input {name} is {v.dtype}{v.shape}, expected int64 [batch, sequence]")
            frozen = [d for d in v.shape if isinstance(d, int)]
            if frozen:
                raise PostconditionError(f"token input {name} has a fixed axis {list(v.shape)}: export froze a shape")
        return PassResult(model, modified=False)


def run_passes(model: ir.Model, passes: list[InPlacePass], what: str, hint: str = "") -> None:
    """Run `passes` in order; a failure becomes a CompiledModelError naming the pass's own message."""
    try:
        PassManager(passes)(model)
    except PassError as e:
        cause: BaseException = e  # PassManager wraps the pass's error twice ("error at step N"): report the cause
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise CompiledModelError(f"{what} failed: {cause}" + (f". {hint}" if hint else "")) from e
