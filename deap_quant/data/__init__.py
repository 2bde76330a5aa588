"""Datasets: the bundled digits set and loaders for users' local data, all as :class:`Splits`."""

from __future__ import annotations

from typing import Callable, Optional

from .detection import CanvasConfig, digit_canvases
from .digits import Splits, digits
from .local import DatasetNotFound, cifar10, cifar10_arrays, coco, imagefolder, mnist, mnist_arrays, voc
from .npz import NPZ_LAYOUT, npz, read_npz

__all__ = ["Splits", "digits", "DATASETS", "load_dataset", "digit_canvases", "CanvasConfig", "mnist", "cifar10",
           "mnist_arrays", "cifar10_arrays", "npz", "read_npz", "NPZ_LAYOUT", "imagefolder", "voc", "coco",
           "DatasetNotFound"]

#: name -> loader(data_root, seed) returning :class:`Splits`.
DATASETS: dict[str, Callable[[Optional[str], int], Splits]] = {
    "digits": lambda root, seed: digits(seed),
    "digit-canvases": lambda root, seed: digit_canvases(seed),
    "mnist": mnist, "cifar10": cifar10, "npz": npz, "imagefolder": imagefolder, "voc": voc, "coco": coco,
}


def load_dataset(name: str, data_root: Optional[str] = None, seed: int = 0) -> Splits:
    """Load dataset ``name`` (see :data:`DATASETS`) from ``data_root`` where it needs local files."""
    if name not in DATASETS:
        raise ValueError(f"dataset={name!r} is not valid; use one of {', '.join(sorted(DATASETS))}")
    return DATASETS[name](data_root, seed)
