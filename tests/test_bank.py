"""Bias banks: one aligned binary of every task's biases, readable with numpy alone and from C."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from bitfit.exporters.bank import write_bank
from bitfit.runtime import (
    BitFitError,
    IncompatibleError,
    PackError,
    TaskPack,
    TaskSession,
    load_pack,
)
from bitfit.runtime.bank import BLOCK_ALIGN, TENSOR_ALIGN, read_bank, register_bank
from bitfit.runtime.compiled import BASE_BIASES_FILE, MODEL_FILE, OUTPUT_NAME, TASK_IDS
from bitfit.runtime.heads import HEAD_POOLER_BIAS, HEAD_POOLER_WEIGHT
from bitfit.runtime.pack import PackManifest, TensorSpec

QUIET = {"log": lambda s: None}


@pytest.fixture(scope="module")
def packs(pack_all, pack_min, pack_scores):
    """Tasks in sorted-name order (so bank ids match TaskSession's mixed-table rows): regression, all biases,
    bq+bm2 only (the block's other biases must be the base's), and a BERT-pooler head."""
    a, b, s = load_pack(pack_all), load_pack(pack_min), load_pack(pack_scores)
    rng = np.random.default_rng(5)
    h = a.manifest.hidden_size
    pooled = a.manifest.to_json()
    pooled.update(task="z-pooler", pooling="pooler",
                  head=[*pooled["head"], TensorSpec(HEAD_POOLER_WEIGHT, (h, h)).to_json(),
                        TensorSpec(HEAD_POOLER_BIAS, (h,)).to_json()])
    tensors = {**a.tensors, HEAD_POOLER_WEIGHT: rng.normal(0, 0.3, (h, h)).astype(np.float32),
               HEAD_POOLER_BIAS: rng.normal(0, 0.3, h).astype(np.float32)}
    p = TaskPack(PackManifest.from_json(pooled), tensors)
    out = sorted([a, b, s, p], key=lambda x: x.name)
    assert [x.name for x in out][-1] == "z-pooler" and out[0].manifest.task_kind == "regression"
    return out


@pytest.fixture(scope="module")
def bank_dir(bert_compiled, packs, tmp_path_factory):
    return write_bank(bert_compiled, packs, tmp_path_factory.mktemp("bank") / "bank")


def numpy_head(hidden, mask, pooling, heads):
    """The head contract, by hand from bank.json's tensors (no bitfit code)."""
    if pooling == "pooler":
        pooled = np.tanh(hidden[:, 0] @ heads["head.pooler.weight"].T + heads["head.pooler.bias"])
    elif pooling == "cls":
        pooled = hidden[:, 0]
    else:
        m = mask[..., None].astype(hidden.dtype)
        pooled = (hidden * m).sum(1) / np.maximum(m.sum(1), 1.0)
    return pooled @ heads["head.weight"].T + heads["head.bias"]


def read_by_hand(bank_dir: Path):
    """bank.json + np.fromfile: each task's biases by name and its head tensors."""
    layout = json.loads((bank_dir / "bank.json").read_text())
    raw = np.fromfile(bank_dir / "bank.bin", dtype="<f4")

    def take(offset, length, shape):
        assert offset % 4 == 0
        return raw[offset // 4 : offset // 4 + length].reshape(shape)

    tasks = {}
    for t in layout["tasks"]:
        biases = {b["name"]: take(t["offset"] + b["offset"], b["length"], b["shape"]) for b in layout["biases"]}
        heads = {h["name"]: take(h["offset"], h["length"], h["shape"]) for h in t["heads"]}
        tasks[t["name"]] = (t, biases, heads)
    return layout, tasks


def test_numpy_alone_reproduces_every_task(bank_dir, bert_compiled, packs, token_inputs):
    layout, tasks = read_by_hand(bank_dir)
    session = TaskSession(bert_compiled)
    for p in packs:
        session.register(p)
    inputs = token_inputs(session, 3, 17)
    ort_session = ort.InferenceSession(str(bert_compiled / MODEL_FILE), providers=["CPUExecutionProvider"])
    graph_biases = [s.name for s in session.manifest.bias_inputs]
    assert [b["name"] for b in layout["biases"]] == graph_biases  # every bias input, in graph order
    assert len(tasks) == len(packs)
    for p in packs:
        t, biases, heads = tasks[p.name]
        assert t["task_kind"] == p.manifest.task_kind and t["labels"] == p.manifest.labels
        assert t["base_fingerprint"] == session.manifest.base_fingerprint
        hidden = ort_session.run([OUTPUT_NAME], {**inputs, **biases})[0]
        got = numpy_head(hidden, inputs["attention_mask"], t["pooling"], heads)
        want = session.logits(p.name, inputs)
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-6


def test_blocks_hold_trained_biases_and_base_values_elsewhere(bank_dir, bert_compiled, packs):
    from safetensors.numpy import load_file

    base = load_file(str(bert_compiled / BASE_BIASES_FILE))
    layout, tasks = read_by_hand(bank_dir)
    assert layout["block_bytes"] % BLOCK_ALIGN == 0 and layout["heads_offset"] == layout["block_bytes"] * len(packs)
    for p in packs:
        t, biases, heads = tasks[p.name]
        assert t["offset"] == t["id"] * layout["block_bytes"]
        for name, value in biases.items():
            want = p.tensors[name] if name in p.tensors else base[name]
            assert np.array_equal(value, want), name
        for name, value in heads.items():
            assert np.array_equal(value, p.tensors[name])
    minimal = next(p for p in packs if p.manifest.bias_subset == ["bq", "bm2"])
    assert any(name not in minimal.tensors for name in tasks[minimal.name][1])  # the base fill was exercised
    assert all(b["offset"] % TENSOR_ALIGN == 0 for b in layout["biases"])


def test_reader_round_trips_packs_and_serves_from_the_bank(bank_dir, bert_compiled, packs, token_inputs):
    bank = read_bank(bank_dir)
    for p in packs:
        back = bank.pack(p.name)
        assert back.tensors.keys() == p.tensors.keys()
        assert all(np.array_equal(back.tensors[k], p.tensors[k]) for k in p.tensors)
        assert back.manifest.labels == p.manifest.labels and back.manifest.pooling == p.manifest.pooling
    from_packs, from_bank = TaskSession(bert_compiled), TaskSession(bert_compiled)
    for p in packs:
        from_packs.register(p)
    assert register_bank(from_bank, bank_dir) == [p.name for p in packs]
    inputs = token_inputs(from_bank, 2, 11, seed=4)
    for p in packs:
        assert np.array_equal(from_bank.logits(p.name, inputs), from_packs.logits(p.name, inputs))


def test_bank_rows_are_mixed_table_rows(bank_dir, bert_model, bert_compiled, packs, token_inputs, tmp_path_factory):
    from bitfit.compiler.compile import compile as compile_model

    mixed = tmp_path_factory.mktemp("bank-mixed") / "graph"
    compile_model(bert_model, mixed, mixed=True, **QUIET)
    bank = read_bank(bank_dir)
    session = TaskSession(mixed)
    register_bank(session, bank)
    tables = bank.tables()
    for name, table in tables.items():
        assert np.shares_memory(table, bank.block(0))  # a view of bank.bin, not a copy
        rows = [session._state.tasks[bank.task(i).name].row for i in range(len(table))]
        assert rows == list(range(len(table)))  # registered in bank order: task i is row i of the tables
        assert np.array_equal(table, session._state.arrays[name][rows])  # row i of the session's table = bank block i
    # and the graph runs on the bank rows as they are, task ids = bank ids
    plain = TaskSession(bert_compiled)
    for p in packs:
        plain.register(p)
    inputs = token_inputs(session, 4, 13, seed=2)
    ids = np.array([0, 3, 1, 2], np.int64)
    ort_session = ort.InferenceSession(str(mixed / MODEL_FILE), providers=["CPUExecutionProvider"])
    feeds = {**inputs, TASK_IDS: ids, **{k: np.ascontiguousarray(v) for k, v in tables.items()}}
    hidden = ort_session.run([OUTPUT_NAME], feeds)[0]
    for row, task_id in enumerate(ids):
        t = bank.task(int(task_id))
        got = numpy_head(hidden[row : row + 1], inputs["attention_mask"][row : row + 1], t.pooling, bank.heads(t.id))
        want = plain.logits(t.name, {k: v[row : row + 1] for k, v in inputs.items()})
        assert np.abs(got - want).max() <= 1e-5


def test_corrupt_or_truncated_bank_is_refused(bank_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(bank_dir, bad)
    data = bytearray((bad / "bank.bin").read_bytes())
    data[100] ^= 0x01
    (bad / "bank.bin").write_bytes(bytes(data))
    with pytest.raises(PackError, match="sha256"):
        read_bank(bad)
    (bad / "bank.bin").write_bytes(bytes(data[:-64]))
    with pytest.raises(PackError, match="truncated"):
        read_bank(bad)


def test_c_header_compiles_and_matches_bank_json(bank_dir, tmp_path):
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (cc) here")
    layout = json.loads((bank_dir / "bank.json").read_text())
    last = layout["tasks"][-1]
    (tmp_path / "main.c").write_text(
        '#include <stdio.h>\n#include "bank.h"\n'
        "int main(void) {\n"
        '  printf("%u %d %d %llu %u %u %lld %s\\n", BITFIT_BANK_BLOCK_BYTES, BITFIT_BANK_NUM_TASKS,\n'
        "         BITFIT_TASK_Z_POOLER, (unsigned long long)bitfit_task_offsets[BITFIT_TASK_Z_POOLER],\n"
        "         bitfit_bias_offsets[BITFIT_BANK_NUM_BIASES - 1], BITFIT_BIAS_LAYER_1_BM2_LENGTH,\n"
        "         (long long)bitfit_task_pooler_weight_offsets[BITFIT_TASK_Z_POOLER], bitfit_task_names[0]);\n"
        "  return 0;\n}\n"
    )
    exe = tmp_path / "main"
    subprocess.run([cc, "-std=c99", "-Wall", "-Werror", "-Wno-unused-variable", f"-I{bank_dir}",
                    str(tmp_path / "main.c"), "-o", str(exe)], check=True, capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split()
    bm2 = next(b for b in layout["biases"] if b["name"] == "layer.1.bm2")
    pooler = next(h for h in last["heads"] if h["name"] == HEAD_POOLER_WEIGHT)
    assert out == [str(layout["block_bytes"]), str(layout["num_tasks"]), str(last["id"]), str(last["offset"]),
                   str(layout["biases"][-1]["offset"]), str(bm2["length"]), str(pooler["offset"]),
                   layout["tasks"][0]["name"]]


def test_refuses_other_base_missing_inputs_duplicates_and_overwrite(
    bert_compiled, bert_compiled_min, pack_all, pack_other_base, bank_dir, tmp_path
):
    with pytest.raises(IncompatibleError, match="fingerprint"):
        write_bank(bert_compiled, [pack_all, pack_other_base], tmp_path / "a")
    with pytest.raises(IncompatibleError, match="no input for biases"):
        write_bank(bert_compiled_min, [pack_all], tmp_path / "b")
    with pytest.raises(BitFitError, match="both named"):
        write_bank(bert_compiled, [pack_all, pack_all], tmp_path / "c")
    with pytest.raises(BitFitError, match="already exists"):
        write_bank(bert_compiled, [pack_all], bank_dir)
    assert not any(tmp_path.iterdir())  # nothing half-written
    other = TaskSession(bert_compiled)
    other.manifest.base_fingerprint = "0" * 64  # a session of another base
    with pytest.raises(IncompatibleError, match="fingerprint"):
        register_bank(other, bank_dir)


def test_cli_export_bank(bert_compiled, pack_all, pack_min, tmp_path, capsys):
    from bitfit.cli import main

    out = tmp_path / "bank"
    assert main(["export-bank", "--compiled", str(bert_compiled), str(pack_all), str(pack_min), "--out", str(out),
                 "--block-align", "64"]) == 0
    assert "2 tasks" in capsys.readouterr().out
    bank = read_bank(out)
    assert bank.block_bytes % 64 == 0 and bank.block_bytes < BLOCK_ALIGN  # the tiny model's block, 64-aligned
    assert [t.name for t in bank.tasks] == [load_pack(pack_all).name, load_pack(pack_min).name]
    assert main(["export-bank", "--compiled", str(bert_compiled), str(pack_all), "--out", str(out)]) == 2


def test_export_and_serve_a_bank_without_torch(bert_compiled, pack_all, pack_min, tmp_path):
    import test_no_torch

    out = tmp_path / "bank"
    proc = test_no_torch.run_blocked("""
        import json, sys
        import numpy as np
        from bitfit.cli import main
        from bitfit.runtime import TaskSession
        from bitfit.runtime.bank import register_bank

        compiled, out, *packs = sys.argv[1:]
        assert main(["export-bank", "--compiled", compiled, *packs, "--out", out]) == 0
        session = TaskSession(compiled)
        names = register_bank(session, out)
        print(json.dumps({n: session.run(n, ["a good fun movie", "awful"]).logits.tolist() for n in names}))
    """, str(bert_compiled), str(out), str(pack_all), str(pack_min))
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    session = TaskSession(bert_compiled)
    for p in (pack_all, pack_min):
        name = session.register(p)
        assert np.abs(np.array(got[name]) - session.run(name, ["a good fun movie", "awful"]).logits).max() <= 1e-6


@pytest.mark.parametrize("version, message", [
    (1, r"is bank format 1, older than this bitfit reads \(2\): export the bank again"),
    (3, r"is bank format 3, newer than this bitfit reads: upgrade"),
    ("2", r"has format_version '2', not a whole number"),
])
def test_a_bank_map_of_another_version_is_refused_by_the_one_manifest_reader(bank_dir, tmp_path, version, message):
    """bank.json goes through runtime.manifest.read_versioned, as pack and compiled manifests do: an older
    version is named as older (it was a schema complaint about format_version before), a non-number as such."""
    from conftest import write_sealed

    bad = tmp_path / "bad"
    shutil.copytree(bank_dir, bad)
    layout = json.loads((bad / "bank.json").read_text())
    write_sealed(bad / "bank.json", {**layout, "format_version": version})
    with pytest.raises(PackError, match=message):
        read_bank(bad)
