"""Compile a frozen encoder once to ONNX, with every selected bias a named graph input: export
(compiler.export or compiler.fuse), optional int8 / fp16, the in-graph head, and the compiled directory's
manifest, tokenizer and base biases.

The graph stays in memory (an onnx-ir model) from the export to the last pass and is saved once; it touches
the disk in between only where onnxruntime's tools read and write files (torch's export, the int8 quantizer
and the offline optimiser, onnxruntime's transformer fusion).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir
from bitfit.encoder.biases import find_biases, parse_subset
from bitfit.encoder.model import (
    base_fingerprint,
    load_encoder,
    load_tokenizer,
    max_positions,
    type_vocab_size,
    uses_token_types,
)
from bitfit.runtime import args as A
from bitfit.runtime import compiled as cm
from bitfit.runtime import schema as S
from bitfit.runtime.errors import BitFitError, CompiledModelError, ParityError
from bitfit.runtime.fs import check_target, output_dir
from bitfit.runtime.pack import TensorSpec, model_identity
from bitfit.runtime.version import __version__
from safetensors.numpy import save_file

from .export import export_onnx
from .fuse import PLACEHOLDER_STEPS, fused_model, fused_op_counts
from .head import AddHeadPass
from .passes import (
    BiasDefaultsPass,
    CheckBiasInputsPass,
    CheckTokenInputsPass,
    run_passes,
)
from .quantize import QUANTIZE_MODES, export_int8_live, quantize_int8, to_fp16_model


def compile_model(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    biases: str = "all",
    opset: int = cm.DEFAULT_OPSET,
    quantize: str | None = None,
    fp16: bool = False,
    fuse: bool = False,
    mixed: bool = False,
    head: bool = True,
    overwrite: bool = False,
    bias_defaults: bool | None = None,
    verify: Sequence[str | os.PathLike] | None = None,
    log: Callable[[str], None] = print,
    target: str = "onnx",
    buckets: str | Sequence[tuple[int, int]] | None = None,
) -> Path:
    """Export `model`'s encoder to `out`/model.onnx with bias inputs, plus tokenizer.json, the base biases and
    manifest.json. The directory is written by the toolkit's atomic writer: an existing `out` (only with
    overwrite) stays as it is until the new one is complete. (`bitfit.compile`, and `compile` here: the
    public name; inside this module it would shadow the builtin.)

    quantize: None (fp32), "int8" (dynamic, per-channel int8 weights) or "int8-per-tensor"; biases stay
    fp32 graph inputs either way. fp16: fp16 weights for GPUs, bias inputs still fp32. fuse: onnxruntime's
    fused kernels (Attention, SkipLayerNormalization, BiasGelu, EmbedLayerNormalization) with every bias still
    a live input; BERT-style models only. mixed: each bias is a [tasks, dim] table and a task_ids [batch]
    input picks every row's task, so one batch can hold rows of different tasks (fused kernels take 1-D
    biases only: not with fuse).
    head: add the task head as optional inputs with logits / token_logits outputs (compiler/head.py), which
    adapter files and other bindings need. onnxruntime runs it on every call, whichever outputs are bound
    (1-3% of a MiniLM call at batch 1, under 1% at 8: benchmarks/head_cost.py), so head=False drops it
    where only our runtime, which applies the head in numpy, serves. Mixed graphs never have one.
    quantize int8 on a plain graph: the encoder is quantized with placeholder biases and optimised offline by
    onnxruntime, which folds each bias Add into its int8 kernels, then the biases are lifted back to inputs
    (compiler.quantize.export_int8_live: as fast as a baked int8 graph); where that fails, the plain int8
    graph (bias Adds unfused, about 10% slower) is compiled instead, with a message.
    bias_defaults=False: bias inputs are plain required inputs, without the base values as defaults (the
    runtime feeds base values for biases a pack did not train). For graph compilers that turn any input with
    a default into a constant (OpenVINO): such a graph has no in-graph head.
    verify: task packs (possibly none) to check against PyTorch before the graph is put in place
    (compiler.verify, strict): a graph that fails parity raises ParityError and never replaces `out`.
    target: "onnx" (the graph alone), or an IREE target (compiler/iree.py: "iree-cpu" runs on TaskSession's
    backend "iree"; iree-cuda / iree-rocm / iree-vulkan are compiled only): the fp32 graph without bias defaults,
    plus an ahead-of-time module per shape bucket ("1x128,8x128", "dynamic"; default: dynamic shapes).
    bias_defaults None: True for onnx, False (the only choice) for IREE targets.
    """
    _check_options(model, out, biases, opset, quantize, verify, log, fp16=fp16, fuse=fuse, mixed=mixed, head=head,
                   overwrite=overwrite)
    bias_defaults, buckets = _target_options(target, buckets, quantize=quantize, fp16=fp16, fuse=fuse,
                                             bias_defaults=bias_defaults)
    out = check_target(out, overwrite=overwrite, marker=cm.MANIFEST_FILE, format=cm.FORMAT,
                       what="compiled model directory")
    bias_kinds = parse_subset(biases)
    tokenizer = load_tokenizer(model)
    if tokenizer.pad_token is None:
        raise BitFitError(f"the tokenizer of {model!r} has no pad token: the runtime pads batches with it")
    encoder = load_encoder(model, attn_implementation="eager")
    slots = find_biases(encoder, bias_kinds)
    token_inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if uses_token_types(encoder) else [])
    hidden_size = int(encoder.config.hidden_size)

    with output_dir(out, overwrite=overwrite, marker=cm.MANIFEST_FILE, format=cm.FORMAT,
                    what="compiled model directory") as tmp:
        graph = _build_graph(encoder, slots, token_inputs, tmp, opset, quantize=quantize, fp16=fp16, fuse=fuse,
                             mixed=mixed, defaults=bias_defaults, what=repr(model), log=log)
        head_inputs: list[TensorSpec] = []
        outputs = [cm.OUTPUT_NAME]
        if head and not mixed and bias_defaults:  # last, so the head is never fused, quantized or cast: fp32 always
            head_pass = AddHeadPass(hidden_size)
            run_passes(graph.model, [head_pass], f"adding the task head to {model!r}")
            head_inputs, outputs = head_pass.specs, [cm.OUTPUT_NAME, cm.LOGITS, cm.TOKEN_LOGITS]
            graph.steps.append("AddHeadPass")
        ir.save(graph.model, tmp / cm.MODEL_FILE)  # the one save of the graph
        save_file({s.name: np.ascontiguousarray(s.parameter.detach().float().numpy()) for s in slots},
                  str(tmp / cm.BASE_BIASES_FILE))
        tokenizer.backend_tokenizer.save(str(tmp / cm.TOKENIZER_FILE))
        manifest = _manifest(model, encoder, tokenizer, slots, token_inputs, graph, opset, bias_defaults=bias_defaults,
                             mixed=mixed, head_inputs=head_inputs, outputs=outputs, quantize=quantize, fp16=fp16)
        if target != "onnx":
            from .iree import compile_modules

            manifest.iree = compile_modules(tmp, manifest, target=target, buckets=buckets, log=log)
            manifest.passes.append(f"iree-compile({target})")
        cm.write_manifest(tmp, manifest)
        if verify is not None:  # on the finished directory, before it replaces anything
            # other IREE targets than the CPU's: the graph only (their modules do not run here)
            _check_parity(tmp, out, list(verify), model, log, "iree" if target == "iree-cpu" else "onnxruntime")
    size = (out / cm.MODEL_FILE).stat().st_size
    log(f"compiled {out / cm.MODEL_FILE} ({size / 2**20:.1f} MiB, {len(slots)} bias inputs, {len(token_inputs)} token "
        "inputs)")
    return out


compile = compile_model  # noqa: A001 - the public name (bitfit.compile); callers import it from here


def _check_options(model, out, biases, opset, quantize, verify, log, **flags: bool) -> None:
    """compile's arguments, each checked by name before anything is loaded."""
    A.check("model", model, A.PATH)
    A.check("out", out, A.PATH)
    A.check("biases", biases, S.text(256))
    for name, flag in flags.items():
        A.check(name, flag, S.boolean())
    A.check("verify", verify, A.optional(A.PACKS))
    A.check("log", log, A.CALLABLE)
    if flags["mixed"] and flags["fuse"]:
        raise BitFitError("--mixed and --fuse do not combine: fused kernels take one bias per batch; choose one")
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise BitFitError(f"unknown quantize mode {quantize!r}: use one of {', '.join(QUANTIZE_MODES)}")
    if quantize and flags["fp16"]:
        raise BitFitError("choose one of --quantize and --fp16: int8 weights are for CPUs, fp16 weights for GPUs")
    if not isinstance(opset, int) or not cm.OPSETS[0] <= opset <= cm.OPSETS[1]:
        raise BitFitError(f"opset must be from {cm.OPSETS[0]} to {cm.OPSETS[1]}, got {opset!r}")


