"""`bitfit train` under `accelerate launch`: two CPU processes (DDP over gloo) give the pack one process gives.

batch_size is the global batch: 36 rows in batches of 7 split 3/4 between the processes, and the last batch
of 1 row leaves one process a zero-weighted stand-in row, so the loss weighting of uneven shards is what
makes the packs agree. The tiny model has every dropout at 0: the processes draw other dropout masks than
one process does, so with dropout the runs agree in distribution only. Tolerance: 1e-5 on every tensor
(the all-reduce sums gradients in another order; typical differences are ~2e-6), while training moves
them by far more.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from bitfit.encoder.biases import find_biases
from bitfit.encoder.model import load_encoder
from bitfit.runtime import load_pack
from bitfit.training.tokens import IGNORE
from bitfit.training.train import loss_terms, shard, train
from conftest import QUIET, write_scores, write_sentiment
from head_data import write_qa_data, write_token_data
from tiny import make_tiny

pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
HYPER = {"epochs": 2, "batch_size": 7, "lr": 5e-3}
# A script run by `accelerate launch`: the token-level and regression runs in the same two processes.
DRIVER = """
import json, os, sys
from pathlib import Path
from bitfit.training.train import train

model, root = sys.argv[1], Path(sys.argv[2])
for name in ("tokens", "qa", "scores"):
    data = root / f"{name}.{'csv' if name == 'scores' else 'jsonl'}"
    r = train(model, data, root / f"ddp-{name}", dev=root / f"{name}-dev{data.suffix}", epochs=2, batch_size=7,
              lr=5e-3, progress=False, log=lambda s: None)
    rank = int(os.environ["RANK"])
    (root / f"report-{name}-{rank}.json").write_text(json.dumps({
        "rank": rank, "main": r.is_main_process, "path": None if r.pack_path is None else str(r.pack_path),
        "on_disk": (root / f"ddp-{name}" / "manifest.json").exists()}))
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny BERT without dropout, and train (36 rows) / dev (10 rows) files for four task kinds."""
    root = tmp_path_factory.mktemp("ddp")
    model = make_tiny("bert", root / "model")
    config = json.loads((model / "config.json").read_text())
    config["hidden_dropout_prob"] = config["attention_probs_dropout_prob"] = 0.0
    (model / "config.json").write_text(json.dumps(config))
    for name, write in (("sentiment", write_sentiment), ("tokens", write_token_data), ("qa", write_qa_data)):
        write(root / f"{name}.jsonl", n=36, seed=0)
        write(root / f"{name}-dev.jsonl", n=10, seed=1)
    write_scores(root / "scores.csv", n=36, seed=0)
    write_scores(root / "scores-dev.csv", n=10, seed=1)
    return model, root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp: Path, *argv: str) -> subprocess.CompletedProcess:
    """`accelerate launch` with 2 CPU processes. --multi_gpu picks accelerate's torchrun launcher, the one
    that starts several processes (--cpu starts one unless given an mpirun hostfile); with no GPU visible,
    train() joins them over gloo."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HOME": str(tmp / "hf"),  # no user accelerate config
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), *argv]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def assert_same_pack(one, two, model: Path, noise: frozenset[str] = frozenset()) -> None:
    """`noise`: tensors whose true gradient is 0, so that AdamW steps them on float noise, other in each run."""
    assert one.tensors.keys() == two.tensors.keys()
    for k in one.tensors.keys() - noise:
        np.testing.assert_allclose(two.tensors[k], one.tensors[k], rtol=0, atol=TOL, err_msg=k)
    h1, h2 = one.manifest.metrics["history"], two.manifest.metrics["history"]
    assert [e["train_loss"] for e in h2] == pytest.approx([e["train_loss"] for e in h1], rel=TOL)
    assert one.manifest.metrics["best_epoch"] == two.manifest.metrics["best_epoch"]
    assert one.manifest.metrics["dev"] == pytest.approx(two.manifest.metrics["dev"], rel=1e-4, abs=1e-4)  # percent
    # agreement within TOL means something only if training moved the biases by far more
    base = {s.name: s.parameter.detach().numpy() for s in find_biases(load_encoder(model), "all")}
    moved = max(float(np.abs(one.tensors[b.name] - base[b.name]).max()) for b in one.manifest.biases)
    assert moved > 100 * TOL


