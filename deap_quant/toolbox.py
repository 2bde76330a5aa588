"""``make_toolbox``: a DEAP toolbox wired to a quantized model's gene space and an evaluator.

The toolbox registers ``individual``, ``population``, ``evaluate``, ``mate``, ``mutate`` and
``select``, so DEAP's own ``eaMuPlusLambda``, ``eaMuCommaLambda`` and ``eaSimple`` run on it
unmodified. Every entry can be re-registered by the user (``toolbox.register("mutate", ...)``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional, Union

from deap import base, tools

from .genome import GeneSpace, Individual, MultiIndividual
from .operators import DEFAULT_MUTATION_PROBS, cx_layer_swap, cx_one_point, cx_uniform, init_random, mut_mixed

__all__ = ["make_toolbox", "CROSSOVERS", "SELECTIONS", "ParetoObjective"]

CROSSOVERS: dict[str, Callable] = {"uniform": cx_uniform, "one_point": cx_one_point, "layer_swap": cx_layer_swap}
SELECTIONS = ("best", "tournament", "nsga2")


class ParetoObjective:
    """Wraps an evaluator for NSGA-II: ``(primary metric, number of changed weights)``."""

    def __init__(self, evaluator: Callable[[Sequence], tuple]):
        self.evaluator = evaluator

    def __call__(self, individual: Sequence) -> tuple[float, float]:
        return self.evaluator(individual)[0], float(len(individual))


def make_toolbox(qmodel: Any, evaluator: Callable[[Sequence], tuple], *, init_genes: int = 8,
                 layer_choice: Union[str, Sequence[float]] = "uniform", sampler: str = "residual",
                 max_offset: int = 1, mutation_probs: Optional[Mapping[str, float]] = None,
                 crossover: Optional[str] = "uniform", select: str = "best", tournsize: int = 3,
                 gene_space: Optional[GeneSpace] = None) -> base.Toolbox:
    """Build a DEAP toolbox for evolving rounding genes of ``qmodel``.

    ``qmodel`` is only asked for its ``layer_table()`` (and ``residuals()`` when
    ``sampler="residual"``). ``select="best"`` suits ``(mu+lambda)``/``(mu,lambda)``;
    ``"tournament"`` suits ``eaSimple``; ``"nsga2"`` switches to two objectives (metric, genes).
    ``crossover=None`` registers no ``mate`` (use ``cxpb=0``).
    """
    if isinstance(init_genes, bool) or not isinstance(init_genes, int) or init_genes < 0:
        raise ValueError(f"init_genes={init_genes!r} is not valid; use an integer >= 0")
    if crossover is not None and crossover not in CROSSOVERS:
        raise ValueError(f"crossover={crossover!r} is not valid; use one of {', '.join(CROSSOVERS)} or None")
    if select not in SELECTIONS:
        raise ValueError(f"select={select!r} is not valid; use one of {', '.join(SELECTIONS)}")
    if gene_space is None:
        residuals = qmodel.residuals() if sampler == "residual" else None
        gene_space = GeneSpace.from_layer_table(qmodel.layer_table(), layer_choice=layer_choice, sampler=sampler,
                                                max_offset=max_offset, residuals=residuals)
    individual_class = MultiIndividual if select == "nsga2" else Individual

    toolbox = base.Toolbox()
    toolbox.gene_space = gene_space
    toolbox.individual_class = individual_class
    toolbox.register("individual", init_random, individual_class, gene_space, init_genes)
    toolbox.register("population", tools.initRepeat, list, toolbox.individual)
    toolbox.register("evaluate", ParetoObjective(evaluator) if select == "nsga2" else evaluator)
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