def _target_options(target: str, buckets: str | Sequence[tuple[int, int]] | None, *, quantize: str | None,
                    fp16: bool, fuse: bool, bias_defaults: bool | None) -> tuple[bool, list | None]:
    """(bias_defaults, buckets) for `target`: an IREE target refuses what its importer cannot take and has shape
    buckets; bias_defaults None means True for onnx, False (the only choice) for IREE."""
    A.check("target", target, S.one_of(("onnx", *cm.IREE_TARGETS)))
    A.check("bias_defaults", bias_defaults, A.optional(S.boolean()))
    if target != "onnx":
        from .iree import check_options, parse_buckets

        check_options(target, quantize=quantize, fp16=fp16, fuse=fuse, bias_defaults=bias_defaults)
        return False, parse_buckets(buckets)
    if buckets is not None:
        raise BitFitError("shape buckets are for the IREE targets: add --target iree-cpu, or drop --buckets")
    return True if bias_defaults is None else bias_defaults, None


def _check_parity(tmp: Path, out: Path, packs: list, model: str | os.PathLike, log: Callable[[str], None],
                  backend: str) -> None:
    """compile(verify=...): the finished directory against PyTorch; ParityError (a failed check) keeps `out`."""
    from .verify import verify as check_parity

    report = check_parity(tmp, packs, model=model, log=log, strict=False, backend=backend)
    log(report.table())
    if not report.ok:
        raise ParityError(f"{report.failure_summary().replace(str(tmp), str(out))}; {out} left as it was", report)


