"""``quantize(model, ...)``: post-training weight quantization with nearest rounding."""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from .activations import ACT_BITS, ACT_OBSERVERS, calibrate_activations, install_input_quantizers
from .fold import fold_bn as fold_batchnorm
from .grids import GRID_RANGES, fit_codebook_grid, fit_uniform_grid
from .model import SUPPORTED_DEVICES, SUPPORTED_DTYPES, QuantizedModel

__all__ = ["QuantConfig", "quantize", "QUANTIZABLE_TYPES", "LayerFilter"]

#: Module types whose ``weight`` is quantized, with the axis of their output channels.
QUANTIZABLE_TYPES: dict[type, int] = {
    nn.Linear: 0,
    nn.Conv1d: 0,
    nn.Conv2d: 0,
    nn.Conv3d: 0,
    nn.ConvTranspose1d: 1,
    nn.ConvTranspose2d: 1,
}

LayerFilter = Union[str, Sequence[str], Callable[[nn.Module, str], bool], None]

SCHEMES = ("uniform", "kmeans")
SCALE_METHODS = ("minmax", "mse")


@dataclass(frozen=True)
class QuantConfig:
    """Settings of :func:`quantize`; checked on construction.

    ``range`` picks a symmetric grid's levels (see :func:`~deap_quant.quantization.grids.fit_uniform_grid`):
    ``"full"`` (``-2**(bits-1) .. 2**(bits-1) - 1`` steps), ``"narrow"`` (``-(2**(bits-1) - 1) ..
    2**(bits-1) - 1``, one level fewer) or ``"auto"`` (the full range with its extra level below or
    above zero per channel, whichever gives the lower weight error). ``None`` (the default) means
    ``"auto"`` for symmetric uniform MSE grids, the grid of least weight error, and ``"full"``
    otherwise (min-max keeps PyTorch's observer convention; affine and k-means grids have no range
    to choose). The resolved value is what the config holds.

    ``act_bits`` (``None``: activations stay in floating point) quantizes the input of every
    quantized layer on a per-tensor affine grid whose range ``act_observer`` fits on calibration
    data (see :mod:`~deap_quant.quantization.activations`).
    """

    bits: int = 4
    per_channel: bool = True
    symmetric: bool = True
    scale_method: str = "minmax"
    scheme: str = "uniform"
    #: Fold BatchNorm into the preceding conv before quantizing (see :func:`quantize`).
    fold_bn: bool = False
    range: Optional[str] = None
    act_bits: Optional[int] = None
    act_observer: str = "minmax"

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits={self.bits!r} is not valid; use an integer from 2 to 8")
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme={self.scheme!r} is not valid; use one of {', '.join(SCHEMES)}")
        if self.scale_method not in SCALE_METHODS:
            raise ValueError(f"scale_method={self.scale_method!r} is not valid; use one of "
                             f"{', '.join(SCALE_METHODS)}")
        for name in ("per_channel", "symmetric", "fold_bn"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is not valid; use True or False")
        if self.range is None:
            chosen = "auto" if self.symmetric and self.scheme == "uniform" and self.scale_method == "mse" else "full"
            object.__setattr__(self, "range", chosen)
        if self.range not in GRID_RANGES:
            raise ValueError(f"range={self.range!r} is not valid; use one of {', '.join(GRID_RANGES)}")
        if self.range != "full" and self.scheme != "uniform":
            raise ValueError(f"range={self.range!r} needs scheme='uniform'; a k-means codebook has no range")
        if self.range != "full" and not self.symmetric:
            raise ValueError(f"range={self.range!r} needs symmetric=True; an affine grid spans [min, max]")
        if self.act_bits is not None and (isinstance(self.act_bits, bool) or self.act_bits not in ACT_BITS):
            raise ValueError(f"act_bits={self.act_bits!r} is not valid; use None (float activations) or an integer "
                             f"from {ACT_BITS[0]} to {ACT_BITS[-1]}")
        if self.act_observer not in ACT_OBSERVERS:
            raise ValueError(f"act_observer={self.act_observer!r} is not valid; use one of {', '.join(ACT_OBSERVERS)}")

    def to_dict(self) -> dict:
        return asdict(self)


def _selector(layers: LayerFilter) -> Callable[[nn.Module, str], bool]:
    if layers is None:
        return lambda module, name: True
    if callable(layers):
        return layers
    patterns = [layers] if isinstance(layers, str) else list(layers)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"layers={layers!r} is not valid; use a name pattern, a list of patterns, "
                         "or a callable (module, name) -> bool")
    return lambda module, name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


_TYPES_BY_NAME = {kind.__name__: kind for kind in QUANTIZABLE_TYPES}


def _layer_type(module: nn.Module) -> Optional[type]:
    """The quantizable type of ``module``, also for TorchScript modules (by their original class name)."""
    if type(module) in QUANTIZABLE_TYPES:
        return type(module)
    if isinstance(module, torch.jit.ScriptModule):
        return _TYPES_BY_NAME.get(getattr(module, "original_name", ""))
    return None


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Qualified names and modules of every layer :func:`quantize` can quantize."""
    return [(name, module) for name, module in model.named_modules()
            if _layer_type(module) is not None and getattr(module, "weight", None) is not None]


def _check_weight(name: str, weight: torch.Tensor) -> None:
    """One line saying why a layer's weight cannot be quantized (unsupported dtype or device), if it cannot."""
    if weight.device.type not in SUPPORTED_DEVICES:
        raise ValueError(f"layer {name!r} has its weight on device {weight.device.type!r}; deap_quant supports "
                         f"{' and '.join(repr(d) for d in SUPPORTED_DEVICES)}")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"layer {name!r} has {weight.dtype} weights; deap_quant quantizes "
                         f"{', '.join(str(d) for d in SUPPORTED_DTYPES)} weights")


