"""Genes, individuals, normalisation and the gene space."""

from __future__ import annotations

import copy
import pickle
import random
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from deap_quant import Gene, GeneSpace, Individual, MultiIndividual, normalize


def test_normalize_merges_clips_drops_and_sorts():
    genes = [(1, 5, 1), (0, 2, -1), (1, 5, 1), (0, 3, 1), (0, 3, -1), (2, 0, 4)]
    assert normalize(genes) == [Gene(0, 2, -1), Gene(1, 5, 2), Gene(2, 0, 4)]
    assert normalize(genes, max_offset=1) == [Gene(0, 2, -1), Gene(1, 5, 1), Gene(2, 0, 1)]


def test_individual_clone_is_independent_and_keeps_fitness():
    ind = Individual([(0, 1, 1), (1, 2, -1)])
    ind.fitness.values = (0.5, -1.0)
    clone = copy.deepcopy(ind)
    assert clone == ind and clone is not ind
    assert clone.fitness.values == (0.5, -1.0) and clone.fitness is not ind.fitness
    clone.append(Gene(2, 0, 1))
    del clone.fitness.values
    assert len(ind) == 2 and ind.fitness.valid
    assert all(isinstance(gene, Gene) for gene in clone)


def test_individual_pickles_into_a_fresh_process():
    ind = MultiIndividual([(0, 1, 1), (3, 4, -1)])
    ind.fitness.values = (0.75, 2.0)
    payload = pickle.dumps(ind)
    code = ("import pickle, sys; ind = pickle.loads(sys.stdin.buffer.read()); "
            "print(type(ind).__name__, list(map(tuple, ind)), ind.fitness.values, ind.fitness.weights)")
    out = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True, check=True)
    assert out.stdout.decode().strip() == "MultiIndividual [(0, 1, 1), (3, 4, -1)] (0.75, 2.0) (1.0, -1.0)"


def test_layer_choice_size_is_proportional_to_layer_size():
    random.seed(0)
    space = GeneSpace([100, 900], layer_choice="size")
    counts = Counter(space.sample_layer() for _ in range(4000))
    assert 0.07 < counts[0] / 4000 < 0.13
    random.seed(0)
    uniform = GeneSpace([100, 900], layer_choice="uniform")
    counts = Counter(uniform.sample_layer() for _ in range(4000))
    assert 0.45 < counts[0] / 4000 < 0.55
    random.seed(0)
    custom = GeneSpace([100, 900], layer_choice=[0.0, 1.0])
    assert {custom.sample_layer() for _ in range(200)} == {1}


def test_uniform_sampler_covers_indices_and_signs():
    random.seed(1)
    space = GeneSpace([10], max_offset=2)
    genes = [space.sample_gene() for _ in range(500)]
    assert {g.index for g in genes} == set(range(10))
    assert {g.offset for g in genes} == {-2, -1, 1, 2}


def test_residual_sampler_prefers_large_residuals_in_the_other_direction():
    residual = np.array([0.01, -0.49, 0.02, 0.45, 0.0], dtype=np.float32)
    random.seed(2)
    space = GeneSpace([5], sampler="residual", residuals=[residual])
    genes = [space.sample_gene() for _ in range(400)]
    counts = Counter(g.index for g in genes)
    assert counts[1] + counts[3] > 0.95 * 400
    assert all(g.offset == (1 if residual[g.index] >= 0 else -1) for g in genes)


def test_sample_is_reproducible_with_random_seed():
    space = GeneSpace([50, 60, 70])
    random.seed(7)
    first = space.sample(10)
    random.seed(7)
    assert space.sample(10) == first
    assert first == normalize(first)


@pytest.mark.parametrize("kwargs, message", [
    ({"layer_choice": "biggest"}, "layer_choice='biggest' is not valid"),
    ({"layer_choice": [1.0]}, "must be 2 non-negative numbers"),
    ({"sampler": "greedy"}, "sampler='greedy' is not valid"),
    ({"sampler": "residual"}, "needs one residual array per layer"),
    ({"max_offset": 0}, "max_offset=0 is not valid"),
])
def test_gene_space_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GeneSpace([3, 4], **kwargs)


def test_individual_clone_keeps_what_deap_sets_on_it():
    from deap import tools
    population = [MultiIndividual([(0, i, 1)]) for i in range(5)]
    for i, ind in enumerate(population):
        ind.fitness.values = (0.1 * i, float(i))
    tools.selNSGA2(population, 3)  # sets fitness.crowding_dist
    population[0].history = [1, 2]
    for ind in population:
        clone = copy.deepcopy(ind)
        assert clone.fitness.crowding_dist == ind.fitness.crowding_dist
        assert clone.fitness.values == ind.fitness.values and clone.fitness is not ind.fitness
    clone = copy.deepcopy(population[0])
    assert clone.history == [1, 2] and clone.history is not population[0].history
