"""One loader for the float model a run starts from: a zoo recipe, ``torchvision:NAME`` with local
weights, or a saved module with a dataset. The command line and :mod:`deap_quant.export` both use it.

Every problem with the request raises :class:`ModelSpecError` (a ``ValueError``) with one line
naming the setting (as its command-line flag) and what is valid.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

from torch import nn

from ..data import Splits
from .recipes import RECIPES, ModelSpecError, load_model

__all__ = ["load_float_model", "float_model_from_settings", "ModelSpecError", "RECIPE_OPTION_FLAGS"]

PathLike = Union[str, "os.PathLike[str]"]

#: Recipe options that the command line sets with a flag of their own (``val_size`` <- ``--val-size``).
RECIPE_OPTION_FLAGS = ("val_size", "calibration_size", "val_from")


def load_float_model(model: str, *, weights: Optional[PathLike] = None, dataset: Optional[str] = None,
                     data_root: Optional[PathLike] = None, data_seed: int = 0, cache_dir: Optional[PathLike] = None,
                     options: Optional[Mapping[str, Any]] = None, verbose: bool = True) -> tuple[nn.Module, Splits, str]:
    """``(float module, data splits, display name)`` for ``model``:

    * a zoo recipe name (:data:`~deap_quant.zoo.RECIPES`): trained or loaded from the cache; with
      ``weights`` the recipe's architecture with those weights (required by pretrained recipes such
      as ``cifar10-resnet20``); ``data_root`` for recipes that read local data; ``options`` sets the
      recipe's options (e.g. ``{"val_size": 500}``); no ``dataset``;
    * ``torchvision:NAME``: that architecture with the local ``weights`` on ``dataset``;
    * a path to a module saved with ``torch.save(model)`` or TorchScript, on ``dataset`` (default digits).

    Nothing is downloaded. Raises :class:`ModelSpecError` (one line) for a request that cannot be met.
    """
    import torch

    from ..data import load_dataset

    options = {key: value for key, value in dict(options or {}).items() if value is not None}
    if model in RECIPES:
        recipe = RECIPES[model]
        if dataset is not None:
            brings = ("reads its data from --data-root" if recipe.data_layout is not None
                      else "brings its own data")
            raise ModelSpecError(f"--dataset {dataset} cannot be combined with zoo model {model}, which {brings}")
        zoo = load_model(model, seed=data_seed, cache=None if cache_dir is None else str(cache_dir), verbose=verbose,
                         weights=weights, data_root=data_root, options=options)
        name = model if weights is None or recipe.pretrained else Path(weights).stem
        return zoo.model, zoo.data, name
    if options:
        flags = ", ".join(f"--{key.replace('_', '-')}" for key in sorted(options))
        raise ModelSpecError(f"{flags} set a zoo recipe's options; --model {model} is not a zoo recipe")
    if model.startswith("torchvision:"):
        from .vision import torchvision_model

        if weights is None or dataset is None:
            raise ModelSpecError(f"--model {model} needs --weights PATH (a local state_dict; nothing is downloaded) "
                                 "and --dataset")
        splits = load_dataset(dataset, None if data_root is None else str(data_root), data_seed)
        module = torchvision_model(model.split(":", 1)[1], weights, num_classes=splits.num_classes or None)
        return module, splits, model.split(":", 1)[1]
    if weights is not None:
        raise ModelSpecError(f"--weights goes with --model torchvision:NAME or a zoo recipe, not with {model!r}")
    path = Path(model)
    if not path.exists():
        raise ModelSpecError(f"--model {model!r} is neither a zoo recipe ({', '.join(sorted(RECIPES))}) "
                             "nor an existing file")
    try:
        with warnings.catch_warnings():  # torch.jit.load's FutureWarning would break the one-line error rule
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception:
        try:
            module = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as error:
            raise ModelSpecError(f"--model {model!r} could not be loaded as a saved module or TorchScript "
                                 f"({type(error).__name__})") from None
    if not isinstance(module, torch.nn.Module):
        raise ModelSpecError(f"--model {model!r} holds a {type(module).__name__}, not a torch.nn.Module; "
                             "save the whole module with torch.save(model, path)")
    splits = load_dataset(dataset or "digits", None if data_root is None else str(data_root), data_seed)
    return module.eval(), splits, path.stem


def float_model_from_settings(settings: Mapping[str, Any], verbose: bool = True) -> tuple[nn.Module, Splits, str]:
    """:func:`load_float_model` from command-line settings (``vars(args)``, or a run's saved ``config.run``):
    keys ``model``, ``weights``, ``dataset``, ``data_root``, ``data_seed``, ``cache_dir`` and the recipe
    options of :data:`RECIPE_OPTION_FLAGS`; missing keys take their defaults."""
    return load_float_model(settings.get("model") or "digits-cnn", weights=settings.get("weights"),
                            dataset=settings.get("dataset"), data_root=settings.get("data_root"),
                            data_seed=int(settings.get("data_seed") or 0), cache_dir=settings.get("cache_dir"),
                            options={key: settings.get(key) for key in RECIPE_OPTION_FLAGS}, verbose=verbose)
