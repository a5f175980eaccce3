"""Streaming statistics of activations: each batch is folded in and dropped.

Peers keep every activation and compute histograms at the end, so their memory grows with the
number of samples. Here every observer has a fixed footprint:

- :class:`MinMaxObserver`: two floats.
- :class:`HistogramObserver`: a fixed number of bins on a grid anchored at 0 whose bin width is a
  power of two. When a batch falls outside the window, the width doubles (adjacent bins merge
  exactly, since the grid is anchored) until the new range fits, so no sample is ever revisited
  and the result does not depend on batch order beyond the final resolution. From the histogram
  it derives percentile, entropy (KL) and MSE-optimal clipping ranges.
- :class:`ChannelObserver`: per-channel sums and absolute maxima (for bias correction and
  SmoothQuant), one float64 per channel.

Pure numpy: no onnx, no onnxruntime, no I/O.
"""

from __future__ import annotations

import math
from typing import Literal, Protocol

import numpy as np

from onnxshrink.kernels import quantize as qk

Method = Literal["minmax", "percentile", "entropy", "mse"]
METHODS: tuple[str, ...] = ("minmax", "percentile", "entropy", "mse")


class Observer(Protocol):
    """Anything that folds batches of one tensor into running statistics."""

    def update(self, x: np.ndarray) -> None:
        """Fold one batch in."""


def _finite(x: np.ndarray) -> tuple[np.ndarray, float, float]:
    """The finite values of `x` as flat float32 (inf/nan never widen a range), with their
    min and max. min/max propagate nan and inf, so the common all-finite case costs two
    reductions and no mask."""
    flat = np.asarray(x).reshape(-1)
    if flat.dtype != np.float32:
        flat = flat.astype(np.float32)
    if flat.size == 0:
        return flat, math.inf, -math.inf
    lo, hi = float(flat.min()), float(flat.max())
    if math.isfinite(lo) and math.isfinite(hi):
        return flat, lo, hi
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return flat, math.inf, -math.inf
    return flat, float(flat.min()), float(flat.max())


class MinMaxObserver:
    """Running minimum and maximum of the finite values seen."""

    def __init__(self) -> None:
        self.lo = math.inf
        self.hi = -math.inf
        self.count = 0

    def update(self, x: np.ndarray) -> None:
        """Fold one batch in."""
        v, lo, hi = _finite(x)
        self.fold(lo, hi, v.size)

    def fold(self, lo: float, hi: float, count: int) -> None:
        """Fold in a batch already reduced to its finite min, max and count."""
        if count:
            self.lo = min(self.lo, lo)
            self.hi = max(self.hi, hi)
            self.count += int(count)

    def range(self) -> tuple[float, float]:
        """(min, max); (0, 0) when nothing finite was seen."""
        if self.count == 0:
            return 0.0, 0.0
        return self.lo, self.hi


