"""AdaRound (Nagel et al., ICML 2020) on the library's own uniform grids.

Layer by layer, in the order of :meth:`QuantizedModel.layer_table`, a continuous variable ``V``
per weight defines a soft rounding ``h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``
with ``zeta = 1.1, gamma = -0.1``, initialised so that ``h`` equals the weight's fractional
grid position. The soft weight ``(clip(floor(position) + h, 0, n - 1) - zero_point) * scale``
is fitted with Adam to reconstruct the layer's output on a calibration set, under the
regulariser ``lambda * sum(1 - |2h - 1| ** beta)`` whose ``beta`` anneals from 20 to 2 after a
warm-up (no regulariser during the warm-up). Then each weight rounds hard: up where
``h >= 0.5``.

The reconstruction target is *asymmetric* by default: the input is what the already-quantized
network (earlier layers with their AdaRound rounding) feeds the layer, the target is the float
network's output of that layer. ``target="quantized"`` instead uses the float weights applied to
the quantized input. Inputs and outputs are captured with forward hooks; a forward pass stops
at the layer being captured. Captured tensors are kept in memory for the calibration set.

The result is integer states per layer, ready for :meth:`QuantizedModel.rebase_` (and for
``evolve(start="adaround")``). Only uniform grids are supported.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.func import functional_call

from ..evaluation.evaluator import DataSpec
from ..evaluation.teacher import calibration_inputs
from ..quantization.grids import UniformGrid
from ..quantization.model import QuantizedModel
from .common import Rounding, float_module, float_weights, grid_position

__all__ = ["AdaRoundConfig", "adaround", "adaround_states", "TARGETS"]

ZETA, GAMMA = 1.1, -0.1
TARGETS = ("asymmetric", "quantized")


@dataclass(frozen=True)
class AdaRoundConfig:
    """Settings of :func:`adaround`; checked on construction.

    ``samples`` calibration inputs are drawn (with ``seed``) from the data given; each of the
    ``steps`` Adam steps per layer uses a random minibatch of ``batch_size`` of them.
    ``warmup`` is the fraction of steps without the regulariser.
    """

    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-2
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    samples: int = 1024
    target: str = "asymmetric"
    capture_batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "samples", "capture_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is not valid; use an integer >= 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r} is not valid; use an integer >= 0")
        for name in ("lr", "beta_start", "beta_end"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
                raise ValueError(f"{name}={value!r} is not valid; use a positive number")
        if not isinstance(self.reg_weight, (int, float)) or not self.reg_weight >= 0:
            raise ValueError(f"reg_weight={self.reg_weight!r} is not valid; use a number >= 0")
        if not isinstance(self.warmup, (int, float)) or not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup={self.warmup!r} is not valid; use a fraction in [0, 1)")
        if self.target not in TARGETS:
            raise ValueError(f"target={self.target!r} is not valid; use one of {', '.join(TARGETS)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Captured(Exception):
    """Raised by a capture hook to end a forward pass once the layer has been seen."""


def _capture(network: nn.Module, layer: nn.Module, inputs: torch.Tensor, what: str, batch_size: int) -> torch.Tensor:
    """The input (``what="input"``) or output of ``layer`` when ``network`` runs on ``inputs``."""
    store: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        store.append((args[0] if what == "input" else output).detach().clone())
        raise _Captured

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for start in range(0, len(inputs), batch_size):
                try:
                    network(inputs[start:start + batch_size])
                except _Captured:
                    continue
                raise RuntimeError("the network's forward pass never reached the layer being captured")
    finally:
        handle.remove()
    return torch.cat(store)


def _soft(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def _initial_v(rest: torch.Tensor) -> torch.Tensor:
    """``V`` such that ``h(V) = rest`` (the fractional grid position)."""
    probability = ((rest - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1.0 - 1e-4)
    return torch.log(probability / (1.0 - probability))


def _reconstruction(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels (dim 1), averaged over the rest (batch, positions)."""
    return (output - target).pow(2).sum(dim=1).mean()


