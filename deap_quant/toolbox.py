"""``make_toolbox``: a DEAP toolbox wired to a quantized model's gene space and an evaluator.

The toolbox registers ``individual``, ``population``, ``evaluate``, ``mate``, ``mutate`` and
``select``, so DEAP's own ``eaMuPlusLambda``, ``eaMuCommaLambda`` and ``eaSimple`` run on it
unmodified. Every entry can be re-registered by the user (``toolbox.register("mutate", ...)``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional, Union

import numpy as np
from deap import base, tools

from .genome import GeneEffects, GeneSpace, Individual, MultiIndividual
from .operators import DEFAULT_MUTATION_PROBS, cx_layer_swap, cx_one_point, cx_uniform, init_random, mut_mixed

__all__ = ["make_toolbox", "gene_effects", "CROSSOVERS", "SELECTIONS", "ParetoObjective"]

CROSSOVERS: dict[str, Callable] = {"uniform": cx_uniform, "one_point": cx_one_point, "layer_swap": cx_layer_swap}
SELECTIONS = ("best", "tournament", "nsga2")


def gene_effects(qmodel: Any) -> GeneEffects:
    """:class:`GeneEffects` for ``qmodel`` as it is now: its base states copied out as flat NumPy
    arrays (plain data for the evolutionary side), with its level counts. Build it after any
    :meth:`QuantizedModel.rebase_`."""
    states = []
    for layer in range(len(qmodel.layer_table())):
        state = qmodel.base_states(layer)
        if hasattr(state, "numpy"):  # a tensor: read it out once, as NumPy
            state = state.detach().cpu().numpy()
        states.append(np.array(state).reshape(-1))  # a copy: later rebases do not change it
    return GeneEffects(states, [layer.n_levels for layer in qmodel.layer_table()])


class ParetoObjective:
    """Wraps an evaluator for NSGA-II: ``(primary metric, number of changed weights)``.

    ``count`` says how many weights a gene list changes (:meth:`GeneEffects.count`; genes that
    leave their weight where it was do not count). Without it, genes are counted.
    """

    def __init__(self, evaluator: Callable[[Sequence], tuple], count: Optional[Callable[[Sequence], int]] = None):
        self.evaluator = evaluator
        self.count = count

    def __call__(self, individual: Sequence) -> tuple[float, float]:
        changed = self.count(individual) if self.count is not None else len(individual)
        return self.evaluator(individual)[0], float(changed)


def make_toolbox(qmodel: Any, evaluator: Callable[[Sequence], tuple], *, init_genes: int = 8,
                 layer_choice: Union[str, Sequence[float]] = "uniform", sampler: str = "residual",
                 max_offset: int = 1, mutation_probs: Optional[Mapping[str, float]] = None,
                 crossover: Optional[str] = "uniform", select: str = "best", tournsize: int = 3,
                 gene_space: Optional[GeneSpace] = None) -> base.Toolbox:
    """Build a DEAP toolbox for evolving rounding genes of ``qmodel``.

    ``qmodel`` is only asked for plain data: its ``layer_table()``, its base states (copied to
    NumPy, see :func:`gene_effects`) and ``residuals()`` when ``sampler="residual"``; so build
    the toolbox after any :meth:`QuantizedModel.rebase_`. The gene space proposes only moves that
    stay on the grid. ``select="best"`` suits ``(mu+lambda)``/``(mu,lambda)``; ``"tournament"``
    suits ``eaSimple``; ``"nsga2"`` switches to two objectives (metric, number of changed
    weights). ``crossover=None`` registers no ``mate`` (use ``cxpb=0``). ``toolbox.gene_effects``
    judges gene lists by the weights they change (e.g. ``tools.HallOfFame(n,
    similar=toolbox.gene_effects.same)``).
    """
    if isinstance(init_genes, bool) or not isinstance(init_genes, int) or init_genes < 0:
        raise ValueError(f"init_genes={init_genes!r} is not valid; use an integer >= 0")
    if crossover is not None and crossover not in CROSSOVERS:
        raise ValueError(f"crossover={crossover!r} is not valid; use one of {', '.join(CROSSOVERS)} or None")
    if select not in SELECTIONS:
        raise ValueError(f"select={select!r} is not valid; use one of {', '.join(SELECTIONS)}")
    effects = gene_effects(qmodel)
    if gene_space is None:
        residuals = qmodel.residuals() if sampler == "residual" else None
        gene_space = GeneSpace.from_layer_table(qmodel.layer_table(), layer_choice=layer_choice, sampler=sampler,
                                                max_offset=max_offset, residuals=residuals,
                                                base_states=effects.base_states)
    individual_class = MultiIndividual if select == "nsga2" else Individual

    toolbox = base.Toolbox()
    toolbox.gene_space = gene_space
    toolbox.gene_effects = effects
    toolbox.individual_class = individual_class
    toolbox.register("individual", init_random, individual_class, gene_space, init_genes)
    toolbox.register("population", tools.initRepeat, list, toolbox.individual)
    toolbox.register("evaluate", ParetoObjective(evaluator, effects.count) if select == "nsga2" else evaluator)
    toolbox.register("mutate", mut_mixed, space=gene_space, probs=dict(mutation_probs or DEFAULT_MUTATION_PROBS))
    if crossover is not None:
        toolbox.register("mate", CROSSOVERS[crossover])
    if select == "best":
        toolbox.register("select", tools.selBest)
    elif select == "tournament":
        toolbox.register("select", tools.selTournament, tournsize=tournsize)
    else:
        toolbox.register("select", tools.selNSGA2)
    return toolbox
