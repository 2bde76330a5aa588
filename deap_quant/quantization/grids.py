"""Quantization grids: where each integer state of a weight lands in real numbers.

A grid maps integer *states* ``0 .. n_levels - 1`` to real weight values. Every grid is
per output channel (one channel for per-tensor grids), and every operation is vectorised.
Two kinds exist:

* :class:`UniformGrid` -- an affine grid ``value = (state - zero_point) * scale``;
* :class:`CodebookGrid` -- a sorted codebook per channel (fitted by 1-D k-means),
  ``value = codebook[channel, state]``.

Both expose the same small interface, so nothing downstream needs to know which one it has.
This module imports torch only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

__all__ = ["UniformGrid", "CodebookGrid", "Grid", "fit_uniform_grid", "fit_codebook_grid", "GRID_RANGES",
           "MSE_CLIP_RATIOS"]

#: Symmetric grid ranges (see :func:`fit_uniform_grid`).
GRID_RANGES = ("full", "narrow", "auto")

#: Clipping ratios tried by ``scale_method="mse"``: 0.05 to 1.25 in steps of 0.01. For a symmetric grid
#: the ratio places the largest symmetric level ``(2**(bits-1) - 1) * scale`` at ``ratio * max|w|`` (1.0:
#: the channel's largest weight lies on it; above 1: beyond it). For an affine grid it shrinks or widens
#: ``[min, max]``.
MSE_CLIP_RATIOS = torch.arange(5, 126, dtype=torch.float64).div(100).to(torch.float32)


@dataclass(frozen=True)
class _ChannelLayout:
    """Where the output channel sits in a weight tensor, so a flat index maps to a channel."""

    shape: tuple[int, ...]
    axis: int  # channel axis, or -1 for a per-tensor grid
    channels: int

    @property
    def inner(self) -> int:
        """Number of elements after the channel axis (the stride of the channel axis)."""
        if self.axis < 0:
            return 1
        size = 1
        for dim in self.shape[self.axis + 1:]:
            size *= dim
        return size

    def channel_of(self, flat_index: torch.Tensor) -> torch.Tensor:
        if self.axis < 0:
            return torch.zeros_like(flat_index)
        return (flat_index // self.inner) % self.channels

    def broadcast_shape(self) -> tuple[int, ...]:
        """Shape to view a per-channel vector so it broadcasts against the weight."""
        if self.axis < 0:
            return (1,) * len(self.shape)
        return tuple(self.channels if d == self.axis else 1 for d in range(len(self.shape)))


@dataclass(frozen=True)
class UniformGrid:
    """Affine grid: ``value = (state - zero_point[c]) * scale[c]`` with states in ``[0, n_levels)``."""

    scale: torch.Tensor  # float32 [channels]
    zero_point: torch.Tensor  # float32 [channels], integral values
    n_levels: int
    layout: _ChannelLayout

    kind = "uniform"

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest rounding. Returns ``(states, residual)`` shaped like ``weight``.

        ``residual = position - state`` where ``position`` is the weight's continuous place on
        the grid; its sign says which neighbour rounding did not take.
        """
        shape = self.layout.broadcast_shape()
        position = weight / self.scale.view(shape) + self.zero_point.view(shape)
        states = torch.round(position).clamp_(0, self.n_levels - 1)
        return states.to(torch.uint8), (position - states).to(torch.float32)

    def dequantize(self, states: torch.Tensor) -> torch.Tensor:
        """Values of a whole weight tensor of states (shaped like the weight)."""
        shape = self.layout.broadcast_shape()
        return (states.to(torch.float32) - self.zero_point.view(shape)) * self.scale.view(shape)

    def dequantize_at(self, states: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
        """Values of the states of the weights at ``flat_index`` (1-D tensors of equal length)."""
        channel = self.layout.channel_of(flat_index)
        return (states.to(torch.float32) - self.zero_point[channel]) * self.scale[channel]

    def to_state(self) -> dict:
        return {"kind": self.kind, "scale": self.scale, "zero_point": self.zero_point,
                "n_levels": self.n_levels, "shape": list(self.layout.shape), "axis": self.layout.axis}


@dataclass(frozen=True)
class CodebookGrid:
    """Non-uniform grid: a sorted codebook of ``n_levels`` values per channel."""

    codebook: torch.Tensor  # float32 [channels, n_levels], sorted along dim 1
    layout: _ChannelLayout

    kind = "kmeans"

    @property
    def n_levels(self) -> int:
        return int(self.codebook.shape[1])

    def _channel_major(self, weight: torch.Tensor) -> torch.Tensor:
        if self.layout.axis < 0:
            return weight.reshape(1, -1)
        return weight.movedim(self.layout.axis, 0).reshape(self.layout.channels, -1)

    def _from_channel_major(self, rows: torch.Tensor) -> torch.Tensor:
        if self.layout.axis < 0:
            return rows.reshape(self.layout.shape)
        moved = list(self.layout.shape)
        moved.insert(0, moved.pop(self.layout.axis))
        return rows.reshape(moved).movedim(0, self.layout.axis)

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._channel_major(weight).contiguous()
        upper = torch.searchsorted(self.codebook, rows).clamp_(1, self.n_levels - 1)
        lower = upper - 1
        low_value = torch.gather(self.codebook, 1, lower)
        high_value = torch.gather(self.codebook, 1, upper)
        gap = (high_value - low_value).clamp_min(1e-12)
        position = lower.to(torch.float32) + (rows - low_value) / gap
        states = torch.where(rows - low_value <= high_value - rows, lower, upper)
        residual = position - states.to(torch.float32)
        return (self._from_channel_major(states).to(torch.uint8),
                self._from_channel_major(residual).to(torch.float32))

    def dequantize(self, states: torch.Tensor) -> torch.Tensor:
        rows = self._channel_major(states).to(torch.int64)
        return self._from_channel_major(torch.gather(self.codebook, 1, rows))

    def dequantize_at(self, states: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
        channel = self.layout.channel_of(flat_index)
        return self.codebook[channel, states.to(torch.int64)]

    def to_state(self) -> dict:
        return {"kind": self.kind, "codebook": self.codebook, "shape": list(self.layout.shape),
                "axis": self.layout.axis}


Grid = Union[UniformGrid, CodebookGrid]


def _layout(weight: torch.Tensor, channel_axis: int, per_channel: bool) -> _ChannelLayout:
    shape = tuple(weight.shape)
    if not per_channel:
        return _ChannelLayout(shape, -1, 1)
    return _ChannelLayout(shape, channel_axis, shape[channel_axis])


def _per_channel_rows(weight: torch.Tensor, layout: _ChannelLayout) -> torch.Tensor:
    if layout.axis < 0:
        return weight.reshape(1, -1)
    return weight.movedim(layout.axis, 0).reshape(layout.channels, -1)


def _uniform_params(low: torch.Tensor, high: torch.Tensor, n_levels: int,
                    symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per channel for the range ``[low, high]`` (PyTorch observer conventions)."""
    tiny = torch.finfo(torch.float32).eps
    if symmetric:
        half = n_levels // 2
        bound = torch.maximum(low.abs(), high.abs())
        scale = (bound / ((n_levels - 1) / 2)).clamp_min(tiny)
        zero = torch.full_like(scale, float(half))
    else:
        low = low.clamp(max=0.0)
        high = high.clamp(min=0.0)
        scale = ((high - low) / (n_levels - 1)).clamp_min(tiny)
        zero = torch.round(-low / scale).clamp(0, n_levels - 1)
    return scale.to(torch.float32), zero.to(torch.float32)


def _symmetric_zero_points(grid_range: str, bits: int, low: torch.Tensor) -> list[torch.Tensor]:
    """The zero points a symmetric grid of ``grid_range`` may use per channel (``auto``: both mirror images)."""
    half = 2 ** (bits - 1)
    if grid_range == "narrow":
        return [torch.full_like(low, float(half - 1))]
    if grid_range == "full":
        return [torch.full_like(low, float(half))]
    # auto: the extra level below zero (zero point half) or above it (half - 1)
    return [torch.full_like(low, float(half)), torch.full_like(low, float(half - 1))]


def _rounding_error(rows: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, n_levels: int) -> torch.Tensor:
    """Per channel, the summed squared error of nearest rounding on the grid ``(scale, zero)``."""
    states = torch.round(rows / scale[:, None] + zero[:, None]).clamp_(0, n_levels - 1)
    return ((states - zero[:, None]) * scale[:, None] - rows).pow_(2).sum(dim=1)


def fit_uniform_grid(weight: torch.Tensor, bits: int, *, per_channel: bool, symmetric: bool,
                     scale_method: str, channel_axis: int = 0, grid_range: str = "full") -> UniformGrid:
    """Fit an affine grid to ``weight``.

    ``scale_method="minmax"`` spans the weight range; ``"mse"`` searches, per channel, the step
    (over :data:`MSE_CLIP_RATIOS`) that minimises the squared error of nearest rounding -- the
    weight error only, never an accuracy.

    Symmetric grids come in three ranges (``grid_range``); with ``L = 2**(bits-1) - 1``:

    * ``"full"``: levels ``-(L+1) .. L`` times the step (``2**bits`` levels, PyTorch's ``qint8``
      convention: the extra level is below zero). Its min-max step is PyTorch's observer
      convention ``max|w| / (L + 0.5)``, which clips the positive side (at 2 bits to ``2/3 max|w|``).
    * ``"narrow"``: levels ``-L .. L`` (``2**bits - 1`` levels), min-max step ``max|w| / L``.
    * ``"auto"``: the full range with the extra level placed per channel below or above zero
      (zero point ``L + 1`` or ``L``): with ``"mse"`` where it lowers the error, with ``"minmax"``
      on the side of the channel's largest ``|w|``, at step ``max|w| / (L + 1)``.

    A narrow grid's levels are a subset of the full grid's at the same step, so by weight error
    ``auto <= full <= narrow`` per channel (all three search the same steps). ``grid_range``
    applies to symmetric grids only; an affine grid (``symmetric=False``) spans ``[min, max]``.
    """
    if grid_range not in GRID_RANGES:
        raise ValueError(f"grid_range={grid_range!r} is not valid; use one of {', '.join(GRID_RANGES)}")
    if not symmetric and grid_range != "full":
        raise ValueError(f"grid_range={grid_range!r} needs symmetric=True; an affine grid uses the full range")
    if scale_method not in ("minmax", "mse"):
        raise ValueError(f"scale_method={scale_method!r} is not valid; use 'minmax' or 'mse'")
    n_levels = 2 ** bits - 1 if grid_range == "narrow" else 2 ** bits
    layout = _layout(weight, channel_axis, per_channel)
    rows = _per_channel_rows(weight.detach().to(torch.float32), layout)
    low, high = rows.min(dim=1).values, rows.max(dim=1).values
    tiny = torch.finfo(torch.float32).eps
    if not symmetric:
        scale, zero = _uniform_params(low, high, n_levels, symmetric)
        if scale_method == "mse":
            best_error = _rounding_error(rows, scale, zero, n_levels)
            for ratio in MSE_CLIP_RATIOS.tolist():
                s, z = _uniform_params(low * ratio, high * ratio, n_levels, symmetric)
                error = _rounding_error(rows, s, z, n_levels)
                better = error < best_error
                best_error = torch.where(better, error, best_error)
                scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
        return UniformGrid(scale=scale, zero_point=zero, n_levels=n_levels, layout=layout)
    bound = torch.maximum(low.abs(), high.abs())
    top = 2 ** (bits - 1) - 1  # the largest symmetric level
    zeros = _symmetric_zero_points(grid_range, bits, low)
    if grid_range == "full":
        scale, zero = _uniform_params(low, high, n_levels, symmetric)
    elif grid_range == "narrow":
        scale, zero = (bound / top).clamp_min(tiny), zeros[0]
    else:  # the largest |w| on the outermost level of its own side
        scale = (bound / (top + 1)).clamp_min(tiny)
        zero = torch.where(-low > high, zeros[0], zeros[1])
    if scale_method == "mse":  # min-max steps are candidates too: MSE is never worse than them
        starts = [(scale, zero)] + ([_uniform_params(low, high, n_levels, True)] if grid_range == "auto" else [])
        steps = [(s, z) for s in ((bound * ratio / top).clamp_min(tiny) for ratio in MSE_CLIP_RATIOS.tolist())
                 for z in zeros]
        best_error = torch.full_like(bound, float("inf"))
        for s, z in starts + steps:
            error = _rounding_error(rows, s, z, n_levels)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return UniformGrid(scale=scale.to(torch.float32), zero_point=zero.to(torch.float32), n_levels=n_levels,
                       layout=layout)


def fit_codebook_grid(weight: torch.Tensor, bits: int, *, per_channel: bool, channel_axis: int = 0,
                      iterations: int = 30, chunk_elements: int = 2 ** 24) -> CodebookGrid:
    """Fit a sorted codebook of ``2**bits`` levels per channel by 1-D k-means (Lloyd's algorithm).

    Centroids start at evenly spaced quantiles, which for 1-D data is deterministic and good;
    empty clusters keep their previous centroid. Channels are processed in chunks so that the
    distance tensor stays below ``chunk_elements`` entries.
    """
    n_levels = 2 ** bits
    layout = _layout(weight, channel_axis, per_channel)
    rows = _per_channel_rows(weight.detach().to(torch.float32), layout)
    quantiles = torch.linspace(0.0, 1.0, n_levels)
    codebooks = []
    per_chunk = max(1, chunk_elements // max(1, rows.shape[1] * n_levels))
    for start in range(0, rows.shape[0], per_chunk):
        chunk = rows[start:start + per_chunk]
        centroids = torch.quantile(chunk, quantiles, dim=1).T.contiguous()
        for _ in range(iterations):
            assign = (chunk[:, :, None] - centroids[:, None, :]).abs_().argmin(dim=2)
            sums = torch.zeros_like(centroids).scatter_add_(1, assign, chunk)
            counts = torch.zeros_like(centroids).scatter_add_(1, assign, torch.ones_like(chunk))
            updated = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
            if torch.equal(updated, centroids):
                break
            centroids = updated
        codebooks.append(torch.sort(centroids, dim=1).values)
    return CodebookGrid(codebook=torch.cat(codebooks).contiguous(), layout=layout)