def _manifest(model: str | os.PathLike, encoder, tokenizer, slots, token_inputs: list[str], graph: _Graph, opset: int,
              *, bias_defaults: bool, mixed: bool, head_inputs: list[TensorSpec], outputs: list[str],
              quantize: str | None, fp16: bool) -> cm.CompiledManifest:
    config = encoder.config
    base_id, base_path = model_identity(model)
    return cm.CompiledManifest(
        base_model=base_id,
        base_model_path=base_path,
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
        vocab_size=int(encoder.get_input_embeddings().num_embeddings),
        type_vocab_size=type_vocab_size(encoder),
        passes=graph.steps,
        fused_ops=graph.fused_ops,
        optimized_with=graph.optimized_with,
        bias_defaults=bias_defaults,
        mixed=mixed,
        head_inputs=head_inputs,
        outputs=outputs,
        precision=QUANTIZE_MODES[quantize] if quantize else "fp16" if fp16 else "fp32",
        tool_version=__version__,
    )


@dataclass
class _Graph:
    """The graph being compiled, in memory, and what the manifest records of how it was made."""

    model: ir.Model
    steps: list[str]  # as the manifest records them
    fused_ops: dict[str, int] = field(default_factory=dict)  # onnxruntime fused kernels, by op
    optimized_with: str = ""  # what optimised it offline, or ""


