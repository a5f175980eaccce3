"""What x86 u8s8 integer kernels without VNNI compute, and what that costs in accuracy.

On AVX2 without VNNI, onnxruntime's uint8 x int8 GEMM (MatMulInteger, DynamicQuantizeMatMul)
multiplies adjacent pairs along K with ``vpmaddubsw``, which adds each pair's two products
into an int16 with saturation, before widening to int32. ``a[2i] w[2i] + a[2i+1] w[2i+1]``
overflows when two large weights of one sign meet activation codes above about 128 (the
dynamic zero point of a signed input), and the result is silently clipped to +-32767. These
functions reproduce that exactly (checked against onnxruntime in the tests) so that a pass
can measure, on its samples, how much error the saturation adds to each layer, next to the
rounding error int8 costs anyway. uint8 weights run on u8u8 kernels that widen first and
cannot saturate, at some cost in speed.
"""

from __future__ import annotations

import numpy as np

_I16 = 32767.0


def dynamic_u8(x: np.ndarray) -> tuple[np.ndarray, float, int]:
    """DynamicQuantizeLinear's uint8 codes of `x`, its scale and zero point (round half to
    even, range widened to contain 0), as float32 codes."""
    x = np.asarray(x, np.float32)
    lo = min(0.0, float(x.min())) if x.size else 0.0
    hi = max(0.0, float(x.max())) if x.size else 0.0
    scale = (hi - lo) / 255.0
    if scale == 0.0:
        return np.zeros(x.shape, np.float32), 1.0, 0
    zp = int(np.clip(np.rint(-lo / scale), 0, 255))
    codes = np.rint(x / np.float32(scale))
    codes += np.float32(zp)
    np.clip(codes, 0, 255, out=codes)
    return codes, scale, zp


def saturation_error(codes: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per row and output column, what the int16 pair saturation takes off the exact int32
    accumulator ``codes @ q`` (codes: [rows, K] uint8 values; q: [K, N] int8 values).

    Only the (pair, column) cells that these rows could saturate are evaluated: the bound
    from each channel's largest and smallest code rules out all others (on MiniLM, 99.3-99.9%
    of them), so this costs a fraction of the product itself.
    """
    a = np.asarray(codes, np.float32)
    w = np.asarray(q, np.float32)
    rows, k = a.shape
    n = w.shape[1]
    if k % 2:  # the kernel pads K with a zero: a lone product cannot saturate
        a = np.pad(a, ((0, 0), (0, 1)))
        w = np.pad(w, ((0, 1), (0, 0)))
    pairs = (k + 1) // 2
    wp = w.reshape(pairs, 2, n)
    amax = a.max(axis=0).reshape(pairs, 2, 1)
    amin = a.min(axis=0).reshape(pairs, 2, 1)
    top = np.where(wp > 0, amax * wp, amin * wp).sum(axis=1)
    bottom = np.where(wp < 0, amax * wp, amin * wp).sum(axis=1)
    c_idx, p_idx = np.nonzero(((top > _I16) | (bottom < -_I16 - 1)).T)  # column-major
    err = np.zeros((rows, n), np.float32)
    if p_idx.size == 0:
        return err
    ap = a.reshape(rows, pairs, 2)
    sums = ap[:, p_idx, 0] * wp[p_idx, 0, c_idx]
    sums += ap[:, p_idx, 1] * wp[p_idx, 1, c_idx]
    excess = sums - np.clip(sums, -_I16 - 1, _I16)
    cols, starts = np.unique(c_idx, return_index=True)  # candidates grouped by column
    err[:, cols] = np.add.reduceat(excess, starts, axis=1)
    return err
