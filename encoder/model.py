"""The torch side: a frozen encoder, a small task head, the base fingerprint, packs in and out."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import torch
from bitfit.runtime.errors import BitFitError, IncompatibleError
from bitfit.runtime.heads import (
    HEAD_BIAS,
    HEAD_POOLER_BIAS,
    HEAD_POOLER_WEIGHT,
    HEAD_WEIGHT,
    POOLINGS,
)
from bitfit.runtime.pack import TaskPack
from safetensors import SafetensorError
from torch import nn

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
    except SafetensorError as e:  # random bytes or a truncated file where model.safetensors should be
        raise BitFitError(
            f"cannot load model {model!r}: its model.safetensors is damaged ({e}); re-download or re-save the model"
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


def type_vocab_size(encoder: nn.Module) -> int:
    """Rows of the token type embedding the graph reads (0: it takes no token_type_ids)."""
    return int(encoder.embeddings.token_type_embeddings.num_embeddings) if uses_token_types(encoder) else 0


def uses_token_types(encoder: nn.Module) -> bool:
    """Whether the encoder reads token_type_ids (BERT, ELECTRA, ALBERT; not DistilBERT, MPNet, RoBERTa-style,
    DeBERTa-v3, whose type_vocab_size is 0 or 1)."""
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


def load_pooler(model: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """The trained BERT pooler (dense + tanh on the first token) of a checkpoint, as (weight [H, H], bias [H]).

    Only a pooler whose weights the checkpoint holds is returned: a randomly initialised one would make
    pooling "pooler" a silent random projection.
    """
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        full, info = AutoModel.from_pretrained(str(model), output_loading_info=True)
    except OSError as e:
        raise BitFitError(
            f"cannot load model {model!r} ({e}): give a local directory or an HF id reachable from here"
        ) from e
    dense = getattr(getattr(full, "pooler", None), "dense", None)
    activation = getattr(getattr(full, "pooler", None), "activation", None)
    if not isinstance(dense, nn.Linear) or not isinstance(activation, nn.Tanh):
        raise BitFitError(
            f"{model!r} ({full.config.model_type}) has no BERT-style pooler (dense + tanh): use pooling mean or cls"
        )
    missing = [k for k in info.get("missing_keys", []) if k.startswith("pooler.")]
    if missing:
        raise BitFitError(
            f"the checkpoint {model!r} holds no pooler weights (missing {', '.join(sorted(missing))}): pooling "
            "'pooler' would be a random projection; use pooling mean or cls"
        )
    return dense.weight.detach().clone(), dense.bias.detach().clone()


class BitFitModel(nn.Module):
    """Encoder -> pooling -> dropout -> linear head; or, with pooling "none" (token-level tasks), the linear
    head on every token's hidden state.

    Poolings: mean over the mask, cls (the first token), or pooler: tanh(Linear(H, H)) on the first token,
    the BERT pooler of HF *ForSequenceClassification models, given as `pooler` = (weight, bias) and frozen
    (set `model.pooler.requires_grad_(True)` to train it).
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_outputs: int,
        pooling: str = "mean",
        dropout: float | None = None,
        pooler: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise BitFitError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.encoder = encoder
        self.pooling = pooling
        hidden = encoder.config.hidden_size
        p = dropout if dropout is not None else getattr(encoder.config, "hidden_dropout_prob", 0.1)
        self.dropout = nn.Dropout(p)
        self.head = nn.Linear(hidden, num_outputs)
        self.pooler: nn.Linear | None = None
        if pooling == "pooler":
            if pooler is None:
                raise BitFitError("pooling 'pooler' needs the pooler's weights: pass pooler=(weight, bias)")
            weight, bias = (torch.as_tensor(np.asarray(t)) if not isinstance(t, torch.Tensor) else t for t in pooler)
            if tuple(weight.shape) != (hidden, hidden) or tuple(bias.shape) != (hidden,):
                raise BitFitError(
                    f"the pooler has shapes {tuple(weight.shape)} and {tuple(bias.shape)}, the encoder's hidden "
                    f"size {hidden} needs ({hidden}, {hidden}) and ({hidden},)"
                )
            self.pooler = nn.Linear(hidden, hidden)
            with torch.no_grad():
                self.pooler.weight.copy_(weight)
                self.pooler.bias.copy_(bias)
            self.pooler.requires_grad_(False)
        self.token_types = uses_token_types(encoder)

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """Logits [B, K] (sequence kinds) or [B, T, K] (pooling "none")."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.token_types and token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.encoder(**kwargs).last_hidden_state
        return self.head(self.dropout(self.pool(hidden, attention_mask)))

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "none":
            return hidden
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "pooler":
            return torch.tanh(self.pooler(hidden[:, 0]))
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def head_tensors(self) -> dict[str, np.ndarray]:
        """The head as a pack stores it (float32 numpy), the pooler included when there is one."""
        out = {HEAD_WEIGHT: self.head.weight, HEAD_BIAS: self.head.bias}
        if self.pooler is not None:
            out |= {HEAD_POOLER_WEIGHT: self.pooler.weight, HEAD_POOLER_BIAS: self.pooler.bias}
        return {k: v.detach().float().cpu().numpy().copy() for k, v in out.items()}


def attach_head(encoder: nn.Module, pack: TaskPack) -> BitFitModel:
    """A BitFitModel of `encoder` (as it is: its biases are not touched) with the pack's head, in eval mode."""
    m, t = pack.manifest, pack.tensors
    pooler = (t[HEAD_POOLER_WEIGHT], t[HEAD_POOLER_BIAS]) if m.pooling == "pooler" else None
    model = BitFitModel(encoder, m.num_outputs, m.pooling, pooler=pooler).eval()
    with torch.no_grad():
        model.head.weight.copy_(torch.from_numpy(np.asarray(t[HEAD_WEIGHT])))
        model.head.bias.copy_(torch.from_numpy(np.asarray(t[HEAD_BIAS])))
    return model


def model_from_pack(pack: TaskPack, base: str | os.PathLike | None = None, encoder: nn.Module | None = None) -> BitFitModel:
    """A torch model of the base encoder with the pack's biases and head loaded (strict)."""
    m = pack.manifest
    if encoder is None:
        encoder = load_encoder(base or m.base_model_source())
    fp = base_fingerprint(encoder)
    if fp != m.base_fingerprint:
        raise IncompatibleError(
            f"task pack {m.task!r} was trained on a base with fingerprint {m.base_fingerprint[:12]} ({m.base_model!r}) "
            f"but {base or m.base_model!r} has {fp[:12]}: load the base model the pack was trained on"
        )
    model = attach_head(encoder, pack)
    slots = {s.name: s for s in find_biases(encoder, "all")}
    with torch.no_grad():
        for spec in m.biases:
            slot = slots.get(spec.name)
            if slot is None or tuple(slot.parameter.shape) != spec.shape:
                raise IncompatibleError(f"task pack {m.task!r}: the model has no bias {spec.name} of shape {spec.shape}")
            slot.parameter.copy_(torch.from_numpy(np.asarray(pack.tensors[spec.name])))
    return model
