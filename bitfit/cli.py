"""The `bitfit` command. Every subcommand is also a function in the `bitfit` package.

Exit codes: 0 ok, 1 a check failed (verify, compile --verify: ParityError), 2 bad input or usage (any
other BitFitError).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

from bitfit.runtime.backends import BACKENDS
from bitfit.runtime.compiled import DEFAULT_OPSET, IREE_TARGETS, OPSETS
from bitfit.runtime.errors import BitFitError, ParityError
from bitfit.runtime.heads import POOLINGS
from bitfit.runtime.kinds import KINDS
from bitfit.runtime.session import MAX_THREADS
from bitfit.runtime.version import __version__


def _train(a: argparse.Namespace) -> int:
    from bitfit.training.train import TrainConfig, train

    config = TrainConfig(biases=a.biases, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, warmup=a.warmup,
                         schedule=a.schedule, max_length=a.max_length, pooling=a.pooling, task_kind=a.task_kind,
                         task_name=a.name, dev=a.dev, train_size=a.train_size, seed=a.seed, overwrite=a.overwrite,
                         progress=not a.quiet, train_pooler=a.train_pooler)
    result = train(a.model, a.data, a.out, config)
    if not result.is_main_process:  # under `accelerate launch`: the main process reports
        return 0
    m = result.pack.manifest
    metric = m.metrics["metric"]
    test = f", test {result.test[metric]:.2f}" if result.test else ""
    print(f"{m.task}: dev {metric} {result.dev[metric]:.2f} at epoch {result.best_epoch}{test} "
          f"({result.seconds:.0f} s) -> {result.pack_path}")
    return 0


def _compile(a: argparse.Namespace) -> int:
    from bitfit.compiler.compile import compile_model

    compile_model(a.model, a.out, biases=a.biases, opset=a.opset, quantize=a.quantize, fp16=a.fp16, fuse=a.fuse,
                  mixed=a.mixed, head=not a.no_head, bias_defaults=False if a.no_defaults else None,
                  overwrite=a.overwrite, verify=a.verify, target=a.target, buckets=a.buckets)
    return 0


def _predict(a: argparse.Namespace) -> int:
    from bitfit.runtime import read_pack_manifest

    from .prediction import predict, read_texts

    texts, pairs = list(a.text or []), list(a.text_pair) if a.text_pair else None
    if a.question or a.context:  # question answering: questions are the texts, contexts their pairs
        if len(a.question or []) != len(a.context or []):
            raise BitFitError("give one --context for every --question")
        texts, pairs = texts + a.question, (pairs or []) + a.context
    if a.file:
        more, more_pairs = read_texts(a.file)
        texts += more
        pairs = (pairs or []) + more_pairs if more_pairs else pairs
    if not texts:
        raise BitFitError("nothing to predict: pass --text T (repeatable) or --file F")
    describe = read_pack_manifest(a.pack).kind.describe  # how this task kind prints a record
    out = predict(a.compiled, a.pack, texts, pairs, threads=a.threads, device=a.device, backend=a.backend)
    for text, record in zip(texts, out.records()):
        print(json.dumps(record) if a.json else describe(record, text))
    return 0


def _verify(a: argparse.Namespace) -> int:
    from bitfit.compiler.verify import verify, write_report
    from bitfit.runtime.fs import check_file

    if a.report:  # before the checks run: a report that cannot be written is bad input, found at once
        check_file(a.report, what="report")
    report = verify(a.compiled, a.pack, model=a.model, atol=a.atol, mode=a.mode, min_agreement=a.min_agreement,
                    strict=False, backend=a.backend)
    print(report.table())
    if a.report:
        write_report(report, a.report)
    return 0 if report.ok else 1


def _inspect(a: argparse.Namespace) -> int:
    from .inspection import inspect

    print(inspect(a.path, as_json=a.json))
    return 0


def _replicas(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 1024:
        raise argparse.ArgumentTypeError(f"give a number of replicas from 1 to 1024, or auto; got {text!r}")
    return n


def _serve(a: argparse.Namespace) -> int:
    try:
        from .serve.app import serve
    except ModuleNotFoundError as e:
        if e.name in ("starlette", "uvicorn", "prometheus_client", "anyio"):
            raise BitFitError(f"needs {e.name}; install the server extra: pip install 'bitfit-deploy[serve]'") from e
        raise
    limits = {name: getattr(a, name) for name in a.serve_fields}  # the ServeConfig fields given as flags
    if a.ray:
        try:
            from .serve.ray_app import run
        except ModuleNotFoundError as e:
            if e.name == "ray":
                raise BitFitError("--ray needs Ray Serve: pip install 'bitfit-deploy[ray]'") from e
            raise
        run(a.compiled, a.packs, host=a.host, port=a.port, address=a.ray_address, replicas=a.replicas,
            replica_cpus=a.replica_cpus, threads=a.threads or 1, backend=a.backend, **limits)
        return 0
    serve(a.compiled, a.packs, host=a.host, port=a.port, threads=a.threads, device=a.device, backend=a.backend,
          **limits)
    return 0


def _extract(a: argparse.Namespace) -> int:
    from bitfit.training.extract import extract

    r = extract(a.base, a.finetuned, a.out, task=a.task, biases=a.biases, atol=a.atol, max_length=a.max_length,
                overwrite=a.overwrite)
    m = r.pack.manifest
    print(f"{m.task}: {m.task_kind}, pooling {m.pooling}, biases {','.join(m.bias_subset) or 'none'} "
          f"(changed: {','.join(r.changed_kinds) or 'none'}), frozen weights equal the base"
          f"{f' within {a.atol}' if r.max_weight_diff else ''} -> {r.path}")
    return 0


def _import_peft(a: argparse.Namespace) -> int:
    from bitfit.training.peft_import import import_peft

    labels = [s.strip() for s in a.labels.split(",")] if a.labels else None
    r = import_peft(a.base, a.adapter, a.out, task=a.task, labels=labels, biases=a.biases, max_length=a.max_length,
                    overwrite=a.overwrite)
    m = r.pack.manifest
    print(f"{m.task}: {m.task_kind}, pooling {m.pooling}, biases {','.join(m.bias_subset) or 'none'} -> {r.path}")
    return 0


def _export_bank(a: argparse.Namespace) -> int:
    from bitfit.exporters.bank import export_bank

    bank = export_bank(a.compiled, a.packs, a.out, block_align=a.block_align, overwrite=a.overwrite)
    print(f"{len(bank.tasks)} tasks x {bank.block_bytes} bytes per block ({len(bank.biases)} biases), "
          f"{bank.layout['total_bytes']} bytes -> {bank.directory} (bank.bin, bank.json, bank.h)")
    return 0


def _export_web(a: argparse.Namespace) -> int:
    from bitfit.exporters.web import TITLE, export_web

    site = export_web(a.compiled, a.packs, a.out, title=a.title or TITLE, overwrite=a.overwrite)
    g = site["graph"]
    per_task = ", ".join(f"{t['name']} {t['bytes'] / 1024:.1f} KB" for t in site["tasks"])
    print(f"{a.out}: graph {g['bytes'] / 2**20:.1f} MiB ({g['precision']}) downloaded once; tasks: {per_task}. "
          f"Serve it over https or from localhost (bitfit serve-web {a.out}) and open index.html")
    return 0


def _serve_web(a: argparse.Namespace) -> int:
    from bitfit.exporters.site_server import serve_web

    serve_web(a.site, host=a.host, port=a.port, isolated=not a.no_isolation)
    return 0


def _export_adapter(a: argparse.Namespace) -> int:
    from bitfit.exporters.adapter import export_adapter

    out = export_adapter(a.compiled, a.pack, a.out, overwrite=a.overwrite)
    print(f"wrote {out} and {out.with_suffix('.json')}: activate ONE adapter per run "
          "(RunOptions.add_active_adapter); it wins over explicit feeds of the same names")
    return 0


def _export_triton(a: argparse.Namespace) -> int:
    from bitfit.exporters.triton import export_triton

    target = export_triton(a.compiled, a.packs, a.out, name=a.name, max_batch_size=a.max_batch_size,
                           instance_kind=a.instance_kind, instances=a.instances, overwrite=a.overwrite)
    print(f"wrote Triton model {target} ({len(a.packs)} tasks; ids in {target / 'tasks.json'}): "
          f"tritonserver --model-repository {a.out}")
    return 0


# -- flag values: checked when the flags are parsed (exit 2 and one line), before any work starts --------
def _int_in(lo: int, hi: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {f'from {lo} to {hi}' if hi is not None else f'at least {lo}'}, "
                                             f"got {value}")
        return value

    parse.__name__ = "whole number"
    return parse


def _float_in(lo: float, hi: float | None = None, *, above: bool = False, below: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        low_ok = value > lo if above else value >= lo
        high_ok = hi is None or (value < hi if below else value <= hi)
        if not math.isfinite(value) or not low_ok or not high_ok:
            bounds = f"{'>' if above else '>='} {lo:g}" + ("" if hi is None else f" and {'<' if below else '<='} {hi:g}")
            raise argparse.ArgumentTypeError(f"must be a finite number {bounds}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


POSITIVE = _int_in(1)
THREADS = _int_in(1, MAX_THREADS)
PORT = _int_in(1, 65535)
LENGTH = _int_in(1, 1 << 20)


# -- flags that several subcommands share: defined once ------------------------------------------------
SERVE_DEPS = ("starlette", "uvicorn", "prometheus_client", "anyio")
DEVICES = ["cpu", "cuda", "gpu", "npu", "auto"]


def _engine_flags(p: argparse.ArgumentParser, *, device: bool = True, backend_help: str | None = None) -> None:
    """--device and --backend: where and on what the graph runs (predict, verify, serve)."""
    if device:
        p.add_argument("--device", choices=DEVICES, default="cpu",
                       help="cuda needs onnxruntime-gpu; auto: cuda where present (OpenVINO: cpu, gpu, npu, auto)")
    p.add_argument("--backend", choices=BACKENDS, default="onnxruntime",
                   help=backend_help or "the engine: onnxruntime (default), openvino or openvino-int8 (OpenVINO's int8 "
                   "weight compression; a graph compiled with --no-defaults and the [openvino] extra), or iree (a "
                   "directory compiled with --target iree-cpu; the [iree] extra)")


def _compiled_flag(p: argparse.ArgumentParser, help: str = "a directory made by `bitfit compile`") -> None:
    p.add_argument("--compiled", required=True, help=help)


def _out_flags(p: argparse.ArgumentParser, what: str, replaces: str) -> None:
    """--out (required) and --overwrite, which every writer takes."""
    p.add_argument("--out", required=True, help=what)
    p.add_argument("--overwrite", action="store_true", help=f"replace {replaces}")


def _pack_source_flags(p: argparse.ArgumentParser, source: str) -> None:
    """What extract and import-peft share: the base, the task name, the bias kinds, max_length."""
    p.add_argument("--task", help=f"task name (default: the {source} directory's name)")
    p.add_argument("--biases", default="changed",
                   help="'changed' (default: the bias kinds that differ from the base), 'all', or kinds")
    p.add_argument("--max-length", type=LENGTH, help="default: the model's positions")


# ServeConfig's fields become `bitfit serve` flags (bitfit.serve.app.ServeConfig, read, not copied: a new field is
# a new flag). ServeConfig carries no help text or flag names, so these live here, keyed by field name; the value
# parsers repeat its ranges so that a bad value is argparse's one line before anything loads (ServeConfig
# checks them again for Python callers).
SERVE_FLAGS: dict[str, tuple[str, Any, str]] = {
    "max_texts": ("--max-texts", POSITIVE, "texts per request"),
    "max_text_chars": ("--max-text-chars", POSITIVE, "characters per text"),
    "max_batch_rows": ("--max-batch-rows", POSITIVE, "rows per batched session call"),
    "max_wait_ms": ("--max-wait-ms", _float_in(0, 10_000), "how long a queued request waits for others to batch with"),
    "batching": ("--no-batching", None, "run every request on its own"),
    "body_timeout_s": ("--body-timeout", _float_in(0, 3600, above=True),
                       "seconds a request body has to arrive (then 408)"),
    "header_timeout_s": ("--header-timeout", _float_in(0, 3600, above=True),
                         "seconds a connection has to send a whole request head"),
    "max_connections": ("--max-connections", _int_in(1, 1 << 16),
                        "open connections served at once; more are answered 503"),
    "admin_token": ("--admin-token", None, "token for POST /v1/admin/* (Authorization: Bearer TOKEN); prefer the "
                                           "BITFIT_ADMIN_TOKEN environment variable, which `ps` does not show"),
    "reload_every_s": ("--reload-every", _float_in(0, 86_400),
                       "also rescan --packs this often, in seconds (0: only on POST /v1/admin/reload)"),
}
# ServeConfig fields that are not flags, and why
SERVE_NOT_FLAGS = {"max_body_bytes": "derived from max_texts and max_text_chars",
                   "allowed_hosts": "set from --host (loopback names on a loopback address)"}


def _serve_config_flags(p: argparse.ArgumentParser, config: type) -> list[str]:
    """A flag per ServeConfig field (but SERVE_NOT_FLAGS), its default the field's; returns the field names."""
    from dataclasses import MISSING, fields

    names = []
    for f in fields(config):
        if f.name in SERVE_NOT_FLAGS:
            continue
        flag, parse, help = SERVE_FLAGS.get(f.name, (f"--{f.name.replace('_', '-')}", None, f"ServeConfig.{f.name}"))
        default = None if f.default is MISSING else f.default
        if isinstance(default, bool):  # a switch: --no-X turns off what is on by default, --X the other way
            p.add_argument(flag, dest=f.name, action="store_false" if default else "store_true", help=help)
        else:
            shown = f"{default:g}" if isinstance(default, float) else default
            metavar = "SECONDS" if f.name.endswith("_s") else flag[2:].upper().replace("-", "_")
            p.add_argument(flag, dest=f.name, type=parse or _by_annotation(f.type), default=default, metavar=metavar,
                           help=help + ("" if default is None else f" (default {shown})"))
        names.append(f.name)
    return names


