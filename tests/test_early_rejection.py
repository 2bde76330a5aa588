"""Exact early rejection: it skips work but never changes what (mu+lambda) selects."""

from __future__ import annotations

import math

import pytest
from deap import tools

from deap_quant import Evaluator, IncrementalEvaluator, Individual, evolve, make_toolbox, quantize
from deap_quant.evaluation import announce_parents


def outcome(result) -> dict:
    """Everything a run decides, without wall times."""
    return {
        "population": [(list(ind), ind.fitness.values) for ind in result.population],
        "hall_of_fame": [(list(ind), ind.fitness.values) for ind in result.hall_of_fame],
        "logbook": [{k: v for k, v in record.items() if k != "seconds"} for record in result.logbook],
        "evaluations": result.evaluations,
        "best": result.best,
        "baseline": result.baseline,
    }


class Recording(Evaluator):
    """The plain evaluator, remembering every genome and fitness it computed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.record = []

    def __call__(self, genes=()):
        genes = list(genes)
        fitness = super().__call__(genes)
        self.record.append((genes, fitness))
        return fitness


def run_both(qmodel, data, batch_size, **options):
    fast = IncrementalEvaluator(qmodel, data, batch_size=batch_size)
    plain = Recording(qmodel, data, batch_size=batch_size)
    with_fast = evolve(qmodel, evaluator=fast, progress=False, **options)
    with_plain = evolve(qmodel, evaluator=plain, progress=False, **options)
    return fast, plain, with_fast, with_plain


@pytest.mark.parametrize("seed", [0, 1])
def test_selection_hall_of_fame_and_logbook_are_identical_on_a_tiny_model(tiny_model, tiny_data, seed):
    qmodel = quantize(tiny_model, bits=2)
    fast, plain, with_fast, with_plain = run_both(qmodel, tiny_data, 4, mu=6, lambda_=12, ngen=8, init_genes=3,
                                                  hof_size=3, seed=seed)
    assert outcome(with_fast) == outcome(with_plain)
    stats = fast.stats()
    assert stats["rejected"] > 0 and stats["samples_skipped"] > 0  # rejection did happen
    assert fast.threshold is None  # evolve switched it off afterwards
    # every fitness the plain run computed is what the fast run stored, or lies below its bound
    rejected = 0
    for genes, value in plain.record:
        stored = fast.stored(genes)
        if stored.exact:
            assert stored.fitness == value
        else:
            assert value < stored.fitness
            rejected += 1
    assert rejected > 0


def test_identical_on_digits_cnn_with_the_default_evolve(digits_zoo):
    qmodel = quantize(digits_zoo.model, bits=2)
    val = digits_zoo.data.val
    options = {"mu": 8, "lambda_": 16, "ngen": 4, "seed": 0, "batch_size": 64, "progress": False}
    fast_result = evolve(qmodel, val, fast=True, **options)
    plain_result = evolve(qmodel, val, fast=False, **options)
    assert outcome(fast_result) == outcome(plain_result)


@pytest.mark.parametrize("algorithm", ["mu,lambda", "mu+lambda", "simple"])
def test_a_threshold_left_on_the_evaluator_is_not_used(tiny_model, tiny_data, algorithm):
    """A caller's own threshold must not leak into evolve: not into generation 0, nor into the
    generations of algorithms that announce no parents."""
    qmodel = quantize(tiny_model, bits=2)
    fast = IncrementalEvaluator(qmodel, tiny_data, batch_size=4)
    fast.reject_below((0.99, 0.0))  # e.g. left over from the caller's own loop
    options = dict(mu=4, lambda_=8, ngen=3, init_genes=3, seed=0, algorithm=algorithm, progress=False)
    with_fast = evolve(qmodel, evaluator=fast, **options)
    with_plain = evolve(qmodel, evaluator=Evaluator(qmodel, tiny_data, batch_size=4), **options)
    assert outcome(with_fast) == outcome(with_plain)
    assert fast.threshold is None


def test_mu_comma_lambda_gets_no_threshold(tiny_model, tiny_data):
    qmodel = quantize(tiny_model, bits=2)
    fast, _, with_fast, with_plain = run_both(qmodel, tiny_data, 4, mu=4, lambda_=8, ngen=4, init_genes=3,
                                              algorithm="mu,lambda")
    assert outcome(with_fast) == outcome(with_plain)
    assert fast.stats()["rejected"] == 0


def individuals(values: list[float], first_index: int = 0) -> list[Individual]:
    out = []
    for position, value in enumerate(values):
        ind = Individual([(0, first_index + position, 1)])
        ind.fitness.values = (value, -1.0)
        out.append(ind)
    return out


def test_threshold_is_the_mu_th_parent_and_respects_the_hall_of_fame(tiny_model, tiny_data):
    qmodel = quantize(tiny_model, bits=2)
    fast = IncrementalEvaluator(qmodel, tiny_data, batch_size=4)
    parents = individuals([0.5, 0.9, 0.7, 0.6])
    assert fast.prepare_generation(parents, mu=3) == (0.6, -1.0)
    assert fast.prepare_generation(parents, mu=5) is None  # fewer parents than mu: no guarantee
    hall = tools.HallOfFame(3)
    hall.update(individuals([0.9, 0.2], first_index=10))
    assert fast.prepare_generation(parents, mu=3, hall_of_fame=hall) is None  # not full: anything may enter
    hall.update(individuals([0.4], first_index=20))
    assert fast.prepare_generation(parents, mu=3, hall_of_fame=hall) == (0.2, -1.0)
    assert fast.prepare_generation(parents, mu=3, reject=False) is None


def test_rejected_genome_gets_its_exact_fitness_when_asked_without_threshold(tiny_model, tiny_data):
    qmodel = quantize(tiny_model, bits=2)
    plain = Evaluator(qmodel, tiny_data, batch_size=4)
    fast = IncrementalEvaluator(qmodel, tiny_data, batch_size=4)
    genes = [(1, i, 1) for i in range(0, 256, 3)]
    truth = plain(genes)
    fast.reject_below(truth[0] + 0.5)  # unreachable: rejected as soon as provable
    bound = fast(genes)
    assert fast.is_rejected(genes) and bound[1] == math.inf and truth < bound
    assert fast.stats()["samples_skipped"] > 0
    assert fast.scores(genes) == plain.scores(genes)  # scores never reject
    fast.reject_below(None)
    assert fast(genes) == truth and not fast.is_rejected(genes)


def test_level_accuracy_is_decided_by_the_loss_so_far_and_ties_are_never_rejected(tiny_model, tiny_data):
    qmodel = quantize(tiny_model, bits=2)
    genes = [(1, 5, 1), (0, 2, -1)]
    inputs = tiny_data[0]
    with qmodel.applied(genes):
        targets = qmodel(inputs).argmax(1)  # every prediction right: only the loss can reject
    plain = Evaluator(qmodel, (inputs, targets), batch_size=8)
    fast = IncrementalEvaluator(qmodel, (inputs, targets), batch_size=8)
    truth = plain(genes)
    assert truth[0] == 1.0
    fast.reject_below((1.0, 0.0))  # a perfect loss: out after the first batch
    bound = fast(genes)
    assert fast.is_rejected(genes) and bound[0] == 1.0 and math.isfinite(bound[1])
    assert truth < bound < (1.0, 0.0)
    assert fast.stats()["samples_skipped"] == 40
    fast.reject_below(truth)  # a tie with the threshold is not "strictly below": computed exactly
    assert fast(genes) == truth and not fast.is_rejected(genes)


def test_announce_only_enables_rejection_when_it_is_provably_harmless(tiny_model, tiny_data):
    qmodel = quantize(tiny_model, bits=2)
    fast = IncrementalEvaluator(qmodel, tiny_data, batch_size=4)
    parents = individuals([0.5, 0.9, 0.7])
    assert announce_parents(fast, make_toolbox(qmodel, fast), parents, 2) == (0.7, -1.0)
    assert announce_parents(fast, make_toolbox(qmodel, fast, select="tournament"), parents, 2) is None
    assert fast.threshold is None
    wrapped = make_toolbox(qmodel, fast)
    wrapped.register("evaluate", lambda genes: fast(genes))
    assert announce_parents(fast, wrapped, parents, 2) is None
    assert announce_parents(fast, make_toolbox(qmodel, fast, select="nsga2"), parents, 2) is None
    assert announce_parents(Evaluator(qmodel, tiny_data), make_toolbox(qmodel, fast), parents, 2) is None


def test_a_parent_with_a_nan_loss_sets_no_threshold(tiny_model, tiny_data):
    qmodel = quantize(tiny_model, bits=2)
    fast = IncrementalEvaluator(qmodel, tiny_data, batch_size=4)
    parents = individuals([0.5, 0.9, 0.7])
    parents[0].fitness.values = (0.5, math.nan)  # e.g. logits that overflowed to inf
    assert fast.prepare_generation(parents, mu=2) is None and fast.threshold is None
    parents[0].fitness.values = (0.5, -math.inf)  # an infinite loss is a valid, if poor, fitness
    assert fast.prepare_generation(parents, mu=2) == (0.7, -1.0)
