"""Mutations in DEAP's style: change the individual in place, return ``(individual,)``.

They never clone and never touch the fitness; DEAP's ``varOr``/``varAnd`` do both. Genes may be
any ``(layer, index, offset)`` sequences (e.g. plain tuples in an individual made with DEAP's
``creator``). After each mutation the individual is normalised by its gene space (one
:class:`~deap_quant.genome.Gene` per weight, sorted, each offset one the weight can take), so
every gene changes its weight when the space knows the base states.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Optional

from ..genome import Gene, GeneSpace, Individual, as_gene, normalize

__all__ = ["mut_add_gene", "mut_remove_gene", "mut_shift_offset", "mut_move_gene", "mut_mixed",
           "DEFAULT_MUTATION_PROBS"]


def _renormalize(individual: Individual, space: Optional[GeneSpace]) -> None:
    individual[:] = space.normalize(individual) if space is not None else normalize(individual)


def mut_add_gene(individual: Individual, space: GeneSpace, n: int = 1) -> tuple[Individual]:
    """Add ``n`` genes drawn from ``space`` (a gene on a weight already present adds to its offset)."""
    individual.extend(space.sample_gene() for _ in range(n))
    _renormalize(individual, space)
    return individual,


def mut_remove_gene(individual: Individual, n: int = 1) -> tuple[Individual]:
    """Remove ``n`` random genes (fewer if the individual has fewer)."""
    for _ in range(min(n, len(individual))):
        del individual[random.randrange(len(individual))]
    return individual,


def mut_shift_offset(individual: Individual, space: GeneSpace) -> tuple[Individual]:
    """Move one random gene's offset one level up or down, staying within what its weight can take
    (:meth:`GeneSpace.offset_range`); a gene shifted to zero disappears."""
    if individual:
        position = random.randrange(len(individual))
        layer, index, offset = as_gene(individual[position])
        low, high = space.offset_range(layer, index)
        offset = max(low, min(high, offset))  # the same effect, on the grid
        steps = [step for step in (-1, 1) if low <= offset + step <= high]
        individual[position] = Gene(layer, index, offset + random.choice(steps))
        _renormalize(individual, space)
    return individual,


def mut_move_gene(individual: Individual, space: GeneSpace) -> tuple[Individual]:
    """Move one random gene to another weight of the same layer, drawn from ``space``."""
    if individual:
        position = random.randrange(len(individual))
        layer, _, offset = as_gene(individual[position])
        index = space.sample_index(layer)
        low, high = space.offset_range(layer, index)
        if space.sampler != "uniform" or not low <= offset <= high or offset == 0:
            offset = space.sample_offset(layer, index)  # "uniform" keeps the offset where the weight can take it
        individual[position] = Gene(layer, index, offset)
        _renormalize(individual, space)
    return individual,


DEFAULT_MUTATION_PROBS: Mapping[str, float] = {"add": 0.5, "remove": 0.2, "shift": 0.1, "move": 0.2}


def mut_mixed(individual: Individual, space: GeneSpace,
              probs: Mapping[str, float] = DEFAULT_MUTATION_PROBS) -> tuple[Individual]:
    """Apply one of add / remove / shift / move, chosen with the given probabilities.

    An individual without genes can only grow, so it always gets ``add``.
    """
    unknown = set(probs) - {"add", "remove", "shift", "move"}
    if unknown or any(p < 0 for p in probs.values()) or sum(probs.values()) <= 0:
        raise ValueError(f"probs={dict(probs)!r} is not valid; use non-negative weights for "
                         "'add', 'remove', 'shift', 'move' with a positive sum")
    if not individual:
        return mut_add_gene(individual, space)
    names = list(probs)
    choice = random.choices(names, weights=[probs[name] for name in names])[0]
    if choice == "add":
        return mut_add_gene(individual, space)
    if choice == "remove":
        return mut_remove_gene(individual)
    if choice == "shift":
        return mut_shift_offset(individual, space)
    return mut_move_gene(individual, space)
