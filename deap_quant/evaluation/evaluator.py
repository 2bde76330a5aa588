"""Fitness of a gene list: apply the genes to the frozen model, measure a metric on data, revert.

The evaluator reads its data lazily: nothing is loaded until the first evaluation, so a test
split handed over at set-up is not touched before it is actually scored. Batches are moved to the
model's device, and floating inputs to its floating dtype (:func:`place`), when they are used.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Callable, Optional, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..quantization.model import QuantizedModel
from .metrics import Metric, MetricSpec, make_metric

__all__ = ["Evaluator", "FunctionEvaluator", "DataSpec", "eval_mode", "materialize", "model_placement", "place",
           "inputs_do_not_fit"]

DataSpec = Union[DataLoader, Dataset, tuple]

Placement = tuple[Optional[torch.device], Optional[torch.dtype]]

#: Words of PyTorch's shape-mismatch messages ("mat1 and mat2 shapes cannot be multiplied", "expected
#: input[...] to have 1 channels", "Expected 3D (unbatched) or 4D (batched) input", "size of tensor a").
_SHAPE_WORDS = re.compile(r"shape|\bsizes?\b|\bchannels\b|dimension|\b\d+D\b|should contain \d+ elements", re.I)
#: Words of other failures that may mention sizes (dtypes, devices, memory).
_OTHER_CAUSES = re.compile(r"dtype|\btype\b|device|out of memory|allocat", re.I)


def model_placement(module: nn.Module) -> Placement:
    """``(device, dtype)`` of ``module``'s first floating parameter (in ``module.parameters()`` order),
    else of its first floating buffer; ``(None, None)`` if it has neither."""
    found: Placement = (None, None)
    stack = [module]
    while stack:  # (depth first, as named_modules(); cheaper than parameters(), it runs every evaluation)
        current = stack.pop()
        for tensor in current._parameters.values():
            if tensor is not None and tensor.is_floating_point():
                return tensor.device, tensor.dtype
        if found[0] is None:
            for tensor in current._buffers.values():
                if tensor is not None and tensor.is_floating_point():
                    found = (tensor.device, tensor.dtype)
                    break
        stack.extend(reversed([child for child in current._modules.values() if child is not None]))
    return found


def place(value: Any, device: Optional[torch.device], dtype: Optional[torch.dtype] = None) -> Any:
    """``value`` with every tensor in it (nested tuples, lists, dicts) moved to ``device``, and every
    floating one converted to ``dtype`` (when given). Tensors already there are returned as they are."""
    if isinstance(value, torch.Tensor):
        if dtype is not None and value.is_floating_point() and value.dtype != dtype:
            return value.to(device=device, dtype=dtype)
        if device is not None and value.device != device:
            return value.to(device)
        return value
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(place(item, device, dtype) for item in value)
    if isinstance(value, dict):
        return {key: place(item, device, dtype) for key, item in value.items()}
    return value


def inputs_do_not_fit(error: RuntimeError, inputs: Any) -> Optional[ValueError]:
    """A ``ValueError`` saying that ``inputs`` do not fit the model, if ``error`` is a shape mismatch
    (else ``None``: the error has another cause and should propagate as it is)."""
    message = str(error)
    if not _SHAPE_WORDS.search(message) or _OTHER_CAUSES.search(message):
        return None
    shape = tuple(inputs.shape) if hasattr(inputs, "shape") else type(inputs).__name__
    return ValueError(f"inputs of shape {shape} do not fit the model: {message}")


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
        batches = [_pair(batch, position, "DataLoader") for position, batch in enumerate(data)]
    elif isinstance(data, Dataset):
        batches = [_pair(batch, position, "Dataset")
                   for position, batch in enumerate(DataLoader(data, batch_size=batch_size, shuffle=False))]
    else:
        raise TypeError(f"data must be a DataLoader, a Dataset or an (inputs, targets) tuple of tensors, "
                        f"got {type(data).__name__}")
    if not batches:
        raise ValueError("the dataset is empty; an evaluator needs at least one sample")
    return batches


def _pair(batch: Any, position: int, source: str) -> tuple[Any, Any]:
    """``batch`` (as a DataLoader yields it) as an ``(inputs, targets)`` tuple; ``ValueError`` if it is not a pair."""
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        items = tuple(batch)
        if len(items) == 2:
            return items[0], items[1]
        found = f"{len(items)} item{'' if len(items) == 1 else 's'}"
    elif isinstance(batch, dict):
        found = f"a dict with keys {list(batch)}"
    elif isinstance(batch, torch.Tensor):
        found = f"a single tensor of shape {tuple(batch.shape)}"
    else:
        found = f"a {type(batch).__name__}"
    raise ValueError(f"expected an (inputs, targets) pair per batch; batch {position} of the {source} has {found} "
                     "(wrap the data so that each item is an (input, target) pair)")


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` and every submodule in eval mode inside, each put back in its own mode after.

    Every evaluation runs in eval mode: a module left in training mode would use batch statistics
    and dropout, and would update its normalisation layers' running statistics.
    """
    modes = [(child, child.training) for child in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for child, training in modes:
            child.training = training


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
        self._placed: Optional[tuple[Placement, list[tuple[Any, Any]]]] = None

    # ------------------------------------------------------------------ data
    @property
    def batches(self) -> list[tuple[Any, Any]]:
        """The data as batches, on the quantized model's device (as last placed, see :meth:`batches_for`)."""
        placed = getattr(self, "_placed", None)  # (absent in evaluators pickled by older versions)
        if placed is None:
            return self.batches_for(self.qmodel.module)
        return placed[1]

    def batches_for(self, module: nn.Module, placement: Optional[Placement] = None) -> list[tuple[Any, Any]]:
        """The batches placed for ``module``: tensors on its device, floating inputs in its dtype.

        The placed copies are kept until a module on another device or dtype asks for them.
        ``placement`` is :func:`model_placement` of ``module``, if the caller has it already.
        """
        if self._batches is None:
            self._batches = materialize(self.data, self.batch_size)
        device, dtype = key = model_placement(module) if placement is None else placement
        if getattr(self, "_placed", None) is None or self._placed[0] != key:
            self._placed = (key, [(place(inputs, device, dtype), place(targets, device))
                                  for inputs, targets in self._batches])
        return self._placed[1]

    @property
    def n_samples(self) -> int:
        return sum(len(targets) for _, targets in self.batches)

    # ------------------------------------------------------------------ measuring
    def run(self, module: nn.Module) -> Metric:
        """Run ``module`` over all batches and return the filled metric."""
        metric = self.metric
        metric.reset()
        batches = self.batches_for(module)
        with torch.inference_mode(), eval_mode(module):
            for inputs, targets in batches:
                try:
                    outputs = module(inputs)
                except RuntimeError as error:
                    misfit = inputs_do_not_fit(error, inputs)
                    if misfit is None:
                        raise
                    raise misfit from error
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
        return self.run(module).summary()

    @property
    def headline(self) -> str:
        """Name of the headline metric in :meth:`scores`."""
        return self.metric.name

    def with_data(self, data: DataSpec) -> Evaluator:
        """A new evaluator with the same model, metric and batch size on other data."""
        return Evaluator(self.qmodel, data, metric=copy.copy(self.metric), batch_size=self.batch_size)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self._batches is None:
            self._batches = materialize(self.data, self.batch_size)
        state["_batches"] = self._batches  # ship data once, as batches (placed again where they are used)
        state["_placed"] = None
        state["data"] = None
        return state


class FunctionEvaluator(Evaluator):
    """Wraps a user's ``evaluate(module) -> number | dict | pair`` function as an evaluator.

    The function receives the quantized module with the genes applied. A number is the headline
    value; in a dict, ``key`` names it; either gives the fitness ``(value, 0.0)``. A pair
    ``(primary, tie_break)`` is used as the fitness directly (the two values of the toolbox's
    :class:`~deap_quant.genome.Fitness`); any other length raises ``ValueError``.
    ``higher_is_better=False`` negates the fitness (every component), as evolution maximises it.
    """

    #: How many values a fitness holds (``Fitness.weights`` of the evolutionary side: ``(1.0, 1.0)``).
    FITNESS_LENGTH = 2

    def __init__(self, qmodel: QuantizedModel, function: Callable[[nn.Module], Any], key: str = "score",
                 higher_is_better: bool = True):
        self.qmodel = qmodel
        self.function = function
        self.key = key
        self.higher_is_better = higher_is_better
        self.evaluations = 0

    def _raw(self, module: nn.Module) -> Any:
        with torch.inference_mode(), eval_mode(module):
            return self.function(module)

    def _named(self, value: Any) -> dict[str, float]:
        if isinstance(value, dict):
            return {k: float(v) for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            return {self.key: float(value[0]), **{f"{self.key}_{i}": float(v) for i, v in enumerate(value[1:], 1)}}
        return {self.key: float(value)}

    def _call(self, module: nn.Module) -> dict[str, float]:
        return self._named(self._raw(module))

    def __call__(self, genes: Iterable[Sequence[int]] = ()) -> tuple[float, ...]:
        self.evaluations += 1
        with self.qmodel.applied(genes):
            value = self._raw(self.qmodel.module)
        sign = 1.0 if self.higher_is_better else -1.0
        if isinstance(value, (tuple, list)):
            if len(value) != self.FITNESS_LENGTH:
                raise ValueError(f"the evaluation function returned a {type(value).__name__} of length {len(value)}; "
                                 f"return a number or a pair (primary, tie_break): the fitness holds "
                                 f"{self.FITNESS_LENGTH} values")
            return tuple(sign * float(v) for v in value)
        return sign * self._named(value)[self.key], 0.0

    def scores(self, genes: Iterable[Sequence[int]] = ()) -> dict[str, float]:
        with self.qmodel.applied(genes):
            return self._call(self.qmodel.module)

    def score_module(self, module: nn.Module) -> dict[str, float]:
        return self._call(module)

    @property
    def headline(self) -> str:
        return self.key

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()
