"""Channel patches: redo a convolution stage for the few output channels whose weights changed.

Output channel ``c`` of a convolution depends on ``weight[c]`` and ``bias[c]`` only, and so does
channel ``c`` after any chain of channel-wise operations (activations, pooling, batch norm in
eval mode, adding an unchanged tensor, and a final ``flatten(1)``). When a genome differs from
a cached ancestor only in a few output channels of the convolution that starts a stage, the
stage's new output is the ancestor's output with those channels recomputed on one-channel
slices.

Slices run other kernels than the full tensors, so a patch is used only where
:meth:`~deap_quant.evaluation.stages.StageSplit.verify_patches` found it to reproduce the full
stage bit for bit on every batch shape of the data (which kernels run depends on shapes, not on
weight values). This module imports torch only.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..quantization.activations import quantize_input

__all__ = ["ChannelPatch", "PATCHABLE", "patchable", "module_step", "node_step", "region_length", "sequential_patch",
           "same_values"]

#: Convolutions whose output channels can be recomputed alone (``groups == 1``).
PATCHABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid,
                nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Identity)
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
          nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
          nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_FUNCTIONS = {torch.relu, F.relu, torch.sigmoid, torch.tanh, F.relu6, F.silu, F.gelu}
_METHODS = {"relu", "sigmoid", "tanh"}
_ADDS = {operator.add, torch.add}

REGION = object()  # marks the region's running value among a step's arguments


def patchable(module: nn.Module) -> bool:
    return type(module) in PATCHABLE and module.groups == 1


Step = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


@dataclass(frozen=True)
class _ModuleStep:
    module: nn.Module

    def __call__(self, value: torch.Tensor, channels: torch.Tensor, state: Any) -> torch.Tensor:
        return self.module(value)


@dataclass(frozen=True)
class _BatchNormStep:
    module: nn.Module

    def __call__(self, value: torch.Tensor, channels: torch.Tensor, state: Any) -> torch.Tensor:
        m = self.module

        def pick(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if tensor is None else tensor.index_select(0, channels)
        return F.batch_norm(value, pick(m.running_mean), pick(m.running_var), pick(m.weight), pick(m.bias),
                            False, 0.0, m.eps)


@dataclass(frozen=True)
class _CallStep:
    """A function (or method, by name) applied with the running value, constants and sliced stage inputs."""

    function: Any
    args: tuple
    kwargs: tuple = ()
    method: bool = False

    def __call__(self, value: torch.Tensor, channels: torch.Tensor, state: Any) -> torch.Tensor:
        def resolve(arg: Any) -> Any:
            if arg is REGION:
                return value
            if isinstance(arg, _Input):
                return state[arg.position].index_select(1, channels)
            return arg
        args = [resolve(arg) for arg in self.args]
        kwargs = {name: resolve(arg) for name, arg in self.kwargs}
        if self.method:
            return getattr(args[0], self.function)(*args[1:], **kwargs)
        return self.function(*args, **kwargs)


@dataclass(frozen=True)
class _Input:
    """A stage input (by position in the input tuple), sliced to the patched channel."""

    position: int


def module_step(module: nn.Module) -> Optional[Step]:
    """The step that applies ``module`` to one channel, if it is channel-wise (else ``None``)."""
    kind = type(module)
    if kind in _ELEMENTWISE or kind in _POOLS and not getattr(module, "return_indices", False):
        return _ModuleStep(module)
    if kind in _DROPOUT and not module.training:
        return _ModuleStep(module)
    if (kind in _BATCH_NORMS and not module.training and module.track_running_stats
            and module.running_mean is not None):
        return _BatchNormStep(module)
    return None


def is_final_flatten(module: nn.Module) -> bool:
    return type(module) is nn.Flatten and module.start_dim == 1 and module.end_dim == -1


def sequential_patch(modules: Sequence[nn.Module]) -> Optional[ChannelPatch]:
    """A patch for a stage of modules applied in order: a convolution, then channel-wise modules."""
    if not modules or not patchable(modules[0]) or region_length(modules[1:]) != len(modules) - 1:
        return None
    rest = modules[1:]
    steps = tuple(_CallStep(torch.flatten, (REGION, 1)) if is_final_flatten(m) else module_step(m) for m in rest)
    return ChannelPatch(modules[0], source=None, steps=steps, flatten=bool(rest) and is_final_flatten(rest[-1]))


def region_length(modules: Sequence[nn.Module]) -> int:
    """How many of ``modules`` (applied in order after a convolution) are channel-wise."""
    for count, module in enumerate(modules):
        if is_final_flatten(module):
            return count + 1
        if module_step(module) is None:
            return count
    return len(modules)


def node_step(node: Any, value: Any, modules: dict[str, nn.Module], position_of: Callable[[Any], Optional[int]]
              ) -> tuple[Optional[Step], bool]:
    """The step for fx ``node`` applied to the region's running ``value`` node, and whether it flattens.

    ``position_of(other)`` gives the stage-input position of another node used by ``node`` (or
    ``None`` if it is not a stage input). Returns ``(None, False)`` if ``node`` is not channel-wise.
    """
    args, kwargs = node.args, dict(node.kwargs)
    if node.op == "call_module":
        module = modules[node.target]
        if args != (value,) or kwargs:
            return None, False
        if is_final_flatten(module):
            return _CallStep(torch.flatten, (REGION, 1)), True
        return module_step(module), False
    if node.op == "call_function" and node.target is torch.flatten:
        if args == (value, 1) and kwargs in ({}, {"end_dim": -1}):
            return _CallStep(torch.flatten, (REGION, 1)), True
        return None, False
    if node.op == "call_method" and node.target == "flatten":
        if args == (value, 1) and not kwargs:
            return _CallStep(torch.flatten, (REGION, 1)), True
        return None, False
    constant = (int, float, bool, type(None))
    if node.op == "call_function" and node.target in _FUNCTIONS:
        if not args or args[0] is not value or not all(isinstance(a, constant) for a in (*args[1:], *kwargs.values())):
            return None, False
        return _CallStep(node.target, (REGION, *args[1:]), tuple(kwargs.items())), False
    if node.op == "call_method" and node.target in _METHODS:
        if args != (value,) or kwargs:
            return None, False
        return _CallStep(node.target, (REGION,), method=True), False
    if node.op == "call_function" and node.target in _ADDS and len(args) == 2 and not kwargs:
        if list(args).count(value) != 1:
            return None, False
        other = args[1] if args[0] is value else args[0]
        if isinstance(other, (int, float)):
            resolved: Any = other
        else:
            position = position_of(other)
            if position is None:
                return None, False
            resolved = _Input(position)
        ordered = tuple(REGION if arg is value else resolved for arg in args)
        return _CallStep(node.target, ordered), False
    return None, False


@dataclass
class ChannelPatch:
    """Redo a stage made of a convolution and channel-wise steps, for a few output channels.

    ``source`` is the position of the convolution's input in the stage's input tuple (``None``:
    the stage input is the bare tensor); ``steps`` follow the convolution; ``flatten`` says the
    last step flattened the channels (channel ``c`` then owns a block of columns). ``layout``
    says, for each position of the output tuple, which input position it passes through
    (``None``: the region's output); a ``None`` layout means the output is the bare tensor.
    ``verified[(number of channels, batch shape)]`` records whether the patch was found to
    reproduce the full stage bit for bit for that case (see :meth:`check`).
    """

    module: nn.Module
    source: Optional[int] = None
    steps: tuple = ()
    flatten: bool = False
    layout: Optional[tuple[Optional[int], ...]] = None
    verified: dict = field(default_factory=dict, repr=False)

    @property
    def channels(self) -> int:
        return self.module.out_channels

    def __call__(self, state: Any, previous: Any, channels: Sequence[int]) -> Any:
        """The stage's output for input ``state``, given its ``previous`` output for the same input
        and the output ``channels`` whose weights changed since."""
        inputs = quantize_input(self.module, state if self.source is None else state[self.source])
        old = previous if self.layout is None else previous[self.layout.index(None)]
        index = torch.as_tensor(list(channels), dtype=torch.int64, device=self.module.weight.device)
        bias = self.module.bias
        value = self.module._conv_forward(inputs, self.module.weight.index_select(0, index),
                                          None if bias is None else bias.index_select(0, index))
        for step in self.steps:
            value = step(value, index, state)
        new = old.clone()
        if self.flatten:
            new.view(new.shape[0], self.channels, -1).index_copy_(1, index, value.view(value.shape[0], len(index), -1))
        else:
            new.index_copy_(1, index, value)
        if self.layout is None:
            return new
        return tuple(new if source is None else state[source] for source in self.layout)

    def check(self, stage: Callable[[Any], Any], state: Any, previous: Any, channels: Sequence[int],
              output: Any = None) -> tuple[Any, bool]:
        """Run the full ``stage`` (unless its ``output`` for ``state`` is given) and the patch on
        ``state``; record whether they agree bit for bit.

        Returns the stage's (full) output and the verdict, stored under the number of channels and
        the batch shape, so that each case is checked once.
        """
        if output is None:
            output = stage(state)
        agrees = same_values(self(state, previous, channels), output)
        self.verified[len(channels), _shape(state if self.source is None else state[self.source])] = agrees
        return output, agrees

    def status(self, state: Any, channels: Sequence[int]) -> Optional[bool]:
        """Whether this case (number of channels, batch shape) was verified; ``None`` if not yet checked."""
        return self.verified.get((len(channels), _shape(state if self.source is None else state[self.source])))


def same_values(a: Any, b: Any) -> bool:
    """Bitwise equality of two nested outputs (tensors compared with ``torch.equal``, NaNs equal)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_floating_point() or a.is_complex():
            return bool(torch.equal(torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0))
                        and torch.equal(a.isnan(), b.isnan()))
        return bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same_values(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_values(a[k], b[k]) for k in a)
    return a == b


def _shape(tensor: Any) -> tuple:
    return tuple(tensor.shape) if hasattr(tensor, "shape") else ()
