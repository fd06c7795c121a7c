"""Many tasks, two ways to serve them: `bitfit serve` (one graph, every task a row of bias tables) against a
model per task behind an LRU of K resident models (benchmarks/lru_server.py), the way per-task servers hold
more tasks than fit in memory. 1,000 tasks of all-MiniLM-L6-v2, task popularity Zipf(1.1), the HTTP load
generator and answer check of benchmarks/load_test.py (every answer compared with an in-process TaskSession:
label equal, logits within 1e-4).

K is chosen twice: so that the LRU server's resident memory matches bitfit serve's (the same memory budget),
and K = 16. Each contender gets the same request plan after the same warm-up (the first `--warmup` requests
of the plan's distribution, not counted); two rounds in opposite orders; requests/s, p50/p99, resident
memory, and the LRU's cold loads.

    python benchmarks/lru_serving.py [--tasks 1000] [--requests 600] [--clients 8] [--threads 1]
Writes benchmarks/results/lru_serving.{json,md}.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HttpServer, machine, wait_until_quiet, write_results  # noqa: E402
from load_test import POOL, bitfit_server, drive, matches  # noqa: E402
from many_tasks import compiled_graph, write_pack_dirs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def lru_server(compiled: Path, packs: Path, slots: int, threads: int, log: Path) -> HttpServer:
    return HttpServer(lambda port: [sys.executable, str(REPO / "benchmarks" / "lru_server.py"), "--compiled",
                                    str(compiled), "--packs", str(packs), "--slots", str(slots), "--port", str(port),
                                    "--threads", str(threads)], log, cwd=REPO, start_timeout=600)


def zipf_plan(names: list[str], n: int, s: float, rng: random.Random) -> list[tuple[str, list[int]]]:
    weights = [1.0 / (i + 1) ** s for i in range(len(names))]
    tasks = rng.choices(names, weights=weights, k=n)
    return [(t, [rng.randrange(len(POOL)) for _ in range(rng.randint(1, 4))]) for t in tasks]


def expected(compiled: Path, packs_dir: Path, tasks: set[str]) -> dict[str, list[dict]]:
    from bitfit.runtime import TaskSession

    session = TaskSession(compiled, threads=2)
    session.register_many([packs_dir / t for t in sorted(tasks)])
    return {t: [session.run(t, [text]).records()[0] for text in POOL] for t in sorted(tasks)}


def run(server: HttpServer, plan, warmup, clients: int, want: dict) -> dict:
    import httpx

    asyncio.run(drive(server.url, warmup, clients, 600))
    loads0 = _stats(server)
    outcomes, wall, _ = asyncio.run(drive(server.url, plan, clients, 1200))
    loads1 = _stats(server)
    ok = [o for o in outcomes if o is not None and o.status == 200]
    wrong = sum(not matches(o.predictions, [want[o.task][t] for t in o.texts]) for o in ok)
    lat = np.array([1000 * o.seconds for o in ok]) if ok else np.array([np.nan])
    del httpx
    return {"requests_per_s": round(len(plan) / wall, 2), "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1), "lost": len(plan) - len(ok), "wrong": wrong,
            "rss_mib": round(server.rss() / 2**20, 1),
            "cold_loads": None if loads1 is None else loads1["loads"] - loads0["loads"],
            "load_seconds": None if loads1 is None else round(loads1["load_seconds"] - loads0["load_seconds"], 2)}


def _stats(server: HttpServer) -> dict | None:
    import httpx

    r = httpx.get(f"{server.url}/stats", timeout=10)
    return r.json() if r.status_code == 200 else None


def per_session_mib(compiled: Path, packs_dir: Path, names: list[str], threads: int, work: Path) -> tuple[float, float]:
    """The LRU server's resident memory with one model loaded, and what each further model adds."""
    import httpx

    with lru_server(compiled, packs_dir, 8, threads, work / "lru-probe.log") as s:
        rss = []
        for name in names[:5]:
            httpx.post(f"{s.url}/v1/predict", json={"task": name, "texts": [POOL[0]]}, timeout=120)
            rss.append(s.rss() / 2**20)
    return rss[0], float(np.median(np.diff(rss)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime threads of each server's sessions")
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", default="runs/many_tasks")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    mixed, plain = compiled_graph(work, "mixed"), compiled_graph(work, "plain")
    packs_dir = write_pack_dirs(mixed, work / f"packs-{args.tasks}", args.tasks)
    names = sorted((p.name for p in packs_dir.iterdir()), key=lambda n: int(n[1:]))
    rng = random.Random(0)
    rng.shuffle(names)  # popularity does not follow the directory order
    plan, warmup = zipf_plan(names, args.requests, args.zipf, rng), zipf_plan(names, args.warmup, args.zipf, rng)
    print(f"{len({t for t, _ in plan})} distinct tasks in {len(plan)} requests", flush=True)
    want = expected(plain, packs_dir, {t for t, _ in plan + warmup})

    threads = ["--threads", str(args.threads)]
    with bitfit_server(mixed, packs_dir, work / "bitfit-lru.log", threads) as s:
        asyncio.run(drive(s.url, warmup, args.clients, 600))
        bitfit_mib = s.rss() / 2**20
    first, each = per_session_mib(plain, packs_dir, names, args.threads, work)
    budget = max(1, int((bitfit_mib - first) // each) + 1)
    print(f"bitfit serve {bitfit_mib:.0f} MiB; LRU server {first:.0f} MiB + {each:.0f} MiB per model: "
          f"K = {budget} for the same memory", flush=True)
    contenders = {"bitfit serve (mixed graph)": lambda log: bitfit_server(mixed, packs_dir, log, threads),
                  f"a model per task, LRU K={budget} (same memory)":
                      lambda log: lru_server(plain, packs_dir, budget, args.threads, log),
                  "a model per task, LRU K=16": lambda log: lru_server(plain, packs_dir, 16, args.threads, log)}
    results: dict[str, list[dict]] = {k: [] for k in contenders}
    order = list(contenders)
    for r in range(args.rounds):
        for label in order if r % 2 == 0 else order[::-1]:
            load = wait_until_quiet(0.3, patience=60)
            with contenders[label](work / f"lru-{r}-{len(results[label])}.log") as server:
                t = time.perf_counter()
                row = run(server, plan, warmup, args.clients, want)
            row["load"] = "quiet" if load is None else f"others used {load:.1f} cores"
            print(f"round {r + 1} {label}: {json.dumps(row)} ({time.perf_counter() - t:.0f} s)", flush=True)
            results[label].append(row)
    ours = results[order[0]]
    lines = [f"{args.tasks:,} tasks, Zipf({args.zipf}) popularity, {args.requests} requests x {args.rounds} rounds, "
             f"{args.clients} clients, {args.threads} onnxruntime thread(s) per session", "",
             "| server | requests/s | p50 ms | p99 ms | RSS MiB | cold loads | requests/s: ours / this | p99: this / ours |",
             "|---|---|---|---|---|---|---|---|"]
    summary = {}
    for label, rows in results.items():
        med = {k: float(np.median([r[k] for r in rows])) for k in ("requests_per_s", "p50_ms", "p99_ms", "rss_mib")}
        loads = [r["cold_loads"] for r in rows if r["cold_loads"] is not None]
        summary[label] = {**med, "cold_loads": loads, "rounds": rows}
        vs = "" if label == order[0] else \
            f"{np.median([o['requests_per_s'] / r['requests_per_s'] for o, r in zip(ours, rows)]):.2f}x"
        p99 = "" if label == order[0] else f"{np.median([r['p99_ms'] / o['p99_ms'] for o, r in zip(ours, rows)]):.1f}x"
        lines.append(f"| {label} | {med['requests_per_s']:.1f} | {med['p50_ms']:.0f} | {med['p99_ms']:.0f} | "
                     f"{med['rss_mib']:.0f} | {', '.join(map(str, loads)) or '-'} | {vs} | {p99} |")
    write_results(args.out, "lru_serving", "\n".join(lines), {
        "machine": machine(args.threads), "tasks": args.tasks, "requests": args.requests, "zipf": args.zipf,
        "clients": args.clients, "budget_slots": budget, "bitfit_rss_mib": round(bitfit_mib, 1),
        "lru_first_model_mib": round(first, 1), "lru_per_model_mib": round(each, 1), "results": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
