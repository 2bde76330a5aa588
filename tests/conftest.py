"""Shared fixtures: tiny models and data, and an isolated model cache per test session."""

from __future__ import annotations

import os
from collections import OrderedDict

import pytest
import torch
from torch import nn


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Point the model cache at a fresh folder, unless DEAP_QUANT_TEST_CACHE names a shared one."""
    path = os.environ.get("DEAP_QUANT_TEST_CACHE") or str(tmp_path_factory.mktemp("cache"))
    previous = os.environ.get("DEAP_QUANT_CACHE")
    os.environ["DEAP_QUANT_CACHE"] = path
    yield path
    if previous is None:
        os.environ.pop("DEAP_QUANT_CACHE", None)
    else:
        os.environ["DEAP_QUANT_CACHE"] = previous


def make_tiny_model(seed: int = 0, classes: int = 4) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict([
        ("conv", nn.Conv2d(1, 4, 3, padding=1)), ("relu", nn.ReLU()), ("pool", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()), ("fc", nn.Linear(4 * 4 * 4, classes)),
    ])).eval()


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One intra-op thread for the whole session: on 2 shared cores, small tensors run fastest and
    repeatably that way (two threads measured up to 18x slower under load)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_model() -> nn.Sequential:
    """Conv(1->4, 3x3) + Linear(64->4) on 1x8x8 inputs: 36 + 256 weights."""
    return make_tiny_model()


@pytest.fixture
def tiny_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(48, 1, 8, 8, generator=generator)
    targets = torch.randint(0, 4, (48,), generator=generator)
    return inputs, targets


@pytest.fixture(scope="session")
def digits_zoo():
    """The trained digits-cnn recipe with its splits (trained once per session, ~6 s)."""
    from deap_quant.zoo import load_model
    return load_model("digits-cnn", verbose=False)


@pytest.fixture(scope="module")
def resnet_setup():
    """A 4-bit torchvision ResNet (BasicBlock [1,1,1,1]) and 40 inputs labelled by the float model.

    At 16x16 inputs its last stages see 1x1 maps, so most 3x3 taps there only meet zero padding.
    """
    from torchvision.models.resnet import BasicBlock, ResNet

    from deap_quant import quantize
    torch.manual_seed(0)
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5).eval()
    inputs = torch.randn(40, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        targets = model(inputs).argmax(1)
    return quantize(model, bits=4), (inputs, targets)


@pytest.fixture(scope="module")
def problem():
    """The tiny model at 2 bits on 48 random inputs labelled by the float model (so rounding matters)."""
    from deap_quant import quantize

    model = make_tiny_model()
    inputs = torch.randn(48, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        targets = model(inputs).argmax(dim=1)
    return quantize(model, bits=2), (inputs, targets)
