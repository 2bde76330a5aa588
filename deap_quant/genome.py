"""Genes, individuals and the gene space they are drawn from.

The evolutionary side sees a quantized model only as plain data: a *layer table* (sizes and
level counts), each layer's integer base states (NumPy arrays) and, for residual-guided sampling,
one residual array per layer. Individuals hold nothing but genes (small named tuples), so cloning
and pickling them is cheap. All randomness comes from
Python's :mod:`random`, which DEAP's algorithms use too, so one ``random.seed`` fixes a run.
"""

from __future__ import annotations

import bisect
import copy
import random
from collections.abc import Iterable, Sequence
from typing import Any, Callable, NamedTuple, Optional, Union

import numpy as np
from deap import base

__all__ = ["Gene", "Fitness", "Individual", "MultiFitness", "MultiIndividual", "normalize", "as_gene",
           "GeneEffects", "GeneSpace"]


class Gene(NamedTuple):
    """Shift weight ``index`` (flat) of quantized layer ``layer`` by ``offset`` grid levels."""

    layer: int
    index: int
    offset: int


def as_gene(gene: Sequence[int]) -> Gene:
    """Any ``(layer, index, offset)`` sequence (tuple, list, :class:`Gene`) as a :class:`Gene` of ints."""
    layer, index, offset = gene
    return Gene(int(layer), int(index), int(offset))


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
        # Genes are immutable tuples: a shallow copy of the list is a deep one. The fitness keeps
        # what DEAP sets on it besides its values (e.g. NSGA-II's ``crowding_dist``, which DEAP's own
        # ``Fitness.__deepcopy__`` drops); any other attribute is deep-copied, as ``copy.deepcopy`` would.
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        list.__init__(clone, self)
        for name, value in self.__dict__.items():
            if name != "fitness":
                clone.__dict__[name] = copy.deepcopy(value, memo)
        fitness = type(self.fitness).__new__(type(self.fitness))
        for name, value in vars(self.fitness).items():
            fitness.__dict__[name] = value if name == "wvalues" else copy.deepcopy(value, memo)
        clone.fitness = fitness
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
    if max_offset is None:
        return _merged(genes, lambda layer, index: None)
    return _merged(genes, lambda layer, index: (-max_offset, max_offset))


def _merged(genes: Iterable[Sequence[int]],
            bounds: Callable[[int, int], Optional[tuple[int, int]]]) -> list[Gene]:
    """Genes summed per weight, each offset clipped to ``bounds(layer, index)`` (``None``: unclipped),
    zeros dropped, sorted by weight."""
    merged: dict[tuple[int, int], int] = {}
    for layer, index, offset in genes:
        key = (int(layer), int(index))
        merged[key] = merged.get(key, 0) + int(offset)
    out = []
    for (layer, index), offset in sorted(merged.items()):
        limits = bounds(layer, index)
        if limits is not None:
            offset = max(limits[0], min(limits[1], offset))
        if offset:
            out.append(Gene(layer, index, offset))
    return out


def _cumulative(weights: Sequence[float]) -> list[float]:
    total, out = 0.0, []
    for weight in weights:
        total += float(weight)
        out.append(total)
    return out