def _build_graph(encoder, slots, token_inputs: list[str], tmp: Path, opset: int, *, quantize: str | None, fp16: bool,
                 fuse: bool, mixed: bool, defaults: bool, what: str, log: Callable[[str], None]) -> _Graph:
    """The graph without the head, in memory. `tmp` holds the files onnxruntime's tools need on the way."""
    base = {s.name: s.parameter.detach().float().numpy() for s in slots}
    # mixed graphs take [tasks, dim] tables where plain ones take [dim] vectors
    checked = {k: (None, *v.shape) if mixed else v.shape for k, v in base.items()}
    placeholder_steps = [s for s in PLACEHOLDER_STEPS if defaults or s != "BiasDefaultsPass"]
    if quantize and not fuse and not mixed:
        log(f"exporting {encoder.config.model_type} with int8 kernels fused around {len(slots)} live bias inputs "
            f"({QUANTIZE_MODES[quantize]}), opset {opset}")
        try:
            model, ops, optimised = export_int8_live(encoder, slots, token_inputs, opset,
                                                     per_channel=quantize == "int8", defaults=defaults)
            steps = ["export(placeholder biases)", f"quantize_dynamic({QUANTIZE_MODES[quantize]})",
                     f"optimise_offline({optimised})", *placeholder_steps]
            return _Graph(model, steps, ops, optimised)
        except (BitFitError, CompiledModelError) as e:
            log(f"note: onnxruntime did not fuse its int8 kernels around the live biases here ({e}); compiling the "
                "plain int8 graph instead (bias Adds unfused: about 10% slower)")
    if fuse:
        log(f"exporting {encoder.config.model_type} with onnxruntime's fused kernels ({len(slots)} bias inputs) "
            f"opset {opset}")
        model = fused_model(encoder, slots, token_inputs, opset, defaults=defaults)
        graph = _Graph(model, ["export(placeholder biases)", "onnxruntime.transformers.optimize_model(bert)",
                               *placeholder_steps], fused_op_counts(model))
    else:
        graph = _export_plain(encoder, slots, token_inputs, tmp, opset, base, checked, mixed=mixed, defaults=defaults,
                              what=what, log=log)
    if quantize:
        log(f"quantizing weights: {QUANTIZE_MODES[quantize]}")
        _quantize(graph, tmp, quantize, base, checked, defaults=defaults, what=what)
    if fp16:
        log("converting weights to fp16 (bias inputs stay fp32)")
        graph.model = to_fp16_model(graph.model)
        run_passes(graph.model, [CheckBiasInputsPass(checked)], f"fp16 conversion of {what}", "compile without --fp16")
        graph.steps += ["convert_float_to_float16(keep_io_types)", "CheckBiasInputsPass"]
    return graph


def _export_plain(encoder, slots, token_inputs: list[str], tmp: Path, opset: int, base: dict[str, np.ndarray],
                  checked: dict, *, mixed: bool, defaults: bool, what: str, log: Callable[[str], None]) -> _Graph:
    """torch's export (to a file: that is how it writes), then the bias passes on the graph in memory."""
    bias_kinds = ",".join(dict.fromkeys(s.kind for s in slots))
    log(f"exporting {encoder.config.model_type} ({len(slots)} bias inputs: {bias_kinds}) with opset {opset}")
    raw = tmp / "raw.onnx"
    export_onnx(encoder, slots, token_inputs, raw, opset, mixed=mixed)
    model = ir.load(raw)
    raw.unlink()
    # mixed defaults: a one-row table of base values (task_ids 0 then means the base model)
    values = {k: v[None, :] for k, v in base.items()} if mixed else base
    passes = [*([BiasDefaultsPass(values)] if defaults else []), CheckBiasInputsPass(checked),
              CheckTokenInputsPass(token_inputs)]
    run_passes(model, passes, f"compiling {what}")
    steps = [f"export({'bias tables + task_ids' if mixed else 'bias inputs'})", *(type(p).__name__ for p in passes)]
    return _Graph(model, steps)


def _quantize(graph: _Graph, tmp: Path, quantize: str, base: dict[str, np.ndarray], checked: dict, *,
              defaults: bool, what: str) -> None:
    """int8 weights through onnxruntime's quantizer, which reads and writes files: the graph goes out and back."""
    fp32, int8 = tmp / "fp32.onnx", tmp / "int8.onnx"
    ir.save(graph.model, fp32)
    quantize_int8(fp32, int8, per_channel=quantize == "int8")
    graph.model = ir.load(int8)
    fp32.unlink()
    int8.unlink()
    run_passes(graph.model, [CheckBiasInputsPass(checked)], f"quantizing {what}", "compile without --quantize")
    lost = [v.name for v in graph.model.graph.inputs if v.name in base and (v.const_value is None) == defaults]
    if lost:
        raise CompiledModelError(f"quantizing changed the defaults of {lost[:4]}: compile without --quantize")
    graph.steps += [f"quantize_dynamic({QUANTIZE_MODES[quantize]})", "CheckBiasInputsPass"]
