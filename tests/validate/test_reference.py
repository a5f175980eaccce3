"""The original's outputs are computed once per run and every guard judges against them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from onnxshrink import api, runtime
from onnxshrink.validate.reference import Reference
from tests.conftest import SAMPLES
from tests.passes.quant_support import compress, worst_cosine


@pytest.mark.ort
def test_a_guard_holds_the_tolerance_against_the_original_not_the_step_before(
    tmp_path: Path,
) -> None:
    # 4-bit weights on the classifier's Gemm alone already break cosine 0.9; measured against
    # that step's output, the convolutions' int8 would pass, against the original nothing can
    lossy = {"pass": "quant.weight_only", "params": {"bits": 4}}
    alone = compress("cnn", [lossy], tmp_path / "a.onnx")
    assert worst_cosine(alone) < 0.9
    guarded = {"pass": "quant.qdq", "params": {"guard": "accuracy"}}
    relative = compress("cnn", [guarded], tmp_path / "r.onnx")
    assert relative.steps[0].touched  # int8 on its own holds 0.9 on this model
    assert worst_cosine(relative) >= 0.9

    report = compress("cnn", [lossy, guarded], tmp_path / "b.onnx", min_cosine=0.9)

    guard = report.steps[1].stats["guard"]
    assert "tolerance not met" in guard["gave_up"]
    assert not report.steps[1].touched


@pytest.mark.ort
def test_the_original_runs_once_for_the_guards_and_validation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    float_runs: list[str] = []  # sessions on the float model (calibration's has more outputs)
    real = runtime.session

    def recorded(model: Any, **kwargs: Any) -> Any:
        if not isinstance(model, bytes):  # bytes: the arena's release model, one Relu
            proto = onnx.load(os.fspath(model), load_external_data=False)
            ops = {n.op_type for n in proto.graph.node}
            if len(proto.graph.output) == 1 and not any("Quantize" in op for op in ops):
                float_runs.append(os.fspath(model))
        return real(model, **kwargs)

    monkeypatch.setattr(runtime, "session", recorded)
    steps = [{"pass": "quant.qdq", "params": {"guard": "accuracy"}}]
    report = compress("cnn", steps, tmp_path / "o.onnx", min_cosine=0.99)

    assert report.ok and report.numerics is not None
    assert report.steps[0].stats["guard"]["evaluations"] >= 1  # the guard judged candidates
    assert float_runs == [str(SAMPLES / "cnn.onnx")]


@pytest.mark.ort
def test_reference_aligns_to_the_names_a_graph_asks_for(tmp_path: Path) -> None:
    from onnxshrink.ir import io

    model = SAMPLES / "mlp.onnx"
    loaded = io.load(model)
    feeds = api.load_feeds(loaded.proto, loaded.graph, SAMPLES / "mlp.npz", api._recipe(None))
    ref = Reference(model, feeds)
    names, outputs = ref.outputs()
    got = ref.aligned(2, list(reversed(names)))
    assert got is not None and len(got) == 2
    for values, full in zip(got, outputs):
        for value, expected in zip(values, reversed(full)):
            np.testing.assert_array_equal(value, expected)
    assert ref.aligned(1, ["not-an-output"]) is None
    assert ref.aligned(len(outputs) + 1, names) is None
