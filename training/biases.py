"""Which bias terms BitFit trains, found by module structure in the paper's notation.

The paper (Ben-Zaken et al. 2022, appendix) names the per-layer biases of a BERT layer:
    bq bk bv   attention query / key / value projections
    bm1        attention output projection          bLN1  the LayerNorm after attention
    bm2        first MLP layer (intermediate.dense)  bm3   second MLP layer
    bLN2       the LayerNorm after the MLP
We add bLNe for the embeddings' LayerNorm, which the paper's "all biases" setting also trains.

Modules are looked up by path per architecture and checked to be Linear / LayerNorm with a bias;
selection never matches parameter-name substrings (MPNet's `relative_attention_bias.weight` is an
embedding table, not a bias term).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from runtime.errors import BitFitError

LAYER_KINDS = ("bq", "bk", "bv", "bm1", "bLN1", "bm2", "bm3", "bLN2")
EMBEDDING_KIND = "bLNe"
ALL_KINDS = (*LAYER_KINDS, EMBEDDING_KIND)
PRESETS = {"all": ALL_KINDS, "paper-min": ("bq", "bm2")}


@dataclass(frozen=True)
class Layout:
    layers: str  # path of the ModuleList of transformer layers
    embeddings_norm: str  # path of the embeddings' LayerNorm
    modules: dict[str, str]  # kind -> module path inside one layer


_BERT = Layout(
    "encoder.layer",
    "embeddings.LayerNorm",
    {
        "bq": "attention.self.query",
        "bk": "attention.self.key",
        "bv": "attention.self.value",
        "bm1": "attention.output.dense",
        "bLN1": "attention.output.LayerNorm",
        "bm2": "intermediate.dense",
        "bm3": "output.dense",
        "bLN2": "output.LayerNorm",
    },
)
LAYOUTS: dict[str, Layout] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "camembert": _BERT,
    "electra": _BERT,
    "distilbert": Layout(
        "transformer.layer",
        "embeddings.LayerNorm",
        {
            "bq": "attention.q_lin",
            "bk": "attention.k_lin",
            "bv": "attention.v_lin",
            "bm1": "attention.out_lin",
            "bLN1": "sa_layer_norm",
            "bm2": "ffn.lin1",
            "bm3": "ffn.lin2",
            "bLN2": "output_layer_norm",
        },
    ),
    "mpnet": Layout(
        "encoder.layer",
        "embeddings.LayerNorm",
        {
            "bq": "attention.attn.q",
            "bk": "attention.attn.k",
            "bv": "attention.attn.v",
            "bm1": "attention.attn.o",
            "bLN1": "attention.LayerNorm",
            "bm2": "intermediate.dense",
            "bm3": "output.dense",
            "bLN2": "output.LayerNorm",
        },
    ),
}


@dataclass(frozen=True)
class BiasSlot:
    """One bias tensor: canonical name (`layer.3.bq`, `embeddings.bLNe`), kind, layer, the model's own name."""

    name: str
    kind: str
    layer: int | None
    source: str
    module: nn.Module

    @property
    def parameter(self) -> nn.Parameter:
        return self.module.bias


def parse_subset(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """'all' | 'bq,bm2' | 'bq+bm2' | a list of kinds -> kinds in canonical order."""
    if isinstance(spec, str):
        if spec.strip() in PRESETS:
            return PRESETS[spec.strip()]
        items = [s.strip() for s in spec.replace("+", ",").split(",") if s.strip()]
    else:
        items = list(spec)
    expanded: list[str] = []
    for item in items:
        expanded.extend(PRESETS.get(item, (item,)))
    lookup = {k.lower(): k for k in ALL_KINDS}
    unknown = [k for k in expanded if k.lower() not in lookup]
    if unknown or not expanded:
        raise BitFitError(
            f"unknown bias kinds {unknown or spec!r}: use 'all', or a comma list of {', '.join(ALL_KINDS)} "
            "(e.g. 'bq,bm2', the paper's 0.04% setting)"
        )
    chosen = {lookup[k.lower()] for k in expanded}
    return tuple(k for k in ALL_KINDS if k in chosen)


def model_layout(model: nn.Module) -> Layout:
    if not any(_has_bias(m) for m in model.modules()):
        raise BitFitError(
            f"{type(model).__name__} has no bias terms (built without biases, like ModernBERT): BitFit trains only "
            "biases, so it cannot fine-tune this model; pick an encoder with biases (BERT, RoBERTa, DistilBERT, "
            "MPNet, ELECTRA)"
        )
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    layout = LAYOUTS.get(model_type or "")
    if layout is None:
        raise BitFitError(
            f"model type {model_type!r} ({type(model).__name__}) is not supported yet: supported are "
            f"{', '.join(sorted(LAYOUTS))}"
        )
    return layout


def find_biases(model: nn.Module, kinds: str | tuple[str, ...] = "all") -> list[BiasSlot]:
    """The bias slots of `kinds` in an encoder (an AutoModel, not a task model), in layer order."""
    kinds = parse_subset(kinds)
    layout = model_layout(model)
    slots: list[BiasSlot] = []
    if EMBEDDING_KIND in kinds:
        module = _module(model, layout.embeddings_norm, EMBEDDING_KIND)
        slots.append(BiasSlot(f"embeddings.{EMBEDDING_KIND}", EMBEDDING_KIND, None, f"{layout.embeddings_norm}.bias", module))
    layers = model.get_submodule(layout.layers)
    if not isinstance(layers, nn.ModuleList):
        raise BitFitError(f"{layout.layers} in {type(model).__name__} is not a list of layers: unsupported layout")
    for i, layer in enumerate(layers):
        for kind in LAYER_KINDS:
            if kind in kinds:
                path = layout.modules[kind]
                module = _module(layer, path, kind)
                slots.append(BiasSlot(f"layer.{i}.{kind}", kind, i, f"{layout.layers}.{i}.{path}.bias", module))
    return slots


def all_bias_sources(model: nn.Module) -> set[str]:
    """Parameter names of every selectable bias: what the base fingerprint leaves out."""
    return {s.source for s in find_biases(model, "all")}


def _has_bias(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.LayerNorm)) and getattr(module, "bias", None) is not None


def _module(root: nn.Module, path: str, kind: str) -> nn.Module:
    try:
        module = root.get_submodule(path)
    except AttributeError:
        raise BitFitError(f"expected a {kind} module at {path!r} but found none: unsupported model variant") from None
    if not _has_bias(module):
        raise BitFitError(
            f"{path} ({type(module).__name__}) has no bias, so {kind} cannot be trained: choose other bias kinds"
        )
    return module
