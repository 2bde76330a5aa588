"""Quantization: grids, nearest rounding, layer selection, frozen model, gene application."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from deap_quant import GeneError, QuantConfig, quantize
from deap_quant.quantization.grids import fit_codebook_grid, fit_uniform_grid

from .conftest import make_tiny_model


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_uniform_grid_rounds_to_nearest_level(bits, symmetric):
    weight = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(bits))
    grid = fit_uniform_grid(weight, bits, per_channel=True, symmetric=symmetric, scale_method="minmax")
    states, residual = grid.quantize(weight)
    assert grid.n_levels == 2 ** bits
    assert int(states.min()) >= 0 and int(states.max()) < 2 ** bits
    values = grid.dequantize(states)
    # Every weight sits on its nearest level: no level of its channel is strictly closer.
    levels = (torch.arange(2 ** bits, dtype=torch.float32)[None, :] - grid.zero_point[:, None]) * grid.scale[:, None]
    distance_to_all = (weight.reshape(6, -1, 1) - levels[:, None, :]).abs()
    chosen = (weight - values).abs().reshape(6, -1)
    assert torch.all(chosen <= distance_to_all.min(dim=2).values + 1e-6)
    # min-max grids clip nothing, so residuals stay within half a level
    assert residual.abs().max() <= 0.5 + 1e-5


def test_mse_scale_has_lower_error_than_minmax():
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    weight[0, 0] = 12.0  # an outlier that a max-abs grid wastes its levels on
    errors = {}
    for method in ("minmax", "mse"):
        grid = fit_uniform_grid(weight, 2, per_channel=True, symmetric=True, scale_method=method)
        states, _ = grid.quantize(weight)
        errors[method] = float((grid.dequantize(states) - weight).pow(2).sum())
    assert errors["mse"] < errors["minmax"]


def test_per_tensor_grid_has_one_scale():
    weight = torch.randn(5, 7)
    grid = fit_uniform_grid(weight, 4, per_channel=False, symmetric=True, scale_method="minmax")
    assert grid.scale.shape == (1,)


def test_codebook_grid_levels_are_sorted_and_nearest():
    weight = torch.randn(4, 200, generator=torch.Generator().manual_seed(3))
    grid = fit_codebook_grid(weight, 2, per_channel=True)
    assert grid.codebook.shape == (4, 4)
    assert torch.all(grid.codebook[:, 1:] >= grid.codebook[:, :-1])
    states, _ = grid.quantize(weight)
    values = grid.dequantize(states)
    nearest = (weight[:, :, None] - grid.codebook[:, None, :]).abs().min(dim=2).values
    assert torch.allclose((weight - values).abs(), nearest, atol=1e-6)


def test_conv_transpose_uses_output_channel_axis():
    layer = nn.ConvTranspose2d(3, 5, 3)
    qmodel = quantize(nn.Sequential(layer), bits=4)
    grid = qmodel.grids[0]
    assert grid.layout.axis == 1 and grid.scale.shape == (5,)


def test_quantize_copies_and_freezes(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    qmodel = quantize(tiny_model, bits=2)
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(value, before[key]), "the user's model must not change"
    assert not qmodel.module.training
    assert all(not p.requires_grad for p in qmodel.module.parameters())
    table = qmodel.layer_table()
    assert [(i.name, i.kind, i.shape, i.numel, i.n_levels) for i in table] == [
        ("conv", "Conv2d", (4, 1, 3, 3), 36, 4), ("fc", "Linear", (4, 64), 256, 4)]
    # the module holds exactly the dequantized base states
    for layer, info in enumerate(table):
        expected = qmodel.grids[layer].dequantize(qmodel.base_states(layer))
        assert torch.equal(dict(qmodel.module.named_modules())[info.name].weight, expected)
    # biases are not quantized
    assert torch.equal(qmodel.module.fc.bias, tiny_model.fc.bias)


def test_layer_filter_by_pattern_and_callable(tiny_model):
    assert [info.name for info in quantize(tiny_model, layers="fc*").layers] == ["fc"]
    assert [info.name for info in quantize(tiny_model, layers=["conv", "fc"]).layers] == ["conv", "fc"]
    only_conv = quantize(tiny_model, layers=lambda module, name: isinstance(module, nn.Conv2d))
    assert [info.name for info in only_conv.layers] == ["conv"]
    with pytest.raises(ValueError, match="matches no quantizable layer; available: conv, fc"):
        quantize(tiny_model, layers="decoder.*")


@pytest.mark.parametrize("kwargs, message", [
    ({"bits": 1}, "bits=1 is not valid"),
    ({"bits": 9}, "bits=9 is not valid"),
    ({"scheme": "log"}, "scheme='log' is not valid"),
    ({"scale_method": "percentile"}, "scale_method='percentile' is not valid"),
])
def test_bad_config_names_the_value(tiny_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        quantize(tiny_model, **kwargs)


def test_model_without_quantizable_layers_and_nan_weights(tiny_model):
    with pytest.raises(ValueError, match="no quantizable layers"):
        quantize(nn.Sequential(nn.ReLU()))
    tiny_model.fc.weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'fc' has NaN or infinite weights"):
        quantize(tiny_model)


def test_residual_points_to_the_level_rounding_did_not_take(tiny_model):
    qmodel = quantize(tiny_model, bits=3, scale_method="minmax")
    grid = qmodel.grids[1]
    residual = torch.from_numpy(qmodel.residuals()[1]).reshape(4, 64)
    position = tiny_model.fc.weight / grid.scale[:, None] + grid.zero_point[:, None]
    assert torch.allclose(qmodel.base_states(1).float() + residual, position, atol=1e-5)


def _weights(qmodel):
    return [qmodel.dequantized_weights(i) for i in range(len(qmodel.layers))]


def test_applied_changes_only_gene_weights_and_restores(tiny_model):
    qmodel = quantize(tiny_model, bits=2)
    before = _weights(qmodel)
    state = int(qmodel.base_states(1).view(-1)[5])
    offset = 1 if state < 3 else -1
    with qmodel.applied([(1, 5, offset)]):
        during = _weights(qmodel)
        changed = (during[1] != before[1]).view(-1).nonzero().view(-1).tolist()
        assert changed == [5]
        assert torch.equal(during[0], before[0])
        expected = qmodel.grids[1].dequantize_at(torch.tensor([state + offset]), torch.tensor([5]))
        assert torch.equal(during[1].view(-1)[5:6], expected)
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(qmodel)))


def test_offsets_are_clipped_to_the_grid_and_duplicates_add(tiny_model):
    qmodel = quantize(tiny_model, bits=2)
    states = qmodel.states_with([(0, 0, 2 ** 80), (0, 1, -100), (1, 2, 1), (1, 2, 1)])
    assert int(states[0].view(-1)[0]) == 3 and int(states[0].view(-1)[1]) == 0
    base = int(qmodel.base_states(1).view(-1)[2])
    assert int(states[1].view(-1)[2]) == min(base + 2, 3)


def test_setting_states_matches_applying_the_genes_and_reverts_exactly(tiny_model):
    qmodel = quantize(tiny_model, bits=3)
    before = _weights(qmodel)
    genes = [(0, 3, 1), (1, 7, -2), (1, 9, 1)]
    states = qmodel.states_with(genes)
    changes = [(layer, index, states[layer].view(-1)[list(index)].tolist()) for layer, index in ((0, (3,)), (1, (7, 9)))]
    with qmodel.applied(genes):
        expected = _weights(qmodel)
    with qmodel.states_set(changes):
        assert all(torch.equal(a, b) for a, b in zip(expected, _weights(qmodel)))
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(qmodel)))
    with pytest.raises(ValueError, match="lie in 0..7"):
        qmodel.set_states_([(0, (3,), (8,))])
    with pytest.raises(ValueError, match="match the indices"):
        qmodel.set_states_([(0, (3, 4), (1,))])
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(qmodel)))


def test_revert_happens_when_the_body_raises(tiny_model):
    qmodel = quantize(tiny_model, bits=2)
    before = _weights(qmodel)
    with pytest.raises(RuntimeError, match="boom"):
        with qmodel.applied([(0, 3, 1), (1, 7, -1)]):
            raise RuntimeError("boom")
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(qmodel)))


@pytest.mark.parametrize("genes, message", [
    ([(2, 0, 1)], "layer=2 is out of range; valid layers are 0..1"),
    ([(-1, 0, 1)], "layer=-1 is out of range"),
    ([(0, 36, 1)], "index=36 is out of range for layer 0; valid indices are 0..35"),
    ([(0, 1.5, 1)], "index=1.5 must be an integer"),
    ([(0, 1)], "is not a \\(layer, index, offset\\) triple"),
    ([(0, 2 ** 70, 1)], "index=1180591620717411303424 is out of range for layer 0; valid indices are 0..35"),
    ([(np.int64(0), 40, 1)], "gene #1 \\(0, 40, 1\\): index=40"),
    (5, "genes must be an iterable"),
])
def test_bad_genes_are_rejected_before_any_weight_changes(tiny_model, genes, message):
    qmodel = quantize(tiny_model, bits=2)
    before = _weights(qmodel)
    with pytest.raises(GeneError, match=message):
        qmodel.apply_([(1, 0, 1), *genes] if isinstance(genes, list) else genes)
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(qmodel)))


_MODEL = quantize(make_tiny_model(3), bits=2, scale_method="mse")
_BEFORE = _weights(_MODEL)
_gene = st.tuples(st.integers(0, 1), st.integers(0, 35), st.integers(-5, 5))


@settings(max_examples=120, deadline=None)
@given(genes=st.lists(_gene, max_size=40), edge=st.sampled_from([-3, -1, 1, 3]))
def test_apply_revert_is_bit_exact_for_any_gene_list(genes, edge):
    # include offsets that run off both ends of the grid, and duplicates on one weight
    genes = genes + [(0, 0, edge), (0, 0, edge), (1, 255, -edge)]
    handle = _MODEL.apply_(genes)
    expected_states = _MODEL.states_with(genes)
    for layer in range(2):
        assert torch.equal(_MODEL.dequantized_weights(layer),
                           _MODEL.grids[layer].dequantize(expected_states[layer]))
    _MODEL.revert_(handle)
    for layer in range(2):
        assert torch.equal(_MODEL.dequantized_weights(layer), _BEFORE[layer])


def test_rebase_makes_new_states_the_base(tiny_model):
    qmodel = quantize(tiny_model, bits=3)
    original_position = [s.float() + torch.from_numpy(r).view(s.shape) for s, r in
                         zip((qmodel.base_states(i) for i in range(2)), qmodel.residuals())]
    new_states = qmodel.states_with([(0, 0, 1), (1, 10, -1)])
    qmodel.rebase_(new_states)
    assert torch.equal(qmodel.base_states(0), new_states[0])
    assert torch.equal(qmodel.dequantized_weights(1), qmodel.grids[1].dequantize(new_states[1]))
    for layer in range(2):  # residuals follow the base, the continuous position does not move
        position = qmodel.base_states(layer).float() + torch.from_numpy(qmodel.residuals()[layer]).view(
            new_states[layer].shape)
        assert torch.allclose(position, original_position[layer], atol=1e-5)
    with pytest.raises(ValueError, match="must lie in 0..7"):
        qmodel.rebase_([s + 9 for s in new_states])


def test_quant_config_round_trip():
    config = QuantConfig(bits=3, per_channel=False, scale_method="mse")
    assert config.to_dict()["bits"] == 3
    with pytest.raises(ValueError, match="per_channel=1 is not valid"):
        QuantConfig(per_channel=1)


def test_kmeans_model_evaluates(tiny_model, tiny_data):
    qmodel = quantize(tiny_model, bits=2, scheme="kmeans")
    assert qmodel.layers[0].n_levels == 4
    with qmodel.applied([(0, 0, 1)]):
        out = qmodel(tiny_data[0])
    assert out.shape == (48, 4) and np.isfinite(out.numpy()).all()


# ---------------------------------------------------------------------------- grid ranges and MSE scales
def _levels(grid) -> torch.Tensor:
    """Every channel's level values, [channels, n_levels]."""
    states = torch.arange(grid.n_levels, dtype=torch.float32)[None, :]
    return (states - grid.zero_point[:, None]) * grid.scale[:, None]


