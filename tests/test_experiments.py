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


def test_runner_resumes_and_never_recomputes(tmp_path, monkeypatch):
    runs = tmp_path / "runs.jsonl"
    monkeypatch.setattr(protocol, "RUNS", runs)
    monkeypatch.setattr(protocol, "RESULTS", tmp_path)
    monkeypatch.setattr(replicate, "model_dir", lambda: None)
    calls = []

    def fake_run(spec, cache, base):
        calls.append(spec)
        return {**spec, "dev_metric": spec["lr"] * 1000, "test_metric": 1.0, "train_metric": 1.0, "seconds": 0.0}

    monkeypatch.setattr(replicate, "run_one", fake_run)
    monkeypatch.setattr(replicate, "_base_biases", lambda: {})
    specs = [dict(method="bq", task="trec6", seed=0, lr=lr, epochs=1, train_size=10) for lr in (1e-3, 3e-3)]
    replicate.execute(specs, None)
    replicate.execute(specs + [dict(specs[0], seed=1)], None)
    assert len(calls) == 3
    rows = [json.loads(line) for line in runs.read_text().splitlines()]
    assert [r["seed"] for r in rows] == [0, 0, 1]
    assert protocol.best_lr(rows, "bq", "trec6", 10, 1) is None  # 3e-4 not searched yet


def test_table_averages_only_tasks_every_method_has():
    import report

    runs = []
    for m in report.METHODS:
        for t, seeds in (("trec6", (0, 1, 2)), ("sms-spam", (0,))):
            if t == "sms-spam" and m == "frozen":
                continue  # one method still missing a task: no average may include that task
            lrs = protocol.LRS.get(m, protocol.DEFAULT_LRS)
            for lr in lrs:  # dev_metric = -lr: the smallest LR wins the search and gets the seeds
                for s in seeds if lr == min(lrs) else (0,):
                    score = 80.0 + s + (t == "sms-spam") * 10
                    runs.append(dict(method=m, task=t, seed=s, lr=lr, epochs=4, train_size=1000, dev_metric=-lr,
                                     test_metric=score, trainable_share=0.001))
    rows = {line.split(" | ")[0].strip("| "): line for line in report.table(runs, 1000, 4).splitlines()}
    bitfit = rows[report.LABEL["bitfit"]]
    assert "81.0 ± 1.0 (n=3" in bitfit  # trec6: seeds 80, 81, 82, sample std
    assert "90.0 (n=1" in bitfit and "90.0 ±" not in bitfit  # one seed: no spread shown
    assert "(81.0, 1 tasks)" in bitfit  # sms-spam left out: frozen lacks it


def test_data_size_curve_uses_the_searched_lr_only(tmp_path):
    import report

    runs = []
    for m, lrs in (("bitfit", protocol.DEFAULT_LRS), ("full", protocol.LRS["full"])):
        for lr in lrs:  # the search at 1,000: the best dev LR has the LOWEST test score of the three
            best = lr == lrs[1]
            runs.append(dict(method=m, task="movie-sentiment", seed=0, lr=lr, epochs=4, train_size=1000,
                             dev_metric=90.0 if best else 80.0, test_metric=70.0 if best else 99.0,
                             train_metric=100.0, trainable_share=0.001))
        runs.append(dict(runs[-2], train_size=250, test_metric=60.0))  # sizes ran at the best LR
        runs.append(dict(runs[-3], lr=lrs[0], train_size=500, test_metric=55.0))  # not the best LR: no point
    report.write_report(runs, tmp_path, 1000, 4)
    text = (tmp_path / "table.md").read_text()
    assert "| method | 250 | 1000 |" in text  # the 500 runs used another LR: not on the curve
    assert "| BitFit (all biases) | 60.0 | 70.0 |" in text
    assert "| Full fine-tuning | 60.0 | 70.0 |" in text
    assert (tmp_path / "data_size.png").stat().st_size > 0


def test_edge_runs_stay_out_of_the_grid(tmp_path, monkeypatch):
    import argparse

    import report

    monkeypatch.setattr(protocol, "RUNS", tmp_path / "runs.jsonl")
    monkeypatch.setattr(protocol, "EDGE", tmp_path / "edge.jsonl")
    monkeypatch.setattr(protocol, "RESULTS", tmp_path)
    monkeypatch.setattr(replicate, "_base_biases", lambda: {})
    monkeypatch.setattr(replicate, "run_one", lambda spec, cache, base: {
        **spec, "dev_metric": 95.0, "test_metric": 94.0, "train_metric": 99.0, "seconds": 0.0})
    grid = [dict(method="bitfit", task="trec6", seed=0, lr=lr, epochs=4, train_size=1000, dev_metric=80.0 + i,
                 test_metric=70.0, train_metric=90.0, trainable_share=0.001)
            for i, lr in enumerate(protocol.DEFAULT_LRS)]
    protocol.RUNS.write_text("".join(json.dumps(r) + "\n" for r in grid))
    args = argparse.Namespace(tasks=["trec6"], epochs=4, train_size=1000, max_minutes=None)
    replicate.edge(args)
    replicate.edge(args)  # resumes: nothing recomputed
    edge = protocol.read_runs(protocol.EDGE)
    assert sorted((r["method"], r["lr"]) for r in edge) == [("bitfit", 1e-2), ("full", 1e-4)]
    assert len(protocol.read_runs()) == 3  # runs.jsonl untouched
    assert protocol.best_lr(protocol.read_runs(), "bitfit", "trec6", 1000, 4) == 3e-3  # the edge does not win it
    text = report.edge_table(protocol.read_runs(), edge, 1000, 4)
    assert "| BitFit (all biases) | trec6 | 82.0 (0.003) | 95.0 (0.01) | 94.0 |" in text
    assert "| Full fine-tuning | trec6 | - | 95.0 (0.0001) | 94.0 |" in text
