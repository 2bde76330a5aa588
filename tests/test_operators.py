"""Each DEAP-style operator on fixed random draws: in place, returns a tuple, never clones or touches fitness."""

from __future__ import annotations

import random

import pytest

from deap_quant import Gene, GeneSpace, Individual, normalize
from deap_quant.operators import (
    cx_layer_swap,
    cx_one_point,
    cx_uniform,
    init_empty,
    init_random,
    mut_add_gene,
    mut_mixed,
    mut_move_gene,
    mut_remove_gene,
    mut_shift_offset,
)

SPACE = GeneSpace([20, 30, 40], max_offset=2)


def individual(genes, fitness=(0.5, 0.0)):
    ind = Individual(genes)
    ind.fitness.values = fitness
    return ind


def assert_in_place(result, ind, size=1):
    assert isinstance(result, tuple) and len(result) == size
    assert result[0] is ind
    assert ind.fitness.values == (0.5, 0.0), "operators must not touch the fitness"
    assert list(ind) == normalize(ind), "operators keep individuals normalised"


def test_init_random_and_empty():
    random.seed(0)
    ind = init_random(Individual, SPACE, 6)
    assert isinstance(ind, Individual) and 1 <= len(ind) <= 6 and not ind.fitness.valid
    random.seed(0)
    assert init_random(Individual, SPACE, 6) == ind
    sizes = set()
    for _ in range(200):
        sizes.add(len(init_random(Individual, SPACE, 6, k_min=0)))
    assert sizes == set(range(7))  # k_min=0 allows the empty genome, and k_max is reached
    assert init_empty(Individual) == []


def test_mut_add_gene_adds_one_gene():
    random.seed(1)
    ind = individual([(0, 1, 1)])
    result = mut_add_gene(ind, SPACE)
    assert_in_place(result, ind)
    assert len(ind) == 2 and Gene(0, 1, 1) in ind


def test_mut_remove_gene_removes_and_tolerates_empty():
    random.seed(2)
    ind = individual([(0, 1, 1), (1, 2, -1), (2, 3, 1)])
    assert_in_place(mut_remove_gene(ind, n=2), ind)
    assert len(ind) == 1
    empty = individual([])
    assert_in_place(mut_remove_gene(empty), empty)
    assert empty == []


def test_mut_shift_offset_moves_one_offset_by_one_level():
    random.seed(3)
    ind = individual([(0, 1, 1), (1, 2, -2)])
    before = {(g.layer, g.index): g.offset for g in ind}
    assert_in_place(mut_shift_offset(ind, SPACE), ind)
    after = {(g.layer, g.index): g.offset for g in ind}
    diffs = [abs(after.get(k, 0) - v) for k, v in before.items()]
    assert sorted(diffs) == [0, 1]
    assert all(abs(o) <= 2 for o in after.values())


def test_mut_move_gene_stays_in_its_layer():
    random.seed(4)
    ind = individual([(2, 7, 1)])
    assert_in_place(mut_move_gene(ind, SPACE), ind)
    assert len(ind) == 1 and ind[0].layer == 2 and ind[0].offset == 1 and 0 <= ind[0].index < 40


def test_mut_mixed_follows_probabilities():
    random.seed(5)
    sizes = []
    for _ in range(200):
        ind = individual([(0, 1, 1), (1, 1, 1)])
        assert_in_place(mut_mixed(ind, SPACE, probs={"add": 1.0}), ind)
        sizes.append(len(ind))
    # adds a gene; rarely it lands on an existing weight and merges with (or cancels) its offset
    assert set(sizes) <= {1, 2, 3} and sizes.count(3) > 190
    ind = individual([(0, 1, 1), (1, 1, 1)])
    mut_mixed(ind, SPACE, probs={"remove": 1.0})
    assert len(ind) == 1
    empty = individual([])
    mut_mixed(empty, SPACE, probs={"remove": 1.0})
    assert len(empty) == 1, "an empty individual can only grow"
    with pytest.raises(ValueError, match="probs=.*is not valid"):
        mut_mixed(individual([(0, 1, 1)]), SPACE, probs={"flip": 1.0})


def test_cx_uniform_exchanges_genes_over_the_union():
    random.seed(6)
    a = individual([(0, 1, 1), (0, 2, 1), (1, 5, -1)])
    b = individual([(0, 2, -1), (2, 9, 1)])
    union = {(0, 1), (0, 2), (1, 5), (2, 9)}
    result = cx_uniform(a, b)
    assert isinstance(result, tuple) and result[0] is a and result[1] is b
    assert a.fitness.values == (0.5, 0.0) and b.fitness.values == (0.5, 0.0)
    keys = [(g.layer, g.index) for g in a] + [(g.layer, g.index) for g in b]
    assert sorted(set(keys)) == sorted(union) and len(keys) == 5  # (0,2) is held by both, once each
    assert {g for g in a if (g.layer, g.index) == (0, 2)} | {g for g in b if (g.layer, g.index) == (0, 2)} == {
        Gene(0, 2, 1), Gene(0, 2, -1)}
    always = cx_uniform(individual([(0, 1, 1)]), individual([(1, 1, 1)]), indpb=1.0)
    assert always[0] == [Gene(1, 1, 1)] and always[1] == [Gene(0, 1, 1)]


