"""compile --fp16: fp16 weights for GPUs, bias inputs still fp32 (cast inside), so every pack fits."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from bitfit.compiler.passes import CheckBiasInputsPass
from bitfit.compiler.verify import TOLERANCES, verify
from bitfit.runtime import BitFitError, TaskPack, TaskSession, load_pack
from bitfit.runtime.compiled import MODEL_FILE, read_manifest

QUIET = {"log": lambda s: None}


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "fused"])
def half(request, bert_model, tmp_path_factory):
    from bitfit.compiler.compile import compile as compile_model

    out = tmp_path_factory.mktemp("fp16") / "graph"
    compile_model(bert_model, out, fp16=True, fuse=request.param, **QUIET)
    return out


def test_weights_are_fp16_and_bias_inputs_stay_fp32_with_defaults(half):
    model = ir.load(half / MODEL_FILE)
    m = read_manifest(half)
    assert m.precision == "fp16"
    CheckBiasInputsPass({b.name: b.shape for b in m.bias_inputs})(model)
    inputs = {v.name: v for v in model.graph.inputs}
    for b in m.bias_inputs:
        assert inputs[b.name].dtype == ir.DataType.FLOAT
        assert inputs[b.name].const_value is not None and inputs[b.name].const_value.dtype == ir.DataType.FLOAT
    weights = [v for v in model.graph.initializers.values() if v.name not in inputs and v.const_value.size > 64]
    assert weights and all(v.const_value.dtype == ir.DataType.FLOAT16 for v in weights)


def test_fp16_logits_match_pytorch_and_packs_swap(half, bert_model, pack_all, token_inputs, torch_logits):
    pack = load_pack(pack_all)
    rng = np.random.default_rng(1)
    noisy = TaskPack(pack.manifest, {k: (v + rng.normal(0, 0.3, v.shape)).astype(np.float32)
                                     for k, v in pack.tensors.items()})
    session = TaskSession(half)
    session.register(pack, name="A")
    session.register(noisy, name="B")
    inputs = token_inputs(session, 3, 19)
    a, b = session.logits("A", inputs), session.logits("B", inputs)
    ref_a, ref_b = torch_logits(pack, bert_model, inputs), torch_logits(noisy, bert_model, inputs)
    assert np.abs(a - ref_a).max() <= TOLERANCES["fp16"] and np.abs(b - ref_b).max() <= TOLERANCES["fp16"]
    assert np.abs(b - a).max() > 1e-2


def test_verify_picks_the_fp16_mode(half, pack_all):
    report = verify(half, [pack_all], **QUIET)
    assert report.ok, report.table()
    assert report.mode == "fp16" and report.atol == TOLERANCES["fp16"]
    assert "fp16 mode" in report.table().strip().splitlines()[-1]


def test_fp16_and_int8_are_exclusive(bert_model, tmp_path):
    from bitfit.compiler.compile import compile as compile_model

    with pytest.raises(BitFitError, match="choose one of --quantize and --fp16"):
        compile_model(bert_model, tmp_path / "x", fp16=True, quantize="int8", **QUIET)
