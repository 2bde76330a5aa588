"""Evolution options are checked where they are given, before any costly work (start roundings, baselines)."""

from __future__ import annotations

import pytest

from deap_quant import EvolutionConfig, evolve, quantize
from deap_quant.cli import main
from deap_quant.compare import RunConfig, compare, load_configs
from deap_quant.compare.configs import CompareSettings

from .conftest import make_tiny_model

BAD = [
    ("sampler", "residul", "sampler='residul' is not valid; use 'uniform' or 'residual'"),
    ("layer_choice", "largest", "layer_choice='largest' is not valid; use 'uniform', 'size' or a list of per-layer"),
    ("layer_choice", [1.0, -1.0], "layer_choice=[1.0, -1.0] is not valid; use 'uniform', 'size' or a list of"),
    ("crossover", "two_point", "crossover='two_point' is not valid; use one of uniform, one_point, layer_swap or None"),
    ("max_offset", 0, "max_offset=0 is not valid; use an integer >= 1"),
    ("max_offset", True, "max_offset=True is not valid; use an integer >= 1"),
]


@pytest.mark.parametrize("name, value, message", BAD)
def test_evolution_config_refuses_a_bad_value_naming_it_and_the_valid_ones(name, value, message):
    with pytest.raises(ValueError) as error:
        EvolutionConfig(**{name: value})
    assert message in str(error.value)


def test_evolution_config_accepts_every_valid_value():
    for sampler in ("uniform", "residual"):
        for crossover in ("uniform", "one_point", "layer_swap"):
            EvolutionConfig(sampler=sampler, crossover=crossover, layer_choice="size", max_offset=2)
    EvolutionConfig(crossover=None, cxpb=0.0, layer_choice=[1, 0.5])


@pytest.mark.parametrize("name, value, message", BAD)
def test_run_config_and_load_configs_refuse_a_bad_evolution_value(name, value, message):
    with pytest.raises(ValueError, match="config 'es'") as error:
        RunConfig("es", evolution={name: value})
    assert message in str(error.value)
    with pytest.raises(ValueError) as error:
        load_configs({"configs": [{"name": "es", "evolution": {name: value}}]})
    assert message in str(error.value)
    with pytest.raises(ValueError) as error:  # the file's own defaults
        load_configs({"configs": [{"name": "es"}], "evolution": {name: value}})
    assert message in str(error.value)
    with pytest.raises(ValueError) as error:
        CompareSettings(evolution={name: value})
    assert message in str(error.value)


def test_compare_refuses_an_invalid_combination_before_any_baseline_runs(tiny_model, monkeypatch):
    called = []
    monkeypatch.setattr("deap_quant.compare.running.adaround", lambda *a, **k: called.append("adaround"))
    monkeypatch.setattr("deap_quant.compare.running._load_model", lambda *a, **k: called.append("model"))
    configs = [RunConfig("adaround", kind="baseline", method="adaround"),
               RunConfig("es", start="adaround", evolution={"cxpb": 0.5, "mutpb": 0.8})]
    with pytest.raises(ValueError, match="config 'es': cxpb \\+ mutpb = 1.3 is not valid"):
        compare((tiny_model, None), configs, seeds=1, progress=False)
    assert called == []


def test_evolve_refuses_a_bad_option_before_computing_its_start(tiny_data):
    called = []

    def start(qmodel):
        called.append(True)
        return [qmodel.base_states(layer) for layer in range(len(qmodel.layers))]

    with pytest.raises(ValueError, match="sampler='residul' is not valid"):
        evolve(quantize(make_tiny_model(), bits=2), tiny_data, start=start, sampler="residul", progress=False)
    assert called == []


@pytest.mark.parametrize("argv, message", [
    (["--sampler", "bogus"], "sampler='bogus' is not valid"),
    (["--layer-choice", "bogus"], "layer_choice='bogus' is not valid"),
    (["--crossover", "two_point"], "crossover='two_point' is not valid"),
])
def test_cli_refuses_a_bad_evolution_option_before_loading_the_model(tmp_path, monkeypatch, capsys, argv, message):
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr("deap_quant.cli._load_float_model", load)
    assert main(["run", *argv, "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deap-quant: error: ") and message in err and len(err.strip().splitlines()) == 1
