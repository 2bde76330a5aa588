"""Offline model recipes with an on-disk cache (importing :mod:`.vision` and :mod:`.real` registers their recipes)."""

from .cache import cache_dir
from .cifar_resnet import CifarResNet, cifar_resnet, load_cifar_resnet
from .loading import load_float_model
from .real import lenet5
from .recipes import (
           RECIPES,
           ModelSpecError,
           Recipe,
           ZooModel,
           digits_cnn,
           get_recipe,
           load_model,
           register_recipe,
)
from .vision import DigitsAutoencoder, digits_detector, digits_resnet, digits_vgg

__all__ = ["RECIPES", "Recipe", "ZooModel", "ModelSpecError", "cache_dir", "digits_cnn", "get_recipe", "load_model",
           "register_recipe", "digits_vgg", "digits_resnet", "DigitsAutoencoder", "digits_detector", "CifarResNet",
           "cifar_resnet", "load_cifar_resnet", "lenet5", "load_float_model"]
