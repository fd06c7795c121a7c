"""The torch side: a frozen encoder, a small task head, the base fingerprint, packs in and out."""
from __future__ import annotations

import hashlib
import os
import numpy as np
import torch
from torch import nn

from runtime.errors import BitFitError, IncompatibleError
from runtime.pack import HEAD_BIAS, HEAD_WEIGHT, TaskPack

from .biases import all_bias_sources, find_biases


def load_encoder(model: str | os.PathLike, *, attn_implementation: str | None = None) -> nn.Module:
    """An HF encoder by id or local path, without its pooler (our head pools the hidden states)."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the load report lists the pooler we leave out on purpose
    hf_logging.disable_progress_bar()
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    try:
        try:
            encoder = AutoModel.from_pretrained(str(model), add_pooling_layer=False, **kwargs)
        except TypeError:  # models without a pooler do not take the argument
            encoder = AutoModel.from_pretrained(str(model), **kwargs)
    except OSError as e:
        raise BitFitError(
            f"cannot load model {model!r} ({e}): give a local directory or an HF id reachable from here"
        ) from e
    return encoder.eval()


def load_tokenizer(model: str | os.PathLike):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model))
    except (OSError, ValueError) as e:
        raise BitFitError(f"cannot load a tokenizer for {model!r} ({e}): the model directory needs one") from e
    if not getattr(tok, "is_fast", False):
        raise BitFitError(f"{model!r} has no fast tokenizer (tokenizer.json): the runtime needs one")
    return tok


def base_fingerprint(encoder: nn.Module) -> str:
    """sha256 over every frozen weight: all parameters except the selectable biases and any pooler.

    The same base gives the same fingerprint whatever bias subset a pack trained, so a pack fits any graph
    compiled from that base.
    """
    skip = all_bias_sources(encoder)
    h = hashlib.sha256()
    for name, p in sorted(encoder.named_parameters()):
        if name in skip or name.startswith("pooler."):
            continue
        t = p.detach().to(torch.float32).contiguous().cpu().numpy()
        h.update(name.encode())
        h.update(str(t.shape).encode())
        h.update(t.tobytes())
    return h.hexdigest()


def count_parameters(encoder: nn.Module) -> int:
    return sum(p.numel() for n, p in encoder.named_parameters() if not n.startswith("pooler."))


def uses_token_types(encoder: nn.Module) -> bool:
    """Whether the encoder reads token_type_ids (BERT, ELECTRA; not DistilBERT, MPNet, RoBERTa-style)."""
    emb = getattr(getattr(encoder, "embeddings", None), "token_type_embeddings", None)
    return emb is not None and emb.num_embeddings > 1


# Models whose position ids start after the padding index (RoBERTa-style) have fewer usable positions.
_PADDING_OFFSET_TYPES = {"roberta", "xlm-roberta", "camembert", "mpnet"}


def max_positions(encoder: nn.Module, tokenizer=None) -> int:
    """How many tokens one sequence may have: position embeddings, less the RoBERTa-style offset."""
    config = encoder.config
    n = int(config.max_position_embeddings)
    if config.model_type in _PADDING_OFFSET_TYPES:
        n -= int(config.pad_token_id) + 1
    limit = getattr(tokenizer, "model_max_length", None)
    return min(n, int(limit)) if isinstance(limit, int) and limit > 0 else n


class BitFitModel(nn.Module):
    """Encoder -> pooling (mean over the mask, or the first token) -> dropout -> linear head."""

    def __init__(self, encoder: nn.Module, num_outputs: int, pooling: str = "mean", dropout: float | None = None):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        hidden = encoder.config.hidden_size
        p = dropout if dropout is not None else getattr(encoder.config, "hidden_dropout_prob", 0.1)
        self.dropout = nn.Dropout(p)
        self.head = nn.Linear(hidden, num_outputs)
        self.token_types = uses_token_types(encoder)

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.token_types and token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.encoder(**kwargs).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(self.dropout(pooled))


def model_from_pack(pack: TaskPack, base: str | os.PathLike | None = None, encoder: nn.Module | None = None) -> BitFitModel:
    """A torch model of the base encoder with the pack's biases and head loaded (strict)."""
    m = pack.manifest
    if encoder is None:
        encoder = load_encoder(base or m.base_model)
    fp = base_fingerprint(encoder)
    if fp != m.base_fingerprint:
        raise IncompatibleError(
            f"task pack {m.task!r} was trained on a base with fingerprint {m.base_fingerprint[:12]} ({m.base_model!r}) "
            f"but {base or m.base_model!r} has {fp[:12]}: load the base model the pack was trained on"
        )
    model = BitFitModel(encoder, m.num_outputs, m.pooling).eval()
    slots = {s.name: s for s in find_biases(encoder, "all")}
    with torch.no_grad():
        for spec in m.biases:
            slot = slots.get(spec.name)
            if slot is None or tuple(slot.parameter.shape) != spec.shape:
                raise IncompatibleError(f"task pack {m.task!r}: the model has no bias {spec.name} of shape {spec.shape}")
            slot.parameter.copy_(torch.from_numpy(np.asarray(pack.tensors[spec.name])))
        model.head.weight.copy_(torch.from_numpy(pack.tensors[HEAD_WEIGHT]))
        model.head.bias.copy_(torch.from_numpy(pack.tensors[HEAD_BIAS]))
    return model