def _channel_errors(grid, weight: torch.Tensor) -> torch.Tensor:
    states, _ = grid.quantize(weight)
    return (grid.dequantize(states) - weight).pow(2).reshape(weight.shape[0], -1).sum(dim=1)


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_narrow_range_grid_is_symmetric_with_one_level_fewer(bits):
    weight = torch.randn(6, 20, generator=torch.Generator().manual_seed(bits))
    for method in ("minmax", "mse"):
        grid = fit_uniform_grid(weight, bits, per_channel=True, symmetric=True, scale_method=method,
                                grid_range="narrow")
        assert grid.n_levels == 2 ** bits - 1
        levels = _levels(grid)
        assert torch.allclose(levels, -levels.flip(1), atol=1e-6)  # {-L, ..., 0, ..., L} * scale
        states, _ = grid.quantize(weight)
        assert int(states.max()) <= 2 ** bits - 2
        if method == "minmax":  # the largest |w| of each channel lies exactly on the outermost level
            assert torch.allclose(levels[:, -1], weight.abs().max(dim=1).values, rtol=1e-6)
    qmodel = quantize(make_tiny_model(), bits=bits, range="narrow")
    assert [info.n_levels for info in qmodel.layers] == [2 ** bits - 1] * 2
    assert qmodel.config["range"] == "narrow"


