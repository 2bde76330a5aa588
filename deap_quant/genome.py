"""Genes, individuals and the gene space they are drawn from.

The evolutionary side sees a quantized model only as a *layer table* (sizes and level counts)
and, for residual-guided sampling, one residual array per layer. Individuals hold nothing but
genes (small named tuples), so cloning and pickling them is cheap. All randomness comes from
Python's :mod:`random`, which DEAP's algorithms use too, so one ``random.seed`` fixes a run.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, Optional, Union

import numpy as np
from deap import base

__all__ = ["Gene", "Fitness", "Individual", "MultiFitness", "MultiIndividual", "normalize", "GeneSpace"]


class Gene(NamedTuple):
    """Shift weight ``index`` (flat) of quantized layer ``layer`` by ``offset`` grid levels."""

    layer: int
    index: int
    offset: int


class Fitness(base.Fitness):
    """(validation metric, tie-breaker), both maximised."""

    weights = (1.0, 1.0)


class MultiFitness(base.Fitness):
    """(validation metric, number of changed weights) for NSGA-II: maximise, minimise."""

    weights = (1.0, -1.0)


class Individual(list):
    """A list of :class:`Gene` with a DEAP fitness. Defined here, at module level, so it pickles."""

    fitness_class = Fitness

    def __init__(self, genes: Iterable[Sequence[int]] = ()):
        super().__init__(Gene(*gene) for gene in genes)
        self.fitness = self.fitness_class()

    def __deepcopy__(self, memo: dict) -> Individual:
        # Genes are immutable tuples: a shallow copy of the list plus a fitness copy is a deep copy.
        clone = type(self).__new__(type(self))
        list.__init__(clone, self)
        clone.__dict__.update(self.__dict__)
        clone.fitness = type(self.fitness)()
        clone.fitness.wvalues = self.fitness.wvalues
        return clone

    def __reduce__(self):
        return type(self), (list(self),), self.__dict__

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list.__repr__(self)}, fitness={self.fitness.values})"


class MultiIndividual(Individual):
    """An individual with a two-objective :class:`MultiFitness`."""

    fitness_class = MultiFitness


def normalize(genes: Iterable[Sequence[int]], max_offset: Optional[int] = None) -> list[Gene]:
    """Merge genes on the same weight (offsets add up), clip offsets, drop zeros, sort by weight."""
    merged: dict[tuple[int, int], int] = {}
    for layer, index, offset in genes:
        key = (int(layer), int(index))
        merged[key] = merged.get(key, 0) + int(offset)
    out = []
    for (layer, index), offset in sorted(merged.items()):
        if max_offset is not None:
            offset = max(-max_offset, min(max_offset, offset))
        if offset:
            out.append(Gene(layer, index, offset))
    return out


def _cumulative(weights: Sequence[float]) -> list[float]:
    total, out = 0.0, []
    for weight in weights:
        total += float(weight)
        out.append(total)
    return out


class GeneSpace:
    """Where genes come from: which layer, which weight, which offset.

    * ``layer_choice``: ``"uniform"`` (every layer alike, the paper's ES), ``"size"``
      (proportional to the number of weights) or a sequence of per-layer weights.
    * ``sampler``: ``"uniform"`` (any weight, offset +-1..``max_offset``) or ``"residual"``
      (weights drawn with probability proportional to ``|residual| ** sharpness``, offset in the
      direction rounding did not take). ``residuals`` (one flat array per layer) is required for
      ``"residual"``.
    """

    def __init__(self, layer_sizes: Sequence[int], n_levels: Optional[Sequence[int]] = None, *,
                 layer_choice: Union[str, Sequence[float]] = "size", sampler: str = "uniform",
                 max_offset: int = 1, residuals: Optional[Sequence[np.ndarray]] = None,
                 sharpness: float = 2.0):
        self.layer_sizes = [int(size) for size in layer_sizes]
        if not self.layer_sizes or min(self.layer_sizes) < 1:
            raise ValueError(f"layer_sizes={self.layer_sizes!r} must be a non-empty list of positive sizes")
        self.n_levels = list(n_levels) if n_levels is not None else None
        if isinstance(max_offset, bool) or not isinstance(max_offset, int) or max_offset < 1:
            raise ValueError(f"max_offset={max_offset!r} is not valid; use an integer >= 1")
        self.max_offset = max_offset
        if isinstance(layer_choice, str):
            if layer_choice == "uniform":
                layer_weights = [1.0] * len(self.layer_sizes)
            elif layer_choice == "size":
                layer_weights = [float(size) for size in self.layer_sizes]
            else:
                raise ValueError(f"layer_choice={layer_choice!r} is not valid; use 'uniform', 'size' "
                                 "or a list of per-layer weights")
        else:
            layer_weights = [float(w) for w in layer_choice]
            if len(layer_weights) != len(self.layer_sizes) or min(layer_weights) < 0 or sum(layer_weights) <= 0:
                raise ValueError(f"layer_choice weights {layer_weights!r} must be {len(self.layer_sizes)} "
                                 "non-negative numbers with a positive sum")
        self.layer_choice = layer_choice
        self._layer_cdf = _cumulative(layer_weights)
        if sampler not in ("uniform", "residual"):
            raise ValueError(f"sampler={sampler!r} is not valid; use 'uniform' or 'residual'")
        self.sampler = sampler
        self._residual_cdf: list[np.ndarray] = []
        self._residual_sign: list[np.ndarray] = []
        if sampler == "residual":
            if residuals is None or len(residuals) != len(self.layer_sizes):
                raise ValueError("sampler='residual' needs one residual array per layer")
            for residual in residuals:
                residual = np.asarray(residual, dtype=np.float64).reshape(-1)
                self._residual_cdf.append(np.cumsum(np.abs(residual) ** sharpness + 1e-12))
                self._residual_sign.append(np.where(residual >= 0, 1, -1).astype(np.int64))

    @classmethod
    def from_layer_table(cls, table: Sequence[Any], **options: Any) -> GeneSpace:
        """Build from :meth:`QuantizedModel.layer_table` (objects or dicts with ``numel`` and ``n_levels``)."""
        def field(entry: Any, name: str) -> Any:
            return entry[name] if isinstance(entry, dict) else getattr(entry, name)
        return cls([field(e, "numel") for e in table], [field(e, "n_levels") for e in table], **options)

    @property
    def n_layers(self) -> int:
        return len(self.layer_sizes)

    def sample_layer(self) -> int:
        return bisect.bisect_right(self._layer_cdf, random.random() * self._layer_cdf[-1])

    def sample_index(self, layer: int) -> int:
        if self.sampler == "residual":
            cdf = self._residual_cdf[layer]
            return int(np.searchsorted(cdf, random.random() * cdf[-1], side="right").clip(0, len(cdf) - 1))
        return random.randrange(self.layer_sizes[layer])

    def sample_offset(self, layer: int, index: int) -> int:
        magnitude = random.randint(1, self.max_offset)
        if self.sampler == "residual":
            return magnitude * int(self._residual_sign[layer][index])
        return magnitude if random.random() < 0.5 else -magnitude

    def sample_gene(self, layer: Optional[int] = None) -> Gene:
        layer = self.sample_layer() if layer is None else layer
        index = self.sample_index(layer)
        return Gene(layer, index, self.sample_offset(layer, index))

    def sample(self, k: int) -> list[Gene]:
        """``k`` random genes, normalised (so possibly fewer if two land on the same weight)."""
        return normalize((self.sample_gene() for _ in range(k)), self.max_offset)
