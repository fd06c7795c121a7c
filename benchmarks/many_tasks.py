"""Ten thousand tasks on one graph: registration time, resident memory and latency as the task count grows.

For each graph kind (plain: one task per call; mixed: rows of different tasks in one pass) one TaskSession
grows to 1, 100, 1,000 and 10,000 tasks of all-MiniLM-L6-v2 (synthetic packs: the base biases plus noise
and a random 6-label head, the shape of the quickstart's TREC-6 pack). At each count:
- register time per task, for the first and the last 100 tasks registered to reach it;
- resident memory per task (RSS growth / tasks) against the pack's tensor bytes;
- predict latency, p50 and p99, side by side with a session holding one task (interleaved calls, so the
  machine's noise falls on both): one text of a task chosen uniformly, of a task chosen by Zipf(1.1)
  popularity, and (mixed graph) a batch of 64 rows from 64 different tasks.
Then `bitfit serve --packs DIR` over N pack directories: start time (to /healthz) minus the start with one
pack, per pack; a rescan with nothing changed; and the first answer of a task added while it runs.

    python benchmarks/many_tasks.py [--counts 1,100,1000,10000] [--graphs plain,mixed] [--server-counts 1000,10000]

Writes benchmarks/results/many_tasks.{json,md}. Needs the quickstart's assets (scripts/setup.sh dev --assets).
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    HttpServer,
    machine,
    minilm_dir,
    rss,
    synthetic_pack,
    wait_until_quiet,
    write_results,
)

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["What a wonderful, moving film.", "Who wrote the novel Hamlet?", "free entry: reply WIN now",
         "the plot was dull and far too long", "How far is the moon from the earth?", "an honest, warm comedy"]
LABELS = 6
GROWN = "grown: "  # the line a child process returns its rows on
PATIENCE = 60  # seconds to wait for a quiet machine before a latency measurement (--patience)


def compiled_graph(work: Path, graph: str) -> Path:
    from bitfit.compiler.compile import compile

    out = work / f"minilm-{graph}"
    if not (out / "manifest.json").exists():
        print(f"compiling all-MiniLM-L6-v2 ({graph}) ...", flush=True)
        compile(minilm_dir(), out, mixed=graph == "mixed", log=lambda s: None)
    return out


class Packs:
    """Task i's pack, made on demand from one template (base + noise, a random head): the benchmark keeps
    no copy, so the process's memory growth is what the session holds."""

    def __init__(self, compiled: Path):
        self.template = synthetic_pack(compiled, "t", np.random.default_rng(0), LABELS, noise=0.05, head_scale=0.1)
        self.rng = np.random.default_rng(1)

    def make(self, i: int):
        from dataclasses import replace

        from bitfit.runtime import TaskPack

        t = self.template
        tensors = {k: (v + self.rng.normal(0, 0.01, v.shape)).astype(np.float32) for k, v in t.tensors.items()}
        return TaskPack(replace(t.manifest, task=f"t{i}"), tensors)


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.array(seconds) * 1000
    return {"p50": round(float(np.percentile(ms, 50)), 3), "p99": round(float(np.percentile(ms, 99)), 3)}


def latency(big, one, n: int, calls: int, rng: np.random.Generator) -> dict:
    """Interleaved calls on the session with n tasks and the one with a single task."""
    zipf = 1.0 / np.arange(1, n + 1) ** 1.1
    zipf /= zipf.sum()
    variants = {
        "uniform": lambda: big.run(f"t{rng.integers(n)}", [TEXTS[rng.integers(len(TEXTS))]]),
        "zipf": lambda: big.run(f"t{rng.choice(n, p=zipf)}", [TEXTS[rng.integers(len(TEXTS))]]),
        "one task": lambda: one.run("t0", [TEXTS[rng.integers(len(TEXTS))]]),
    }
    if big.mixed:
        def mixed_rows(session, tasks):
            return session.run_mixed([(f"t{t}", TEXTS[j % len(TEXTS)]) for j, t in enumerate(tasks)], batch_size=64)

        variants["mixed 64 of n"] = lambda: mixed_rows(big, rng.choice(n, size=64, replace=n < 64))
        variants["mixed 64 of one"] = lambda: mixed_rows(one, [0] * 64)
    times: dict[str, list[float]] = {k: [] for k in variants}
    order = list(variants.items())
    for _ in range(3):
        for _, run in order:
            run()
    for _ in range(calls):
        rng.shuffle(order)
        for name, run in order:
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    out = {k: percentiles(v) for k, v in times.items()}
    for k, ref in (("uniform", "one task"), ("zipf", "one task"), ("mixed 64 of n", "mixed 64 of one")):
        if k in out:
            out[k]["p50_ratio"] = round(out[k]["p50"] / out[ref]["p50"], 4)
            out[k]["p99_ratio"] = round(out[k]["p99"] / out[ref]["p99"], 4)
    return out


