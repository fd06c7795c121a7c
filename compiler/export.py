"""Export a frozen encoder to ONNX with its biases as graph inputs: the torch side of compiling.

torch's legacy (TorchScript) exporter with a wrapper whose forward takes the biases as inputs and puts them
into the modules for the duration of the call: measured here, this gives one cleanly named input per bias
and the fastest graph (see shared ONNX-NOTES). Biases exported as inputs cannot be merged with equal-valued
initializers, which the exporters otherwise do.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import torch
from bitfit.encoder.biases import BiasSlot
from bitfit.runtime import compiled as cm
from bitfit.runtime.errors import BitFitError
from torch import nn


class BiasInputWrapper(nn.Module):
    """forward(input_ids, attention_mask, [token_type_ids], *biases) -> last_hidden_state."""

    def __init__(self, encoder: nn.Module, slots: list[BiasSlot], token_inputs: list[str]):
        super().__init__()
        self.encoder = encoder
        self.slots = slots
        self.token_inputs = token_inputs

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        tokens = dict(zip(self.token_inputs, args))
        biases = args[len(self.token_inputs) :]
        saved = [s.module._parameters["bias"] for s in self.slots]
        try:
            for s, b in zip(self.slots, biases):
                s.module._parameters["bias"] = b
            # keyword arguments: transformers 5 models fail positional calls under the legacy exporter
            return self.encoder(**tokens).last_hidden_state
        finally:
            for s, p in zip(self.slots, saved):
                s.module._parameters["bias"] = p


class BiasTableWrapper(BiasInputWrapper):
    """forward(input_ids, attention_mask, [token_type_ids], task_ids, *tables) -> last_hidden_state.

    For mixed-task batches: row i adds tables[k][task_ids[i]] wherever the model adds bias k. Each chosen
    module runs without its bias and a forward hook adds the gathered row, broadcast over the sequence;
    that works the same for Linear and LayerNorm, whose bias is added last in both.
    """

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        n = len(self.token_inputs)
        tokens = dict(zip(self.token_inputs, args[:n]))
        task_ids, tables = args[n], args[n + 1 :]
        saved = [s.module._parameters["bias"] for s in self.slots]
        hooks = []
        try:
            for s, table in zip(self.slots, tables):
                s.module._parameters["bias"] = None
                rows = table[task_ids].unsqueeze(1)  # [batch, 1, dim]
                hooks.append(s.module.register_forward_hook(_add_rows(s, rows)))
            return self.encoder(**tokens).last_hidden_state
        finally:
            for h in hooks:
                h.remove()
            for s, p in zip(self.slots, saved):
                s.module._parameters["bias"] = p


def _add_rows(slot: BiasSlot, rows: torch.Tensor) -> Callable:
    """The forward hook that adds each row's bias, for a module that only ever sees [batch, sequence, dim].

    DeBERTa-v2 also runs its query and key projections on the relative-position embeddings, one tensor shared
    by every row; a per-row bias cannot go there, and broadcasting it would silently compute something else.
    """

    def hook(_module: nn.Module, _inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        if out.dim() != 3 or out.shape[0] != rows.shape[0]:
            raise BitFitError(
                f"--mixed cannot compile the bias {slot.name}: the model also applies {slot.source} to a tensor "
                f"of shape {tuple(int(d) for d in out.shape)} shared by all rows of a batch (as DeBERTa-v2 does "
                f"to its relative positions), which a per-row bias table cannot express; compile without --mixed, "
                f"or with --biases leaving out {slot.kind}"
            )
        return out + rows

    return hook


def export_onnx(
    encoder: nn.Module, slots: list[BiasSlot], token_inputs: list[str], path: Path, opset: int, *, mixed: bool = False
) -> None:
    """mixed=False: one 1-D input per bias. mixed=True: a [tasks, dim] table per bias plus task_ids [batch]."""
    wrapper = (BiasTableWrapper if mixed else BiasInputWrapper)(encoder, slots, token_inputs).eval()
    # Export on a batch of 2 x 7 (and check dynamic axes afterwards): shapes of 1 get specialised away.
    ids = torch.randint(5, 50, (2, 7))
    example = {
        "input_ids": ids,
        "attention_mask": torch.tensor([[1] * 7, [1] * 5 + [0] * 2]),
        "token_type_ids": torch.zeros_like(ids),
    }
    dynamic = {n: {0: "batch", 1: "sequence"} for n in token_inputs}
    dynamic[cm.OUTPUT_NAME] = {0: "batch", 1: "sequence"}
    if mixed:  # 3 tasks and ids [0, 2]: a table of 1 row or equal ids would get specialised away
        tables = tuple(s.parameter.detach().clone().expand(3, -1).contiguous() for s in slots)
        args = tuple(example[n] for n in token_inputs) + (torch.tensor([0, 2]),) + tables
        names = [*token_inputs, cm.TASK_IDS, *(s.name for s in slots)]
        dynamic[cm.TASK_IDS] = {0: "batch"}
        dynamic.update({s.name: {0: "tasks"} for s in slots})
    else:
        args = tuple(example[n] for n in token_inputs) + tuple(s.parameter.detach().clone() for s in slots)
        names = [*token_inputs, *(s.name for s in slots)]
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about Python-side shape checks in transformers' masking code; the dynamic axes
        # are checked by a pass and by parity tests on other shapes instead.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*aten::index.*")
        # DeBERTa-v2's attention scale is torch.tensor(size): traced to a constant, as it should be
        warnings.filterwarnings("ignore", message="To copy construct from a tensor")
        torch.onnx.export(
            wrapper,
            args,
            str(path),
            input_names=names,
            output_names=[cm.OUTPUT_NAME],
            dynamic_axes=dynamic,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