def test_cx_one_point_swaps_tails_at_a_weight():
    random.seed(7)
    a = individual([(0, 1, 1), (1, 1, 1), (2, 1, 1)])
    b = individual([(0, 2, -1), (1, 2, -1), (2, 2, -1)])
    cx_one_point(a, b)
    cut = [i for i, g in enumerate(a) if g.offset == -1]
    assert cut, "seed 7 must cut inside the genomes, or the test checks nothing"
    assert cut == list(range(cut[0], len(a)))  # a = head of a + tail of b
    assert len(a) + len(b) == 6 and list(a) == sorted(a) and list(b) == sorted(b)
    assert set(a) | set(b) == {Gene(layer, i, o) for layer in range(3) for i, o in ((1, 1), (2, -1))}


def test_cx_layer_swap_exchanges_whole_layers():
    random.seed(8)
    a = individual([(0, 1, 1), (1, 1, 1), (1, 3, 1)])
    b = individual([(1, 2, -1), (2, 2, -1)])
    cx_layer_swap(a, b, indpb=1.0)
    assert a == [Gene(1, 2, -1), Gene(2, 2, -1)]
    assert b == [Gene(0, 1, 1), Gene(1, 1, 1), Gene(1, 3, 1)]
    random.seed(9)
    c = individual([(0, 1, 1), (1, 1, 1)])
    d = individual([(0, 2, -1), (1, 2, -1)])
    cx_layer_swap(c, d, indpb=0.5)
    for child in (c, d):  # every layer of a child comes whole from one parent
        for layer in (0, 1):
            offsets = {g.offset for g in child if g.layer == layer}
            assert len(offsets) == 1


def plain_individual_class():
    """An individual made the DEAP way, with ``creator``: a list of whatever the user puts in it."""
    from deap import base, creator
    if not hasattr(creator, "DQPlainFitness"):
        creator.create("DQPlainFitness", base.Fitness, weights=(1.0,))
        creator.create("DQPlainIndividual", list, fitness=creator.DQPlainFitness)
    return creator.DQPlainIndividual


@pytest.mark.parametrize("kind", [tuple, list])
@pytest.mark.parametrize("operator", ["shift", "move", "add", "remove", "mixed", "cx_uniform", "cx_one_point",
                                      "cx_layer_swap"])
def test_operators_accept_any_three_sequence(kind, operator):
    plain = plain_individual_class()
    random.seed(10)
    a = plain(kind(g) for g in [(0, 1, 1), (1, 2, -1), (2, 3, 2)])
    b = plain(kind(g) for g in [(0, 1, -1), (2, 5, 1)])
    a.fitness.values = b.fitness.values = (0.5,)
    calls = {"shift": lambda: mut_shift_offset(a, SPACE), "move": lambda: mut_move_gene(a, SPACE),
             "add": lambda: mut_add_gene(a, SPACE), "remove": lambda: mut_remove_gene(a),
             "mixed": lambda: mut_mixed(a, SPACE), "cx_uniform": lambda: cx_uniform(a, b, indpb=1.0),
             "cx_one_point": lambda: cx_one_point(a, b), "cx_layer_swap": lambda: cx_layer_swap(a, b, indpb=1.0)}
    result = calls[operator]()
    assert result[0] is a and a.fitness.values == (0.5,)
    for child in result:
        assert all(len(gene) == 3 for gene in child)
        assert [tuple(gene) for gene in child] == normalize(child), "children stay normalised"
    if operator.startswith("cx"):
        assert result[1] is b
        assert sorted(map(tuple, a + b)) == sorted([(0, 1, 1), (1, 2, -1), (2, 3, 2), (0, 1, -1), (2, 5, 1)])


def test_shift_and_move_stay_on_the_grid():
    import numpy as np
    base = [np.array([0, 3, 1, 2], dtype=np.uint8)]
    space = GeneSpace([4], [4], max_offset=2, base_states=base)
    random.seed(11)
    for _ in range(300):
        ind = individual([(0, i, 1 if i != 1 else -1) for i in range(4)])
        mut_shift_offset(ind, space) if random.random() < 0.5 else mut_move_gene(ind, space)
        for layer, index, offset in ind:
            assert 0 <= int(base[layer][index]) + offset <= 3 and offset != 0


def test_cx_one_point_never_returns_the_parents_unchanged():
    """As DEAP's cxOnePoint, the cut leaves both sides non-empty: with parents on disjoint weights each
    child takes something from each side, so neither child is either parent."""
    random.seed(0)
    space = GeneSpace([500, 500], max_offset=1)
    checked = 0
    for _ in range(2000):
        a, b = individual(space.sample(random.randint(1, 4))), individual(space.sample(random.randint(1, 4)))
        if {(g.layer, g.index) for g in a} & {(g.layer, g.index) for g in b}:
            continue
        parents = [list(a), list(b)]
        cx_one_point(a, b)
        assert list(a) not in parents and list(b) not in parents, parents
        checked += 1
    assert checked > 1900
    single = individual([(0, 3, 1)])
    assert cx_one_point(single, individual([]))[0] == [Gene(0, 3, 1)]  # one weight in all: nothing to cut
