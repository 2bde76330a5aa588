"""Mutations in DEAP's style: change the individual in place, return ``(individual,)``.

They never clone and never touch the fitness; DEAP's ``varOr``/``varAnd`` do both. After each
mutation the individual is normalised (one gene per weight, no zero offsets, sorted).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Optional

from ..genome import Gene, GeneSpace, Individual, normalize

__all__ = ["mut_add_gene", "mut_remove_gene", "mut_shift_offset", "mut_move_gene", "mut_mixed",
           "DEFAULT_MUTATION_PROBS"]


def _renormalize(individual: Individual, space: Optional[GeneSpace]) -> None:
    individual[:] = normalize(individual, space.max_offset if space is not None else None)


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
    """Move one random gene's offset one level up or down (a gene shifted to zero disappears)."""
    if individual:
        position = random.randrange(len(individual))
        gene = individual[position]
        individual[position] = gene._replace(offset=gene.offset + random.choice((-1, 1)))
        _renormalize(individual, space)
    return individual,


def mut_move_gene(individual: Individual, space: GeneSpace) -> tuple[Individual]:
    """Move one random gene to another weight of the same layer, drawn from ``space``."""
    if individual:
        position = random.randrange(len(individual))
        gene = individual[position]
        index = space.sample_index(gene.layer)
        offset = gene.offset if space.sampler == "uniform" else space.sample_offset(gene.layer, index)
        individual[position] = Gene(gene.layer, index, offset)
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
