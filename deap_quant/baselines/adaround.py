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

As in the paper, the loss compares the outputs *after the activation that follows the layer*
(``||f(W x) - f(W~ x~)||``). That activation is read from the network's ``torch.fx`` graph: the
layer's output feeds, alone, a chain of Identities, Dropouts and BatchNorms (eval mode; an
unfolded BatchNorm is included, so the loss is the same whether the model was folded or not)
ending in an activation (ReLU, ReLU6, LeakyReLU, GELU, SiLU, ... as modules, functions or tensor
methods). The chain stops before anything else, such as the residual add in front of a ResNet
block's last ReLU (the loss is then after the BatchNorms only); where the layer's output feeds
nothing of the kind, goes elsewhere too, or the network cannot be traced, the loss is on the
layer's own output. Each layer's chain is reported as ``activation`` in the result's details
(e.g. ``"BatchNorm2d+ReLU"``, ``"relu"``; ``None``: the layer's own output).

When the model was quantized with ``fold_bn=True``, its layers compute the folded convolutions,
so the targets come from the float model folded the same way
(:func:`~deap_quant.quantization.fold.fold_bn`). The float model passed in is never modified, nor
is its train/eval mode: AdaRound works on copies.

At the end, a weight whose soft rounding ``h`` is still strictly between 0.01 and 0.99 is
*undecided*: the regulariser has not yet pushed it to a side, and its hard rounding is close to
arbitrary. The result reports how many remain (``details["undecided"]``, per layer too); many
undecided weights mean too few steps.

The result is integer states per layer, ready for :meth:`QuantizedModel.rebase_` (and for
``evolve(start="adaround")``). Only uniform grids are supported.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.func import functional_call

from ..evaluation.evaluator import DataSpec, model_placement
from ..evaluation.teacher import calibration_inputs
from ..quantization.fold import NORM_TYPES, fold_bn, norm_types, trace_graph
from ..quantization.grids import UniformGrid
from ..quantization.model import QuantizedModel
from .common import Rounding, float_module, float_weights, grid_position

__all__ = ["AdaRoundConfig", "adaround", "adaround_states", "TARGETS", "UNDECIDED", "ACTIVATION_MODULES",
           "following_activations"]

ZETA, GAMMA = 1.1, -0.1
TARGETS = ("asymmetric", "quantized")
#: ``h`` strictly between these is an undecided rounding at the end.
UNDECIDED = (0.01, 0.99)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdaRoundConfig:
    """Settings of :func:`adaround`; checked on construction.

    ``samples`` calibration inputs are drawn (with ``seed``) from the data given; each of the
    ``steps`` Adam steps per layer uses a random minibatch of ``batch_size`` of them, at learning
    rate ``lr``. ``warmup`` is the fraction of steps without the regulariser.

    The paper runs 10,000 (up to 20,000) steps of batch 32 per layer. The default, 5,000, leaves
    few weights undecided (``details["undecided"]``, see :func:`adaround`: on digits-cnn at 2 bits
    633 of 40,208 against 6,297 after 1,000 steps) at half the paper's cost. Measured on one CPU
    thread of a shared 2-core machine, a step costs about 10 ms per layer of a CIFAR ResNet-20
    (batch 32 of 32x32 images), so its 20 layers take about 17 minutes of steps plus about 2.5
    minutes capturing the inputs and targets of 2,048 calibration images (10,000 steps: about 35
    minutes); digits-cnn takes about a minute. Lower ``steps`` for quick looks.
    """

    steps: int = 5000
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
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
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


# ---------------------------------------------------------------------------- the activation after a layer
#: Activation modules that end a layer's loss chain (copied with ``inplace=False``).
ACTIVATION_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.Hardtanh, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus,
)
#: The same as functions (``torch.relu``, ``F.relu``, ...); in-place variants map to their plain twins.
_ACTIVATION_FUNCTIONS: dict[Callable, Callable] = {
    **{fn: fn for fn in (torch.relu, F.relu, F.relu6, F.leaky_relu, F.hardtanh, F.elu, F.selu, F.celu, F.gelu,
                         F.silu, F.mish, F.hardswish, F.hardsigmoid, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
                         F.softplus)},
    torch.relu_: torch.relu, F.relu_: torch.relu, F.leaky_relu_: F.leaky_relu, F.elu_: F.elu,
    F.hardtanh_: F.hardtanh,
}
#: The same as tensor methods (``x.relu()``).
_ACTIVATION_METHODS: dict[str, Callable] = {"relu": torch.relu, "relu_": torch.relu, "sigmoid": torch.sigmoid,
                                            "sigmoid_": torch.sigmoid, "tanh": torch.tanh, "tanh_": torch.tanh}
