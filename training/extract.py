"""Task packs out of full fine-tuned HF checkpoints whose only changes are biases and the task head.

The paper's original BitFit code saves the whole *ForSequenceClassification model. Such a checkpoint
becomes a pack only after proving it IS BitFit of the given base: every frozen weight (all encoder
parameters but the selectable biases) must equal the base's, and the model's configuration must
compute the same function. Anything else is refused with the parameters that differ named.

Heads map exactly or are refused:
  BERT / ALBERT *ForSequenceClassification: tanh(pooler(hidden[:, 0])) -> classifier  => pooling "pooler"
  RoBERTa / XLM-R / CamemBERT / MPNet: dense -> tanh -> out_proj on hidden[:, 0] (the same function,
    dropout is identity at inference)                                                 => pooling "pooler"
  *ForTokenClassification: classifier per token                                         => token-classification
  *ForQuestionAnswering: qa_outputs per token (start, end)                              => question-answering
ELECTRA (GELU in its head), DistilBERT (ReLU) and DeBERTa-v2 (GELU context pooler) sequence heads have no
exact counterpart in a pack and are refused.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bitfit.encoder.biases import ALL_KINDS, find_biases, parse_subset
from bitfit.encoder.model import base_fingerprint, count_parameters, load_encoder, max_positions
from bitfit.runtime.errors import BitFitError, IncompatibleError
from bitfit.runtime.heads import HEAD_BIAS, HEAD_POOLER_BIAS, HEAD_POOLER_WEIGHT, HEAD_WEIGHT
from bitfit.runtime.kinds import KINDS, TaskKind
from bitfit.runtime.pack import PackManifest, TaskPack, TensorSpec, save_pack
from bitfit.runtime.schema import check_task_name
from bitfit.runtime.version import __version__
from torch import nn

_ROBERTA_HEAD = ("classifier.dense", "classifier.out_proj")
# class name -> (pooler module, classifier module); "{p}" is the model's base_model_prefix
SEQUENCE_HEADS: dict[str, tuple[str, str]] = {
    "BertForSequenceClassification": ("{p}.pooler.dense", "classifier"),
    "AlbertForSequenceClassification": ("{p}.pooler", "classifier"),
    "RobertaForSequenceClassification": _ROBERTA_HEAD,
    "XLMRobertaForSequenceClassification": _ROBERTA_HEAD,
    "CamembertForSequenceClassification": _ROBERTA_HEAD,
    "MPNetForSequenceClassification": _ROBERTA_HEAD,
}
UNMAPPABLE_HEADS = {
    "ElectraForSequenceClassification": "its head applies GELU between dense and out_proj (a pack's pooler is tanh)",
    "DistilBertForSequenceClassification": "its head applies ReLU after pre_classifier (a pack's pooler is tanh)",
    "DebertaV2ForSequenceClassification": "its context pooler's activation is not the tanh a pack's pooler applies",
}
TOKEN_HEAD = "classifier"
QA_HEAD = "qa_outputs"
# transformers' per-token heads, by architecture suffix (TaskKind.checkpoint): the output layer's module path
TOKEN_HEADS = {"ForTokenClassification": TOKEN_HEAD, "ForQuestionAnswering": QA_HEAD}
# Configuration keys that do not change what the encoder computes at inference.
_CONFIG_IGNORED = {
    "architectures", "id2label", "label2id", "num_labels", "problem_type", "finetuning_task", "dtype", "torch_dtype",
    "transformers_version", "output_attentions", "output_hidden_states", "return_dict", "use_cache",
    "initializer_range", "tie_word_embeddings", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id",
    "chunk_size_feed_forward", "pooler_hidden_act", "pooler_hidden_size", "pooler_dropout", "pooler_fc_size",
    "pooler_num_attention_heads", "pooler_num_fc_layers", "pooler_size_per_head", "pooler_type", "tokenizer_class",
}


@dataclass(frozen=True)
class WeightDiff:
    name: str
    max_abs: float
    count: int  # elements whose difference exceeds the tolerance
    numel: int


@dataclass
class Extraction:
    """What `pack_from_task_model` found: the pack and the evidence that the checkpoint is BitFit of the base."""

    pack: TaskPack
    changed_kinds: tuple[str, ...]
    max_weight_diff: float  # largest |finetuned - base| over the frozen weights (0.0 when exact)
    notes: list[str] = field(default_factory=list)
    path: Path | None = None


def extract(
    base: str | os.PathLike,
    finetuned: str | os.PathLike,
    out: str | os.PathLike,
    *,
    task: str | None = None,
    biases: str = "changed",
    atol: float = 0.0,
    max_length: int | None = None,
    text_pair: bool | None = None,
    overwrite: bool = False,
) -> Extraction:
    """Prove `finetuned` (a full HF *For* checkpoint) differs from `base` only in biases and head; save a pack."""
    task = check_task_name(task or Path(str(finetuned)).name, fix="name the task with --task")  # before any load
    model = load_task_model(finetuned)
    result = pack_from_task_model(
        model, base, task=task, biases=biases, atol=atol, max_length=max_length,
        text_pair=text_pair, source={"imported_from": _model_id(finetuned), "importer": "extract"},
    )
    result.path = save_pack(result.pack, out, overwrite=overwrite)
    return result


def load_task_model(path: str | os.PathLike) -> nn.Module:
    """The checkpoint's own *For* class, refusing any parameter it would have to initialise at random."""
    import transformers
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise BitFitError(f"cannot read a model config from {path!r} ({e}): give a saved HF checkpoint directory") from e
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None or not _kinds_of(arch):
        raise BitFitError(
            f"{path} is a {arch or 'model without an architectures entry'}, not a *ForSequenceClassification, "
            "*ForTokenClassification or *ForQuestionAnswering checkpoint: a task pack needs the task head"
        )
    model, info = cls.from_pretrained(str(path), output_loading_info=True, attn_implementation="eager")
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise BitFitError(
            f"{path} lacks {_names(missing)}: {arch} would initialise them at random, so the checkpoint does not "
            "define the model; save the complete fine-tuned model (model.save_pretrained)"
        )
    return model.eval()


