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
