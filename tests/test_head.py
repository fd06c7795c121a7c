"""The in-graph head: every plain compiled graph has optional head.* inputs and logits / token_logits outputs,
so onnxruntime alone gives a pack's logits; through --fuse, --quantize and --fp16 alike."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from bitfit.compiler.head import HEAD_INPUT_NAMES
from bitfit.compiler.quantize import nodes_reading_defaults, quantize_int8
from bitfit.runtime import TaskSession, load_pack
from bitfit.runtime.compiled import (
    LOGITS,
    MODEL_FILE,
    OUTPUT_NAME,
    TOKEN_LOGITS,
    head_feeds,
    read_manifest,
)
from conftest import ATOL, QUIET
from head_refs import numpy_head, variant_pack

TOL = 1e-5  # the head is fp32 in every variant: graph head vs numpy head differ by float rounding only
OUTPUTS = [OUTPUT_NAME, LOGITS, TOKEN_LOGITS]


def ort_session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # optional inputs are initializers on purpose
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module", params=["fp32", "fuse", "int8", "fp16"])
def variant(request, bert_model, bert_compiled, tmp_path_factory):
    if request.param == "fp32":
        return bert_compiled
    from bitfit.compiler.compile import compile as compile_model

    out = tmp_path_factory.mktemp("head") / request.param
    compile_model(bert_model, out, fuse=request.param == "fuse", quantize="int8" if request.param == "int8" else None,
                  fp16=request.param == "fp16", log=QUIET["log"])
    return out


def test_manifest_and_graph_declare_the_head(variant):
    m = read_manifest(variant)
    assert m.outputs == OUTPUTS and m.output == OUTPUT_NAME
    h = m.hidden_size
    assert {s.name: s.shape for s in m.head_inputs} == {
        "head.weight": (-1, h), "head.bias": (-1,), "head.pooler.weight": (h, h), "head.pooler.bias": (h,),
        "head.pooling": (3,)}
    session = ort_session(variant / MODEL_FILE)
    assert [o.name for o in session.get_outputs()] == OUTPUTS
    assert [i.name for i in session.get_inputs()] == m.token_inputs  # the head is optional, like the biases
    optional = {i.name: i for i in session.get_overridable_initializers()}
    for s in m.head_inputs:
        assert optional[s.name].type == "tensor(float)"
        assert [d if isinstance(d, int) else -1 for d in optional[s.name].shape] == list(s.shape)
    graph = ir.load(variant / MODEL_FILE).graph
    head_ops = {n.op_type for n in graph if n.name and n.name.startswith("head/")}
    assert head_ops and not head_ops & {"MatMulInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLinear"}
    casts = [n for n in graph if n.op_type == "Cast" and n.name and n.name.startswith("head/")]
    assert [c.attributes["to"].as_int() for c in casts] == [ir.DataType.FLOAT]  # the mask's; nothing fp16


def test_head_feeds_give_the_task_sessions_logits(variant, pack_all, pack_pairs, token_inputs):
    task_session = TaskSession(variant)
    graph = ort_session(variant / MODEL_FILE)
    x = token_inputs(task_session, 4, 11)
    for path in (pack_all, pack_pairs):
        pack = load_pack(path)
        name = task_session.register(pack)
        logits, = graph.run([LOGITS], {**x, **pack.biases, **head_feeds(pack)})
        np.testing.assert_allclose(logits, task_session.logits(name, x), rtol=0, atol=TOL)


def test_pooler_and_token_kinds(bert_compiled, pack_all, token_inputs):
    base = load_pack(pack_all)
    packs = [
        variant_pack(base, task="pooled", task_kind="classification", pooling="pooler", labels=["a", "b", "c"], seed=1),
        variant_pack(base, task="cls", task_kind="classification", pooling="cls", labels=["a", "b"], seed=2),
        variant_pack(base, task="tags", task_kind="token-classification", pooling="none", labels=list("OXYZ"), seed=3),
        variant_pack(base, task="score", task_kind="regression", pooling="mean", labels=["score"], seed=4),
    ]
    task_session = TaskSession(bert_compiled)
    graph = ort_session(bert_compiled / MODEL_FILE)
    x = token_inputs(task_session, 3, 9)
    for pack in packs:
        task_session.register(pack)
        hidden, logits, token_logits = graph.run(OUTPUTS, {**x, **pack.biases, **head_feeds(pack)})
        np.testing.assert_allclose(hidden, task_session.hidden_states(x, pack.name), rtol=0, atol=TOL)
        ref_logits, ref_tokens = numpy_head(pack, hidden, x["attention_mask"])
        assert logits.shape == ref_logits.shape and token_logits.shape == ref_tokens.shape
        np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=TOL, err_msg=pack.name)
        np.testing.assert_allclose(token_logits, ref_tokens, rtol=0, atol=TOL, err_msg=pack.name)
        # and the TaskSession's own head: [B, K] for sequence kinds, [B, T, K] for token kinds
        ours = token_logits if pack.manifest.token_level else logits
        np.testing.assert_allclose(ours, task_session.logits(pack.name, x), rtol=0, atol=TOL, err_msg=pack.name)


def test_the_labels_axis_takes_any_number_of_rows(bert_compiled, token_inputs):
    """head.weight's default is [1, H] under a symbolic labels axis: a feed of [K, H] overrides it for any K."""
    task_session = TaskSession(bert_compiled)
    graph = ort_session(bert_compiled / MODEL_FILE)
    x = token_inputs(task_session, 2, 7)
    rng = np.random.default_rng(0)
    for k in (1, 3, 7):
        w = rng.normal(size=(k, task_session.manifest.hidden_size)).astype(np.float32)
        b = rng.normal(size=k).astype(np.float32)
        hidden, logits, tokens = graph.run(OUTPUTS, {**x, "head.weight": w, "head.bias": b})
        mask = x["attention_mask"][..., None]
        np.testing.assert_allclose(logits, (hidden * mask).sum(1) / mask.sum(1) @ w.T + b, rtol=0, atol=TOL)
        assert tokens.shape == (*hidden.shape[:2], k)