class GeneEffects:
    """What genes do to a model's weights, worked out from plain data: each layer's integer base
    states (flat NumPy arrays) and number of grid levels. No model tensor is touched.

    Genes are judged exactly as :meth:`QuantizedModel.apply_` applies them: each offset clipped to
    ``+-n_levels``, the offsets on one weight added up, the state clamped to ``0..n_levels - 1``; a
    weight that ends on its base state is no change. Duplicate genes, offsets that cancel and moves
    past the grid's edge therefore count by their effect. Genes may be any ``(layer, index, offset)``
    sequences.
    """

    def __init__(self, base_states: Sequence[np.ndarray], n_levels: Sequence[int]):
        self.n_levels = [int(n) for n in n_levels]
        if not self.n_levels or min(self.n_levels) < 2:
            raise ValueError(f"n_levels={self.n_levels!r} is not valid; give every layer's number of grid levels (>= 2)")
        if len(base_states) != len(self.n_levels):
            raise ValueError(f"got {len(base_states)} base state arrays for {len(self.n_levels)} layers; "
                             "give one base state array per layer")
        self.base_states: list[np.ndarray] = []
        for layer, (states, limit) in enumerate(zip(base_states, self.n_levels)):
            states = np.asarray(states).reshape(-1)
            if states.dtype.kind not in "iu":
                raise ValueError(f"base states of layer {layer} have dtype {states.dtype}; give integer grid levels")
            if states.size and (int(states.min()) < 0 or int(states.max()) >= limit):
                raise ValueError(f"base states of layer {layer} must lie in 0..{limit - 1} "
                                 f"(found {int(states.min())}..{int(states.max())})")
            self.base_states.append(states)
        self.layer_sizes = [int(states.size) for states in self.base_states]

    def changes(self, genes: Iterable[Sequence[int]]) -> tuple[tuple[int, int, int], ...]:
        """The weights ``genes`` move off their base state: ``((layer, index, new state), ...)``, sorted."""
        merged: dict[tuple[int, int], int] = {}
        for gene in genes:
            layer, index, offset = (int(value) for value in gene)
            if not 0 <= layer < len(self.n_levels):
                raise ValueError(f"gene {tuple(gene)!r}: layer={layer} is out of range; valid layers are "
                                 f"0..{len(self.n_levels) - 1}")
            if not 0 <= index < self.layer_sizes[layer]:
                raise ValueError(f"gene {tuple(gene)!r}: index={index} is out of range for layer {layer}; "
                                 f"valid indices are 0..{self.layer_sizes[layer] - 1}")
            limit = self.n_levels[layer]
            merged[layer, index] = merged.get((layer, index), 0) + max(-limit, min(limit, offset))
        out = []
        for (layer, index), offset in sorted(merged.items()):
            base = int(self.base_states[layer][index])
            state = max(0, min(self.n_levels[layer] - 1, base + offset))
            if state != base:
                out.append((layer, index, state))
        return tuple(out)

    def count(self, genes: Iterable[Sequence[int]]) -> int:
        """How many weights ``genes`` change."""
        return len(self.changes(genes))

    def same(self, genes1: Iterable[Sequence[int]], genes2: Iterable[Sequence[int]]) -> bool:
        """Whether two gene lists change the same weights to the same states (DEAP's ``similar``)."""
        return genes1 is genes2 or self.changes(genes1) == self.changes(genes2)


