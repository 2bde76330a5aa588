"""Model recipes that train offline on CPU, with their data, cached after the first run."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from ..data import Splits, digits
from ..data.npz import fingerprint
from ..evaluation.metrics import Metric, make_metric
from .cache import cache_dir, load_checkpoint, save_checkpoint
from .training import accuracy, train_classifier

__all__ = ["Recipe", "ZooModel", "RECIPES", "ModelSpecError", "register_recipe", "get_recipe", "load_model",
           "digits_cnn", "digits_classifier_recipe"]


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


class ModelSpecError(ValueError):
    """A model request that cannot be met (unknown recipe, a missing or unfitting ``weights`` or
    ``data_root``, an unknown option); the message is one line naming the setting and what is valid."""


@dataclass(frozen=True)
class Recipe:
    """How to build, train and score one zoo model. ``version`` is bumped when any of it changes.

    ``data`` is called as ``data(seed, **options)``, or ``data(seed, data_root, **options)`` when
    the recipe reads the user's files (``data_layout`` set); ``train`` as ``train(model, splits,
    seed, **options)``, where ``options`` are the recipe's ``defaults`` updated by the caller's.
    A ``pretrained`` recipe is never trained: the user gives its weights (``weights=``).
    """

    name: str
    build: Callable[[], nn.Module]
    data: Callable[..., Splits]
    train: Optional[Callable[..., nn.Module]]
    score: Callable[[nn.Module, Any], float]
    #: A name in ``evaluation.metrics.METRICS`` or a factory of fresh Metric objects; ``score``
    #: returns this metric's headline value, so float and quantized scores compare directly.
    metric: Union[str, Callable[[], Metric]] = "accuracy"
    version: int = 1
    description: str = ""
    #: The recipe's options and their defaults (e.g. ``{"val_size": 1000}``); see :meth:`resolve_options`.
    defaults: dict[str, Any] = field(default_factory=dict)
    #: The weights come from the user (``weights=PATH``, ``--weights``); nothing is trained or downloaded.
    pretrained: bool = False
    #: What ``weights`` must be, for error messages (e.g. "a CIFAR-10 ResNet-20 state_dict").
    weights_help: str = "a state_dict of the recipe's architecture"
    #: ``None``: the recipe brings its own data. Otherwise the data is read from ``data_root`` laid
    #: out as this text says (shown when it is missing).
    data_layout: Optional[str] = None
    #: ``load_weights(model, path) -> model``; default :func:`deap_quant.zoo.vision.load_weights`.
    load_weights: Optional[Callable[[nn.Module, str], nn.Module]] = None

    def new_metric(self) -> Metric:
        """A fresh metric object for this recipe's evaluators."""
        return make_metric(self.metric) if isinstance(self.metric, str) else self.metric()

    @property
    def metric_name(self) -> str:
        """The headline name of the recipe's metric (e.g. ``accuracy``, ``mse``, ``map_50``)."""
        return self.metric if isinstance(self.metric, str) else self.new_metric().name

    def resolve_options(self, options: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
        """The recipe's ``defaults`` updated by ``options`` (a value of ``None`` keeps the default)."""
        given = {key: value for key, value in dict(options or {}).items() if value is not None}
        unknown = sorted(set(given) - set(self.defaults))
        if unknown:
            flag = lambda key: f"{key} (--{key.replace('_', '-')})"  # noqa: E731
            valid = ", ".join(flag(key) for key in sorted(self.defaults)) or "none"
            raise ModelSpecError(f"option {flag(unknown[0])} does not apply to recipe {self.name}; its options: {valid}")
        return {**self.defaults, **given}

    def load_data(self, seed: int = 0, data_root: Optional[str] = None,
                  options: Optional[Mapping[str, Any]] = None) -> Splits:
        """The recipe's data splits (split seed ``seed``), from ``data_root`` if the recipe reads local files."""
        resolved = self.resolve_options(options)
        if self.data_layout is None:
            if data_root is not None:
                raise ModelSpecError(f"recipe {self.name} brings its own data; drop data_root (--data-root "
                                     f"{data_root})")
            return self.data(seed, **resolved)
        if data_root is None:
            raise ModelSpecError(f"recipe {self.name} reads its data from local files: pass data_root "
                                 f"(--data-root PATH) holding {self.data_layout}; nothing is downloaded")
        return self.data(seed, data_root, **resolved)

    def weights_into(self, model: nn.Module, weights: Union[str, os.PathLike[str]]) -> nn.Module:
        """``model`` with the state_dict in the local file ``weights`` (one-line error if it does not fit)."""
        from .vision import load_weights

        try:
            return (self.load_weights or load_weights)(model, str(weights))
        except (OSError, ValueError) as error:
            message = error.args[0] if error.args else str(error)
            raise ModelSpecError(f"--weights {str(weights)!r} for recipe {self.name} (expected {self.weights_help}): "
                                 f"{message}") from None


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


def get_recipe(name: str) -> Recipe:
    """The registered recipe ``name`` (:class:`ModelSpecError` listing the known ones otherwise)."""
    if name not in RECIPES:
        raise ModelSpecError(f"model={name!r} is not a known recipe; valid: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _data_key(recipe: Recipe, splits: Splits, options: Mapping[str, Any]) -> str:
    """What the cached entry depends on beyond recipe, version and seed: the options and, for local
    data, the very tensors of every split (so a changed file or subset never reuses a stale entry)."""
    if recipe.data_layout is None and not options:
        return ""
    tensors = [t for pair in (splits.train, splits.val, splits.test) for t in pair if isinstance(t, torch.Tensor)]
    content = json.dumps(options, sort_keys=True, default=str) + (fingerprint(*tensors)
                                                                  if recipe.data_layout is not None else "")
    return hashlib.sha256(content.encode()).hexdigest()[:16]


def _scores(recipe: Recipe, model: nn.Module, splits: Splits) -> dict[str, float]:
    return {"val": recipe.score(model, splits.val), "test": recipe.score(model, splits.test)}


def _weights_model(recipe: Recipe, model: nn.Module, weights: Union[str, os.PathLike[str]], splits: Splits, seed: int,
                   cache: Optional[str], options: Mapping[str, Any], verbose: bool, retrain: bool = False) -> ZooModel:
    """``model`` (the recipe's architecture with the user's ``weights``) with its float scores, computed
    once and then cached (keyed by the weights file's SHA-256 and the data)."""
    sha = _file_sha256(Path(weights))
    key = hashlib.sha256(f"{sha};{_data_key(recipe, splits, options)}".encode()).hexdigest()[:16]
    path = cache_dir(cache) / "models" / f"{recipe.name}-v{recipe.version}-seed{seed}-weights-{key}.pt"
    entry = None if retrain else load_checkpoint(path)  # retrain=True re-scores
    if entry is not None and entry.get("weights_sha256") == sha and isinstance(entry.get("float"), dict):
        scores = {split: float(value) for split, value in entry["float"].items()}
        if verbose:
            print(f"loaded {recipe.name} weights {weights}: float {recipe.metric_name} val {scores['val']:.4f}, "
                  f"test {scores['test']:.4f} (scores cached at {path})", flush=True)
        return ZooModel(recipe.name, model, splits, scores, 0.0, True, str(weights), recipe)
    if verbose:
        print(f"scoring {recipe.name} weights {weights} on val ({len(splits.val[1])}) and test "
              f"({len(splits.test[1])}) once ...", flush=True)
    scores = _scores(recipe, model, splits)
    if verbose:
        print(f"float {recipe.metric_name} val {scores['val']:.4f}, test {scores['test']:.4f}; cached at {path}",
              flush=True)
    try:
        save_checkpoint(path, {"recipe": recipe.name, "version": recipe.version, "seed": seed, "float": scores,
                               "weights_sha256": sha, "options": json.loads(json.dumps(dict(options), default=str))})
    except OSError as error:
        if verbose:
            print(f"could not cache the scores at {path} ({error}); continuing without the cache")
    return ZooModel(recipe.name, model, splits, scores, 0.0, False, str(weights), recipe)


def load_model(name: str, *, seed: int = 0, cache: Optional[str] = None, retrain: bool = False,
               verbose: bool = True, weights: Optional[Union[str, os.PathLike[str]]] = None,
               data_root: Optional[Union[str, os.PathLike[str]]] = None,
               options: Optional[Mapping[str, Any]] = None) -> ZooModel:
    """The trained model of recipe ``name`` with its data splits (split seed ``seed``).

    Loaded from the cache when a valid entry exists, otherwise trained (fixed seed), scored on
    val and test, and cached. A missing, corrupt or outdated cache entry is retrained.

    ``weights`` (a local state_dict file; required by ``pretrained`` recipes) replaces training: the
    recipe's architecture gets those weights, and its float scores are computed once and cached.
    ``data_root`` is the local data of recipes that read files (``recipe.data_layout``);
    ``options`` set the recipe's options (``recipe.defaults``, e.g. ``{"val_size": 500}``). The cache
    entry of a recipe with local data or options is keyed by the options and the data itself.
    Errors in these settings raise :class:`ModelSpecError` with a one-line message.
    """
    recipe = get_recipe(name)
    resolved = recipe.resolve_options(options)
    if recipe.pretrained and weights is None:
        raise ModelSpecError(f"recipe {name} needs pretrained weights: pass weights=PATH (--weights PATH), "
                             f"{recipe.weights_help}; nothing is downloaded")
    if weights is not None and not Path(weights).is_file():
        raise ModelSpecError(f"--weights {str(weights)!r} does not exist; give {recipe.weights_help} "
                             "(nothing is downloaded)")
    given = None if weights is None else recipe.weights_into(recipe.build(), weights)  # before the data: fail fast
    splits = recipe.load_data(seed, None if data_root is None else str(data_root), resolved)
    if given is not None and weights is not None:
        return _weights_model(recipe, given, weights, splits, seed, cache, resolved, verbose, retrain)
    if recipe.train is None:
        raise ModelSpecError(f"recipe {name} has no training; pass weights=PATH (--weights PATH)")
    key = _data_key(recipe, splits, resolved)
    path = cache_dir(cache) / "models" / f"{name}-v{recipe.version}-seed{seed}{'-' + key if key else ''}.pt"
    torch.manual_seed(seed)  # the initial weights are part of the recipe
    model = recipe.build()
    entry = None if retrain else load_checkpoint(path)
    if entry is not None:
        try:
            if entry.get("recipe") != name or entry.get("version") != recipe.version or entry.get("key", "") != key:
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
    model = recipe.train(model, splits, seed, **resolved).eval()
    seconds = time.perf_counter() - started
    scores = _scores(recipe, model, splits)
    if verbose:
        print(f"trained {name} in {seconds:.1f} s: float {recipe.metric_name} val {scores['val']:.4f}, "
              f"test {scores['test']:.4f}; cached at {path}", flush=True)
    try:
        content = {"recipe": name, "version": recipe.version, "seed": seed, "float": scores,
                   "train_seconds": seconds, "torch": str(torch.__version__), "state_dict": model.state_dict()}
        if key:
            content["key"] = key
        save_checkpoint(path, content)
    except OSError as error:
        if verbose:
            print(f"could not cache {name} at {path} ({error}); continuing without the cache")
    return ZooModel(name, model, splits, scores, seconds, False, str(path), recipe)
