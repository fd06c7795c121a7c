"""ELECTRA, XLM-RoBERTa, ALBERT and DeBERTa-v2 end to end: bias slots, train, compile, runtime == PyTorch
(fp32 logits, atol 1e-4, padded batches), live bias inputs, bitfit verify; ALBERT's shared layer; and the
clear refusals (bias-free encoders; --fuse where onnxruntime cannot fuse). BERT, RoBERTa, DistilBERT and
MPNet are covered the same way in test_parity.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from bitfit.compiler.verify import verify
from bitfit.encoder.biases import LAYER_KINDS, find_biases
from bitfit.encoder.model import load_encoder, model_from_pack
from bitfit.runtime import BitFitError, TaskPack, TaskSession, load_pack
from conftest import ATOL, QUIET, perturbed
from tiny import make_tiny
from torch import nn

KINDS = ("electra", "xlm-roberta", "albert", "deberta-v2")
TOKEN_TYPES = {"electra": True, "xlm-roberta": False, "albert": True, "deberta-v2": False}
# ALBERT's two depths share one layer's weights, so it has one layer of slots; the others have two.
DISTINCT_LAYERS = {"electra": 2, "xlm-roberta": 2, "albert": 1, "deberta-v2": 2}
SHAPES = ((1, 5), (4, 23), (2, 64))


@pytest.fixture(scope="module", params=KINDS)
def arch(request, tiny_model, compiled_dir, trained_pack):
    kind = request.param
    return kind, tiny_model(kind), compiled_dir(kind), trained_pack(kind, "all", epochs=1)


@pytest.mark.parametrize("kind", KINDS)
def test_slots_are_the_real_bias_parameters(tiny_model, kind):
    encoder = load_encoder(tiny_model(kind))
    params = dict(encoder.named_parameters())
    slots = find_biases(encoder, "all")
    layers = DISTINCT_LAYERS[kind]
    assert [s.name for s in slots] == ["embeddings.bLNe"] + [f"layer.{i}.{k}" for i in range(layers)
                                                              for k in LAYER_KINDS]
    for s in slots:
        assert s.parameter is params[s.source], s.name
        assert isinstance(s.module, nn.LayerNorm if s.kind.startswith("bLN") else nn.Linear), s.name
        assert tuple(s.parameter.shape) == ({"bm2": 37, "bLNe": getattr(encoder.config, "embedding_size", 32)}
                                            .get(s.kind, 32),), s.name


def test_compiled_graph_inputs(arch):
    kind, model_dir, compiled, _ = arch
    m = TaskSession(compiled).manifest
    assert m.token_inputs == ["input_ids", "attention_mask"] + (["token_type_ids"] if TOKEN_TYPES[kind] else [])
    assert [b.name for b in m.bias_inputs] == [s.name for s in find_biases(load_encoder(model_dir), "all")]
    assert m.max_positions == 64  # the tokenizer's limit; RoBERTa-style position offsets leave more than that
    assert m.num_layers == 2  # depth, also for ALBERT's one shared layer


def test_logits_match_pytorch_on_padded_batches(arch, token_inputs):
    kind, model_dir, compiled, pack_dir = arch
    pack = load_pack(pack_dir)
    noisy = perturbed(pack, 0.3)
    session = TaskSession(compiled)
    session.register(pack, name="trained")
    session.register(noisy, name="noisy")
    models = {"trained": model_from_pack(pack, base=model_dir), "noisy": model_from_pack(noisy, base=model_dir)}
    for batch, length in SHAPES:
        inputs = token_inputs(session, batch, length)
        if batch > 1:
            assert inputs["attention_mask"].min() == 0
        for name, model in models.items():
            with torch.no_grad():
                ref = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()
            ours = session.logits(name, inputs)
            assert ours.shape == ref.shape == (batch, 2)
            assert np.abs(ours - ref).max() <= ATOL, f"{kind} {name} {batch}x{length}"
    inputs = token_inputs(session, 3, 17)
    assert np.abs(session.logits("noisy", inputs) - session.logits("trained", inputs)).max() > 100 * ATOL


def test_each_bias_input_is_live_and_matches_pytorch(arch, token_inputs, torch_hidden):
    """Feeding one bias input moves the output, exactly as setting that bias in PyTorch does."""
    kind, model_dir, compiled, _ = arch
    session = TaskSession(compiled)
    inputs = token_inputs(session, 2, 9)
    base = session.hidden_states(inputs)
    last = DISTINCT_LAYERS[kind] - 1
    rng = np.random.default_rng(3)
    for name in ("embeddings.bLNe", f"layer.{last}.bv", f"layer.{last}.bm2", f"layer.{last}.bLN2"):
        spec = next(b for b in session.manifest.bias_inputs if b.name == name)
        value = rng.normal(0, 1, spec.shape).astype(np.float32)
        ours = session.hidden_states(inputs, biases={name: value})
        assert np.abs(ours - base).max() > 1e-2, f"{kind}: {name} is dead"
        assert np.abs(ours - torch_hidden(model_dir, inputs, {name: value})).max() <= ATOL, f"{kind} {name}"


def test_verify_passes(arch):
    kind, _, compiled, pack_dir = arch
    report = verify(compiled, [pack_dir], log=lambda s: None)
    assert report.ok, report.table()
    assert any("live" in c.case for c in report.checks)


# -- ALBERT: one shared layer, one bias input at every depth --------------------------------------------
def test_albert_shared_bq_moves_every_depth(tiny_model, compiled_dir, token_inputs):
    model_dir = tiny_model("albert")
    encoder = load_encoder(model_dir)
    slot = next(s for s in find_biases(encoder, "bq"))
    assert slot.name == "layer.0.bq" and encoder.config.num_hidden_layers == 2
    session = TaskSession(compiled_dir("albert"))
    inputs = token_inputs(session, 2, 11)
    feeds = {k: torch.from_numpy(v) for k, v in inputs.items()}
    delta = torch.from_numpy(np.random.default_rng(5).normal(0, 1, slot.parameter.shape).astype(np.float32))

    def hidden(first_depth_only: bool = False, shift: bool = True) -> tuple[torch.Tensor, ...]:
        calls = []

        def add(_module, _args, out):  # the one query module runs once per depth
            calls.append(None)
            return out + delta if shift and (len(calls) == 1 or not first_depth_only) else out

        handle = slot.module.register_forward_hook(add)
        try:
            with torch.no_grad():
                return encoder(**feeds, output_hidden_states=True).hidden_states
        finally:
            handle.remove()

    base, shifted = hidden(shift=False), hidden()
    assert len(base) == 3  # the projected embeddings, then depths 1 and 2
    assert torch.equal(base[0], shifted[0])
    for depth in (1, 2):
        assert (shifted[depth] - base[depth]).abs().max() > 1e-2, f"depth {depth} did not move"

    # The graph's one input feeds both depths: it matches the shift at every depth, not at the first only.
    ours = session.hidden_states(inputs, biases={"layer.0.bq": (slot.parameter + delta).detach().numpy()})
    assert np.abs(ours - shifted[-1].numpy()).max() <= ATOL
    assert np.abs(ours - hidden(first_depth_only=True)[-1].numpy()).max() > 1e-2


# -- refusals ----------------------------------------------------------------------------------------------
def test_bias_free_encoder_is_refused_by_train_and_compile(tmp_path, data_files):
    from bitfit.compiler.compile import compile as compile_model
    from bitfit.training.train import train

    model_dir = make_tiny("modernbert", tmp_path / "modernbert")
    expected = (r"ModernBertModel \(.*modernbert\) has no bias terms .*cannot fine-tune this model; "
                r"pick an encoder with biases \(BERT, .*DeBERTa-v2\)")
    with pytest.raises(BitFitError, match=expected):
        compile_model(model_dir, tmp_path / "compiled", log=lambda s: None)
    with pytest.raises(BitFitError, match=expected):
        train(model_dir, data_files["sentiment"], tmp_path / "pack", epochs=1, **QUIET)
    assert not (tmp_path / "compiled").exists() and not (tmp_path / "pack").exists()


@pytest.mark.parametrize("kind", ["albert", "deberta-v2"])
def test_fuse_is_refused_where_onnxruntime_cannot_fuse(kind, tiny_model, tmp_path):
    """onnxruntime's BERT fusions do not match ALBERT's shared layer (one Attention for two depths) or
    DeBERTa's disentangled attention: --fuse says so and names the way out."""
    from bitfit.compiler.compile import compile as compile_model

    with pytest.raises(BitFitError, match=r"BERT-style models only .*compile without fusion"):
        compile_model(tiny_model(kind), tmp_path / "fused", fuse=True, log=lambda s: None)
    assert not (tmp_path / "fused").exists()


