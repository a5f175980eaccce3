"""Pipeline: selection, empty-match handling, error wrapping, per-step reports."""

from __future__ import annotations

from pathlib import Path

import pytest

from onnxshrink import pipeline
from onnxshrink.errors import PassError, RuleError
from onnxshrink.ir import io
from onnxshrink.passes.base import Context
from onnxshrink.recipe.loader import parse_recipe
from tests.conftest import SAMPLES


def _execute(steps: list[dict], model: str = "cnn") -> list:
    loaded = io.load(SAMPLES / f"{model}.onnx")
    plan = pipeline.plan(parse_recipe({"step": steps}))
    ctx = Context(model_path=SAMPLES / f"{model}.onnx", opset=loaded.info.opset)
    return pipeline.execute(plan, loaded.graph, ctx)


def test_selection_limits_what_a_step_touches() -> None:
    only_bn = _execute([{"pass": "graph.cleanup",
                         "select": {"op_types": ["BatchNormalization"],
                                    "exclude_names": ["stem.*"]}}])
    report = only_bn[0]
    assert report.selected == 5
    assert report.touched and not any(name.startswith("stem") for name in report.touched)
    assert report.weight_bytes_after < report.weight_bytes_before


def test_empty_selection_is_a_warning_or_an_error() -> None:
    reports = _execute([{"pass": "graph.cleanup", "select": {"names": ["nothing.*"]}}])
    assert reports[0].warnings == ["selected no nodes"]
    with pytest.raises(RuleError, match="selected no nodes"):
        _execute([{"pass": "graph.cleanup", "select": {"names": ["nothing.*"]},
                   "require_match": True}])


def test_min_params_selects_only_big_layers() -> None:
    reports = _execute([{"pass": "graph.cleanup", "select": {"min_params": 4000}}])
    assert reports[0].selected == 3  # the three convolutions with >= 4000 weights


def test_pass_failures_name_step_and_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxshrink.passes.graph_cleanup import CleanupGraphPass

    def boom(self, graph, targets, ctx):  # a pass bug, as the pipeline would meet it
        raise ValueError("broken weights")

    monkeypatch.setattr(CleanupGraphPass, "run", boom)
    with pytest.raises(PassError, match=r"step 1:graph.cleanup on cnn.onnx: ValueError: broken"):
        _execute([{"pass": "graph.cleanup"}])


def test_reports_are_json_ready(tmp_path: Path) -> None:
    import json

    from onnxshrink import compress

    report = compress(SAMPLES / "control_flow.onnx", "lossless", tmp_path / "o.onnx",
                      samples=SAMPLES / "control_flow.npz")
    text = json.dumps(report.to_dict(), allow_nan=False)
    assert '"pass_name": "graph.cleanup"' in text