def grow(graph: str, compiled: Path, packs_dir: Path, counts: list[int], calls: int, threads: int) -> list[dict]:
    """One session grows to each count, registering pack directories as the server does (load_pack: read,
    check, hash); registration time, resident memory and latency at each count."""
    from bitfit.runtime import TaskSession

    dirs = sorted(packs_dir.iterdir(), key=lambda d: int(d.name[1:]))
    pack_bytes = Packs(compiled).template.nbytes
    # spinning off: two sessions share the cores, and a spinning one slows the other (docs/benchmarks.md)
    one = TaskSession(compiled, threads=threads, spinning=False)
    one.register(dirs[0])
    big = TaskSession(compiled, threads=threads, spinning=False)
    big.register(dirs[0])
    rng = np.random.default_rng(2)
    latency(big, one, 1, 3, rng)  # onnxruntime's arena grows to the calls' size: before the baseline, not per task
    gc.collect()
    base_rss = rss()  # one task registered
    rows, done = [], 1
    for n in counts:
        times = []
        while done < n:
            t = time.perf_counter()
            big.register(dirs[done])
            times.append(time.perf_counter() - t)
            done += 1
        gc.collect()
        held = rss() - base_rss  # what the tasks after the first hold
        row = {
            "graph": graph, "tasks": n, "pack_bytes": pack_bytes,
            "register_ms_first_100": round(1000 * float(np.mean(times[:100])), 3),
            "register_ms_last_100": round(1000 * float(np.mean(times[-100:])), 3),
            "register_all_s": round(float(np.sum(times)), 2),
            "rss_per_task_bytes": int(held / max(n - 1, 1)),
            "rss_per_task_over_pack": round(held / max(n - 1, 1) / pack_bytes, 3),
            "capacity": big.capacity,
        }
        load = wait_until_quiet(0.3, patience=PATIENCE)
        row["latency"] = latency(big, one, n, calls, rng) if load is None else f"not timed: load {load:.1f}"
        print(json.dumps(row), flush=True)
        rows.append(row)
    t = time.perf_counter()
    bulk = TaskSession(compiled, threads=threads, spinning=False)
    bulk.register_many(dirs[:counts[-1]])
    rows[-1]["register_many_ms_per_task"] = round(1000 * (time.perf_counter() - t) / counts[-1], 3)
    return rows


def write_pack_dirs(compiled: Path, root: Path, n: int) -> Path:
    from bitfit.runtime.pack import save_pack

    root.mkdir(parents=True, exist_ok=True)
    have = {p.name for p in root.iterdir()}
    packs = Packs(compiled)
    for i in tqdm(range(n), desc=f"pack directories in {root}", mininterval=5):
        pack = packs.make(i)
        if f"t{i}" not in have:
            save_pack(pack, root / f"t{i}")
    return root


def serve_start(compiled: Path, packs_dir: Path, work: Path) -> dict:
    import httpx

    log = work / f"serve-{packs_dir.name}.log"
    command = lambda port: [sys.executable, "-m", "bitfit.cli", "serve", "--compiled", str(compiled),  # noqa: E731
                            "--packs", str(packs_dir), "--host", "127.0.0.1", "--port", str(port)]
    t = time.perf_counter()
    with HttpServer(command, log, cwd=REPO, start_timeout=1800) as server:
        started = time.perf_counter() - t
        tasks = httpx.get(f"{server.url}/healthz").json()["tasks"]
        t = time.perf_counter()
        reload = httpx.post(f"{server.url}/v1/admin/reload", json={}, timeout=600)
        rescan = time.perf_counter() - t
        # a task added while the server runs: its first answer against an old task's
        extra = packs_dir / "zz-new"
        from bitfit.runtime.pack import save_pack

        save_pack(Packs(compiled).make(99_999), extra)  # task t99999
        httpx.post(f"{server.url}/v1/admin/reload", json={}, timeout=600)
        first, other = [], []
        for i in range(20):
            for name, sink in (("t99999", first if i == 0 else None), ("t0", other)):
                t = time.perf_counter()
                r = httpx.post(f"{server.url}/v1/predict", json={"task": name, "texts": [TEXTS[0]]})
                if sink is not None:
                    sink.append(time.perf_counter() - t)
                assert r.status_code == 200, r.text
        rss_bytes = server.rss()
    import shutil

    shutil.rmtree(extra)
    return {"tasks": tasks, "start_s": round(started, 2), "rescan_unchanged_s": round(rescan, 3),
            "rescan_status": reload.status_code, "first_answer_new_task_ms": round(1000 * first[0], 2),
            "answer_old_task_p50_ms": round(1000 * float(np.median(other)), 2), "rss_bytes": rss_bytes}


