"""Rounding baselines (nearest, stochastic, AdaRound) and evolution started from them."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from deap_quant import Evaluator, evolve, quantize
from deap_quant.baselines import (
    AdaRoundConfig,
    Rounding,
    adaround,
    best_stochastic,
    changed_weights,
    float_module,
    float_weights,
    grid_positions,
    nearest_states,
    resolve_start,
    states_to_genes,
    stochastic_states,
    temporarily_rounded,
)


def _weights(qmodel):
    return [qmodel.dequantized_weights(layer) for layer in range(len(qmodel.layers))]


def _other_states(qmodel, seed=0):
    """Valid states that differ from the base in many weights."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, info.n_levels, info.shape, generator=generator).to(torch.uint8) for info in qmodel.layers]


def test_nearest_states_are_the_base_of_a_fresh_model_and_survive_a_rebase(tiny_model):
    qmodel = quantize(tiny_model, bits=2, scale_method="mse")
    nearest = nearest_states(qmodel)
    for layer, state in enumerate(nearest):
        assert torch.equal(state, qmodel.base_states(layer))
    qmodel.rebase_(_other_states(qmodel))
    assert changed_weights(qmodel, nearest) > 0
    for a, b in zip(nearest_states(qmodel), nearest):  # positions, not the base, decide
        assert torch.equal(a, b)


@pytest.mark.parametrize("scheme", ["uniform", "kmeans"])
def test_float_weights_are_recovered_from_grid_positions(tiny_model, scheme):
    qmodel = quantize(tiny_model, bits=3, scheme=scheme)
    modules = dict(tiny_model.named_modules())
    for layer, info in enumerate(qmodel.layers):
        torch.testing.assert_close(float_weights(qmodel, layer), modules[info.name].weight.detach(),
                                   atol=1e-5, rtol=1e-5)
    rebuilt = float_module(qmodel)
    inputs = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(rebuilt(inputs), tiny_model(inputs), atol=1e-4, rtol=1e-4)


def test_temporarily_rounded_writes_the_states_and_restores_bit_for_bit(tiny_model, tiny_data):
    qmodel = quantize(tiny_model, bits=2)
    before = _weights(qmodel)
    states = _other_states(qmodel)
    evaluator = Evaluator(qmodel, tiny_data)
    with temporarily_rounded(qmodel, states):
        for layer, state in enumerate(states):
            assert torch.equal(qmodel.dequantized_weights(layer), qmodel.grids[layer].dequantize(state))
        inside = evaluator([])
    # the same rounding through genes gives the same fitness
    assert evaluator(states_to_genes(qmodel, states)) == inside
    with pytest.raises(RuntimeError):
        with temporarily_rounded(qmodel, states):
            raise RuntimeError("boom")
    for a, b in zip(before, _weights(qmodel)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="must lie in 0..3"):
        with temporarily_rounded(qmodel, [s + 4 for s in states]):
            pass


def test_stochastic_rounding_picks_a_neighbour_with_the_fractional_probability(tiny_model):
    qmodel = quantize(tiny_model, bits=3, scale_method="mse")
    positions = grid_positions(qmodel)
    generator = torch.Generator().manual_seed(0)
    draws = [stochastic_states(qmodel, generator) for _ in range(300)]
    for layer, info in enumerate(qmodel.layers):
        low = positions[layer].floor().clamp(0, info.n_levels - 1)
        high = positions[layer].ceil().clamp(0, info.n_levels - 1)
        stacked = torch.stack([d[layer].to(torch.float32) for d in draws])
        assert bool(((stacked == low) | (stacked == high)).all())
        inside = (positions[layer] > 0) & (positions[layer] < info.n_levels - 1)
        up_rate = (stacked == high).float().mean(dim=0)[inside & (high > low)]
        expected = (positions[layer] - low)[inside & (high > low)]
        assert float((up_rate - expected).abs().mean()) < 0.05
    again = stochastic_states(qmodel, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(again, draws[0]))


def test_best_stochastic_keeps_the_draw_with_the_best_validation_fitness(tiny_model, tiny_data):
    qmodel = quantize(tiny_model, bits=2)
    before = _weights(qmodel)
    evaluator = Evaluator(qmodel, tiny_data)
    result = best_stochastic(qmodel, evaluator, draws=6, seed=3)
    assert isinstance(result, Rounding) and result.evaluations == 6
    assert len(result.details["draw_fitness"]) == 6
    with temporarily_rounded(qmodel, result.states):
        assert evaluator([])[0] == max(result.details["draw_fitness"])
    for a, b in zip(before, _weights(qmodel)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="draws=0"):
        best_stochastic(qmodel, evaluator, draws=0)


def test_adaround_rounds_each_weight_to_a_neighbour_and_reduces_the_first_layer_error(tiny_model, tiny_data):
    qmodel = quantize(tiny_model, bits=2, scale_method="mse")
    base = [qmodel.base_states(layer).clone() for layer in range(len(qmodel.layers))]
    result = adaround(qmodel, tiny_data, steps=150, batch_size=16, samples=48, seed=0)
    positions = grid_positions(qmodel)
    for layer, (info, state) in enumerate(zip(qmodel.layers, result.states)):
        assert state.shape == info.shape and state.dtype == torch.uint8
        low = positions[layer].floor().clamp(0, info.n_levels - 1)
        high = positions[layer].ceil().clamp(0, info.n_levels - 1)
        assert bool(((state.float() == low) | (state.float() == high)).all())
        assert torch.equal(qmodel.base_states(layer), base[layer])  # qmodel itself is not changed
    first = result.details["layers"][0]  # same float input for both: a pure reconstruction problem
    assert first["adaround_error"] < first["nearest_error"]
    assert first["flipped_vs_nearest"] > 0
    # deterministic for a seed, and usable as a new base
    again = adaround(qmodel, tiny_data, steps=150, batch_size=16, samples=48, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(again.states, result.states))
    qmodel.rebase_(result.states)
    assert changed_weights(qmodel, result.states) == 0


