"""bitfit.verify (compiler/verify.py): parity of a compiled graph and its packs against PyTorch: fatal by default
(ParityError listing every failed check), a report with strict=False; and `compile --verify`."""
from __future__ import annotations

import json
import math

import numpy as np
import onnx_ir as ir
import pytest
from bitfit.compiler.verify import verify, write_report
from bitfit.runtime import IncompatibleError, ParityError, TaskSession
from bitfit.runtime.compiled import MODEL_FILE
from conftest import reseal_compiled

QUIET = {"log": lambda s: None}
TOKENIZER_ROW = "tokenizer ids vs transformers"
LIVENESS_ROW = "bias inputs is live"


@pytest.fixture(scope="module")
def good_report(bert_compiled, pack_all, pack_min, pack_pairs, pack_scores):
    return verify(bert_compiled, [pack_all, pack_min, pack_pairs, pack_scores], **QUIET)


def test_good_packs_pass(good_report):
    assert good_report.ok, good_report.table()
    assert good_report.failures == []
    for c in good_report.checks:
        if not math.isnan(c.tolerance):
            assert c.max_abs <= c.tolerance == 1e-4


def test_table_has_graph_rows_and_a_verdict(good_report):
    table = good_report.table()
    cases = [c.case for c in good_report.checks if c.subject == "graph"]
    assert TOKENIZER_ROW in cases
    assert any(LIVENESS_ROW in c for c in cases)
    assert any(c.startswith("base model, no bias fed") for c in cases)
    assert TOKENIZER_ROW in table and LIVENESS_ROW in table
    assert table.strip().splitlines()[-1].startswith("PASS")
    liveness = next(c for c in good_report.checks if LIVENESS_ROW in c.case)
    assert "each of 15 non-bk" in liveness.case  # 17 bias inputs less the two bk


def test_every_pack_is_checked_on_sentences_grid_and_perturbed_biases(good_report, bert_compiled):
    subjects = [c.subject for c in good_report.checks if c.subject != "graph"]
    assert len(set(subjects)) == 4
    max_positions = TaskSession(bert_compiled).manifest.max_positions
    for subject in set(subjects):
        cases = [c.case for c in good_report.checks if c.subject == subject]
        assert "real sentences" in cases
        assert "perturbed biases vs PyTorch" in cases
        grid = [c for c in cases if c.startswith("grid")]
        assert grid == [f"grid b={b} s={s}" for b, s in ((1, 8), (3, 17), (8, 64), (2, 128)) if s <= max_positions]
    perturbed = [c for c in good_report.checks if c.case == "perturbed biases vs PyTorch"]
    assert all(c.note.startswith("output moved") for c in perturbed)


def test_classification_rows_report_probabilities_and_agreement(good_report, pack_scores):
    from bitfit.runtime import read_pack_manifest

    regression = read_pack_manifest(pack_scores).task
    for c in good_report.checks:
        if c.subject in ("graph",):
            continue
        if c.subject == regression:
            assert math.isnan(c.prob_abs) and math.isnan(c.agreement)
        else:
            assert c.prob_abs <= 1e-4 and c.agreement == 100.0


def test_report_json(good_report, tmp_path):
    path = write_report(good_report, tmp_path / "r.json")
    data = json.loads(path.read_text())  # strict JSON: NaN became null
    assert data["ok"] is True and data["atol"] == 1e-4
    assert len(data["checks"]) == len(good_report.checks)
    assert "NaN" not in path.read_text()


def test_impossible_tolerance_fails(bert_compiled, pack_all):
    report = verify(bert_compiled, [pack_all], atol=1e-12, strict=False, **QUIET)
    assert not report.ok
    failed = {c.case for c in report.failures}
    assert "real sentences" in failed or any(c.startswith("grid") for c in failed)
    assert all(c.max_abs > 1e-12 for c in report.failures if not math.isnan(c.max_abs))
    assert report.table().strip().splitlines()[-1].startswith(f"FAIL: {len(report.failures)} of {len(report.checks)}")


def test_dead_bias_input_is_caught_at_verify_time(bert_compiled, copy_dir):
    """A graph whose layer.1.bm2 input was baked in (manifest checksum updated so it loads): the parity rows
    still pass, since the baked value is the base's, but the liveness row fails and names the input."""
    broken = copy_dir(bert_compiled)
    model = ir.load(broken / MODEL_FILE)
    v = {x.name: x for x in model.graph.inputs}["layer.1.bm2"]
    baked = ir.Value(name="baked", shape=ir.Shape(v.shape), type=v.type,
                     const_value=ir.tensor(v.const_value.numpy().copy(), name="baked"))
    model.graph.register_initializer(baked)
    ir.convenience.replace_all_uses_with(v, baked)
    ir.save(model, broken / MODEL_FILE)
    reseal_compiled(broken)

    report = verify(broken, strict=False, **QUIET)
    assert not report.ok
    assert len(report.failures) == 1
    failure = report.failures[0]
    assert LIVENESS_ROW in failure.case and failure.note == "dead: layer.1.bm2"
    assert "dead: layer.1.bm2" in report.table()


def test_pack_of_another_base_is_refused(bert_compiled, pack_other_base):
    with pytest.raises(IncompatibleError, match=r"fingerprint"):
        verify(bert_compiled, [pack_other_base], **QUIET)