@pytest.mark.parametrize("bits", [2, 3])
def test_mse_search_reaches_steps_beyond_the_old_clipping_cap(bits):
    """Weights on the levels {-(2**(bits-1)-1), ..., 2**(bits-1)-1} * c are represented exactly by the
    full-range grid with step c, a step above PyTorch's min-max step max|w| / (2**bits - 1) * 2 (the old
    search's upper end): the MSE search must find it."""
    generator = torch.Generator().manual_seed(0)
    top = 2 ** (bits - 1) - 1
    steps = torch.tensor([0.3, 1.0, 2.5])
    integers = torch.randint(-top, top + 1, (3, 40), generator=generator).float()
    integers[:, 0], integers[:, 1] = top, -top
    weight = integers * steps[:, None]
    grid = fit_uniform_grid(weight, bits, per_channel=True, symmetric=True, scale_method="mse", grid_range="full")
    assert torch.allclose(grid.scale, steps, rtol=1e-4)
    assert float(_channel_errors(grid, weight).max()) < 1e-8


def test_auto_range_puts_the_extra_level_on_the_side_that_lowers_the_error():
    weight = torch.tensor([[0.0, 1.0, 2.0, 2.0, 1.0, -1.0],    # positive-heavy: needs {-1, 0, 1, 2} * 1
                           [0.0, -1.0, -2.0, -2.0, 1.0, -1.0]])  # negative-heavy: {-2, -1, 0, 1} * 1
    for method in ("mse", "minmax"):
        grid = fit_uniform_grid(weight, 2, per_channel=True, symmetric=True, scale_method=method, grid_range="auto")
        assert grid.n_levels == 4
        assert grid.zero_point.tolist() == [1.0, 2.0]
        assert float(_channel_errors(grid, weight).max()) < 1e-10
    # on any weights, per channel: auto <= full <= narrow (the levels of each are a subset of the next's)
    weight = torch.randn(16, 30, generator=torch.Generator().manual_seed(5)) * torch.rand(16, 1) * 3
    errors = {r: _channel_errors(fit_uniform_grid(weight, 2, per_channel=True, symmetric=True, scale_method="mse",
                                                  grid_range=r), weight) for r in ("auto", "full", "narrow")}
    assert torch.all(errors["auto"] <= errors["full"] + 1e-6) and torch.all(errors["full"] <= errors["narrow"] + 1e-6)
    assert float(errors["auto"].sum()) < float(errors["full"].sum())