def test_adaround_quantized_input_target_and_float_model_argument(tiny_model, tiny_data):
    qmodel = quantize(tiny_model, bits=2)
    result = adaround(qmodel, tiny_data[0], float_model=tiny_model, steps=5, target="quantized")
    assert result.details["config"]["target"] == "quantized" and len(result.states) == 2
    assert tiny_model.training is False


def test_adaround_refuses_codebook_grids_and_bad_settings(tiny_model, tiny_data):
    with pytest.raises(ValueError, match="uniform grids"):
        adaround(quantize(tiny_model, bits=2, scheme="kmeans"), tiny_data, steps=2)
    for bad, match in (({"steps": 0}, "steps=0"), ({"lr": -1.0}, "lr=-1.0"), ({"warmup": 1.0}, "warmup=1.0"),
                       ({"target": "float"}, "target='float'"), ({"reg_weight": -0.1}, "reg_weight=-0.1")):
        with pytest.raises(ValueError, match=match):
            AdaRoundConfig(**bad)


def test_adaround_beats_nearest_on_digits_validation(digits_zoo):
    qmodel = quantize(digits_zoo.model, bits=2, scale_method="mse")
    evaluator = Evaluator(qmodel, digits_zoo.data.val)
    nearest_accuracy = evaluator.scores([])["accuracy"]
    result = adaround(qmodel, digits_zoo.data.train, steps=200, samples=256, seed=0)
    with temporarily_rounded(qmodel, result.states):
        adaround_accuracy = evaluator.scores([])["accuracy"]
    assert adaround_accuracy > nearest_accuracy + 0.02


def test_evolve_start_rebases_the_model_and_reports_the_start_as_baseline(tiny_model, tiny_data):
    inputs, targets = tiny_data
    val, test = (inputs[:24], targets[:24]), (inputs[24:], targets[24:])
    qmodel = quantize(tiny_model, bits=2)
    expected = adaround(copy.deepcopy(qmodel), inputs, steps=20, seed=4).states
    result = evolve(qmodel, val, test, mu=4, lambda_=6, ngen=2, seed=4, progress=False, start="adaround",
                    calibration=inputs, start_options={"steps": 20})
    for layer, state in enumerate(expected):
        assert torch.equal(qmodel.base_states(layer), state)
    assert result.details["start"]["name"] == "adaround" and result.details["start"]["changed_weights"] > 0
    assert result.baseline["val"] == Evaluator(qmodel, val).scores([])["accuracy"]
    assert result.baseline["test"] == Evaluator(qmodel, test).scores([])["accuracy"]
    # the result's genes apply to the rebased model
    assert Evaluator(qmodel, val).scores(result.best["genes"])["accuracy"] == result.best["val"]

    result = evolve(qmodel, val, test, mu=4, lambda_=6, ngen=1, progress=False, start="nearest")
    assert all(torch.equal(a, b) for a, b in zip(nearest_states(qmodel), [qmodel.base_states(i) for i in range(2)]))
    assert result.details["start"]["changed_weights"] == changed_weights(
        quantize(tiny_model, bits=2), expected)  # back from AdaRound to nearest
    result = evolve(qmodel, val, test, mu=4, lambda_=6, ngen=1, progress=False, start="stochastic",
                    start_options={"draws": 3})
    assert result.details["start"]["evaluations"] == 3


def test_evolve_start_errors(tiny_model, tiny_data):
    qmodel = quantize(tiny_model, bits=2)
    with pytest.raises(ValueError, match="calibration"):
        evolve(qmodel, tiny_data, mu=2, lambda_=2, ngen=1, progress=False, start="adaround")
    with pytest.raises(ValueError, match="start='best' is not valid"):
        evolve(qmodel, tiny_data, mu=2, lambda_=2, ngen=1, progress=False, start="best")
    with pytest.raises(ValueError, match="takes no options"):
        resolve_start("nearest", qmodel, options={"steps": 3})
    states = _other_states(qmodel, 1)
    assert resolve_start(states, qmodel).states is not None
    assert resolve_start(lambda q: states, qmodel).name == "<lambda>"


def test_nsga2_keeps_a_pareto_front_rescored_on_test(tiny_model, tiny_data):
    inputs, targets = tiny_data
    qmodel = quantize(tiny_model, bits=2)
    result = evolve(qmodel, (inputs[:24], targets[:24]), (inputs[24:], targets[24:]), mu=8, lambda_=12, ngen=4,
                    seed=1, algorithm="nsga2", progress=False)
    front = result.details["pareto_front"]
    assert front and all("test" in point for point in front)
    points = np.array([(p["val"], p["n_genes"]) for p in front])
    for i, (val, genes) in enumerate(points):  # no member dominates another
        others = np.delete(points, i, axis=0)
        assert not np.any((others[:, 0] >= val) & (others[:, 1] <= genes)
                          & ((others[:, 0] > val) | (others[:, 1] < genes)))
    assert all(type(ind).__name__ == "MultiIndividual" for ind in result.population)
