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

Canonical names count the model's distinct layer modules: `layer.i.<kind>` is the i-th layer that owns
its own weights. For most encoders that is depth i. ALBERT shares weights across depth: its
`num_hidden_groups` groups of `inner_group_num` layers (usually 1 x 1) are applied `num_hidden_layers`
times, so its slots are `layer.0.bq` ... for the shared layers only (group-major), and one such bias is
one tensor that acts at every depth its layer runs at -- as in the PyTorch model, where BitFit on ALBERT
trains that one shared tensor. A stock ALBERT therefore has 8 layer slots + bLNe, whatever its depth.

Left frozen, on purpose: biases outside the paper's notation, which a BERT layer has no counterpart
for -- ALBERT's `encoder.embedding_hidden_mapping_in` and ELECTRA's `embeddings_project` (embedding
width -> hidden width projections), DeBERTa-v2's relative-position `encoder.LayerNorm` and conv layer.
So every architecture offers the same kinds and a `--biases` spec means the same thing on each; these
tensors are part of the base fingerprint instead.
"""
from __future__ import annotations

from dataclasses import dataclass

from bitfit.runtime.errors import BitFitError
from bitfit.runtime.pack import BIAS_KINDS, EMBEDDING_KIND, LAYER_KINDS
from torch import nn

# the names are the pack format's (runtime.pack): packs and graphs use them
ALL_KINDS = BIAS_KINDS
PRESETS = {"all": ALL_KINDS, "paper-min": ("bq", "bm2")}


@dataclass(frozen=True)
class Layout:
    layers: str  # path of the ModuleList of transformer layers; each `*` steps into every item of a ModuleList
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
    "deberta-v2": Layout(
        "encoder.layer",
        "embeddings.LayerNorm",
        {**_BERT.modules, "bq": "attention.self.query_proj", "bk": "attention.self.key_proj",
         "bv": "attention.self.value_proj"},
    ),
    # One AlbertLayer per (group, inner layer), shared across depth: see the module docstring.
    "albert": Layout(
        "encoder.albert_layer_groups.*.albert_layers",
        "embeddings.LayerNorm",
        {
            "bq": "attention.query",
            "bk": "attention.key",
            "bv": "attention.value",
            "bm1": "attention.dense",
            "bLN1": "attention.LayerNorm",
            "bm2": "ffn",
            "bm3": "ffn_output",
            "bLN2": "full_layer_layer_norm",
        },
    ),
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
        where = getattr(getattr(model, "config", None), "name_or_path", "")
        raise BitFitError(
            f"{type(model).__name__}{f' ({where})' if where else ''} has no bias terms (built without biases, like "
            "ModernBERT): BitFit trains only biases, so it cannot fine-tune this model; pick an encoder with biases "
            "(BERT, RoBERTa, DistilBERT, "
            "MPNet, ELECTRA, XLM-RoBERTa, ALBERT, DeBERTa-v2)"
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
    for i, (prefix, layer) in enumerate(_layers(model, layout.layers)):
        for kind in LAYER_KINDS:
            if kind in kinds:
                path = layout.modules[kind]
                module = _module(layer, path, kind)
                slots.append(BiasSlot(f"layer.{i}.{kind}", kind, i, f"{prefix}.{path}.bias", module))
    return slots


def _layers(model: nn.Module, pattern: str) -> list[tuple[str, nn.Module]]:
    """(path, module) of every distinct layer: the items of the ModuleList at `pattern`, `*` expanded."""
    found: list[tuple[str, nn.Module]] = [("", model)]
    for part in [*pattern.split("."), "*"]:
        step = []
        for path, module in found:
            if part != "*":
                step.append((f"{path}.{part}".lstrip("."), _submodule(module, part, pattern, model)))
            elif isinstance(module, nn.ModuleList):
                step.extend((f"{path}.{j}", item) for j, item in enumerate(module))
            else:
                raise BitFitError(f"{path} in {type(model).__name__} is not a list of layers: unsupported layout")
        found = step
    return found


def _submodule(module: nn.Module, name: str, pattern: str, model: nn.Module) -> nn.Module:
    child = getattr(module, name, None)
    if not isinstance(child, nn.Module):
        raise BitFitError(f"{type(model).__name__} has no layers at {pattern!r}: unsupported model variant")
    return child


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
