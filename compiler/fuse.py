"""A graph with onnxruntime's fused transformer kernels AND every bias a live, swappable input.

onnxruntime's transformer optimiser (`optimize_model`, model_type "bert") fuses Attention,
SkipLayerNormalization, BiasGelu and EmbedLayerNormalization, but only over a graph whose biases are
constants: on the bias-input graph it loses those fusions, and where a q/k/v bias is both an
initializer and an input it bakes the bias into the fused Attention and leaves the input dead (see
shared ONNX-NOTES, "Optimisation"). So:

1. export with every slot's bias BAKED, holding a unique random placeholder value (seeded, distinct
   per slot), with the legacy exporter and eager attention, as the fusions need;
2. run `optimize_model` on it (opt_level 0: the python fusions only, no onnxruntime session);
3. `LiftPlaceholderBiasesPass`: every initializer whose bytes equal a slot's placeholder is replaced by
   that slot's graph input; an initializer that is a concatenation of placeholders (fused Attention's
   q|k|v bias) is replaced by a Concat(axis=0) of the inputs (and of constant parts for biases that
   are not slots, when only a subset of kinds is compiled);
4. `NoBakedBiasPass` checks that no placeholder is left in a constant (a bias some fusion transformed
   or baked where we cannot lift it), then the base values become the inputs' overridable defaults and
   liveness, token inputs and the input order are checked, as for the unfused graph.

The result has the unfused graph's inputs in the same order (token inputs, then the slots), so a
compiled directory built on it works with runtime.TaskSession unchanged.
"""
from __future__ import annotations

import logging
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from bitfit.encoder.biases import BiasSlot
from bitfit.runtime.errors import BitFitError
from onnx_ir.passes import (
    InPlacePass,
    PassResult,
    PostconditionError,
    PreconditionError,
)
from torch import nn

from .export import export_onnx
from .passes import (
    BiasDefaultsPass,
    CheckBiasInputsPass,
    CheckTokenInputsPass,
    listing,
    run_passes,
)

# The ops export_fused counts: onnxruntime's fused kernels (com.microsoft contrib ops), and
# LayerNormalization, which shows a LayerNorm the optimiser left unfused (RoBERTa's embeddings).
FUSED_OPS = (
    "DynamicQuantizeMatMul",  # int8: a MatMul (and the bias Add after it) on dynamically quantized input
    "MatMulIntegerToFloat",
    "FusedMatMul",
    "Attention",
    "MultiHeadAttention",
    "EmbedLayerNormalization",
    "SkipLayerNormalization",
    "BiasGelu",
    "FastGelu",
    "Gelu",
    "LayerNormalization",
)
PLACEHOLDER_SEED = 20240917
# What with_placeholders does after the transform, as recorded in the compiled manifest.
PLACEHOLDER_STEPS = ("LiftPlaceholderBiasesPass", "NoBakedBiasPass", "BiasDefaultsPass", "CheckBiasInputsPass",
                     "CheckTokenInputsPass", "InputOrderPass")
SUPPORTED_HINT = (
    "fusion with live biases is supported for BERT-style models only (BERT, RoBERTa, XLM-RoBERTa, ELECTRA, DistilBERT); "
    "compile without fusion for this model"
)


