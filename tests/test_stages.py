"""Stage splits: the staged forward pass equals the plain one bit for bit, and cached inputs stay intact."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from deap_quant.evaluation import Stage, split_model
from deap_quant.evaluation.patches import ChannelPatch
from deap_quant.quantization.quantize import quantizable_layers


def quantized_names(model: nn.Module) -> list[str]:
    return [name for name, _ in quantizable_layers(model)]


def small_resnet() -> ResNet:
    torch.manual_seed(0)
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5).eval()


def staged_equals_plain(model: nn.Module, split, inputs: torch.Tensor) -> bool:
    with torch.no_grad():
        return torch.equal(split.run(inputs), model(inputs))


def test_sequential_is_cut_before_quantized_layers(tiny_model, tiny_data):
    split = split_model(tiny_model, quantized=quantized_names(tiny_model), sample=tiny_data[0][:8])
    assert len(split) == 2  # [conv, relu, pool, flatten] [fc]: cut before each quantized layer
    assert split.stages_of_weights([tiny_model.conv.weight, tiny_model.fc.weight]) == [0, 1]
    # a convolution followed by channel-wise operations can be patched; a Linear layer never is
    assert split.stages[0].patch is not None and split.stages[1].patch is None
    assert staged_equals_plain(tiny_model, split, tiny_data[0])
    # resuming from the state between the stages gives the same output too
    with torch.no_grad():
        middle = split.run(tiny_data[0], stop=1)
        assert torch.equal(split.run(middle, start=1), tiny_model(tiny_data[0]))


def test_channel_patch_recomputes_changed_channels_exactly(tiny_model, tiny_data):
    split = split_model(tiny_model, quantized=quantized_names(tiny_model), sample=tiny_data[0])
    split.verify_patches([tiny_data[0], tiny_data[0][:5]])
    patch = split.stages[0].patch
    assert patch is not None
    with torch.no_grad():
        before = split.stages[0](tiny_data[0])
        tiny_model.conv.weight[2, 0, 1, 1] += 0.5  # output channel 2 changes
        after = split.stages[0](tiny_data[0])
        patched = patch(tiny_data[0], before, [2])
    assert torch.equal(patched[0], after[0]) and not torch.equal(before[0], after[0])


def test_a_patch_that_does_not_reproduce_the_stage_is_dropped(tiny_model, tiny_data):
    split = split_model(tiny_model, quantized=quantized_names(tiny_model), sample=tiny_data[0])
    right = split.stages[0].patch
    wrong = ChannelPatch(nn.Conv2d(1, 4, 3, padding=1), steps=right.steps, flatten=True, layout=(None,))
    split.stages[0].patch = wrong
    split.verify_patches([tiny_data[0]])
    assert split.stages[0].patch is None


def test_resnet_is_cut_inside_residual_blocks_and_stays_bit_identical():
    model = small_resnet()
    inputs = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    names = quantized_names(model)
    split = split_model(model, quantized=names, sample=inputs)
    assert split.kind == "fx"
    modules = dict(model.named_modules())
    stage_of = dict(zip(names, split.stages_of_weights([modules[n].weight for n in names])))
    # conv1 and conv2 of one block are in different stages: the skip tensor crosses the cut
    assert stage_of["layer2.0.conv1"] < stage_of["layer2.0.conv2"] < stage_of["layer3.0.conv1"]
    assert stage_of["fc"] == len(split) - 1
    assert split.stages[stage_of["layer3.0.conv2"]].patch is not None  # a conv alone in its stage
    assert staged_equals_plain(model, split, inputs)
    # a state in the middle of a block is a tuple (main path and skip) that resumes exactly
    with torch.no_grad():
        state = split.run(inputs, stop=stage_of["layer3.0.conv2"])
        assert isinstance(state, tuple) and len(state) >= 2
        assert torch.equal(split.run(state, start=stage_of["layer3.0.conv2"]), model(inputs))


class InPlaceOnSkip(nn.Module):
    """Modifies a value that crosses the cut before ``conv2`` in place: that cut must be dropped."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Linear(2 * 8 * 8, 3)

    def forward(self, x):
        y = self.conv1(x)
        z = self.conv2(y)
        y.mul_(2.0)  # in place on the skip value
        return self.head(torch.flatten(z + y, 1))


