"""Recipes on real data read from the user's files (``data_root``), never downloaded.

* ``cifar10-resnet20`` (and ``-resnet32``, ``-resnet44``, ``-resnet56``): a pretrained CIFAR ResNet
  (:mod:`.cifar_resnet`) with the user's weights (``weights=``, required) on CIFAR-10.
* ``mnist-cnn``: a LeNet-5-style CNN trained here on the MNIST training images (single thread,
  fixed seed, about 30 s of CPU), cached like the digits recipes.

The data root is either the torchvision folder (``cifar-10-batches-py/``, ``MNIST/raw/``) or
``.npz`` files (e.g. ``train-10k.npz`` + ``test.npz``; ``mnist.npz`` with ``x_train`` ...).

Protocol: the official test images are the test split, used only to report. Validation (the
fitness) and calibration (AdaRound, teacher targets; the code draws these from ``Splits.train``)
are disjoint subsets of the training images. So for a pretrained recipe ``train`` *is* the
calibration subset (``calibration_size`` images) and ``val`` another ``val_size`` images; for
``mnist-cnn`` ``val`` is ``val_size`` training images and ``train`` the rest (what it is trained on).
Both subsets are stratified by class and drawn with the data seed.

A pretrained network has seen its training images, so validation drawn from them measures
memorised images (ResNet-20: 99.9%). With ``val_from="test"`` the CIFAR recipes draw validation
from the official test images instead, and ``test`` is the rest of them (10,000 - ``val_size``):
validation then measures unseen images, and test stays disjoint from everything the search sees.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import Splits
from ..data.local import CIFAR10_LAYOUT, MNIST_LAYOUT, cifar10_arrays, mnist_arrays
from .cifar_resnet import CifarResNet, cifar_resnet, load_cifar_resnet_state
from .recipes import ModelSpecError, Recipe, register_recipe
from .training import accuracy, train_classifier

__all__ = ["lenet5", "carve", "cifar10_pretrained_splits", "VAL_SOURCES", "mnist_splits", "train_mnist_cnn", "cifar_resnet_recipe",
           "CIFAR_RECIPE_DEPTHS", "MNIST_EPOCHS"]

Pair = tuple[torch.Tensor, torch.Tensor]

#: Depths with a ``cifar10-resnetDEPTH`` recipe.
CIFAR_RECIPE_DEPTHS = (20, 32, 44, 56)
#: mnist-cnn's training budget: epochs of Adam over the training images (batch 128).
MNIST_EPOCHS = 6


def lenet5(num_classes: int = 10) -> nn.Sequential:
    """LeNet-5 for 1x28x28 inputs, with ReLU and max-pooling: conv 5x5 (6, padded), conv 5x5 (16),
    linear 400-120-84-classes (~61k weights)."""
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 6, 5, padding=2)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(6, 16, 5)), ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(16 * 5 * 5, 120)), ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(120, 84)), ("relu4", nn.ReLU()),
        ("fc3", nn.Linear(84, num_classes)),
    ]))


def _check_size(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ModelSpecError(f"{name}={value!r} is not valid; use a positive integer")
    return int(value)


def carve(labels: torch.Tensor, sizes: tuple[int, ...], seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Disjoint, class-stratified subsets of ``sizes[i]`` samples each (sorted indices), and the rest.

    Each class gives every subset its share (largest remainders settle the rounding), drawn with
    ``seed``; where a class runs short, the subset is filled from the other classes.
    """
    labels_np = labels.numpy()
    total = sum(sizes)
    if total > len(labels_np):
        raise ModelSpecError(f"the subsets of sizes {' + '.join(map(str, sizes))} = {total} do not fit in the "
                             f"{len(labels_np)} training images; use smaller --val-size/--calibration-size")
    rng = np.random.default_rng([seed, 0x5EED])
    pools = {int(c): rng.permutation(np.flatnonzero(labels_np == c)).tolist() for c in np.unique(labels_np)}
    share = {c: len(p) / len(labels_np) for c, p in pools.items()}
    parts: list[np.ndarray] = []
    for size in sizes:
        exact = {c: size * share[c] for c in pools}
        counts = {c: min(int(exact[c]), len(pools[c])) for c in pools}
        by_remainder = sorted(pools, key=lambda c: (counts[c] - exact[c], c))
        for c in by_remainder:  # largest remainders first, then any class with images left
            if sum(counts.values()) >= size:
                break
            if counts[c] < len(pools[c]):
                counts[c] += 1
        while sum(counts.values()) < size:
            c = next(c for c in pools if counts[c] < len(pools[c]))
            counts[c] += 1
        chosen = [i for c in pools for i in pools[c][:counts[c]]]
        for c in pools:
            pools[c] = pools[c][counts[c]:]
        parts.append(np.sort(np.array(chosen, dtype=np.int64)))
    rest = np.sort(np.array([i for pool in pools.values() for i in pool], dtype=np.int64))
    return parts, rest