def test_reference_model_of_another_base_is_refused(bert_compiled, tiny_model):
    with pytest.raises(IncompatibleError, match=r"is not the model the graph was compiled from .*pass --model"):
        verify(bert_compiled, model=tiny_model("bert", 1), **QUIET)


@pytest.mark.parametrize("kind", ["roberta", "distilbert"])
def test_other_architectures_verify(kind, compiled_dir, trained_pack):
    report = verify(compiled_dir(kind), [trained_pack(kind, "all", epochs=1)], **QUIET)
    assert report.ok, report.table()


def _corrupt_a_weight(compiled, copy_dir):
    """A copy of the graph with 0.5 added to one frozen weight matrix (checksum updated, so it loads)."""
    broken = copy_dir(compiled)
    model = ir.load(broken / MODEL_FILE)
    # the first MLP matrix (hidden x intermediate, not square): every token's output goes through it
    weight = next(v for v in model.graph.initializers.values() if v.const_value is not None
                  and len(v.const_value.shape) == 2 and "embeddings" not in v.name
                  and v.const_value.shape[0] != v.const_value.shape[1])
    weight.const_value = ir.tensor(weight.const_value.numpy() + 0.5, name=weight.name)
    ir.save(model, broken / MODEL_FILE)
    reseal_compiled(broken)
    return broken, weight.name


def test_a_corrupted_weight_raises_unless_a_report_is_asked_for(bert_compiled, pack_all, copy_dir):
    broken, name = _corrupt_a_weight(bert_compiled, copy_dir)
    with pytest.raises(ParityError, match=r"parity failed on .*: \d+ of \d+ checks \(graph / base model") as caught:
        verify(broken, [pack_all], **QUIET)
    report = caught.value.report
    assert not report.ok and len(report.failures) >= 2  # the base-model row and the pack's rows
    for c in report.failures:  # every failed check is named in the one error
        assert f"{c.subject} / {c.case}" in str(caught.value)
    again = verify(broken, [pack_all], strict=False, **QUIET)  # the same checks, returned instead
    assert [(c.subject, c.case, c.passed) for c in again.checks] == [(c.subject, c.case, c.passed) for c in report.checks]


def test_cli_verify_exits_1_on_a_mismatch(bert_compiled, pack_all, copy_dir, capsys):
    from bitfit.cli import main

    broken, _ = _corrupt_a_weight(bert_compiled, copy_dir)
    assert main(["verify", "--compiled", str(broken), "--pack", str(pack_all)]) == 1
    assert "FAIL:" in capsys.readouterr().out


def test_compile_verify_never_puts_a_failing_graph_in_place(bert_model, bert_compiled, pack_all, copy_dir,
                                                            monkeypatch, capsys):
    """`compile --verify` checks the new directory before the swap: on a mismatch the old graph stays, byte
    for byte, nothing is left beside it, and the command exits 1; on a match the new graph goes in."""
    from bitfit.compiler import verify as verify_module

    from bitfit.cli import main

    target = copy_dir(bert_compiled, "graph")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    monkeypatch.setitem(verify_module.TOLERANCES, "fp32", 1e-15)  # no real graph meets it
    argv = ["compile", "--model", str(bert_model), "--out", str(target), "--overwrite", "--verify", str(pack_all)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "parity check failed" in err and f"{target} left as it was" in err and "real sentences" in err
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["graph"]
    with pytest.raises(ParityError):
        from bitfit.compiler.compile import compile as compile_model

        compile_model(bert_model, target, overwrite=True, verify=[], log=lambda s: None)
    monkeypatch.undo()
    assert main(argv) == 0
    assert "PASS." in capsys.readouterr().out
    session = TaskSession(target)
    assert np.array_equal(session.base_biases["layer.0.bq"], TaskSession(bert_compiled).base_biases["layer.0.bq"])


def test_a_pack_whose_biases_never_reach_the_graph_fails_verify(bert_compiled, pack_all, monkeypatch):
    """int8 mode's tolerance (1.5) hides a dead bias from the parity rows: a pack equal to the base model (as an
    untrained one is) matches PyTorch whether or not its biases are fed, and its perturbed copy, within 1.5, too.
    Only "perturbed biases vs PyTorch" can see it: the same output with other biases. Here the session feeds no
    registered task's biases (the graph alone is fine: its liveness row, which feeds biases directly, passes)."""
    from bitfit.runtime import TaskPack, load_pack
    from bitfit.runtime.session import TaskSession as Session

    pack = load_pack(pack_all)
    base = Session(bert_compiled).base_biases
    untrained = TaskPack(pack.manifest, {**pack.tensors, **{k: base[k].copy() for k in pack.biases}})
    real = Session._hidden
    monkeypatch.setattr(Session, "_hidden", lambda self, feeds, task, state, biases=None:
                        real(self, feeds, None, state, biases))  # every task runs the base model's biases

    report = verify(bert_compiled, [untrained], mode="int8", strict=False, **QUIET)
    failed = [(c.subject, c.case) for c in report.failures]
    assert failed == [(pack.name, "perturbed biases vs PyTorch")], report.table()
    failure = report.failures[0]
    assert failure.max_abs <= failure.tolerance  # within tolerance: only the move check refuses it
    assert failure.note == "output moved 0.00e+00"
    # the same pack on an honest session moves, and passes
    monkeypatch.setattr(Session, "_hidden", real)
    assert verify(bert_compiled, [untrained], mode="int8", strict=False, **QUIET).ok