_PASS_THROUGH = (nn.Identity, nn.modules.dropout._DropoutNd)


def _traced_graphs(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module, fx.Graph]]:
    """``(prefix, module, graph)`` for ``module`` or, where it cannot be traced, its largest traceable parts."""
    try:
        graph = trace_graph(module)  # BatchNorms (torchvision's frozen one too) stay single nodes
    except Exception:  # data-dependent control flow, TorchScript, ...: look inside
        for name, child in module.named_children():
            yield from _traced_graphs(child, f"{prefix}{name}.")
        return
    yield prefix, module, graph


def _constant(values: Any) -> bool:
    """Whether ``values`` (args or kwargs of a node) hold no graph node."""
    found: list[fx.Node] = []
    fx.node.map_arg(values, found.append)
    return not found


def _chain_of(node: fx.Node, modules: dict[str, nn.Module]) -> Optional[tuple[str, list[Callable]]]:
    """What only ``node``'s output feeds: BatchNorms (eval mode) then an activation, as ``(label, functions)``.

    The chain ends at the first activation, or before anything else (or a fork); ``None`` when it holds
    nothing (the loss is then on the layer's own output).
    """
    steps: list[Callable] = []
    names: list[str] = []
    norms = norm_types()

    def done(extra: Optional[Callable] = None, label: str = "") -> Optional[tuple[str, list[Callable]]]:
        chain, labels = steps + ([extra] if extra is not None else []), names + ([label] if label else [])
        return ("+".join(labels), chain) if chain else None

    while True:
        users = list(node.users)
        if len(users) != 1:
            return done()
        user = users[0]
        if not user.args or user.args[0] is not node or not _constant((user.args[1:], user.kwargs)):
            return done()
        if user.op == "call_module":
            module = modules.get(str(user.target))
            if isinstance(module, _PASS_THROUGH):
                node = user
                continue
            if (isinstance(module, norms) and getattr(module, "running_mean", None) is not None
                    and not (isinstance(module, NORM_TYPES) and module.training)):  # (a frozen one has no mode)
                steps.append(module)
                names.append(type(module).__name__)
                node = user
                continue
            if isinstance(module, ACTIVATION_MODULES):
                module = copy.deepcopy(module)
                if hasattr(module, "inplace"):
                    module.inplace = False
                return done(module, type(module).__name__)
            return done()
        if user.op == "call_function" and user.target in _ACTIVATION_FUNCTIONS:
            function = _ACTIVATION_FUNCTIONS[user.target]
            rest, options = tuple(user.args[1:]), {k: v for k, v in user.kwargs.items() if k != "inplace"}
            if rest and isinstance(rest[-1], bool):  # a positional in-place flag (F.relu(x, True)): dropped
                rest = rest[:-1]
            label = getattr(function, "__name__", str(function)).rstrip("_")
            return done(lambda x, function=function, rest=rest, options=options: function(x, *rest, **options), label)
        if user.op == "call_method" and user.target in _ACTIVATION_METHODS and len(user.args) == 1 and not user.kwargs:
            return done(_ACTIVATION_METHODS[str(user.target)], str(user.target).rstrip("_"))
        return done()