def _by_annotation(annotation: Any):
    """The value parser of a ServeConfig field without an entry in SERVE_FLAGS (ServeConfig checks the range)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return _int_in(-(2**63)) if text.startswith("int") else _float_in(-math.inf) if text.startswith("float") else str


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve every task pack in a directory over HTTP (no torch)",
                       description="HTTP server: GET /v1/tasks, POST /v1/predict (classification, regression), "
                                   "POST /v1/tokens (token classification), POST /v1/answer (extractive QA), "
                                   "GET /healthz, GET /metrics, POST /v1/admin/reload (admin: rescans --packs; "
                                   "needs the admin token when one is set, and one must be set to listen beyond "
                                   "loopback). /v1/predict requests of all tasks are batched together.")
    _compiled_flag(p)
    p.add_argument("--packs", required=True,
                   help="a directory of task packs (one per subdirectory), served under their manifests' task names")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--port", type=PORT, default=8000)
    p.add_argument("--threads", type=THREADS,
                   help="onnxruntime intra-op threads (default: all cores but one, which the HTTP loop needs)")
    _engine_flags(p)
    try:
        from .serve.app import ServeConfig
    except ModuleNotFoundError as e:  # the runtime alone: every other command works; this one says what to install
        if e.name not in SERVE_DEPS:
            raise
        p.set_defaults(run=_serve_unavailable, missing=e.name, serve_fields=[])
        return
    p.set_defaults(run=_serve, serve_fields=_serve_config_flags(p, ServeConfig))
    ray = p.add_argument_group("Ray Serve (pip install 'bitfit-deploy[ray]'; docs/serving.md)")
    ray.add_argument("--ray", action="store_true", help="run as a Ray Serve application: replicas of this server "
                                                        "behind Ray's proxy, a reload reaching every replica")
    ray.add_argument("--replicas", type=_replicas, default=2,
                     help="replicas, or auto for Ray's autoscaling (default 2)")
    ray.add_argument("--replica-cpus", type=_float_in(0, 1024, above=True), default=1.0,
                     help="Ray CPUs each replica reserves (default 1)")
    ray.add_argument("--ray-address", help="join this Ray cluster (default: start one on this machine)")


def _serve_unavailable(a: argparse.Namespace) -> int:
    raise BitFitError(f"needs {a.missing}; install the server extra: pip install 'bitfit-deploy[serve]'")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="BitFit-train a task and save its task pack")
    p.add_argument("--model", required=True, help="HF model id or local directory of the pre-trained encoder")
    p.add_argument("--data", required=True,
                   help="CSV/TSV/JSONL with text, label (and text_pair) columns, or a built-in data set: "
                        "movie-sentiment, movie-score, trec6, sms-spam; token-level tasks: JSONL with tokens and "
                        "tags, or SQuAD-style question, context and answers")
    _out_flags(p, "directory to write the task pack to", "an existing pack at --out")
    p.add_argument("--dev", help="a dev file (default: 10%% of --data, seeded)")
    p.add_argument("--biases", default="all", help="'all', or bias kinds: bq,bk,bv,bm1,bLN1,bm2,bm3,bLN2,bLNe "
                                                   "(e.g. bq,bm2, the paper's 0.04%% setting)")
    p.add_argument("--epochs", type=POSITIVE, default=5)
    p.add_argument("--lr", type=_float_in(0, above=True), default=1e-3,
                   help="bias-only training wants a high LR (default 1e-3)")
    p.add_argument("--batch-size", type=POSITIVE, default=16)
    p.add_argument("--warmup", type=_float_in(0, 1, below=True), default=0.1, help="share of steps with linear warm-up")
    p.add_argument("--schedule", choices=["linear", "constant"], default="linear",
                   help="linear: warm-up then linear decay (default); constant: the LR throughout (the BitFit "
                        "authors' code)")
    p.add_argument("--max-length", type=LENGTH, default=128)
    p.add_argument("--pooling", choices=["auto", *POOLINGS], default="auto",
                   help="auto: mean for sequence tasks, none for token-level ones; pooler: the checkpoint's own "
                        "BERT pooler (tanh dense on the first token, as HF *ForSequenceClassification), frozen")
    p.add_argument("--train-pooler", action="store_true", help="with --pooling pooler: train the pooler too")
    p.add_argument("--task-kind", default="auto", choices=["auto", *KINDS],
                   help="auto: from the data (JSONL with tokens/tags: token-classification; with "
                        "question/context/answers: question-answering)")
    p.add_argument("--name", help="task name (default: the data set's name)")
    p.add_argument("--train-size", type=POSITIVE, help="use only the first N training examples")
    p.add_argument("--seed", type=_int_in(0, 2**32 - 1), default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_train)


def _compile_parser(sub) -> None:
    p = sub.add_parser("compile", help="export the frozen encoder to ONNX with bias inputs")
    p.add_argument("--model", required=True, help="HF model id or local directory")
    _out_flags(p, "directory for model.onnx, tokenizer.json, manifest.json", "an existing compiled directory")
    p.add_argument("--biases", default="all", help="bias kinds to expose as inputs (default all: any pack fits)")
    p.add_argument("--opset", type=_int_in(*OPSETS), default=DEFAULT_OPSET,
                   help=f"ONNX opset, {OPSETS[0]} to {OPSETS[1]} (default {DEFAULT_OPSET})")
    p.add_argument("--quantize", choices=["int8", "int8-per-tensor"],
                   help="int8 weights, biases stay fp32 inputs (int8 = dynamic per-channel: kept accuracy within "
                        "0.1 point on the quickstart tasks; per-tensor lost 1.5)")
    p.add_argument("--fp16", action="store_true",
                   help="fp16 weights for GPUs; bias inputs stay fp32 (cast inside the graph)")
    p.add_argument("--fuse", action="store_true",
                   help="onnxruntime's fused kernels (Attention, SkipLayerNorm, BiasGelu) with every bias still a "
                        "live input: what GPUs run; not faster on CPU (BERT, RoBERTa, ELECTRA, DistilBERT)")
    p.add_argument("--mixed", action="store_true",
                   help="mixed-task batches: each bias a [tasks, dim] table, a task_ids input picks every row's "
                        "task, so one pass serves rows of many tasks (not with --fuse)")
    p.add_argument("--no-head", action="store_true",
                   help="leave the task head out of the graph: onnxruntime runs it on every call (1-3%% of a "
                        "MiniLM call at batch 1); our runtime does not need it, adapter files and other bindings do")
    p.add_argument("--no-defaults", action="store_true",
                   help="bias inputs without the base values as defaults (plain required inputs): for graph "
                        "compilers that freeze any input with a default, such as OpenVINO; no in-graph head")
    p.add_argument("--target", choices=["onnx", *IREE_TARGETS], default="onnx",
                   help="onnx: the graph (onnxruntime, OpenVINO); iree-cpu: also an ahead-of-time IREE module, "
                        "weights as constants, biases as arguments (--backend iree; no defaults, fp32 only); "
                        "iree-cuda/-rocm/-vulkan: compiled, not run here. Needs the [iree-compile] extra")
    p.add_argument("--buckets", help="IREE shape buckets, BATCHxSEQUENCE,... (e.g. 1x128,8x128,dynamic): a call is "
                                     "padded to the smallest that holds it (default: dynamic shapes)")
    p.add_argument("--verify", nargs="*", metavar="PACK",
                   help="check the new graph (and these task packs, if any) against PyTorch before it is put in "
                        "place; on a mismatch exit 1 and leave --out as it was")
    p.set_defaults(run=_compile)


def _predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="run a task pack on texts with the compiled graph (no torch)")
    _compiled_flag(p)
    p.add_argument("--pack", required=True, help="a task pack made by `bitfit train`")
    p.add_argument("--text", action="append", help="a text (repeatable)")
    p.add_argument("--text-pair", action="append", help="second texts for sentence-pair tasks (repeatable)")
    p.add_argument("--file", help="texts, one per line, or JSONL with text (and text_pair), with tokens (token "
                                  "classification), or with question and context (question answering)")
    p.add_argument("--question", action="append", help="question answering: a question (repeatable)")
    p.add_argument("--context", action="append", help="question answering: the context of each --question")
    p.add_argument("--threads", type=THREADS, help="onnxruntime intra-op threads (default: all cores)")
    _engine_flags(p)
    p.add_argument("--json", action="store_true", help="one JSON object per text: label, scores, logits")
    p.set_defaults(run=_predict)


def _verify_parser(sub) -> None:
    p = sub.add_parser("verify", help="check the graph and task packs against PyTorch (exit 1 on mismatch)")
    p.add_argument("--compiled", required=True)
    p.add_argument("--pack", action="append", default=[], help="a task pack (repeatable)")
    p.add_argument("--model", help="the base model (default: the one recorded at compile time)")
    p.add_argument("--atol", type=_float_in(0),
                   help="max abs logit difference (default: fp32 1e-4, fp16 2e-2, int8 1.5)")
    p.add_argument("--mode", choices=["auto", "fp32", "fp16", "int8"], default="auto",
                   help="tolerance mode; auto: the graph's precision")
    p.add_argument("--min-agreement", type=_float_in(0, 100), default=90.0,
                   help="fp16/int8 modes: %% of rows whose label must match fp32 PyTorch")
    p.add_argument("--report", help="also write the report as JSON here")
    _engine_flags(p, device=False, backend_help="the engine to check the graph on (every check, bias liveness "
                                                "included, runs on it)")
    p.set_defaults(run=_verify)


def _pack_makers(sub) -> None:
    """inspect, extract and import-peft."""
    p = sub.add_parser("inspect", help="summarise a task pack or a compiled directory")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_inspect)
    p = sub.add_parser("extract", help="turn a full BitFit fine-tuned HF checkpoint into a task pack (proven exact)",
                       description="Proves every frozen weight of --finetuned equals --base's, then packs the "
                                   "changed biases and the head (BERT pooler / RoBERTa dense+tanh heads, token "
                                   "classification, question answering).")
    p.add_argument("--base", required=True, help="the pre-trained encoder the checkpoint was fine-tuned from")
    p.add_argument("--finetuned", required=True, help="a saved *ForSequenceClassification / *ForTokenClassification "
                                                      "/ *ForQuestionAnswering checkpoint")
    _out_flags(p, "directory to write the task pack to", "an existing pack at --out")
    _pack_source_flags(p, "checkpoint")
    p.add_argument("--atol", type=_float_in(0), default=0.0,
                   help="allowed difference on frozen weights (default 0: bit-equal, as BitFit leaves them)")
    p.set_defaults(run=_extract)

    p = sub.add_parser("import-peft", help="turn a bias-only PEFT adapter (BEFT, LoRA bias=all) into a task pack",
                       description="Maps BEFT bias deltas, LoRA bias='all'/'lora_only' biases (only with every lora_B "
                                   "zero) and modules_to_save heads, then proves the merged model differs from --base "
                                   "in biases and head only, as extract does. The adapter does not name its base: "
                                   "give the right --base.")
    p.add_argument("--base", required=True, help="the base model the adapter was trained on")
    p.add_argument("--adapter", required=True, help="a directory written by PeftModel.save_pretrained")
    _out_flags(p, "directory to write the task pack to", "an existing pack at --out")
    _pack_source_flags(p, "adapter")
    p.add_argument("--labels", help="comma-separated label names (default: a config.json beside the adapter)")
    p.set_defaults(run=_import_peft)


def _exporters(sub) -> None:
    p = sub.add_parser("export-bank", help="all tasks' biases in one aligned binary for fixed-weight hardware",
                       description="Writes bank.bin (one equal-layout float32 block per task), bank.json (its "
                                   "memory map) and bank.h (the same map for C).")
    _compiled_flag(p, "the compiled directory whose bias inputs define a block")
    p.add_argument("packs", nargs="+", help="task packs; task ids follow this order")
    _out_flags(p, "directory for bank.bin, bank.json, bank.h", "an existing bank at --out")
    p.add_argument("--block-align", type=_int_in(64, 1 << 30), default=4096,
                   help="bytes each task block is aligned (and padded) to (default 4096: one page)")
    p.set_defaults(run=_export_bank)

    p = sub.add_parser("export-web", help="a static web site running task packs in the browser (onnxruntime-web)",
                       description="Writes the graph once, each pack as a ~110 KB binary plus its description, "
                                   "bitfit.js and a demo page (docs/web.md).")
    _compiled_flag(p, "a compiled directory with the task head (fp32, int8, fp16 or fused; not --mixed)")
    p.add_argument("packs", nargs="+", help="task packs (sequence kinds: classification, regression)")
    _out_flags(p, "the site's directory", "an existing site at --out")
    p.add_argument("--title", help="the demo page's title (default: exporters.web.TITLE)")
    p.set_defaults(run=_export_web)

    p = sub.add_parser("serve-web", help="serve a site written by export-web on this machine (a preview)")
    p.add_argument("site", help="the site's directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_int_in(0, 65535), default=8000, help="port (default 8000; 0: any free one)")
    p.add_argument("--no-isolation", action="store_true",
                   help="omit the cross-origin isolation headers (onnxruntime-web then runs on one wasm thread)")
    p.set_defaults(run=_serve_web)

    p = sub.add_parser("export-adapter",
                       help="write a task pack as an onnxruntime adapter file (any onnxruntime binding, no bitfit)")
    _compiled_flag(p, "a plain compiled directory (not --mixed)")
    p.add_argument("pack", help="a task pack")
    _out_flags(p, "the adapter file, e.g. task.onnx_adapter (sidecar: task.json)",
               "an existing adapter file and sidecar")
    p.set_defaults(run=_export_adapter)

    p = sub.add_parser("export-triton", help="write an NVIDIA Triton model repository serving task packs")
    _compiled_flag(p, "a directory made by `bitfit compile --mixed`")
    p.add_argument("packs", nargs="+", help="task packs; task ids follow this order (append new ones last)")
    _out_flags(p, "the model repository (other models in it are left alone)", "this model in the repository")
    p.add_argument("--name", default="bitfit", help="the model's name in the repository (default bitfit)")
    p.add_argument("--max-batch-size", type=POSITIVE, default=32, help="Triton's max_batch_size (default 32)")
    p.add_argument("--instance-kind", choices=["auto", "cpu", "gpu"], default="auto",
                   help="instance_group kind (default auto: Triton places it)")
    p.add_argument("--instances", type=_int_in(1, 1024), default=1, help="model instances (default 1)")
    p.set_defaults(run=_export_triton)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitfit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"bitfit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_train_parser, _compile_parser, _predict_parser, _verify_parser, _serve_parser, _pack_makers,
                _exporters):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.run is not _serve_unavailable:  # which says what to install, whatever flags came with it
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.run(args)
    except ParityError as e:  # a failed check, not bad input: exit 1 (README's exit codes)
        print(f"bitfit {args.command}: parity check failed: {e}", file=sys.stderr)
        return 1
    except BitFitError as e:
        print(f"bitfit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if e.name in ("onnx", "onnx_ir") and args.command == "export-web":
            print(f"bitfit {args.command}: error: needs {e.name}; pip install 'bitfit-deploy[web]'", file=sys.stderr)
            return 2
        if e.name in ("torch", "transformers", "onnx", "onnx_ir", "accelerate"):
            print(f"bitfit {args.command}: error: needs {e.name}; install the training extra: "
                  "pip install 'bitfit-deploy[train]'", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
