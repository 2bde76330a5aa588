"""Gene sampling proposes only moves that change a weight; gene effects are judged as the model applies genes."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch

from deap_quant import Gene, GeneSpace, Individual, make_toolbox, quantize
from deap_quant.genome import GeneEffects
from deap_quant.operators import cx_uniform, mut_mixed
from deap_quant.toolbox import gene_effects


@pytest.fixture
def qmodel(tiny_model):
    """2-bit MSE grids clip the largest weights: their residual points off the grid."""
    return quantize(tiny_model, bits=2, scale_method="mse")


def model_changes(qmodel, genes) -> tuple:
    """(layer, index, state) of every weight ``genes`` move off its base, as the model itself applies them."""
    changes = []
    for layer, states in enumerate(qmodel.states_with(genes)):
        moved = torch.nonzero(states.view(-1) != qmodel.base_states(layer).view(-1)).view(-1).tolist()
        changes += [(layer, index, int(states.view(-1)[index])) for index in moved]
    return tuple(changes)


def assert_changes_its_weight(qmodel, gene) -> None:
    layer, index, offset = gene
    base = int(qmodel.base_states(layer).view(-1)[index])
    assert offset != 0 and 0 <= base + offset < qmodel.layers[layer].n_levels, (
        f"{gene} from state {base} leaves the grid (0..{qmodel.layers[layer].n_levels - 1})")


def outward(qmodel) -> int:
    """How many weights sit on a grid edge with their residual pointing off it."""
    count = 0
    for layer, residual in enumerate(qmodel.residuals()):
        base = qmodel.base_states(layer).view(-1).numpy()
        top = qmodel.layers[layer].n_levels - 1
        count += int(((residual >= 0) & (base == top)).sum() + ((residual < 0) & (base == 0)).sum())
    return count


@pytest.mark.parametrize("sampler, max_offset", [("residual", 1), ("residual", 2), ("uniform", 1), ("uniform", 2)])
def test_sampled_genes_always_change_their_weight(qmodel, sampler, max_offset):
    assert outward(qmodel) > 0, "the case this test is about must exist in the model"
    toolbox = make_toolbox(qmodel, lambda genes: (0.0, 0.0), sampler=sampler, max_offset=max_offset)
    random.seed(0)
    for gene in (toolbox.gene_space.sample_gene() for _ in range(3000)):
        assert_changes_its_weight(qmodel, gene)


def test_impossible_residual_moves_get_zero_weight_and_the_rest_keep_their_share():
    base = np.array([3, 3, 0, 0, 1, 2], dtype=np.uint8)
    residual = np.array([0.9, -0.4, -0.8, 0.3, 0.45, -0.45])  # 0: up from the top, 2: down from the bottom
    space = GeneSpace([6], [4], sampler="residual", residuals=[residual], base_states=[base])
    random.seed(0)
    genes = [space.sample_gene() for _ in range(4000)]
    counts = Counter(gene.index for gene in genes)
    assert counts[0] == counts[2] == 0
    assert all(gene.offset == (1 if residual[gene.index] >= 0 else -1) for gene in genes)
    feasible = np.array([0.4, 0.3, 0.45, 0.45]) ** 2
    for index, share in zip((1, 3, 4, 5), feasible / feasible.sum()):
        assert abs(counts[index] / 4000 - share) < 0.03


def test_uniform_sampler_draws_every_feasible_offset_and_nothing_else():
    base = np.array([0, 3, 1, 2], dtype=np.uint8)
    space = GeneSpace([4], [4], max_offset=2, base_states=[base])
    random.seed(1)
    seen: dict[int, set] = {i: set() for i in range(4)}
    for gene in (space.sample_gene() for _ in range(2000)):
        seen[gene.index].add(gene.offset)
    assert seen == {0: {1, 2}, 1: {-1, -2}, 2: {-1, 1, 2}, 3: {-2, -1, 1}}


def test_a_layer_without_any_possible_residual_move_falls_back_to_possible_ones():
    base = np.array([3, 0], dtype=np.uint8)
    residual = np.array([0.8, -0.7])
    space = GeneSpace([2], [4], sampler="residual", residuals=[residual], base_states=[base])
    random.seed(2)
    genes = [space.sample_gene() for _ in range(200)]
    assert {(g.index, g.offset) for g in genes} == {(0, -1), (1, 1)}


def test_sampling_after_a_rebase_uses_the_new_base(qmodel):
    edges = [torch.where(qmodel.base_states(layer) >= 2, qmodel.layers[layer].n_levels - 1, 0)
             for layer in range(len(qmodel.layers))]
    qmodel.rebase_(edges)
    toolbox = make_toolbox(qmodel, lambda genes: (0.0, 0.0), max_offset=2)
    random.seed(3)
    for gene in (toolbox.gene_space.sample_gene() for _ in range(2000)):
        assert_changes_its_weight(qmodel, gene)


def test_variation_keeps_every_gene_effective(qmodel):
    toolbox = make_toolbox(qmodel, lambda genes: (0.0, 0.0), max_offset=2)
    random.seed(4)
    population = toolbox.population(n=10)
    for _ in range(300):
        a, b = random.sample(population, 2)
        cx_uniform(a, b)
        mut_mixed(a, toolbox.gene_space)
        for gene in list(a) + list(b):
            assert_changes_its_weight(qmodel, gene)


def test_gene_effects_match_what_the_model_applies(qmodel):
    effects = gene_effects(qmodel)
    rng = random.Random(5)
    sizes = [layer.numel for layer in qmodel.layers]
    for _ in range(300):
        genes = []
        for _ in range(rng.randrange(8)):
            layer = rng.randrange(len(sizes))
            genes.append((layer, rng.randrange(sizes[layer]), rng.choice([-9, -2, -1, 0, 1, 2, 9])))
        genes += rng.sample(genes, min(len(genes), 2))  # duplicates add up
        expected = model_changes(qmodel, genes)
        assert effects.changes(genes) == expected
        assert effects.count(genes) == len(expected)
        assert effects.changes([list(g) for g in genes]) == expected
        assert effects.changes([tuple(np.int64(v) for v in g) for g in genes]) == expected


def test_gene_effects_count_duplicate_zero_sum_and_clamped_genes_by_their_effect():
    base = [np.array([0, 1, 3], dtype=np.uint8)]
    effects = GeneEffects(base, [4])
    assert effects.changes([(0, 0, -1), (0, 2, 1), (0, 2, 5)]) == ()  # clamped to nothing
    assert effects.changes([(0, 1, 1), (0, 1, -1)]) == ()  # offsets that sum to zero
    assert effects.changes([(0, 1, 1), (0, 1, 1)]) == ((0, 1, 3),)
    assert effects.same([Gene(0, 1, 2)], [(0, 1, 9), (0, 0, -1)])  # both put weight 1 on the top level
    assert not effects.same([(0, 1, 1)], [(0, 1, 2)])
    assert effects.count(Individual([(0, 0, 1), (0, 2, 1), (0, 1, -1)])) == 2
    with pytest.raises(ValueError, match="layer=1 is out of range"):
        effects.changes([(1, 0, 1)])
    with pytest.raises(ValueError, match="index=3 is out of range"):
        effects.changes([(0, 3, 1)])


@pytest.mark.parametrize("kwargs, message", [
    ({"base_states": [np.zeros(3, dtype=np.uint8)]}, "base_states needs n_levels"),
    ({"n_levels": [4, 4], "base_states": [np.zeros(3, dtype=np.uint8)]}, "one base state array per layer"),
    ({"n_levels": [4, 4], "base_states": [np.zeros(3, dtype=np.uint8), np.zeros(5, dtype=np.uint8)]},
     "layer 1 has 5 base states"),
    ({"n_levels": [4, 4], "base_states": [np.zeros(3, dtype=np.uint8), np.full(4, 4, dtype=np.uint8)]},
     "must lie in 0..3"),
    ({"n_levels": [1, 4]}, "n_levels"),
])
def test_gene_space_rejects_bad_base_states(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GeneSpace([3, 4], **kwargs)
