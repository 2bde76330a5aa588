"""Metrics: accumulate over batches, then report a DEAP fitness and a summary.

Every metric's :meth:`fitness` is a pair ``(primary, tie_break)`` in which *higher is better*,
so one DEAP fitness class (weights ``(1.0, 1.0)``) serves all tasks. Summaries keep natural
signs and units (accuracy as a fraction, loss as a positive number).
"""

from __future__ import annotations

import numbers
from typing import Callable, Union

import torch
import torch.nn.functional as F

__all__ = ["Metric", "Accuracy", "TopK", "CrossEntropy", "BatchMetric", "make_metric", "METRICS"]


class Metric:
    """Base class. Subclasses implement :meth:`reset`, :meth:`update`, :meth:`summary`, :meth:`fitness`."""

    name = "metric"

    def reset(self) -> None:
        raise NotImplementedError

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        raise NotImplementedError

    def summary(self) -> dict[str, float]:
        """Named values; ``summary()[self.name]`` is the headline score."""
        raise NotImplementedError

    def fitness(self) -> tuple[float, float]:
        raise NotImplementedError


class Accuracy(Metric):
    """Top-k accuracy, with the mean cross-entropy as tie-breaker (a lower loss wins a tie)."""

    def __init__(self, k: int = 1):
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"k={k!r} is not valid; use a positive integer (at most the number of classes)")
        self.k = int(k)
        self.name = "accuracy" if k == 1 else f"top{k}"
        self.reset()

    def reset(self) -> None:
        self.correct = 0
        self.count = 0
        self.loss_sum = 0.0

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        if outputs.ndim != 2:
            raise ValueError(f"{self.name} needs outputs of shape [batch, classes], got {tuple(outputs.shape)}")
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= outputs.shape[1]):
            raise ValueError(f"targets range {int(targets.min())}..{int(targets.max())} does not fit the "
                             f"model's {outputs.shape[1]} outputs; valid targets are 0..{outputs.shape[1] - 1}")
        if self.k > outputs.shape[1]:
            raise ValueError(f"{self.name}: k={self.k} is larger than the model's {outputs.shape[1]} classes; "
                             f"use k from 1 to {outputs.shape[1]}")
        if self.k == 1:
            hits = outputs.argmax(dim=1) == targets
        else:
            hits = (outputs.topk(self.k, dim=1).indices == targets[:, None]).any(dim=1)
        self.correct += int(hits.sum())
        self.count += len(targets)
        self.loss_sum += float(F.cross_entropy(outputs, targets, reduction="sum"))

    def summary(self) -> dict[str, float]:
        count = max(self.count, 1)
        return {self.name: self.correct / count, "loss": self.loss_sum / count}

    def fitness(self) -> tuple[float, float]:
        values = self.summary()
        return values[self.name], -values["loss"]


def TopK(k: int = 5) -> Accuracy:  # noqa: N802 - reads like a class
    return Accuracy(k)


class CrossEntropy(Accuracy):
    """Mean cross-entropy as the primary objective (lower is better), accuracy as tie-breaker."""

    def __init__(self):
        super().__init__(1)
        self.name = "loss"

    def summary(self) -> dict[str, float]:
        count = max(self.count, 1)
        return {"loss": self.loss_sum / count, "accuracy": self.correct / count}

    def fitness(self) -> tuple[float, float]:
        values = self.summary()
        return -values["loss"], values["accuracy"]


class BatchMetric(Metric):
    """A user's ``fn(outputs, targets) -> float`` per batch, reduced over batches.

    ``reduction="mean"`` weights each batch by its size; ``"sum"`` adds the values. Set
    ``higher_is_better=False`` for errors and losses (the fitness is then the negation).
    """

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], float], reduction: str = "mean",
                 higher_is_better: bool = True, name: str | None = None):
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction={reduction!r} is not valid; use 'mean' or 'sum'")
        self.fn = fn
        self.reduction = reduction
        self.higher_is_better = higher_is_better
        self.name = name or getattr(fn, "__name__", "metric")
        self.reset()

    def reset(self) -> None:
        self.total = 0.0
        self.count = 0

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        value = float(self.fn(outputs, targets))
        batch = len(targets) if hasattr(targets, "__len__") else 1
        self.total += value * batch if self.reduction == "mean" else value
        self.count += batch

    def summary(self) -> dict[str, float]:
        value = self.total / max(self.count, 1) if self.reduction == "mean" else self.total
        return {self.name: value}

    def fitness(self) -> tuple[float, float]:
        value = self.summary()[self.name]
        return (value if self.higher_is_better else -value), 0.0


METRICS: dict[str, Callable[[], Metric]] = {
    "accuracy": Accuracy,
    "top5": lambda: Accuracy(5),
    "loss": CrossEntropy,
}

MetricSpec = Union[str, Metric, Callable[[torch.Tensor, torch.Tensor], float]]


def make_metric(spec: MetricSpec) -> Metric:
    """A fresh :class:`Metric` from a name in :data:`METRICS`, a Metric, or a per-batch callable."""
    if isinstance(spec, Metric):
        return spec
    if isinstance(spec, str):
        if spec not in METRICS:
            raise ValueError(f"metric={spec!r} is not valid; use one of {', '.join(METRICS)} or a callable")
        return METRICS[spec]()
    if callable(spec):
        return BatchMetric(spec)
    raise ValueError(f"metric={spec!r} is not valid; use one of {', '.join(METRICS)} or a callable")
