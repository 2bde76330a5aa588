"""Model recipes that train offline on CPU, with their data, cached after the first run."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from ..data import Splits, digits
from ..evaluation.metrics import Metric, make_metric
from .cache import cache_dir, load_checkpoint, save_checkpoint
from .training import accuracy, train_classifier

__all__ = ["Recipe", "ZooModel", "RECIPES", "register_recipe", "load_model", "digits_cnn", "digits_classifier_recipe"]


def digits_cnn(num_classes: int = 10) -> nn.Sequential:
    """A small CNN for 8x8 digits: three 3x3 convolutions and two linear layers (~40k weights)."""
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 16, 3, padding=1)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(16, 32, 3, padding=1)), ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
        ("conv3", nn.Conv2d(32, 64, 3, padding=1)), ("relu3", nn.ReLU()), ("pool3", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(64 * 2 * 2, 64)), ("relu4", nn.ReLU()),
        ("fc2", nn.Linear(64, num_classes)),
    ]))


@dataclass(frozen=True)
class Recipe:
    """How to build, train and score one zoo model. ``version`` is bumped when any of it changes."""

    name: str
    build: Callable[[], nn.Module]
    data: Callable[[int], Splits]
    train: Callable[[nn.Module, Splits, int], nn.Module]
    score: Callable[[nn.Module, Any], float]
    #: A name in ``evaluation.metrics.METRICS`` or a factory of fresh Metric objects; ``score``
    #: returns this metric's headline value, so float and quantized scores compare directly.
    metric: Union[str, Callable[[], Metric]] = "accuracy"
    version: int = 1
    description: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)

    def new_metric(self) -> Metric:
        """A fresh metric object for this recipe's evaluators."""
        return make_metric(self.metric) if isinstance(self.metric, str) else self.metric()

    @property
    def metric_name(self) -> str:
        """The headline name of the recipe's metric (e.g. ``accuracy``, ``mse``, ``map_50``)."""
        return self.metric if isinstance(self.metric, str) else self.new_metric().name


@dataclass
class ZooModel:
    """A trained float model, its data, its float scores, and where it came from."""

    name: str
    model: nn.Module
    data: Splits
    float_scores: dict[str, float]
    train_seconds: float
    from_cache: bool
    path: Optional[str]
    recipe: Recipe


RECIPES: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe) -> Recipe:
    RECIPES[recipe.name] = recipe
    return recipe


def digits_classifier_recipe(name: str, build: Callable[[], nn.Module], *, epochs: int, description: str) -> Recipe:
    """A classifier on the digits splits, trained with cross-entropy and scored by accuracy."""
    return Recipe(name=name, build=build, data=lambda seed: digits(seed),
                  train=lambda model, splits, seed: train_classifier(model, splits.train, epochs=epochs, seed=seed),
                  score=accuracy, description=description)


register_recipe(digits_classifier_recipe(
    "digits-cnn", digits_cnn, epochs=40,
    description="3-conv CNN on scikit-learn's 8x8 digits (~40k weights, ~97-98% test accuracy)"))


def load_model(name: str, *, seed: int = 0, cache: Optional[str] = None, retrain: bool = False,
               verbose: bool = True) -> ZooModel:
    """The trained model of recipe ``name`` with its data splits (split seed ``seed``).

    Loaded from the cache when a valid entry exists, otherwise trained (fixed seed), scored on
    val and test, and cached. A missing, corrupt or outdated cache entry is retrained.
    """
    if name not in RECIPES:
        raise ValueError(f"model={name!r} is not a known recipe; valid: {', '.join(sorted(RECIPES))}")
    recipe = RECIPES[name]
    splits = recipe.data(seed)
    path = cache_dir(cache) / "models" / f"{name}-v{recipe.version}-seed{seed}.pt"
    torch.manual_seed(seed)  # the initial weights are part of the recipe
    model = recipe.build()
    entry = None if retrain else load_checkpoint(path)
    if entry is not None:
        try:
            if entry.get("recipe") != name or entry.get("version") != recipe.version:
                raise ValueError("recipe mismatch")
            model.load_state_dict(entry["state_dict"])
            return ZooModel(name, model.eval(), splits, dict(entry["float"]), float(entry["train_seconds"]),
                            True, str(path), recipe)
        except Exception as error:
            if verbose:
                print(f"cache entry {path} does not fit recipe {name} ({error}); retraining")
            torch.manual_seed(seed)
            model = recipe.build()
    if verbose:
        print(f"training {name} (seed {seed}) on CPU ...", flush=True)
    started = time.perf_counter()
    model = recipe.train(model, splits, seed).eval()
    seconds = time.perf_counter() - started
    scores = {"val": recipe.score(model, splits.val), "test": recipe.score(model, splits.test)}
    if verbose:
        print(f"trained {name} in {seconds:.1f} s: float {recipe.metric_name} val {scores['val']:.4f}, "
              f"test {scores['test']:.4f}; cached at {path}", flush=True)
    try:
        save_checkpoint(path, {"recipe": name, "version": recipe.version, "seed": seed, "float": scores,
                               "train_seconds": seconds, "torch": str(torch.__version__),
                               "state_dict": model.state_dict()})
    except OSError as error:
        if verbose:
            print(f"could not cache {name} at {path} ({error}); continuing without the cache")
    return ZooModel(name, model, splits, scores, seconds, False, str(path), recipe)
