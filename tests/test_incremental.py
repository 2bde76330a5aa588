"""IncrementalEvaluator: bit-identical to Evaluator, memoised, within its cache budget."""

from __future__ import annotations

import pickle
import random

import pytest
import torch
from torch import nn

from deap_quant import Evaluator, IncrementalEvaluator, Individual, quantize
from deap_quant.evaluation import Stage
from deap_quant.evaluation.cache import ActivationCache, CacheEntry


def random_gene(qmodel, rng: random.Random) -> tuple[int, int, int]:
    sizes = [layer.numel for layer in qmodel.layers]
    layer = rng.choices(range(len(sizes)), weights=sizes)[0]
    return layer, rng.randrange(sizes[layer]), rng.choice((-1, 1, 2))


def lineage(qmodel, seed: int, n: int = 12) -> list[list[tuple[int, int, int]]]:
    """Gene lists as evolution makes them: random starts, then children that add, drop or swap genes."""
    rng = random.Random(seed)
    genomes = [[random_gene(qmodel, rng) for _ in range(4)] for _ in range(3)]
    while len(genomes) < n:
        parent = list(rng.choice(genomes))
        move = rng.random()
        if move < 0.5 or not parent:
            parent.append(random_gene(qmodel, rng))
        elif move < 0.7:
            parent.pop(rng.randrange(len(parent)))
        elif move < 0.85:
            other = rng.choice(genomes)
            parent = parent[: len(parent) // 2] + other[len(other) // 2:]
        else:
            parent[rng.randrange(len(parent))] = random_gene(qmodel, rng)
        genomes.append(parent)
    return genomes


def assert_identical(qmodel, data, genomes, batch_size, **options):
    plain = Evaluator(qmodel, data, batch_size=batch_size)
    fast = IncrementalEvaluator(qmodel, data, batch_size=batch_size, **options)
    for genes in genomes:
        assert fast(genes) == plain(genes), genes
    for genes in genomes[:3]:
        assert fast.scores(genes) == plain.scores(genes)
    return fast


def test_sequential_fitness_is_bit_identical_and_reuses_activations(tiny_model, tiny_data):
    qmodel = quantize(tiny_model, bits=3)
    fast = assert_identical(qmodel, tiny_data, lineage(qmodel, seed=0, n=30), batch_size=16)
    stats = fast.stats()
    assert stats["split"] == "fx" and stats["stages"] == 2
    assert stats["stage_fraction"] < 1.0  # some evaluations started from cached activations
    assert stats["patched"] > 0  # and some recomputed only the changed channels of the convolution
    assert stats["cache"]["entries"] > 0


def test_resnet_fitness_is_bit_identical(resnet_setup):
    qmodel, data = resnet_setup
    fast = assert_identical(qmodel, data, lineage(qmodel, seed=1, n=10), batch_size=16)
    assert fast.stats()["stages"] > 10
    assert fast.stats()["mean_start_stage"] > 0 and fast.stats()["patched"] > 0


def test_declared_split_fitness_is_bit_identical(tiny_model, tiny_data):
    qmodel = quantize(tiny_model, bits=3)
    module = qmodel.module
    stages = [Stage("features", lambda x: module.flatten(module.pool(module.relu(module.conv(x)))), modules=("conv",)),
              Stage("head", module.fc)]
    fast = assert_identical(qmodel, tiny_data, lineage(qmodel, seed=2, n=20), batch_size=16, stages=stages)
    assert fast.stats()["split"] == "declared"


def test_model_ending_in_a_convolution_is_patched_and_bit_identical(tiny_data):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1), nn.Sigmoid(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    qmodel = quantize(model, bits=3)
    inputs, targets = tiny_data
    fast = assert_identical(qmodel, (inputs, targets), lineage(qmodel, seed=6, n=24), batch_size=16)
    assert fast.split.stages[-1].patch is not None and fast.stats()["patched"] > 0


def test_memoised_genomes_are_not_evaluated_again(tiny_model, tiny_data):
    qmodel = quantize(tiny_model, bits=3)
    fast = IncrementalEvaluator(qmodel, tiny_data, batch_size=16)
    first = fast([(0, 3, 1), (1, 7, -1)])
    # the same weights, written differently: reordered, split offsets, and a zero-offset gene
    again = fast([(1, 7, -1), (0, 3, 2), (0, 3, -1), (1, 9, 0)])
    assert again == first
    assert fast.stats()["computed"] == 1 and fast.stats()["memo_hits"] == 1
    assert fast.evaluations == 2


def test_tiny_budget_evicts_and_stays_within_it(resnet_setup):
    qmodel, data = resnet_setup
    genomes = lineage(qmodel, seed=3, n=10)
    probe = IncrementalEvaluator(qmodel, data, batch_size=16)
    probe.split  # noqa: B018 - builds the split and the size estimates
    full_entry = probe._new_bytes[0]
    budget = int(full_entry * 1.5)  # room for one complete entry and part of another
    tight = assert_identical(qmodel, data, genomes, batch_size=16, cache_bytes=budget, keep_states="all")
    cache = tight.stats()["cache"]
    assert cache["evictions"] > 0
    assert cache["peak_mb"] * 2 ** 20 <= budget
    assert tight._cache.used <= budget


def test_budget_too_small_for_any_entry_degrades_to_plain_evaluation(resnet_setup):
    qmodel, data = resnet_setup
    genomes = lineage(qmodel, seed=4, n=4)
    for budget in (0, 1000):
        fast = assert_identical(qmodel, data, genomes, batch_size=16, cache_bytes=budget)
        stats = fast.stats()
        assert stats["mean_start_stage"] == 0
        assert stats["cache"] is None or (stats["cache"]["entries"] == 0 and stats["cache"]["peak_mb"] == 0)


def test_short_budget_keeps_some_stage_inputs_and_resumes_before_the_dropped_ones(resnet_setup):
    qmodel, data = resnet_setup
    genomes = lineage(qmodel, seed=5, n=24)
    probe = IncrementalEvaluator(qmodel, data, batch_size=16)
    probe.split  # noqa: B018 - builds the split and the size estimates
    assert all(probe._kept_inputs[1:])  # the default budget holds every stage input of 25 genomes
    full_entry = probe._new_bytes[0]
    budget = int(full_entry * 27 * 0.4)  # each of 25 genomes (+2) gets 40% of what all its inputs take
    thin = assert_identical(qmodel, data, genomes, batch_size=16, cache_bytes=budget)
    kept = thin._kept_inputs
    assert not all(kept[1:]) and any(kept[1:-1]) and kept[-1]
    assert thin._new_bytes[0] <= budget // 27
    entries = [thin._cache.get(key) for key in thin._cache.keys()]
    assert entries and all(entry.states[s] is None for entry in entries for s in range(1, len(kept)) if not kept[s])
    stats = thin.stats()
    assert 0 < stats["mean_start_stage"] and stats["cache"]["peak_mb"] * 2 ** 20 <= budget
    # the same stream with every input kept (and room for it) starts later on average: dropping costs reruns
    full = assert_identical(qmodel, data, genomes, batch_size=16, keep_states="all")
    assert full.stats()["mean_start_stage"] > stats["mean_start_stage"]
    assert full.stats()["stage_fraction"] < stats["stage_fraction"] < 1.0
    # two parents announced instead of 25: each gets a larger share, and keeps every input again
    parents = [Individual(genes) for genes in genomes[:2]]
    for individual in parents:
        individual.fitness.values = thin(individual)
    thin.prepare_generation(parents, mu=2, reject=False)
    assert all(thin._kept_inputs[1:]) and thin._new_bytes[0] == full_entry


def test_generation_hint_keeps_only_parents_and_hall_of_fame(tiny_model, tiny_data):
    qmodel = quantize(tiny_model, bits=3)
    fast = IncrementalEvaluator(qmodel, tiny_data, batch_size=16)
    genomes = lineage(qmodel, seed=7, n=10)
    individuals = []
    for genes in [[]] + genomes:
        individual = Individual(genes)
        individual.fitness.values = fast(individual)
        individuals.append(individual)
    assert len(fast._cache) >= 8
    parents, hall = individuals[3:5], individuals[7:8]
    fast.prepare_generation(parents, mu=2, hall_of_fame=hall, reject=False)
    kept = set(fast._cache.keys())
    assert kept <= {(), *(fast.genome_key(ind) for ind in parents + hall)}
    assert {fast.genome_key(ind) for ind in parents + hall} <= kept
    unpruned = IncrementalEvaluator(qmodel, tiny_data, batch_size=16, prune=False)
    for individual in individuals:
        unpruned(individual)
    unpruned.prepare_generation(parents, mu=2, hall_of_fame=hall, reject=False)
    assert len(unpruned._cache) > len(fast._cache)  # without pruning nothing is dropped


def test_parents_are_evicted_last_and_offspring_below_the_bar_are_not_stored(tiny_model, tiny_data):
    cache = ActivationCache(3 * 4000)
    entries = [CacheEntry(name, ((name,),), [None, [torch.zeros(1000)]]) for name in "abcd"]
    for entry in entries[:3]:
        cache.insert(entry)
    cache.pin(["a"])
    cache.touch("b")  # "a" is now the least recently used, but pinned
    cache.insert(entries[3])
    assert set(cache.keys()) == {"a", "b", "d"}

    qmodel = quantize(tiny_model, bits=3)
    fast = IncrementalEvaluator(qmodel, tiny_data, batch_size=16)
    individuals = []
    for genes in lineage(qmodel, seed=9, n=6):
        individual = Individual(genes)
        individual.fitness.values = fast(individual)
        individuals.append(individual)
    bar = fast.prepare_generation(individuals, mu=3, reject=True)
    assert bar is not None and fast._cache._pinned == {fast.genome_key(ind) for ind in individuals}
    verdicts = []  # (at or above the bar, stored) of each offspring computed now
    for genes in lineage(qmodel, seed=10, n=30)[6:]:
        computed = fast.stats()["computed"]
        outcome = fast(genes)
        if fast.stats()["computed"] > computed:
            verdicts.append((outcome >= bar, fast.genome_key(genes) in fast._cache))
    assert all(above == stored for above, stored in verdicts)
    assert {above for above, _ in verdicts} == {True, False}
    assert fast.stats()["not_stored"] == sum(not above for above, _ in verdicts)
    keep_all = IncrementalEvaluator(qmodel, tiny_data, batch_size=16, store="all")
    for individual in individuals:
        keep_all(individual)
    keep_all.prepare_generation(individuals, mu=3, reject=True)
    for genes in lineage(qmodel, seed=10, n=30)[6:]:
        keep_all(genes)
    assert keep_all.stats()["not_stored"] == 0


def test_rebase_and_rewritten_weights_invalidate_stored_results(tiny_model, tiny_data):
    qmodel = quantize(tiny_model, bits=3)
    plain = Evaluator(qmodel, tiny_data, batch_size=16)
    fast = IncrementalEvaluator(qmodel, tiny_data, batch_size=16)
    genes = [(1, 5, 1)]
    assert fast(genes) == plain(genes)
    # weights rewritten by hand (as baselines.temporarily_rounded does) are noticed ...
    weight = qmodel.module.fc.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.data.copy_(torch.flip(saved, dims=[1]))
    assert fast(genes) == plain(genes) and fast([]) == plain([])
    with torch.no_grad():
        weight.data.copy_(saved)
    assert fast(genes) == plain(genes) and fast([]) == plain([])
    # ... and so is a new base
    states = qmodel.states_with([(0, i, 1) for i in range(36)])
    qmodel.rebase_(states)
    assert fast(genes) == plain(genes) and fast([]) == plain([])


def test_pickled_evaluator_rebuilds_its_split_and_agrees(tiny_model, tiny_data):
    qmodel = quantize(tiny_model, bits=3)
    fast = IncrementalEvaluator(qmodel, tiny_data, batch_size=16)
    genes = [(0, 1, 1), (1, 2, -1)]
    value = fast(genes)
    clone = pickle.loads(pickle.dumps(fast))
    assert clone(genes) == value
    assert clone([(0, 1, 1)]) == Evaluator(clone.qmodel, tiny_data, batch_size=16)([(0, 1, 1)])


def test_with_data_scores_other_data_and_matches_evaluator(tiny_model, tiny_data):
    qmodel = quantize(tiny_model, bits=3)
    inputs, targets = tiny_data
    fast = IncrementalEvaluator(qmodel, (inputs[:24], targets[:24]), batch_size=8)
    other = fast.with_data((inputs[24:], targets[24:]))
    assert isinstance(other, IncrementalEvaluator) and other.n_samples == 24
    genes = [(1, 0, 1)]
    assert other.scores(genes) == Evaluator(qmodel, (inputs[24:], targets[24:]), batch_size=8).scores(genes)
    assert fast.score_module(tiny_model) == Evaluator(qmodel, (inputs[:24], targets[:24]),
                                                      batch_size=8).score_module(tiny_model)
    assert fast.headline == "accuracy"


def mean_margin(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return float(outputs.gather(1, targets[:, None]).mean() - outputs.mean())


@pytest.mark.parametrize("metric", ["loss", mean_margin])
def test_other_metrics_are_bit_identical(tiny_model, tiny_data, metric):
    qmodel = quantize(tiny_model, bits=3)
    plain = Evaluator(qmodel, tiny_data, metric=metric, batch_size=16)
    fast = IncrementalEvaluator(qmodel, tiny_data, metric=metric, batch_size=16)
    assert not fast.rejecting_metric
    for genes in lineage(qmodel, seed=5, n=8):
        assert fast(genes) == plain(genes)


def test_bad_options_are_rejected(tiny_model, tiny_data):
    qmodel = quantize(tiny_model, bits=3)
    for options, match in (({"cache_bytes": -1}, "cache_bytes"), ({"memo_size": 0}, "memo_size"),
                           ({"threads": 0}, "threads"), ({"early_rejection": "yes"}, "early_rejection")):
        with pytest.raises(ValueError, match=match):
            IncrementalEvaluator(qmodel, tiny_data, **options)
    with pytest.raises(ValueError, match="keep_states='some'.*'auto' or 'all'"):
        IncrementalEvaluator(qmodel, tiny_data, keep_states="some")
    fast = IncrementalEvaluator(qmodel, tiny_data)
    with pytest.raises(ValueError, match="threshold"):
        fast.reject_below(float("nan"))


def changing_gene(fast: IncrementalEvaluator, layer: int, index: int) -> tuple[int, int, int]:
    """A gene that really moves weight ``index`` of ``layer`` (one level up or down, whichever is on the grid)."""
    for offset in (1, -1):
        if fast.genome_key([(layer, index, offset)]):
            return layer, index, offset
    raise AssertionError("no single-level move of this weight stays on the grid")


def test_reuse_bound_counts_the_stages_an_unlimited_cache_must_rerun(tiny_model, tiny_data):
    qmodel = quantize(tiny_model, bits=3)
    fast = IncrementalEvaluator(qmodel, tiny_data, batch_size=16)
    assert len(fast.split) == 2 and 0 in fast._patches  # conv (patched) | linear
    late, early = changing_gene(fast, 1, 5), changing_gene(fast, 0, 3)
    genomes = [[late], [late], [early], [early, late]]
    bound = fast.reuse_bound(genomes, costs=[1.0, 1.0])
    # [late]: reruns the linear stage (1); again: memo (0); [early]: the patched conv is free, the
    # linear stage reruns (1); [early, late]: resumes after [early]'s conv stage, reruns the linear (1)
    assert bound["memo_hits"] == 1 and bound["genomes"] == 4
    assert bound["work_fraction"] == pytest.approx(3 / 8)
    assert bound["speedup_bound"] == pytest.approx(8 / 3)
    # with a costly first stage, only genomes that change it pay for it: none here (it is patched)
    assert fast.reuse_bound(genomes, costs=[10.0, 1.0])["work_fraction"] == pytest.approx(3 / 44)
    # a first batch of 16 samples: conv 1->4 3x3 over 8x8 outputs, then linear 64->4 (2 FLOPs per MAC)
    assert fast.stage_flops() == [2 * 16 * (4 * 8 * 8) * 9, 2 * 16 * 64 * 4]
    costs = fast.stage_costs(repeats=1)
    assert len(costs) == 2 and all(c > 0 for c in costs)
    assert fast.reuse_bound(genomes)["speedup_bound"] >= 1.0
    with pytest.raises(ValueError, match="one per stage"):
        fast.reuse_bound(genomes, costs=[1.0])
    with pytest.raises(ValueError, match="repeats=0"):
        fast.stage_costs(repeats=0)


def test_a_module_left_in_training_mode_is_evaluated_in_eval_mode_and_left_as_it_was(resnet_setup):
    from deap_quant import BatchedEvaluator

    qmodel, data = resnet_setup
    genes = [(0, 5, 1), (3, 7, -1)]
    expected = Evaluator(qmodel, data, batch_size=16)(genes)
    running = {name: buffer.clone() for name, buffer in qmodel.module.named_buffers()}
    qmodel.module.train()  # a user's slip: batch statistics and running-stat updates would follow
    try:
        for evaluator in (Evaluator(qmodel, data, batch_size=16), IncrementalEvaluator(qmodel, data, batch_size=16),
                          BatchedEvaluator(qmodel, data, batch_size=16, population_batch=2)):
            assert evaluator(genes) == expected and evaluator.scores(genes)["accuracy"] == expected[0]
            assert all(module.training for module in qmodel.module.modules())
        assert all(torch.equal(buffer, running[name]) for name, buffer in qmodel.module.named_buffers())
    finally:
        qmodel.module.eval()
