"""Vision recipes beyond digits-cnn: torchvision VGG and ResNet classifiers, a convolutional
autoencoder, and a torchvision FCOS detector -- all small enough to train offline on a CPU.

Importing this module registers ``digits-vgg``, ``digits-resnet``, ``digits-autoencoder`` and
``digits-detector`` with :func:`deap_quant.zoo.recipes.register_recipe`. Training is seeded and
single-threaded (repeatable), and the trained weights are cached like ``digits-cnn``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import Splits, digits
from ..data.detection import CanvasPainter, digit_canvases
from ..evaluation.metrics import Metric
from ..evaluation.tasks import DetectionMAP, ReconstructionError, evaluate_module
from .recipes import Recipe, digits_classifier_recipe, register_recipe
from .training import train_supervised

if TYPE_CHECKING:  # torchvision is imported when a model is built, not when the recipes register
    from torchvision.models import VGG, ResNet
    from torchvision.models.detection import FCOS

__all__ = ["digits_vgg", "digits_resnet", "DigitsAutoencoder", "digits_detector", "autoencoder_splits",
           "train_autoencoder", "train_detector", "train_digits_detector", "metric_score",
           "read_state_dict", "load_weights", "torchvision_model", "VGG_CONFIG"]

DetectionPair = tuple[torch.Tensor, list[dict[str, torch.Tensor]]]

#: Channels per 3x3 conv (``"M"`` = 2x2 max-pool), torchvision's ``make_layers`` notation: 8x8 -> 1x1.
VGG_CONFIG: list[Union[int, str]] = [32, 32, "M", 64, 64, "M", 128, "M"]


def _single_threaded(train: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Run ``train`` with one torch thread (a repeatable reduction order), then restore the setting."""
    def wrapped(*args: Any, **kwargs: Any) -> nn.Module:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return train(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    wrapped.__name__ = train.__name__
    wrapped.__doc__ = train.__doc__
    return wrapped


# ---------------------------------------------------------------------------------------------- models
def digits_vgg(num_classes: int = 10, config: Sequence[Union[int, str]] = tuple(VGG_CONFIG)) -> VGG:
    """A torchvision :class:`~torchvision.models.VGG` for 1x8x8 digits.

    The feature stack comes from torchvision's ``make_layers(config, batch_norm=True)`` (3x3 conv +
    BatchNorm + ReLU, 2x2 max-pool) with its first conv taking one channel; the ImageNet head
    (7x7 pooling, two 4096-wide layers) is swapped for global pooling and a 64-unit classifier.
    """
    from torchvision.models.vgg import VGG, make_layers

    features = make_layers(list(config), batch_norm=True)
    first = features[0]
    features[0] = nn.Conv2d(1, first.out_channels, kernel_size=3, padding=1)
    width = [v for v in config if v != "M"][-1]
    with torch.device("meta"):  # VGG's own 100M-weight ImageNet head is replaced below; never allocate it
        model = VGG(nn.Identity(), num_classes=num_classes, init_weights=False)
    model.features = features
    model.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    model.classifier = nn.Sequential(nn.Linear(width, 64), nn.ReLU(True), nn.Dropout(p=0.2),
                                     nn.Linear(64, num_classes))
    for module in model.modules():  # VGG's initialisation
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0, 0.01)
            nn.init.zeros_(module.bias)
    return model


