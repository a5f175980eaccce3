"""quant.dynamic: the standard-op pattern that onnxruntime fuses into DynamicQuantizeMatMul."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import numpy_helper

from onnxshrink import api
from onnxshrink.recipe.loader import parse_recipe
from tests.graphs import save_graph
from tests.kernels.test_saturation import int8_kernels_saturate
from tests.passes.quant_support import compress, fused_ops, worst_cosine

CLEANUP = {"pass": "graph.cleanup"}

#: model -> (minimum cosine, fused op types that must appear, op types that must not)
EXPECT = {
    "cnn": (0.97, {"DynamicQuantizeMatMul": 1}, {"Gemm", "FusedGemm"}),
    "mlp": (0.999, {"DynamicQuantizeMatMul": 3}, {"Gemm", "FusedGemm", "MatMulInteger"}),
    "transformer": (
        0.999,
        {"DynamicQuantizeMatMul": 3, "MatMulIntegerToFloat": 3},
        {"MatMulInteger"},
    ),
    "fp16": (0.999, {"DynamicQuantizeMatMul": 2}, {"Gemm", "FusedGemm"}),
    "control_flow": (0.999999, {"If": 1}, {"DynamicQuantizeLinear"}),
}


@pytest.mark.ort
@pytest.mark.parametrize("model", sorted(EXPECT))
def test_sample_models_run_dynamic_int8_kernels(model: str, tmp_path: Path) -> None:
    min_cos, present, absent = EXPECT[model]
    out = tmp_path / f"{model}.onnx"
    report = compress(model, [CLEANUP, {"pass": "quant.dynamic"}], out)
    assert worst_cosine(report) >= min_cos
    ops = fused_ops(out)
    for op, count in present.items():
        assert ops[op] >= count, (op, dict(ops))
    assert not absent & set(ops), dict(ops)


@pytest.mark.ort
def test_shared_input_is_quantized_once(tmp_path: Path) -> None:
    report = compress("transformer", [CLEANUP, {"pass": "quant.dynamic"}], tmp_path / "t.onnx")
    stats = report.steps[1].stats
    # q, k and v read the same LayerNorm output: one DynamicQuantizeLinear for the three
    assert stats["quantized_matmuls"] == 6 and stats["shared_input_quantizers"] == 4
    reasons = {s["node"]: s["reason"] for s in report.steps[1].skipped}
    assert "activation x activation" in reasons["attn.qk"]


@pytest.mark.ort
def test_int8_weights_are_an_option(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    report = compress(
        "mlp", [CLEANUP, {"pass": "quant.dynamic", "params": {"weight_dtype": "int8"}}], out
    )
    assert worst_cosine(report) > 0.95
    assert fused_ops(out)["DynamicQuantizeMatMul"] == 3


@pytest.mark.ort
def test_reduced_range_weights_stay_within_7_bits(tmp_path: Path) -> None:
    """reduce_range: int8 weights in [-64, 63] even where MSE clipping cuts outliers, so that x86
    u8s8 kernels without VNNI cannot saturate their int16 pair sums (255 * 64 * 2 < 32768),
    still fused by onnxruntime."""
    out = tmp_path / "m.onnx"
    params = {"weight_dtype": "int8", "reduce_range": True, "weight_calibration": "mse"}
    report = compress("mlp", [CLEANUP, {"pass": "quant.dynamic", "params": params}], out)
    assert worst_cosine(report) > 0.95
    weights = [
        numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2  # not the zero points
    ]
    assert len(weights) == 3
    assert min(int(w.min()) for w in weights) >= -64 and max(int(w.max()) for w in weights) <= 63
    assert fused_ops(out)["DynamicQuantizeMatMul"] == 3


def _guarded(**params: object) -> dict[str, object]:
    return {"pass": "quant.dynamic", "params": {"smooth": True, "guard": "both", **params}}


@pytest.mark.ort
def test_guard_keeps_a_smoothed_result_within_tolerance_and_faster(tmp_path: Path) -> None:
    out = tmp_path / "t.onnx"
    # a ratio bound of 100 makes the timing pass on any machine: this test is about accuracy
    report = compress("transformer", [CLEANUP, _guarded(guard_max_latency_ratio=100.0)], out,
                      min_cosine=0.99)
    stats = report.steps[1].stats
    assert "gave_up" not in stats["guard"] and stats["guard"]["latency"]["ratio"] > 0
    assert stats["smooth"]["groups"] > 0 and stats["quantized_matmuls"] == 6
    assert worst_cosine(report) >= 0.99
    assert fused_ops(out)["DynamicQuantizeMatMul"] >= 3


@pytest.mark.ort
@pytest.mark.parametrize(
    ("params", "min_cosine", "why"),
    [
        ({"guard_max_latency_ratio": 100.0}, 0.99999999, "outside the tolerance"),
        ({"guard_max_latency_ratio": 0.001}, 0.0, "not faster than float"),
    ],
)
def test_guard_restores_the_unsmoothed_input_when_it_rejects(
    params: dict[str, float], min_cosine: float, why: str, tmp_path: Path
) -> None:
    out, plain = tmp_path / "t.onnx", tmp_path / "plain.onnx"
    report = compress("transformer", [CLEANUP, _guarded(**params)], out, min_cosine=min_cosine)
    compress("transformer", [CLEANUP], plain)
    step = report.steps[1]
    assert why in step.stats["guard"]["gave_up"]
    assert not step.touched and "smooth" not in step.stats
    assert sum(why in s["reason"] for s in step.skipped) >= 6  # every layer it had rewritten
    assert worst_cosine(report) > 0.999999  # the cleaned float graph, smoothing Muls undone
    assert fused_ops(out) == fused_ops(plain)


def _two_matmuls(tmp_path: Path) -> tuple[Path, Path]:
    """x feeds two MatMuls: one whose int8 codes are large and of one sign (u8s8 pair sums
    saturate on it), one with heavy-tailed weights (its codes are mostly small)."""
    rng = np.random.default_rng(0)
    k = 64
    x = gs.Variable("x", np.float32, ["n", k])
    crowded = gs.Constant("crowded", rng.uniform(0.7, 1.0, (k, 16)).astype(np.float32))
    spread = gs.Constant("spread", (rng.standard_t(2, (k, 16)) * 0.05).astype(np.float32))
    y1 = gs.Variable("y1", np.float32, ["n", 16])
    y2 = gs.Variable("y2", np.float32, ["n", 16])
    nodes = [
        gs.Node("MatMul", "crowded_mm", inputs=[x, crowded], outputs=[y1]),
        gs.Node("MatMul", "spread_mm", inputs=[x, spread], outputs=[y2]),
    ]
    model = save_graph(gs.Graph(nodes, [x], [y1, y2], opset=13), tmp_path / "two.onnx")
    samples = np.abs(rng.standard_normal((8, 32, k))).astype(np.float32) - 0.2
    np.savez(tmp_path / "two.npz", x=samples)
    return model, tmp_path / "two.npz"


def _run(model: Path, samples: Path, out: Path, dtype: str) -> Any:
    recipe = parse_recipe(
        {
            "recipe": {"name": "t"},
            "step": [{"pass": "quant.dynamic", "params": {"weight_dtype": dtype}}],
            "validate": {"tolerance": {"min_cosine": 0.0}},
        }
    )
    return api.compress(model, recipe, out, samples=samples)


@pytest.mark.ort
def test_auto_gives_7_bit_codes_only_where_int8_kernels_saturate(tmp_path: Path) -> None:
    model, samples = _two_matmuls(tmp_path)
    auto = _run(model, samples, tmp_path / "auto.onnx", "auto")
    stats = auto.steps[0].stats["saturation"]
    error = stats["relative_error"]
    crowded, spread = error["crowded_mm"], error["spread_mm"]
    assert crowded["int8_saturation"] > crowded["int8"] / 2  # saturation dominates there
    assert crowded["chosen"] < crowded["int8"] / 2
    # heavy-tailed weights: 7-bit doubles rounding error, so most columns stay 8-bit
    assert spread["int7"] > spread["int8"] and spread["chosen"] <= spread["int8"]
    assert 16 <= stats["int7_columns"] < 32
    graph = onnx.load(str(tmp_path / "auto.onnx")).graph
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    weights = {n.input[1]: values[n.input[1]] for n in graph.node if n.op_type == "MatMulInteger"}
    assert all(w.dtype == np.int8 for w in weights.values())  # the same u8s8 kernels
    assert sorted(int(np.abs(w).max()) for w in weights.values())[0] <= 64  # 7-bit columns
    assert fused_ops(tmp_path / "auto.onnx")["DynamicQuantizeMatMul"] + fused_ops(
        tmp_path / "auto.onnx"
    )["MatMulIntegerToFloat"] == 2

    int8 = _run(model, samples, tmp_path / "int8.onnx", "int8")
    cos = {o.name: o.cosine for o in auto.numerics.outputs}
    cos8 = {o.name: o.cosine for o in int8.numerics.outputs}
    if int8_kernels_saturate():  # this CPU has no VNNI: the 7-bit columns must do better
        assert cos["y1"] > cos8["y1"] and cos["y2"] >= cos8["y2"]