def make_placeholders(slots: Sequence[BiasSlot], seed: int = PLACEHOLDER_SEED) -> dict[str, np.ndarray]:
    """A random float32 value per slot, of its shape, all distinct (as bytes, and no value shared)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    seen: set[float] = set()
    for s in slots:
        while True:
            value = rng.normal(0.0, 0.05, tuple(s.parameter.shape)).astype(np.float32)
            values = set(value.ravel().tolist())
            if len(values) == value.size and not values & seen:  # practically always on the first draw
                break
        seen |= values
        out[s.name] = value
    return out


def _float_vector(value: ir.Value | None) -> np.ndarray | None:
    """The constant of an initializer as a flat float32 array, if it is a float32 vector (<= 1 axis > 1)."""
    if value is None or value.const_value is None or value.const_value.dtype != ir.DataType.FLOAT:
        return None
    shape = tuple(value.const_value.shape)
    if sum(d > 1 for d in shape) > 1:
        return None  # a weight matrix: never a bias
    return value.const_value.numpy().reshape(-1)


class _Placeholders:
    """Find placeholders in float32 vectors fast: by the bits of their first element, then whole."""

    def __init__(self, placeholders: Mapping[str, np.ndarray]):
        flat = {k: np.ascontiguousarray(v, dtype=np.float32).reshape(-1) for k, v in placeholders.items()}
        self.by_first: dict[int, list[tuple[str, np.ndarray]]] = {}
        for name, v in flat.items():
            if v.size:
                self.by_first.setdefault(int(v.view(np.uint32)[0]), []).append((name, v))
        self.firsts = np.array(sorted(self.by_first), dtype=np.uint32)

    def split(self, array: np.ndarray) -> list[str | np.ndarray] | None:
        """`array` as consecutive segments: a placeholder's slot name, or a constant run between them.

        None when no placeholder occurs in it. Fused Attention's q|k|v bias is [q, k, v] when all three
        are slots, and e.g. [q, array(k|v)] when only bq is.
        """
        bits = np.ascontiguousarray(array, dtype=np.float32).reshape(-1).view(np.uint32)
        segments: list[str | np.ndarray] = []
        start = 0  # start of the current constant run
        for pos in np.flatnonzero(np.isin(bits, self.firsts)).tolist():
            if pos < start:
                continue
            for name, v in self.by_first[int(bits[pos])]:
                if pos + v.size <= bits.size and np.array_equal(bits[pos : pos + v.size], v.view(np.uint32)):
                    if pos > start:
                        segments.append(array[start:pos].copy())
                    segments.append(name)
                    start = pos + v.size
                    break
        if not segments:
            return None
        if start < bits.size:
            segments.append(array[start:].copy())
        return segments


class LiftPlaceholderBiasesPass(InPlacePass):
    """Turn every placeholder constant back into its slot's graph input.

    Adds one float32 input per slot (in the given order, after the existing inputs) and rewires each
    initializer that equals a placeholder to it; an initializer that is a concatenation of placeholders
    (fused Attention's q|k|v bias) is replaced by Concat(axis=0) of the inputs, with constant parts
    for the biases that are no slots. Lifted initializers are removed. Slots found nowhere keep an
    unused input: CheckBiasInputsPass reports those.
    """

    def __init__(self, placeholders: Mapping[str, np.ndarray]):
        super().__init__()
        self.placeholders = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in placeholders.items()}

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        taken = {v.name for v in graph.inputs} | set(graph.initializers)
        clash = sorted(taken & self.placeholders.keys())
        if clash:
            raise PreconditionError(f"the graph already has values named {clash[:4]}: cannot add them as inputs")
        if len({v.tobytes() for v in self.placeholders.values()}) != len(self.placeholders):
            raise PreconditionError("two slots share a placeholder value: placeholders must be distinct")
        finder = _Placeholders(self.placeholders)
        inputs = {}
        for name, value in self.placeholders.items():
            v = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(value.shape))
            graph.inputs.append(v)
            inputs[name] = v

        for init_name, init in list(graph.initializers.items()):
            array = _float_vector(init)
            if array is None or array.size == 0 or init.is_graph_output():
                continue
            segments = finder.split(array)
            if segments is None:
                continue
            uses = list(init.uses())
            if len(segments) == 1:
                if tuple(init.const_value.shape) != self.placeholders[segments[0]].shape:
                    continue  # same values, other shape: left for NoBakedBiasPass to report
                replacement = inputs[segments[0]]
            else:
                if len(init.const_value.shape) != 1 or not uses:
                    continue  # a concatenation that is not a vector: left for NoBakedBiasPass to report
                parts = []
                for i, seg in enumerate(segments):
                    if isinstance(seg, str):
                        parts.append(inputs[seg])
                    else:  # the part of a fused bias that is no slot (a subset compile) stays a constant
                        const = ir.Value(
                            name=f"{init_name}_part{i}", type=ir.TensorType(ir.DataType.FLOAT),
                            shape=ir.Shape(seg.shape), const_value=ir.tensor(seg, name=f"{init_name}_part{i}"),
                        )
                        graph.register_initializer(const)
                        parts.append(const)
                concat = ir.Node("", "Concat", parts, [ir.AttrInt64("axis", 0)], name=f"{init_name}_lifted_concat")
                out = concat.outputs[0]
                out.name = f"{init_name}_lifted"
                out.dtype = ir.DataType.FLOAT
                out.shape = ir.Shape([array.size])
                graph.insert_before(min((u.node for u in uses), key=graph.index), concat)
                replacement = out
            init.replace_all_uses_with(replacement)
            graph.initializers.pop(init_name)
        return PassResult(model, modified=True)


class NoBakedBiasPass(InPlacePass):
    """No constant still holds a placeholder, alone or inside a concatenation.

    One that does is a bias a fusion baked in a form we could not lift: swapping that slot's bias would
    silently change nothing, so this is an error.
    """

    def __init__(self, placeholders: Mapping[str, np.ndarray]):
        super().__init__()
        self.placeholders = {k: np.ascontiguousarray(v, dtype=np.float32).reshape(-1) for k, v in placeholders.items()}

    def call(self, model: ir.Model) -> PassResult:
        constants: list[tuple[str, np.ndarray]] = []
        for name, init in model.graph.initializers.items():
            array = _float_vector(init)
            if array is not None:
                constants.append((name, array))
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
                continue
            attr = node.attributes.get("value")
            if attr is not None and attr.type == ir.AttributeType.TENSOR:
                t = attr.as_tensor()
                if t.dtype == ir.DataType.FLOAT:
                    constants.append((f"Constant {node.name}", t.numpy().reshape(-1)))
        problems = []
        for where, array in constants:
            raw = array.tobytes()
            for slot, value in self.placeholders.items():
                if _contains(raw, value.tobytes()):
                    problems.append(f"{slot} is baked into {where} {list(array.shape)}")
        if problems:
            raise PostconditionError(
                f"{len(problems)} biases are baked into the fused graph and cannot be fed: {listing(problems)}")
        return PassResult(model, modified=False)


def _contains(haystack: bytes, needle: bytes) -> bool:
    """Whether `needle` occurs in `haystack` at a float32 boundary."""
    start = haystack.find(needle)
    while start != -1:
        if start % 4 == 0:
            return True
        start = haystack.find(needle, start + 1)
    return False


class InputOrderPass(InPlacePass):
    """The graph's inputs are exactly `names`, in that order (reordered if only the order differs)."""

    def __init__(self, names: Sequence[str]):
        super().__init__()
        self.names = list(names)

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        current = {v.name: v for v in graph.inputs}
        if set(current) != set(self.names) or len(current) != len(graph.inputs):
            raise PostconditionError(
                f"the fused graph's inputs differ from the expected ones (only in graph: "
                f"{sorted(set(current) - set(self.names))[:4]}, missing: {sorted(set(self.names) - set(current))[:4]})"
            )
        if [v.name for v in graph.inputs] == self.names:
            return PassResult(model, modified=False)
        graph.inputs.clear()
        graph.inputs.extend(current[n] for n in self.names)
        return PassResult(model, modified=True)


def fused_op_counts(model: ir.Model) -> dict[str, int]:
    """How many of each fused kernel (FUSED_OPS, com.microsoft or default domain) the graph has; zeros left out."""
    counts = Counter(n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.op_type in FUSED_OPS)
    return {op: counts[op] for op in FUSED_OPS if counts[op]}


def _config_sizes(config) -> tuple[int, int, int]:
    """(num_heads, hidden_size, num_layers); DistilBERT calls them n_heads, dim, n_layers."""
    def first(*names: str) -> int:
        for n in names:
            if getattr(config, n, None) is not None:
                return int(getattr(config, n))
        raise BitFitError(f"the model config has none of {names}: cannot fuse {config.model_type!r}. {SUPPORTED_HINT}")

    return (
        first("num_attention_heads", "n_heads"),
        first("hidden_size", "dim"),
        first("num_hidden_layers", "n_layers"),
    )


def _optimize(raw: Path, num_heads: int, hidden_size: int):
    from onnxruntime.transformers.optimizer import optimize_model

    # The optimiser logs every fusion it tries at INFO/WARNING; keep the console for our own messages.
    logger = logging.getLogger("onnxruntime.transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return optimize_model(
            str(raw), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, opt_level=0, use_gpu=False
        )
    finally:
        logger.setLevel(level)




def with_placeholders(
    encoder: nn.Module,
    slots: list[BiasSlot],
    token_inputs: list[str],
    opset: int,
    transform: Callable[[Path], ir.Model],
    what: str,
    hint: str,
    *,
    defaults: bool = True,
    seed: int = PLACEHOLDER_SEED,
) -> ir.Model:
    """The trick that lets an optimiser fuse biases it would leave alone while they are inputs: export the
    encoder with every slot's bias baked in as a distinct placeholder value, let `transform` (given that
    graph's path) optimise it however it likes, then lift each placeholder back to its slot's input (by
    value; a fused q|k|v bias becomes a Concat of the inputs) and refuse any left baked. defaults: give each
    input the base value as its default (False: plain required inputs)."""
    base = {s.name: s.parameter.detach().float().cpu().numpy().copy() for s in slots}
    placeholders = make_placeholders(slots, seed)
    with tempfile.TemporaryDirectory(prefix="bitfit-placeholders-") as tmp:
        raw = Path(tmp) / "baked.onnx"
        saved = [s.parameter.detach().clone() for s in slots]
        try:
            with torch.no_grad():
                for s in slots:
                    s.parameter.copy_(torch.from_numpy(placeholders[s.name]))
            export_onnx(encoder, [], token_inputs, raw, opset)
        finally:
            with torch.no_grad():
                for s, value in zip(slots, saved):
                    s.parameter.copy_(value)
        model = transform(raw)
    passes = [
        LiftPlaceholderBiasesPass(placeholders),
        NoBakedBiasPass(placeholders),
        *([BiasDefaultsPass(base)] if defaults else []),
        CheckBiasInputsPass({k: v.shape for k, v in base.items()}),
        CheckTokenInputsPass(token_inputs),
        InputOrderPass([*token_inputs, *base]),
    ]
    run_passes(model, passes, what, hint)
    # The optimisers' contrib ops need their domain imported: onnxruntime runs without it, but onnx's
    # shape inference (and so the int8 quantizer) rejects the graph.
    if any(node.domain == "com.microsoft" for node in model.graph):
        model.opset_imports.setdefault("com.microsoft", 1)
    return model


def export_fused(
    encoder: nn.Module,
    slots: list[BiasSlot],
    token_inputs: list[str],
    path: str | Path,
    opset: int,
    *,
    defaults: bool = True,
    seed: int = PLACEHOLDER_SEED,
) -> dict[str, int]:
    """Write the fused graph (fused_model) to `path`; returns the fused op counts."""
    model = fused_model(encoder, slots, token_inputs, opset, defaults=defaults, seed=seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ir.save(model, path)
    return fused_op_counts(model)


def fused_model(
    encoder: nn.Module,
    slots: list[BiasSlot],
    token_inputs: list[str],
    opset: int,
    *,
    defaults: bool = True,
    seed: int = PLACEHOLDER_SEED,
) -> ir.Model:
    """The fused graph, every slot a live input (with its base value as default), in memory.

    `encoder` must be loaded with attn_implementation="eager" (the Attention fusion does not match
    sdpa); fused_op_counts(model) then gives e.g. {"Attention": 12, "SkipLayerNormalization": 24, ...}.
    Raises BitFitError when the model does not fuse (one Attention per layer) or a bias cannot be lifted.
    """
    config = encoder.config
    num_heads, hidden_size, num_layers = _config_sizes(config)
    attn = getattr(config, "_attn_implementation", None)
    if attn not in (None, "eager"):
        raise BitFitError(
            f"the encoder uses {attn!r} attention, which onnxruntime's Attention fusion does not match: load it "
            "with load_encoder(model, attn_implementation='eager')"
        )

    def optimise(raw: Path) -> ir.Model:
        model = ir.from_proto(_optimize(raw, num_heads, hidden_size).model)
        counts = fused_op_counts(model)
        if counts.get("Attention", 0) != num_layers:
            raise BitFitError(
                f"onnxruntime's optimiser fused {counts.get('Attention', 0)} Attention nodes in the "
                f"{num_layers}-layer {config.model_type!r} encoder (fused: {counts or 'nothing'}); {SUPPORTED_HINT}"
            )
        return model

    return with_placeholders(encoder, slots, token_inputs, opset, optimise,
                             f"fusing {config.model_type!r} with live biases", SUPPORTED_HINT, defaults=defaults,
                             seed=seed)
