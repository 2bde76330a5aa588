"""Fitness of a gene list: apply the genes to the frozen model, measure a metric on data, revert.

The evaluator reads its data lazily: nothing is loaded until the first evaluation, so a test
split handed over at set-up is not touched before it is actually scored.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any, Callable, Optional, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..quantization.model import QuantizedModel
from .metrics import Metric, MetricSpec, make_metric

__all__ = ["Evaluator", "FunctionEvaluator", "DataSpec", "materialize"]

DataSpec = Union[DataLoader, Dataset, tuple]


def materialize(data: DataSpec, batch_size: int) -> list[tuple[Any, Any]]:
    """Turn a DataLoader, a Dataset or an ``(inputs, targets)`` pair into a fixed list of batches.

    In a pair, inputs are a tensor or a list of tensors (e.g. detection images of different sizes)
    and targets anything sliceable of the same length (a tensor, or a list of detection dicts).
    """
    if isinstance(data, tuple) and len(data) == 2 and (
            isinstance(data[0], torch.Tensor)
            or (isinstance(data[0], list) and all(isinstance(x, torch.Tensor) for x in data[0]))):
        inputs, targets = data
        if len(inputs) != len(targets):
            raise ValueError(f"inputs ({len(inputs)}) and targets ({len(targets)}) differ in length")
        batches = [(inputs[i:i + batch_size], targets[i:i + batch_size]) for i in range(0, len(inputs), batch_size)]
    elif isinstance(data, DataLoader):
        batches = [tuple(batch) for batch in data]
    elif isinstance(data, Dataset):
        batches = [tuple(batch) for batch in DataLoader(data, batch_size=batch_size, shuffle=False)]
    else:
        raise TypeError(f"data must be a DataLoader, a Dataset or an (inputs, targets) tuple of tensors, "
                        f"got {type(data).__name__}")
    if not batches:
        raise ValueError("the dataset is empty; an evaluator needs at least one sample")
    return batches


class Evaluator:
    """Fitness of gene lists on one data split.

    ``metric`` is ``"accuracy"`` (ties broken by loss), ``"top5"``, ``"loss"``, a
    :class:`~deap_quant.evaluation.metrics.Metric`, or a per-batch callable ``fn(outputs,
    targets) -> float`` (mean over samples). Calling the evaluator with a gene list returns the
    fitness tuple; :meth:`scores` returns the named metric values.
    """

    def __init__(self, qmodel: QuantizedModel, data: DataSpec, metric: MetricSpec = "accuracy",
                 batch_size: int = 512):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} is not valid; use a positive integer")
        self.qmodel = qmodel
        self.data = data
        self.batch_size = batch_size
        self.metric: Metric = make_metric(metric)
        self.evaluations = 0
        self._batches: Optional[list[tuple[Any, Any]]] = None

    # ------------------------------------------------------------------ data
    @property
    def batches(self) -> list[tuple[Any, Any]]:
        if self._batches is None:
            self._batches = materialize(self.data, self.batch_size)
        return self._batches

    @property
    def n_samples(self) -> int:
        return sum(len(targets) for _, targets in self.batches)

    # ------------------------------------------------------------------ measuring
    def run(self, module: nn.Module) -> Metric:
        """Run ``module`` over all batches and return the filled metric."""
        metric = self.metric
        metric.reset()
        with torch.inference_mode():
            for inputs, targets in self.batches:
                try:
                    outputs = module(inputs)
                except RuntimeError as error:
                    shape = tuple(inputs.shape) if hasattr(inputs, "shape") else type(inputs).__name__
                    raise ValueError(f"inputs of shape {shape} do not fit the model: {error}") from error
                metric.update(outputs, targets)
        return metric

    def __call__(self, genes: Iterable[Sequence[int]] = ()) -> tuple[float, ...]:
        """Fitness of ``genes`` (higher is better in every component)."""
        self.evaluations += 1
        with self.qmodel.applied(genes):
            return tuple(self.run(self.qmodel.module).fitness())

    def scores(self, genes: Iterable[Sequence[int]] = ()) -> dict[str, float]:
        """Named metric values of the quantized model with ``genes`` applied."""
        with self.qmodel.applied(genes):
            return self.run(self.qmodel.module).summary()

    def score_module(self, module: nn.Module) -> dict[str, float]:
        """Named metric values of any module (e.g. the float model) on this split."""
        was_training = module.training
        module.eval()
        try:
            return self.run(module).summary()
        finally:
            module.train(was_training)

    @property
    def headline(self) -> str:
        """Name of the headline metric in :meth:`scores`."""
        return self.metric.name

    def with_data(self, data: DataSpec) -> Evaluator:
        """A new evaluator with the same model, metric and batch size on other data."""
        return Evaluator(self.qmodel, data, metric=copy.copy(self.metric), batch_size=self.batch_size)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_batches"] = self.batches  # ship data once, as batches
        state["data"] = None
        return state


class FunctionEvaluator(Evaluator):
    """Wraps a user's ``evaluate(module) -> dict | tuple`` function as an evaluator.

    The function receives the quantized module with the genes applied. If it returns a dict,
    ``key`` names the headline value and ``higher_is_better`` its direction; a tuple is used as
    the fitness directly.
    """

    def __init__(self, qmodel: QuantizedModel, function: Callable[[nn.Module], Any], key: str = "score",
                 higher_is_better: bool = True):
        self.qmodel = qmodel
        self.function = function
        self.key = key
        self.higher_is_better = higher_is_better
        self.evaluations = 0

    def _call(self, module: nn.Module) -> dict[str, float]:
        with torch.inference_mode():
            value = self.function(module)
        if isinstance(value, dict):
            return {k: float(v) for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            return {self.key: float(value[0]), **{f"{self.key}_{i}": float(v) for i, v in enumerate(value[1:], 1)}}
        return {self.key: float(value)}

    def __call__(self, genes: Iterable[Sequence[int]] = ()) -> tuple[float, ...]:
        self.evaluations += 1
        with self.qmodel.applied(genes):
            values = self._call(self.qmodel.module)
        primary = values[self.key] if self.higher_is_better else -values[self.key]
        return primary, 0.0

    def scores(self, genes: Iterable[Sequence[int]] = ()) -> dict[str, float]:
        with self.qmodel.applied(genes):
            return self._call(self.qmodel.module)

    def score_module(self, module: nn.Module) -> dict[str, float]:
        return self._call(module.eval())

    @property
    def headline(self) -> str:
        return self.key

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()
