"""experiments/: the paper's methods as parameter selections, and the resumable runner."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import methods  # noqa: E402
import protocol  # noqa: E402
import replicate  # noqa: E402
from bitfit.encoder.biases import find_biases  # noqa: E402
from bitfit.encoder.model import BitFitModel, load_encoder  # noqa: E402
from bitfit.runtime import BitFitError  # noqa: E402
from bitfit.training.train import train  # noqa: E402


def _train(model, data, select, seed=0):
    return train(model, data, None, epochs=1, lr=1e-2, batch_size=16, seed=seed, progress=False,
                 log=lambda *_: None, select=select)


@pytest.mark.parametrize("name", ["rand_uniform", "rand_row_col"])
def test_random_masks_train_exactly_their_entries(bert_model, data_files, name):
    base = BitFitModel(load_encoder(bert_model), 2)
    chosen = getattr(methods, name)(0)(base)
    target = methods.bias_count(base)
    assert chosen.count() >= target and (name == "rand_row_col" or chosen.count() == target)
    if name == "rand_row_col":  # whole rows or columns
        for mask in chosen.masks.values():
            rows, cols = mask.all(dim=1), mask.all(dim=0)
            assert torch.equal(mask.bool(), rows[:, None] | cols[None, :])
    result = _train(bert_model, data_files["sentiment"], getattr(methods, name)(0))
    trained = dict(result.model.encoder.named_parameters())
    fresh = dict(load_encoder(bert_model).named_parameters())
    masks = {n: chosen.masks[i] for n, p in base.encoder.named_parameters()
             for i, q in enumerate(chosen.params) if q is p}
    changed = 0
    for n, p in fresh.items():
        moved = (trained[n].detach() != p.detach())
        if n in masks:
            assert not (moved & (masks[n] == 0)).any(), f"{n} moved outside its mask"
            changed += int(moved.sum())
        else:
            assert not moved.any(), f"{n} is not selected but moved"
    # most picked entries move; not all: word-embedding rows of tokens absent from the data get no gradient
    assert changed > 0.5 * target
    assert result.pack is None and result.trainable_params == chosen.count() + 2 * 32 + 2


def test_full_and_frozen(bert_model, data_files):
    fresh = {n: p.detach().clone() for n, p in load_encoder(bert_model).named_parameters()}
    full = _train(bert_model, data_files["sentiment"], methods.full).model.encoder
    frozen = _train(bert_model, data_files["sentiment"], methods.frozen).model.encoder
    assert all(torch.equal(p, fresh[n]) for n, p in frozen.named_parameters())
    moved = [n for n, p in full.named_parameters() if not torch.equal(p, fresh[n])]
    assert len(moved) > 0.8 * len(fresh)


def test_select_runs_make_no_pack(bert_model, data_files, tmp_path):
    with pytest.raises(BitFitError, match="makes no task pack: pass out=None"):
        train(bert_model, data_files["sentiment"], tmp_path / "p", select=methods.full, progress=False)


@pytest.mark.parametrize("method,rank", sorted(methods.LORA_METHODS.items()))
def test_lora_trains_only_its_matrices_and_the_head(bert_model, data_files, method, rank):
    """PEFT's LoRA on query and value: the frozen encoder's own weights never move, the LoRA matrices
    (rank r, B starting at zero) do, and the trainable count is theirs plus the head's."""
    fresh = {n: p.detach().clone() for n, p in load_encoder(bert_model).named_parameters()}
    result = _train(bert_model, data_files["sentiment"], methods.train_kwargs(method, 0)["select"])
    params = dict(result.model.encoder.named_parameters())
    lora = {n: p for n, p in params.items() if "lora_" in n}
    targets = [n for n in lora if n.endswith("lora_A.default.weight")]
    layers = load_encoder(bert_model).config.num_hidden_layers
    assert len(targets) == 2 * layers and all(any(t in n for t in methods.LORA_TARGETS) for n in targets)
    assert all(p.shape[0] == rank for n, p in lora.items() if "lora_A" in n)
    assert all(bool((p != 0).any()) for n, p in lora.items() if "lora_B" in n)  # B trained away from zero
    for n, p in params.items():
        if "lora_" not in n:
            assert torch.equal(p.detach(), fresh[n.replace(".base_layer", "")]), f"{n} moved"
    hidden = result.model.encoder.config.hidden_size
    assert result.trainable_params == sum(p.numel() for p in lora.values()) + 2 * hidden + 2
    assert result.base_params == sum(p.numel() for p in fresh.values())  # the LoRA matrices are not "base"


def test_bias_methods_record_bias_change(bert_model, data_files):
    result = train(bert_model, data_files["sentiment"], None, biases="bq,bm2", epochs=1, lr=1e-2, progress=False,
                   log=lambda *_: None)
    base = {s.name: s.parameter.detach().numpy().copy() for s in find_biases(load_encoder(bert_model), "all")}
    change = replicate.bias_change(result.model, base)
    assert all(change[n] > 0 for n in change if n.endswith((".bq", ".bm2")))
    assert all(change[n] == 0 for n in change if not n.endswith((".bq", ".bm2")))


def row(method, task, lr, dev, seed=0, **extra) -> dict:
    return {"model": "minilm", "method": method, "task": task, "seed": seed, "lr": lr, "epochs": 4,
            "train_size": 1000, "dev_metric": dev, "test_metric": dev, **extra}


