"""The OpenVINO backend (runtime/backends.py): the no-defaults graph with live biases, parity with onnxruntime,
verify (liveness included) on it, OpenVINO's int8 weights, and the graphs it must refuse."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("openvino")

from bitfit.compiler.verify import TOLERANCES, verify  # noqa: E402
from bitfit.runtime import TaskSession  # noqa: E402
from bitfit.runtime.errors import CompiledModelError  # noqa: E402

QUIET = {"log": lambda s: None}


@pytest.fixture(scope="module")
def graphs(bert_model, tmp_path_factory) -> dict:
    from bitfit.compiler.compile import compile as compile_model

    root = tmp_path_factory.mktemp("openvino")
    compile_model(bert_model, root / "plain", bias_defaults=False, log=lambda s: None)
    compile_model(bert_model, root / "mixed", bias_defaults=False, mixed=True, log=lambda s: None)
    compile_model(bert_model, root / "int8", bias_defaults=False, quantize="int8", log=lambda s: None)
    return {k: root / k for k in ("plain", "mixed", "int8")}


def test_openvino_serves_packs_as_onnxruntime_does(graphs, bert_compiled, pack_all, pack_min, token_inputs):
    ov, ref = TaskSession(graphs["plain"], backend="openvino"), TaskSession(bert_compiled)
    assert ov.backend == "openvino"
    for s in (ov, ref):
        s.register(pack_all, name="all")
        s.register(pack_min, name="min")  # bq,bm2: the others are the base values the runtime feeds
    inputs = token_inputs(ov, 3, 13)
    for task in ("all", "min"):
        assert np.abs(ov.logits(task, inputs) - ref.logits(task, inputs)).max() <= 1e-5
    assert np.abs(ov.hidden_states(inputs) - ref.hidden_states(inputs)).max() <= 1e-5  # no task: the base model
    assert np.abs(ov.logits("all", inputs) - ov.logits("min", inputs)).max() > 1e-4  # and switching works


def test_verify_on_openvino_passes_with_every_bias_live(graphs, pack_all):
    report = verify(graphs["plain"], [pack_all], backend="openvino", **QUIET)
    assert report.ok and report.backend == "openvino" and report.mode == "fp32"
    assert "PASS on openvino" in report.table()


def test_verify_fails_a_backend_that_ignores_a_bias(graphs, pack_all, monkeypatch):
    """What OpenVINO does to an input with a default: its fed value is ignored. The liveness row catches it."""
    from bitfit.runtime.backends import OpenVinoEngine

    real = OpenVinoEngine.run
    monkeypatch.setattr(OpenVinoEngine, "run", lambda self, feeds, values: real(
        self, feeds, {k: (v if k != "layer.1.bm2" else self.value(np.zeros_like(v.data))) for k, v in values.items()}))
    report = verify(graphs["plain"], [pack_all], backend="openvino", strict=False, **QUIET)
    assert not report.ok and any("dead: layer.1.bm2" in c.note for c in report.failures)


def test_openvino_int8_weights(graphs, pack_all, token_inputs):
    fp32, int8 = TaskSession(graphs["plain"], backend="openvino"), TaskSession(graphs["plain"], backend="openvino-int8")
    for s in (fp32, int8):
        s.register(pack_all, name="all")
    inputs = token_inputs(fp32, 2, 9)
    diff = np.abs(fp32.logits("all", inputs) - int8.logits("all", inputs)).max()
    assert 0 < diff <= TOLERANCES["int8"]  # compressed, and close
    report = verify(graphs["plain"], [pack_all], backend="openvino-int8", **QUIET)
    assert report.ok and report.mode == "int8"


def test_mixed_batches_on_openvino(graphs, bert_compiled, pack_all, pack_min):
    ov, ref = TaskSession(graphs["mixed"], backend="openvino"), TaskSession(bert_compiled)
    for s in (ov, ref):
        s.register(pack_all, name="all")
        s.register(pack_min, name="min")
    rows = [("all", "a good fun movie"), ("min", "awful boring plot"), ("all", "who won")]
    for got, want in zip(ov.run_mixed(rows), ref.run_mixed(rows)):
        assert got["label"] == want["label"] and np.allclose(got["logits"], want["logits"], atol=1e-5)


def test_openvino_refuses_graphs_it_would_serve_wrongly(bert_compiled, graphs):
    with pytest.raises(CompiledModelError, match=r"compiled with bias defaults, which OpenVINO turns into constants "
                                                 r".*compile with --no-defaults"):
        TaskSession(bert_compiled, backend="openvino")
    with pytest.raises(CompiledModelError, match=r"holds onnxruntime's contrib ops .*openvino-int8"):
        TaskSession(graphs["int8"], backend="openvino")
    from bitfit.runtime import BitFitError

    with pytest.raises(BitFitError, match=r"unknown backend 'tensorrt'"):
        TaskSession(bert_compiled, backend="tensorrt")


def test_predict_and_serve_take_a_backend(graphs, pack_all, capsys):
    from starlette.testclient import TestClient

    from bitfit.cli import main
    from bitfit.serve import create_app

    assert main(["predict", "--compiled", str(graphs["plain"]), "--pack", str(pack_all), "--text", "good fun",
                 "--backend", "openvino", "--json"]) == 0
    ov = capsys.readouterr().out
    assert main(["predict", "--compiled", str(graphs["plain"]), "--pack", str(pack_all), "--text", "good fun",
                 "--json"]) == 0
    import json

    assert np.allclose(json.loads(ov)["logits"], json.loads(capsys.readouterr().out)["logits"], atol=1e-5)
    session = TaskSession(graphs["plain"], backend="openvino")
    task = session.register(pack_all)
    with TestClient(create_app(session, None)) as c:
        r = c.post("/v1/predict", json={"task": task, "texts": ["good fun", "awful"]})
        assert r.status_code == 200 and len(r.json()["predictions"]) == 2
