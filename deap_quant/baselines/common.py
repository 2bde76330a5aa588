"""What every rounding baseline needs: grid positions, float weights, and states written temporarily.

A weight's *grid position* is its continuous place on its layer's grid, ``base state +
residual`` (kept by :class:`~deap_quant.quantization.QuantizedModel`), so a baseline can round
afresh without the float model, and the result does not depend on the current base (a model
rebased to AdaRound still knows where nearest rounding lies). A rounding is a list of integer
state tensors, one per quantized layer, shaped like the weights: what
:meth:`QuantizedModel.rebase_` takes.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..quantization.activations import remove_input_quantizers
from ..quantization.grids import CodebookGrid
from ..quantization.model import QuantizedModel

__all__ = ["Rounding", "grid_position", "grid_positions", "float_weights", "float_module", "temporarily_rounded",
           "changed_weights", "states_to_genes"]


@dataclass
class Rounding:
    """A baseline's result: integer states per layer, plus how they were found."""

    name: str
    states: list[torch.Tensor]
    seconds: float = 0.0
    evaluations: int = 0
    details: dict[str, Any] = field(default_factory=dict)


def grid_position(qmodel: QuantizedModel, layer: int) -> torch.Tensor:
    """Every weight's continuous grid position in ``layer`` (``base + residual``), shaped like the weight."""
    residual = torch.from_numpy(qmodel.residuals()[layer].copy()).reshape(qmodel.layers[layer].shape)
    return qmodel.base_states(layer).to(torch.float32) + residual


def grid_positions(qmodel: QuantizedModel) -> list[torch.Tensor]:
    """:func:`grid_position` of every quantized layer."""
    return [grid_position(qmodel, layer) for layer in range(len(qmodel.layers))]


def float_weights(qmodel: QuantizedModel, layer: int) -> torch.Tensor:
    """The float weights of ``layer`` recovered from the grid positions (exact up to float rounding)."""
    position = grid_position(qmodel, layer)
    grid = qmodel.grids[layer]
    if isinstance(grid, CodebookGrid):
        lower = position.floor().clamp(0, grid.n_levels - 2)
        fraction = position - lower
        low = grid.dequantize(lower.to(torch.uint8))
        high = grid.dequantize((lower + 1).to(torch.uint8))
        return low + fraction * (high - low)
    shape = grid.layout.broadcast_shape()
    return (position - grid.zero_point.view(shape)) * grid.scale.view(shape)


def float_module(qmodel: QuantizedModel, input_quantizers: bool = False) -> nn.Module:
    """A copy of ``qmodel``'s module with the float weights put back (for AdaRound's targets).

    Its activations are in floating point too, unless ``input_quantizers`` keeps the quantized
    layers' input quantizers (``act_bits``) on it.
    """
    module = copy.deepcopy(qmodel.module).eval()
    if not input_quantizers:
        remove_input_quantizers(module)
    modules = dict(module.named_modules())
    with torch.no_grad():
        for layer, info in enumerate(qmodel.layers):
            modules[info.name].weight.data.copy_(float_weights(qmodel, layer))
    return module


def _check_states(qmodel: QuantizedModel, states: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if len(states) != len(qmodel.layers):
        raise ValueError(f"got {len(states)} state tensors; the model has {len(qmodel.layers)} quantized layers")
    checked = []
    for layer, (info, state) in enumerate(zip(qmodel.layers, states)):
        state = torch.as_tensor(state)
        if state.numel() != info.numel:
            raise ValueError(f"states for layer {layer} ({info.name}) have {state.numel()} entries; "
                             f"the layer has {info.numel} weights")
        if int(state.min()) < 0 or int(state.max()) >= info.n_levels:
            raise ValueError(f"states for layer {layer} ({info.name}) must lie in 0..{info.n_levels - 1}")
        checked.append(state.reshape(info.shape))
    return checked


@contextlib.contextmanager
def temporarily_rounded(qmodel: QuantizedModel, states: Sequence[torch.Tensor]) -> Iterator[QuantizedModel]:
    """``with temporarily_rounded(qmodel, states): ...`` -- the module holds ``states``' weights inside.

    The base, residuals and genes are untouched; the previous weights come back bit-for-bit on
    exit, also when the body raises. Evaluate with an evaluator and no genes inside.
    """
    states = _check_states(qmodel, states)
    modules = dict(qmodel.module.named_modules())
    weights = [modules[info.name].weight for info in qmodel.layers]
    saved = [weight.detach().clone() for weight in weights]
    try:
        with torch.no_grad():
            for layer, (weight, state) in enumerate(zip(weights, states)):
                weight.data.copy_(qmodel.grids[layer].dequantize(state).to(weight.dtype))
        yield qmodel
    finally:
        with torch.no_grad():
            for weight, old in zip(weights, saved):
                weight.data.copy_(old)


def changed_weights(qmodel: QuantizedModel, states: Sequence[torch.Tensor]) -> int:
    """How many weights ``states`` put on another level than ``qmodel``'s current base."""
    states = _check_states(qmodel, states)
    return sum(int((state.to(torch.int64) != qmodel.base_states(layer).to(torch.int64)).sum())
               for layer, state in enumerate(states))


def states_to_genes(qmodel: QuantizedModel, states: Sequence[torch.Tensor]) -> list[tuple[int, int, int]]:
    """Genes ``(layer, index, offset)`` that move ``qmodel``'s current base onto ``states``."""
    states = _check_states(qmodel, states)
    genes = []
    for layer, state in enumerate(states):
        offset = state.reshape(-1).to(torch.int64) - qmodel.base_states(layer).reshape(-1).to(torch.int64)
        for index in torch.nonzero(offset).view(-1).tolist():
            genes.append((layer, index, int(offset[index])))
    return genes
