"""Activation quantization: fake-quantize the input of every quantized layer on a calibrated, frozen grid.

A deployed W4A8 model quantizes activations as well as weights, so the fitness must see the
same rounding. Each quantized layer gets an :class:`ActivationQuantizer` on its input: a
per-tensor affine grid ``x_int = clamp(round(x / scale) + zero_point, quant_min, quant_max)``,
``x -> (x_int - zero_point) * scale`` (``round``: half to even, as ONNX ``QuantizeLinear``), with
``quant_min = 0`` and ``quant_max = 2**bits - 1``. The grid always holds zero exactly; where every
calibration input of a layer was non-negative (after a ReLU), the range starts at zero and the
zero point is 0: the layer's input is unsigned.

Ranges are observed once, on calibration inputs (never validation or test data), with the
quantized weights in place and activation quantization off (all layers observed in one pass, as
PyTorch's post-training observers do), then frozen: genes, AdaRound and the search never move
them. Observers (``act_observer``):

* ``"minmax"``: the smallest and largest value seen;
* ``"percentile"``: the :data:`PERCENTILE` and ``100 - PERCENTILE`` percentiles of the values
  (clipping rare outliers);
* ``"mse"``: the min-max range shrunk by the ratio in :data:`MSE_RATIOS` that minimises the
  squared quantization error of the values.

Percentile and MSE use up to :data:`MAX_VALUES` values per layer, drawn with a fixed seed.

The quantizer runs as a forward pre-hook of the layer's module (an :class:`InputQuantHook`, a
picklable object), so every evaluator, backend and copy of the module runs the quantized
activations without knowing about them. This module imports torch only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
from torch import nn

__all__ = ["ActivationQuantizer", "InputQuantHook", "ACT_OBSERVERS", "ACT_BITS", "PERCENTILE", "MSE_RATIOS",
           "MAX_VALUES", "calibrate_activations", "install_input_quantizers", "remove_input_quantizers",
           "input_quantizer_of", "quantize_input"]

ACT_OBSERVERS = ("minmax", "percentile", "mse")
#: Supported activation bit-widths.
ACT_BITS = (2, 3, 4, 5, 6, 7, 8)
#: Upper percentile of the ``"percentile"`` observer (the lower one is ``100 - PERCENTILE``).
PERCENTILE = 99.99
#: Ratios of the min-max range tried by the ``"mse"`` observer (0.30 to 1.00 in steps of 0.01).
MSE_RATIOS = tuple(r / 100 for r in range(30, 101))
#: Values per layer kept for the percentile and MSE observers.
MAX_VALUES = 1 << 20


@dataclass(frozen=True)
class ActivationQuantizer:
    """A per-tensor affine grid for a layer's input: ``(clamp(round(x / scale) + zero_point) - zero_point) * scale``."""

    bits: int
    scale: float
    zero_point: int
    signed_input: bool  # False: every calibration input was >= 0 and the range starts at zero

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in ACT_BITS:
            raise ValueError(f"bits={self.bits!r} is not valid for activations; use one of {ACT_BITS}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale={self.scale!r} is not valid; use a positive finite number")
        if not self.quant_min <= self.zero_point <= self.quant_max:
            raise ValueError(f"zero_point={self.zero_point!r} is not valid; use an integer in "
                             f"{self.quant_min}..{self.quant_max}")

    @property
    def quant_min(self) -> int:
        return 0

    @property
    def quant_max(self) -> int:
        return 2 ** self.bits - 1

    @property
    def range(self) -> tuple[float, float]:
        """The smallest and largest value the grid represents."""
        return ((self.quant_min - self.zero_point) * self.scale, (self.quant_max - self.zero_point) * self.scale)

    def integers(self, x: torch.Tensor) -> torch.Tensor:
        """The integer codes of ``x`` (as floats): ``clamp(round(x / scale) + zero_point, quant_min, quant_max)``."""
        return torch.round(x / self.scale).add_(self.zero_point).clamp_(self.quant_min, self.quant_max)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            return x
        return self.integers(x).sub_(self.zero_point).mul_(self.scale)

    def to_state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ActivationQuantizer:
        return cls(bits=int(state["bits"]), scale=float(state["scale"]), zero_point=int(state["zero_point"]),
                   signed_input=bool(state["signed_input"]))

    @classmethod
    def from_range(cls, bits: int, low: float, high: float) -> ActivationQuantizer:
        """The grid of ``bits`` over ``[min(low, 0), max(high, 0)]``, zero exactly on it."""
        low, high = min(float(low), 0.0), max(float(high), 0.0)
        levels = 2 ** bits - 1
        if high - low <= 0 or not math.isfinite(high - low):
            return cls(bits=bits, scale=1.0, zero_point=0, signed_input=low < 0)
        scale = (high - low) / levels
        zero_point = int(min(levels, max(0, round(-low / scale))))
        return cls(bits=bits, scale=scale, zero_point=zero_point, signed_input=low < 0)


class InputQuantHook:
    """Forward pre-hook that quantizes a module's first input (picklable; found again by :func:`input_quantizer_of`)."""

    def __init__(self, quantizer: ActivationQuantizer):
        self.quantizer = quantizer

    def __call__(self, module: nn.Module, args: tuple) -> Optional[tuple]:
        if not args or not isinstance(args[0], torch.Tensor):
            return None
        return (self.quantizer(args[0]), *args[1:])

    def __repr__(self) -> str:
        return f"InputQuantHook({self.quantizer})"


