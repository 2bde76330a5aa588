"""Crossovers in DEAP's style: both parents are changed in place into the children and returned.

Individuals are treated as sparse sets of genes keyed by weight ``(layer, index)``. Genes may be
any ``(layer, index, offset)`` sequences; children hold :class:`~deap_quant.genome.Gene` tuples,
sorted by weight, one gene per weight (parents are expected to be normalised, as every operator
here leaves them; genes are exchanged whole, so each stays one its weight can take).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

from ..genome import Gene, Individual, as_gene

__all__ = ["cx_uniform", "cx_one_point", "cx_layer_swap"]


def _genes(individual: Iterable[Sequence[int]]) -> list[Gene]:
    return [as_gene(gene) for gene in individual]


def _by_weight(genes: list[Gene]) -> dict[tuple[int, int], Gene]:
    return {(gene.layer, gene.index): gene for gene in genes}


def _assign(ind1: Individual, ind2: Individual, genes1: list[Gene], genes2: list[Gene]) -> tuple[Individual, Individual]:
    ind1[:] = sorted(genes1)
    ind2[:] = sorted(genes2)
    return ind1, ind2


def cx_uniform(ind1: Individual, ind2: Individual, indpb: float = 0.5) -> tuple[Individual, Individual]:
    """Uniform crossover over the union of both gene sets.

    Each weight present in either parent is visited in order; with probability ``indpb`` the
    two children exchange what they hold there (a gene, or nothing).
    """
    map1, map2 = _by_weight(_genes(ind1)), _by_weight(_genes(ind2))
    genes1, genes2 = [], []
    for key in sorted(map1.keys() | map2.keys()):
        first, second = map1.get(key), map2.get(key)
        if random.random() < indpb:
            first, second = second, first
        if first is not None:
            genes1.append(first)
        if second is not None:
            genes2.append(second)
    return _assign(ind1, ind2, genes1, genes2)


def cx_one_point(ind1: Individual, ind2: Individual) -> tuple[Individual, Individual]:
    """One-point crossover over genes sorted by weight: the cut is a weight drawn from the union.

    As in DEAP's ``cxOnePoint``, both sides of the cut are non-empty: the cut is drawn among the
    union's weights but its first (a cut there would swap the parents whole). With fewer than two
    weights in the union there is nothing to cut and the parents are returned unchanged.
    """
    genes1, genes2 = _genes(ind1), _genes(ind2)
    keys = sorted(_by_weight(genes1).keys() | _by_weight(genes2).keys())
    if len(keys) < 2:
        return ind1, ind2
    cut = random.choice(keys[1:])
    head1 = [g for g in genes1 if (g.layer, g.index) < cut]
    tail1 = [g for g in genes1 if (g.layer, g.index) >= cut]
    head2 = [g for g in genes2 if (g.layer, g.index) < cut]
    tail2 = [g for g in genes2 if (g.layer, g.index) >= cut]
    return _assign(ind1, ind2, head1 + tail2, head2 + tail1)


def cx_layer_swap(ind1: Individual, ind2: Individual, indpb: float = 0.5) -> tuple[Individual, Individual]:
    """Swap whole layers: each layer present in either parent is exchanged with probability ``indpb``."""
    parent1, parent2 = _genes(ind1), _genes(ind2)
    layers = sorted({g.layer for g in parent1} | {g.layer for g in parent2})
    swapped = {layer for layer in layers if random.random() < indpb}
    genes1 = [g for g in parent1 if g.layer not in swapped] + [g for g in parent2 if g.layer in swapped]
    genes2 = [g for g in parent2 if g.layer not in swapped] + [g for g in parent1 if g.layer in swapped]
    return _assign(ind1, ind2, genes1, genes2)
