"""Assertions shared by end-to-end tests: what a run reports must be what its genes do.

Elitism alone guarantees ``best["val"] >= baseline["val"]``, so that assertion cannot catch a
fitness that ignores the genes. These checks re-score the reported models with a fresh, plain
:class:`~deap_quant.Evaluator` (no cache, no incremental tricks) and check that the reported genes
really change the network.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from deap_quant import Evaluator

#: A small (mu+lambda) run; validation batches of 8 so that early rejection can stop an evaluation.
SEARCH = {"mu": 6, "lambda_": 12, "ngen": 4, "seed": 5, "init_genes": 4, "batch_size": 8, "progress": False}


def assert_rescored(result: Any, qmodel: Any, val: Any, test: Any, metric: Any = "accuracy") -> None:
    """Baseline and best (val and test) equal a fresh plain evaluation of their genes, and the
    best genes, when there are any, change the model's outputs on the validation inputs."""
    fresh_val = Evaluator(qmodel, val, metric)  # pass a fresh Metric object, never the run's
    fresh_test = fresh_val.with_data(test)
    headline = result.metric
    genes = [tuple(gene) for gene in result.best["genes"]]
    assert fresh_val.scores([])[headline] == pytest.approx(result.baseline["val"], abs=1e-9)
    assert fresh_test.scores([])[headline] == pytest.approx(result.baseline["test"], abs=1e-9)
    assert fresh_val.scores(genes)[headline] == pytest.approx(result.best["val"], abs=1e-9)
    assert fresh_test.scores(genes)[headline] == pytest.approx(result.best["test"], abs=1e-9)
    if not genes:
        assert result.best["val"] == pytest.approx(result.baseline["val"])
        return
    inputs = val[0][:64] if isinstance(val, (tuple, list)) else None
    if isinstance(inputs, torch.Tensor):
        with torch.no_grad():
            before = qmodel(inputs)
            with qmodel.applied(genes):
                after = qmodel(inputs)
            again = qmodel(inputs)
        assert not _same(before, after), "the best genes do not change the network's outputs"
        assert _same(before, again), "applying the best genes was not reverted exactly"


def _leaves(output: Any) -> list[torch.Tensor]:
    """The tensors of a model output (a tensor, or lists/tuples/dicts of them, as detectors return)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [leaf for key in sorted(output) for leaf in _leaves(output[key])]
    if isinstance(output, (list, tuple)):
        return [leaf for item in output for leaf in _leaves(item)]
    return []


def _same(a: Any, b: Any) -> bool:
    left, right = _leaves(a), _leaves(b)
    return len(left) == len(right) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(left, right))


def run_fingerprint(result: Any) -> dict:
    """What must not depend on how fitness was computed (backend, batching): hall of fame, final
    population, logbook without wall times, best, evaluations."""
    def members(individuals):
        return [([tuple(gene) for gene in ind], ind.fitness.values) for ind in individuals]
    return {"hall_of_fame": members(result.hall_of_fame), "population": members(result.population),
            "logbook": [{k: v for k, v in record.items() if k != "seconds"} for record in result.logbook],
            "best": result.best, "evaluations": result.evaluations}
