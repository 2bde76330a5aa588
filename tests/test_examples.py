"""Every example runs with tiny settings (examples double as smoke tests)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_es_quickstart(digits_zoo):
    result = load("digits_es").main(mu=4, lambda_=6, ngen=2, progress=False)
    assert result.evaluations == 4 + result.logbook.select("nevals")[1] + result.logbook.select("nevals")[2]
    assert result.best["val"] >= result.baseline["val"]
    assert 0.0 <= result.best["test"] <= 1.0


def test_custom_toolbox(digits_zoo):
    hall_of_fame = load("custom_toolbox").main(mu=4, lambda_=6, ngen=2)
    assert len(hall_of_fame) == 3
    assert all(ind.fitness.valid for ind in hall_of_fame)
