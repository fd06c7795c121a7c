"""experiments/: the paper's methods as parameter selections, and the resumable runner."""
from __future__ import annotations

import json
import sys
from pathlib import Path

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
    assert protocol.search(low, "full", "trec6")[:2] == (3e-6, None)  # the ladder ends there
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
    allowed_sizes = {*protocol.SIZES, protocol.TRAIN_SIZE, 5000}  # 5000: the first pass's data-size curve
    keys = set()
    for r in rows:
        where = f"row {protocol.key(r)}"
        assert all(k in r for k in protocol.REQUIRED), where
        assert r["seconds"] > 0 and r["train_size"] in allowed_sizes and r.get("model", "minilm") in protocol.MODELS
        assert r["method"] in methods.METHODS + methods.CONTROLS and r["task"] in protocol.TASKS, where
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