def test_the_search_moves_the_grid_until_the_best_lr_is_inside_it():
    runs = [row("bitfit", "trec6", lr, dev) for lr, dev in ((3e-4, 70), (1e-3, 80))]
    assert protocol.search(runs, "bitfit", "trec6") == (None, 3e-3, [3e-4, 1e-3])  # the start grid first
    runs.append(row("bitfit", "trec6", 3e-3, 85))
    assert protocol.search(runs, "bitfit", "trec6")[:2] == (None, 1e-2)  # best at the top: one step out
    runs.append(row("bitfit", "trec6", 1e-2, 84))
    assert protocol.search(runs, "bitfit", "trec6") == (3e-3, None, [3e-4, 1e-3, 3e-3, 1e-2])
    low = [row("full", "trec6", lr, dev) for lr, dev in ((1e-5, 90), (3e-5, 80), (5e-5, 70))]
    assert protocol.search(low, "full", "trec6")[:2] == (None, 3e-6)  # best at the bottom: one step down
    low.append(row("full", "trec6", 3e-6, 95))
    assert protocol.search(low, "full", "trec6")[:2] == (None, 1e-6)
    low.append(row("full", "trec6", 1e-6, 99))
    assert protocol.search(low, "full", "trec6")[:2] == (1e-6, None)  # the ladder ends there
    high = [row("bq", "trec6", lr, dev) for lr, dev in ((3e-4, 70), (1e-3, 75), (3e-3, 80), (1e-2, 85), (3e-2, 90))]
    assert protocol.search(high, "bq", "trec6")[:2] == (None, 1e-1)  # 3e-2 is not the end: one step out
    tie = [row("bq", "trec6", lr, 80) for lr in (3e-4, 1e-3, 3e-3)]
    assert protocol.search(tie, "bq", "trec6")[:2] == (None, 1e-4)  # ties go to the smaller LR: an edge


def test_the_driver_resumes_never_recomputes_and_replans(tmp_path, monkeypatch):
    monkeypatch.setattr(protocol, "RUNS", tmp_path / "runs.jsonl")
    monkeypatch.setattr(protocol, "PREDICTIONS", tmp_path / "predictions")
    calls = []
    scores = {3e-4: 70.0, 1e-3: 80.0, 3e-3: 90.0, 1e-2: 85.0}

    def fake_run(spec, cache, bases):
        calls.append(spec)
        return {**spec, "dev_metric": scores[spec["lr"]], "test_metric": 1.0, "seconds": 1.0}

    monkeypatch.setattr(replicate, "run_one", fake_run)
    plan = lambda runs: replicate.searched(runs, ["bq"], ["trec6"])  # noqa: E731
    replicate.drive(plan, 0.0, "test")  # out of time before anything: nothing runs
    assert calls == []
    replicate.drive(plan, None, "test")
    assert [c["lr"] for c in calls if c["seed"] == 0] == [3e-4, 1e-3, 3e-3, 1e-2]
    assert sorted(c["seed"] for c in calls if c["lr"] == 3e-3) == [0, 1, 2]
    before = len(calls)
    replicate.drive(plan, None, "test")  # resumes: nothing recomputed
    assert len(calls) == before == len(protocol.read_runs())


def test_bitfit_and_full_get_five_seeds_at_the_main_budget():
    runs = [row(m, "trec6", lr, 80.0 if lr == mid else 70.0) for m, ladder in (("bitfit", (3e-4, 1e-3, 3e-3)),
                                                                               ("full", (1e-5, 3e-5, 5e-5)))
            for mid in [ladder[1]] for lr in ladder]
    seeds = {m: sorted(s["seed"] for s in replicate.searched(runs, [m], ["trec6"])) for m in ("bitfit", "full", "bq")}
    assert seeds["bitfit"] == seeds["full"] == [0, 1, 2, 3, 4] and seeds["bq"] == [0]  # bq: its first search step


