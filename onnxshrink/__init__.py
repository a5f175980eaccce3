"""onnxshrink: make ONNX models smaller and faster, and prove they still behave.

The public API is what `__all__` lists; everything else may change between versions.
"""

from onnxshrink._version import __version__
from onnxshrink.api import compress, validate
from onnxshrink.errors import OnnxShrinkError
from onnxshrink.recipe import Recipe, load_recipe
from onnxshrink.report import RunReport

__all__ = [
    "OnnxShrinkError",
    "Recipe",
    "RunReport",
    "__version__",
    "compress",
    "load_recipe",
    "validate",
]