def table(rows: list[dict], servers: list[dict]) -> str:
    lines = ["| graph | tasks | register ms/task first 100 / last 100 | all | RSS/task (x pack) | "
             "p50 / p99 ms (x one task): uniform | zipf | mixed 64 of n |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lat = r["latency"]

        def cell(k: str) -> str:
            if not isinstance(lat, dict) or k not in lat:
                return "-"
            v = lat[k]
            return f"{v['p50']:.2f} / {v['p99']:.2f} ({v['p50_ratio']:.3f} / {v['p99_ratio']:.3f})"

        lines.append(f"| {r['graph']} | {r['tasks']:,} | {r['register_ms_first_100']:.2f} / "
                     f"{r['register_ms_last_100']:.2f} | {r['register_all_s']:.1f} s | "
                     f"{r['rss_per_task_bytes'] / 1024:.0f} KB ({r['rss_per_task_over_pack']:.2f}x) | "
                     f"{cell('uniform')} | {cell('zipf')} | {cell('mixed 64 of n')} |")
    if servers:
        lines += ["", "| server graph | pack dirs | start s | per pack ms (over 1 pack) | rescan unchanged s | "
                  "first answer of a new task ms | old task p50 ms |", "|---|---|---|---|---|---|---|"]
        for s in servers:
            lines.append(f"| {s['graph']} | {s['tasks']:,} | {s['start_s']} | {s.get('per_pack_ms', '-')} | "
                         f"{s['rescan_unchanged_s']} | {s['first_answer_new_task_ms']} | {s['answer_old_task_p50_ms']} |")
    return "\n".join(lines)


def main() -> int:
    global PATIENCE
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--counts", default="1,100,1000,10000")
    ap.add_argument("--graphs", default="plain,mixed")
    ap.add_argument("--server-counts", default="1,1000,10000", help="pack directories for the server start ('' none)")
    ap.add_argument("--calls", type=int, default=150, help="timed calls per variant and count")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="runs/many_tasks", help="compiled graphs and pack directories (reused)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--grow-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--patience", type=float, default=PATIENCE, help="seconds to wait for a quiet machine")
    args = ap.parse_args()
    PATIENCE = args.patience
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    counts = [int(x) for x in args.counts.split(",")]
    rows, servers = [], []
    if args.grow_only:  # the child process of one graph (below)
        compiled = compiled_graph(work, args.graphs)
        packs_dir = work / f"packs-{max(counts)}"
        print(GROWN + json.dumps(grow(args.graphs, compiled, packs_dir, counts, args.calls, args.threads)))
        return 0
    for graph in args.graphs.split(","):
        compiled = compiled_graph(work, graph)
        write_pack_dirs(compiled, work / f"packs-{max(counts)}", max(counts))  # one set serves both graphs
        # each graph in a process of its own: memory freed by the other graph's sessions would read as negative
        # growth here
        child = subprocess.run([sys.executable, __file__, "--grow-only", "--graphs", graph, "--counts", args.counts,
                                "--calls", str(args.calls), "--threads", str(args.threads), "--work", str(work),
                                "--patience", str(args.patience)], stdout=subprocess.PIPE, text=True, check=True)
        for line in child.stdout.splitlines():
            if line.startswith(GROWN):
                rows += json.loads(line[len(GROWN):])
            else:
                print(line, flush=True)
    server_counts = [int(x) for x in args.server_counts.split(",") if x]
    for graph in args.graphs.split(",") if server_counts else []:
        compiled = compiled_graph(work, graph)
        base = None
        for n in sorted(server_counts):
            packs_dir = write_pack_dirs(compiled, work / f"packs-{n}", n)
            s = {"graph": graph, **serve_start(compiled, packs_dir, work)}
            if base is None:
                base = s["start_s"]
            elif n > 1:
                s["per_pack_ms"] = round(1000 * (s["start_s"] - base) / (n - 1), 2)
            print(json.dumps(s), flush=True)
            servers.append(s)
    text = table(rows, servers)
    write_results(args.out, "many_tasks", text, {"machine": machine(args.threads), "rows": rows, "servers": servers})
    return 0


if __name__ == "__main__":
    sys.exit(main())
