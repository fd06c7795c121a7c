"""Compile a frozen encoder once to ONNX, with every selected bias a named graph input.

Export uses torch's legacy (TorchScript) exporter with a wrapper whose forward takes the biases as
inputs and puts them into the modules for the duration of the call: measured here, this gives one
cleanly named input per bias and the fastest graph (see shared ONNX-NOTES). Biases exported as
inputs cannot be merged with equal-valued initializers, which the exporters otherwise do.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import onnx_ir as ir
import torch
from safetensors.numpy import save_file
from torch import nn

from runtime import compiled as cm
from runtime.errors import BitFitError, CompiledModelError
from runtime.pack import TensorSpec, sha256_file
from runtime.version import __version__
from training.biases import BiasSlot, find_biases, parse_subset
from training.model import base_fingerprint, load_encoder, load_tokenizer, max_positions, uses_token_types

from .fuse import FUSE_STEPS, export_fused
from .head import HEAD_INPUT_NAMES, AddHeadPass
from .passes import BiasDefaultsPass, CheckBiasInputsPass, CheckTokenInputsPass, run_passes
from .quantize import QUANTIZE_MODES, quantize_int8, to_fp16

DEFAULT_OPSET = 17  # LayerNormalization is a single op from 17 on


class BiasInputWrapper(nn.Module):
    """forward(input_ids, attention_mask, [token_type_ids], *biases) -> last_hidden_state."""

    def __init__(self, encoder: nn.Module, slots: list[BiasSlot], token_inputs: list[str]):
        super().__init__()
        self.encoder = encoder
        self.slots = slots
        self.token_inputs = token_inputs

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        tokens = dict(zip(self.token_inputs, args))
        biases = args[len(self.token_inputs) :]
        saved = [s.module._parameters["bias"] for s in self.slots]
        try:
            for s, b in zip(self.slots, biases):
                s.module._parameters["bias"] = b
            # keyword arguments: transformers 5 models fail positional calls under the legacy exporter
            return self.encoder(**tokens).last_hidden_state
        finally:
            for s, p in zip(self.slots, saved):
                s.module._parameters["bias"] = p


class BiasTableWrapper(BiasInputWrapper):
    """forward(input_ids, attention_mask, [token_type_ids], task_ids, *tables) -> last_hidden_state.

    For mixed-task batches: row i adds tables[k][task_ids[i]] wherever the model adds bias k. Each chosen
    module runs without its bias and a forward hook adds the gathered row, broadcast over the sequence;
    that works the same for Linear and LayerNorm, whose bias is added last in both.
    """

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        n = len(self.token_inputs)
        tokens = dict(zip(self.token_inputs, args[:n]))
        task_ids, tables = args[n], args[n + 1 :]
        saved = [s.module._parameters["bias"] for s in self.slots]
        hooks = []
        try:
            for s, table in zip(self.slots, tables):
                s.module._parameters["bias"] = None
                rows = table[task_ids].unsqueeze(1)  # [batch, 1, dim]
                hooks.append(s.module.register_forward_hook(_add_rows(s, rows)))
            return self.encoder(**tokens).last_hidden_state
        finally:
            for h in hooks:
                h.remove()
            for s, p in zip(self.slots, saved):
                s.module._parameters["bias"] = p


def _add_rows(slot: BiasSlot, rows: torch.Tensor) -> Callable:
    """The forward hook that adds each row's bias, for a module that only ever sees [batch, sequence, dim].

    DeBERTa-v2 also runs its query and key projections on the relative-position embeddings, one tensor shared
    by every row; a per-row bias cannot go there, and broadcasting it would silently compute something else.
    """

    def hook(_module: nn.Module, _inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        if out.dim() != 3 or out.shape[0] != rows.shape[0]:
            raise BitFitError(
                f"--mixed cannot compile the bias {slot.name}: the model also applies {slot.source} to a tensor "
                f"of shape {tuple(int(d) for d in out.shape)} shared by all rows of a batch (as DeBERTa-v2 does "
                f"to its relative positions), which a per-row bias table cannot express; compile without --mixed, "
                f"or with --biases leaving out {slot.kind}"
            )
        return out + rows

    return hook


def export_onnx(
    encoder: nn.Module, slots: list[BiasSlot], token_inputs: list[str], path: Path, opset: int, *, mixed: bool = False
) -> None:
    """mixed=False: one 1-D input per bias. mixed=True: a [tasks, dim] table per bias plus task_ids [batch]."""
    wrapper = (BiasTableWrapper if mixed else BiasInputWrapper)(encoder, slots, token_inputs).eval()
    # Export on a batch of 2 x 7 (and check dynamic axes afterwards): shapes of 1 get specialised away.
    ids = torch.randint(5, 50, (2, 7))
    example = {
        "input_ids": ids,
        "attention_mask": torch.tensor([[1] * 7, [1] * 5 + [0] * 2]),
        "token_type_ids": torch.zeros_like(ids),
    }
    dynamic = {n: {0: "batch", 1: "sequence"} for n in token_inputs}
    dynamic[cm.OUTPUT_NAME] = {0: "batch", 1: "sequence"}
    if mixed:  # 3 tasks and ids [0, 2]: a table of 1 row or equal ids would get specialised away
        tables = tuple(s.parameter.detach().clone().expand(3, -1).contiguous() for s in slots)
        args = tuple(example[n] for n in token_inputs) + (torch.tensor([0, 2]),) + tables
        names = [*token_inputs, cm.TASK_IDS, *(s.name for s in slots)]
        dynamic[cm.TASK_IDS] = {0: "batch"}
        dynamic.update({s.name: {0: "tasks"} for s in slots})
    else:
        args = tuple(example[n] for n in token_inputs) + tuple(s.parameter.detach().clone() for s in slots)
        names = [*token_inputs, *(s.name for s in slots)]
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about Python-side shape checks in transformers' masking code; the dynamic axes
        # are checked by a pass and by parity tests on other shapes instead.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*aten::index.*")
        # DeBERTa-v2's attention scale is torch.tensor(size): traced to a constant, as it should be
        warnings.filterwarnings("ignore", message="To copy construct from a tensor")
        torch.onnx.export(
            wrapper,
            args,
            str(path),
            input_names=names,
            output_names=[cm.OUTPUT_NAME],
            dynamic_axes=dynamic,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


def compile(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    biases: str = "all",
    opset: int = DEFAULT_OPSET,
    quantize: str | None = None,
    fp16: bool = False,
    fuse: bool = False,
    mixed: bool = False,
    head: bool = True,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Export `model`'s encoder to `out`/model.onnx with bias inputs, plus tokenizer.json and manifest.json.

    quantize: None (fp32), "int8" (dynamic, per-channel int8 weights) or "int8-per-tensor"; biases stay
    fp32 graph inputs either way. fp16: fp16 weights for GPUs, bias inputs still fp32. fuse: onnxruntime's fused kernels (Attention, SkipLayerNormalization,
    BiasGelu, EmbedLayerNormalization) with every bias still a live input; BERT-style models only.
    mixed: each bias is a [tasks, dim] table and a task_ids [batch] input picks every row's task, so one
    batch can hold rows of different tasks (fused kernels take 1-D biases only: not with fuse).
    head: add the task head as optional inputs with logits / token_logits outputs (compiler/head.py), which
    adapter files and other bindings need. onnxruntime runs it on every call, whichever outputs are bound
    (1-3% of a MiniLM call at batch 1, under 1% at 8: benchmarks/head_cost.py), so head=False drops it
    where only our runtime, which applies the head in numpy, serves. Mixed graphs never have one.
    """
    if mixed and fuse:
        raise BitFitError("--mixed and --fuse do not combine: fused kernels take one bias per batch; choose one")
    out = Path(out)
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise BitFitError(f"unknown quantize mode {quantize!r}: use one of {', '.join(QUANTIZE_MODES)}")
    if quantize and fp16:
        raise BitFitError("choose one of --quantize and --fp16: int8 weights are for CPUs, fp16 weights for GPUs")
    if out.exists():
        if not overwrite:
            raise BitFitError(f"{out} already exists: choose another --out, or pass --overwrite to replace it")
        if not (out / cm.MANIFEST_FILE).is_file():
            raise BitFitError(f"{out} exists and is not a compiled model directory: refusing to replace it")
    kinds = parse_subset(biases)
    tokenizer = load_tokenizer(model)
    if tokenizer.pad_token is None:
        raise BitFitError(f"the tokenizer of {model!r} has no pad token: the runtime pads batches with it")
    encoder = load_encoder(model, attn_implementation="eager")
    slots = find_biases(encoder, kinds)
    token_inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if uses_token_types(encoder) else [])
    config = encoder.config

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        defaults = {s.name: s.parameter.detach().float().numpy() for s in slots}
        shapes = {k: v.shape for k, v in defaults.items()}
        fused_ops: dict[str, int] = {}
        if fuse:
            log(f"exporting {config.model_type} with onnxruntime's fused kernels ({len(slots)} bias inputs) opset {opset}")
            fused_ops = export_fused(encoder, slots, token_inputs, tmp / cm.MODEL_FILE, opset)
            steps = list(FUSE_STEPS)
        else:
            log(f"exporting {config.model_type} ({len(slots)} bias inputs: {','.join(kinds)}) with opset {opset}")
            raw = tmp / "raw.onnx"
            export_onnx(encoder, slots, token_inputs, raw, opset, mixed=mixed)
            graph = ir.load(raw)
            raw.unlink()
            if mixed:  # defaults: a one-row table of base values (task_ids 0 then means the base model)
                passes = [BiasDefaultsPass({k: v[None, :] for k, v in defaults.items()}),
                          CheckBiasInputsPass({k: (None, *v) for k, v in shapes.items()}),
                          CheckTokenInputsPass(token_inputs)]
            else:
                passes = [BiasDefaultsPass(defaults), CheckBiasInputsPass(shapes), CheckTokenInputsPass(token_inputs)]
            run_passes(graph, passes, f"compiling {model!r}")
            ir.save(graph, tmp / cm.MODEL_FILE)
            steps = [f"export({'bias tables + task_ids' if mixed else 'bias inputs'})", *(type(p).__name__ for p in passes)]
        if quantize:
            log(f"quantizing weights: {QUANTIZE_MODES[quantize]}")
            fp32 = tmp / "fp32.onnx"
            os.replace(tmp / cm.MODEL_FILE, fp32)
            quantize_int8(fp32, tmp / cm.MODEL_FILE, per_channel=quantize == "int8")
            fp32.unlink()
            quantized = ir.load(tmp / cm.MODEL_FILE)
            checked = {k: (None, *v) for k, v in shapes.items()} if mixed else shapes
            run_passes(quantized, [CheckBiasInputsPass(checked)], f"quantizing {model!r}", "compile without --quantize")
            lost = [v.name for v in quantized.graph.inputs if v.name in defaults and v.const_value is None]
            if lost:
                raise CompiledModelError(f"quantizing dropped the base values of {lost[:4]}: compile without --quantize")
            steps += [f"quantize_dynamic({QUANTIZE_MODES[quantize]})", "CheckBiasInputsPass"]
        if fp16:
            log("converting weights to fp16 (bias inputs stay fp32)")
            to_fp16(tmp / cm.MODEL_FILE)
            checked = {k: (None, *v) for k, v in shapes.items()} if mixed else shapes
            run_passes(ir.load(tmp / cm.MODEL_FILE), [CheckBiasInputsPass(checked)], f"fp16 conversion of {model!r}",
                       "compile without --fp16")
            steps += ["convert_float_to_float16(keep_io_types)", "CheckBiasInputsPass"]
        head_inputs: list[TensorSpec] = []
        outputs = [cm.OUTPUT_NAME]
        if head and not mixed:  # last, so the head is never fused, quantized or cast: fp32 in every variant
            graph = ir.load(tmp / cm.MODEL_FILE)
            head_pass = AddHeadPass(int(config.hidden_size))
            run_passes(graph, [head_pass], f"adding the task head to {model!r}")
            ir.save(graph, tmp / cm.MODEL_FILE)
            head_inputs, outputs = head_pass.specs, [cm.OUTPUT_NAME, cm.LOGITS, cm.TOKEN_LOGITS]
            steps.append("AddHeadPass")
        save_file({k: np.ascontiguousarray(v) for k, v in defaults.items()}, str(tmp / cm.BASE_BIASES_FILE))
        tokenizer.backend_tokenizer.save(str(tmp / cm.TOKENIZER_FILE))
        manifest = cm.CompiledManifest(
            base_model=os.path.abspath(model) if Path(model).is_dir() else str(model),
            base_model_type=config.model_type,
            base_fingerprint=base_fingerprint(encoder),
            hidden_size=int(config.hidden_size),
            num_layers=int(config.num_hidden_layers if hasattr(config, "num_hidden_layers") else config.n_layers),
            max_positions=max_positions(encoder, tokenizer),
            opset=opset,
            token_inputs=token_inputs,
            bias_inputs=[TensorSpec(s.name, tuple(s.parameter.shape), "float32", s.kind, s.layer, s.source) for s in slots],
            pad_token=str(tokenizer.pad_token),
            pad_token_id=int(tokenizer.pad_token_id),
            model_sha256=sha256_file(tmp / cm.MODEL_FILE),
            passes=steps,
            fused_ops=fused_ops,
            mixed=mixed,
            head_inputs=head_inputs,
            outputs=outputs,
            precision=QUANTIZE_MODES[quantize] if quantize else "fp16" if fp16 else "fp32",
            tool_version=__version__,
        )
        cm.write_manifest(tmp, manifest)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = (out / cm.MODEL_FILE).stat().st_size
    log(f"compiled {out / cm.MODEL_FILE} ({size / 2**20:.1f} MiB, {len(slots)} bias inputs, {len(token_inputs)} token inputs)")
    return out


def graph_bias_values(model_path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The default (base) value of each bias input of a compiled graph."""
    graph = ir.load(model_path).graph
    return {v.name: v.const_value.numpy() for v in graph.inputs
            if v.const_value is not None and v.name not in HEAD_INPUT_NAMES}
