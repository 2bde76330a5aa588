"""Nearest rounding: every weight on the grid level closest to it.

The grid (``scale_method="minmax"`` or ``"mse"``, full, narrow or sign-aware ``range``) is chosen
by :func:`deap_quant.quantize`; this module rounds on whatever grid the quantized model has, from
the grid positions, so it also restores nearest rounding on a model rebased to another rounding.
"""

from __future__ import annotations

import time

import torch

from ..quantization.model import QuantizedModel
from .common import Rounding, grid_position

__all__ = ["nearest_states", "nearest"]


def nearest_states(qmodel: QuantizedModel) -> list[torch.Tensor]:
    """Per layer, the nearest grid state of every weight (uint8, shaped like the weight)."""
    states = []
    for layer, info in enumerate(qmodel.layers):
        position = grid_position(qmodel, layer)
        states.append(torch.round(position).clamp_(0, info.n_levels - 1).to(torch.uint8))
    return states


def nearest(qmodel: QuantizedModel) -> Rounding:
    """Nearest rounding as a :class:`Rounding` (no evaluations)."""
    started = time.perf_counter()
    states = nearest_states(qmodel)
    return Rounding("nearest", states, seconds=time.perf_counter() - started,
                    details={"scale_method": qmodel.config.get("scale_method"), "range": qmodel.config.get("range")})
