"""Folding kernels: per-channel broadcasting rules and input-side folds against direct math."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from onnxshrink.kernels.folding import (
    channel_vector,
    fold_input_scale,
    fold_input_shift,
    shift_before_scale,
)


@pytest.mark.parametrize(
    ("shape", "ok"),
    [
        ((), True),
        ((1,), True),
        ((4, 1, 1), True),
        ((1, 4, 1, 1), True),
        ((1, 1, 1, 1), True),
        ((4,), False),  # aligns with the last (width) axis, not the channels
        ((4, 1), False),  # aligns with the height axis
        ((1, 4, 1, 1, 1), False),  # one axis more than the tensor: the result would gain it
        ((1, 4, 2, 1), False),  # varies along height
        ((1, 3, 1, 1), False),  # neither 1 nor the channel count
    ],
)
def test_channel_vector_follows_onnx_broadcasting(shape: tuple[int, ...], ok: bool) -> None:
    const = np.arange(1, int(np.prod(shape)) + 1, dtype=np.float32).reshape(shape)
    vec = channel_vector(const, rank=4, axis=1, channels=4)
    assert (vec is not None) == ok
    if vec is not None:  # the vector reproduces the broadcast exactly
        y = np.zeros((2, 4, 3, 5))
        np.testing.assert_array_equal(y + const, y + vec.reshape(1, 4, 1, 1))


def test_channel_vector_for_gemm_output_is_last_axis() -> None:
    assert channel_vector(np.ones(5), rank=2, axis=1, channels=5) is not None
    assert channel_vector(np.ones((1, 5)), rank=2, axis=1, channels=5) is not None
    assert channel_vector(np.ones((5, 1)), rank=2, axis=1, channels=5) is None


def _conv2d(x: np.ndarray, w: np.ndarray, group: int) -> np.ndarray:
    """Direct valid (unpadded, stride 1) grouped 2-D convolution, for reference."""
    n, _, h, wd = x.shape
    cout, cin_g, kh, kw = w.shape
    per = cout // group
    patches = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
    patches = patches.reshape(n, group, cin_g, h - kh + 1, wd - kw + 1, kh, kw)
    wg = w.reshape(group, per, cin_g, kh, kw)
    out = np.einsum("ngcxyab,gocab->ngoxy", patches, wg)
    return out.reshape(n, cout, h - kh + 1, wd - kw + 1)


@given(group=st.sampled_from([1, 2, 4]), seed=st.integers(0, 2**16))
def test_input_scale_and_shift_match_direct_convolution(group: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    cin, cout = 4, 8
    x = rng.standard_normal((1, cin, 6, 5))
    w = rng.standard_normal((cout, cin // group, 3, 2))
    b = rng.standard_normal(cout)
    s, t = rng.uniform(0.5, 2, cin), rng.standard_normal(cin)
    ref = _conv2d(x * s[:, None, None] + t[:, None, None], w, group) + b[:, None, None]
    new_w = fold_input_scale(w, s, group)
    new_b = fold_input_shift(new_w, b, t / s, group)
    got = _conv2d(x, new_w, group) + new_b[:, None, None]
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10)


def test_folds_keep_the_weight_dtype() -> None:
    w = np.ones((2, 1, 1, 1), np.float32)
    assert fold_input_scale(w, np.array([2.0]), 1).dtype == np.float32
    assert fold_input_shift(w, None, np.array([2.0]), 1).dtype == np.float32


def test_shift_before_scale_refuses_zero_scales() -> None:
    np.testing.assert_allclose(
        shift_before_scale(np.array([2.0, 4.0]), np.array([1.0, 1.0])), [0.5, 0.25]
    )
    assert shift_before_scale(np.array([2.0, 0.0]), np.array([1.0, 1.0])) is None
    assert shift_before_scale(np.array([1e-320]), np.array([1e10])) is None  # overflows
