"""Helpers shared by the quantization pass tests: one compress run, onnxruntime's fused graph."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import onnx

from onnxshrink import api, runtime
from onnxshrink.recipe.loader import parse_recipe
from onnxshrink.report import RunReport
from tests.conftest import SAMPLES


def compress(
    model: str,
    steps: list[dict[str, Any]],
    out: Path,
    *,
    min_cosine: float = 0.0,
    samples: int = 8,
) -> RunReport:
    """Compress a sample model with its shipped samples (validation on the same samples)."""
    recipe = parse_recipe(
        {
            "recipe": {"name": "test"},
            "step": steps,
            "validate": {"samples": samples, "tolerance": {"min_cosine": min_cosine}},
        }
    )
    return api.compress(
        SAMPLES / f"{model}.onnx", recipe, out, samples=SAMPLES / f"{model}.npz", keep_failed=True
    )


def fused_ops(path: Path, config: dict[str, str] | None = None) -> Counter[str]:
    """Op types of the graph onnxruntime really runs (optimized-model dump)."""
    dump = path.with_name(path.stem + ".optimized.onnx")
    runtime.session(path, optimized_path=dump, config=config)
    model = onnx.load(str(dump))
    dump.unlink()
    return Counter(n.op_type for n in model.graph.node)


def worst_cosine(report: RunReport) -> float:
    """The lowest cosine over every float output."""
    assert report.numerics is not None
    return min(o.cosine for o in report.numerics.outputs)