def input_quantizer_of(module: nn.Module) -> Optional[ActivationQuantizer]:
    """The :class:`ActivationQuantizer` installed on ``module``'s input, if any."""
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, InputQuantHook):
            return hook.quantizer
    return None


def quantize_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``module`` sees it: through its input quantizer, if it has one (for code that calls
    a layer's kernels directly, bypassing its hooks)."""
    quantizer = input_quantizer_of(module)
    return x if quantizer is None else quantizer(x)


def remove_input_quantizers(module: nn.Module) -> nn.Module:
    """Remove every :class:`InputQuantHook` from ``module`` and its submodules (in place); returns it."""
    for sub in module.modules():
        _remove_hooks(sub)
    return module


def install_input_quantizers(module: nn.Module, names: Sequence[str],
                             quantizers: Sequence[Optional[ActivationQuantizer]]) -> None:
    """Put ``quantizers[i]`` on the input of the submodule ``names[i]`` (replacing any there; ``None``: none)."""
    modules = dict(module.named_modules())
    for name, quantizer in zip(names, quantizers):
        target = modules[name]
        _remove_hooks(target)
        if quantizer is not None:
            target.register_forward_pre_hook(InputQuantHook(quantizer))


def _remove_hooks(module: nn.Module) -> None:
    """Remove the :class:`InputQuantHook` of ``module`` itself (not of its submodules)."""
    for key in [key for key, hook in module._forward_pre_hooks.items() if isinstance(hook, InputQuantHook)]:
        del module._forward_pre_hooks[key]


class _Observer:
    """Collects what an observer needs of one layer's inputs: min, max and a sample of values."""

    def __init__(self, keep_values: bool, generator: torch.Generator):
        self.low, self.high = math.inf, -math.inf
        self.keep_values = keep_values
        self.values: list[torch.Tensor] = []
        self.kept = 0
        self.generator = generator

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if not args or not isinstance(args[0], torch.Tensor):
            return
        x = args[0].detach().to("cpu", torch.float32).reshape(-1)
        if x.numel() == 0:
            return
        self.low = min(self.low, float(x.min()))
        self.high = max(self.high, float(x.max()))
        if self.keep_values and self.kept < MAX_VALUES:
            take = min(x.numel(), MAX_VALUES - self.kept, max(1, MAX_VALUES // 16))
            if take < x.numel():
                x = x[torch.randint(x.numel(), (take,), generator=self.generator)]
            self.values.append(x.clone())
            self.kept += len(x)

    def quantizer(self, bits: int, observer: str) -> ActivationQuantizer:
        if not math.isfinite(self.low):
            raise ValueError("a quantized layer never ran on the calibration data; activation ranges need every "
                             "quantized layer to be used")
        low, high = min(self.low, 0.0), max(self.high, 0.0)
        if observer == "minmax" or not self.values:
            return ActivationQuantizer.from_range(bits, low, high)
        values = torch.cat(self.values)
        if observer == "percentile":
            top = float(torch.quantile(values, PERCENTILE / 100)) if len(values) > 1 else high
            bottom = float(torch.quantile(values, 1 - PERCENTILE / 100)) if len(values) > 1 else low
            return ActivationQuantizer.from_range(bits, min(bottom, 0.0), max(top, 0.0))
        best, best_error = None, math.inf
        for ratio in MSE_RATIOS:
            candidate = ActivationQuantizer.from_range(bits, low * ratio, high * ratio)
            error = float((candidate(values) - values).square().mean())
            if error < best_error:
                best, best_error = candidate, error
        return best


def calibrate_activations(module: nn.Module, names: Sequence[str], inputs: torch.Tensor, bits: int,
                          observer: str = "minmax", batch_size: int = 256,
                          seed: int = 0) -> list[ActivationQuantizer]:
    """Observe the inputs of the layers ``names`` of ``module`` on ``inputs`` and fit one grid each.

    ``module`` runs as it is (its quantized weights in place; any input quantizer already on it is
    removed first), in eval mode and without gradients, batch by batch on its own device.
    """
    if isinstance(bits, bool) or bits not in ACT_BITS:
        raise ValueError(f"act_bits={bits!r} is not valid; use None or one of {ACT_BITS}")
    if observer not in ACT_OBSERVERS:
        raise ValueError(f"act_observer={observer!r} is not valid; use one of {', '.join(ACT_OBSERVERS)}")
    modules = dict(module.named_modules())
    generator = torch.Generator().manual_seed(seed)
    observers = [_Observer(observer != "minmax", generator) for _ in names]
    handles = []
    for name, watcher in zip(names, observers):
        _remove_hooks(modules[name])
        handles.append(modules[name].register_forward_pre_hook(watcher))
    from ..evaluation.evaluator import model_placement, place  # (evaluation imports this package)
    device, dtype = model_placement(module)
    try:
        with torch.no_grad():
            for start in range(0, len(inputs), batch_size):
                module(place(inputs[start:start + batch_size], device, dtype))
    finally:
        for handle in handles:
            handle.remove()
    return [watcher.quantizer(bits, observer) for watcher in observers]
