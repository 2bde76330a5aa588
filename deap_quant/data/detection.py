"""A deterministic object-detection set built from the real digit images: digits pasted on canvases.

Every canvas holds 1 to ``max_digits`` real 8x8 digits from scikit-learn's set, each upscaled to a
random size and pasted at a random position, with little overlap. The targets are torchvision's
detection format: ``{"boxes": float [n, 4] (x1, y1, x2, y2) in pixels, "labels": int64 [n]}``
with the digit value as label. Train, val and test canvases are built from the disjoint digit
images of :func:`deap_quant.data.digits`' split, so no test digit is ever seen in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .digits import Splits, digits

__all__ = ["CanvasConfig", "CanvasPainter", "digit_canvases", "collate_detection"]


@dataclass(frozen=True)
class CanvasConfig:
    """Shape of the canvas set; checked on construction."""

    size: int = 64
    max_digits: int = 4
    min_scale: int = 12
    max_scale: int = 28
    max_iou: float = 0.15
    ink_threshold: float = 0.25
    n_train: int = 1200
    n_val: int = 300
    n_test: int = 300

    def __post_init__(self) -> None:
        for name in ("size", "max_digits", "min_scale", "max_scale", "n_train", "n_val", "n_test"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is not valid; use an integer >= 1")
        if not 8 <= self.min_scale <= self.max_scale <= self.size:
            raise ValueError(f"scales {self.min_scale}..{self.max_scale} are not valid for size={self.size}; "
                             f"use 8 <= min_scale <= max_scale <= size")
        if not 0.0 <= self.max_iou < 1.0:
            raise ValueError(f"max_iou={self.max_iou!r} is not valid; use a number in [0, 1)")
        if not 0.0 < self.ink_threshold < 1.0:
            raise ValueError(f"ink_threshold={self.ink_threshold!r} is not valid; use a number in (0, 1)")


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], others[:, 0])
    y1 = np.maximum(box[1], others[:, 1])
    x2 = np.minimum(box[2], others[:, 2])
    y2 = np.minimum(box[3], others[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return inter / (area + areas - inter)


class CanvasPainter:
    """Paints canvases from a pool of 8x8 digit images (pre-scaled once to every allowed size)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, config: CanvasConfig | None = None):
        if images.ndim != 4 or images.shape[1] != 1 or len(images) != len(labels) or len(labels) == 0:
            raise ValueError(f"images must be [N, 1, H, W] with one label each, got {tuple(images.shape)} "
                             f"and {len(labels)} labels")
        self.config = config or CanvasConfig()
        self.labels = labels.tolist()
        self.scaled = {s: F.interpolate(images.float(), size=(s, s), mode="bilinear",
                                        align_corners=False).clamp_(0, 1)[:, 0].numpy()
                       for s in range(self.config.min_scale, self.config.max_scale + 1)}
        # per scale and image: the ink's bounding rows and columns (first, last), or -1 if there is no ink
        self.ink = {s: self._ink_bounds(patches > self.config.ink_threshold) for s, patches in self.scaled.items()}

    @staticmethod
    def _ink_bounds(mask: np.ndarray) -> np.ndarray:
        rows, cols = mask.any(axis=2), mask.any(axis=1)
        size = mask.shape[1]
        bounds = np.stack([rows.argmax(axis=1), size - 1 - rows[:, ::-1].argmax(axis=1),
                           cols.argmax(axis=1), size - 1 - cols[:, ::-1].argmax(axis=1)], axis=1)
        bounds[~rows.any(axis=1)] = -1
        return bounds

    def paint(self, count: int, rng: np.random.Generator) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """``count`` canvases ``[count, 1, size, size]`` and their targets, drawn with ``rng``."""
        config, size = self.config, self.config.size
        canvases = np.zeros((count, 1, size, size), dtype=np.float32)
        targets = []
        for n in range(count):
            wanted = int(rng.integers(1, config.max_digits + 1))
            boxes: list[list[float]] = []
            classes: list[int] = []
            for _ in range(wanted):
                pick = int(rng.integers(len(self.labels)))
                scale = int(rng.integers(config.min_scale, config.max_scale + 1))
                patch = self.scaled[scale][pick]
                top, bottom, left, right = self.ink[scale][pick].tolist()
                if top < 0:
                    continue
                for _attempt in range(20):
                    x = int(rng.integers(0, size - scale + 1))
                    y = int(rng.integers(0, size - scale + 1))
                    box = np.array([x + left, y + top, x + right + 1, y + bottom + 1], dtype=np.float32)
                    if not boxes or _iou(box, np.asarray(boxes, dtype=np.float32)).max() <= config.max_iou:
                        region = canvases[n, 0, y:y + scale, x:x + scale]
                        np.maximum(region, patch, out=region)
                        boxes.append(box.tolist())
                        classes.append(self.labels[pick])
                        break
            targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                            "labels": torch.tensor(classes, dtype=torch.int64)})
        return torch.from_numpy(canvases), targets


def digit_canvases(seed: int = 0, config: CanvasConfig | None = None) -> Splits:
    """Canvases ``[N, 1, size, size]`` in ``[0, 1]`` with torchvision-style box targets, as :class:`Splits`.

    Deterministic in ``seed`` (which also picks the digit split). The defaults give 1,200 / 300 / 300
    canvases of 64x64 pixels with 1 to 4 digits of 12 to 28 pixels each.
    """
    config = config or CanvasConfig()
    source = digits(seed)
    rng = np.random.default_rng([seed, 0xD16175])
    parts = [CanvasPainter(images, labels, config).paint(count, rng)
             for (images, labels), count in ((source.train, config.n_train), (source.val, config.n_val),
                                             (source.test, config.n_test))]
    return Splits(parts[0], parts[1], parts[2], num_classes=10, name="digit-canvases")


def collate_detection(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """DataLoader ``collate_fn`` for detection: keep images and targets as lists."""
    images, targets = zip(*batch)
    return list(images), list(targets)
