"""Offline model recipes with an on-disk cache (importing :mod:`.vision` registers the vision recipes)."""

from .cache import cache_dir
from .recipes import RECIPES, Recipe, ZooModel, digits_cnn, load_model, register_recipe
from .vision import DigitsAutoencoder, digits_detector, digits_resnet, digits_vgg

__all__ = ["RECIPES", "Recipe", "ZooModel", "cache_dir", "digits_cnn", "load_model", "register_recipe",
           "digits_vgg", "digits_resnet", "DigitsAutoencoder", "digits_detector"]
