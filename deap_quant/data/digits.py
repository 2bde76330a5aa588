"""scikit-learn's bundled handwritten digits (1,797 real 8x8 images), split train/val/test."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

__all__ = ["Splits", "digits"]

Pair = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Splits:
    """Train, validation and held-out test data as ``(inputs, targets)`` tensor pairs."""

    train: Pair
    val: Pair
    test: Pair
    num_classes: int
    name: str = ""

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train[1]), "val": len(self.val[1]), "test": len(self.test[1])}


def digits(seed: int = 0, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)) -> Splits:
    """The digits images as ``[N, 1, 8, 8]`` floats in ``[0, 1]``, stratified into train/val/test.

    The split depends on ``seed`` only; the default 60/20/20 gives 1,078 / 359 / 360 images.
    """
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions={fractions!r} is not valid; use three positive numbers summing to 1")
    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None]
    labels = bunch.target.astype(np.int64)
    train_x, rest_x, train_y, rest_y = train_test_split(
        images, labels, train_size=fractions[0], stratify=labels, random_state=seed)
    val_share = fractions[1] / (fractions[1] + fractions[2])
    val_x, test_x, val_y, test_y = train_test_split(
        rest_x, rest_y, train_size=val_share, stratify=rest_y, random_state=seed)

    def pair(x: np.ndarray, y: np.ndarray) -> Pair:
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)

    return Splits(pair(train_x, train_y), pair(val_x, val_y), pair(test_x, test_y), num_classes=10, name="digits")
