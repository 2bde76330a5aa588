"""Non-evolutionary rounding baselines, and starting points for the search.

* :func:`nearest` -- nearest rounding on the model's grid (``minmax`` or ``mse`` scales are
  chosen by :func:`deap_quant.quantize`);
* :func:`best_stochastic` -- the best of N stochastic roundings on the validation fitness;
* :func:`adaround` -- AdaRound (Nagel et al., 2020) with the asymmetric reconstruction target.

Each returns a :class:`Rounding` whose ``states`` fit :meth:`QuantizedModel.rebase_`; any of
them can seed the evolution (``evolve(..., start=...)``, see :func:`resolve_start`).
"""

from .adaround import TARGETS, AdaRoundConfig, adaround, adaround_states
from .common import (
    Rounding,
    changed_weights,
    float_module,
    float_weights,
    grid_position,
    grid_positions,
    states_to_genes,
    temporarily_rounded,
)
from .nearest import nearest, nearest_states
from .start import STARTS, StartSpec, resolve_start
from .stochastic import best_stochastic, stochastic_states

__all__ = [
    "Rounding", "nearest", "nearest_states", "best_stochastic", "stochastic_states",
    "AdaRoundConfig", "adaround", "adaround_states", "TARGETS",
    "STARTS", "StartSpec", "resolve_start",
    "grid_position", "grid_positions", "float_weights", "float_module", "temporarily_rounded",
    "changed_weights", "states_to_genes",
]
