"""Every example runs with tiny settings (examples double as smoke tests)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tests.checks import assert_rescored

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_es_quickstart(digits_zoo):
    from deap_quant import quantize

    result = load("digits_es").main(mu=4, lambda_=6, ngen=2, progress=False)
    assert result.evaluations == 4 + result.logbook.select("nevals")[1] + result.logbook.select("nevals")[2]
    qmodel = quantize(digits_zoo.model, bits=2, scale_method="mse")  # the example's own quantization
    assert_rescored(result, qmodel, digits_zoo.data.val, digits_zoo.data.test)


def test_custom_toolbox(digits_zoo):
    hall_of_fame = load("custom_toolbox").main(mu=4, lambda_=6, ngen=2)
    assert len(hall_of_fame) == 3
    assert all(ind.fitness.valid for ind in hall_of_fame)
    from deap_quant import quantize
    from deap_quant.toolbox import gene_effects

    effects_of = gene_effects(quantize(digits_zoo.model, bits=2, scale_method="mse"))  # the example's model
    effects = [effects_of.changes(ind) for ind in hall_of_fame]
    assert len(set(effects)) == 3  # three different models, not one model under three gene lists