class GeneSpace:
    """Where genes come from: which layer, which weight, which offset.

    * ``layer_choice``: ``"uniform"`` (every layer alike, the paper's ES), ``"size"``
      (proportional to the number of weights) or a sequence of per-layer weights.
    * ``sampler``: ``"uniform"`` (any weight, any offset in +-1..``max_offset``) or ``"residual"``
      (weights drawn with probability proportional to ``|residual| ** sharpness``, offset in the
      direction rounding did not take). ``residuals`` (one flat array per layer) is required for
      ``"residual"``.
    * ``base_states`` (one flat integer array per layer, with ``n_levels``): every weight's grid
      level, so that only moves that stay on the grid are proposed. A weight on the top level can
      only move down, one on level 0 only up; an offset never runs past the grid's edge. The
      residual sampler gives a weight whose residual points off the grid (a clipped weight) zero
      weight; in a layer where no weight can move the way its residual points, it draws weights
      uniformly and moves them the way they can go. Without ``base_states`` every offset in
      +-1..``max_offset`` is assumed possible. :attr:`effects` then judges genes by their effect.

    Build it from the base states in force when the search starts (after any
    :meth:`QuantizedModel.rebase_`): genes are offsets from those.
    """

    def __init__(self, layer_sizes: Sequence[int], n_levels: Optional[Sequence[int]] = None, *,
                 layer_choice: Union[str, Sequence[float]] = "size", sampler: str = "uniform",
                 max_offset: int = 1, residuals: Optional[Sequence[np.ndarray]] = None,
                 sharpness: float = 2.0, base_states: Optional[Sequence[np.ndarray]] = None):
        self.layer_sizes = [int(size) for size in layer_sizes]
        if not self.layer_sizes or min(self.layer_sizes) < 1:
            raise ValueError(f"layer_sizes={self.layer_sizes!r} must be a non-empty list of positive sizes")
        self.n_levels = [int(n) for n in n_levels] if n_levels is not None else None
        if self.n_levels is not None and (len(self.n_levels) != len(self.layer_sizes) or min(self.n_levels) < 2):
            raise ValueError(f"n_levels={self.n_levels!r} is not valid; give {len(self.layer_sizes)} level counts, "
                             "each at least 2")
        if isinstance(max_offset, bool) or not isinstance(max_offset, int) or max_offset < 1:
            raise ValueError(f"max_offset={max_offset!r} is not valid; use an integer >= 1")
        self.max_offset = max_offset
        self.effects: Optional[GeneEffects] = None
        if base_states is not None:
            if self.n_levels is None:
                raise ValueError("base_states needs n_levels (every layer's number of grid levels)")
            if len(base_states) != len(self.layer_sizes):
                raise ValueError(f"got {len(base_states)} base state arrays for {len(self.layer_sizes)} layers; "
                                 "give one base state array per layer")
            for layer, (states, size) in enumerate(zip(base_states, self.layer_sizes)):
                if np.size(states) != size:
                    raise ValueError(f"layer {layer} has {np.size(states)} base states but {size} weights")
            self.effects = GeneEffects(base_states, self.n_levels)
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
        # Per layer: cumulative sampling weights (None: no possible residual move, draw uniformly),
        # the last index with a positive weight, and each weight's residual direction.
        self._residual_cdf: list[Optional[np.ndarray]] = []
        self._residual_last: list[int] = []
        self._residual_sign: list[np.ndarray] = []
        if sampler == "residual":
            if residuals is None or len(residuals) != len(self.layer_sizes):
                raise ValueError("sampler='residual' needs one residual array per layer")
            for layer, residual in enumerate(residuals):
                residual = np.asarray(residual, dtype=np.float64).reshape(-1)
                if residual.size != self.layer_sizes[layer]:
                    raise ValueError(f"layer {layer} has {residual.size} residuals but {self.layer_sizes[layer]} weights")
                up = residual >= 0
                weight = np.abs(residual) ** sharpness + 1e-12
                if self.effects is not None:  # a move off the grid clamps to nothing: zero weight
                    base = self.effects.base_states[layer]
                    weight[np.where(up, base >= self.n_levels[layer] - 1, base <= 0)] = 0.0
                positive = np.flatnonzero(weight > 0)
                self._residual_cdf.append(np.cumsum(weight) if positive.size else None)
                self._residual_last.append(int(positive[-1]) if positive.size else -1)
                self._residual_sign.append(np.where(up, 1, -1).astype(np.int8))

    @classmethod
    def from_layer_table(cls, table: Sequence[Any], **options: Any) -> GeneSpace:
        """Build from :meth:`QuantizedModel.layer_table` (objects or dicts with ``numel`` and ``n_levels``)."""
        def field(entry: Any, name: str) -> Any:
            return entry[name] if isinstance(entry, dict) else getattr(entry, name)
        return cls([field(e, "numel") for e in table], [field(e, "n_levels") for e in table], **options)

    @property
    def n_layers(self) -> int:
        return len(self.layer_sizes)

    def offset_range(self, layer: int, index: int) -> tuple[int, int]:
        """``(low, high)``: the offsets weight ``index`` of ``layer`` can take (within +-``max_offset``, on the grid)."""
        if self.effects is None:
            return -self.max_offset, self.max_offset
        base = int(self.effects.base_states[layer][index])
        return -min(self.max_offset, base), min(self.max_offset, self.effects.n_levels[layer] - 1 - base)

    def sample_layer(self) -> int:
        return bisect.bisect_right(self._layer_cdf, random.random() * self._layer_cdf[-1])

    def sample_index(self, layer: int) -> int:
        if self.sampler == "residual":
            cdf = self._residual_cdf[layer]
            if cdf is not None:
                return min(int(np.searchsorted(cdf, random.random() * cdf[-1], side="right")),
                           self._residual_last[layer])
        return random.randrange(self.layer_sizes[layer])

    def sample_offset(self, layer: int, index: int) -> int:
        """An offset weight ``index`` can take: ``"residual"`` moves the way rounding did not (or,
        where that leaves the grid, the way it can); ``"uniform"`` draws any possible offset alike."""
        low, high = self.offset_range(layer, index)
        if self.sampler == "residual":
            sign = int(self._residual_sign[layer][index])
            if (high if sign > 0 else -low) == 0:
                sign = -sign
            return sign * random.randint(1, high if sign > 0 else -low)
        draw = low + random.randrange(high - low)  # high - low non-zero offsets in low..high
        return draw + 1 if draw >= 0 else draw

    def sample_gene(self, layer: Optional[int] = None) -> Gene:
        layer = self.sample_layer() if layer is None else layer
        index = self.sample_index(layer)
        return Gene(layer, index, self.sample_offset(layer, index))

    def normalize(self, genes: Iterable[Sequence[int]]) -> list[Gene]:
        """Like :func:`normalize`, with each weight's offset clipped to :meth:`offset_range`: merge
        genes on the same weight, clip, drop zeros, sort. Every gene left then changes its weight."""
        return _merged(genes, self.offset_range)

    def sample(self, k: int) -> list[Gene]:
        """``k`` random genes, normalised (so possibly fewer if two land on the same weight)."""
        return self.normalize(self.sample_gene() for _ in range(k))