def test_cut_whose_input_is_modified_in_place_later_is_removed():
    torch.manual_seed(0)
    model = InPlaceOnSkip().eval()
    inputs = torch.randn(4, 1, 8, 8)
    split = split_model(model, quantized=quantized_names(model), sample=inputs)
    stage_of = split.stages_of_weights([model.conv1.weight, model.conv2.weight, model.head.weight])
    assert stage_of[0] == stage_of[1]  # no cut between conv1 and conv2
    assert stage_of[2] > stage_of[1]  # the cut before the head is fine
    assert staged_equals_plain(model, split, inputs)
    # and the state handed to the head stage is not modified by running it
    with torch.no_grad():
        state = split.run(inputs, stop=stage_of[2])
        before = [t.clone() for t in (state if isinstance(state, tuple) else (state,))]
        split.run(state, start=stage_of[2])
        after = state if isinstance(state, tuple) else (state,)
        assert all(torch.equal(a, b) for a, b in zip(before, after))


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def features(self, x):
        x = torch.relu(self.conv(x))
        return x if float(x.sum()) > 0 else -x

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


def test_untraceable_model_gets_a_single_stage_and_a_declared_split_works():
    torch.manual_seed(0)
    model = Untraceable().eval()
    inputs = torch.randn(5, 1, 8, 8)
    names = quantized_names(model)
    auto = split_model(model, quantized=names, sample=inputs)
    assert auto.kind == "single" and len(auto) == 1
    declared = split_model(model, [Stage("features", model.features, modules=("conv",)),
                                   Stage("head", lambda x: model.fc(torch.flatten(x, 1)), modules=("fc",))],
                           quantized=names, sample=inputs)
    assert declared.kind == "declared"
    assert declared.stages_of_weights([model.conv.weight, model.fc.weight]) == [0, 1]
    assert staged_equals_plain(model, declared, inputs)


def test_sequential_with_an_untraceable_child_is_split_between_children():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict([("body", Untraceable()), ("out", nn.Linear(3, 2))])).eval()
    inputs = torch.randn(5, 1, 8, 8)
    split = split_model(model, quantized=quantized_names(model), sample=inputs)
    assert split.kind == "sequential" and len(split) == 2
    assert split.stages_of_weights([model.body.conv.weight, model.out.weight]) == [0, 1]
    assert staged_equals_plain(model, split, inputs)


def test_declared_split_that_differs_from_forward_is_refused(tiny_model, tiny_data):
    wrong = [Stage("conv", tiny_model.conv),  # skips relu and pool
             Stage("head", lambda x: tiny_model.fc(torch.flatten(nn.functional.max_pool2d(x, 2), 1)),
                   modules=("fc",))]
    with pytest.raises(ValueError, match="bit for bit"):
        split_model(tiny_model, wrong, sample=tiny_data[0][:4])


def test_declared_split_that_modifies_its_input_in_place_is_refused(tiny_model, tiny_data):
    first = nn.Sequential(tiny_model.conv)
    mutating = [Stage("conv", first),
                Stage("rest", lambda x: tiny_model.fc(tiny_model.flatten(tiny_model.pool(torch.relu_(x)))),
                      modules=("fc",))]
    with pytest.raises(ValueError, match="in place"):
        split_model(tiny_model, mutating, sample=tiny_data[0][:4])


def test_unclaimed_weights_go_to_the_first_stage(tiny_model, tiny_data):
    split = split_model(tiny_model, [Stage("all", lambda x: tiny_model(x))], sample=tiny_data[0][:4])
    assert split.stages_of_weights([tiny_model.fc.weight]) == [0]


def test_bad_stage_specs_are_rejected(tiny_model):
    with pytest.raises(ValueError, match="stages='fast'"):
        split_model(tiny_model, "fast")
    with pytest.raises(ValueError, match="not valid"):
        split_model(tiny_model, [])
    with pytest.raises(ValueError, match="does not have"):
        split_model(tiny_model, [Stage("x", tiny_model, modules=("nope",))])