def following_activations(network: nn.Module, names: list[str]) -> dict[str, tuple[Optional[str], Callable]]:
    """For each layer name, ``(label, function)``: what turns its output into what AdaRound's loss
    compares -- the BatchNorms (unfolded, eval mode) and the activation that follow the layer alone,
    e.g. ``"BatchNorm2d+ReLU"`` (identity and label ``None`` where nothing does)."""
    found: dict[str, tuple[Optional[str], Callable]] = {}
    wanted = set(names)
    for prefix, module, graph in _traced_graphs(network):
        modules = dict(module.named_modules())
        calls: dict[str, list[fx.Node]] = {}
        for node in graph.nodes:
            if node.op == "call_module" and prefix + str(node.target) in wanted:
                calls.setdefault(prefix + str(node.target), []).append(node)
        for name, nodes in calls.items():
            chain = _chain_of(nodes[0], modules) if len(nodes) == 1 else None
            if chain is not None and name not in found:
                label, steps = chain

                def post(x: torch.Tensor, steps: list[Callable] = steps) -> torch.Tensor:
                    for step in steps:
                        x = step(x)
                    return x

                found[name] = (label, post)
    return {name: found.get(name, (None, lambda x: x)) for name in names}


# ---------------------------------------------------------------------------- one layer
def _round_layer(module: nn.Module, grid: UniformGrid, position: torch.Tensor, inputs: torch.Tensor,
                 targets: torch.Tensor, config: AdaRoundConfig, generator: torch.Generator,
                 post: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """AdaRound one layer; ``targets`` are already after ``post`` (the following activation)."""
    shape = grid.layout.broadcast_shape()
    device = inputs.device  # everything lives where the layer runs
    scale, zero = grid.scale.view(shape).to(device), grid.zero_point.view(shape).to(device)
    position = position.to(device)
    low = position.floor()
    v = _initial_v(position - low).requires_grad_(True)
    optimizer = torch.optim.Adam([v], lr=config.lr)
    warm = int(config.steps * config.warmup)
    top = grid.n_levels - 1

    def weight_of(h: torch.Tensor) -> torch.Tensor:
        return ((low + h).clamp(0, top) - zero) * scale

    def output_of(weight: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return post(functional_call(module, {"weight": weight}, (batch,)))

    def error_of(weight: torch.Tensor) -> float:
        with torch.no_grad():
            total = 0.0
            for start in range(0, len(inputs), config.capture_batch_size):
                out = output_of(weight, inputs[start:start + config.capture_batch_size])
                total += float(_reconstruction(out, targets[start:start + config.capture_batch_size])) * len(out)
            return total / len(inputs)

    nearest_error = error_of(weight_of(torch.round(position - low)))
    for step in range(config.steps):
        batch = torch.randint(len(inputs), (min(config.batch_size, len(inputs)),), generator=generator)
        h = _soft(v)
        loss = _reconstruction(output_of(weight_of(h), inputs[batch]), targets[batch])
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
        undecided = int(((h > UNDECIDED[0]) & (h < UNDECIDED[1])).sum())
    rounded_error = error_of(weight_of(up))
    nearest = torch.round(position).clamp(0, top)
    stats = {"nearest_error": nearest_error, "adaround_error": rounded_error,
             "flipped_vs_nearest": int((states != nearest).sum()), "undecided": undecided,
             "undecided_fraction": undecided / max(h.numel(), 1)}
    return states.to("cpu", torch.uint8), stats


def _float_network(qmodel: QuantizedModel, float_model: Optional[nn.Module]) -> nn.Module:
    """A private float copy that computes what ``qmodel``'s layers approximate (folded like them)."""
    if float_model is None:
        return float_module(qmodel)
    if not isinstance(float_model, nn.Module):
        raise TypeError(f"float_model must be a torch.nn.Module, got {type(float_model).__name__}")
    if qmodel.config.get("fold_bn"):
        return fold_bn(float_model)  # a folded copy in eval mode; the model itself is untouched
    return copy.deepcopy(float_model).eval()


def adaround(qmodel: QuantizedModel, calibration: Union[DataSpec, torch.Tensor], *,
             float_model: Optional[nn.Module] = None, config: Optional[AdaRoundConfig] = None,
             **options: Any) -> Rounding:
    """Learn AdaRound's rounding for every quantized layer of ``qmodel``; returns a :class:`Rounding`.

    ``calibration`` holds training inputs (labels are ignored); ``config.samples`` of them are
    used. ``float_model`` provides the reconstruction targets (folded first when ``qmodel`` was
    quantized with ``fold_bn=True``; the model itself is neither changed nor switched between
    train and eval); by default they are rebuilt from ``qmodel``'s grid positions (identical up
    to float rounding). ``qmodel`` is not changed: call ``qmodel.rebase_(result.states)`` to make
    the rounding its base. Settings come as an :class:`AdaRoundConfig` or as keyword arguments.

    ``details`` of the result: the config, per layer (``layers``) the reconstruction error of
    nearest and of AdaRound's rounding, the weights flipped against nearest, the ``activation``
    the loss includes, and the ``undecided`` weights (``h`` in (0.01, 0.99) at the end); overall
    ``undecided`` and ``undecided_fraction``. Each layer is also logged (``logging``, INFO).
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
    # AdaRound optimises in float32 on the model's device, whatever dtype the model was converted to
    device = model_placement(qmodel.module)[0] or torch.device("cpu")
    inputs = calibration_inputs(calibration, config.samples, config.seed).to(device, torch.float32)
    generator = torch.Generator().manual_seed(config.seed)  # on the CPU: the same draws on every device
    # a private copy, with the model's input quantizers; its weights become AdaRound's, layer by layer
    quantized_net = float_module(qmodel, input_quantizers=True).to(device, torch.float32)
    with torch.no_grad():
        quantized_modules = dict(quantized_net.named_modules())
        for layer, info in enumerate(qmodel.layers):  # start from the model's current rounding
            quantized_modules[info.name].weight.data.copy_(qmodel.grids[layer].dequantize(qmodel.base_states(layer)))
    float_net = _float_network(qmodel, float_model).to(device, torch.float32)
    float_modules = dict(float_net.named_modules())
    missing = [info.name for info in qmodel.layers if info.name not in float_modules]
    if missing:
        raise ValueError(f"float_model has no layer named {missing[0]!r}; it must be the model that was quantized")
    activations = following_activations(quantized_net, [info.name for info in qmodel.layers])
    states, layer_stats = [], []
    for layer, info in enumerate(qmodel.layers):
        module = quantized_modules[info.name]
        label, post = activations[info.name]
        layer_inputs = _capture(quantized_net, module, inputs, "input", config.capture_batch_size)
        with torch.no_grad():
            if config.target == "asymmetric":
                targets = _capture(float_net, float_modules[info.name], inputs, "output", config.capture_batch_size)
            else:
                targets = functional_call(module, {"weight": float_weights(qmodel, layer).to(device)}, (layer_inputs,))
            targets = torch.cat([post(targets[start:start + config.capture_batch_size])
                                 for start in range(0, len(targets), config.capture_batch_size)])
        state, stats = _round_layer(module, qmodel.grids[layer], grid_position(qmodel, layer), layer_inputs,
                                    targets, config, generator, post)
        with torch.no_grad():
            module.weight.data.copy_(qmodel.grids[layer].dequantize(state).to(module.weight.dtype))
        states.append(state)
        layer_stats.append({"layer": info.name, "activation": label, **stats})
        logger.info("adaround %s (%s): error %.4g -> %.4g, %d flipped, %d of %d undecided", info.name,
                    label or "no activation", stats["nearest_error"], stats["adaround_error"],
                    stats["flipped_vs_nearest"], stats["undecided"], info.numel)
    undecided = sum(entry["undecided"] for entry in layer_stats)
    return Rounding("adaround", states, seconds=time.perf_counter() - started,
                    details={"config": config.to_dict(), "layers": layer_stats, "samples": len(inputs),
                             "undecided": undecided, "undecided_fraction": undecided / max(qmodel.n_weights, 1)})


def adaround_states(qmodel: QuantizedModel, calibration: Union[DataSpec, torch.Tensor], **options: Any) -> list[torch.Tensor]:
    """Only the states of :func:`adaround` (same arguments)."""
    return adaround(qmodel, calibration, **options).states
