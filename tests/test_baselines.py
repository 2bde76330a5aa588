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
    # min-max grid: on the MSE grid, nearest rounding of this 36-weight layer is already a local optimum
    qmodel = quantize(tiny_model, bits=2, scale_method="minmax")
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
    tiny_model.train()  # the user's model in training mode must stay so, with its weights untouched
    weights = {name: value.clone() for name, value in tiny_model.state_dict().items()}
    result = adaround(qmodel, tiny_data[0], float_model=tiny_model, steps=5, target="quantized")
    assert result.details["config"]["target"] == "quantized" and len(result.states) == 2
    assert tiny_model.training is True
    assert all(torch.equal(value, weights[name]) for name, value in tiny_model.state_dict().items())


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
    given = resolve_start(states, qmodel)
    assert all(torch.equal(a.view(-1), b.view(-1)) for a, b in zip(given.states, states))
    assert changed_weights(qmodel, given.states) == changed_weights(qmodel, states) > 0
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


# ---------------------------------------------------------------------------- AdaRound: targets, activation, report
def _conv_bn_model(activation: bool) -> torch.nn.Sequential:
    """Conv -> BatchNorm with far-from-identity statistics [-> ReLU] -> Linear, on 1x8x8 inputs."""
    from collections import OrderedDict

    from torch import nn
    torch.manual_seed(3)
    layers = [("conv", nn.Conv2d(1, 4, 3, padding=1)), ("bn", nn.BatchNorm2d(4))]
    layers += [("relu", nn.ReLU())] if activation else []
    layers += [("flatten", nn.Flatten()), ("fc", nn.Linear(4 * 8 * 8, 4))]
    model = nn.Sequential(OrderedDict(layers))
    with torch.no_grad():
        model.bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
        model.bn.running_var.copy_(torch.tensor([0.01, 4.0, 0.25, 9.0]))
        model.bn.weight.copy_(torch.tensor([1.5, -0.7, 2.0, 0.3]))
        model.bn.bias.copy_(torch.tensor([0.1, 0.2, -0.3, 0.4]))
    return model.eval()


def _layer_error(module, weight, inputs, target_module, post=lambda x: x):
    from torch.func import functional_call
    with torch.no_grad():
        out = post(functional_call(module, {"weight": weight}, (inputs,)))
        return float((out - post(target_module(inputs))).pow(2).sum(dim=1).mean())


@pytest.mark.parametrize("pass_float_model", [True, False])
def test_adaround_targets_the_folded_conv_when_batchnorm_is_folded(tiny_data, pass_float_model):
    from deap_quant.quantization import fold_bn

    model = _conv_bn_model(activation=False)
    qmodel = quantize(model, bits=3, scale_method="mse", fold_bn=True)
    inputs = tiny_data[0]
    result = adaround(qmodel, inputs, float_model=model if pass_float_model else None, steps=2, samples=48)
    folded = fold_bn(model)  # what the quantized layer computes, with float weights
    expected = _layer_error(qmodel.module.conv, qmodel.dequantized_weights(0), inputs, folded.conv)
    first = result.details["layers"][0]
    assert first["nearest_error"] == pytest.approx(expected, rel=1e-4)


def test_adaround_leaves_the_float_model_untouched_and_in_its_own_mode(tiny_data):
    model = _conv_bn_model(activation=True).train()
    model.fc.eval()  # a mixed state must come back as it was, module by module
    modes = {name: module.training for name, module in model.named_modules()}
    before = {key: value.clone() for key, value in model.state_dict().items()}
    for fold in (False, True):
        qmodel = quantize(model, bits=2, scale_method="mse", fold_bn=fold)
        adaround(qmodel, tiny_data[0], float_model=model, steps=2, samples=16)
        assert {name: module.training for name, module in model.named_modules()} == modes
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), key


def test_adaround_loss_includes_the_activation_that_follows_the_layer(tiny_data):
    model = _conv_bn_model(activation=True)
    inputs = tiny_data[0]
    for fold in (False, True):  # ReLU after BatchNorm (unfolded: conv -> bn -> relu, its loss sees both)
        qmodel = quantize(model, bits=2, scale_method="mse", fold_bn=fold)
        result = adaround(qmodel, inputs, steps=2, samples=48)
        first, last = result.details["layers"]
        assert first["activation"] == ("ReLU" if fold else "BatchNorm2d+ReLU") and last["activation"] is None
        bn = torch.nn.Identity() if fold else qmodel.module.bn
        reference = float_module(qmodel).conv
        expected = _layer_error(qmodel.module.conv, qmodel.dequantized_weights(0), inputs, reference,
                                post=lambda x, bn=bn: torch.relu(bn(x)))
        assert first["nearest_error"] == pytest.approx(expected, rel=1e-4)