def test_xlm_roberta_fuses_with_live_biases(tiny_model, compiled_dir, tmp_path, token_inputs, torch_hidden):
    from bitfit.compiler.compile import compile as compile_model

    model_dir = tiny_model("xlm-roberta")
    fused = TaskSession(compile_model(model_dir, tmp_path / "fused", fuse=True, log=lambda s: None))
    assert fused.manifest.fused_ops["Attention"] == 2
    inputs = token_inputs(fused, 3, 13)
    mask = inputs["attention_mask"][..., None]  # fused attention leaves padding positions unspecified
    value = np.random.default_rng(4).normal(0, 1, 32).astype(np.float32)
    ours = fused.hidden_states(inputs, biases={"layer.1.bq": value})
    assert np.abs((ours - torch_hidden(model_dir, inputs, {"layer.1.bq": value})) * mask).max() <= ATOL
    assert np.abs((ours - fused.hidden_states(inputs)) * mask).max() > 1e-2


# -- --mixed: per-row bias tables ----------------------------------------------------------------------------
ROWS = ["the movie was good", "what an awful boring plot", "who won the prize", "free cash now, reply yes", "ok"]


def mixed_rows_match_single_task(mixed_dir, plain_dir, packs: dict[str, TaskPack]) -> None:
    mixed, plain = TaskSession(mixed_dir), TaskSession(plain_dir)
    for name, pack in packs.items():
        mixed.register(pack, name=name)
        plain.register(pack, name=name)
    tasks = list(packs)
    rows = [(tasks[i % len(tasks)], t) for i, t in enumerate(ROWS * 2)]
    records = mixed.run_mixed(rows)
    for task in tasks:
        index = [i for i, (t, _) in enumerate(rows) if t == task]
        single = plain.run(task, [rows[i][1] for i in index]).logits
        assert np.abs(np.array([records[i]["logits"] for i in index]) - single).max() <= 1e-5, task
    same_text = mixed.run_mixed([(t, ROWS[0]) for t in tasks])  # the tasks differ, so a misrouted row would show
    assert np.abs(np.subtract(same_text[0]["logits"], same_text[1]["logits"])).max() > 100 * ATOL


