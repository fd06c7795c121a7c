"""IREE's ahead-of-time module against onnxruntime on the same no-defaults graph: all-MiniLM-L6-v2, sequence
length 128, batch 1 and 8, one task's biases fed on every call, timed interleaved in one process.

Variants: onnxruntime on model.onnx (the graph the modules were compiled from); IREE static buckets (1x128,
8x128: the call's exact shape) and dynamic shapes, each with the compile flags given by --flags (a name per
set; default: IREE's defaults, `--iree-opt-level=O3`, data tiling). Compile time and module size are reported.
The local-task driver's thread count is set to --threads (a process-wide IREE flag), as onnxruntime's is.

    python benchmarks/iree_latency.py [--rounds 30] [--threads 2] [--batches 1,8] [--out benchmarks/results]

Timings are worth recording only from a quiet machine (the CPU-load guard skips a busy batch).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from bitfit.compiler.compile import compile
from bitfit.compiler.iree import compile_modules
from bitfit.runtime import TaskSession
from bitfit.runtime import compiled as cm
from bitfit.runtime.errors import CompiledModelError
from common import machine, minilm_dir, quiet_batches, synthetic_pack, time_interleaved, write_results

SEQ = 128
FLAG_SETS = {
    "default": [],
    "O3": ["--iree-opt-level=O3"],
    "data-tiling": ["--iree-opt-data-tiling"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30, help="timed calls per variant at batch 1 (batch 8: half)")
    ap.add_argument("--max-load", type=float, default=0.3, help="cores other processes may use while timing")
    ap.add_argument("--flags", default=",".join(FLAG_SETS), help=f"flag sets to compile: {', '.join(FLAG_SETS)}")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    buckets = ",".join(f"{b}x{SEQ}" for b in batches) + ",dynamic"
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t = time.perf_counter()  # export + every module with IREE's default flags
        base = compile(minilm_dir(), work / "default", target="iree-cpu", buckets=buckets, log=lambda *_: None)
        builds = {"default (with the export)": time.perf_counter() - t}
        pack = synthetic_pack(base, "task", rng, max_length=SEQ)
        directories, failed = {"default": base}, []
        for name in args.flags.split(","):
            if name == "default":
                continue
            target = work / name
            target.mkdir()
            for f in (cm.MODEL_FILE, cm.TOKENIZER_FILE, cm.BASE_BIASES_FILE):
                (target / f).symlink_to(base / f)
            manifest = cm.read_manifest(base)
            t = time.perf_counter()
            try:
                manifest.iree = compile_modules(target, manifest, buckets=[(b, SEQ) for b in batches] + [(0, 0)],
                                                flags=FLAG_SETS[name], log=lambda *_: None)
            except CompiledModelError as e:  # a flag set IREE fails on is a result too
                failed.append(f"flags {name}: iree-compile failed ({str(e).splitlines()[-1].strip()[:200]})")
                print("  " + failed[-1], flush=True)
                continue
            builds[name] = time.perf_counter() - t
            cm.write_manifest(target, manifest)
            directories[name] = target
        sessions = {"onnxruntime": TaskSession(base, threads=args.threads)}
        for name, directory in directories.items():
            sessions[f"iree {name}"] = TaskSession(directory, backend="iree", threads=args.threads)
        for s in sessions.values():
            s.register(pack, name="task")
        sizes = {n: {m["file"]: (d / m["file"]).stat().st_size for m in cm.read_manifest(d).iree["modules"]}
                 for n, d in directories.items()}
        rows, data, skipped = [], {"builds_s": builds, "module_bytes": sizes, "results": []}, []
        for batch, rounds in quiet_batches(argparse.Namespace(batches=args.batches, max_load=args.max_load,
                                                              rounds=args.rounds), "minilm", skipped):
            feed = {"input_ids": rng.integers(1000, 20000, (batch, SEQ)),
                    "attention_mask": np.ones((batch, SEQ), np.int64),
                    "token_type_ids": np.zeros((batch, SEQ), np.int64)}
            runners = {}
            for name, s in sessions.items():
                runners[name] = (lambda s: lambda f: s.hidden_states(f, "task"))(s)
                if name.startswith("iree"):  # the same module set, forced onto the dynamic one
                    engine = s.engine
                    dynamic = next(f for f in engine._functions if f[0] == 0)
                    runners[name + " dynamic"] = (lambda s, e, d: lambda f: _on(e, d, s, f))(s, engine, dynamic)
            reference = sessions["onnxruntime"].hidden_states(feed, "task")
            for name, run in runners.items():
                assert np.abs(run(feed) - reference).max() < 1e-3, name
            times = time_interleaved(runners, feed, rounds)
            ort_ms = float(np.median(times["onnxruntime"])) * 1e3
            for name, t in times.items():
                ms = float(np.median(t)) * 1e3
                rows.append(f"| {batch} | {name}{'' if 'dynamic' in name or name == 'onnxruntime' else ' (static)'} | "
                            f"{ms:.2f} | {ms / ort_ms:.2f}x |")
                data["results"].append({"batch": batch, "variant": name, "median_ms": ms, "vs_ort": ms / ort_ms})
    lines = ["| batch | variant | median ms | vs onnxruntime |", "|---|---|---|---|", *rows, "",
             f"all-MiniLM-L6-v2, seq {SEQ}; machine: {machine(args.threads)}; compile s: "
             + ", ".join(f"{k} {v:.1f}" for k, v in builds.items()), *failed, *skipped]
    write_results(args.out, "iree", "\n".join(lines), data)


def _on(engine, function, session, feed):
    """session.hidden_states with the engine held to one module (the dynamic one)."""
    real = engine._bucket
    engine._bucket = lambda b, s: function
    try:
        return session.hidden_states(feed, "task")
    finally:
        engine._bucket = real


if __name__ == "__main__":
    main()