def test_mse_default_range_is_auto_and_minmax_stays_the_full_range_straw_man(tiny_model):
    assert QuantConfig(scale_method="mse").range == "auto"
    assert QuantConfig().range == "full" and QuantConfig(symmetric=False, scale_method="mse").range == "full"
    assert QuantConfig(scheme="kmeans", scale_method="mse").range == "full"
    assert quantize(tiny_model, bits=2, scale_method="mse").config["range"] == "auto"
    minmax = quantize(tiny_model, bits=2).grids[1]  # PyTorch's observer convention, unchanged
    bound = tiny_model.fc.weight.abs().max(dim=1).values
    assert torch.allclose(minmax.scale, bound / 1.5) and minmax.zero_point.tolist() == [2.0] * 4
    for kwargs, message in (({"range": "half"}, "range='half' is not valid; use one of full, narrow, auto"),
                            ({"range": "narrow", "symmetric": False}, "range='narrow' needs symmetric=True"),
                            ({"range": "auto", "scheme": "kmeans"}, "range='auto' needs scheme='uniform'")):
        with pytest.raises(ValueError, match=message):
            QuantConfig(**kwargs)
    assert QuantConfig(**QuantConfig(scale_method="mse").to_dict()) == QuantConfig(scale_method="mse")


@pytest.mark.parametrize("grid_range", ["narrow", "auto"])
def test_genes_and_baselines_stay_on_narrow_and_auto_grids(tiny_model, tiny_data, grid_range):
    from deap_quant.baselines import adaround, nearest_states, stochastic_states

    qmodel = quantize(tiny_model, bits=2, scale_method="mse", range=grid_range)
    levels = 3 if grid_range == "narrow" else 4
    assert [info.n_levels for info in qmodel.layers] == [levels, levels]
    for layer in range(2):
        assert torch.equal(nearest_states(qmodel)[layer], qmodel.base_states(layer))
    with qmodel.applied([(0, 0, 9), (1, 3, -9)]):  # offsets clip to the grid's own ends
        assert float(qmodel.dequantized_weights(0).view(-1)[0]) == pytest.approx(float(_levels(qmodel.grids[0])[0, -1]))
        assert float(qmodel.dequantized_weights(1).view(-1)[3]) == pytest.approx(float(_levels(qmodel.grids[1])[0, 0]))
    drawn = stochastic_states(qmodel, torch.Generator().manual_seed(0))
    rounded = adaround(qmodel, tiny_data, steps=5, samples=16).states
    for states in (drawn, rounded):
        assert all(int(s.max()) < levels for s in states)