def pack_from_task_model(
    model: nn.Module,
    base: str | os.PathLike,
    *,
    task: str,
    biases: str = "changed",
    atol: float = 0.0,
    labels: list[str] | None = None,
    max_length: int | None = None,
    text_pair: bool | None = None,
    source: dict[str, Any] | None = None,
) -> Extraction:
    """A pack holding exactly the function of HF task model `model`, whose frozen weights must equal `base`'s.

    atol: allowed |difference| on frozen weights. The default 0 demands bit-equal weights, which is what BitFit
    training leaves (frozen tensors are never written); a checkpoint re-saved in another dtype needs a small
    atol, and its pack then runs the base's weights, not the rounded ones.
    biases: "changed" (default) keeps the bias kinds that differ from the base in any layer -- the smallest pack
    that reproduces the model, which also fits graphs compiled with fewer bias inputs; or a kind list / "all".
    """
    if atol < 0 or not np.isfinite(atol):
        raise BitFitError(f"atol must be a finite number >= 0, got {atol}")
    arch = type(model).__name__
    task_kinds = _kinds_of(arch)  # (not `kinds`: below, that is the bias kinds)
    if not task_kinds:
        raise BitFitError(f"{arch} is not a sequence-classification, token-classification or QA model")
    encoder = load_encoder(base)
    ft_encoder = model.base_model
    prefix = model.base_model_prefix
    _check_config(encoder.config, ft_encoder.config, base)

    pooler_path, head_path, pooling = _head_paths(model, arch, prefix)
    head_tensors = _head_tensors(model, head_path, pooler_path)
    _check_accounted(model, prefix, head_path, pooler_path)

    diffs, max_diff = _frozen_diffs(encoder, ft_encoder, atol)
    if diffs:
        worst = max(diffs, key=lambda d: d.max_abs)
        listing = "; ".join(f"{d.name} differs by up to {d.max_abs:.3g} ({d.count} of {d.numel} values)"
                            for d in sorted(diffs, key=lambda d: -d.max_abs)[:8])
        more = f"; and {len(diffs) - 8} more" if len(diffs) > 8 else ""
        hint = (" (a checkpoint saved in a lower precision than the base? pass --atol with the rounding error)"
                if worst.max_abs < 1e-2 else "")
        raise IncompatibleError(
            f"{len(diffs)} frozen weight tensors differ from {base}: {listing}{more}: this checkpoint is not a "
            f"BitFit checkpoint of {base} (only biases and the task head may change){hint}"
        )

    slots = find_biases(encoder, "all")
    ft_params = dict(ft_encoder.named_parameters())
    values = {s.name: ft_params[s.source].detach().to(torch.float32).cpu().numpy().copy() for s in slots}
    changed = tuple(k for k in ALL_KINDS if any(
        s.kind == k and not torch.equal(ft_params[s.source].detach().to(torch.float32), s.parameter.detach())
        for s in slots))
    if biases == "changed":
        kinds = changed
    else:
        kinds = parse_subset(biases)
        left_out = [k for k in changed if k not in kinds]
        if left_out:
            raise BitFitError(
                f"the checkpoint changed the bias kinds {','.join(left_out)}, which --biases {biases} leaves out: "
                f"the pack would not reproduce the model; use --biases changed (or include {','.join(left_out)})"
            )
    kept = [s for s in slots if s.kind in kinds]

    config = model.config
    task_kind, names = _labels(config, task_kinds, head_tensors[HEAD_WEIGHT].shape[0], labels)
    tensors = {s.name: values[s.name] for s in kept}
    tensors.update(head_tensors)
    tokenizer = _tokenizer_or_none(base)
    base_id = os.path.abspath(base) if Path(str(base)).is_dir() else str(base)
    notes = []
    if max_diff > 0:
        notes.append(f"frozen weights differ from the base by up to {max_diff:.3g} (within atol {atol}); "
                     "the pack runs the base's weights")
    manifest = PackManifest(
        task=task,
        task_kind=task_kind,
        labels=names,
        pooling=pooling,
        max_length=int(max_length or max_positions(encoder, tokenizer)),
        text_pair=bool(KINDS[task_kind].two_texts(False) if text_pair is None else text_pair),
        base_model=base_id,
        base_model_type=encoder.config.model_type,
        base_fingerprint=base_fingerprint(encoder),
        hidden_size=encoder.config.hidden_size,
        tokenizer=base_id,
        bias_subset=list(kinds),
        biases=[TensorSpec(s.name, tuple(s.parameter.shape), "float32", s.kind, s.layer, s.source) for s in kept],
        head=[TensorSpec(k, v.shape) for k, v in head_tensors.items()],
        trainable_params=int(sum(v.size for v in tensors.values())),
        base_params=count_parameters(encoder),
        metrics={**(source or {}), "source_architecture": arch, "changed_bias_kinds": list(changed),
                 "max_frozen_weight_diff": max_diff, "atol": atol},
        tool_version=__version__,
    )
    pack = TaskPack(manifest, tensors)
    pack.validate(f"the pack extracted from {arch}")
    return Extraction(pack, changed, max_diff, notes)


