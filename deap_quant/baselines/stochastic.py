"""Stochastic rounding: round up with probability equal to the fractional grid position.

One draw is unbiased but noisy; :func:`best_stochastic` keeps the best of ``draws`` draws by an
evaluator's fitness (the validation split; never the test split).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Callable, Optional

import torch

from ..quantization.model import QuantizedModel
from .common import Rounding, grid_position, temporarily_rounded

__all__ = ["stochastic_states", "best_stochastic"]


def stochastic_states(qmodel: QuantizedModel, generator: Optional[torch.Generator] = None) -> list[torch.Tensor]:
    """One draw: per weight ``floor(position) + Bernoulli(position - floor(position))``, clipped to the grid."""
    states = []
    for layer, info in enumerate(qmodel.layers):
        position = grid_position(qmodel, layer)
        low = position.floor()
        up = torch.rand(position.shape, generator=generator) < (position - low)
        states.append((low + up.to(torch.float32)).clamp_(0, info.n_levels - 1).to(torch.uint8))
    return states


def best_stochastic(qmodel: QuantizedModel, evaluator: Callable[[Sequence], tuple], draws: int = 20,
                    seed: int = 0) -> Rounding:
    """The best of ``draws`` stochastic roundings by ``evaluator``'s fitness (called with no genes).

    ``evaluator`` must score ``qmodel`` (e.g. ``Evaluator(qmodel, val)``). The model's weights
    are restored afterwards; its base is not changed.
    """
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws={draws!r} is not valid; use an integer >= 1")
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    best_states, best_fitness, fitnesses = None, None, []
    for _ in range(draws):
        states = stochastic_states(qmodel, generator)
        with temporarily_rounded(qmodel, states):
            fitness = tuple(evaluator([]))
        fitnesses.append(fitness[0])
        if best_fitness is None or fitness > best_fitness:
            best_states, best_fitness = states, fitness
    return Rounding("stochastic", best_states, seconds=time.perf_counter() - started, evaluations=draws,
                    details={"draws": draws, "seed": seed, "best_fitness": list(best_fitness),
                             "draw_fitness": fitnesses})
