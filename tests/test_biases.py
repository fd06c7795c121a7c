"""Bias selection (training.biases): which parameters BitFit trains, per architecture."""
from __future__ import annotations

import pytest
import torch
from torch import nn

KINDS = ("bert", "roberta", "distilbert", "mpnet", "electra")
from bitfit.encoder.biases import ALL_KINDS, LAYER_KINDS, find_biases, parse_subset
from bitfit.encoder.model import load_encoder
from bitfit.runtime.errors import BitFitError

NUM_LAYERS = 2  # tests/tiny.py


@pytest.fixture(scope="module")
def encoders(tiny_model):
    return {kind: load_encoder(tiny_model(kind)) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_all_selects_eight_kinds_per_layer_and_the_embedding_norm(encoders, kind):
    encoder = encoders[kind]
    slots = find_biases(encoder, "all")
    assert len(slots) == len(LAYER_KINDS) * NUM_LAYERS + 1
    names = [s.name for s in slots]
    assert len(set(names)) == len(names)
    assert names[0] == "embeddings.bLNe"
    expected = {f"layer.{i}.{k}" for i in range(NUM_LAYERS) for k in LAYER_KINDS} | {"embeddings.bLNe"}
    assert set(names) == expected
    for layer in range(NUM_LAYERS):
        assert {s.kind for s in slots if s.layer == layer} == set(LAYER_KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_sources_are_real_bias_parameters_of_linear_or_layernorm(encoders, kind):
    encoder = encoders[kind]
    params = dict(encoder.named_parameters())
    slots = find_biases(encoder, "all")
    assert len({s.source for s in slots}) == len(slots)
    for s in slots:
        assert s.source in params, f"{s.source} is not a parameter of {kind}"
        assert s.source.endswith(".bias")
        module = encoder.get_submodule(s.source.rsplit(".", 1)[0])
        assert module is s.module
        expected = nn.LayerNorm if s.kind.startswith("bLN") else nn.Linear
        assert isinstance(module, expected), f"{s.name} -> {s.source} is {type(module).__name__}"
        assert s.parameter is params[s.source]


@pytest.mark.parametrize("kind", KINDS)
def test_linear_kinds_map_to_the_right_projection_shapes(encoders, kind):
    """bm2 widens to the intermediate size, bLNe has the embedding width, the rest the hidden size."""
    encoder = encoders[kind]
    hidden = 32  # tiny.py: hidden 32, intermediate 37; ELECTRA embeds at 16 and projects up
    embedding = getattr(encoder.config, "embedding_size", hidden)
    for s in find_biases(encoder, "all"):
        width = {"bm2": 37, "bLNe": embedding}.get(s.kind, hidden)
        assert tuple(s.parameter.shape) == (width,), s.name


@pytest.mark.parametrize("spec", ["bq,bm2", "bq+bm2", " bq , bm2 ", "BQ,BM2", "paper-min", ["bm2", "bq"]])
@pytest.mark.parametrize("kind", ["bert", "distilbert", "mpnet"])
def test_subset_gives_only_those_kinds(encoders, kind, spec):
    slots = find_biases(encoders[kind], spec)
    assert {s.kind for s in slots} == {"bq", "bm2"}
    assert len(slots) == 2 * NUM_LAYERS
    assert all(s.layer is not None for s in slots)


def test_subset_order_is_canonical_and_duplicates_collapse():
    assert parse_subset("bm2,bq,bq") == ("bq", "bm2")
    assert parse_subset("bln1+blne") == ("bLN1", "bLNe")
    assert parse_subset("all") == ALL_KINDS


@pytest.mark.parametrize("spec", ["bx", "bq,nope", "query", ""])
def test_unknown_kind_is_an_error_naming_valid_kinds(encoders, spec):
    with pytest.raises(BitFitError, match=r"unknown bias kinds") as info:
        find_biases(encoders["bert"], spec)
    message = str(info.value)
    for kind in ALL_KINDS:
        assert kind in message
    assert "'all'" in message


def test_mpnet_relative_attention_bias_is_never_selected(encoders):
    encoder = encoders["mpnet"]
    names = dict(encoder.named_parameters())
    assert "encoder.relative_attention_bias.weight" in names  # the trap exists in this model
    for spec in ("all", "bq", "bk", "bv", "bm1", "bq,bk,bv,bm1,bm2,bm3"):
        sources = {s.source for s in find_biases(encoder, spec)}
        assert not any("relative_attention_bias" in src for src in sources), spec


def test_model_without_biases_is_refused():
    import transformers as T

    config = T.ModernBertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3,
    )
    model = T.ModernBertModel(config)
    assert not any(n.endswith("bias") for n, _ in model.named_parameters())
    with pytest.raises(BitFitError, match=r"no bias terms.*cannot fine-tune.*pick an encoder with biases"):
        find_biases(model, "all")


def test_unsupported_model_type_with_biases_is_refused():
    import transformers as T

    # DeBERTa v1 (fused q/k/v `in_proj`) is not DeBERTa-v2, which is supported
    config = T.DebertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=37)
    with pytest.raises(BitFitError, match=r"model type 'deberta'.*not supported.*supported are .*bert.*deberta-v2"):
        find_biases(T.DebertaModel(config), "all")


def test_plain_module_without_config_is_refused():
    with pytest.raises(BitFitError, match=r"model type None .*not supported"):
        find_biases(nn.Sequential(nn.Linear(3, 3)), "all")


def test_layer_module_without_bias_names_the_kind(encoders):
    """A variant built without one bias (here: query) cannot train that kind, and says so."""
    import copy

    encoder = copy.deepcopy(encoders["bert"])
    query = encoder.encoder.layer[0].attention.self.query
    encoder.encoder.layer[0].attention.self.query = nn.Linear(query.in_features, query.out_features, bias=False)
    with pytest.raises(BitFitError, match=r"attention\.self\.query .*has no bias, so bq cannot be trained"):
        find_biases(encoder, "bq")
    assert {s.kind for s in find_biases(encoder, "bm2")} == {"bm2"}  # other kinds still work


def test_slots_write_through_to_the_model(encoders):
    """A slot's parameter is the module's live bias: writing it changes the model's output."""
    import copy

    encoder = copy.deepcopy(encoders["bert"])
    ids = torch.tensor([[2, 40, 41, 3]])
    before = encoder(input_ids=ids).last_hidden_state
    slot = next(s for s in find_biases(encoder, "bm2") if s.layer == 1)
    with torch.no_grad():
        slot.parameter.add_(1.0)
    after = encoder(input_ids=ids).last_hidden_state
    assert (after - before).abs().max().item() > 1e-3
