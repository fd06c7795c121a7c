"""compile --quantize: int8 weights, biases still fp32 graph inputs, so task switching keeps working."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from bitfit.compiler.passes import CheckBiasInputsPass
from bitfit.compiler.verify import TOLERANCES, verify
from bitfit.runtime import BitFitError, TaskPack, TaskSession, load_pack
from bitfit.runtime.compiled import MODEL_FILE

QUIET = {"log": lambda s: None}


@pytest.fixture(scope="module")
def quantized(bert_model, tmp_path_factory):
    from bitfit.compiler.compile import compile as compile_model

    out = tmp_path_factory.mktemp("quantized") / "int8"
    compile_model(bert_model, out, quantize="int8", log=lambda s: None)
    return out


def test_manifest_and_graph_are_int8_with_live_fp32_bias_inputs(quantized, bert_compiled):
    session = TaskSession(quantized)
    m = session.manifest
    assert m.precision == "int8-dynamic-per-channel"
    assert [b.name for b in m.bias_inputs] == [b.name for b in TaskSession(bert_compiled).manifest.bias_inputs]
    model = ir.load(quantized / MODEL_FILE)
    ops = {n.op_type for n in model.graph}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    CheckBiasInputsPass({b.name: b.shape for b in m.bias_inputs})(model)
    overridable = {i.name: i.type for i in session.session.get_overridable_initializers()}
    assert overridable == {b.name: "tensor(float)" for b in [*m.bias_inputs, *m.head_inputs]}
    assert (quantized / MODEL_FILE).stat().st_size < (bert_compiled / MODEL_FILE).stat().st_size


def test_quantized_logits_are_close_to_pytorch_and_packs_still_swap(quantized, bert_model, pack_all, token_inputs,
                                                                     torch_logits):
    pack = load_pack(pack_all)
    rng = np.random.default_rng(0)
    noisy = TaskPack(pack.manifest, {k: (v + rng.normal(0, 0.3, v.shape)).astype(np.float32)
                                     for k, v in pack.tensors.items()})
    session = TaskSession(quantized)
    session.register(pack, name="A")
    session.register(noisy, name="B")
    inputs = token_inputs(session, 4, 23)
    a, b = session.logits("A", inputs), session.logits("B", inputs)
    ref_a, ref_b = torch_logits(pack, bert_model, inputs), torch_logits(noisy, bert_model, inputs)
    assert np.abs(a - ref_a).max() <= TOLERANCES["int8"] and np.abs(b - ref_b).max() <= TOLERANCES["int8"]
    assert np.abs(a - ref_a).max() > 1e-6  # it is quantized: not bit-for-bit fp32
    # swapping moves the quantized output as it moves PyTorch's
    assert np.abs(b - a).max() > 1e-2
    assert (b.argmax(1) == ref_b.argmax(1)).mean() >= 0.75


def test_verify_auto_mode_uses_quantized_tolerance(quantized, pack_all):
    report = verify(quantized, [pack_all], **QUIET)
    assert report.mode == "int8" and report.precision == "int8-dynamic-per-channel"
    assert report.atol == TOLERANCES["int8"]
    assert report.ok, report.table()
    assert any(c.case.startswith("labels over all") for c in report.checks)
    assert "int8 mode" in report.table().strip().splitlines()[-1]


def test_verify_fp32_mode_on_a_quantized_graph_fails(quantized, pack_all):
    report = verify(quantized, [pack_all], mode="fp32", strict=False, **QUIET)
    assert report.atol == 1e-4
    assert not report.ok
    assert all(c.max_abs > 1e-4 for c in report.failures if not np.isnan(c.max_abs))


def test_bad_modes_are_refused(bert_model, bert_compiled, tmp_path):
    from bitfit.compiler.compile import compile as compile_model

    with pytest.raises(BitFitError, match=r"unknown quantize mode 'int4': use one of int8, int8-per-tensor"):
        compile_model(bert_model, tmp_path / "c", quantize="int4", log=lambda s: None)
    assert not (tmp_path / "c").exists()
    with pytest.raises(BitFitError, match=r"verify mode must be auto, fp32, fp16, int8; got 'fast'"):
        verify(bert_compiled, mode="fast", **QUIET)


# -- int8 kernels fused around live biases ----------------------------------------------------------------
@pytest.fixture(scope="module")
def plain_int8(bert_model, tmp_path_factory):
    """The int8 graph without the offline fusion (what compile falls back to)."""
    from bitfit.compiler import compile as compile_module

    out = tmp_path_factory.mktemp("quantized") / "int8-plain"
    real = compile_module.export_int8_live
    messages = []
    compile_module.export_int8_live = lambda *a, **k: (_ for _ in ()).throw(BitFitError("no fusion here"))
    try:
        compile_module.compile(bert_model, out, quantize="int8", log=messages.append)
    finally:
        compile_module.export_int8_live = real
    assert any("compiling the plain int8 graph instead" in m and "no fusion here" in m for m in messages)
    return out


def test_int8_kernels_fuse_each_bias_and_keep_it_live(quantized, plain_int8):
    m = TaskSession(quantized).manifest
    assert m.optimized_with.startswith("onnxruntime ") and "ORT_ENABLE_EXTENDED" in m.optimized_with
    assert m.fused_ops.get("MatMulIntegerToFloat", 0) + m.fused_ops.get("DynamicQuantizeMatMul", 0) >= 12
    assert any(p.startswith("optimise_offline") for p in m.passes)
    fused, plain = ir.load(quantized / MODEL_FILE), ir.load(plain_int8 / MODEL_FILE)
    adds = lambda g: sum(n.op_type == "Add" for n in g.graph)  # noqa: E731
    assert adds(fused) < adds(plain)  # the bias Adds went into the int8 kernels
    assert TaskSession(plain_int8).manifest.optimized_with == ""


def test_the_fused_int8_graph_computes_what_the_plain_one_does(quantized, plain_int8, pack_all, token_inputs):
    pack = load_pack(pack_all)
    rng = np.random.default_rng(3)
    noisy = TaskPack(pack.manifest, {k: (v + rng.normal(0, 0.3, v.shape)).astype(np.float32)
                                     for k, v in pack.tensors.items()})
    outs = []
    for graph in (quantized, plain_int8):
        session = TaskSession(graph)
        session.register(noisy, name="n")
        inputs = token_inputs(session, 3, 17)
        outs.append((session.logits("n", inputs), session.hidden_states(inputs)))
    assert np.abs(outs[0][0] - outs[1][0]).max() <= 1e-5 and np.abs(outs[0][1] - outs[1][1]).max() <= 1e-5


# -- graphs without bias defaults -------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["fp32", "int8", "mixed"])
def no_defaults(request, bert_model, tmp_path_factory):
    from bitfit.compiler.compile import compile as compile_model

    out = tmp_path_factory.mktemp("no-defaults") / request.param
    compile_model(bert_model, out, bias_defaults=False, quantize="int8" if request.param == "int8" else None,
                  mixed=request.param == "mixed", log=lambda s: None)
    return request.param, out


def test_a_graph_without_defaults_has_required_bias_inputs_and_serves_the_same(no_defaults, bert_compiled, quantized,
                                                                             pack_min, token_inputs):
    kind, graph = no_defaults
    session = TaskSession(graph)
    m = session.manifest
    assert not m.bias_defaults and m.head_inputs == []
    required = {i.name for i in session.session.get_inputs()}
    assert {b.name for b in m.bias_inputs} <= required and not session.session.get_overridable_initializers()
    reference = TaskSession(quantized if kind == "int8" else bert_compiled)
    for s in (session, reference):
        s.register(pack_min, name="min")  # bq,bm2 only: the graph's other biases come from the base values
    inputs = token_inputs(session, 3, 11)
    assert np.abs(session.logits("min", inputs) - reference.logits("min", inputs)).max() <= 1e-5
    assert np.abs(session.hidden_states(inputs) - reference.hidden_states(inputs)).max() <= 1e-5  # no task
    if kind != "mixed":
        report = verify(graph, [pack_min], **QUIET)
        assert report.ok and any("inputs is live" in c.case for c in report.checks)
    else:
        rows = [("min", "good fun"), ("min", "awful")]
        assert [r["label"] for r in session.run_mixed(rows)] == [r["label"] for r in reference.run_mixed(rows)]