def test_the_data_size_curve_trains_at_least_250_steps():
    for size in protocol.SIZES:
        steps = protocol.epochs_for(size) * -(-size // protocol.BATCH)
        assert steps >= protocol.MIN_STEPS
    assert protocol.epochs_for(1000) == protocol.EPOCHS and protocol.epochs_for(250) == 16


def test_committed_results_hold_only_real_runs():
    """Every row a real run of the runner writes: its keys, sizes, epochs, methods, tasks, a positive time,
    scores in range, no key twice; every predictions file belongs to a row."""
    rows = protocol.read_runs()
    assert rows, "experiments/results/runs.jsonl is empty"
    allowed_sizes = {*protocol.SIZES, protocol.TRAIN_SIZE, 5000}  # 5000: the first pass's (report.in_protocol drops it)
    keys = set()
    for r in rows:
        where = f"row {protocol.key(r)}"
        assert all(k in r for k in protocol.REQUIRED), where
        assert r["seconds"] > 0 and r["train_size"] in allowed_sizes and r.get("model", "minilm") in protocol.MODELS
        assert r["method"] in (*methods.METHODS, *methods.CONTROLS, *methods.LORA_METHODS), where
        assert r["task"] in protocol.TASKS, where
        assert r["epochs"] in {protocol.EPOCHS, protocol.LONG_EPOCHS, *map(protocol.epochs_for, protocol.SIZES)}
        assert 0 < r["lr"] < 1 and 0 <= r["seed"] < 10 and 1 <= r["best_epoch"] <= r["epochs"], where
        low = -100 if r["metric"] == "spearman" else 0
        assert all(low <= r[k] <= 100 for k in ("dev_metric", "test_metric", "train_metric")), where
        assert protocol.key(r) not in keys, f"{where} twice"
        keys.add(protocol.key(r))
    named = {protocol.predictions_path(r).name for r in rows}
    stray = [p.name for p in protocol.PREDICTIONS.glob("*.npz") if p.name not in named]
    assert not stray, f"predictions without a run: {stray[:3]}"


def test_authors_row_col_masks_and_the_constant_schedule(bert_model, data_files, monkeypatch):
    base = BitFitModel(load_encoder(bert_model), 2)
    chosen = methods.rand_row_col_authors(0)(base)
    names = {id(p): n for n, p in base.encoder.named_parameters()}
    gains = [names[id(p)] for i, p in enumerate(chosen.params) if i not in chosen.masks]
    assert gains and all(n.endswith("LayerNorm.weight") and n.startswith("encoder.layer.") for n in gains)
    for i, mask in chosen.masks.items():
        p = chosen.params[i]
        rows, cols = mask.all(dim=1), mask.all(dim=0)
        assert torch.equal(mask.bool(), rows[:, None] | cols[None, :])  # whole rows or one whole column
        assert int(mask.sum()) <= p.shape[0] and (cols.sum() == 1 or rows.sum() >= 1)
    assert abs(chosen.count() - methods.bias_count(base)) < 0.5 * methods.bias_count(base)
    import transformers

    seen = []
    real = transformers.get_constant_schedule
    monkeypatch.setattr(transformers, "get_constant_schedule", lambda opt: seen.append(opt) or real(opt))
    result = train(bert_model, data_files["sentiment"], None, epochs=1, progress=False, log=lambda *_: None,
                   **methods.train_kwargs("bitfit_constlr", 0))
    assert seen and result.model is not None
    with pytest.raises(BitFitError, match="schedule must be one of linear, constant"):
        train(bert_model, data_files["sentiment"], None, schedule="cosine", progress=False)


def synthetic_runs() -> list[dict]:
    """Every method done on every task: the middle start LR best, BitFit 1.0 below full with little spread."""
    runs = []
    base = {"full": 81.0, "bitfit": 80.0, "bq,bm2": 79.5, "bm2": 79.0, "bq": 75.0, "frozen": 65.0,
            "rand_uniform": 77.0, "rand_row_col": 78.0}
    for m, score in base.items():
        ladder = protocol.START[protocol.family(m)]
        for t in protocol.TASKS:
            for lr in ladder:
                best = lr == ladder[1]
                seeds = range(5 if m in ("bitfit", "full") else 3) if best else (0,)
                for s in seeds:
                    value = score + 0.1 * s if best else score - 5
                    runs.append(row(m, t, lr, value, seed=s, metric="accuracy", train_metric=value + 5,
                                    trainable_share=0.001, bias_change={"layer.0.bq": 0.03, "layer.0.bm2": 0.02}))
    return runs


def test_the_report_states_intervals_and_verdicts(tmp_path, monkeypatch):
    import report
    from stats import Interval, paired_gap, t_interval

    assert Interval(1.0, 0.8, 1.2, 3).verdict(1.5, below=True) == "reproduced"
    assert Interval(1.4, 0.8, 2.0, 3).verdict(1.5, below=True) == "undetermined"
    assert Interval(2.0, 1.6, 2.4, 3).verdict(1.5, below=True) == "not reproduced"
    assert t_interval([1.0]).n == 1 and paired_gap({0: 2.0, 1: 3.0}, {1: 1.0, 2: 0.0}).mean == 2.0  # seed 1 only

    runs = synthetic_runs()
    monkeypatch.setattr(protocol, "PREDICTIONS", tmp_path / "predictions")
    gold = np.array([0, 1] * 50)
    rng = np.random.default_rng(0)
    for r in runs:  # full right on 90%, BitFit on 80%, of the same examples
        if r["method"] in ("bitfit", "full") and r["test_metric"] > 70:
            path = protocol.predictions_path(r)
            path.parent.mkdir(parents=True, exist_ok=True)
            right = rng.random(100) < (0.9 if r["method"] == "full" else 0.8)
            np.savez_compressed(path, pred=np.where(right, gold, 1 - gold).astype(np.int8))
    report.write_report(runs, tmp_path / "out", gold=lambda task: (gold, "accuracy", 2))
    text = (tmp_path / "out" / "table.md").read_text()
    assert "81.20 [" in text and "(n=5)" in text  # full: seeds 81.0 .. 81.4, its interval
    # full and BitFit differ by exactly 1.00 on every seed, so over seeds alone the interval is [1.00, 1.00]; on
    # these 100-example test sets the predictions differ by ~10 points: the seed-and-test interval says so, and
    # the two disagree, so the one rule says undetermined
    assert "goal: full - BitFit < 1.5): 1.00 [1.00, 1.00] (n=5) over seeds; " in text
    assert "over seeds and test examples (5 of 5 seeds have predictions): **undetermined**" in text
    assert "goal: BitFit - frozen > 10): 15.00" in text and "(seed-only: no test predictions)" in text
    assert re.search(r"\| trec6 \| 1\.00 \[1\.00, 1\.00\] \(n=5\) \| (8|9|10|11|12|13)\.\d\d \[.*\] \(n=5\) "
                     r"\| 5 of 5 \| full ahead \|", text)
    assert "**0.001**" in text  # the chosen LR is marked in the grids
    assert (tmp_path / "out" / "bias_change.png").stat().st_size > 0


def test_the_lora_comparison_joins_scores_and_serving_costs():
    import report

    def cell(method, task, scores, share):
        return [row(method, task, 1e-3, v, seed=s, trainable_share=share) for s, v in enumerate(scores)]

    cells = {}
    for t in protocol.TASKS:
        cells[("bitfit", t)] = cell("bitfit", t, [80.0, 81.0, 82.0], 0.001)
        cells[("full", t)] = cell("full", t, [82.0, 83.0, 84.0], 1.0)
    cells[("lora_r8", "trec6")] = cell("lora_r8", "trec6", [81.0, 82.5, 83.0], 0.003)  # one task only
    rows = [{"variant": v, "vs_frozen": x} for v, x in
            (("bitfit", 1.01), ("bitfit", 1.02), ("lora inputs", 1.03), ("lora merged", 0.99), ("lora mixed", 1.05))]
    models = {m: {"task_bytes": {"bitfit": 100 * 2**10 * k, "lora inputs": 300 * 2**10 * k,
                                 "lora merged": 90 * 2**20 * k},
                  "parity": {"bitfit mixed rows vs each task alone": 2e-6, "lora mixed rows vs each task alone": 3e-4}}
              for m, k in (("minilm", 1), ("bert-base", 4))}
    serving = {"machine": "m", "seq": 128, "rows": rows, "models": models}
    lines = {line.split(" | ")[0].lstrip("| "): line for line in report.comparison(cells, serving)}
    assert "| 81.00 [78.52, 83.48] (n=3) | - | 1.010-1.020x | 100 KB / 400 KB | yes (rows within 2.0e-06" \
        in lines["BitFit (bias inputs)"]
    assert "| 2.00 [2.00, 2.00] (n=3) | 0.990-0.990x | 90 MB / 360 MB | no: a graph per task |" \
        in lines["Full fine-tuning (a graph per task)"]
    lora = lines["LoRA r=8 q,v (A/B inputs)"]  # its gap is paired with BitFit on its task only
    assert "(trec6 only) | 1.17 [0.45, 1.88] (n=3) | 1.030-1.030x | 300 KB / 1,200 KB |" in lora
    assert lora.endswith("| no: mixed rows 3.0e-04 from each task alone |")  # not claimed as sharing a pass
    assert "| not run |" in lines["LoRA r=3 q,v (BitFit's count)"]
    renamed = {**serving, "rows": [{**r, "variant": r["variant"].replace("lora inputs", "lora A/B")} for r in rows]}
    with pytest.raises(ValueError, match="no 'lora inputs' for minilm: re-run benchmarks/lora_serving.py"):
        report.comparison(cells, renamed)  # never a silent "not timed"
    del models["bert-base"]["parity"]["bitfit mixed rows vs each task alone"]
    with pytest.raises(ValueError, match="no 'bitfit mixed rows vs each task alone' for bert-base"):
        report.comparison(cells, serving)


def test_a_control_run_on_some_tasks_reports_those_tasks_not_an_average():
    import report

    main = {("bitfit", t): [row("bitfit", t, 1e-3, 80.0 + s, seed=s) for s in range(3)] for t in protocol.TASKS}
    ctl = {("bitfit_constlr", "trec6"): [row("bitfit_constlr", "trec6", 1e-3, 79.0 + s, seed=s) for s in range(3)]}
    lines = report.controls(main, ctl)
    assert "per task (paired by seed; the other tasks not run yet): trec6 -1.00 [-1.00, -1.00] (n=3)" in lines[0]
    assert "4-task average" not in lines[0] and lines[1].endswith("not run yet")


def test_the_size_curve_plan_honours_tasks_and_trains_every_size_long_enough():
    import argparse
    import math

    plan = replicate.plan_sizes(argparse.Namespace(tasks=["trec6"]))([])
    assert {s["task"] for s in plan} == {"trec6"} and {s["train_size"] for s in plan} == set(protocol.SIZES)
    assert {s["method"] for s in plan} == {"bitfit", "full"}
    for s in plan:  # the fair curve: no size trains fewer optimizer steps than the floor
        assert math.ceil(s["train_size"] / protocol.BATCH) * s["epochs"] >= protocol.MIN_STEPS, s
    assert replicate.plan_sizes(argparse.Namespace(tasks=["sms-spam"]))([]) == []  # not a size task: nothing


def test_the_size_curve_gets_five_seeds_where_its_gap_straddles_zero():
    import argparse

    import report

    n, e = 250, protocol.epochs_for(250)
    chosen = {"bitfit": 1e-3, "full": 3e-5}

    def runs_with(diffs):  # a finished search at 250 on trec6, then seeds 1-2; BitFit - full = diffs by seed
        out = [row(m, "trec6", lr, 80.0 if lr == chosen[m] else 70.0, train_size=n, epochs=e,
                   test_metric=80.0 + (diffs[0] if m == "bitfit" else 0.0))
               for m in chosen for lr in protocol.START[protocol.family(m)]]
        return out + [row(m, "trec6", chosen[m], 80.0, seed=s, train_size=n, epochs=e,
                          test_metric=80.0 + (diffs[s] if m == "bitfit" else 0.0)) for m in chosen for s in (1, 2)]

    def plan(runs):  # what the runner would still run
        done = {protocol.key(r) for r in runs}
        return [s for s in replicate.plan_sizes(argparse.Namespace(tasks=["trec6"]))(runs)
                if protocol.key(s) not in done]

    level = runs_with([-1.0, 2.0, -2.0])
    extra = [(s["method"], s["seed"], s["lr"], s["train_size"], s["epochs"]) for s in plan(level)
             if s["train_size"] == n]
    assert extra == [("bitfit", 3, 1e-3, n, e), ("bitfit", 4, 1e-3, n, e), ("full", 3, 3e-5, n, e),
                     ("full", 4, 3e-5, n, e)]
    assert not [s for s in plan(runs_with([-1.0, -1.2, -0.8])) if s["train_size"] == n]  # full ahead: 3 seeds
    level = runs_with([1.0, 1.0, 0.2]) + [row(m, "trec6", chosen[m], 80.0, seed=3, train_size=n, epochs=e,
                                              test_metric=81.0 if m == "bitfit" else 80.0) for m in chosen]
    # with seed 3 the interval is above 0; seeds 0-2 decide, so seed 4 still comes for both
    assert {(s["method"], s["seed"]) for s in plan(level) if s["train_size"] == n} == {("bitfit", 4), ("full", 4)}
    # once run, the report's gap at that size counts all five seeds (the runner's three-seed view is its own)
    five = runs_with([-1.0, 2.0, -2.0]) + [row(m, "trec6", chosen[m], 80.0, seed=s, train_size=n, epochs=e,
                                               test_metric=83.0 if (m, s) == ("bitfit", 3) else 80.0)
                                           for m in chosen for s in protocol.MORE_SEEDS]
    gap = report.size_gaps(five)["trec6"][n]
    assert (gap.n, gap.mean) == (5, pytest.approx((-1.0 + 2.0 - 2.0 + 3.0 + 0.0) / 5))


def test_the_mpnet_plan_honours_tasks_and_searches_from_minilms_chosen_lr_off_the_edges():
    import argparse

    chosen = {"bitfit": 1e-3, "full": 3e-5}  # a finished search: the best dev at an inner LR of the start grid
    runs = [row(m, t, lr, 80.0 if lr == chosen[m] else 70.0) for m in chosen for t in protocol.SIZE_TASKS
            for lr in protocol.START[protocol.family(m)]]
    plan = replicate.plan_mpnet(argparse.Namespace(tasks=["trec6"]))
    assert {(s["method"], s["task"], s["lr"], s["model"], s["seed"]) for s in plan(runs)} == {
        ("bitfit", "trec6", 1e-3, "mpnet", 0), ("full", "trec6", 3e-5, "mpnet", 0)}  # MiniLM's LR first
    assert replicate.plan_mpnet(argparse.Namespace(tasks=["sms-spam"]))(runs) == []  # not one of its tasks
    assert protocol.base_search(runs, "bitfit", "trec6") == (None, 1e-3, [])
    runs += [row(m, "trec6", chosen[m], 85.0, model="mpnet") for m in chosen]
    assert [s["lr"] for s in plan(runs)] == [3e-4, 1e-5]  # then the ladder step below
    runs += [row("bitfit", "trec6", 3e-4, 84.0, model="mpnet"), row("full", "trec6", 1e-5, 86.0, model="mpnet")]
    # MiniLM's LR beat the step below: the step above; the step below won: one further down, none above
    assert [s["lr"] for s in plan(runs)] == [3e-3, 3e-6]
    runs += [row("bitfit", "trec6", 3e-3, 87.0, model="mpnet"), row("full", "trec6", 3e-6, 60.0, model="mpnet")]
    assert [s["lr"] for s in plan(runs)] == [1e-2]  # best at an edge: one step out, as the main search
    runs += [row("bitfit", "trec6", 1e-2, 20.0, model="mpnet")]
    assert plan(runs) == []
    assert protocol.base_search(runs, "bitfit", "trec6") == (3e-3, None, [3e-4, 1e-3, 3e-3, 1e-2])  # best dev
    assert protocol.base_search(runs, "full", "trec6") == (1e-5, None, [3e-6, 1e-5, 3e-5])  # 5e-5 never run
    no_top = [r for r in runs if not (r["model"] == "mpnet" and r["method"] == "bitfit" and r["lr"] >= 3e-3)]
    assert protocol.base_search(no_top, "bitfit", "trec6")[:2] == (None, 3e-3)  # MiniLM's run at 3e-3 doesn't count


def test_the_base_size_section_sets_mpnet_beside_minilm_and_states_how_far_its_search_got():
    import report

    chosen = {"bitfit": 1e-3, "full": 3e-5}
    runs = [row(m, t, lr, 80.0 if lr == chosen[m] else 70.0) for m in chosen for t in protocol.SIZE_TASKS
            for lr in protocol.START[protocol.family(m)]]
    runs += [row(m, "trec6", chosen[m], 80.0, seed=s, test_metric=88.0 + s + (m == "full")) for m in chosen
             for s in (1, 2)]
    assert report.base_size(runs) == []  # no mpnet run: no section
    mp = lambda m, lr, dev, test: row(m, "trec6", lr, dev, model="mpnet", test_metric=test, seconds=600.0)  # noqa: E731
    runs.append(mp("bitfit", 1e-3, 85.0, 90.5))
    lines = report.base_size(runs)
    assert "| BitFit (all biases) | trec6 | 0.001 | 85.00 | 90.50 | 0.001: 80.00 | 600 |  |" in lines
    assert lines[-1].endswith("trec6: LR search not finished")  # no gap from a half-searched LR
    runs += [mp("full", 3e-5, 86.0, 92.0), mp("bitfit", 3e-4, 84.0, 80.0), mp("bitfit", 3e-3, 87.0, 91.0),
             mp("full", 1e-5, 87.0, 93.5), mp("full", 5e-5, 85.0, 99.0)]
    assert report.base_size(runs)[-1].endswith("trec6: LR search not finished")  # both bests at an edge
    runs += [mp("bitfit", 1e-2, 20.0, 20.0), mp("full", 3e-6, 60.0, 60.0)]
    lines = report.base_size(runs)
    assert "| BitFit (all biases) | trec6 | 0.003 | 87.00 | 91.00 | 0.001: 80.00 | 600 | chosen |" in lines
    assert "| Full fine-tuning | trec6 | 3e-05 | 86.00 | 92.00 | 3e-05: 80.00 | 600 |  |" in lines
    assert "trec6 2.50 (n=1) over seeds; no seed has predictions of both: **one seed: no interval** (MiniLM, " \
        "over seeds: 0.67 [-0.77, 2.10] (n=3))" in lines[-1]  # best dev, not best test: full 93.5 - BitFit 91.0
    assert report.base_size_short(runs) == ["- at base size (all-mpnet-base-v2), per task, BitFit matches full "
                                            "fine-tuning (goal: full - BitFit < 1.5): trec6 2.50 (n=1) over seeds; "
                                            "no seed has predictions of both: **one seed: no interval**"]
    # seeds 1-2 at the chosen points (and one at a point not chosen, which must not count): an interval, a verdict
    runs += [row(m, "trec6", lr, 80.0, model="mpnet", seed=s, test_metric=test) for m, lr, s, test in (
        ("bitfit", 3e-3, 1, 91.0), ("bitfit", 3e-3, 2, 91.0), ("full", 1e-5, 1, 92.0), ("full", 1e-5, 2, 93.5),
        ("full", 3e-5, 1, 50.0))]
    gap = "trec6 2.00 [-0.15, 4.15] (n=3) over seeds"  # full - BitFit per seed: 2.5, 1.0, 2.5 (not 3e-5's -41)
    assert gap in report.base_size(runs)[-1] and gap in report.base_size_short(runs)[0]
    line = lambda: report.base_size_short(runs)[0]  # noqa: E731
    assert line().endswith("no seed has predictions of both: **undetermined (seed-only: no test predictions)**")
    at = {(r["method"], r["seed"]): r for r in runs if r["model"] == "mpnet" and r["lr"] in (3e-3, 1e-5)}
    for s, test in ((0, 93.0), (1, 91.6), (2, 92.9)):  # full - BitFit 0.5, 0.4, 0.6: under the goal on every seed
        at["bitfit", s]["test_metric"] = test
    assert line().endswith("**reproduced (seed-only: no test predictions)**")
    for s in (0, 1, 2):  # full 4.5 to 5.5 ahead: BitFit does not match it
        at["bitfit", s]["test_metric"] -= 5.0
    assert line().endswith("**not reproduced (seed-only: no test predictions)**")


def test_the_data_size_verdict_needs_both_ends_of_the_trend():
    import report
    from stats import Interval

    ahead, level, behind = Interval(2.0, 1.0, 3.0, 3), Interval(0.0, -1.0, 1.0, 3), Interval(-2.0, -3.0, -1.0, 3)
    assert report.data_size_verdict({250: ahead, 2000: behind}) == "reproduced"
    # two claims, one rule: both ends hold, or either is contradicted, or it is undetermined (no "partly")
    assert report.data_size_verdict({250: ahead, 2000: level}) == "undetermined"
    assert report.data_size_verdict({250: level, 500: ahead, 2000: behind}) == "undetermined"  # the smallest decides
    assert report.data_size_verdict({250: level, 2000: level}) == "undetermined"
    assert report.data_size_verdict({250: Interval(0.5, -0.5, 1.5, 3), 2000: behind}) == "undetermined"
    assert report.data_size_verdict({250: ahead, 2000: ahead}) == "not reproduced"  # the large end contradicted
    # the test set's sampling: an end whose seed-and-test interval straddles 0 holds no more
    assert report.data_size_verdict({250: ahead, 2000: behind}, {250: Interval(2.0, -0.5, 4.0, 3)}) == "undetermined"
    assert report.data_size_verdict({250: behind, 2000: behind}) == "not reproduced"
    assert report.data_size_verdict({250: ahead}).startswith("undetermined")  # one size is no trend
    assert report.data_size_verdict({250: Interval(2.0, float("nan"), float("nan"), 1), 2000: behind}) \
        .startswith("undetermined")  # one seed: no interval


def test_the_findings_state_the_data_size_trend_from_the_curve():
    import report

    runs = []
    for n, (b, f) in {250: (80.0, 70.0), 1000: (80.0, 80.0), 2000: (80.0, 90.0)}.items():
        for t in protocol.SIZE_TASKS:
            for m, v in (("bitfit", b), ("full", f)):
                ladder = protocol.START[protocol.family(m)]  # a finished search: the middle LR best
                runs += [row(m, t, lr, v - (lr != ladder[1]), train_size=n, epochs=protocol.epochs_for(n))
                         for lr in ladder]
                runs += [row(m, t, ladder[1], v + 0.1 * s, seed=s, train_size=n, epochs=protocol.epochs_for(n))
                         for s in (1, 2)]
    line = next(x for x in report.findings({}, runs) if x.startswith("- BitFit leads with little data"))
    assert "trec6: 250 examples 10.00 [" in line and "2000 examples -10.00 [" in line
    assert line.count("**reproduced**") == len(protocol.SIZE_TASKS)


# -- issue 28: two intervals per finding, one rule, stray rows, knife edges, pending runs ----------------------
def _scored(gold):
    from stats import metric_fn

    return {"t": (gold, metric_fn("accuracy", 2))}


def test_the_two_level_interval_carries_the_test_sets_sampling():
    """Seeds that agree exactly give a zero-width seed interval; on a 20-example test set the two-level one
    must be wide, contain 0 when the methods differ by one example, exclude it when they differ by many."""
    from stats import paired_gap, two_level

    gold = np.array([0, 1] * 10)
    right = gold.copy()
    one_off = gold.copy()
    one_off[0] = 1 - one_off[0]  # b wrong on one example of 20, on every seed: a - b = 5 points each seed
    a = {"t": {s: right for s in range(3)}}
    b = {"t": {s: one_off for s in range(3)}}
    seed_only = paired_gap({s: 100.0 for s in range(3)}, {s: 95.0 for s in range(3)})
    both = two_level(a, b, _scored(gold))
    assert (seed_only.low, seed_only.high) == (5.0, 5.0) and both.mean == pytest.approx(5.0)
    assert both.high - both.low > seed_only.high - seed_only.low and both.low <= 0 <= both.high
    assert both == two_level(a, b, _scored(gold)) and both.n == 3  # deterministic: a fixed bootstrap seed
    many = np.where(np.arange(20) < 12, 1 - gold, gold)  # b wrong on 12 of 20
    far = two_level(a, {"t": {s: many for s in range(3)}}, _scored(gold))
    assert far.low > 0 and far.mean == pytest.approx(60.0)
    # paired by seed: a seed one method lacks does not count; none in common: no interval at all
    assert two_level(a, {"t": {0: one_off, 7: one_off}}, _scored(gold)).n == 1
    assert two_level(a, {"t": {7: one_off}}, _scored(gold)).n == 0


def test_the_two_level_interval_resamples_seeds_too():
    """Test sets large enough to be nearly fixed: the spread between seeds must still widen the interval."""
    from stats import two_level

    rng = np.random.default_rng(1)
    gold = rng.integers(0, 2, 4000)
    flip = lambda k: np.where(np.arange(4000) < k, 1 - gold, gold)  # noqa: E731 (k wrong of 4000)
    a = {"t": {s: gold for s in range(4)}}
    b = {"t": {0: flip(40), 1: flip(400), 2: flip(40), 3: flip(400)}}  # 1 or 10 points: the seeds disagree
    both = two_level(a, b, _scored(gold))
    assert both.low < 2.5 and both.high > 8.5  # reaches towards both seeds' values, not just the mean's neighbourhood


def test_the_slope_per_doubling():
    from stats import slope

    exact = slope([(250, 0.0), (500, -1.0), (1000, -2.0), (2000, -3.0)])
    assert exact.mean == pytest.approx(-1.0) and exact.low == pytest.approx(-1.0)
    noisy = slope([(n, -0.2 * np.log2(n / 250) + e) for n in (250, 500, 1000, 2000) for e in (-0.3, 0.3)])
    assert noisy.mean == pytest.approx(-0.2) and noisy.low < -0.2 < noisy.high and noisy.n == 8


def test_one_verdict_rule_for_both_intervals():
    import report
    from stats import NONE, Interval

    inside, across, outside = Interval(1.0, 0.8, 1.2, 3), Interval(1.0, -0.5, 2.0, 3), Interval(2.0, 1.6, 2.4, 3)
    assert report.judge(inside, inside, 1.5, True) == "reproduced"
    assert report.judge(inside, across, 1.5, True) == "undetermined"  # the test set's sampling undoes it
    assert report.judge(outside, outside, 1.5, True) == "not reproduced"
    assert report.judge(outside, NONE, 1.5, True) == "not reproduced (seed-only: no test predictions)"
    assert report.judge(Interval(1.0, float("nan"), float("nan"), 1), inside, 1.5, True).startswith("one seed")


def test_stray_rows_are_left_out_by_the_stated_rule():
    import report

    assert report.in_protocol(row("bitfit", "trec6", 1e-3, 80.0))
    assert report.in_protocol(row("bitfit", "trec6", 1e-3, 80.0, epochs=protocol.LONG_EPOCHS))  # the control
    assert report.in_protocol(row("bitfit", "trec6", 1e-3, 80.0, train_size=250, epochs=16))
    assert not report.in_protocol(row("bitfit", "trec6", 1e-3, 80.0, train_size=5000))
    assert not report.in_protocol(row("bitfit", "trec6", 1e-3, 80.0, train_size=250))  # 4 epochs at 250
    note = report.stray_note([row("full", "trec6", 1e-3, 80.0), row("full", "trec6", 1e-3, 80.0, train_size=5000)])
    assert note.startswith("2 runs; 1 outside the protocol") and "full trec6 5000 examples 4 epochs" in note


def test_full_fine_tunings_share_prints_the_head_apart():
    import report

    assert report.share_text({"trainable_share": 22566146 / 22565376, "trainable_params": 22566146}) \
        == "100% + head 0.003%"
    assert report.share_text({"trainable_share": 0.00117, "trainable_params": 26412}) == "0.117%"


def test_knife_edges_and_the_edges_plan():
    import argparse

    import report

    runs = [row("frozen", "movie-sentiment", lr, dev) for lr, dev in ((3e-4, 67.6), (1e-3, 74.8), (3e-3, 78.0),
                                                                      (1e-2, 78.0))]
    runs += [row("bitfit", "trec6", lr, dev) for lr, dev in ((3e-4, 70.0), (1e-3, 80.0), (3e-3, 75.0))]  # peaked
    assert protocol.best_lr(runs, "frozen", "movie-sentiment") == 3e-3  # the tie went to the smaller LR
    assert report.knife_edges(runs) == [("frozen", "movie-sentiment", 1000, 1e-2, 3e-2)]
    plan = replicate.plan_edges(argparse.Namespace())(runs)
    assert [(s["method"], s["lr"], s["seed"], s["epochs"]) for s in plan] == [("frozen", 3e-2, 0, 4)]
    runs.append(row("frozen", "movie-sentiment", 3e-2, 77.0))  # the step above lost: settled
    assert report.knife_edges(runs) == [] and replicate.plan_edges(argparse.Namespace())(runs) == []


def test_the_edges_and_mpnet_seeds_commands_run_through_the_driver(tmp_path, monkeypatch):
    import argparse

    monkeypatch.setattr(protocol, "RUNS", tmp_path / "runs.jsonl")
    monkeypatch.setattr(protocol, "PREDICTIONS", tmp_path / "predictions")
    chosen = {"bitfit": 1e-3, "full": 3e-5}
    start = [row(m, t, lr, 80.0 if lr == chosen[m] else 70.0, seconds=60.0) for m in chosen
             for t in protocol.SIZE_TASKS for lr in protocol.START[protocol.family(m)]]
    start += [row(m, "trec6", lr, 85.0 if lr == chosen[m] else 80.0, model="mpnet", seconds=600.0) for m in chosen
              for lr in (chosen[m], protocol.LADDER[protocol.family(m)][protocol.LADDER[protocol.family(m)].index(
                  chosen[m]) - 1], protocol.LADDER[protocol.family(m)][protocol.LADDER[protocol.family(m)].index(
                      chosen[m]) + 1])]
    protocol.RUNS.write_text("".join(__import__("json").dumps(r) + "\n" for r in start))
    calls = []
    monkeypatch.setattr(replicate, "run_one", lambda spec, c, b: calls.append(spec) or
                        {**spec, "dev_metric": 50.0, "test_metric": 50.0, "seconds": 1.0})
    replicate.drive(replicate.plan_mpnet_seeds(argparse.Namespace(tasks=list(protocol.TASKS))), None, "t")
    assert sorted((c["method"], c["seed"], c["lr"], c["model"]) for c in calls) == [
        ("bitfit", 1, 1e-3, "mpnet"), ("bitfit", 2, 1e-3, "mpnet"),
        ("full", 1, 3e-5, "mpnet"), ("full", 2, 3e-5, "mpnet")]
    import report

    what = {cmd: specs for _, specs, cmd in report.pending(protocol.read_runs(), [])}
    assert what["mpnet-seeds"] == [] and what["edges"] == []
    assert {(s["method"], s["task"], s["seed"]) for s in what["rerun-sample"]} == {
        (m, t, 0) for m in chosen for t in protocol.SIZE_TASKS}  # no predictions file: metric only
    assert all(s["estimated_seconds"] == 60.0 for s in what["rerun-sample"])  # the cell's logged runs' mean


def test_rerun_sample_keeps_predictions_only_when_the_metric_reproduces(tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(protocol, "RUNS", tmp_path / "runs.jsonl")
    monkeypatch.setattr(protocol, "RESULTS", tmp_path)
    monkeypatch.setattr(protocol, "PREDICTIONS", tmp_path / "predictions")
    chosen = {"bitfit": 1e-3, "full": 3e-5}
    runs = [row(m, "trec6", lr, 80.0 if lr == chosen[m] else 70.0, test_metric=88.0) for m in chosen
            for lr in protocol.START[protocol.family(m)]]
    runs += [row(m, "trec6", chosen[m], 80.0, seed=1, test_metric=88.0) for m in chosen]
    protocol.RUNS.write_text("".join(json.dumps(r) + "\n" for r in runs))

    def fake(spec, cache, bases):
        path = protocol.predictions_path(spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, pred=np.zeros(3, np.int8))
        return {**spec, "test_metric": 88.0 if spec["method"] == "bitfit" else 87.0}

    monkeypatch.setattr(replicate, "run_one", fake)
    replicate.rerun_predictions(None, sample=True)
    log = [json.loads(x) for x in (tmp_path / "reruns.jsonl").read_text().splitlines()]
    assert {(r["method"], r["seed"], r["reproduced"]) for r in log} == {("bitfit", 0, True), ("full", 0, False)}
    kept = {p.name.split("-")[1] for p in (tmp_path / "predictions").glob("*.npz")}
    assert kept == {"bitfit"}  # full's re-run gave 87.00 against its logged 88.00: no file stands for it


def test_the_shared_findings_land_in_both_docs_in_the_same_words(tmp_path):
    import report

    readme, doc = tmp_path / "README.md", tmp_path / "replication.md"
    readme.write_text(f"# x\n- Replication:\n\n{report.BEGIN}\nold words\n{report.END}\n\n- more\n")
    doc.write_text(f"intro\n{report.BEGIN}\n{report.END}\nrest\n")
    runs = synthetic_runs()
    report.write_report(runs, tmp_path / "out", gold=lambda task: (np.array([0, 1]), "accuracy", 2),
                        serving=None, docs=(readme, doc))
    block = report.block_of(readme)
    assert block == report.block_of(doc) and "old words" not in readme.read_text()
    assert readme.read_text().endswith(f"{report.END}\n\n- more\n") and doc.read_text().endswith("rest\n")
    assert "BitFit matches full fine-tuning (goal: full - BitFit < 1.5): 1.00 [1.00, 1.00] (n=5) over seeds" in block
    assert "**reproduced (seed-only: no test predictions)**" in block and "mean pooling" in block
    (tmp_path / "bad.md").write_text("no markers\n")
    with pytest.raises(ValueError, match="needs exactly one"):
        report.splice(tmp_path / "bad.md", block)


def test_the_committed_readme_and_docs_carry_the_reports_words():
    """README.md and docs/replication.md hold the same generated findings, as summary.json last wrote them."""
    import json

    import report

    root = Path(__file__).resolve().parents[1]
    shared = json.loads((protocol.RESULTS / "summary.json").read_text())["shared"]
    assert report.block_of(root / "README.md") == report.block_of(root / "docs" / "replication.md") == shared


def test_an_interval_a_verdict_is_judged_by_is_printed_even_from_one_seed():
    """One seed has no interval over seeds, but the two-level bootstrap's (its test examples) is real: the words
    must show it, since a verdict may be judged by it."""
    from stats import Interval, t_interval

    assert t_interval([1.0]).text() == "1.00 (n=1)"
    assert Interval(-0.65, -1.9, 0.6, 1).text() == "-0.65 [-1.90, 0.60] (n=1)"
