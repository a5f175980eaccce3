"""The shipped quantization recipes hold their own [validate] tolerance on every sample model."""

from __future__ import annotations

from pathlib import Path

import pytest

from onnxshrink import api
from tests.conftest import SAMPLE_NAMES, SAMPLES


@pytest.mark.ort
@pytest.mark.parametrize("recipe", ["default", "lossless", "int8", "int8-dynamic", "int4-weights"])
@pytest.mark.parametrize("model", SAMPLE_NAMES)
def test_recipe_holds_its_tolerance(recipe: str, model: str, tmp_path: Path) -> None:
    out = tmp_path / f"{model}.onnx"
    report = api.compress(SAMPLES / f"{model}.onnx", recipe, out, samples=SAMPLES / f"{model}.npz")
    assert report.ok, [(o.name, o.failures) for o in report.numerics.outputs]
    assert out.exists()
    assert report.after is not None and report.after.weight_bytes <= report.before.weight_bytes
