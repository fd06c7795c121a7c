"""What the in-graph task head costs a caller that only reads last_hidden_state (as our runtime does).

Every plain graph carries the task head (29 nodes, 25 after onnxruntime's optimisation: logits and
token_logits, for adapter files and other bindings). onnxruntime runs every node of a graph on every call, whichever outputs are bound, so the head
is paid even when unused. Two measurements in one run, on all-MiniLM-L6-v2, fp32 and int8, batch 1 and 8,
length 128:

- share: onnxruntime's own profile, the head nodes' kernel time over all nodes' kernel time (median of
  the profiled calls); a share of one call, so machine noise mostly cancels.
- ratio: the compiled graph against the same graph with the head removed (its nodes, inputs and outputs
  dropped with onnx-ir), timed interleaved in one process.

    python benchmarks/head_cost.py [--rounds 30] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir
from bitfit.compiler.compile import compile
from bitfit.compiler.head import HEAD_INPUT_NAMES, HEAD_OUTPUTS
from bitfit.runtime.compiled import MODEL_FILE, read_manifest
from common import (
    hidden_runner,
    machine,
    minilm_dir,
    ort_session,
    time_interleaved,
    wait_until_quiet,
    write_results,
)

SEQ = 128


def strip_head(src: Path, dst: Path) -> int:
    """Write `src` without the head; returns how many nodes went."""
    model = ir.load(src)
    graph = model.graph
    head_nodes = [n for n in graph if (n.name or "").startswith("head/")]
    for v in [v for v in graph.outputs if v.name in HEAD_OUTPUTS]:
        graph.outputs.remove(v)
    graph.remove(head_nodes, safe=True)
    for v in [v for v in graph.inputs if v.name in HEAD_INPUT_NAMES]:
        graph.inputs.remove(v)
    for name in [n for n in graph.initializers if n in HEAD_INPUT_NAMES or n.startswith("head/")]:
        graph.initializers.pop(name)
    ir.save(model, dst)
    return len(head_nodes)


def head_share(graph: Path, feed: dict, calls: int, threads: int, work: Path) -> float:
    """Median over profiled calls of (head nodes' kernel time) / (all nodes' kernel time)."""
    s = ort_session(graph, threads, str(work / "profile"))
    run = hidden_runner(s)
    for _ in range(calls):
        run(feed)
    events = json.loads(Path(s.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    shares = []
    for r in runs[2:]:  # the first calls warm up
        inside = [e for e in kernels if r["ts"] <= e["ts"] <= r["ts"] + r["dur"]]
        head = sum(e["dur"] for e in inside if e["name"].startswith("head/"))
        shares.append(head / max(1, sum(e["dur"] for e in inside)))
    return float(np.median(shares))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-load", type=float, default=0.3, help="cores other processes may use while timing")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="bitfit-head-"))
    rows, skipped = [], []
    try:
        for variant, options in (("fp32", {}), ("int8", {"quantize": "int8"})):
            print(f"[{variant}] compiling ...", flush=True)
            compiled = compile(minilm_dir(), work / variant, log=lambda *_: None, **options)
            graph = Path(compiled) / MODEL_FILE
            tokens = read_manifest(compiled).token_inputs
            removed = strip_head(graph, work / f"{variant}-nohead.onnx")
            with_head = hidden_runner(ort_session(graph, args.threads))
            without = hidden_runner(ort_session(work / f"{variant}-nohead.onnx", args.threads))
            for batch in (1, 8):
                feed = {"input_ids": rng.integers(1000, 30000, (batch, SEQ)).astype(np.int64),
                        "attention_mask": np.ones((batch, SEQ), np.int64),
                        "token_type_ids": np.zeros((batch, SEQ), np.int64)}
                feed = {k: v for k, v in feed.items() if k in tokens}
                load = wait_until_quiet(args.max_load, patience=60)
                if load is not None:
                    skipped.append(f"{variant} batch {batch}: other processes used {load:.1f} cores; not timed")
                    continue
                rounds = args.rounds if batch == 1 else max(5, args.rounds // 2)
                print(f"[{variant}] batch {batch}: profiling, then {rounds} interleaved rounds ...", flush=True)
                share = head_share(graph, feed, rounds + 2, args.threads, work)
                times = time_interleaved({"head": with_head, "no head": without}, feed, rounds)
                med = {k: float(np.median(v)) for k, v in times.items()}
                rows.append({"variant": variant, "batch": batch, "seq": SEQ, "head_nodes": removed,
                             "head_share_profiled": share, "with_head_ms": med["head"] * 1e3,
                             "without_head_ms": med["no head"] * 1e3, "ratio": med["head"] / med["no head"]})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [f"{'variant':8} {'batch':>5} {'head nodes':>10} {'head share':>10} {'with ms':>9} {'without ms':>10} {'ratio':>6}",
             "-" * 64]
    for r in rows:
        lines.append(f"{r['variant']:8} {r['batch']:5d} {r['head_nodes']:10d} {100 * r['head_share_profiled']:9.2f}% "
                     f"{r['with_head_ms']:9.2f} {r['without_head_ms']:10.2f} {r['ratio']:6.3f}")
    lines += [f"skipped: {s}" for s in skipped]
    lines.append(f"\nall-MiniLM-L6-v2, sequence length 128; machine: {machine(args.threads)}; "
                 "ratio = median with head / median without, interleaved rounds")
    write_results(args.out, "head_cost", "\n".join(lines), {"rows": rows, "skipped": skipped,
                                                           "machine": machine(args.threads)})


if __name__ == "__main__":
    main()
