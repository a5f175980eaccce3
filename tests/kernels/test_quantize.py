"""Quantization numerics: properties over random tensors, and onnxruntime's exact conventions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from onnxshrink import runtime
from onnxshrink.kernels import quantize as qk

DTYPES = ["int8", "uint8", "int4", "uint4"]
finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
tensors = arrays(np.float32, array_shapes(min_dims=1, max_dims=4, max_side=6), elements=finite)


@given(tensors, st.sampled_from(DTYPES), st.booleans())
@example(np.array([0.0, 0.0], np.float32), "uint8", False)
@example(np.array([1e-38, 3.0], np.float32), "int4", True)
def test_zero_is_exact_and_round_trip_within_half_a_step(
    x: np.ndarray, dtype: str, symmetric: bool
) -> None:
    qp = qk.weight_qparams(x, dtype, symmetric=symmetric)
    assert float(qk.fake_quantize(np.zeros(1, np.float32), qp)[0]) == 0.0
    scale = float(qp.scale)
    qmin, qmax = qk.qrange(dtype, symmetric=symmetric)
    lo = (qmin - float(qp.zero_point)) * scale
    hi = (qmax - float(qp.zero_point)) * scale
    inside = (x >= lo) & (x <= hi)
    err = np.abs(qk.fake_quantize(x, qp) - x)
    assert np.all(err[inside] <= scale / 2 * (1 + 1e-5) + 1e-30)


@given(tensors, st.sampled_from(DTYPES))
def test_quantized_values_stay_in_range(x: np.ndarray, dtype: str) -> None:
    qp = qk.weight_qparams(x, dtype, symmetric=False)
    q = qk.quantize(x * 3.0, qp)  # out-of-range values saturate
    qmin, qmax = qk.qrange(dtype)
    assert q.dtype == qk.container(dtype)
    assert q.min() >= qmin and q.max() <= qmax


@given(
    arrays(
        np.float32, array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=6), elements=finite
    ),
    st.integers(0, 3),
)
def test_per_channel_parameters_have_one_entry_per_channel(x: np.ndarray, axis: int) -> None:
    axis = axis % x.ndim
    qp = qk.weight_qparams(x, "int8", axis=axis)
    assert qp.scale.shape == (x.shape[axis],)
    assert qp.zero_point.shape == (x.shape[axis],)
    assert np.all(qp.zero_point == 0)
    # each channel's own absmax maps to +-127 (unless it is zero or so tiny that its scale
    # would be a float32 denormal, which is clamped to the smallest normal number)
    q = qk.quantize(x, qp)
    others = tuple(i for i in range(x.ndim) if i != axis)
    peak = np.abs(q.astype(np.int32)).max(axis=others)
    absmax = np.abs(x).max(axis=others)
    assert np.all((peak == 127) | (absmax < 127 * np.finfo(np.float32).tiny))


@given(
    arrays(np.float32, st.tuples(st.integers(1, 70), st.integers(1, 5)), elements=finite),
    st.sampled_from([16, 32]),
    st.sampled_from(["int4", "uint4"]),
)
def test_blocked_parameters_cover_every_block(w: np.ndarray, block: int, dtype: str) -> None:
    qp = qk.weight_qparams(w, dtype, axis=0, block_size=block, symmetric=dtype == "int4")
    blocks = -(-w.shape[0] // block)
    assert qp.scale.shape == (blocks, w.shape[1])
    back = qk.fake_quantize(w, qp)
    assert back.shape == w.shape
    scale = np.repeat(qp.scale, block, axis=0)[: w.shape[0]]
    assert np.all(np.abs(back - w) <= scale / 2 * (1 + 1e-5) + 1e-30)


def test_mse_clipping_never_worse_than_minmax() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_t(3, (256, 64)).astype(np.float32)
    for dtype in ("int4", "int8"):
        mm = qk.weight_qparams(w, dtype, axis=0, block_size=32)
        mse = qk.mse_weight_qparams(w, dtype, axis=0, block_size=32)
        err_mm = np.sum((qk.fake_quantize(w, mm) - w) ** 2)
        err_mse = np.sum((qk.fake_quantize(w, mse) - w) ** 2)
        assert err_mse <= err_mm


def test_asymmetric_range_uses_every_level() -> None:
    scale, zp = qk.choose_qparams(0.0, 2.55, "uint8")
    assert np.isclose(scale, 0.01) and zp == 0
    scale, zp = qk.choose_qparams(-1.0, 1.0, "uint8")
    assert zp == 128 and np.isclose(scale, 2 / 255)
    scale, zp = qk.choose_qparams(0.0, 0.0, "uint8")
    assert scale == 1.0 and zp == 0


def test_reduce_range_keeps_seven_bits() -> None:
    assert qk.qrange("int8", reduce_range=True) == (-64, 63)
    assert qk.qrange("uint8", reduce_range=True) == (0, 127)
    assert qk.qrange("int8", symmetric=True) == (-127, 127)


def test_bias_is_int32_at_input_times_weight_scale() -> None:
    bias = np.array([0.5, -1.25, 3.0])
    qp = qk.quantize_bias(bias, 0.1, np.array([0.01, 0.02, 0.04]))
    assert qp.axis == 0 and qp.dtype == "int32"
    q = qk.quantize_int32(bias, qp)
    np.testing.assert_array_equal(q, [500, -625, 750])


def test_int4_packing_round_trips() -> None:
    q = np.array([-8, 7, 0, -1, 3], np.int8)
    packed = qk.pack_int4(q)
    assert packed.size == 3
    np.testing.assert_array_equal(qk.unpack_int4(packed, 5, signed=True), q)


def test_bias_correction_matches_the_mean_output_error() -> None:
    rng = np.random.default_rng(1)
    dw = rng.standard_normal((6, 2, 3, 3)) * 0.01  # grouped conv: 4 input channels, 2 groups
    x = np.broadcast_to(rng.standard_normal((1, 4, 1, 1)), (2, 4, 9, 9))  # constant channels
    mean = x.mean(axis=(0, 2, 3))
    got = qk.bias_correction(dw, mean, layout="conv", group=2)
    patches = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(2, 3))
    groups = patches.reshape(2, 2, 2, 7, 7, 3, 3)  # n, group, channel-in-group, y, x, i, j
    expect = np.einsum("gocij,ngcyxij->go", dw.reshape(2, 3, 2, 3, 3), groups) / (2 * 7 * 7)
    np.testing.assert_allclose(got, expect.reshape(6), rtol=1e-9)
    w = rng.standard_normal((5, 3))
    m = rng.standard_normal(3)
    np.testing.assert_allclose(qk.bias_correction(w, m, layout="rows"), w @ m)
    np.testing.assert_allclose(qk.bias_correction(w.T, m, layout="cols"), w @ m)


@pytest.mark.ort
@pytest.mark.parametrize("dtype", ["int8", "uint8"])
def test_matches_onnxruntime_quantize_linear(dtype: str) -> None:
    """Our rounding (half to even) and saturation are QuantizeLinear's, per channel."""
    import onnx_graphsurgeon as gs

    from onnxshrink.ir import io

    rng = np.random.default_rng(2)
    x = (rng.standard_normal((3, 50)) * 4).astype(np.float32)
    x[0, :4] = [0.5, 1.5, -0.5, 2.5]  # ties
    qp = qk.weight_qparams(x, dtype, axis=0, symmetric=dtype == "int8")
    xin = gs.Variable("x", np.float32, list(x.shape))
    y = gs.Variable("y", qk.container(dtype), list(x.shape))
    node = gs.Node(
        "QuantizeLinear",
        "q",
        {"axis": 0},
        inputs=[xin, gs.Constant("s", qp.scale), gs.Constant("z", qp.zero_point)],
        outputs=[y],
    )
    graph = gs.Graph(nodes=[node], inputs=[xin], outputs=[y], opset=13)
    with io.quiet_gs():
        model = gs.export_onnx(graph)
    model.ir_version = 8
    got = runtime.run(runtime.session(model.SerializeToString(), opt="none"), {"x": x})[0]
    np.testing.assert_array_equal(got, qk.quantize(x, qp))
