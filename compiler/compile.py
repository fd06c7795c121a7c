"""Compile a frozen encoder once to ONNX, with every selected bias a named graph input: export
(compiler.export or compiler.fuse), optional int8 / fp16, the in-graph head, and the compiled directory's
manifest, tokenizer and base biases.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
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
from bitfit.runtime.pack import TensorSpec
from bitfit.runtime.version import __version__
from safetensors.numpy import save_file

from .export import export_onnx
from .fuse import PLACEHOLDER_STEPS, export_fused
from .head import AddHeadPass
from .passes import (
    BiasDefaultsPass,
    CheckBiasInputsPass,
    CheckTokenInputsPass,
    run_passes,
)
from .quantize import QUANTIZE_MODES, export_int8_live, quantize_int8, to_fp16


def compile(
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
    overwrite) stays as it is until the new one is complete.

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
    A.check("model", model, A.PATH)
    A.check("out", out, A.PATH)
    A.check("biases", biases, S.text(256))
    for name, flag in (("fp16", fp16), ("fuse", fuse), ("mixed", mixed), ("head", head), ("overwrite", overwrite)):
        A.check(name, flag, S.boolean())
    A.check("bias_defaults", bias_defaults, A.optional(S.boolean()))
    A.check("verify", verify, A.optional(A.PACKS))
    A.check("log", log, A.CALLABLE)
    A.check("target", target, S.one_of(("onnx", *cm.IREE_TARGETS)))
    if target != "onnx":
        from .iree import check_options, parse_buckets

        check_options(target, quantize=quantize, fp16=fp16, fuse=fuse, bias_defaults=bias_defaults)
        bias_defaults, buckets = False, parse_buckets(buckets)
    elif buckets is not None:
        raise BitFitError("shape buckets are for the IREE targets: add --target iree-cpu, or drop --buckets")
    bias_defaults = True if bias_defaults is None else bias_defaults
    if mixed and fuse:
        raise BitFitError("--mixed and --fuse do not combine: fused kernels take one bias per batch; choose one")
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise BitFitError(f"unknown quantize mode {quantize!r}: use one of {', '.join(QUANTIZE_MODES)}")
    if quantize and fp16:
        raise BitFitError("choose one of --quantize and --fp16: int8 weights are for CPUs, fp16 weights for GPUs")
    if not isinstance(opset, int) or not cm.OPSETS[0] <= opset <= cm.OPSETS[1]:
        raise BitFitError(f"opset must be from {cm.OPSETS[0]} to {cm.OPSETS[1]}, got {opset!r}")
    out = check_target(out, overwrite=overwrite, marker=cm.MANIFEST_FILE, format=cm.FORMAT,
                       what="compiled model directory")
    kinds = parse_subset(biases)
    tokenizer = load_tokenizer(model)
    if tokenizer.pad_token is None:
        raise BitFitError(f"the tokenizer of {model!r} has no pad token: the runtime pads batches with it")
    encoder = load_encoder(model, attn_implementation="eager")
    slots = find_biases(encoder, kinds)
    token_inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if uses_token_types(encoder) else [])
    config = encoder.config

    with output_dir(out, overwrite=overwrite, marker=cm.MANIFEST_FILE, format=cm.FORMAT,
                    what="compiled model directory") as tmp:
        defaults = {s.name: s.parameter.detach().float().numpy() for s in slots}
        built = _build_graph(encoder, slots, token_inputs, tmp / cm.MODEL_FILE, opset, quantize=quantize, fp16=fp16,
                             fuse=fuse, mixed=mixed, defaults=bias_defaults, what=repr(model), log=log)
        steps, fused_ops, optimized_with = built
        head_inputs: list[TensorSpec] = []
        outputs = [cm.OUTPUT_NAME]
        if head and not mixed and bias_defaults:  # last, so the head is never fused, quantized or cast: fp32 always
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
            vocab_size=int(encoder.get_input_embeddings().num_embeddings),
            type_vocab_size=type_vocab_size(encoder),
            passes=steps,
            fused_ops=fused_ops,
            optimized_with=optimized_with,
            bias_defaults=bias_defaults,
            mixed=mixed,
            head_inputs=head_inputs,
            outputs=outputs,
            precision=QUANTIZE_MODES[quantize] if quantize else "fp16" if fp16 else "fp32",
            tool_version=__version__,
        )
        if target != "onnx":
            from .iree import compile_modules

            manifest.iree = compile_modules(tmp, manifest, target=target, buckets=buckets, log=log)
            manifest.passes.append(f"iree-compile({target})")
        cm.write_manifest(tmp, manifest)
        if verify is not None:  # on the finished directory, before it replaces anything
            from .verify import verify as check_parity

            backend = "iree" if target == "iree-cpu" else "onnxruntime"  # other IREE targets: the graph only
            report = check_parity(tmp, list(verify), model=model, log=log, strict=False, backend=backend)
            log(report.table())
            if not report.ok:
                raise ParityError(report.failure_summary().replace(str(tmp), str(out)), report)
    size = (out / cm.MODEL_FILE).stat().st_size
    log(f"compiled {out / cm.MODEL_FILE} ({size / 2**20:.1f} MiB, {len(slots)} bias inputs, {len(token_inputs)} token inputs)")
    return out


def _build_graph(encoder, slots, token_inputs: list[str], path: Path, opset: int, *, quantize: str | None, fp16: bool,
                 fuse: bool, mixed: bool, defaults: bool, what: str, log: Callable[[str], None]
                 ) -> tuple[list[str], dict[str, int], str]:
    """Write the graph (without the head) to `path`: (the steps, as the manifest records them; fused op
    counts; what optimised it offline, or "")."""
    base = {s.name: s.parameter.detach().float().numpy() for s in slots}
    shapes = {k: v.shape for k, v in base.items()}
    # mixed graphs take [tasks, dim] tables where plain ones take [dim] vectors
    checked = {k: (None, *v) for k, v in shapes.items()} if mixed else shapes
    kinds = ",".join(dict.fromkeys(s.kind for s in slots))
    placeholder_steps = [s for s in PLACEHOLDER_STEPS if defaults or s != "BiasDefaultsPass"]
    if quantize and not fuse and not mixed:
        log(f"exporting {encoder.config.model_type} with int8 kernels fused around {len(slots)} live bias inputs "
            f"({QUANTIZE_MODES[quantize]}), opset {opset}")
        try:
            ops, optimised = export_int8_live(encoder, slots, token_inputs, path, opset,
                                              per_channel=quantize == "int8", defaults=defaults)
            steps = ["export(placeholder biases)", f"quantize_dynamic({QUANTIZE_MODES[quantize]})",
                     f"optimise_offline({optimised})", *placeholder_steps]
            return steps, ops, optimised
        except (BitFitError, CompiledModelError) as e:
            log(f"note: onnxruntime did not fuse its int8 kernels around the live biases here ({e}); compiling the "
                "plain int8 graph instead (bias Adds unfused: about 10% slower)")
    if fuse:
        log(f"exporting {encoder.config.model_type} with onnxruntime's fused kernels ({len(slots)} bias inputs) "
            f"opset {opset}")
        fused_ops = export_fused(encoder, slots, token_inputs, path, opset, defaults=defaults)
        steps = ["export(placeholder biases)", "onnxruntime.transformers.optimize_model(bert)", *placeholder_steps]
    else:
        log(f"exporting {encoder.config.model_type} ({len(slots)} bias inputs: {kinds}) with opset {opset}")
        raw = path.with_name("raw.onnx")
        export_onnx(encoder, slots, token_inputs, raw, opset, mixed=mixed)
        graph = ir.load(raw)
        raw.unlink()
        # mixed defaults: a one-row table of base values (task_ids 0 then means the base model)
        values = {k: v[None, :] for k, v in base.items()} if mixed else base
        passes = [*([BiasDefaultsPass(values)] if defaults else []), CheckBiasInputsPass(checked),
                  CheckTokenInputsPass(token_inputs)]
        run_passes(graph, passes, f"compiling {what}")
        ir.save(graph, path)
        fused_ops = {}
        steps = [f"export({'bias tables + task_ids' if mixed else 'bias inputs'})", *(type(p).__name__ for p in passes)]
    if quantize:
        log(f"quantizing weights: {QUANTIZE_MODES[quantize]}")
        fp32 = path.with_name("fp32.onnx")
        os.replace(path, fp32)
        quantize_int8(fp32, path, per_channel=quantize == "int8")
        fp32.unlink()
        quantized = ir.load(path)
        run_passes(quantized, [CheckBiasInputsPass(checked)], f"quantizing {what}", "compile without --quantize")
        lost = [v.name for v in quantized.graph.inputs if v.name in base and (v.const_value is None) == defaults]
        if lost:
            raise CompiledModelError(f"quantizing changed the defaults of {lost[:4]}: compile without --quantize")
        steps += [f"quantize_dynamic({QUANTIZE_MODES[quantize]})", "CheckBiasInputsPass"]
    if fp16:
        log("converting weights to fp16 (bias inputs stay fp32)")
        to_fp16(path)
        run_passes(ir.load(path), [CheckBiasInputsPass(checked)], f"fp16 conversion of {what}",
                   "compile without --fp16")
        steps += ["convert_float_to_float16(keep_io_types)", "CheckBiasInputsPass"]
    return steps, fused_ops, ""