def _kinds_of(arch: str | None) -> list[TaskKind]:
    """The registered kinds a checkpoint of this architecture may hold (by TaskKind.checkpoint; a sequence
    classifier: classification, or regression with one output)."""
    return [k for k in KINDS.values() if arch and k.checkpoint and arch.endswith(k.checkpoint)]


def _head_paths(model: nn.Module, arch: str, prefix: str) -> tuple[str | None, str, str]:
    """(pooler module path or None, output layer path, pack pooling)."""
    for suffix, head in TOKEN_HEADS.items():
        if arch.endswith(suffix):
            return None, head, "none"
    if arch in UNMAPPABLE_HEADS:
        raise BitFitError(
            f"{arch} cannot become a task pack exactly: {UNMAPPABLE_HEADS[arch]}. Supported sequence heads: "
            f"{', '.join(sorted(SEQUENCE_HEADS))}; or retrain with `bitfit train` on this base"
        )
    if arch not in SEQUENCE_HEADS:
        raise BitFitError(f"no known exact mapping of {arch}'s head to a pack; supported: {', '.join(sorted(SEQUENCE_HEADS))}")
    pooler, head = SEQUENCE_HEADS[arch]
    pooler = pooler.format(p=prefix)
    if pooler.startswith(f"{prefix}."):  # a BERT-style pooler: prove it is tanh(dense(hidden[:, 0]))
        parent = model.get_submodule(pooler.rsplit(".", 1)[0])
        activation = getattr(parent, "activation", None) or getattr(parent, "pooler_activation", None)
        if not isinstance(activation, nn.Tanh):
            raise BitFitError(f"{arch}'s pooler activation is {type(activation).__name__}, not tanh: no exact pack head")
    return pooler, head, "pooler"


def _linear(model: nn.Module, path: str) -> nn.Linear:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise BitFitError(f"{type(model).__name__} has no module {path!r}: unexpected model variant") from None
    if not isinstance(module, nn.Linear) or module.bias is None:
        raise BitFitError(f"{path} in {type(model).__name__} is {type(module).__name__}, not a Linear with a bias")
    return module


def _head_tensors(model: nn.Module, head: str, pooler: str | None) -> dict[str, np.ndarray]:
    def arr(t: torch.Tensor) -> np.ndarray:
        return t.detach().to(torch.float32).cpu().numpy().copy()

    out = {}
    if pooler is not None:
        p = _linear(model, pooler)
        out[HEAD_POOLER_WEIGHT], out[HEAD_POOLER_BIAS] = arr(p.weight), arr(p.bias)
    h = _linear(model, head)
    out[HEAD_WEIGHT], out[HEAD_BIAS] = arr(h.weight), arr(h.bias)
    return out


