"""The methods of the paper's Table 3, as parameter selections for training.train(select=...).

Research only: none of these except the bias subsets makes a task pack, and nothing here is used by
the deployment path.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from bitfit.encoder.biases import find_biases
from bitfit.encoder.model import BitFitModel
from bitfit.training.train import Selection

BIAS_METHODS = {"bitfit": "all", "bq,bm2": "bq,bm2", "bm2": "bm2", "bq": "bq", "bitfit_constlr": "all"}
# the paper's Table 3 methods, then two controls closer to the authors' code: BitFit at a constant LR, and
# random rows/columns as their code picks them (LayerNorm gains trained too)
METHODS = ("full", "bitfit", "bq,bm2", "bm2", "bq", "frozen", "rand_uniform", "rand_row_col")
CONTROLS = ("bitfit_constlr", "rand_row_col_authors")
# what users pick instead of BitFit (issue 16), trained with PEFT: LoRA on query and value (PEFT's default
# targets for BERT) at rank 3, whose 27,648 trainable entries on MiniLM-L6 match BitFit's 25,728 biases
# (2 x 6 layers x 3 x (384 + 384)), and at the usual rank 8. alpha = 2r (scaling 2, as r=8/alpha=16).
# A bottleneck adapter would come from AdapterHub's `adapters`, whose 1.3.0 pins transformers ~=4.57.6
# against our 5.x: it does not install beside this toolkit, so no adapter row.
LORA_METHODS = {"lora_matched": 3, "lora_r8": 8}
LORA_TARGETS = ("query", "value")


def _encoder_weights(net: BitFitModel) -> list[torch.nn.Parameter]:
    """The encoder's parameters a random method may pick from: all but the biases (and any pooler)."""
    biases = {id(s.parameter) for s in find_biases(net.encoder, "all")}
    return [p for n, p in net.encoder.named_parameters() if id(p) not in biases and not n.startswith("pooler.")]


def bias_count(net: BitFitModel) -> int:
    return sum(s.parameter.numel() for s in find_biases(net.encoder, "all"))


def rand_uniform(seed: int) -> Callable[[BitFitModel], Selection]:
    """As many encoder weights as BitFit trains biases, drawn uniformly over all weight entries."""

    def select(net: BitFitModel) -> Selection:
        params = _encoder_weights(net)
        sizes = np.array([p.numel() for p in params])
        picks = np.random.default_rng(seed).choice(sizes.sum(), size=bias_count(net), replace=False)
        owner = np.searchsorted(np.cumsum(sizes), picks, side="right")
        offsets = picks - np.concatenate([[0], np.cumsum(sizes)[:-1]])[owner]
        chosen, masks = [], {}
        for i in np.unique(owner):
            mask = torch.zeros(params[i].numel())
            mask[torch.from_numpy(offsets[owner == i])] = 1.0
            masks[len(chosen)] = mask.view_as(params[i])
            chosen.append(params[i])
        return Selection(chosen, masks)

    return select


def rand_row_col(seed: int) -> Callable[[BitFitModel], Selection]:
    """Whole random rows or columns of weight matrices, until as many entries as BitFit's biases."""

    def select(net: BitFitModel) -> Selection:
        rng = np.random.default_rng(seed)
        matrices = [p for p in _encoder_weights(net) if p.dim() == 2 and p.shape[0] < 10_000]  # not embeddings
        target, total = bias_count(net), 0
        masks = {i: torch.zeros_like(p, dtype=torch.float32) for i, p in enumerate(matrices)}
        while total < target:
            i = int(rng.integers(len(matrices)))
            axis = int(rng.integers(2))
            k = int(rng.integers(matrices[i].shape[axis]))
            line = masks[i][k] if axis == 0 else masks[i][:, k]
            total += int((line == 0).sum())
            line.fill_(1.0)
        used = [i for i in masks if masks[i].any()]
        return Selection([matrices[i] for i in used], {j: masks[i] for j, i in enumerate(used)})

    return select


def rand_row_col_authors(seed: int) -> Callable[[BitFitModel], Selection]:
    """Random rows/columns as the BitFit authors' code picks them (glue_evaluator.py,
    set_row_and_column_random_mask): in every weight matrix of the encoder's layers, one random column
    (as long as that layer's bias) or, on a coin flip when the matrix has at least as many rows as columns,
    rows/cols random rows (drawn with replacement) -- about the bias's count per matrix -- plus every
    LayerNorm gain of the layers, whole."""

    def select(net: BitFitModel) -> Selection:
        rng = np.random.default_rng(seed)
        chosen, masks = [], {}
        for name, p in net.encoder.named_parameters():
            if not name.startswith(LAYER_PREFIXES) or not name.endswith("weight"):
                continue
            if p.dim() == 1:  # a LayerNorm gain: trained whole
                chosen.append(p)
                continue
            mask = torch.zeros_like(p, dtype=torch.float32)
            rows, cols = p.shape
            if rng.integers(2) or rows < cols:
                mask[:, int(rng.integers(cols))] = 1.0
            else:
                mask[torch.from_numpy(rng.integers(0, rows, rows // cols))] = 1.0
            masks[len(chosen)] = mask
            chosen.append(p)
        return Selection(chosen, masks)

    return select


# where an encoder keeps its layers (BERT-style and DistilBERT-style encoders)
LAYER_PREFIXES = ("encoder.layer.", "transformer.layer.")


def full(net: BitFitModel) -> Selection:
    return Selection([p for n, p in net.encoder.named_parameters() if not n.startswith("pooler.")])


def frozen(net: BitFitModel) -> Selection:
    return Selection([])


def lora(rank: int) -> Callable[[BitFitModel], Selection]:
    """PEFT's LoRA injected into the encoder in place (B starts at zero, so training starts from the base
    model); only the LoRA matrices and the head train. The injection draws A from torch's generator,
    which training.train has seeded."""

    def select(net: BitFitModel) -> Selection:
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, bias="none",
                            target_modules=list(LORA_TARGETS))
        inject_adapter_in_model(config, net.encoder)
        return Selection([p for n, p in net.encoder.named_parameters() if "lora_" in n])

    return select


def train_kwargs(method: str, seed: int) -> dict:
    """The keyword arguments that make training.train run `method`."""
    if method == "bitfit_constlr":
        return {"biases": "all", "schedule": "constant"}
    if method in BIAS_METHODS:
        return {"biases": BIAS_METHODS[method]}
    selections = {"full": lambda: full, "frozen": lambda: frozen, "rand_uniform": lambda: rand_uniform(seed),
                  "rand_row_col": lambda: rand_row_col(seed), "rand_row_col_authors": lambda: rand_row_col_authors(seed)}
    if method in selections:
        return {"select": selections[method]()}
    if method in LORA_METHODS:
        return {"select": lora(LORA_METHODS[method])}
    raise ValueError(f"unknown method {method!r}: one of {', '.join(METHODS + CONTROLS + tuple(LORA_METHODS))}")
