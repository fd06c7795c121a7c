"""benchmarks/lora_serving.py times LoRA graphs only after checking they compute LoRA: the graph with A and B as
inputs equals torch with the adapter merged, and a mixed batch gives each row its own task's answer (LoRA and
BitFit). These tests run its parity on a tiny model, and break it to see the check refuse."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
lora_serving = pytest.importorskip("lora_serving")


@pytest.fixture(scope="module")
def built(bert_model, tmp_path_factory):
    return lora_serving.build("tiny", bert_model, tmp_path_factory.mktemp("lora"), 1, np.random.default_rng(0))


def test_the_lora_graphs_compute_lora(built):
    found = lora_serving.parity(built, np.random.default_rng(1))
    assert set(found) == {"lora inputs vs torch merged", "lora merged graph vs torch merged",
                          "lora mixed rows vs each task alone", "bitfit mixed rows vs each task alone"}
    assert lora_serving.check_parity(found, "tiny") == found
    assert len(built["lora_names"]) == 2 * len(lora_serving.lora_modules(built["eager"])) > 0
    sizes = lora_serving.task_bytes(built)
    assert sizes["bitfit"] == sum(v.nbytes for v in built["biases"].values())
    assert sizes["lora merged"] > sizes["lora inputs"]


def test_parity_refuses_a_graph_fed_another_tasks_adapter(built):
    wrong = dict(built, per_task={**built["per_task"], "lora inputs": built["other_task"]["lora inputs"]})
    found = lora_serving.parity(wrong, np.random.default_rng(1))
    assert found["lora inputs vs torch merged"] > 1e-3
    with pytest.raises(SystemExit, match="lora inputs vs torch merged"):
        lora_serving.check_parity(found, "tiny")


def test_parity_refuses_mixed_rows_given_another_rows_adapter(built):
    run = built["runners"]["lora mixed"]
    swapped = lambda feed, arrays: run({**feed, "task_ids": feed["task_ids"][::-1].copy()}, arrays)  # noqa: E731
    wrong = dict(built, runners={**built["runners"], "lora mixed": swapped})
    found = lora_serving.parity(wrong, np.random.default_rng(1))
    assert found["lora mixed rows vs each task alone"] > 1e-4
    with pytest.raises(SystemExit, match="lora mixed rows"):
        lora_serving.check_parity(found, "tiny")


def test_a_merged_task_costs_a_session_and_its_weights(built):
    cost = lora_serving.merged_session_cost(built["paths"]["lora merged"], 1)
    assert cost["new session s"] > 0
    # the second session of the same file holds its own copy of the weights (tiny model: ~1 MB of them)
    assert cost["rss per task MB"] > 0.5 * built["paths"]["lora merged"].stat().st_size / 2**20


def test_a_new_task_session_is_measured_in_a_fresh_process(compiled_dir):
    latency = pytest.importorskip("latency")
    cost = latency.new_session_cost(compiled_dir())
    assert cost["seconds"] > 0 and cost["first_seconds"] > 0
    assert cost["rss_per_session"] > 0  # the second session holds its own copy of the (tiny) graph
    common = pytest.importorskip("common")
    with pytest.raises(RuntimeError, match="(?s)measuring a new session failed.*NameError"):
        common.session_cost("x = 1")  # no open_one(): the child's failure is reported, not a JSON error