def _round_layer(module: nn.Module, grid: UniformGrid, position: torch.Tensor, inputs: torch.Tensor,
                 targets: torch.Tensor, config: AdaRoundConfig, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    shape = grid.layout.broadcast_shape()
    scale, zero = grid.scale.view(shape), grid.zero_point.view(shape)
    low = position.floor()
    v = _initial_v(position - low).requires_grad_(True)
    optimizer = torch.optim.Adam([v], lr=config.lr)
    warm = int(config.steps * config.warmup)
    top = grid.n_levels - 1

    def weight_of(h: torch.Tensor) -> torch.Tensor:
        return ((low + h).clamp(0, top) - zero) * scale

    def error_of(weight: torch.Tensor) -> float:
        with torch.no_grad():
            total = 0.0
            for start in range(0, len(inputs), config.capture_batch_size):
                out = functional_call(module, {"weight": weight}, (inputs[start:start + config.capture_batch_size],))
                total += float(_reconstruction(out, targets[start:start + config.capture_batch_size])) * len(out)
            return total / len(inputs)

    nearest_error = error_of(weight_of(torch.round(position - low)))
    for step in range(config.steps):
        batch = torch.randint(len(inputs), (min(config.batch_size, len(inputs)),), generator=generator)
        h = _soft(v)
        loss = _reconstruction(functional_call(module, {"weight": weight_of(h)}, (inputs[batch],)), targets[batch])
        if step >= warm and config.reg_weight > 0:
            progress = (step - warm) / max(config.steps - warm, 1)
            beta = config.beta_end + (config.beta_start - config.beta_end) * (1.0 - progress)
            loss = loss + config.reg_weight * (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        h = _soft(v)
        up = (h >= 0.5).to(torch.float32)
        states = (low + up).clamp_(0, top)
        undecided = float(((h > 0.01) & (h < 0.99)).float().mean())
    rounded_error = error_of(weight_of(up))
    nearest = torch.round(position).clamp(0, top)
    stats = {"nearest_error": nearest_error, "adaround_error": rounded_error,
             "flipped_vs_nearest": int((states != nearest).sum()), "undecided_fraction": undecided}
    return states.to(torch.uint8), stats


def adaround(qmodel: QuantizedModel, calibration: Union[DataSpec, torch.Tensor], *,
             float_model: Optional[nn.Module] = None, config: Optional[AdaRoundConfig] = None,
             **options: Any) -> Rounding:
    """Learn AdaRound's rounding for every quantized layer of ``qmodel``; returns a :class:`Rounding`.

    ``calibration`` holds training inputs (labels are ignored); ``config.samples`` of them are
    used. ``float_model`` provides the reconstruction targets; by default it is rebuilt from
    ``qmodel``'s grid positions (identical up to float rounding). ``qmodel`` is not changed:
    call ``qmodel.rebase_(result.states)`` to make the rounding its base. Settings come as an
    :class:`AdaRoundConfig` or as keyword arguments.
    """
    if config is None:
        config = AdaRoundConfig(**options)
    elif options:
        raise TypeError("pass either config= or keyword options, not both")
    for layer, grid in enumerate(qmodel.grids):
        if not isinstance(grid, UniformGrid):
            raise ValueError(f"AdaRound needs uniform grids; layer {layer} ({qmodel.layers[layer].name}) has a "
                             f"{grid.kind} grid (quantize with scheme='uniform')")
    started = time.perf_counter()
    inputs = calibration_inputs(calibration, config.samples, config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    quantized_net = float_module(qmodel)  # a private copy; its weights become AdaRound's, layer by layer
    with torch.no_grad():
        quantized_modules = dict(quantized_net.named_modules())
        for layer, info in enumerate(qmodel.layers):  # start from the model's current rounding
            quantized_modules[info.name].weight.data.copy_(qmodel.grids[layer].dequantize(qmodel.base_states(layer)))
    if float_model is None:
        float_net = float_module(qmodel)
    else:
        float_net = float_model.eval()
    float_modules = dict(float_net.named_modules())
    missing = [info.name for info in qmodel.layers if info.name not in float_modules]
    if missing:
        raise ValueError(f"float_model has no layer named {missing[0]!r}; it must be the model that was quantized")
    was_training = float_net.training
    float_net.eval()
    states, layer_stats = [], []
    try:
        for layer, info in enumerate(qmodel.layers):
            module = quantized_modules[info.name]
            layer_inputs = _capture(quantized_net, module, inputs, "input", config.capture_batch_size)
            if config.target == "asymmetric":
                targets = _capture(float_net, float_modules[info.name], inputs, "output", config.capture_batch_size)
            else:
                with torch.no_grad():
                    targets = functional_call(module, {"weight": float_weights(qmodel, layer)}, (layer_inputs,))
            state, stats = _round_layer(module, qmodel.grids[layer], grid_position(qmodel, layer), layer_inputs,
                                        targets, config, generator)
            with torch.no_grad():
                module.weight.data.copy_(qmodel.grids[layer].dequantize(state).to(module.weight.dtype))
            states.append(state)
            layer_stats.append({"layer": info.name, **stats})
    finally:
        float_net.train(was_training)
    return Rounding("adaround", states, seconds=time.perf_counter() - started,
                    details={"config": config.to_dict(), "layers": layer_stats, "samples": len(inputs)})


def adaround_states(qmodel: QuantizedModel, calibration: Union[DataSpec, torch.Tensor], **options: Any) -> list[torch.Tensor]:
    """Only the states of :func:`adaround` (same arguments)."""
    return adaround(qmodel, calibration, **options).states