def digits_resnet(num_classes: int = 10, widths: Sequence[int] = (16, 32, 64, 128)) -> ResNet:
    """A torchvision :class:`~torchvision.models.ResNet` with one :class:`BasicBlock` per stage.

    ResNet's stages are rebuilt narrower with its own ``_make_layer`` (``widths`` instead of
    64..512), and the 7x7/2 stem plus max-pool becomes a 3x3/1 conv, which suits 8x8 inputs
    (stages at 8x8, 4x4, 2x2, 1x1).
    """
    if len(widths) != 4 or not all(isinstance(w, int) and w > 0 for w in widths):
        raise ValueError(f"widths={widths!r} is not valid; use four positive integers")
    from torchvision.models.resnet import BasicBlock, ResNet

    with torch.device("meta"):  # the 64..512 stages are rebuilt narrower below
        model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)
    model.inplanes = widths[0]
    model.conv1 = nn.Conv2d(1, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
    model.bn1 = nn.BatchNorm2d(widths[0])
    model.maxpool = nn.Identity()
    model.layer1 = model._make_layer(BasicBlock, widths[0], 1)
    model.layer2 = model._make_layer(BasicBlock, widths[1], 1, stride=2)
    model.layer3 = model._make_layer(BasicBlock, widths[2], 1, stride=2)
    model.layer4 = model._make_layer(BasicBlock, widths[3], 1, stride=2)
    model.fc = nn.Linear(widths[3] * BasicBlock.expansion, num_classes)
    for module in model.modules():  # ResNet's initialisation (plus PyTorch's default for fc)
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    model.fc.reset_parameters()
    return model


class DigitsAutoencoder(nn.Module):
    """Convolutional autoencoder for 1x8x8 digits with a ``latent``-wide code (16 of 64 pixels by default).

    Encoder: 3x3 conv (16) -> 3x3/2 conv (32, 4x4) -> linear code. Decoder: linear -> 4x4/2
    transposed conv (16, 8x8) -> 3x3 conv -> sigmoid, so outputs lie in [0, 1] like the inputs.
    """

    def __init__(self, latent: int = 16):
        super().__init__()
        self.encoder = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(1, 16, 3, padding=1)), ("relu1", nn.ReLU()),
            ("conv2", nn.Conv2d(16, 32, 3, stride=2, padding=1)), ("relu2", nn.ReLU()),
            ("flatten", nn.Flatten()), ("code", nn.Linear(32 * 4 * 4, latent)),
        ]))
        self.decoder = nn.Sequential(OrderedDict([
            ("expand", nn.Linear(latent, 32 * 4 * 4)), ("relu1", nn.ReLU()),
            ("unflatten", nn.Unflatten(1, (32, 4, 4))),
            ("deconv", nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1)), ("relu2", nn.ReLU()),
            ("conv", nn.Conv2d(16, 1, 3, padding=1)), ("sigmoid", nn.Sigmoid()),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def digits_detector(num_classes: int = 10, image_size: int = 64, width: int = 64) -> FCOS:
    """A torchvision :class:`~torchvision.models.detection.FCOS` detector for digit canvases.

    Backbone: four 3x3 conv + BatchNorm + ReLU layers (strides 2, 2, 2, 1) giving one stride-8
    feature map of ``width`` channels; FCOS head with two conv layers (GroupNorm) per branch; one
    anchor point per feature cell. No pretrained weights anywhere.
    """
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.fcos import FCOSHead

    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    backbone = nn.Sequential(*block(1, 16, 2), *block(16, 32, 2), *block(32, width, 2), *block(width, width, 1))
    backbone.out_channels = width
    return FCOS(backbone, num_classes=num_classes, min_size=image_size, max_size=image_size,
                image_mean=[0.1], image_std=[0.25],
                anchor_generator=AnchorGenerator(sizes=((8,),), aspect_ratios=((1.0,),)),
                head=FCOSHead(width, 1, num_classes, num_convs=2),
                score_thresh=0.2, nms_thresh=0.5, detections_per_img=20, topk_candidates=100)


# ---------------------------------------------------------------------------------------------- data
def autoencoder_splits(seed: int = 0) -> Splits:
    """The digits splits with each image as its own target (``(x, x)`` pairs)."""
    source = digits(seed)
    return Splits((source.train[0], source.train[0]), (source.val[0], source.val[0]),
                  (source.test[0], source.test[0]), num_classes=0, name="digits-autoencoder")


# ---------------------------------------------------------------------------------------------- training
def train_autoencoder(model: nn.Module, train: tuple[torch.Tensor, torch.Tensor], *, epochs: int = 80,
                      lr: float = 3e-3, batch_size: int = 64, seed: int = 0) -> nn.Module:
    """Adam with a cosine schedule on the mean squared reconstruction error; seeded, one thread."""
    return train_supervised(model, train, F.mse_loss, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)


@_single_threaded
def train_detector(model: nn.Module, train: Union[DetectionPair, Callable[[int], DetectionPair]], *,
                   epochs: int = 16, lr: float = 2e-3, batch_size: int = 32, seed: int = 0) -> nn.Module:
    """AdamW with warm-up and a cosine schedule on the detector's own training losses (FCOS: focal
    classification, GIoU box regression, centerness); seeded, one thread.

    ``train`` is a fixed ``(images, targets)`` pair, or a function ``epoch -> (images, targets)``
    that supplies fresh data every epoch (same number of images each time).
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    data_for = train if callable(train) else (lambda epoch: train)
    images, targets = data_for(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    per_epoch = (len(images) + batch_size - 1) // batch_size
    steps = max(epochs * per_epoch, 1)
    warmup = min(per_epoch, steps // 4)
    # linear warm-up over the first epoch, then cosine decay
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(warmup, 1)) * 0.5 * (1 + torch.cos(
            torch.tensor(torch.pi * step / steps)).item()))
    model.train()
    for epoch in range(epochs):
        if epoch:
            images, targets = data_for(epoch)
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch_size):
            batch = order[start:start + batch_size].tolist()
            optimizer.zero_grad(set_to_none=True)
            losses = model([images[i] for i in batch], [targets[i] for i in batch])
            sum(losses.values()).backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def train_digits_detector(model: nn.Module, splits: Splits, seed: int, epochs: int = 24) -> nn.Module:
    """Train on ``splits.train`` first, then on freshly painted canvases of the same *train* digit
    images every epoch (more layouts, never a val or test digit)."""
    source = digits(seed).train
    painter = CanvasPainter(source[0], source[1])
    rng = np.random.default_rng([seed, 0x7EA1])
    count = len(splits.train[1])
    return train_detector(model, lambda epoch: painter.paint(count, rng) if epoch else splits.train,
                          epochs=epochs, seed=seed)


def metric_score(metric: Callable[[], Metric]) -> Callable[[nn.Module, Any], float]:
    """A recipe ``score`` function: the headline value of a fresh ``metric()`` on the data."""
    def score(model: nn.Module, data: Any) -> float:
        fresh = metric()
        return evaluate_module(model, data, fresh)[fresh.name]
    return score


register_recipe(digits_classifier_recipe(
    "digits-vgg", digits_vgg, epochs=30,
    description="torchvision VGG (make_layers 32-32-M-64-64-M-128-M with BatchNorm) on 8x8 digits, ~140k weights"))

register_recipe(digits_classifier_recipe(
    "digits-resnet", digits_resnet, epochs=30,
    description="torchvision ResNet with BasicBlock [1,1,1,1], widths 16-128, 3x3 stem, on 8x8 digits, ~300k weights"))

register_recipe(Recipe(
    name="digits-autoencoder",
    build=DigitsAutoencoder,
    data=autoencoder_splits,
    train=lambda model, splits, seed: train_autoencoder(model, splits.train, seed=seed),
    score=metric_score(ReconstructionError),
    metric=ReconstructionError,
    description="convolutional autoencoder, 8x8 digits through a 16-wide code; fitness -MSE, PSNR reported",
))

register_recipe(Recipe(
    name="digits-detector",
    build=digits_detector,
    data=lambda seed: digit_canvases(seed),
    train=train_digits_detector,
    score=metric_score(DetectionMAP),
    metric=DetectionMAP,
    description="torchvision FCOS with a 4-conv BatchNorm backbone on 64x64 canvases of 1-4 real digits; "
                "fitness mAP@0.5, mAP@[.5:.95] reported",
))


# ---------------------------------------------------------------------------------------------- users' weights
def read_state_dict(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """The state_dict in a local file: a plain ``torch.save(model.state_dict())``, or a checkpoint dict
    holding it under ``state_dict``/``model``; a DataParallel ``module.`` prefix is dropped."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"weights file {str(file)!r} does not exist")
    try:
        content = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"weights file {str(file)!r} is not a readable state_dict ({type(error).__name__}: "
                         f"{error})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(content, dict) and isinstance(content.get(key), dict):
            content = content[key]
            break
    if not isinstance(content, dict) or not all(isinstance(v, torch.Tensor) for v in content.values()):
        raise ValueError(f"weights file {str(file)!r} holds a {type(content).__name__}, not a state_dict of tensors")
    if content and all(key.startswith("module.") for key in content):
        content = {key[len("module."):]: value for key, value in content.items()}
    return content


def load_weights(model: nn.Module, path: Union[str, Path]) -> nn.Module:
    """Load the state_dict in ``path`` into ``model`` (strictly), with a one-line error on any mismatch."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    wrong = [key for key in own if key in state and own[key].shape != state[key].shape]
    if missing or unexpected or wrong:
        details = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                   f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
                   f"{len(wrong)} of another shape (e.g. {wrong[0]}: file {tuple(state[wrong[0]].shape)}, model "
                   f"{tuple(own[wrong[0]].shape)})" if wrong else ""]
        raise ValueError(f"weights {str(path)!r} do not fit {type(model).__name__}: "
                         + ", ".join(d for d in details if d))
    model.load_state_dict(state)
    return model.eval()


def torchvision_model(name: str, weights: Union[str, Path], num_classes: Optional[int] = None) -> nn.Module:
    """A torchvision architecture (``torchvision.models.get_model(name)``) with the weights in a local file.

    Nothing is downloaded: the model is built with ``weights=None`` (and ``weights_backbone=None`` for
    detection models) and then loaded from ``weights``. ``num_classes`` is taken from the file when the
    architecture's default does not fit (e.g. a resnet18 trained on 10 classes), else from the argument.
    """
    import inspect

    from torchvision import models

    available = models.list_models()
    if name not in available:
        close = [m for m in available if name.split("_")[0] in m][:8]
        raise ValueError(f"torchvision has no model {name!r}; e.g. {', '.join(close or available[:8])} "
                         f"(torchvision.models.list_models() lists all)")
    builder = models.get_model_builder(name)
    options: dict[str, Any] = {"weights": None}
    if "weights_backbone" in inspect.signature(builder).parameters:
        options["weights_backbone"] = None
    if num_classes is not None:  # the data's class count is the likeliest fit: try it first
        try:
            return load_weights(builder(**options, num_classes=num_classes), weights)
        except (ValueError, TypeError):
            pass
    default = builder(**options)
    error: Optional[Exception] = None
    for classes in [None, *_class_counts_in(default.state_dict(), read_state_dict(weights))]:
        if classes == num_classes and classes is not None:
            continue
        try:
            return load_weights(default if classes is None else builder(**options, num_classes=classes), weights)
        except ValueError as failure:
            error = error or failure
    assert error is not None
    raise error


def _class_counts_in(default: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> list[int]:
    """Class counts the file may imply: the leading size ``n`` of the first tensor whose shape differs from
    the default model's only there, and ``n / a`` for anchor counts ``a`` (detection heads emit anchors x classes)."""
    for key, tensor in default.items():
        theirs = state.get(key)
        if theirs is not None and theirs.shape != tensor.shape and tensor.ndim >= 1 and theirs.shape[1:] == tensor.shape[1:]:
            size, default_size = int(theirs.shape[0]), int(tensor.shape[0])
            return [size] + [size // a for a in range(2, 17) if size % a == 0 and default_size % a == 0][:5]
    return []
