"""compile --mixed: rows of different tasks in one forward pass (bias tables [tasks, dim] + task_ids)."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from bitfit.compiler.verify import verify
from bitfit.runtime import BitFitError, TaskPack, TaskSession, load_pack
from bitfit.runtime.compiled import MODEL_FILE, TASK_IDS, read_manifest

QUIET = {"log": lambda s: None}
TEXTS = ["the movie was good", "what an awful boring plot", "who won the prize", "free cash now, reply yes",
         "i love this film", "not fun at all", "where is the city", "ok"]


@pytest.fixture(scope="module")
def mixed(bert_model, tmp_path_factory):
    from bitfit.compiler.compile import compile as compile_model

    out = tmp_path_factory.mktemp("mixed") / "graph"
    compile_model(bert_model, out, mixed=True, **QUIET)
    return out


@pytest.fixture(scope="module")
def packs(pack_all, pack_min):
    """Three tasks: all biases, bq+bm2 only (the rest must come from the base), and a noisy copy."""
    a, b = load_pack(pack_all), load_pack(pack_min)
    rng = np.random.default_rng(3)
    c = TaskPack(a.manifest, {k: (v + rng.normal(0, 0.2, v.shape)).astype(np.float32) for k, v in a.tensors.items()})
    return {"a": a, "b": b, "c": c}


def sessions(mixed, plain, packs):
    m, p = TaskSession(mixed), TaskSession(plain)
    for name, pack in packs.items():
        m.register(pack, name=name)
        p.register(pack, name=name)
    return m, p


def test_graph_takes_tables_and_task_ids(mixed):
    m = read_manifest(mixed)
    assert m.mixed and "export(bias tables + task_ids)" in m.passes
    graph = ir.load(mixed / MODEL_FILE).graph
    inputs = {v.name: v for v in graph.inputs}
    assert inputs[TASK_IDS].dtype == ir.DataType.INT64 and len(inputs[TASK_IDS].shape) == 1
    for b in m.bias_inputs:
        v = inputs[b.name]
        assert len(v.shape) == 2 and not isinstance(v.shape[0], int) and v.shape[1] == b.shape[0]
        assert v.const_value is not None and v.const_value.shape == (1, b.shape[0])  # base row as default
        assert v.uses()


def test_every_row_equals_its_single_task_result(mixed, bert_compiled, packs):
    session, plain = sessions(mixed, bert_compiled, packs)
    tasks = ["a", "b", "c"]
    rows = [(tasks[i % 3], t) for i, t in enumerate(TEXTS * 2)]
    records = session.run_mixed(rows)
    assert [r["task"] for r in records] == [t for t, _ in rows]
    for task in tasks:
        index = [i for i, (t, _) in enumerate(rows) if t == task]
        single = plain.run(task, [rows[i][1] for i in index]).logits
        got = np.array([records[i]["logits"] for i in index])
        assert np.abs(got - single).max() <= 1e-5
        assert [records[i]["label"] for i in index] == plain.run(task, [rows[i][1] for i in index]).labels
    # and the three tasks really differ, so a misrouted row would show
    same_text = session.run_mixed([(t, TEXTS[0]) for t in tasks])
    assert len({tuple(np.round(r["logits"], 4)) for r in same_text}) == 3


def test_mixed_graph_matches_pytorch_and_plain_graph_per_task(mixed, bert_compiled, bert_model, packs, token_inputs,
                                                              torch_logits):
    session, plain = sessions(mixed, bert_compiled, packs)
    inputs = token_inputs(session, 4, 23)
    for name, pack in packs.items():
        got = session.logits(name, inputs)
        assert np.abs(got - torch_logits(pack, bert_model, inputs)).max() <= 1e-4
        assert np.abs(got - plain.logits(name, inputs)).max() <= 1e-5
    base = session.hidden_states(inputs)
    assert np.abs(base - plain.hidden_states(inputs)).max() <= 1e-5


def test_sentence_pairs_and_single_sentences_in_one_batch(mixed, bert_compiled, pack_all, pack_pairs):
    packs = {"single": load_pack(pack_all), "pairs": load_pack(pack_pairs)}
    session, plain = sessions(mixed, bert_compiled, packs)
    rows = [("single", "the movie was good"), ("pairs", "who won", "the city won the prize"),
            ("single", "boring plot"), ("pairs", "free cash", "reply stop now")]
    records = session.run_mixed(rows)
    single = plain.run("single", ["the movie was good", "boring plot"]).logits
    pairs = plain.run("pairs", ["who won", "free cash"], ["the city won the prize", "reply stop now"]).logits
    assert np.abs(np.array([records[0]["logits"], records[2]["logits"]]) - single).max() <= 1e-5
    assert np.abs(np.array([records[1]["logits"], records[3]["logits"]]) - pairs).max() <= 1e-5
    with pytest.raises(BitFitError, match="takes sentence pairs"):
        session.run_mixed([("pairs", "no pair given")])


def test_replacing_a_pack_rebuilds_the_tables(mixed, packs):
    session = TaskSession(mixed)
    for name, pack in packs.items():
        session.register(pack, name=name)
    before = session.run_mixed([("a", TEXTS[0]), ("b", TEXTS[0])])
    session.register(packs["c"], name="a", replace=True)
    after = session.run_mixed([("a", TEXTS[0]), ("b", TEXTS[0])])
    assert np.allclose(after[0]["logits"], session.run("c", [TEXTS[0]]).logits[0], atol=1e-6)
    assert not np.allclose(after[0]["logits"], before[0]["logits"], atol=1e-4)
    assert np.allclose(after[1]["logits"], before[1]["logits"], atol=1e-6)  # task b untouched
    session.remove("a")
    assert session.tasks == ["b", "c"]
    assert np.allclose(session.run_mixed([("b", TEXTS[0])])[0]["logits"], before[1]["logits"], atol=1e-6)


def test_plain_graph_runs_mixed_rows_one_pass_per_task(bert_compiled, packs):
    session = TaskSession(bert_compiled)
    for name, pack in packs.items():
        session.register(pack, name=name)
    rows = [("a", TEXTS[0]), ("c", TEXTS[1]), ("a", TEXTS[2])]
    records = session.run_mixed(rows)
    assert np.allclose([records[0]["logits"], records[2]["logits"]],
                       session.run("a", [TEXTS[0], TEXTS[2]]).logits, atol=1e-6)


@pytest.mark.parametrize("rows, match", [
    ([], "non-empty list"),
    ([("a",)], r"rows\[0\] must be"),
    ([("nope", "x")], "unknown task 'nope'"),
])
def test_bad_rows(mixed, packs, rows, match):
    session = TaskSession(mixed)
    session.register(packs["a"], name="a")
    with pytest.raises(BitFitError, match=match):
        session.run_mixed(rows)


def test_verify_and_int8_on_mixed_graphs(mixed, bert_model, pack_all, pack_min, tmp_path):
    from bitfit.compiler.compile import compile as compile_model

    assert verify(mixed, [pack_all, pack_min], **QUIET).ok
    int8 = compile_model(bert_model, tmp_path / "int8", mixed=True, quantize="int8", **QUIET)
    report = verify(int8, [pack_all], **QUIET)
    assert report.ok and report.mode == "int8", report.table()


def test_mixed_and_fuse_are_exclusive(bert_model, tmp_path):
    from bitfit.compiler.compile import compile as compile_model

    with pytest.raises(BitFitError, match="--mixed and --fuse do not combine"):
        compile_model(bert_model, tmp_path / "x", mixed=True, fuse=True, **QUIET)


# -- many tasks: registration stays O(1), a task's biases are held once, rows are re-used safely ---------------
def _copies(pack: TaskPack, n: int, seed: int = 0) -> list[TaskPack]:
    rng = np.random.default_rng(seed)
    return [TaskPack(pack.manifest, {k: (v + rng.normal(0, 0.1, v.shape)).astype(np.float32)
                                     for k, v in pack.tensors.items()}) for _ in range(n)]


@pytest.mark.parametrize("graph", ["mixed", "plain"])
def test_registering_stays_flat_as_tasks_grow(graph, mixed, bert_compiled, pack_all):
    """The last 500 of 2,000 registrations cost no more than twice the first 500 (CPU time of this process,
    so other work on the machine does not move it). Rebuilding every table from all tasks on each
    registration, as before, made the last 500 cost about 10x the first on this tiny model."""
    import time

    session = TaskSession(mixed if graph == "mixed" else bert_compiled, threads=1)
    packs = _copies(load_pack(pack_all), 2000)
    blocks = []
    for start in range(0, 2000, 500):
        began = time.process_time()
        for i in range(start, start + 500):
            session.register(packs[i], name=f"t{i}")
        blocks.append(time.process_time() - began)
    assert len(session.tasks) == 2000
    assert blocks[-1] <= 2 * blocks[0], f"registration grew with the task count: {blocks}"


def test_a_tasks_biases_are_one_row_of_the_table(mixed, pack_all):
    session = TaskSession(mixed, threads=1)
    names = session.register_many(_copies(load_pack(pack_all), 20), names=[f"t{i}" for i in range(20)])
    assert session.capacity >= 20
    state = session._state
    for name in names:
        task = state.tasks[name]
        for spec in task.pack.manifest.biases:
            bias = task.pack.tensors[spec.name]
            assert np.shares_memory(bias, state.arrays[spec.name]), f"{name}: {spec.name} is held twice"
            assert np.array_equal(bias, state.arrays[spec.name][task.row])
            assert not bias.flags.writeable
    # the caller's pack is not turned into views of the session's tables
    mine = load_pack(pack_all)
    session.register(mine, name="mine")
    assert not any(np.shares_memory(v, a) for v in mine.tensors.values() for a in session._state.arrays.values())


def test_a_removed_tasks_row_is_reused_only_when_nothing_reads_it(mixed, pack_all):
    import gc

    session = TaskSession(mixed, threads=1)
    a, b, c, d = _copies(load_pack(pack_all), 4, seed=5)
    session.register_many([a, b], names=["a", "b"])
    row_a = session._state.tasks["a"].row
    held = session._state  # a request in flight that started before the removal
    session.remove("a")
    gc.collect()
    session.register(c, name="c")
    assert session._state.tasks["c"].row != row_a  # the old state still indexes a's row: not reused
    inputs = session.encode(TEXTS[:2], max_length=16)
    before = session.forward("a", inputs, held)
    del held
    gc.collect()
    session.register(d, name="d")
    assert session._state.tasks["d"].row == row_a  # nothing reads it now: reused, no growth
    alone = TaskSession(mixed, threads=1)
    alone.register(a, name="a")
    assert np.allclose(before, alone.logits("a", inputs), atol=1e-6)


def test_tables_grow_and_old_requests_keep_their_memory(mixed, pack_all):
    session = TaskSession(mixed, threads=1)
    packs = _copies(load_pack(pack_all), 40, seed=7)
    session.register(packs[0], name="t0")
    first = session.capacity
    held = session._state
    inputs = session.encode(TEXTS[:3], max_length=16)
    expected = session.forward("t0", inputs, held)
    session.register_many(packs[1:], names=[f"t{i}" for i in range(1, 40)])
    assert session.capacity > first  # grew (doubling) ...
    assert np.array_equal(session.forward("t0", inputs, held), expected)  # ... and the old state still reads t0
    assert np.allclose(session.logits("t0", inputs), expected, atol=1e-6)
    assert np.shares_memory(session.pack("t0").biases[packs[0].manifest.biases[0].name],
                            session._state.arrays[packs[0].manifest.biases[0].name])  # views moved to the new tables


def test_register_many_is_all_or_nothing(mixed, pack_all, pack_other_base):
    session = TaskSession(mixed, threads=1)
    with pytest.raises(BitFitError, match="base model"):
        session.register_many([load_pack(pack_all), load_pack(pack_other_base)], names=["ok", "bad"])
    assert session.tasks == []
    with pytest.raises(BitFitError, match="more than once"):
        session.register_many([load_pack(pack_all)] * 2, names=["x", "x"])
    assert session.tasks == []


def test_registering_and_removing_while_mixed_batches_run(mixed, pack_all):
    """Writers register and remove tasks while readers run mixed batches; every answer equals its task
    alone (a row written or re-used under a running request would break that)."""
    import threading

    base = _copies(load_pack(pack_all), 6, seed=11)
    alone = TaskSession(mixed, threads=1)
    for i, p in enumerate(base):
        alone.register(p, name=f"k{i}")
    rows = [(f"k{i % 3}", t) for i, t in enumerate(TEXTS)]
    expected = [r["logits"] for r in alone.run_mixed(rows)]
    session = TaskSession(mixed, threads=1)
    session.register_many(base[:3], names=["k0", "k1", "k2"])
    churn = _copies(load_pack(pack_all), 60, seed=13)
    failures: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        for i, p in enumerate(churn):
            session.register(p, name=f"churn{i % 7}", replace=True)
            if i % 3 == 0:
                session.remove(f"churn{i % 7}")
        stop.set()

    def reader() -> None:
        while not stop.is_set():
            for r, want in zip(session.run_mixed(rows), expected):
                if not np.allclose(r["logits"], want, atol=1e-5):
                    failures.append(f"{r['task']}: {r['logits']}")

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures, failures[:3]


def test_plain_graphs_keep_bound_tensors_for_a_bounded_set_of_tasks(bert_compiled, pack_all, monkeypatch):
    """On a plain graph a task's bound tensors (~50 OrtValues, ~30 KB for MiniLM) are kept only for the tasks
    used last; an evicted task's answer is the same when it comes back."""
    from bitfit.runtime import session as session_module

    monkeypatch.setattr(session_module, "VALUE_CACHE", 2)
    packs = _copies(load_pack(pack_all), 4, seed=17)
    session = TaskSession(bert_compiled, threads=1)
    session.register_many(packs, names=["a", "b", "c", "d"])
    inputs = session.encode(TEXTS[:2], max_length=16)
    first = {t: session.logits(t, inputs) for t in "abcd"}
    assert len(session._cache) == 2
    for t in "dcba":
        assert np.array_equal(session.logits(t, inputs), first[t])
    assert not np.allclose(first["a"], first["b"])  # the tasks differ, so a stale cache entry would show


def test_a_registered_pack_is_one_buffer_and_the_graphs_specs(bert_compiled, pack_all):
    """Memory per task: the pack's tensors are views of one buffer (safetensors' own arrays cost ~1.3x their
    bytes), and its bias specs are the graph's objects (~50 per task otherwise)."""
    session = TaskSession(bert_compiled, threads=1)
    session.register(pack_all, name="a")
    pack = session.pack("a")
    arrays = list(pack.tensors.values())
    assert all(a.base is arrays[0].base for a in arrays[1:])  # views of one buffer ...
    assert sum(a.nbytes for a in arrays) == arrays[0].base.nbytes  # ... that holds exactly them
    graph = session.manifest.bias_specs
    assert all(spec is graph[spec.name] for spec in pack.manifest.biases)
    assert pack.digest() == load_pack(pack_all).digest()
