"""Streaming observers: bounded memory, exact re-binning, sensible clipping ranges."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from onnxshrink.calibration.observers import (
    ChannelObserver,
    HistogramObserver,
    MinMaxObserver,
    make_observer,
    observed_range,
)

batches = st.lists(
    arrays(
        np.float32, st.integers(1, 200), elements=st.floats(-1e3, 1e3, allow_nan=False, width=32)
    ),
    min_size=1,
    max_size=6,
)


@given(batches)
def test_histogram_keeps_every_value_and_its_size(chunks: list[np.ndarray]) -> None:
    h = HistogramObserver(bins=64)
    for c in chunks:
        h.update(c)
    allv = np.concatenate(chunks)
    assert h.counts.shape == (64,)  # memory never grows with the data
    assert int(h.counts.sum()) == allv.size == h.count
    edges = h.edges()
    assert edges[0] <= allv.min() and allv.max() < edges[-1] + h.width
    # every value sits in the bin the final grid assigns it (re-binning was exact)
    idx = np.clip(np.floor(allv.astype(np.float64) / h.width).astype(np.int64) - h.start, 0, 63)
    np.testing.assert_array_equal(np.bincount(idx, minlength=64), h.counts)


@given(batches)
def test_order_of_batches_does_not_matter_for_minmax(chunks: list[np.ndarray]) -> None:
    a, b = MinMaxObserver(), MinMaxObserver()
    for c in chunks:
        a.update(c)
    for c in reversed(chunks):
        b.update(c)
    assert a.range() == b.range()


def test_non_finite_values_are_ignored() -> None:
    h = HistogramObserver()
    h.update(np.array([np.nan, np.inf, -np.inf, 1.0, -2.0], np.float32))
    assert h.minmax.range() == (-2.0, 1.0)
    assert h.count == 2


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_outliers_are_clipped_but_the_bulk_is_kept(method: str) -> None:
    rng = np.random.default_rng(0)
    h = HistogramObserver()
    for _ in range(10):
        x = rng.standard_normal(20000).astype(np.float32)
        x[:2] = [80.0, -60.0]  # rare outliers, like real activations
        h.update(x)
    lo, hi = observed_range(h, method, "uint8", percentile=99.99)
    assert -60.0 < lo < -2.5 and 2.5 < hi < 80.0, (lo, hi)


def test_entropy_is_not_fooled_by_the_spike_of_relu_zeros() -> None:
    rng = np.random.default_rng(1)
    h = HistogramObserver()
    h.update(np.maximum(rng.standard_normal(200000), 0).astype(np.float32))
    lo, hi = h.entropy_range("uint8")
    assert lo == 0.0 and 3.0 < hi <= h.minmax.hi


def test_channel_observer_mean_and_absmax() -> None:
    obs = ChannelObserver(axis=1)
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    obs.update(a[:1])
    obs.update(a[1:])
    np.testing.assert_allclose(obs.mean(), a.mean(axis=(0, 2)))
    np.testing.assert_allclose(obs.absmax, np.abs(a).max(axis=(0, 2)))


def test_memory_is_bounded_by_bins_not_samples() -> None:
    h = make_observer("percentile", bins=1024)
    assert isinstance(h, HistogramObserver)
    for i in range(50):
        h.update(np.full(1000, float(i), np.float32))
    assert h.counts.nbytes == 1024 * 8
    assert h.count == 50_000


def test_large_batches_bin_a_strided_subset_but_keep_the_exact_range() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(3_000_000).astype(np.float32)
    x[1] = 40.0  # an outlier off the stride still sets the range
    h = HistogramObserver(max_binned=1 << 18)
    h.update(x)
    assert h.count == x.size
    assert int(h.counts.sum()) <= (1 << 18) + 1
    assert h.range("minmax", "uint8") == (float(x.min()), 40.0)
    lo, hi = h.percentile_range(99.9)
    exact_lo, exact_hi = np.percentile(x, [0.1, 99.9])
    assert abs(lo - exact_lo) < 0.05 and abs(hi - exact_hi) < 0.05