def test_mixed_albert_applies_each_rows_shared_bias_at_every_depth(tiny_model, compiled_dir, trained_pack, tmp_path):
    from bitfit.compiler.compile import compile as compile_model

    pack = load_pack(trained_pack("albert", "all", epochs=1))
    mixed = compile_model(tiny_model("albert"), tmp_path / "mixed", mixed=True, log=lambda s: None)
    mixed_rows_match_single_task(mixed, compiled_dir("albert"), {"trained": pack, "noisy": perturbed(pack, 0.3)})


def test_mixed_deberta_refuses_position_shared_biases(tiny_model, compiled_dir, trained_pack, tmp_path):
    """DeBERTa-v2 runs query_proj / key_proj on its relative-position embeddings too (one tensor for the whole
    batch): per-row bq / bk tables are refused, and the other kinds compile and route per row."""
    from bitfit.compiler.compile import compile as compile_model

    model_dir = tiny_model("deberta-v2")
    with pytest.raises(BitFitError, match=r"--mixed cannot compile the bias layer\.0\.bq: .*query_proj\.bias .*shared "
                                          r"by all rows .*compile without --mixed, or with --biases leaving out bq"):
        compile_model(model_dir, tmp_path / "refused", mixed=True, log=lambda s: None)
    assert not (tmp_path / "refused").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left behind

    kinds = "bv,bm1,bLN1,bm2,bm3,bLN2,bLNe"
    pack = load_pack(trained_pack("deberta-v2", kinds, epochs=1))
    mixed = compile_model(model_dir, tmp_path / "mixed", mixed=True, biases=kinds, log=lambda s: None)
    mixed_rows_match_single_task(mixed, compiled_dir("deberta-v2"), {"trained": pack, "noisy": perturbed(pack, 0.3)})
