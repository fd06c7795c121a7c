"""Task packs out of bias-only PEFT adapters (saved with `save_pretrained`).

What maps:
  BEFT (peft.tuners.beft)  `<module>.beft_bias` [1, out]: a DELTA added after the Linear, so the pack's bias is
                           base bias + delta (exactly what BEFT's own merge computes).
  LoRA with bias="all" / "lora_only"  `<module>.bias` (or `.base_layer.bias`): the trained bias VALUES. Its
                           lora_A / lora_B matrices map only when every lora_B is zero (B @ A then changes
                           no weight); trained LoRA matrices change weights and are refused.
  modules_to_save          the task head (classifier, classifier.dense/out_proj, qa_outputs, pooler).
Anything else -- other PEFT methods, LoRA matrices with a non-zero B, DoRA magnitudes, saved non-bias
weights -- is refused with the tensors named. The adapter is applied to the base's HF task model as PEFT's
merge would (peft itself is not needed), then `pack_from_task_model` proves the result changed nothing but
biases and head, exactly as for `bitfit extract`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bitfit.runtime.errors import BitFitError

from .extract import Extraction, _model_id, _names, pack_from_task_model

SUPPORTED = ("BEFT", "LORA")
ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
_TASK_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}
# Where each task type's output layer sits (RoBERTa-style heads first: their `classifier` is a module).
_HEAD_WEIGHTS = {
    "SEQ_CLS": ("classifier.out_proj.weight", "classifier.weight", "score.weight"),
    "TOKEN_CLS": ("classifier.weight",),
    "QUESTION_ANS": ("qa_outputs.weight",),
}


def import_peft(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    task: str | None = None,
    labels: list[str] | None = None,
    biases: str = "changed",
    max_length: int | None = None,
    text_pair: bool | None = None,
    overwrite: bool = False,
) -> Extraction:
    """Map a bias-only PEFT adapter on `base` to a task pack at `out` (refusing what does not map exactly)."""
    from bitfit.runtime.pack import save_pack
    from bitfit.runtime.schema import check_task_name

    task = check_task_name(task or Path(str(adapter)).name, fix="name the task with --task")  # before any load
    model, config = merged_task_model(base, adapter, labels=labels)
    result = pack_from_task_model(
        model, base, task=task, biases=biases, max_length=max_length, text_pair=text_pair,
        source={"imported_from": _model_id(adapter), "importer": "peft", "peft_type": config["peft_type"]},
    )
    result.path = save_pack(result.pack, out, overwrite=overwrite)
    return result


def read_adapter(adapter: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(adapter_config.json, tensors by name without PEFT's `base_model.model.` prefix)."""
    root = Path(adapter)
    try:
        config = json.loads((root / ADAPTER_CONFIG).read_text())
    except FileNotFoundError:
        raise BitFitError(f"{root} has no {ADAPTER_CONFIG}: give a directory written by PeftModel.save_pretrained") from None
    except json.JSONDecodeError as e:
        raise BitFitError(f"{root / ADAPTER_CONFIG} is not valid JSON ({e})") from e
    st, binary = root / "adapter_model.safetensors", root / "adapter_model.bin"
    if st.is_file():
        from safetensors.torch import load_file

        tensors = load_file(str(st))
    elif binary.is_file():
        import torch

        tensors = torch.load(str(binary), map_location="cpu", weights_only=True)
    else:
        raise BitFitError(f"{root} has no adapter_model.safetensors (or .bin): the adapter is incomplete")
    return config, {k.removeprefix(_PREFIX): v for k, v in tensors.items()}


def check_adapter(config: dict[str, Any], tensors: dict[str, Any], where: str) -> None:
    """Refuse an adapter that carries anything but biases, a head and all-zero LoRA updates."""
    peft_type = str(config.get("peft_type", "?")).upper()
    if peft_type not in SUPPORTED:
        raise BitFitError(
            f"{where} is a {peft_type} adapter: only bias-only adapters map to a task pack (BEFT, or LoRA with "
            "bias='all' whose LoRA matrices are untrained); retrain with `bitfit train`"
        )
    task_type = config.get("task_type")
    if task_type not in _TASK_CLASSES:
        raise BitFitError(
            f"{where} has task_type {task_type!r}: a task pack needs a task head; supported are "
            f"{', '.join(_TASK_CLASSES)} (save the adapter of a *ForSequenceClassification, ... model)"
        )
    head_modules = _head_modules(config)
    refused: list[str] = []
    for name, t in sorted(tensors.items()):
        if name.endswith(".beft_bias") or (name.endswith(".bias") and ".lora_" not in name):
            continue
        if any(name.startswith(f"{m}.") for m in head_modules):
            continue
        if ".lora_B." in name or ".lora_embedding_B" in name:
            if bool((t != 0).any()):
                refused.append(f"{name} (a trained LoRA matrix: it changes the weight of {name.split('.lora_')[0]})")
            continue
        if ".lora_A." in name or ".lora_embedding_A" in name:
            continue  # harmless when its B is zero, which the B check above decides
        refused.append(f"{name} ({'a LoRA tensor' if '.lora_' in name else 'not a bias'})")
    if refused:
        raise BitFitError(
            f"{where} carries tensors that are not biases or the task head, so it is not bias-only and does not "
            f"map to a task pack: {_names(refused, 8)}"
        )


