"""The frozen quantized model and the application of sparse rounding genes to it.

A gene ``(layer, index, offset)`` moves weight ``index`` (flat, row-major) of quantized layer
``layer`` by ``offset`` grid states away from its *base* state, clipped to the grid. Genes are
applied in place on the module's weights and reverted afterwards; reverting writes back the
exact values that were overwritten, so the base weights are restored bit-for-bit.

Every write goes to the weight the module holds *at that moment*, looked up by name: after
``module.double()``, ``.half()``, ``.to(device)`` or ``.to(memory_format=torch.channels_last)``
genes still reach the tensors the module computes with (by logical, row-major index, whatever
the memory layout). Grid values are computed in float32 on the weight's device (the grid is
kept on the CPU, copied to other devices once) and rounded to the weight's dtype, exactly as
:func:`~deap_quant.quantize` wrote the base weights. Base states and residuals stay on the CPU.

This module imports torch and numpy only; it knows nothing of DEAP.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from .activations import ActivationQuantizer
from .grids import Grid

__all__ = ["LayerInfo", "QuantizedModel", "AppliedGenes", "GeneError", "as_gene_array", "SUPPORTED_DTYPES",
           "SUPPORTED_DEVICES"]

#: Floating dtypes a quantized layer's weights may have (grids are float32 whatever the weights' dtype).
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

#: Device types a quantized layer's weights may live on.
SUPPORTED_DEVICES = ("cpu", "cuda")


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
    serial: int = -1  # which write this was (see QuantizedModel.revision)


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

    The module may be converted after quantizing (``double()``, ``half()``, ``bfloat16()``,
    ``to(device)``, ``to(memory_format=...)``): genes are written into whatever ``weight`` each
    quantized layer holds when they are applied. :attr:`revision` identifies what was written
    through this object (see there).
    """

    def __init__(self, module: nn.Module, names: list[str], grids: list[Grid], states: list[torch.Tensor],
                 residuals: list[torch.Tensor], config: dict[str, Any],
                 act_quantizers: Optional[Sequence[Optional[ActivationQuantizer]]] = None):
        self.module = module
        self.grids = grids
        self.config = dict(config)
        self._states = [state.to("cpu") for state in states]  # the canonical copies stay on the CPU
        self._residuals = [residual.to("cpu", torch.float32) for residual in residuals]
        modules = dict(module.named_modules())
        weights = [modules[name].weight for name in names]
        self.layers = [
            LayerInfo(name=name, kind=getattr(modules[name], "original_name", type(modules[name]).__name__),
                      shape=tuple(weight.shape),
                      numel=weight.numel(), n_levels=grid.n_levels)
            for name, weight, grid in zip(names, weights, grids)
        ]
        #: The input quantizer of each quantized layer (``None``: float input); installed as forward
        #: pre-hooks on the layers' modules by :func:`~deap_quant.quantize`.
        self.act_quantizers: list[Optional[ActivationQuantizer]] = (list(act_quantizers) if act_quantizers is not None
                                                                      else [None] * len(names))
        self._revision = 0  # bumped whenever the base weights change (rebase_, mark_modified, ...)
        self._serial = 0  # numbers the writes of apply_ / set_states_
        self._open: list[int] = []  # serials of the writes not yet reverted, oldest first
        self._init_lookup()

    def _init_lookup(self) -> None:
        """Per-layer module paths and the per-device grid copies (rebuilt after unpickling)."""
        self._paths = [tuple(layer.name.split(".")) if layer.name else () for layer in self.layers]
        self._device_grids: dict[tuple[int, torch.device], tuple[Grid, Grid]] = {}

    # ------------------------------------------------------------------ live weights
    def _module_of(self, layer: int) -> nn.Module:
        module = self.module
        try:
            for part in self._paths[layer]:
                module = module._modules[part]
        except (KeyError, TypeError, AttributeError):
            raise RuntimeError(f"quantized layer {layer} ({self.layers[layer].name!r}) is no longer in the module; "
                               "do not replace quantized submodules after quantizing") from None
        return module

    def _live(self, layer: int) -> torch.Tensor:
        """The tensor ``layer``'s module computes with now (its ``weight.data``), checked.

        Raises ``RuntimeError`` naming the layer if the weight was replaced by one of another
        shape, an unsupported dtype or an unsupported device.
        """
        weight = getattr(self._module_of(layer), "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise RuntimeError(f"quantized layer {layer} ({self.layers[layer].name!r}) has no weight tensor any more")
        data = weight.data
        if data.dtype not in SUPPORTED_DTYPES or data.device.type not in SUPPORTED_DEVICES \
                or data.shape != self.layers[layer].shape:
            info = self.layers[layer]
            raise RuntimeError(f"quantized layer {layer} ({info.name!r}) now holds a {data.dtype} weight of shape "
                               f"{tuple(data.shape)} on {data.device}; genes need its quantized shape "
                               f"{info.shape}, a dtype among {_names(SUPPORTED_DTYPES)} and a device among "
                               f"{', '.join(SUPPORTED_DEVICES)}")
        return data

    def _grid_on(self, layer: int, device: torch.device) -> Grid:
        """``layer``'s grid with its tensors on ``device`` (copied once per device and grid)."""
        grid = self.grids[layer]
        key = (layer, device)
        cached = self._device_grids.get(key)
        if cached is None or cached[0] is not grid:
            cached = (grid, _grid_to(grid, device))
            self._device_grids[key] = cached
        return cached[1]

    @property
    def revision(self) -> tuple[int, tuple[int, ...]]:
        """What this object has written into the module, as a comparable value.

        ``(base revision, writes in force)``: the first number changes whenever the base weights
        are rewritten (:meth:`rebase_`, :meth:`mark_modified`); the tuple numbers the writes of
        :meth:`apply_` / :meth:`set_states_` not reverted yet. Writes are reverted last first
        (:meth:`revert_` refuses any other order), which restores the previous value, as it
        restores the weights bit for bit.
        """
        return self._revision, tuple(self._open)

    def mark_modified(self) -> None:
        """Record that the module's weights were changed by other means than this object.

        In-place edits of a parameter or buffer (``weight[0] += 1`` under ``no_grad``, ``fill_``,
        assigning a new tensor) are visible to evaluators through the tensors' version counters
        and storages; edits through ``tensor.data`` are not: call this after them.
        """
        self._revision += 1

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
        return [residual.detach().reshape(-1).to("cpu", torch.float32).numpy() for residual in self._residuals]

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
        """Write validated ``(layer, flat indices, states)`` into the weights, saving what they held.

        Indices are logical (row-major) positions: ``take`` / ``put_`` honour any memory layout.
        If a layer cannot be written, what was written already is restored before raising.
        """
        self._serial += 1
        applied = AppliedGenes([], serial=self._serial)
        saved = applied.saved
        try:
            with torch.no_grad():
                for layer, index, states in grouped:
                    data = self._live(layer)
                    device = data.device
                    if device.type != "cpu":
                        index, states = index.to(device), states.to(device)
                    values = self._grid_on(layer, device).dequantize_at(states, index)
                    if values.dtype != data.dtype:
                        values = values.to(data.dtype)
                    saved.append((layer, index, data.take(index)))
                    data.put_(index, values)
        except BaseException:
            self._restore(saved)
            raise
        self._open.append(applied.serial)
        return applied

    def _restore(self, saved: Sequence[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        with torch.no_grad():
            for layer, index, old in reversed(saved):
                data = self._live(layer)
                if old.device != data.device or old.dtype != data.dtype:  # the module was converted meanwhile
                    index, old = index.to(data.device), old.to(data.device, data.dtype)
                data.put_(index, old)

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
        """Restore exactly the values that :meth:`apply_` overwrote (a second call does nothing).

        Writes are undone last first: reverting a write while a later one is still in force would put
        back values the later write had saved over, and leave weights off the base. That raises a
        ``ValueError`` and changes nothing.
        """
        if applied.reverted:
            return
        if applied.serial in self._open and self._open[-1] != applied.serial:
            later = len(self._open) - 1 - self._open.index(applied.serial)
            raise ValueError(f"revert_ out of order: write #{applied.serial} has {later} later write(s) still in "
                             f"force (#{', #'.join(map(str, self._open[-later:]))}); revert the last applied first")
        self._restore(applied.saved)
        applied.reverted = True
        if applied.serial in self._open:
            self._open.remove(applied.serial)

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

        Weights are rewritten from the grid, and residuals are kept relative to the new base. Raises
        ``ValueError`` while writes of :meth:`apply_` / :meth:`set_states_` are in force (their
        reverts would put the old base's values back).
        """
        if self._open:
            raise ValueError(f"rebase_ while {len(self._open)} write(s) of apply_ / set_states_ are in force; revert "
                             "them first (leave every `with qmodel.applied(...)` block) and rebase after")
        if len(states) != len(self.layers):
            raise ValueError(f"rebase_ got {len(states)} state tensors; the model has {len(self.layers)} layers")
        checked = []
        for layer, new in enumerate(states):  # every layer is checked before any is written
            info = self.layers[layer]
            new = torch.as_tensor(new).reshape(info.shape).to("cpu")
            if new.numel() and (int(new.min()) < 0 or int(new.max()) >= info.n_levels):
                raise ValueError(f"states for layer {layer} ({info.name}) must lie in 0..{info.n_levels - 1}")
            checked.append(new.to(torch.uint8))
        self._revision += 1
        with torch.no_grad():
            for layer, new in enumerate(checked):
                old = self._states[layer]
                self._residuals[layer] += old.to(torch.float32) - new.to(torch.float32)
                old.copy_(new)
                data = self._live(layer)
                data.copy_(self.grids[layer].dequantize(new).to(data.dtype))

    def dequantized_weights(self, layer: int) -> torch.Tensor:
        """The weights the module currently holds for ``layer`` (a copy, on the module's device and dtype)."""
        return self._live(layer).clone()

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_paths", "_device_grids"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.pop("_names", None)  # (older pickles)
        state.setdefault("_revision", 0)
        state.setdefault("_serial", 0)
        state.setdefault("_open", [])
        state.setdefault("act_quantizers", [None] * len(state.get("layers", [])))
        self.__dict__.update(state)
        self._init_lookup()


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(dtype).replace("torch.", "") for dtype in dtypes)


def _grid_to(grid: Grid, device: torch.device) -> Grid:
    """A copy of ``grid`` whose tensors are on ``device`` (``grid`` itself if they already are)."""
    moved = {field.name: getattr(grid, field.name).to(device) for field in fields(grid)
             if isinstance(getattr(grid, field.name), torch.Tensor) and getattr(grid, field.name).device != device}
    return replace(grid, **moved) if moved else grid