def _check_accounted(model: nn.Module, prefix: str, head: str, pooler: str | None) -> None:
    """Every parameter is the encoder's or the mapped head's: nothing else may shape the logits."""
    mapped = {f"{m}.{n}" for m in (head, pooler) if m for n in ("weight", "bias")}
    stray = [n for n, _ in model.named_parameters() if not n.startswith(f"{prefix}.") and n not in mapped]
    if stray:
        raise BitFitError(
            f"{type(model).__name__} has parameters with no place in a task pack: {_names(sorted(stray))}"
        )


def _frozen_diffs(encoder: nn.Module, ft_encoder: nn.Module, atol: float) -> tuple[list[WeightDiff], float]:
    skip = {s.source for s in find_biases(encoder, "all")}
    base = {n: p for n, p in encoder.named_parameters() if not n.startswith("pooler.")}
    ft = {n: p for n, p in ft_encoder.named_parameters() if not n.startswith("pooler.")}
    if base.keys() != ft.keys():
        only_base, only_ft = sorted(base.keys() - ft.keys()), sorted(ft.keys() - base.keys())
        raise IncompatibleError(
            f"the checkpoint's encoder has other parameters than the base's (only in the base: {_names(only_base)}; "
            f"only in the checkpoint: {_names(only_ft)}): it is not a fine-tune of this base"
        )
    diffs, worst = [], 0.0
    for name in sorted(base):
        if name in skip:
            continue
        a, b = base[name].detach(), ft[name].detach()
        if a.shape != b.shape:
            raise IncompatibleError(f"{name} is {list(b.shape)} in the checkpoint but {list(a.shape)} in the base")
        if a.dtype == b.dtype and torch.equal(a, b):
            continue
        d = (b.to(torch.float64) - a.to(torch.float64)).abs()
        m = float(d.max())
        worst = max(worst, m)
        n = int((d > atol).sum())
        if n:
            diffs.append(WeightDiff(name, m, n, d.numel()))
    return diffs, worst


def _check_config(base_config: Any, ft_config: Any, base: Any) -> None:
    if base_config.model_type != ft_config.model_type:
        raise IncompatibleError(
            f"the checkpoint is a {ft_config.model_type} model but {base} is {base_config.model_type}: "
            "give the base model it was fine-tuned from"
        )
    a, b = base_config.to_dict(), ft_config.to_dict()
    differ = sorted(k for k in a.keys() & b.keys()
                    if not k.startswith("_") and "dropout" not in k and k not in _CONFIG_IGNORED and a[k] != b[k])
    if differ:
        listing = ", ".join(f"{k} {b[k]!r} vs {a[k]!r}" for k in differ[:6])
        raise IncompatibleError(
            f"the checkpoint's config differs from {base}'s where it changes the encoder's computation ({listing}): "
            "the pack would run the base's configuration; give the matching base"
        )


def _labels(config: Any, kinds: list[TaskKind], outputs: int, given: list[str] | None) -> tuple[str, list[str]]:
    """The pack's kind among `kinds` (those of the checkpoint's architecture) and its label names."""
    fixed = next((k for k in kinds if isinstance(k.labels, tuple)), None)
    if fixed is not None:  # labels fixed by the kind (QA: start, end)
        if outputs != len(fixed.labels):
            raise BitFitError(f"a {fixed.name} head has {len(fixed.labels)} outputs ({', '.join(fixed.labels)}), "
                              f"this one has {outputs}")
        return fixed.name, list(fixed.labels)
    problem = getattr(config, "problem_type", None)
    if problem == "multi_label_classification":
        raise BitFitError(
            "the checkpoint is multi-label (independent sigmoids per label); task packs score labels with a "
            "softmax, so its scores would be wrong: not supported"
        )
    value = next((k for k in kinds if k.labels == "value"), None)
    if value is not None and (problem == "regression" or outputs == 1):
        return value.name, []  # as `bitfit train` writes regression packs
    if given is not None:
        names = list(given)
    else:
        id2label = getattr(config, "id2label", None) or {}
        names = [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(outputs)]
    if len(names) != outputs:
        raise BitFitError(f"{len(names)} labels given but the head has {outputs} outputs")
    return next(k for k in kinds if k.labels == "names").name, names


def _tokenizer_or_none(base: Any):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(base))
    except (OSError, ValueError):
        return None


def _model_id(path: Any) -> str:
    return os.path.abspath(path) if Path(str(path)).is_dir() else str(path)


def _names(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "") if names else "none"