class HistogramObserver:
    """Fixed-size histogram on a power-of-two grid anchored at 0 that re-bins exactly.

    Bin ``k`` covers ``[(start + k) * width, (start + k + 1) * width)``. Growing the range
    doubles ``width`` (merging bin pairs) and moves ``start``; the number of bins never changes.

    The range (min/max) always covers every value. Binning costs about 2 ms per million values
    (numpy's bincount), which made histograms the largest cost of calibrating a detector at
    640x640, so a batch larger than `max_binned` values is binned on an evenly strided subset
    (an odd stride, so it does not alias with power-of-two rows): a quarter of a million values
    per sample still puts hundreds of values beyond the 99.99th percentile after a few samples.
    """

    def __init__(self, bins: int = 4096, max_binned: int = 1 << 18) -> None:
        if bins < 16:
            raise ValueError("a histogram needs at least 16 bins")
        self.bins = bins
        self.max_binned = max_binned
        self.counts = np.zeros(bins, np.int64)
        self.width = 0.0
        self.start = 0
        self.minmax = MinMaxObserver()

    @property
    def count(self) -> int:
        """Number of finite values folded in."""
        return self.minmax.count

    def update(self, x: np.ndarray) -> None:
        """Fold one batch in, re-binning first if it falls outside the window."""
        v, lo, hi = _finite(x)
        if v.size == 0:
            return
        first = self.minmax.count == 0
        self.minmax.fold(lo, hi, v.size)
        if first:
            span = hi - lo if hi > lo else max(abs(hi), 1.0)
            self.width = 2.0 ** math.ceil(math.log2(span / (self.bins - 1)))
            self.start = math.floor(lo / self.width)
        self._fit(self.minmax.lo, self.minmax.hi)
        # The width is a power of two, so v * (1 / width) is exact in float32 while 1 / width
        # is a normal float32 >= 1 (no underflow) and every bin index lies in float32's exact
        # integer range (after _fit): then no float64 copy of the batch is made.
        if v.size > self.max_binned:
            v = v[:: -(-v.size // self.max_binned) | 1]
        exact = abs(self.start) + self.bins < 2**24 and 2.0**-126 <= self.width <= 1.0
        idx = np.multiply(v, (np.float32 if exact else np.float64)(1.0 / self.width))
        np.floor(idx, out=idx)
        idx -= self.start
        np.clip(idx, 0, self.bins - 1, out=idx)
        self.counts += np.bincount(idx.astype(np.intp), minlength=self.bins)

    def _fit(self, lo: float, hi: float) -> None:
        """Grow the window (exact merges of bin pairs) until it covers ``[lo, hi]``."""
        shift = 0
        width = self.width
        while math.floor(hi / width) - math.floor(lo / width) + 1 > self.bins:
            width *= 2.0
            shift += 1
        new_start = math.floor(lo / width)
        if shift == 0 and new_start >= self.start:
            return
        old_index = np.arange(self.bins, dtype=np.int64) + self.start
        # exact in float64: integer times a power of two, floored
        new_index = np.floor(old_index * (self.width / width)).astype(np.int64) - new_start
        keep = self.counts > 0
        merged = np.bincount(new_index[keep], weights=self.counts[keep], minlength=self.bins)
        self.counts = merged[: self.bins].astype(np.int64)
        self.width = width
        self.start = new_start

    def edges(self) -> np.ndarray:
        """Bin edges (bins + 1 values)."""
        return (np.arange(self.bins + 1, dtype=np.float64) + self.start) * self.width

    def _used(self) -> tuple[np.ndarray, np.ndarray]:
        """Centres and counts of the bins between the first and last non-empty one."""
        nz = np.flatnonzero(self.counts)
        if nz.size == 0:
            return np.zeros(1), np.zeros(1)
        a, b = int(nz[0]), int(nz[-1]) + 1
        centres = (np.arange(a, b, dtype=np.float64) + self.start + 0.5) * self.width
        centres[0] = max(centres[0], self.minmax.lo)
        centres[-1] = min(centres[-1], self.minmax.hi)
        return centres, self.counts[a:b].astype(np.float64)

    def percentile_range(self, percentile: float) -> tuple[float, float]:
        """``[q(100 - p), q(p)]`` of the values (linear inside a bin), within [min, max]."""
        if self.count == 0:
            return 0.0, 0.0
        cdf = np.cumsum(self.counts, dtype=np.float64)
        cdf = np.concatenate([[0.0], cdf]) / cdf[-1]
        edges = self.edges()
        p = percentile / 100.0
        hi = float(np.interp(p, cdf, edges))
        lo = float(np.interp(1.0 - p, cdf, edges))
        return max(lo, self.minmax.lo), min(hi, self.minmax.hi)

    def _candidates(self, n: int = 64) -> np.ndarray:
        """Candidate clipping ranges (k, 2): joint shrink, upper-only and lower-only shrink."""
        lo, hi = self.minmax.range()
        f = np.linspace(1.0 / n, 1.0, n)
        joint = np.stack([lo * f, hi * f], axis=1)
        upper = np.stack([np.full(n, lo), hi * f], axis=1)
        lower = np.stack([lo * f, np.full(n, hi)], axis=1)
        return np.concatenate([joint, upper, lower])

    def mse_range(self, dtype: str, *, symmetric: bool = False) -> tuple[float, float]:
        """The candidate range whose quantizer gives the least expected squared error."""
        if self.count == 0:
            return 0.0, 0.0
        x, c = self._used()
        cand = self._candidates()
        scale, zp = qk.choose_qparams(cand[:, 0], cand[:, 1], dtype, symmetric=symmetric)
        qmin, qmax = qk.qrange(dtype, symmetric=symmetric)
        s = scale.astype(np.float64)[:, None]
        z = zp.astype(np.float64)[:, None]
        q = np.clip(np.rint(x[None, :] / s) + z, qmin, qmax)
        err = ((q - z) * s - x[None, :]) ** 2 @ c
        best = int(np.argmin(err))
        return float(cand[best, 0]), float(cand[best, 1])

    def entropy_range(self, dtype: str, *, symmetric: bool = False) -> tuple[float, float]:
        """The candidate range minimizing KL(P || Q) between clipped and quantized histograms.

        P is the histogram restricted to the range with the clipped mass folded into the edge
        bins; Q spreads each quantization level's mass evenly over that level's non-empty bins
        (TensorRT's construction, generalised to asymmetric ranges).
        """
        if self.count == 0:
            return 0.0, 0.0
        x, c = self._used()
        # The bin holding 0 is left out: zero is exact under any range, and the spike of exact
        # zeros after a ReLU would otherwise push KL towards ranges that clip far too much.
        c = np.where((x >= 0) & (x < self.width), 0.0, c)
        qmin, qmax = qk.qrange(dtype, symmetric=symmetric)
        levels = qmax - qmin + 1
        x, c = _coarsen(x, c, levels * ENTROPY_BINS_PER_LEVEL)
        best, best_kl = (float(x[0]), float(x[-1])), math.inf
        for lo, hi in self._candidates():
            kl = _kl_for_range(x, c, float(lo), float(hi), levels)
            if kl < best_kl:
                best, best_kl = (float(lo), float(hi)), kl
        if symmetric:
            t = max(abs(best[0]), abs(best[1]))
            lo0, hi0 = self.minmax.range()
            return (-t if lo0 < 0 else 0.0), (t if hi0 > 0 else 0.0)
        return best

    def range(
        self, method: str, dtype: str, *, symmetric: bool = False, percentile: float = 99.99
    ) -> tuple[float, float]:
        """The clipping range chosen by `method`."""
        if method == "minmax":
            return self.minmax.range()
        if method == "percentile":
            return self.percentile_range(percentile)
        if method == "entropy":
            return self.entropy_range(dtype, symmetric=symmetric)
        if method == "mse":
            return self.mse_range(dtype, symmetric=symmetric)
        raise ValueError(f"unknown calibration method {method!r}; expected one of {METHODS}")


#: KL is computed on at most this many bins per quantization level (TensorRT uses 2048 bins
#: for 128 levels); finer histograms are merged first, since sparse bins make KL favour ranges
#: that clip far too much.
ENTROPY_BINS_PER_LEVEL = 8


def _coarsen(x: np.ndarray, c: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge groups of adjacent bins (count-weighted centres) until at most `limit` remain."""
    factor = -(-x.size // limit)
    if factor <= 1:
        return x, c
    pad = (-x.size) % factor
    xs = np.concatenate([x, np.full(pad, x[-1])]).reshape(-1, factor)
    cs = np.concatenate([c, np.zeros(pad)]).reshape(-1, factor)
    total = cs.sum(axis=1)
    centres = np.where(
        total > 0, (xs * cs).sum(axis=1) / np.maximum(total, 1e-300), xs.mean(axis=1)
    )
    return centres, total


def _kl_for_range(x: np.ndarray, c: np.ndarray, lo: float, hi: float, levels: int) -> float:
    """KL divergence between the clipped histogram and its `levels`-level quantization."""
    inside = (x >= lo) & (x <= hi)
    if hi <= lo or int(inside.sum()) < min(levels, x.size):
        return math.inf
    kept = np.where(inside, c, 0.0)
    p = kept.copy()
    p[np.argmax(inside)] += c[x < lo].sum()
    p[len(inside) - 1 - np.argmax(inside[::-1])] += c[x > hi].sum()
    level = np.clip(np.floor((np.clip(x, lo, hi) - lo) / (hi - lo) * levels), 0, levels - 1)
    level = level.astype(np.int64)
    nonzero = (p > 0).astype(np.float64)
    # Q comes from the histogram *without* the clipped mass, so clipping costs KL.
    mass = np.bincount(level, weights=kept, minlength=levels)
    support = np.bincount(level, weights=nonzero, minlength=levels)
    q = np.where(nonzero > 0, mass[level] / np.maximum(support[level], 1.0), 0.0)
    total_p, total_q = p.sum(), q.sum()
    if total_p <= 0 or total_q <= 0:
        return math.inf
    pn, qn = p / total_p, q / total_q
    m = pn > 0
    # Smoothing (as TensorRT and onnxruntime do): a clipped edge with no mass of its own in Q
    # costs a large but finite divergence instead of ruling the range out.
    qn = np.where(m & (qn <= 0), 1e-4 / max(int(m.sum()), 1), qn)
    return float(np.sum(pn[m] * np.log(pn[m] / qn[m])))


class ChannelObserver:
    """Per-channel sum, count and absolute maximum along one axis (others reduced)."""

    def __init__(self, axis: int) -> None:
        self.axis = axis
        self.sum: np.ndarray | None = None
        self.absmax: np.ndarray | None = None
        self.count = 0

    def update(self, x: np.ndarray) -> None:
        """Fold one batch in; non-finite values count as 0."""
        a = np.asarray(x)
        if a.ndim == 0 or a.size == 0:
            return
        axis = self.axis % a.ndim
        others = tuple(i for i in range(a.ndim) if i != axis)
        # float64 accumulation without a float64 copy; the mask pass only when needed
        s = a.sum(axis=others, dtype=np.float64)
        if not np.isfinite(s).all():
            a = np.where(np.isfinite(a), a, 0)
            s = a.sum(axis=others, dtype=np.float64)
        m = np.abs(a).max(axis=others).astype(np.float64)
        if self.sum is None or self.absmax is None:
            self.sum, self.absmax = s, m
        elif s.shape != self.sum.shape:
            raise ValueError(f"channel count changed from {self.sum.shape[0]} to {s.shape[0]}")
        else:
            self.sum += s
            self.absmax = np.maximum(self.absmax, m)
        self.count += a.size // a.shape[axis]

    def mean(self) -> np.ndarray:
        """Per-channel mean (empty when nothing was seen)."""
        if self.sum is None or self.count == 0:
            return np.zeros(0)
        return self.sum / self.count


def make_observer(method: str, bins: int = 4096) -> MinMaxObserver | HistogramObserver:
    """The cheapest observer that can answer `method`."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; expected one of {METHODS}")
    return MinMaxObserver() if method == "minmax" else HistogramObserver(bins)


def observed_range(
    obs: MinMaxObserver | HistogramObserver,
    method: str,
    dtype: str,
    *,
    symmetric: bool = False,
    percentile: float = 99.99,
) -> tuple[float, float]:
    """Range for `method` from either observer type."""
    if isinstance(obs, MinMaxObserver):
        return obs.range()
    return obs.range(method, dtype, symmetric=symmetric, percentile=percentile)


class RowReservoir:
    """A uniform sample of at most `capacity` rows (vectors along the last axis) of all batches.

    Reservoir sampling (Vitter's algorithm R, applied batch-wise) keeps memory at
    ``capacity x channels`` whatever the number of samples; the generator makes it deterministic.
    """

    def __init__(self, capacity: int, rng: np.random.Generator) -> None:
        self.capacity = capacity
        self.rng = rng
        self.rows: np.ndarray | None = None
        self.seen = 0

    def update(self, x: np.ndarray) -> None:
        """Fold one batch's rows in."""
        a = np.asarray(x, np.float32)
        if a.ndim == 0 or a.size == 0:
            return
        rows = a.reshape(-1, a.shape[-1])
        if self.rows is None:
            self.rows = np.empty((0, rows.shape[1]), np.float32)
        if rows.shape[1] != self.rows.shape[1]:
            raise ValueError(f"row width changed from {self.rows.shape[1]} to {rows.shape[1]}")
        free = self.capacity - len(self.rows)
        if free > 0:
            self.rows = np.concatenate([self.rows, rows[:free]])
        rest = rows[max(free, 0) :]
        if len(rest):
            # row i of `rest` is the (seen + free + i + 1)-th row overall: keep it with
            # probability capacity / that count, replacing a random slot
            index = self.seen + max(free, 0) + np.arange(1, len(rest) + 1)
            slots = (self.rng.random(len(rest)) * index).astype(np.int64)
            keep = slots < self.capacity
            self.rows[slots[keep]] = rest[keep]
        self.seen += len(rows)
