"""Fold BatchNorm into the preceding convolution, as deployment does.

In eval mode ``bn(conv(x)) = gamma * (W x + b - mean) / sqrt(var + eps) + beta``, which is a
convolution with weight ``W * s`` (``s = gamma / sqrt(var + eps)`` per output channel) and bias
``(b - mean) * s + beta``. :func:`fold_bn` rewrites every such pair in a copy of the model and
replaces the BatchNorm by ``nn.Identity``. Quantizing the folded weights is what an integer
deployment runs; quantizing the unfolded weights is what the model holds.

Pairs are found from the data flow, not from module order: the model (or, where it cannot be
traced, each of its largest traceable submodules) is traced with ``torch.fx``, and a pair is
folded only when the BatchNorm's sole input is the conv's output, the conv's output feeds nothing
else, and each module is called exactly once.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn

__all__ = ["fold_bn", "foldable_pairs", "trace_graph", "NormLeafTracer", "norm_types", "FOLDABLE_LAYERS",
           "NORM_TYPES"]

#: Layer types a following BatchNorm can be folded into: their output channels are the BatchNorm's
#: axis 1. (Linear is left out: on inputs of more than two dimensions its features are the last
#: axis, not the BatchNorm's, which a traced graph cannot tell apart.)
FOLDABLE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: BatchNorm types that fold (torchvision's ``FrozenBatchNorm2d`` too, see :func:`norm_types`).
NORM_TYPES: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm,)


def norm_types() -> tuple[type, ...]:
    """:data:`NORM_TYPES` plus torchvision's frozen BatchNorm if torchvision is loaded (if it is not,
    no module can be one; importing it here would cost every ``import deap_quant`` a second)."""
    if "torchvision" in sys.modules:
        from torchvision.ops import FrozenBatchNorm2d

        return NORM_TYPES + (FrozenBatchNorm2d,)
    return NORM_TYPES


class NormLeafTracer(fx.Tracer):
    """``torch.fx`` tracer that keeps every BatchNorm of :func:`norm_types` as one ``call_module`` node.

    The default tracer only keeps ``torch.nn`` modules whole; it would trace *into* torchvision's
    ``FrozenBatchNorm2d`` (a module of ``torchvision.ops``), whose arithmetic then hides it.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.norm_types = norm_types()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.norm_types) or super().is_leaf_module(m, module_qualified_name)


def trace_graph(module: nn.Module) -> fx.Graph:
    """``module``'s fx graph with BatchNorms (torchvision's frozen one too) as leaves (see :class:`NormLeafTracer`).

    Raises whatever tracing raises where ``module`` cannot be traced symbolically.
    """
    return NormLeafTracer().trace(module)


def _traced_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """(layer, norm) qualified names within ``module`` folded safely according to its fx graph."""
    graph = trace_graph(module)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
        elif node.op == "get_attr":  # a parameter read directly: do not touch its module
            owner = str(node.target).rsplit(".", 1)[0]
            calls[owner] = calls.get(owner, 0) + 2
    modules = dict(module.named_modules())
    norms = norm_types()
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), norms):
            continue
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            continue
        if getattr(modules[node.target], "running_mean", None) is None:  # uses batch statistics: not foldable
            continue
        source = node.args[0]
        if (source.op == "call_module" and isinstance(modules.get(source.target), FOLDABLE_LAYERS)
                and len(source.users) == 1 and calls.get(source.target) == 1 and calls.get(node.target) == 1):
            pairs.append((str(source.target), str(node.target)))
    return pairs


def _pairs(module: nn.Module, prefix: str) -> Iterator[tuple[str, str]]:
    try:
        found = _traced_pairs(module)
    except Exception:  # not traceable (data-dependent control flow, list inputs, ...): look inside
        for name, child in module.named_children():
            yield from _pairs(child, f"{prefix}{name}.")
        return
    for layer, norm in found:
        yield prefix + layer, prefix + norm


def foldable_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Qualified names ``(layer, batchnorm)`` of every pair :func:`fold_bn` folds in ``model``."""
    return list(_pairs(model, ""))


def _fold_pair(layer: nn.Module, norm: nn.Module) -> None:
    weight = layer.weight
    channels = weight.shape[0]
    if norm.running_mean.numel() != channels:
        raise ValueError(f"BatchNorm has {norm.running_mean.numel()} channels, the layer {channels} outputs")
    gamma = norm.weight if norm.weight is not None else torch.ones(channels, device=weight.device)
    beta = norm.bias if norm.bias is not None else torch.zeros(channels, device=weight.device)
    scale = gamma.double() / torch.sqrt(norm.running_var.double() + norm.eps)
    bias = (layer.bias.double() if layer.bias is not None
            else torch.zeros(channels, dtype=torch.float64, device=weight.device))
    shape = (-1,) + (1,) * (weight.ndim - 1)
    with torch.no_grad():
        layer.weight.copy_((weight.double() * scale.reshape(shape)).to(weight.dtype))
        new_bias = ((bias - norm.running_mean.double()) * scale + beta.double()).to(weight.dtype)
        if layer.bias is None:
            layer.bias = nn.Parameter(new_bias, requires_grad=weight.requires_grad)
        else:
            layer.bias.copy_(new_bias)


def _replace(model: nn.Module, qualified: str, replacement: nn.Module) -> None:
    parent_name, _, child = qualified.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, replacement)


def fold_bn(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with every BatchNorm that directly follows a conv folded into it.

    The folded BatchNorms become ``nn.Identity``; in eval mode the copy computes the same function
    (up to float rounding). BatchNorms that cannot be folded safely (fed by something else, or
    whose producer's output is also used elsewhere) are left as they are. The model is not modified.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    folded = copy.deepcopy(model).eval()
    for layer_name, norm_name in foldable_pairs(folded):
        _fold_pair(folded.get_submodule(layer_name), folded.get_submodule(norm_name))
        _replace(folded, norm_name, nn.Identity())
    return folded