def test_adaround_finds_functional_activations_and_none_before_a_residual_add(resnet_setup):
    qmodel, (inputs, _) = resnet_setup
    result = adaround(qmodel, inputs, steps=1, samples=8)
    activation = {entry["layer"]: entry["activation"] for entry in result.details["layers"]}
    assert activation["conv1"] == "BatchNorm2d+ReLU"  # stem: conv1 -> bn1 -> relu
    assert activation["layer1.0.conv1"] == "BatchNorm2d+ReLU"
    assert activation["layer1.0.conv2"] == "BatchNorm2d"  # bn2 -> (+ identity) -> relu: the ReLU is not its alone
    folded = adaround(quantize(resnet_setup[0].module, bits=4, fold_bn=True), inputs, steps=1, samples=8)
    activation = {entry["layer"]: entry["activation"] for entry in folded.details["layers"]}
    assert activation["layer1.0.conv1"] == "ReLU" and activation["layer1.0.conv2"] is None
    assert activation["fc"] is None

    class Functional(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 2, 3)
            self.conv2 = torch.nn.Conv2d(2, 2, 1)
            self.fc = torch.nn.Linear(2 * 6 * 6, 3)

        def forward(self, x):
            x = torch.nn.functional.leaky_relu(self.conv(x), 0.2)
            return self.fc(torch.nn.functional.relu(self.conv2(x), True).flatten(1))  # in place, positionally

    qmodel = quantize(Functional().eval(), bits=2)
    result = adaround(qmodel, torch.randn(8, 1, 8, 8), steps=1, samples=8)
    assert [entry["activation"] for entry in result.details["layers"]] == ["leaky_relu", "relu", None]


def test_adaround_reports_the_weights_left_undecided():
    from torch import nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    qmodel = quantize(model, bits=2, scale_method="mse")
    inputs = torch.randn(32, 6, generator=torch.Generator().manual_seed(2))
    # a vanishing learning rate leaves h at the fractional grid position it starts from
    result = adaround(qmodel, inputs, steps=1, lr=1e-12, samples=32)
    fractions = [position - position.floor() for position in grid_positions(qmodel)]
    low = sum(int(((f > 0.011) & (f < 0.989)).sum()) for f in fractions)
    high = sum(int(((f > 0.009) & (f < 0.991)).sum()) for f in fractions)
    assert low <= result.details["undecided"] <= high and low > 0
    assert result.details["undecided"] == sum(entry["undecided"] for entry in result.details["layers"])
    assert result.details["undecided_fraction"] == pytest.approx(result.details["undecided"] / qmodel.n_weights)
    # the regulariser drives every h to 0 or 1 when it has steps enough
    decided = adaround(qmodel, inputs, steps=400, lr=0.05, reg_weight=1.0, warmup=0.1, samples=32)
    assert decided.details["undecided"] < result.details["undecided"]


def test_adaround_default_is_stronger_and_steps_and_lr_are_checked():
    assert AdaRoundConfig().steps >= 5000
    for bad, match in (({"steps": 2.5}, "steps=2.5"), ({"lr": 0}, "lr=0"), ({"lr": float("nan")}, "lr=nan"),
                       ({"steps": True}, "steps=True"), ({"lr": True}, "lr=True"), ({"lr": float("inf")}, "lr=inf")):
        with pytest.raises(ValueError, match=match):
            AdaRoundConfig(**bad)


@pytest.mark.parametrize("convert", ["double", "bfloat16"])
def test_adaround_follows_a_converted_model_and_finds_the_same_rounding(tiny_model, tiny_data, convert):
    """AdaRound works where and in whatever dtype the model is: it optimises in float32 on the model's
    device, so a model converted after quantizing gets the rounding of the float32 one."""
    inputs, _ = tiny_data
    reference = quantize(tiny_model, bits=3)
    converted = copy.deepcopy(reference)
    getattr(converted.module, convert)()
    expected = adaround(reference, inputs, steps=30, samples=32, seed=0).states
    found = adaround(converted, inputs, steps=30, samples=32, seed=0).states
    assert all(torch.equal(a, b) for a, b in zip(found, expected))
    assert next(converted.module.parameters()).dtype == getattr(torch, convert)  # the model is left as it was


def test_adaround_chain_includes_torchvision_frozen_batchnorm():
    from torch import nn

    from deap_quant.baselines.adaround import following_activations

    ops = pytest.importorskip("torchvision.ops")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), ops.FrozenBatchNorm2d(4), nn.ReLU()).eval()
    model[1].running_mean.uniform_(-1, 1)
    model[1].bias.uniform_(-1, 1)
    label, post = following_activations(model, ["0"])["0"]
    assert label == "FrozenBatchNorm2d+ReLU"
    output = torch.randn(2, 4, 6, 6)
    assert torch.allclose(post(output), model[2](model[1](output)))