def merged_task_model(
    base: str | os.PathLike, adapter: str | os.PathLike, *, labels: list[str] | None = None
) -> tuple[Any, dict[str, Any]]:
    """(the base's HF task model with the adapter's biases and head applied, the adapter's config)."""
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    config, tensors = read_adapter(adapter)
    check_adapter(config, tensors, str(adapter))
    task_type = config["task_type"]
    plain = _normalised(tensors)
    head = next((k for k in _HEAD_WEIGHTS[task_type] if k in plain), None)
    if head is None:
        raise BitFitError(
            f"{adapter} carries no trained task head ({' or '.join(_HEAD_WEIGHTS[task_type])}): the base's head "
            "would be random; save the adapter with modules_to_save=[the head] (PEFT does so for task_type "
            f"{task_type})"
        )
    outputs = int(plain[head].shape[0])
    names = list(labels) if labels else _labels_near(adapter, base, outputs)
    kwargs: dict[str, Any] = {"num_labels": outputs}
    if names and len(names) == outputs:
        kwargs.update(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    cls = getattr(transformers, _TASK_CLASSES[task_type])
    try:
        model, info = cls.from_pretrained(str(base), output_loading_info=True, attn_implementation="eager", **kwargs)
    except (OSError, ValueError) as e:
        raise BitFitError(f"cannot load {base!r} as a {task_type} model ({e})") from e
    applied = _apply(model, tensors, str(adapter), str(base))
    random_init = sorted(set(info.get("missing_keys") or []) - applied)
    if random_init:
        raise BitFitError(
            f"{_names(random_init)} are in neither {base} nor the adapter {adapter}: they would be random; save "
            "them with the adapter (modules_to_save) or give the base checkpoint that has them"
        )
    return model.eval(), config


def _apply(model: Any, tensors: dict[str, Any], adapter: str, base: str) -> set[str]:
    """Apply the adapter as PEFT's merge does: beft_bias is added to its Linear's bias, saved biases and head
    tensors replace the model's. Returns the parameter names written. (PEFT's own merge_and_unload is not
    used: it fails on RoBERTa-style heads when a target name such as "dense" also names a head layer.)"""
    import torch

    params = dict(model.named_parameters())
    plan: dict[str, tuple[str, Any]] = {}
    unmatched, conflicts = [], []
    for key, t in sorted(tensors.items()):
        if ".lora_" in key or ".original_module." in key:
            continue  # zero LoRA updates (check_adapter proved it) and PEFT's frozen copy of a saved head
        name = key.replace(".modules_to_save.", ".").replace(".base_layer.", ".")
        op = "add" if name.endswith(".beft_bias") else "set"
        target = name.removesuffix(".beft_bias") + ".bias" if op == "add" else name
        p = params.get(target)
        if p is None or p.numel() != t.numel():
            unmatched.append(key)
            continue
        if target in plan and (plan[target][0] != op or not torch.equal(plan[target][1].reshape(-1), t.reshape(-1))):
            conflicts.append(target)
        plan[target] = (op, t)
    if unmatched:
        raise BitFitError(
            f"the adapter's tensors {_names(unmatched)} match no parameter of {base}'s task model (or not its "
            "size): give the base model the adapter was trained on"
        )
    if conflicts:
        raise BitFitError(f"{adapter} holds two different values for {_names(conflicts)}: the adapter is inconsistent")
    with torch.no_grad():
        for target, (op, t) in plan.items():
            p = params[target]
            value = t.reshape(p.shape).to(p.dtype)
            p.add_(value) if op == "add" else p.copy_(value)
    return set(plan)


def _head_modules(config: dict[str, Any]) -> list[str]:
    return [*(config.get("modules_to_save") or []), "classifier", "score", "qa_outputs"]


def _normalised(tensors: dict[str, Any]) -> dict[str, Any]:
    """modules_to_save keys as the plain model names them (PEFT's copies dropped)."""
    out = {}
    for k, v in tensors.items():
        if ".original_module." in k:
            continue
        out[k.replace(".modules_to_save.", ".").replace(".base_layer.", ".")] = v
    return out


def _labels_near(adapter: Any, base: Any, outputs: int) -> list[str] | None:
    """Label names from a config.json saved beside the adapter, else the base's, when the count matches."""
    for root in (Path(str(adapter)), Path(str(base))):
        try:
            id2label = json.loads((root / "config.json").read_text()).get("id2label") or {}
        except (OSError, json.JSONDecodeError):
            continue
        if len(id2label) == outputs:
            return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(outputs)]
    return None
