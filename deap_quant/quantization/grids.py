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

__all__ = ["UniformGrid", "CodebookGrid", "Grid", "fit_uniform_grid", "fit_codebook_grid"]

#: Clipping ratios tried by ``scale_method="mse"`` (fraction of the max-abs range).
MSE_CLIP_RATIOS = torch.linspace(0.2, 1.0, 81)


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


def fit_uniform_grid(weight: torch.Tensor, bits: int, *, per_channel: bool, symmetric: bool,
                     scale_method: str, channel_axis: int = 0) -> UniformGrid:
    """Fit an affine grid to ``weight``.

    ``scale_method="minmax"`` spans the full weight range; ``"mse"`` searches, per channel, the
    clipping ratio of that range which minimises the squared error of nearest rounding.
    """
    n_levels = 2 ** bits
    layout = _layout(weight, channel_axis, per_channel)
    rows = _per_channel_rows(weight.detach().to(torch.float32), layout)
    low, high = rows.min(dim=1).values, rows.max(dim=1).values
    scale, zero = _uniform_params(low, high, n_levels, symmetric)
    if scale_method == "mse":
        best_error = torch.full_like(scale, float("inf"))
        best_scale, best_zero = scale.clone(), zero.clone()
        for ratio in MSE_CLIP_RATIOS.tolist():
            s, z = _uniform_params(low * ratio, high * ratio, n_levels, symmetric)
            states = torch.round(rows / s[:, None] + z[:, None]).clamp_(0, n_levels - 1)
            error = ((states - z[:, None]) * s[:, None] - rows).pow_(2).sum(dim=1)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_scale = torch.where(better, s, best_scale)
            best_zero = torch.where(better, z, best_zero)
        scale, zero = best_scale, best_zero
    elif scale_method != "minmax":
        raise ValueError(f"scale_method={scale_method!r} is not valid; use 'minmax' or 'mse'")
    return UniformGrid(scale=scale, zero_point=zero, n_levels=n_levels, layout=layout)


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