def quantize(model: nn.Module, bits: int = 4, per_channel: bool = True, symmetric: bool = True,
             scale_method: str = "minmax", layers: LayerFilter = None, scheme: str = "uniform",
             fold_bn: bool = False, config: Optional[QuantConfig] = None,
             range: Optional[str] = None, act_bits: Optional[int] = None, act_observer: str = "minmax",
             act_calibration: Any = None) -> QuantizedModel:
    """Quantize the weights of ``model``'s Conv and Linear layers with nearest rounding.

    The model is copied, never modified. ``layers`` selects layers by qualified-name glob
    pattern(s) (``"features.*"``) or by a callable ``(module, name) -> bool``. ``scheme="uniform"``
    fits an affine grid (``scale_method="minmax"`` or the MSE-optimal clipping ``"mse"``);
    ``scheme="kmeans"`` fits a codebook of ``2**bits`` levels by 1-D k-means. Biases and
    activations stay in floating point. ``range`` chooses a symmetric grid's levels
    (``"full"``, ``"narrow"``, ``"auto"``; see :class:`QuantConfig`: by default ``"auto"`` for MSE
    grids, ``"full"`` for min-max ones).

    ``fold_bn=True`` first folds every BatchNorm that directly follows a conv into that conv
    (:func:`~deap_quant.quantization.fold.fold_bn`; the BatchNorm becomes ``Identity``) and
    quantizes the folded weights, which is what an integer deployment runs. The default,
    ``False``, quantizes the weights as the model holds them and keeps its structure. With
    per-channel grids the two are nearly the same, as each channel's grid absorbs a positive
    BatchNorm factor (only weights on an exact rounding tie, such as a channel's extreme, may
    land one level apart; a negative factor mirrors the channel on the asymmetric integer range);
    with per-tensor grids they differ, and ``fold_bn=True`` is the realistic setting.

    ``act_bits`` (2 to 8; ``None``, the default, keeps activations in floating point) also
    quantizes the input of every quantized layer: per tensor, affine, unsigned where every
    calibration input was non-negative. The ranges are fitted by ``act_observer`` (``"minmax"``,
    ``"percentile"``, ``"mse"``) on ``act_calibration`` -- calibration inputs (a tensor, an
    ``(inputs, targets)`` pair, a Dataset or a DataLoader; never the validation or test data),
    all of them, with the quantized weights in place -- and then stay frozen
    (:attr:`QuantizedModel.act_quantizers`).
    """
    if config is None:
        config = QuantConfig(bits=bits, per_channel=per_channel, symmetric=symmetric,
                             scale_method=scale_method, scheme=scheme, fold_bn=fold_bn, range=range,
                             act_bits=act_bits, act_observer=act_observer)
    if config.act_bits is not None and act_calibration is None:
        raise ValueError(f"act_bits={config.act_bits} needs act_calibration=DATA: calibration inputs to fit the "
                         "activation ranges on (never the validation or test data)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if config.fold_bn:
        model = fold_batchnorm(model)
    candidates = quantizable_layers(model)
    if not candidates:
        kinds = ", ".join(t.__name__ for t in QUANTIZABLE_TYPES)
        raise ValueError(f"{type(model).__name__} has no quantizable layers; deap_quant quantizes {kinds}")
    select = _selector(layers)
    chosen = [name for name, module in candidates if select(module, name)]
    if not chosen:
        available = ", ".join(name for name, _ in candidates[:12])
        more = f" (and {len(candidates) - 12} more)" if len(candidates) > 12 else ""
        raise ValueError(f"layers={layers!r} matches no quantizable layer; available: {available}{more}")

    layer_modules = dict(candidates)
    for name in chosen:
        _check_weight(name, layer_modules[name].weight)
    frozen = copy.deepcopy(model).eval()
    for parameter in frozen.parameters():
        if parameter.is_leaf:  # (a deep-copied TorchScript module's parameters may not be leaves)
            parameter.requires_grad_(False)
    modules = dict(frozen.named_modules())
    grids, states, residuals = [], [], []
    with torch.no_grad():
        for name in chosen:
            module = modules[name]
            live = module.weight.data
            weight = live.to("cpu", torch.float32)  # grids, states and residuals are fitted and kept on the CPU
            if not torch.isfinite(weight).all():
                raise ValueError(f"layer {name!r} has NaN or infinite weights; fix the model before quantizing")
            axis = QUANTIZABLE_TYPES[_layer_type(module)]
            if config.scheme == "kmeans":
                grid = fit_codebook_grid(weight, config.bits, per_channel=config.per_channel, channel_axis=axis)
            else:
                grid = fit_uniform_grid(weight, config.bits, per_channel=config.per_channel,
                                        symmetric=config.symmetric, scale_method=config.scale_method,
                                        channel_axis=axis, grid_range=config.range)
            state, residual = grid.quantize(weight.to(torch.float32))
            live.copy_(grid.dequantize(state).to(live.dtype))  # in the model's dtype, on its device
            grids.append(grid)
            states.append(state)
            residuals.append(residual)
    act_quantizers = None
    if config.act_bits is not None:
        if isinstance(frozen, torch.jit.ScriptModule):
            raise ValueError(f"act_bits={config.act_bits} needs a Python module; a TorchScript model cannot take "
                             "the input quantizers (quantize the model before scripting it)")
        from ..evaluation.teacher import calibration_inputs
        inputs = calibration_inputs(act_calibration)
        act_quantizers = calibrate_activations(frozen, chosen, inputs, config.act_bits, config.act_observer)
        install_input_quantizers(frozen, chosen, act_quantizers)
    return QuantizedModel(frozen, chosen, grids, states, residuals, config.to_dict(), act_quantizers=act_quantizers)