def test_two_processes_train_the_one_process_pack(setup, tmp_path):
    model, root = setup
    out = tmp_path / "runs"
    out.mkdir()
    done = launch(tmp_path, "-m", "bitfit.cli", "train", "--model", str(model), "--data", str(root / "sentiment.jsonl"),
                  "--dev", str(root / "sentiment-dev.jsonl"), "--out", str(out / "pack"), "--epochs", "2",
                  "--batch-size", "7", "--lr", "5e-3", "--quiet")
    assert sorted(p.name for p in out.iterdir()) == ["pack"]  # one pack, written once
    assert done.stdout.count("-> ") == 1 and done.stdout.count("saved task pack") == 1, done.stdout
    one = train(model, root / "sentiment.jsonl", None, dev=root / "sentiment-dev.jsonl", **HYPER, **QUIET).pack
    assert_same_pack(one, load_pack(out / "pack"), model)


def test_token_level_and_regression_losses_scale_across_processes(setup, tmp_path):
    model, root = setup
    work = tmp_path / "work"
    work.mkdir()
    for f in root.iterdir():
        if f.is_file():
            (work / f.name).write_bytes(f.read_bytes())
    (tmp_path / "driver.py").write_text(DRIVER)
    launch(tmp_path, str(tmp_path / "driver.py"), str(model), str(work))
    reports = [json.loads(f.read_text()) for f in sorted(work.glob("report-*.json"))]
    assert len(reports) == 6
    for r in reports:  # the other process writes nothing and returns only once the pack is on disk
        assert r["main"] == (r["rank"] == 0) and (r["path"] is None) == (r["rank"] != 0) and r["on_disk"], r
    for name in ("tokens", "qa", "scores"):
        data = work / f"{name}.{'csv' if name == 'scores' else 'jsonl'}"
        one = train(model, data, None, dev=work / f"{name}-dev{data.suffix}", **HYPER, **QUIET).pack
        # QA's softmax over positions ignores a shift shared by all positions: the head bias and the last
        # layer's bLN2 (which the head maps to such a shift) have gradient 0 up to rounding
        noise = frozenset({"head.bias", "layer.1.bLN2"} if name == "qa" else ())
        assert_same_pack(one, load_pack(work / f"ddp-{name}"), model, noise)


@pytest.mark.parametrize("rows, world", [(7, 2), (1, 2), (5, 3), (8, 4)])
def test_shard_weights_make_the_average_over_processes_the_batch_mean(rows, world):
    """DDP averages the processes' gradients; with the shard weights that average is the global batch's mean
    loss, for row losses and for losses over labelled tokens alike."""
    gen = torch.Generator().manual_seed(rows * 10 + world)
    loss = torch.rand(rows, 6, generator=gen)  # a loss value per token (column 0: per row)
    tags = torch.randint(0, 3, (rows, 6), generator=gen)
    tags[torch.rand(rows, 6, generator=gen) < 0.5] = IGNORE
    tags[0, 0] = 1
    inputs = {"input_ids": torch.arange(rows).unsqueeze(1)}  # row ids: which rows a shard took
    for kind, target, per_term in (("classification", tags[:, 0].clamp(min=0), loss[:, 0]),
                                   ("token-classification", tags, loss)):
        labelled = target != IGNORE
        assert loss_terms(kind, target) == (rows if kind == "classification" else int(labelled.sum()))
        got, owned = 0.0, []
        for rank in range(world):
            local_inputs, local_target, weight = shard(inputs, target, kind, rank, world)
            ids = local_inputs["input_ids"][:, 0]
            assert torch.equal(local_target, target[ids])
            if weight == 0:  # a stand-in row: it must add nothing
                assert len(ids) == 1
                continue
            owned += ids.tolist()
            got += float(per_term[ids][labelled[ids]].mean()) * weight
        assert got / world == pytest.approx(float(per_term[labelled].mean()), rel=1e-6)
        with_terms = [r for r in range(rows) if labelled[r].any()]
        assert sorted(r for r in owned if labelled[r].any()) == with_terms  # each counted once
    # a batch without labelled tokens stops the run, as the NaN mean does in one process
    assert np.isnan(shard(inputs, torch.full((rows, 6), IGNORE), "token-classification", 0, world)[2])
    assert shard(inputs, tags, "token-classification", 0, 1) == (inputs, tags, 1.0)
