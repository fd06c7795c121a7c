"""Throughput of mixed-task batches: rows of 8 different tasks in one forward pass.

On the real all-MiniLM-L6-v2 with 8 synthetic task packs (base biases + noise, random heads), for
batches of 8 and 32 rows of real-length sentences, interleaved in one process:
  - mixed graph, rows from 8 tasks, one pass             (`compile --mixed`, `run_mixed`)
  - mixed graph, rows from 1 task, one pass
  - plain graph, rows from 1 task, one pass               (the single-task baseline)
  - plain graph, rows from 8 tasks: 8 separate calls      (what a plain graph must do)
Goal: mixed (8 tasks) >= 0.90 x the single-task throughput.

    python benchmarks/mixed.py [--threads 2] [--rounds 20] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
from bitfit.compiler.compile import compile
from bitfit.runtime import TaskSession
from common import (
    machine,
    minilm_dir,
    synthetic_pack,
    time_interleaved,
    wait_until_quiet,
    write_results,
)

SENTENCES = [
    "A gripping, beautifully acted film that stays with you long after the credits roll.",
    "What a waste of two hours; the plot goes nowhere and the jokes fall flat.",
    "How far is it from Denver to Aspen by car in the winter?",
    "WINNER!! You have been selected to receive a 900 pound prize reward, call now to claim.",
    "I'll call you later, I'm still at work and the meeting is running late.",
    "The performances are worth it even when the script meanders in the second half.",
    "Who invented the telephone, and in which year was the first call made?",
    "Free entry in a weekly competition to win cup final tickets, text WIN to enter.",
]
TASKS = 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--max-load", type=float, default=0.3)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="bitfit-mixed-"))
    rows_out, skipped = [], []
    try:
        model = minilm_dir()
        quiet = {"log": lambda *_: None, "overwrite": True}
        plain_dir = compile(model, work / "plain", **quiet)
        mixed_dir = compile(model, work / "mixed", mixed=True, **quiet)
        names = [f"task{i}" for i in range(TASKS)]
        packs = [synthetic_pack(plain_dir, n, rng, labels=2 + i % 5) for i, n in enumerate(names)]
        plain = TaskSession(plain_dir, threads=args.threads, spinning=False)
        mixed = TaskSession(mixed_dir, threads=args.threads, spinning=False)
        for pack in packs:
            plain.register(pack)
            mixed.register(pack)
        for batch in (int(b) for b in args.batches.split(",")):
            texts = [SENTENCES[i % len(SENTENCES)] for i in range(batch)]
            many = [(names[i % TASKS], t) for i, t in enumerate(texts)]
            one = [(names[0], t) for t in texts]
            # correctness first: every mixed row equals its task's single-task row
            got = mixed.run_mixed(many)
            want = plain.run_mixed(many)
            worst = max(float(np.abs(np.subtract(g["logits"], w["logits"])).max()) for g, w in zip(got, want))
            runners = {
                "mixed graph, 8 tasks, 1 pass": lambda: mixed.run_mixed(many),
                "mixed graph, 1 task, 1 pass": lambda: mixed.run_mixed(one),
                "plain graph, 1 task, 1 pass": lambda: plain.run(names[0], texts),
                "plain graph, 8 tasks, 8 calls": lambda: plain.run_mixed(many),
            }
            load = wait_until_quiet(args.max_load, patience=60)
            if load is not None:
                skipped.append(f"batch {batch}: other processes used {load:.1f} cores; not timed")
                print("skipped: " + skipped[-1])
                continue
            print(f"timing batch {batch}, {args.rounds} interleaved rounds ...", flush=True)
            times = time_interleaved({k: (lambda f: lambda _feed: f())(f) for k, f in runners.items()}, None, args.rounds)
            single = batch / float(np.median(times["plain graph, 1 task, 1 pass"]))
            for name, ts in times.items():
                rate = batch / float(np.median(ts))
                rows_out.append({"batch": batch, "variant": name, "median_ms": float(np.median(ts)) * 1e3,
                                 "p90_ms": float(np.percentile(ts, 90)) * 1e3, "rows_per_s": rate,
                                 "vs_single_task": rate / single, "max_row_diff": worst})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    header = f"{'batch':>5} {'variant':<32} {'median ms':>10} {'p90 ms':>8} {'rows/s':>8} {'vs 1-task':>9}"
    lines = [header, "-" * len(header)]
    for r in rows_out:
        lines.append(f"{r['batch']:>5} {r['variant']:<32} {r['median_ms']:>10.2f} {r['p90_ms']:>8.2f} "
                     f"{r['rows_per_s']:>8.1f} {r['vs_single_task']:>9.3f}")
    for batch in sorted({r["batch"] for r in rows_out}):
        get = {r["variant"]: r for r in rows_out if r["batch"] == batch}
        ratio = get["mixed graph, 8 tasks, 1 pass"]["vs_single_task"]
        lines.append(f"batch {batch}: mixed (8 tasks) / single-task throughput {ratio:.3f} "
                     f"(goal >= 0.90: {'met' if ratio >= 0.90 else 'NOT met'}); every mixed row within "
                     f"{get['mixed graph, 8 tasks, 1 pass']['max_row_diff']:.1e} of its single-task result")
    lines += [f"skipped: {s}" for s in skipped]
    where = f"{machine(args.threads)}; all-MiniLM-L6-v2, fp32, 8 synthetic tasks"
    lines.append(f"machine: {where}")
    write_results(args.out, "mixed", "\n".join(lines), {"machine": where, "rows": rows_out, "skipped": skipped})


if __name__ == "__main__":
    main()