def test_no_feed_is_the_base_model(bert_compiled, bert_model, token_inputs, torch_hidden):
    task_session = TaskSession(bert_compiled)
    x = token_inputs(task_session, 3, 8)
    hidden, logits, tokens = ort_session(bert_compiled / MODEL_FILE).run(OUTPUTS, x)
    np.testing.assert_allclose(hidden, torch_hidden(bert_model, x), rtol=0, atol=ATOL)
    assert logits.shape == (3, 1) and not logits.any() and not tokens.any()  # the zero head


def test_quantizing_a_head_graph_again_keeps_the_head_live(bert_compiled, pack_all, token_inputs, tmp_path):
    """Compile adds the head after quantizing; a head graph quantized again must not bake head.weight (its
    MatMul reads Transpose(head.weight), a value computed from head inputs alone)."""
    src = bert_compiled / MODEL_FILE
    excluded = set(nodes_reading_defaults(src))
    graph = ir.load(src).graph
    head_matmuls = [n.name for n in graph if n.op_type == "MatMul" and n.name.startswith("head/")]
    assert len(head_matmuls) == 3 and set(head_matmuls) <= excluded  # pooler, logits, token logits
    dst = tmp_path / MODEL_FILE
    quantize_int8(src, dst)
    quantized = ort_session(dst)
    assert {i.name for i in quantized.get_overridable_initializers()} >= set(HEAD_INPUT_NAMES)
    pack = load_pack(pack_all)
    x = token_inputs(TaskSession(bert_compiled), 3, 10)
    hidden, logits, tokens = quantized.run(OUTPUTS, {**x, **pack.biases, **head_feeds(pack)})
    ref_logits, ref_tokens = numpy_head(pack, hidden, x["attention_mask"])
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=TOL)
    np.testing.assert_allclose(tokens, ref_tokens, rtol=0, atol=TOL)


def test_mixed_graphs_have_no_head(bert_model, tmp_path):
    from bitfit.compiler.compile import compile as compile_model

    out = compile_model(bert_model, tmp_path / "mixed", mixed=True, log=QUIET["log"])
    m = read_manifest(out)
    assert m.head_inputs == [] and m.outputs == [OUTPUT_NAME]
    assert [o.name for o in ort_session(out / MODEL_FILE).get_outputs()] == [OUTPUT_NAME]


def test_manifests_must_declare_the_head(bert_compiled, copy_dir):
    """Format 2 states its head inputs and outputs (empty for --no-head): leaving them out is refused."""
    import json

    from bitfit.runtime.compiled import MANIFEST_FILE
    from bitfit.runtime.errors import CompiledModelError
    from conftest import write_sealed

    d = copy_dir(bert_compiled)
    data = json.loads((d / MANIFEST_FILE).read_text())
    assert read_manifest(d).outputs[0] == OUTPUT_NAME
    del data["head_inputs"], data["outputs"]
    write_sealed(d / MANIFEST_FILE, data)
    with pytest.raises(CompiledModelError, match=r"missing keys head_inputs, outputs"):
        read_manifest(d)


def test_no_head_leaves_it_out_and_serves_the_same_logits(bert_model, bert_compiled, pack_all, token_inputs, tmp_path):
    from bitfit.exporters.adapter import export_adapter
    from bitfit.runtime.errors import CompiledModelError

    from bitfit.cli import main

    out = tmp_path / "nohead"
    assert main(["compile", "--model", str(bert_model), "--out", str(out), "--no-head"]) == 0
    m = read_manifest(out)
    assert m.head_inputs == [] and m.outputs == [OUTPUT_NAME] and "AddHeadPass" not in m.passes
    graph = ort_session(out / MODEL_FILE)
    assert [o.name for o in graph.get_outputs()] == [OUTPUT_NAME]
    assert not {i.name for i in graph.get_inputs()} & set(HEAD_INPUT_NAMES)
    with_head, without = TaskSession(bert_compiled), TaskSession(out)
    x = token_inputs(with_head, 3, 9)
    a, b = with_head.register(load_pack(pack_all)), without.register(load_pack(pack_all))
    np.testing.assert_allclose(without.logits(b, x), with_head.logits(a, x), rtol=0, atol=ATOL)
    with pytest.raises(CompiledModelError, match="--no-head"):
        export_adapter(out, pack_all, tmp_path / "a.onnx_adapter")
    assert not (tmp_path / "a.onnx_adapter").exists()