# ------------------------------------------------------------------------------ torchvision's FrozenBatchNorm2d
def _frozen_bn_model() -> nn.Sequential:
    """Conv -> torchvision FrozenBatchNorm2d (far-from-identity statistics) -> ReLU."""
    ops = pytest.importorskip("torchvision.ops")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), ops.FrozenBatchNorm2d(4), nn.ReLU())
    norm = model[1]
    norm.running_mean.uniform_(-1, 1)
    norm.running_var.uniform_(0.5, 2)
    norm.weight.uniform_(-2, 2)
    norm.bias.uniform_(-1, 1)
    return model.eval()


def test_fold_bn_folds_torchvision_frozen_batchnorm():
    from deap_quant.quantization.fold import fold_bn, foldable_pairs

    model = _frozen_bn_model()
    assert foldable_pairs(model) == [("0", "1")]
    folded = fold_bn(model)
    assert isinstance(folded[1], nn.Identity)
    inputs = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (folded(inputs) - model(inputs)).abs().max() < 1e-5
    assert isinstance(quantize(model, bits=4, per_channel=False, fold_bn=True).module[1], nn.Identity)
    assert not isinstance(quantize(model, bits=4, per_channel=False).module[1], nn.Identity)


# ------------------------------------------------------------------------------ revert order, rebase while applied
def test_revert_out_of_order_is_refused_and_in_order_restores_the_base(tiny_model):
    qmodel = quantize(tiny_model, bits=3)
    before = _weights(qmodel)
    first = qmodel.apply_([(0, 0, 2)])
    second = qmodel.apply_([(0, 0, -2), (1, 3, 1)])
    with pytest.raises(ValueError, match="out of order.*revert the last applied first"):
        qmodel.revert_(first)
    assert not first.reverted  # refused: nothing was touched
    qmodel.revert_(second)
    qmodel.revert_(first)
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(qmodel)))
    assert qmodel.revision == (0, ())
    qmodel.revert_(first)  # reverting twice stays a no-op


def test_rebase_while_genes_are_applied_is_refused(tiny_model):
    qmodel = quantize(tiny_model, bits=3)
    before = _weights(qmodel)
    new_states = qmodel.states_with([(0, 0, 1)])
    with qmodel.applied([(1, 3, 1)]):
        with pytest.raises(ValueError, match="rebase_ while 1 write"):
            qmodel.rebase_(new_states)
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(qmodel)))
    qmodel.rebase_(new_states)  # with nothing open it works
    assert torch.equal(qmodel.base_states(0), new_states[0])
