"""Run a model as a sequence of stages, so that a forward pass can resume from cached activations.

A :class:`StageSplit` is a list of :class:`Stage` callables whose composition is the model's
forward pass: ``split.run(x) == module(x)`` bit for bit (same modules, same kernels, same order).
The value handed from one stage to the next (the *state*) is whatever crosses the cut: a
tensor, or a tuple of tensors where a residual connection spans it. Each stage records the
parameters it uses, so a change to a weight invalidates exactly the stages from the first one
that uses it.

How a model is split (:func:`split_model`):

* ``stages=[...]`` -- a user-declared split: :class:`Stage` objects or modules, applied in order;
* a splitter registered for the model's class (:func:`register_splitter`);
* ``torch.fx``: the traced graph is cut right before every node that uses a quantized weight,
  and after the channel-wise operations (activation, pooling, batch norm, adding a skip tensor)
  that follow a quantized convolution (torchvision ResNet, VGG, MobileNet and most plain
  ``forward`` code trace; a residual block is cut between its convolutions, with the skip tensor
  carried along). A stage made of a convolution and its channel-wise tail gets a
  :class:`~.patches.ChannelPatch` to recompute a few output channels alone;
* ``nn.Sequential`` that does not trace: cut between children (nested Sequentials flattened);
* otherwise one stage, the whole model (no reuse, still correct).

Every automatic split is verified on a real batch before use: the staged output must equal
the plain forward pass bit for bit, and no stage may modify a value handed to it in place (a
cached activation would be corrupted). A cut that fails the in-place check is merged away; a
split whose output differs falls back to a single stage. A user-declared split that fails
raises :class:`ValueError`. This module imports torch only.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from .patches import ChannelPatch, node_step, patchable, region_length, same_values, sequential_patch

__all__ = ["Stage", "StageSplit", "split_model", "register_splitter", "SPLITTERS", "StageSpec",
           "tensors_in", "same_values"]


@dataclass
class Stage:
    """One step of a staged forward pass: ``fn(state) -> state``.

    ``modules`` names the submodules (qualified names in the model) whose parameters the stage
    uses; for an ``nn.Module`` ``fn`` they may be left empty, its own parameters are used. A
    quantized weight that no stage claims is treated as used by the first stage, which is
    always correct (everything is recomputed when it changes) but gives no reuse.
    """

    name: str
    fn: Callable[[Any], Any]
    modules: tuple[str, ...] = ()
    parameters: frozenset = field(default=frozenset(), repr=False)  # ids of the parameter tensors used
    patch: Optional[ChannelPatch] = field(default=None, repr=False)

    def __call__(self, state: Any) -> Any:
        return self.fn(state)


StageSpec = Union[str, None, Sequence[Union[Stage, nn.Module, Callable[[Any], Any]]]]

#: Model classes with a hand-written split: ``SPLITTERS[cls](module) -> list[Stage]``.
SPLITTERS: dict[type, Callable[[nn.Module], list[Stage]]] = {}


def register_splitter(cls: type, splitter: Callable[[nn.Module], list[Stage]]) -> None:
    """Declare how models of class ``cls`` are split: ``splitter(module) -> list[Stage]``.

    The split is verified like a user-declared one (bit-identical output, no in-place changes
    to stage inputs) when an evaluator first uses it.
    """
    if not isinstance(cls, type) or not callable(splitter):
        raise TypeError("register_splitter needs a class and a callable splitter(module) -> list[Stage]")
    SPLITTERS[cls] = splitter


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside a nested tuple / list / dict value."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)


def _parameter_ids(module: nn.Module) -> frozenset:
    return frozenset(id(p) for p in module.parameters())


class StageSplit:
    """A model's forward pass as stages. ``kind`` says how it was obtained."""

    def __init__(self, stages: Sequence[Stage], kind: str, module: nn.Module):
        if not stages:
            raise ValueError("a stage split needs at least one stage")
        self.stages = list(stages)
        self.kind = kind
        modules = dict(module.named_modules())
        for stage in self.stages:
            ids = set(stage.parameters)
            if isinstance(stage.fn, nn.Module):
                ids |= _parameter_ids(stage.fn)
            for name in stage.modules:
                if name not in modules:
                    raise ValueError(f"stage {stage.name!r} names module {name!r}, which the model does not have")
                ids |= _parameter_ids(modules[name])
            stage.parameters = frozenset(ids)

    def __len__(self) -> int:
        return len(self.stages)

    def __iter__(self) -> Iterator[Stage]:
        return iter(self.stages)

    def __repr__(self) -> str:
        return f"StageSplit({self.kind}, {len(self)} stages: {', '.join(s.name for s in self.stages)})"

    @property
    def names(self) -> list[str]:
        return [stage.name for stage in self.stages]

    def run(self, state: Any, start: int = 0, stop: Optional[int] = None) -> Any:
        """Run stages ``start .. stop - 1`` on ``state`` (the input of stage ``start``)."""
        for stage in self.stages[start:stop]:
            state = stage(state)
        return state

    __call__ = run

    def stage_of(self, parameter: torch.Tensor) -> Optional[int]:
        """Index of the first stage that uses ``parameter``, or ``None`` if no stage claims it."""
        key = id(parameter)
        for index, stage in enumerate(self.stages):
            if key in stage.parameters:
                return index
        return None

    def stages_of_weights(self, weights: Sequence[torch.Tensor]) -> list[int]:
        """First stage of each weight; unclaimed weights go to stage 0 (always correct)."""
        found = [self.stage_of(weight) for weight in weights]
        return [0 if stage is None else stage for stage in found]

    def last_stages_of_weights(self, weights: Sequence[torch.Tensor]) -> list[int]:
        """Last stage that uses each weight; unclaimed weights count as used by every stage."""
        last = []
        for weight in weights:
            users = [index for index, stage in enumerate(self.stages) if id(weight) in stage.parameters]
            last.append(users[-1] if users else len(self.stages) - 1)
        return last

    # ------------------------------------------------------------------ verification
    def check(self, module: nn.Module, sample: Any) -> tuple[bool, list[int]]:
        """Run ``sample`` through the module and through the stages.

        Returns ``(identical, mutated)``: whether the outputs are bitwise equal, and the stage
        indices ``s >= 1`` whose input state was modified in place by a later stage.
        """
        with torch.no_grad():
            reference = module(sample)
            inputs, versions = [], []
            state = sample
            for index, stage in enumerate(self.stages):
                if index:
                    tensors = list(tensors_in(state))
                    inputs.append(tensors)
                    versions.append([t._version for t in tensors])
                state = stage(state)
        mutated = [index + 1 for index, (tensors, before) in enumerate(zip(inputs, versions))
                   if [t._version for t in tensors] != before]
        return same_values(reference, state), mutated

    def verify_patches(self, samples: Iterable[Any]) -> None:
        """Drop the :class:`~.patches.ChannelPatch` of a stage that does not reproduce it bit for bit.

        Each sample (one input batch per batch shape the data has) runs through the stages; for
        every patched stage, the first, a middle and the last output channel are recomputed alone
        from the stage's input and compared with the full output. Other numbers of channels are
        checked when first used (:meth:`~.patches.ChannelPatch.check`).
        """
        for sample in samples:
            if not any(stage.patch is not None for stage in self.stages):
                return
            with torch.inference_mode():
                state = sample
                for stage in self.stages:
                    output = stage(state)
                    patch = stage.patch
                    if patch is not None:
                        for channel in sorted({0, patch.channels // 2, patch.channels - 1}):
                            try:
                                _, agrees = patch.check(stage, state, output, [channel], output=output)
                            except Exception:  # noqa: BLE001 - a patch that cannot run is no patch
                                agrees = False
                            if not agrees:
                                stage.patch = None
                                break
                    state = output


# ---------------------------------------------------------------------------- builders
class _SequentialBuilder:
    """Cuts a (nested) ``nn.Sequential`` between children."""

    kind = "sequential"

    def __init__(self, module: nn.Sequential, quantized: set[str]):
        self.items: list[tuple[str, nn.Module]] = list(_flatten_sequential(module, ""))
        uses = [any(_qualified(name, sub) in quantized for sub, _ in child.named_modules())
                for name, child in self.items]
        before = {i for i in range(1, len(self.items)) if uses[i]}
        # after a quantized convolution and the channel-wise modules following it, so that the
        # stage [convolution, channel-wise ...] can be patched channel by channel
        after = {i + 1 + region_length([child for _, child in self.items[i + 1:]])
                 for i, (name, child) in enumerate(self.items) if name in quantized and patchable(child)}
        self.candidates = sorted(cut for cut in before | after if 0 < cut < len(self.items))

    def build(self, cuts: Sequence[int]) -> list[Stage]:
        bounds = [0, *cuts, len(self.items)]
        stages = []
        for start, stop in zip(bounds[:-1], bounds[1:]):
            group = self.items[start:stop]
            modules = [child for _, child in group]
            fn = modules[0] if len(modules) == 1 else _Chain(modules)
            stages.append(Stage(name=group[0][0] if len(group) == 1 else f"{group[0][0]}..{group[-1][0]}",
                                fn=fn, modules=tuple(name for name, _ in group), patch=sequential_patch(modules)))
        return stages


def _qualified(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _flatten_sequential(module: nn.Sequential, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    for name, child in module.named_children():
        qualified = _qualified(prefix, name)
        if type(child) is nn.Sequential and not _has_hooks(child):
            yield from _flatten_sequential(child, qualified)
        else:
            yield qualified, child


class _Chain:
    """Apply modules in order (what ``nn.Sequential.forward`` does), without being a Module."""

    def __init__(self, modules: Sequence[nn.Module]):
        self.modules = list(modules)

    def __call__(self, state: Any) -> Any:
        for module in self.modules:
            state = module(state)
        return state


class _FxBuilder:
    """Cuts a ``torch.fx`` trace of the model right before nodes that use quantized weights."""

    kind = "fx"

    def __init__(self, module: nn.Module, quantized: set[str]):
        import torch.fx as fx

        self.fx = fx
        self.module = module
        self.graph_module = fx.symbolic_trace(module)
        self.nodes = list(self.graph_module.graph.nodes)
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(placeholders) != 1 or self.nodes[0].op != "placeholder" or self.nodes[-1].op != "output":
            raise ValueError("the traced model must take exactly one input")
        position = {node: i for i, node in enumerate(self.nodes)}
        self.last_use = {node: max((position[user] for user in node.users), default=position[node])
                         for node in self.nodes}
        weights = {f"{name}.weight" for name in quantized}
        self.modules = dict(module.named_modules())
        self.position = position
        before = {i for i, node in enumerate(self.nodes[:-1]) if
                  (node.op == "call_module" and node.target in quantized)
                  or (node.op == "get_attr" and node.target in weights)}
        # after a quantized convolution and the channel-wise operations on its output, so that the
        # stage [convolution, channel-wise ...] can be patched channel by channel
        after = {self._region_end(i) for i, node in enumerate(self.nodes[:-1])
                 if node.op == "call_module" and node.target in quantized and self._is_conv_call(node)}
        # A cut at position 1 would leave the first stage empty, so cuts start at 2.
        self.candidates = sorted(cut for cut in before | after if 1 < cut < len(self.nodes) - 1)

    def _is_conv_call(self, node: Any) -> bool:
        return (node.op == "call_module" and patchable(self.modules[node.target]) and not node.kwargs
                and len(node.args) == 1)

    def _region(self, conv: int, position_of: Callable[[Any], Optional[int]], stop: Optional[int] = None
                ) -> tuple[int, list, bool]:
        """The channel-wise operations following the convolution at ``conv``: ``(end, steps, flatten)``."""
        value, end, steps = self.nodes[conv], conv + 1, []
        limit = len(self.nodes) - 1 if stop is None else stop
        while end < limit:
            node = self.nodes[end]
            if list(value.users) != [node]:
                break
            step, flatten = node_step(node, value, self.modules, position_of)
            if step is None:
                break
            steps.append(step)
            value, end = node, end + 1
            if flatten:
                return end, steps, True
        return end, steps, False

    def _region_end(self, conv: int) -> int:
        return self._region(conv, lambda other: 0 if self.position[other] < conv else None)[0]

    def crossing(self, cut: int) -> list[Any]:
        """Nodes defined before position ``cut`` and used at or after it."""
        return [node for node in self.nodes[:cut] if self.last_use[node] >= cut]

    def _code(self, start: int, stop: int, last: bool) -> nn.Module:
        """A GraphModule running nodes ``start .. stop - 1``; it takes the crossing values as arguments."""
        fx = self.fx
        graph = fx.Graph()
        env: dict[Any, Any] = {}
        for node in ([] if start == 0 else self.crossing(start)):
            env[node] = graph.placeholder(node.name)
        for node in self.nodes[start:stop]:
            env[node] = graph.node_copy(node, env.__getitem__)
        if last:
            graph.output(fx.node.map_arg(self.nodes[-1].args[0], env.__getitem__))
        else:
            graph.output(tuple(env[node] for node in self.crossing(stop)))
        graph.lint()
        return fx.GraphModule(self.module, graph)

    def build(self, cuts: Sequence[int]) -> list[Stage]:
        bounds = [0, *cuts, len(self.nodes) - 1]  # the output node ends the last stage
        stages = []
        for number, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
            body = self.nodes[start:stop]
            code = self._code(start, stop, last=number == len(bounds) - 2)
            used = {n.target for n in body if n.op == "call_module"}
            params = {id(attr) for n in body if n.op == "get_attr"
                      for attr in [_fetch(self.module, n.target)] if isinstance(attr, torch.Tensor)}
            names = [n.target for n in body if n.op in ("call_module", "get_attr")]
            label = names[0] if names else body[0].name
            stages.append(Stage(name=str(label), fn=code if start == 0 else _Unpack(code),
                                modules=tuple(sorted(used)), parameters=frozenset(params),
                                patch=self._patch(start, stop)))
        return stages

    def _patch(self, start: int, stop: int) -> Optional[ChannelPatch]:
        """A :class:`ChannelPatch` if nodes ``start .. stop - 1`` are a convolution and channel-wise operations."""
        outputs = self.crossing(stop)
        if start == 0:  # the placeholder feeds the convolution; only the region's output crosses the cut
            conv, inputs, source = 1, [], None
            if stop < 2 or self.nodes[1].args != (self.nodes[0],):
                return None
        else:
            conv, inputs = start, self.crossing(start)
            if not self.nodes[conv].args or self.nodes[conv].args[0] not in inputs:
                return None
            source = inputs.index(self.nodes[conv].args[0])
        node = self.nodes[conv]
        if not self._is_conv_call(node):
            return None
        end, steps, flatten = self._region(conv, lambda other: inputs.index(other) if other in inputs else None, stop)
        final = self.nodes[end - 1]
        if end != stop:
            return None
        if stop == len(self.nodes) - 1:  # the last stage returns the model's output itself
            if self.nodes[-1].args[0] is not final:
                return None
            return ChannelPatch(self.modules[node.target], source=source, steps=tuple(steps), flatten=flatten)
        if final not in outputs or any(o is not final and o not in inputs for o in outputs):
            return None
        layout = tuple(None if o is final else inputs.index(o) for o in outputs)
        return ChannelPatch(self.modules[node.target], source=source, steps=tuple(steps), flatten=flatten,
                            layout=layout)


class _Unpack:
    """Call a stage graph with the crossing values as separate arguments."""

    def __init__(self, code: nn.Module):
        self.code = code

    def __call__(self, state: tuple) -> Any:
        return self.code(*state)


def _fetch(module: nn.Module, target: str) -> Any:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


# ---------------------------------------------------------------------------- entry point
def _declared(module: nn.Module, items: Sequence[Any]) -> list[Stage]:
    stages = []
    for position, item in enumerate(items):
        if isinstance(item, Stage):
            stages.append(item)
        elif isinstance(item, nn.Module):
            stages.append(Stage(name=f"stage{position}:{type(item).__name__}", fn=item))
        elif callable(item):
            stages.append(Stage(name=f"stage{position}", fn=item))
        else:
            raise ValueError(f"stage #{position} {item!r} is not valid; use a Stage, a module or a callable")
    return stages


def _auto_split(module: nn.Module, quantized: set[str], sample: Any) -> StageSplit:
    """Try fx, then Sequential; drop cuts that fail the in-place check; verify the output."""
    builders: list[Any] = []
    if not _has_hooks(module):
        try:
            builders.append(_FxBuilder(module, quantized))
        except Exception:  # noqa: BLE001 - any tracing failure means "not traceable"
            pass
        if type(module) is nn.Sequential:
            builders.append(_SequentialBuilder(module, quantized))
    for builder in builders:
        cuts = list(builder.candidates)
        while True:
            split = StageSplit(builder.build(cuts), builder.kind, module)
            if sample is None:
                return split
            identical, mutated = split.check(module, sample)
            if not identical:
                break
            if not mutated:
                return split
            dropped = {cuts[index - 1] for index in mutated}
            cuts = [cut for cut in cuts if cut not in dropped]
    if builders:
        warnings.warn(f"{type(module).__name__}: no stage split reproduces the forward pass bit for bit; "
                      "evaluating it as a single stage (no reuse of activations)", stacklevel=3)
    return StageSplit([Stage(name="model", fn=module)], "single", module)


def split_model(module: nn.Module, stages: StageSpec = "auto", *, quantized: Iterable[str] = (),
                sample: Any = None) -> StageSplit:
    """Split ``module`` into stages.

    ``stages``: ``"auto"`` (registered splitter, else ``torch.fx``, else ``nn.Sequential``
    children, else a single stage), ``"single"`` or ``None`` (one stage), or a user-declared
    list of :class:`Stage` / modules / callables applied in order. ``quantized`` names the
    modules whose weights may change: automatic splits cut right before them. ``sample`` (one
    input batch) is used to verify the split; see the module docstring.
    """
    quantized = set(quantized)
    if stages is None or stages == "single":
        return StageSplit([Stage(name="model", fn=module)], "single", module)
    if isinstance(stages, str):
        if stages != "auto":
            raise ValueError(f"stages={stages!r} is not valid; use 'auto', 'single', None or a list of stages")
        splitter = SPLITTERS.get(type(module))
        if splitter is None:
            return _auto_split(module, quantized, sample)
        split = StageSplit(_declared(module, splitter(module)), "registered", module)
    else:
        if isinstance(stages, (nn.Module, Stage)) or not isinstance(stages, Sequence) or not stages:
            raise ValueError(f"stages={stages!r} is not valid; use 'auto', 'single', None or a non-empty list "
                             "of stages")
        split = StageSplit(_declared(module, stages), "declared", module)
    if sample is not None:
        identical, mutated = split.check(module, sample)
        if mutated:
            names = ", ".join(repr(split.stages[i].name) for i in mutated)
            raise ValueError(f"the declared stages modify their input in place (inputs of stage(s) {names}); "
                             "cached activations would be corrupted: make those operations out of place")
        if not identical:
            raise ValueError("the declared stages do not reproduce the model's forward pass bit for bit; "
                             "check that they apply the model's own modules in the order of its forward()")
    return split
