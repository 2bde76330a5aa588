"""The CIFAR ResNet family of He et al. (2016): depth 6n+2 (20, 32, 44, 56, ...), "option A" shortcuts.

Layout (the same state-dict keys as the widely used pretrained CIFAR-10 checkpoints): ``conv1``
(3x3, 16 channels, no bias), ``bn1``, ReLU; three stages ``layer1..layer3`` of n
:class:`BasicBlock` with 16, 32 and 64 channels (stride 2 at the first block of stages 2 and 3);
each block is ``conv1``/``bn1``/ReLU/``conv2``/``bn2`` plus the shortcut, then ReLU. The option-A
shortcut is the identity or, where the shape changes, the input subsampled by 2 in space and
zero-padded in channels: it has no parameters. Then global average pooling and ``linear``.

:class:`CifarResNet` can normalise its input itself (``mean``/``std`` as non-persistent buffers,
so the state-dict keys stay the checkpoint's): the zoo recipes feed it images in ``[0, 1]``.
Torch only; the forward pass traces with ``torch.fx``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CifarResNet", "BasicBlock", "OptionAShortcut", "cifar_resnet", "depth_of_state_dict",
           "load_cifar_resnet_state", "load_cifar_resnet", "CIFAR_RESNET_DEPTHS", "CIFAR10_MEAN", "CIFAR10_STD"]

#: The depths with published CIFAR-10 checkpoints (any 6n+2 >= 8 can be built).
CIFAR_RESNET_DEPTHS = (20, 32, 44, 56, 110)
#: Input normalisation of the common pretrained CIFAR-10 checkpoints (ImageNet statistics).
CIFAR10_MEAN = (0.485, 0.456, 0.406)
CIFAR10_STD = (0.229, 0.224, 0.225)


class OptionAShortcut(nn.Module):
    """Subsample by 2 in space and zero-pad the channels from ``planes // 2`` to ``planes`` (no parameters)."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers and an option-A shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = (OptionAShortcut(planes) if stride != 1 or in_planes != planes
                                    else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _check_depth(depth: object) -> int:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth={depth!r} is not a CIFAR ResNet depth; use 6n+2 with n >= 1, "
                         f"e.g. {', '.join(map(str, CIFAR_RESNET_DEPTHS))}")
    return depth


class CifarResNet(nn.Module):
    """CIFAR ResNet-``depth`` (``depth = 6n + 2``) with option-A shortcuts, for 3x32x32 inputs.

    With ``mean``/``std`` the input is normalised first (``(x - mean) / std`` per channel); they are
    non-persistent buffers, so the state dict has exactly the checkpoint layout.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None):
        super().__init__()
        self.depth = _check_depth(depth)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes={num_classes!r} is not valid; use a positive integer")
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std to normalise the input, or neither")
        self.normalize = mean is not None
        if mean is not None and std is not None:
            if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
                raise ValueError(f"mean={mean!r}, std={std!r} are not valid; use three values each, std > 0")
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, blocks, 1)
        self.layer2 = self._stage(16, 32, blocks, 2)
        self.layer3 = self._stage(32, 64, blocks, 2)
        self.linear = nn.Linear(64, num_classes)
        for module in self.modules():  # the reference implementation's initialisation
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            x = (x - self.mean) / self.std
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def cifar_resnet(depth: int = 20, num_classes: int = 10, normalize: bool = True) -> CifarResNet:
    """CIFAR ResNet-``depth``; with ``normalize`` it takes ``[0, 1]`` images and applies the CIFAR-10
    checkpoints' normalisation (:data:`CIFAR10_MEAN`, :data:`CIFAR10_STD`) itself."""
    if normalize:
        return CifarResNet(depth, num_classes, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    return CifarResNet(depth, num_classes)


_BLOCK_KEY = re.compile(r"^layer([123])\.(\d+)\.")


def depth_of_state_dict(state: Mapping[str, torch.Tensor]) -> Optional[int]:
    """The depth 6n+2 implied by a CIFAR ResNet state dict (n = blocks in ``layer1``), or ``None``
    if the keys do not have the CIFAR ResNet layout or the three stages differ in length."""
    blocks: dict[str, set[int]] = {"1": set(), "2": set(), "3": set()}
    for key in state:
        match = _BLOCK_KEY.match(key)
        if match:
            blocks[match.group(1)].add(int(match.group(2)))
    counts = {stage: len(found) for stage, found in blocks.items()}
    if not counts["1"] or len(set(counts.values())) != 1 or blocks["1"] != set(range(counts["1"])):
        return None
    return 6 * counts["1"] + 2


def load_cifar_resnet_state(model: CifarResNet, state: Mapping[str, torch.Tensor], source: str = "state_dict"
                            ) -> CifarResNet:
    """Load ``state`` into ``model`` strictly, with a one-line error naming ``source`` on any mismatch.

    A ``module.`` prefix (DataParallel) is dropped, and missing BatchNorm ``num_batches_tracked``
    counters (older checkpoints) are allowed. A checkpoint of another depth is refused with the
    depth it holds.
    """
    state = dict(state)
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    found = depth_of_state_dict(state)
    if found is None:
        raise ValueError(f"{source} is not a CIFAR ResNet checkpoint: its keys lack the layout conv1, bn1, "
                         f"layer1..layer3.B.conv1/bn1/conv2/bn2, linear (e.g. {next(iter(state), 'no keys')!r})")
    if found != model.depth:
        raise ValueError(f"{source} holds a CIFAR ResNet-{found} ({(found - 2) // 6} blocks per stage), not the "
                         f"ResNet-{model.depth} asked for; use weights of depth {model.depth} or the depth-{found} model")
    own = model.state_dict()
    optional = {key for key in own if key.endswith("num_batches_tracked")}
    missing = [key for key in own if key not in state and key not in optional]
    unexpected = [key for key in state if key not in own]
    wrong = [key for key in own if key in state and tuple(own[key].shape) != tuple(state[key].shape)]
    if missing or unexpected or wrong:
        details = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                   f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
                   f"{len(wrong)} of another shape (e.g. {wrong[0]}: file {tuple(state[wrong[0]].shape)}, model "
                   f"{tuple(own[wrong[0]].shape)})" if wrong else ""]
        raise ValueError(f"{source} does not fit CIFAR ResNet-{model.depth}: " + ", ".join(d for d in details if d))
    for key in optional:
        state.setdefault(key, own[key])
    model.load_state_dict(state)
    return model.eval()


def load_cifar_resnet(path: Union[str, os.PathLike], depth: Optional[int] = None, num_classes: Optional[int] = None,
                      normalize: bool = True) -> CifarResNet:
    """A CIFAR ResNet with the weights in the local file ``path`` (a state dict, or a checkpoint holding
    one under ``state_dict``; read with ``weights_only=True``). ``depth`` defaults to the file's own;
    a file of another depth than ``depth`` is refused. Nothing is downloaded."""
    from .vision import read_state_dict

    state = read_state_dict(path)
    source = f"weights file {str(path)!r}"
    if depth is None:
        depth = depth_of_state_dict(state)
        if depth is None:
            load_cifar_resnet_state(CifarResNet(20), state, source)  # raises the layout error
    assert depth is not None
    if num_classes is None:
        linear = state.get("linear.weight")
        num_classes = int(linear.shape[0]) if isinstance(linear, torch.Tensor) and linear.ndim == 2 else 10
    return load_cifar_resnet_state(cifar_resnet(depth, num_classes, normalize), state, source)