def _subset(pair: Pair, index: np.ndarray) -> Pair:
    chosen = torch.from_numpy(index)
    return pair[0][chosen], pair[1][chosen]


#: Where the pretrained CIFAR recipes draw validation from (``val_from``).
VAL_SOURCES = ("train", "test")


def cifar10_pretrained_splits(seed: int, data_root: str, val_size: int = 1000, calibration_size: int = 2048,
                              val_from: str = "train") -> Splits:
    """CIFAR-10 for a pretrained model: ``train`` (= calibration) is a stratified subset of the
    training images; ``val`` another, disjoint one (``val_from="train"``, and ``test`` is the official
    test set) or a stratified subset of the official test images (``val_from="test"``, and ``test`` is
    the rest of them)."""
    val_size = _check_size("val_size", val_size)
    calibration_size = _check_size("calibration_size", calibration_size)
    if val_from not in VAL_SOURCES:
        raise ModelSpecError(f"val_from={val_from!r} is not valid; use one of {', '.join(VAL_SOURCES)}")
    train, test = cifar10_arrays(data_root)
    # The same calibration images either way, so AdaRound and the teacher see the same data.
    (val, calibration), _ = carve(train[1], (val_size, calibration_size), seed)
    if val_from == "train":
        return Splits(_subset(train, calibration), _subset(train, val), test, num_classes=10, name="cifar10")
    if val_size >= len(test[1]):
        raise ModelSpecError(f"val_size={val_size} leaves no test image of the {len(test[1])}; use a smaller "
                             "--val-size")
    (val,), rest = carve(test[1], (val_size,), seed)
    return Splits(_subset(train, calibration), _subset(test, val), _subset(test, rest), num_classes=10,
                  name="cifar10")


def mnist_splits(seed: int, data_root: str, val_size: int = 5000) -> Splits:
    """MNIST: ``val`` is a stratified subset of ``val_size`` training images, ``train`` the other
    training images, ``test`` the official 10,000 test images."""
    val_size = _check_size("val_size", val_size)
    train, test = mnist_arrays(data_root)
    (val,), rest = carve(train[1], (val_size,), seed)
    if not len(rest):
        raise ModelSpecError(f"val_size={val_size} leaves no training image of the {len(train[1])}; use a smaller "
                             "--val-size")
    return Splits(_subset(train, rest), _subset(train, val), test, num_classes=10, name="mnist")


def train_mnist_cnn(model: nn.Module, splits: Splits, seed: int, **options: Any) -> nn.Module:
    """Adam (lr 2e-3, cosine schedule, weight decay 1e-4) for :data:`MNIST_EPOCHS` epochs, batch 128;
    seeded and single-threaded (see :func:`~deap_quant.zoo.training.train_supervised`)."""
    return train_classifier(model, splits.train, epochs=MNIST_EPOCHS, lr=2e-3, batch_size=128, seed=seed)


def cifar_resnet_recipe(depth: int) -> Recipe:
    """The pretrained ``cifar10-resnet{depth}`` recipe."""

    def load(model: nn.Module, path: str) -> nn.Module:
        from .vision import read_state_dict

        assert isinstance(model, CifarResNet)
        return load_cifar_resnet_state(model, read_state_dict(path), f"weights file {path!r}")

    def data(seed: int, data_root: str, **options: Any) -> Splits:
        return cifar10_pretrained_splits(seed, data_root, **options)

    return Recipe(
        name=f"cifar10-resnet{depth}", build=lambda: cifar_resnet(depth), data=data, train=None, score=accuracy,
        description=f"pretrained CIFAR ResNet-{depth} (option-A shortcuts) with --weights, CIFAR-10 from "
                    "--data-root; val and calibration from the training images, the official test set",
        defaults={"val_size": 1000, "calibration_size": 2048, "val_from": "train"}, pretrained=True,
        weights_help=f"a CIFAR-10 ResNet-{depth} state_dict or checkpoint (option-A shortcuts, inputs normalised "
                     "with the ImageNet mean/std; a 'module.' prefix is fine)",
        data_layout=CIFAR10_LAYOUT, load_weights=load)


for _depth in CIFAR_RECIPE_DEPTHS:
    register_recipe(cifar_resnet_recipe(_depth))


def _mnist_data(seed: int, data_root: str, **options: Any) -> Splits:
    return mnist_splits(seed, data_root, **options)


register_recipe(Recipe(
    name="mnist-cnn", build=lenet5, data=_mnist_data, train=train_mnist_cnn, score=accuracy,
    description=f"LeNet-5 (ReLU, max-pool, ~61k weights) trained {MNIST_EPOCHS} epochs on MNIST from --data-root "
                "(~99% test accuracy, ~30 s of one CPU thread); val from the training images",
    defaults={"val_size": 5000}, data_layout=MNIST_LAYOUT))
