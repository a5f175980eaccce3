"""quant.weight_only: DequantizeLinear -> MatMul that onnxruntime keeps packed as MatMulNBits."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from onnxshrink.passes.quant_weight_only import ACCURACY_CONFIG
from tests.passes.quant_support import compress, fused_ops, worst_cosine

CLEANUP = {"pass": "graph.cleanup"}
#: Small layers (the cnn head: 320 weights) gain nothing from 4 bits and are the sensitive ones.
BIG = {"min_params": 1024}

#: model -> (minimum cosine at int4, MatMulNBits count)
EXPECT = {"mlp": (0.97, 3), "transformer": (0.98, 6), "fp16": (0.99, 1), "cnn": (0.999999, 0)}


@pytest.mark.ort
@pytest.mark.parametrize("model", sorted(EXPECT))
def test_int4_blocked_runs_as_matmulnbits(model: str, tmp_path: Path) -> None:
    min_cos, count = EXPECT[model]
    out = tmp_path / f"{model}.onnx"
    step = {"pass": "quant.weight_only", "select": BIG, "params": {"bits": 4, "block_size": 32}}
    report = compress(model, [CLEANUP, step], out)
    assert worst_cosine(report) >= min_cos
    stats = report.steps[1].stats
    if count:
        # the validator must know what the fused kernel computes: the pass says it
        assert stats["session_config"] == {ACCURACY_CONFIG: "4"}
        assert "int8 activations" in stats["fused_compute"]
        ops = fused_ops(out, stats["session_config"])
        assert ops["MatMulNBits"] == count, dict(ops)
        assert "DequantizeLinear" not in ops  # every quantized weight is inside MatMulNBits
        proto = onnx.load(str(out))
        assert {o.version for o in proto.opset_import if o.domain == ""} == {21}
        assert any(
            t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
            for t in proto.graph.initializer
        ) or stats.get("explicit_matmulnbits")


@pytest.mark.ort
def test_matmul_add_relu_chain_is_not_left_as_fp32_gemm(tmp_path: Path) -> None:
    """onnxruntime 1.32 turns 2-D MatMul + Add + Relu into FusedGemm before it can fuse the
    DequantizeLinear; the pass sees that in the optimized graph and writes MatMulNBits itself."""
    out = tmp_path / "mlp.onnx"
    report = compress("mlp", [CLEANUP, {"pass": "quant.weight_only"}], out)
    stats = report.steps[1].stats
    assert set(stats["explicit_matmulnbits"]) == {"fc1", "fc2.matmul"}
    ops = fused_ops(out, stats["session_config"])
    assert ops["MatMulNBits"] == 3 and "FusedGemm" not in ops
    assert worst_cosine(report) > 0.9


@pytest.mark.ort
@pytest.mark.parametrize("params", [{"bits": 8, "block_size": 32}, {"bits": 8, "block_size": 0}])
def test_int8_variants_are_accurate(params: dict[str, int], tmp_path: Path) -> None:
    out = tmp_path / "t.onnx"
    report = compress(
        "transformer", [CLEANUP, {"pass": "quant.weight_only", "params": params}], out
    )
    assert worst_cosine(report) >= 0.9995
    ops = fused_ops(out, report.steps[1].stats["session_config"])
    assert ops["MatMulNBits"] == 6


@pytest.mark.ort
def test_fp16_per_channel_moves_to_opset_19_for_float16_scales(tmp_path: Path) -> None:
    out = tmp_path / "f.onnx"
    report = compress(
        "fp16",
        [CLEANUP, {"pass": "quant.weight_only", "params": {"bits": 8, "block_size": 0}}],
        out,
    )
    assert report.steps[1].stats["opset"] == "17 -> 19"
    assert worst_cosine(report) >= 0.999


def test_block_size_must_be_a_power_of_two() -> None:
    from onnxshrink.errors import ParamError
    from onnxshrink.passes.quant_weight_only import WeightOnlyQuantParams

    with pytest.raises(ParamError, match="block_size"):
        WeightOnlyQuantParams(block_size=24).check()
    with pytest.raises(ParamError, match="block_size"):
        WeightOnlyQuantParams(bits=4, block_size=0).check()
