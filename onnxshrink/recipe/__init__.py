"""Recipes: typed schema, strict TOML loader, node selection."""

from onnxshrink.recipe.loader import load_recipe, parse_recipe
from onnxshrink.recipe.schema import Recipe, Selector, Step, Tolerance, ValidationSpec

__all__ = [
    "Recipe",
    "Selector",
    "Step",
    "Tolerance",
    "ValidationSpec",
    "load_recipe",
    "parse_recipe",
]
