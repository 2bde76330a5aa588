"""Offline model recipes with an on-disk cache."""

from .cache import cache_dir
from .recipes import RECIPES, Recipe, ZooModel, digits_cnn, load_model, register_recipe

__all__ = ["RECIPES", "Recipe", "ZooModel", "cache_dir", "digits_cnn", "load_model", "register_recipe"]
