"""examples/tasks.py runs every task end to end with a tiny budget."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from deap_quant import quantize
from deap_quant.data import CanvasConfig, digit_canvases
from deap_quant.zoo import RECIPES, load_model, recipes
from deap_quant.zoo.vision import train_digits_detector
from tests.checks import assert_rescored

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example():
    spec = importlib.util.spec_from_file_location("tasks_example", EXAMPLES / "tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tasks_example_runs_every_task(monkeypatch, capsys):
    pytest.importorskip("torchmetrics")
    # The detector recipe as it is, but on fewer canvases with two epochs (its full training takes ~1.5 min);
    # another version number keeps it apart from the real one in the cache.
    detector = RECIPES["digits-detector"]
    quick = dataclasses.replace(detector, version=detector.version + 1000,
                                data=lambda seed: digit_canvases(seed, CanvasConfig(n_train=96, n_val=24, n_test=24)),
                                train=lambda model, splits, seed: train_digits_detector(model, splits, seed, epochs=2))
    monkeypatch.setitem(recipes.RECIPES, "digits-detector", quick)
    results = load_example().main(mu=2, lambda_=2, ngen=1, progress=False)
    assert set(results) == {"digits-vgg", "digits-resnet", "digits-autoencoder", "digits-detector"}
    metrics = {name: result.metric for name, result in results.items()}
    assert metrics == {"digits-vgg": "accuracy", "digits-resnet": "accuracy", "digits-autoencoder": "mse",
                       "digits-detector": "map_50"}
    example = load_example()
    for name, result in results.items():
        assert result.evaluations == 2 + 2
        zoo = load_model(name, verbose=False)  # cached: the example's own model, quantized the same way
        qmodel = quantize(zoo.model, bits=example.BITS[name], scale_method="mse")
        assert_rescored(result, qmodel, zoo.data.val, zoo.data.test, zoo.recipe.new_metric())
    printed = capsys.readouterr().out
    assert "psnr: nearest test" in printed and "map: nearest test" in printed
