"""The frozen quantized model and the application of sparse rounding genes to it.

A gene ``(layer, index, offset)`` moves weight ``index`` (flat, row-major) of quantized layer
``layer`` by ``offset`` grid states away from its *base* state, clipped to the grid. Genes are
applied in place on the module's weights and reverted afterwards; reverting writes back the
exact values that were overwritten, so the base weights are restored bit-for-bit.

This module imports torch and numpy only; it knows nothing of DEAP.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .grids import Grid

__all__ = ["LayerInfo", "QuantizedModel", "AppliedGenes", "GeneError", "as_gene_array"]


class GeneError(ValueError):
    """A gene list that cannot be applied to this model (bad layer, index or offset)."""


@dataclass(frozen=True)
class LayerInfo:
    """Plain description of one quantized layer: all the evolutionary side ever sees of it."""

    name: str
    kind: str  # module class name, e.g. "Conv2d"
    shape: tuple[int, ...]
    numel: int
    n_levels: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "shape": list(self.shape),
                "numel": self.numel, "n_levels": self.n_levels}


@dataclass
class AppliedGenes:
    """What :meth:`QuantizedModel.apply_` overwrote, so that :meth:`QuantizedModel.revert_` can restore it."""

    saved: list[tuple[int, torch.Tensor, torch.Tensor]]  # (layer, flat index, old values)
    reverted: bool = False


def as_gene_array(genes: Iterable[Sequence[int]], n_layers: int | None = None,
                  layer_sizes: Sequence[int] | None = None) -> np.ndarray:
    """Validate genes and return them as an ``int64`` array of shape ``[n, 3]``.

    Offsets of any size are accepted (they are clipped to the grid when applied); layers and
    indices must exist. Raises :class:`GeneError` naming the first bad gene and what is valid.
    """
    try:
        iterator = iter(genes)
    except TypeError:
        raise GeneError(f"genes must be an iterable of (layer, index, offset) triples, got {genes!r}") from None
    rows = []
    for position, gene in enumerate(iterator):
        try:
            layer, index, offset = gene
        except (TypeError, ValueError):
            raise GeneError(f"gene #{position} {gene!r} is not a (layer, index, offset) triple") from None
        values = []
        for field, value in (("layer", layer), ("index", index), ("offset", offset)):
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise GeneError(f"gene #{position} {gene!r}: {field}={value!r} must be an integer")
            values.append(int(value))
        layer, index, offset = values
        shown = f"gene #{position} ({layer}, {index}, {offset})"
        if n_layers is not None and not 0 <= layer < n_layers:
            raise GeneError(f"{shown}: layer={layer} is out of range; valid layers are 0..{n_layers - 1}")
        if layer_sizes is not None and not 0 <= index < layer_sizes[layer]:
            raise GeneError(f"{shown}: index={index} is out of range for layer {layer}; valid indices are "
                            f"0..{layer_sizes[layer] - 1}")
        if not -(2 ** 62) < layer < 2 ** 62 or not -(2 ** 62) < index < 2 ** 62:
            raise GeneError(f"{shown}: layer and index must be non-negative integers below 2**62")
        rows.append((layer, index, max(-(2 ** 31), min(2 ** 31, offset))))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


class QuantizedModel:
    """A frozen model whose selected layers hold dequantized grid weights.

    Built by :func:`deap_quant.quantize`. Holds the module (eval mode, no gradients), one grid,
    the integer base state and the rounding residual of every quantized weight, and a table of
    the quantized layers. Call it like the module.
    """

    def __init__(self, module: nn.Module, names: list[str], grids: list[Grid], states: list[torch.Tensor],
                 residuals: list[torch.Tensor], config: dict[str, Any]):
        self.module = module
        self.grids = grids
        self.config = dict(config)
        self._states = states
        self._residuals = residuals
        modules = dict(module.named_modules())
        self._weights = [modules[name].weight for name in names]
        self.layers = [
            LayerInfo(name=name, kind=getattr(modules[name], "original_name", type(modules[name]).__name__),
                      shape=tuple(weight.shape),
                      numel=weight.numel(), n_levels=grid.n_levels)
            for name, weight, grid in zip(names, self._weights, grids)
        ]
        self._flat = [weight.data.view(-1) for weight in self._weights]

    # ------------------------------------------------------------------ description
    def layer_table(self) -> list[LayerInfo]:
        """The quantized layers as plain data (names, shapes, sizes, level counts)."""
        return list(self.layers)

    @property
    def n_weights(self) -> int:
        return sum(layer.numel for layer in self.layers)

    def base_states(self, layer: int) -> torch.Tensor:
        """The integer base state of every weight of ``layer`` (a read-only view, uint8)."""
        return self._states[layer]

    def residuals(self) -> list[np.ndarray]:
        """Per layer, each weight's rounding residual (continuous grid position minus base state).

        A positive residual means the float weight lies above its base level: ``+1`` is the move
        rounding did not take. Returned as flat NumPy arrays (views, do not modify).
        """
        return [residual.view(-1).numpy() for residual in self._residuals]

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def __repr__(self) -> str:
        return (f"QuantizedModel({type(self.module).__name__}, layers={len(self.layers)}, "
                f"weights={self.n_weights}, config={self.config})")

    # ------------------------------------------------------------------ genes
    def _gene_array(self, genes: Iterable[Sequence[int]]) -> np.ndarray:
        return as_gene_array(genes, len(self.layers), [layer.numel for layer in self.layers])

    def validate_genes(self, genes: Iterable[Sequence[int]]) -> None:
        """Raise :class:`GeneError` if any gene names a layer or index this model does not have."""
        self._gene_array(genes)

    def _grouped(self, genes: Iterable[Sequence[int]]) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield ``(layer, unique flat indices, new states)`` per touched layer; duplicates add up."""
        array = self._gene_array(genes)
        for layer in np.unique(array[:, 0]):
            rows = array[array[:, 0] == layer]
            index, inverse = np.unique(rows[:, 1], return_inverse=True)
            offset = np.zeros(len(index), dtype=np.int64)
            limit = self.layers[layer].n_levels
            np.add.at(offset, inverse, np.clip(rows[:, 2], -limit, limit))
            index_t = torch.from_numpy(index)
            base = self._states[layer].view(-1)[index_t].to(torch.int64)
            states = (base + torch.from_numpy(offset)).clamp_(0, limit - 1)
            yield int(layer), index_t, states

    def apply_(self, genes: Iterable[Sequence[int]]) -> AppliedGenes:
        """Write the genes' weights into the module; returns what :meth:`revert_` needs."""
        return self._write(list(self._grouped(genes)))  # validate everything before touching any weight

    def _write(self, grouped: Sequence[tuple[int, torch.Tensor, torch.Tensor]]) -> AppliedGenes:
        """Write validated ``(layer, flat indices, states)`` into the weights, saving what they held."""
        saved = []
        with torch.no_grad():
            for layer, index, states in grouped:
                flat = self._flat[layer]
                saved.append((layer, index, flat[index].clone()))
                flat[index] = self.grids[layer].dequantize_at(states, index)
        return AppliedGenes(saved)

    @contextlib.contextmanager
    def _in_force(self, write: Callable[[], AppliedGenes]) -> Iterator[QuantizedModel]:
        """Run ``write`` on entering, revert what it wrote on exit (also on error)."""
        handle = write()
        try:
            yield self
        finally:
            self.revert_(handle)

    def set_states_(self, changes: Iterable[tuple[int, Sequence[int], Sequence[int]]]) -> AppliedGenes:
        """Write ``(layer, flat indices, states)`` changes (e.g. an evaluator's genome key) into the module.

        The lower-level twin of :meth:`apply_`: states are grid levels, not offsets, and indices
        within a layer must be distinct. Returns what :meth:`revert_` needs.
        """
        grouped = []
        for layer, index, states in changes:
            index_t = torch.as_tensor(index, dtype=torch.int64)
            states_t = torch.as_tensor(states, dtype=torch.int64)
            limit = self.layers[layer].n_levels
            if index_t.shape != states_t.shape or (len(states_t) and (int(states_t.min()) < 0
                                                                       or int(states_t.max()) >= limit)):
                raise ValueError(f"states for layer {layer} must match the indices and lie in 0..{limit - 1}")
            grouped.append((layer, index_t, states_t))
        return self._write(grouped)

    def states_set(self, changes: Iterable[tuple[int, Sequence[int], Sequence[int]]]) -> contextlib.AbstractContextManager:
        """``with qmodel.states_set(changes): ...`` -- :meth:`set_states_` in force inside, reverted on exit."""
        return self._in_force(lambda: self.set_states_(changes))

    def revert_(self, applied: AppliedGenes) -> None:
        """Restore exactly the values that :meth:`apply_` overwrote."""
        if applied.reverted:
            return
        with torch.no_grad():
            for layer, index, old in reversed(applied.saved):
                self._flat[layer][index] = old
        applied.reverted = True

    def applied(self, genes: Iterable[Sequence[int]]) -> contextlib.AbstractContextManager:
        """``with qmodel.applied(genes): ...`` -- genes in force inside, reverted on exit (also on error)."""
        return self._in_force(lambda: self.apply_(genes))

    def states_with(self, genes: Iterable[Sequence[int]] = ()) -> list[torch.Tensor]:
        """Integer states of every layer after applying ``genes`` (copies; the model is not touched)."""
        states = [state.clone() for state in self._states]
        for layer, index, new in self._grouped(genes):
            states[layer].view(-1)[index] = new.to(states[layer].dtype)
        return states

    def rebase_(self, states: Sequence[torch.Tensor]) -> None:
        """Make ``states`` the new base (e.g. AdaRound's rounding); genes are then offsets from it.

        Weights are rewritten from the grid, and residuals are kept relative to the new base.
        """
        if len(states) != len(self.layers):
            raise ValueError(f"rebase_ got {len(states)} state tensors; the model has {len(self.layers)} layers")
        with torch.no_grad():
            for layer, new in enumerate(states):
                info = self.layers[layer]
                new = torch.as_tensor(new).reshape(info.shape)
                if new.numel() and (int(new.min()) < 0 or int(new.max()) >= info.n_levels):
                    raise ValueError(f"states for layer {layer} ({info.name}) must lie in 0..{info.n_levels - 1}")
                new = new.to(torch.uint8)
                old = self._states[layer]
                self._residuals[layer] += old.to(torch.float32) - new.to(torch.float32)
                old.copy_(new)
                self._weights[layer].data.copy_(self.grids[layer].dequantize(new))

    def dequantized_weights(self, layer: int) -> torch.Tensor:
        """The weights the module currently holds for ``layer`` (a copy)."""
        return self._weights[layer].detach().clone()

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_weights"], state["_flat"]
        state["_names"] = [layer.name for layer in self.layers]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        names = state.pop("_names")
        self.__dict__.update(state)
        modules = dict(self.module.named_modules())
        self._weights = [modules[name].weight for name in names]
        self._flat = [weight.data.view(-1) for weight in self._weights]

