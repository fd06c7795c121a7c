"""Task accuracy of quantised graphs vs fp32, on the quickstart's real tasks and packs.

Variants: fp32; dynamic int8 per-channel (what `--quantize int8` makes: the bias Adds folded into the int8
kernels) and the same unfused (compile's fallback); dynamic int8 per-tensor;
static QDQ int8 (MatMul weights and activations, calibrated on 64 training texts of each task with
that task's biases fed, so the ranges cover every task the graph serves); with OpenVINO installed, the
no-defaults graph on OpenVINO in f32 and with its own int8 weight compression. Metrics on each task's
test split (1,500 examples) in percent, and label agreement with fp32.

    python benchmarks/int8_accuracy.py [--packs runs/quickstart/packs] [--out benchmarks/results]
Needs the quickstart's packs (./scripts/quickstart.sh).
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import tempfile
from pathlib import Path

import numpy as np
from bitfit.compiler.compile import compile
from bitfit.runtime import TaskSession
from bitfit.runtime.compiled import read_manifest, write_manifest
from bitfit.training.data import load_builtin
from bitfit.training.metrics import evaluate
from common import plain_int8, write_results

TASKS = ("movie-sentiment", "trec6", "sms-spam")


def static_int8(src_dir: Path, dst_dir: Path, session: TaskSession, data: dict) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    feeds = []
    for task in TASKS:
        pack = session.pack(task)
        examples = data[task].train[:64]
        for i in range(0, len(examples), 16):
            feed = session.encode([e.text for e in examples[i : i + 16]], max_length=64)
            feed.update({k: np.asarray(v, np.float32) for k, v in pack.biases.items()})
            feeds.append(feed)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

    shutil.copytree(src_dir, dst_dir)
    logging.getLogger().setLevel(logging.ERROR)
    quantize_static(str(src_dir / "model.onnx"), str(dst_dir / "model.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=["MatMul"],
                    extra_options={"ActivationSymmetric": True})
    manifest = read_manifest(dst_dir)
    manifest.precision = "int8-static-qdq"
    write_manifest(dst_dir, manifest)  # the new model.onnx's checksum, and the manifest's seal


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packs", default="runs/quickstart/packs")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    packs = {t: Path(args.packs) / t for t in TASKS}
    missing = [str(p) for p in packs.values() if not p.is_dir()]
    if missing:
        raise SystemExit(f"missing packs {missing}: run ./scripts/quickstart.sh first")
    model = json.loads((packs[TASKS[0]] / "manifest.json").read_text())["base_model"]
    data = {t: load_builtin(t) for t in TASKS}
    work = Path(tempfile.mkdtemp(prefix="bitfit-int8-"))
    try:
        dirs = {
            "fp32": compile(model, work / "fp32", log=lambda *_: None),
            "int8 dynamic per-channel": compile(model, work / "pc", quantize="int8", log=lambda *_: None),
            # the same int8 weights without the bias Adds folded into the int8 kernels: what compile falls back
            # to, and what --quantize int8 made before the fold (benchmarks/common.plain_int8)
            "int8 per-channel, unfused": plain_int8(model, work / "pc-plain"),
            "int8 dynamic per-tensor": compile(model, work / "pt", quantize="int8-per-tensor", log=lambda *_: None),
        }
        fp32 = TaskSession(dirs["fp32"])
        for t in TASKS:
            fp32.register(packs[t])
        static_int8(dirs["fp32"], work / "static", fp32, data)
        dirs["int8 static QDQ"] = work / "static"
        backends = dict.fromkeys(dirs, "onnxruntime")
        try:
            import openvino  # noqa: F401
        except ModuleNotFoundError:
            print("no openvino rows: OpenVINO is not installed (pip install 'bitfit-deploy[openvino]')")
        else:
            no_defaults = compile(model, work / "no-defaults", bias_defaults=False, log=lambda *_: None)
            dirs["openvino fp32"] = dirs["openvino int8 weights"] = no_defaults
            backends |= {"openvino fp32": "openvino", "openvino int8 weights": "openvino-int8"}

        rows, reference = [], {}
        for variant, directory in dirs.items():
            session = TaskSession(directory, backend=backends[variant])
            row = {"variant": variant, "model_mb": (Path(directory) / "model.onnx").stat().st_size / 2**20}
            for t in TASKS:
                session.register(packs[t])
                test = data[t].test
                logits = session.run(t, [e.text for e in test], batch_size=64).logits
                reference.setdefault(t, logits)
                row[t] = evaluate(data[t].metric, logits, data[t].targets(test))[data[t].metric]
                row[f"{t} agree"] = float((logits.argmax(-1) == reference[t].argmax(-1)).mean() * 100)
            row["mean drop"] = float(np.mean([rows[0][t] - row[t] for t in TASKS])) if rows else 0.0
            row["max drop"] = float(max(rows[0][t] - row[t] for t in TASKS)) if rows else 0.0
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    header = f"{'variant':<26} {'MiB':>6} " + " ".join(f"{t:>16}" for t in TASKS) + f" {'max drop':>9}"
    lines = [f"int8 accuracy on the quickstart's packs (all-MiniLM-L6-v2); {platform.processor() or platform.machine()}",
             "", header, "-" * len(header)]
    for r in rows:
        cells = " ".join(f"{r[t]:>7.2f} ({r[t + ' agree']:5.1f}%)" for t in TASKS)
        lines.append(f"{r['variant']:<26} {r['model_mb']:>6.1f} {cells} {r['max drop']:>9.2f}")
    lines.append("test-set metric in percent (accuracy; SMS: spam F1), label agreement with fp32 in brackets; "
                 "goal: drop <= 1 point")
    result = {"machine": platform.platform(), "processor": platform.processor(), "model": "all-MiniLM-L6-v2",
              "packs": str(args.packs), "rows": rows}
    write_results(args.out, "int8_accuracy", "\n".join(lines), result)

if __name__ == "__main__":
    main()
