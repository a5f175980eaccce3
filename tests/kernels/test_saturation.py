"""The u8s8 saturation emulation reproduces onnxruntime's integer kernels exactly."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from onnxshrink import runtime
from onnxshrink.kernels.saturation import dynamic_u8, saturation_error


def _model(w: np.ndarray) -> bytes:
    """x -> DynamicQuantizeLinear -> MatMulInteger(W int8), exposing codes and accumulator."""
    x = gs.Variable("x", np.float32, ["n", w.shape[0]])
    a = gs.Variable("a", np.uint8, ["n", w.shape[0]])
    s = gs.Variable("s", np.float32, [])
    z = gs.Variable("z", np.uint8, [])
    acc = gs.Variable("acc", np.int32, ["n", w.shape[1]])
    nodes = [
        gs.Node("DynamicQuantizeLinear", "dql", inputs=[x], outputs=[a, s, z]),
        gs.Node("MatMulInteger", "mmi", inputs=[a, gs.Constant("w", w), z], outputs=[acc]),
    ]
    model = gs.export_onnx(gs.Graph(nodes, [x], [a, s, z, acc], opset=13))
    model.ir_version = 8
    return bytes(model.SerializeToString())


def int8_kernels_saturate() -> bool:
    """Whether this CPU's u8s8 kernel saturates (no VNNI): 255 x 127 twice overflows int16."""
    w = np.full((2, 1), 127, np.int8)
    x = np.array([[1.0, 1.0], [0.0, 0.0]], np.float32)  # codes 255, zero point 0
    acc = runtime.session(_model(w), opt="none").run(None, {"x": x})[3]
    return int(acc[0, 0]) != 2 * 255 * 127


@pytest.mark.ort
@pytest.mark.parametrize("k", [64, 63])
def test_emulation_matches_onnxruntime_bit_for_bit(k: int) -> None:
    rng = np.random.default_rng(k)
    # positive-skewed activations (codes far above the zero point) and large weights of one
    # sign in places: the case that saturates
    x = np.abs(rng.normal(size=(16, k))).astype(np.float32) * 2 - 0.5
    w = rng.integers(-127, 128, size=(k, 24)).astype(np.int8)
    w[:, :6] = rng.integers(90, 128, size=(k, 6))
    a, s, z, acc = runtime.session(_model(w), opt="none").run(None, {"x": x})

    codes, scale, zp = dynamic_u8(x)
    np.testing.assert_array_equal(codes, a.astype(np.float32))
    assert zp == int(z) and np.isclose(scale, float(s))
    exact = (a.astype(np.int64) - int(z)) @ w.astype(np.int64)
    lost = saturation_error(codes, w)
    assert np.abs(lost).max() > 0  # the kernel being emulated saturates on this case
    if not int8_kernels_saturate():
        pytest.skip("this CPU's u8s8 kernel does not saturate (VNNI): nothing to compare")
    np.testing.assert_array_equal(exact - lost.astype(np.int64), acc)


def test_small_weights_cannot_saturate() -> None:
    codes = np.full((4, 8), 255, np.float32)
    q = np.full((8, 3), 64, np.int8)  # 255 * 64 * 2 = 32640 fits int16
    assert not saturation_error(codes, q).any()
    assert saturation_error(codes, np.full((8, 3), 65, np.int8)).all()
