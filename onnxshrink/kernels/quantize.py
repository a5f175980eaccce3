"""Linear (affine) quantization numerics: ranges, scales, zero points, quantize, dequantize.

Pure numpy, vectorized over channels and blocks. The conventions are onnxruntime's, so a tensor
quantized here and dequantized by ``DequantizeLinear`` gives exactly :func:`dequantize`:

- ``q = saturate(rint(x / scale) + zero_point)`` (round half to even, as ``QuantizeLinear``).
- The real range always contains 0, so zero is exactly representable (padding, ReLU outputs).
- Symmetric signed types use the restricted range ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` so that
  ``-q`` never overflows and the zero point is 0; symmetric unsigned types centre on 2^(b-1).
- 4-bit values are returned in int8/uint8 containers; packing two per byte is the ONNX
  writer's job, not a numerics question.

Granularity is described by ``axis`` (None: one scale for the tensor; an int: one scale per
index along that axis) and ``block_size`` (with an axis: one scale per ``block_size``
consecutive elements along ``axis``, as ONNX opset 21 blocked quantization).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

QDType = Literal["int8", "uint8", "int4", "uint4"]

#: (qmin, qmax, container dtype) of each integer type.
_TYPES: dict[str, tuple[int, int, type[np.integer]]] = {
    "int8": (-128, 127, np.int8),
    "uint8": (0, 255, np.uint8),
    "int4": (-8, 7, np.int8),
    "uint4": (0, 15, np.uint8),
    "int32": (-(2**31), 2**31 - 1, np.int32),
}


def bits(dtype: str) -> int:
    """Bit width of an integer type name."""
    return {"int8": 8, "uint8": 8, "int4": 4, "uint4": 4, "int32": 32}[dtype]


def is_signed(dtype: str) -> bool:
    """Whether the integer type is signed."""
    return not dtype.startswith("u")


def container(dtype: str) -> type[np.integer]:
    """The numpy dtype that holds values of `dtype` (int8/uint8 for 4-bit types)."""
    return _TYPES[dtype][2]


def qrange(dtype: str, *, symmetric: bool = False, reduce_range: bool = False) -> tuple[int, int]:
    """Integer range used for quantization.

    Symmetric signed ranges drop the most negative value (e.g. int8 becomes [-127, 127]) so
    that the range is symmetric around the zero point 0. `reduce_range` keeps one bit fewer,
    which avoids int16 saturation in u8s8 kernels on CPUs without VNNI.
    """
    qmin, qmax, _ = _TYPES[dtype]
    if reduce_range:
        span = (qmax - qmin + 1) // 2
        qmin = -(span // 2) if is_signed(dtype) else 0
        qmax = qmin + span - 1
    if symmetric and is_signed(dtype):
        qmin = -qmax
    return qmin, qmax


@dataclass(frozen=True)
class QParams:
    """Scale and zero point of one quantized tensor, plus how they map onto its elements."""

    scale: np.ndarray
    zero_point: np.ndarray
    dtype: str
    axis: int | None = None
    block_size: int | None = None
    #: Codes stay within one bit fewer (`qrange`): clipped there, not at the container's limits
    #: (a clipped 7-bit weight would otherwise round past 63 and saturate u8s8 kernels).
    reduce_range: bool = False

    def __post_init__(self) -> None:
        if self.block_size is not None and self.axis is None:
            raise ValueError("blocked quantization needs an axis")


def choose_qparams(
    lo: np.ndarray | float,
    hi: np.ndarray | float,
    dtype: str,
    *,
    symmetric: bool = False,
    reduce_range: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (container dtype) for real ranges ``[lo, hi]``.

    Works element-wise on arrays of ranges (one per channel or block). The range is first
    widened to contain 0. A zero-width range gets scale 1 so that dequantization stays finite
    and every value maps to the zero point exactly.
    """
    lo64 = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi64 = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    qmin, qmax = qrange(dtype, symmetric=symmetric, reduce_range=reduce_range)
    if symmetric:
        absmax = np.maximum(-lo64, hi64)
        scale = absmax * 2.0 / (qmax - qmin)
        zp = np.full(scale.shape, 0 if is_signed(dtype) else (qmin + qmax + 1) // 2, np.float64)
    else:
        scale = (hi64 - lo64) / (qmax - qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zp = np.clip(np.rint(qmin - lo64 / safe), qmin, qmax)
    scale = np.where(scale > 0, scale, 1.0)
    scale32 = scale.astype(np.float32)
    # float32 rounding can leave a scale denormal-small; keep it a normal number.
    scale32 = np.maximum(scale32, np.float32(np.finfo(np.float32).tiny))
    return scale32, zp.astype(container(dtype))


def _expand(
    values: np.ndarray, shape: tuple[int, ...], axis: int | None, block: int | None
) -> np.ndarray:
    """Broadcast per-tensor/per-axis/per-block parameters to the full tensor `shape`."""
    if axis is None:
        return values.reshape(())
    axis = axis % len(shape)
    if block is None:
        view = [1] * len(shape)
        view[axis] = -1
        return values.reshape(view)
    expanded = np.repeat(values, block, axis=axis)
    index = [slice(None)] * len(shape)
    index[axis] = slice(0, shape[axis])
    return expanded[tuple(index)]


def quantize(x: np.ndarray, qp: QParams) -> np.ndarray:
    """``saturate(rint(x / scale) + zero_point)`` in the container dtype of ``qp.dtype``."""
    ctype = _TYPES[qp.dtype][2]
    qmin, qmax = qrange(qp.dtype, reduce_range=qp.reduce_range)
    scale = _expand(np.asarray(qp.scale, np.float32), x.shape, qp.axis, qp.block_size)
    zp = _expand(np.asarray(qp.zero_point), x.shape, qp.axis, qp.block_size)
    codes = _codes(np.asarray(x, dtype=np.float32), scale, zp.astype(np.float32), qmin, qmax)
    return codes.astype(ctype)


def dequantize(q: np.ndarray, qp: QParams) -> np.ndarray:
    """``(q - zero_point) * scale`` in float32, as ``DequantizeLinear``."""
    scale = _expand(np.asarray(qp.scale, np.float32), q.shape, qp.axis, qp.block_size)
    zp = _expand(np.asarray(qp.zero_point), q.shape, qp.axis, qp.block_size)
    if q.dtype.itemsize <= 2:  # 8/16-bit codes and their difference are exact in float32
        out = q.astype(np.float32)
        out -= zp.astype(np.float32)
        out *= scale
        return out
    return ((q.astype(np.int64) - zp.astype(np.int64)).astype(np.float32) * scale).astype(
        np.float32
    )


def fake_quantize(x: np.ndarray, qp: QParams) -> np.ndarray:
    """Quantize then dequantize: what a Q/DQ pair does to `x`.

    Stays in float32 (codes of up to 16 bits and their difference with the zero point are
    exact there), so it equals ``dequantize(quantize(x, qp), qp)`` without two integer casts.
    """
    qmin, qmax = qrange(qp.dtype, reduce_range=qp.reduce_range)
    scale = _expand(np.asarray(qp.scale, np.float32), np.shape(x), qp.axis, qp.block_size)
    zp = _expand(np.asarray(qp.zero_point), np.shape(x), qp.axis, qp.block_size)
    return _fake(np.asarray(x, dtype=np.float32), scale, zp.astype(np.float32), qmin, qmax)


def _codes(
    x: np.ndarray, scale: np.ndarray, zp: np.ndarray, qmin: float, qmax: float
) -> np.ndarray:
    """``clip(rint(x / scale) + zp)`` as float32, in place: one temporary the size of `x`,
    not three (a 47 MB embedding table)."""
    q = np.divide(x, scale, dtype=np.float32)
    np.rint(q, out=q)
    q += zp
    np.clip(q, qmin, qmax, out=q)
    return q


def _fake(
    x: np.ndarray, scale: np.ndarray, zp: np.ndarray, qmin: float, qmax: float
) -> np.ndarray:
    """``(clip(rint(x / scale) + zp) - zp) * scale`` in float32, with broadcast parameters."""
    q = _codes(x, scale, zp, qmin, qmax)
    q -= zp
    q *= scale
    return q


def _blocked_view(w: np.ndarray, axis: int, block: int) -> tuple[np.ndarray, int]:
    """`w` with `axis` split into (blocks, block) (zero padded); returns the view and blocks."""
    axis = axis % w.ndim
    n = w.shape[axis]
    blocks = -(-n // block)
    pad = blocks * block - n
    if pad:
        widths = [(0, 0)] * w.ndim
        widths[axis] = (0, pad)
        w = np.pad(w, widths)
    shape = (*w.shape[:axis], blocks, block, *w.shape[axis + 1 :])
    return w.reshape(shape), blocks


def weight_range(
    w: np.ndarray, axis: int | None = None, block_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of `w` per tensor, per index along `axis`, or per block along `axis`."""
    w = np.asarray(w, dtype=np.float32)
    if w.size == 0:
        return np.zeros(()), np.zeros(())
    if axis is None:
        return np.asarray(w.min()), np.asarray(w.max())
    axis = axis % w.ndim
    if block_size is None:
        others = tuple(i for i in range(w.ndim) if i != axis)
        return w.min(axis=others), w.max(axis=others)
    view, _ = _blocked_view(w, axis, block_size)
    return view.min(axis=axis + 1), view.max(axis=axis + 1)


def weight_qparams(
    w: np.ndarray,
    dtype: str,
    *,
    axis: int | None = None,
    block_size: int | None = None,
    symmetric: bool = True,
    reduce_range: bool = False,
    clip_ratio: float = 1.0,
) -> QParams:
    """Quantization parameters of a weight from its own range (optionally shrunk)."""
    lo, hi = weight_range(w, axis, block_size)
    scale, zp = choose_qparams(
        lo * clip_ratio, hi * clip_ratio, dtype, symmetric=symmetric, reduce_range=reduce_range
    )
    return QParams(
        scale, zp, dtype, axis if axis is None else axis % max(np.ndim(w), 1), block_size,
        reduce_range,
    )


def mse_weight_qparams(
    w: np.ndarray,
    dtype: str,
    *,
    axis: int | None = None,
    block_size: int | None = None,
    symmetric: bool = True,
    reduce_range: bool = False,
    ratios: np.ndarray | None = None,
    patience: int = 3,
) -> QParams:
    """Per-channel/block clipping ratio that minimizes the squared rounding error of `w`.

    Scans shrink ratios of the min-max range (vectorized over channels; one pass over the
    weight per candidate), which matters for 4-bit weights where one outlier per block would
    otherwise waste most of the 16 levels. The scan goes from the full range down and stops
    once no group has improved for `patience` ratios in a row: 8-bit weights barely clip
    (MiniLM's 20736 channels all chose 0.975 or 1.0), so they stop after about five of the 21.
    """
    w = np.asarray(w, dtype=np.float32)
    if w.size == 0:
        return weight_qparams(
            w, dtype, axis=axis, block_size=block_size, symmetric=symmetric,
            reduce_range=reduce_range,
        )
    ratios = np.linspace(0.5, 1.0, 21) if ratios is None else np.asarray(ratios)
    groups, shape = _groups(w, axis, block_size)
    lo, hi = groups.min(axis=1), groups.max(axis=1)  # block padding is 0: ranges contain 0
    qmin, qmax = qrange(dtype, reduce_range=reduce_range)
    best_err = np.full(lo.shape, np.inf)
    best_ratio = np.ones(lo.shape)
    stale = np.zeros(lo.shape, np.int64)  # ratios since each group last improved
    for r in np.sort(ratios)[::-1]:
        if stale.min() >= patience:
            break
        scale, zp = choose_qparams(
            lo * r, hi * r, dtype, symmetric=symmetric, reduce_range=reduce_range
        )
        wq = _fake(groups, scale[:, None], zp.astype(np.float32)[:, None], qmin, qmax)
        wq -= groups
        err = np.einsum("ij,ij->i", wq, wq)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_ratio = np.where(better, r, best_ratio)
        stale = np.where(better, 0, stale + 1)
    scale, zp = choose_qparams(
        (lo * best_ratio).reshape(shape),
        (hi * best_ratio).reshape(shape),
        dtype,
        symmetric=symmetric,
        reduce_range=reduce_range,
    )
    return QParams(
        scale, zp, dtype, axis if axis is None else axis % max(w.ndim, 1), block_size, reduce_range
    )


def _groups(
    w: np.ndarray, axis: int | None, block_size: int | None
) -> tuple[np.ndarray, tuple[int, ...]]:
    """`w` as [groups, members] (one row per scale), and the shape of `weight_range`'s output.

    Blocks are zero padded, which changes no range: every quantized range contains 0.
    """
    if axis is None:
        return w.reshape(1, -1), ()
    axis = axis % w.ndim
    if block_size is None:
        return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1), (w.shape[axis],)
    view, _ = _blocked_view(w, axis, block_size)
    shape = view.shape[: axis + 1] + view.shape[axis + 2 :]
    return np.moveaxis(view, axis + 1, -1).reshape(-1, block_size), shape


def quantize_bias(bias: np.ndarray, input_scale: float, weight_scale: np.ndarray) -> QParams:
    """int32 bias parameters with ``scale = input_scale * weight_scale`` and zero point 0.

    This is the scale integer kernels accumulate in, so the bias is added without rescaling.
    Returns per-channel parameters (axis 0) when `weight_scale` has one entry per channel.
    """
    ws = np.asarray(weight_scale, dtype=np.float64).reshape(-1)
    scale = (float(input_scale) * ws).astype(np.float32)
    scale = np.maximum(scale, np.float32(np.finfo(np.float32).tiny))
    zp = np.zeros(scale.shape, np.int32)
    if scale.size == 1 and np.asarray(bias).size != 1:
        return QParams(scale.reshape(()), zp.reshape(()), "int32")
    return QParams(scale, zp, "int32", axis=0)


def quantize_int32(bias: np.ndarray, qp: QParams) -> np.ndarray:
    """Round a bias to int32 with saturation (a float64 path, since float32 loses int32 bits)."""
    scale = _expand(np.asarray(qp.scale, np.float64), bias.shape, qp.axis, None)
    q = np.rint(np.asarray(bias, np.float64) / scale)
    return np.clip(q, -(2**31), 2**31 - 1).astype(np.int32)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Two 4-bit values per byte, low nibble first (ONNX and MatMulNBits order), flat."""
    flat = np.asarray(q).reshape(-1).astype(np.uint8) & 0x0F
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, count: int, *, signed: bool) -> np.ndarray:
    """Inverse of :func:`pack_int4` for `count` values."""
    p = np.asarray(packed, np.uint8).reshape(-1)
    out = np.empty(p.size * 2, np.uint8)
    out[0::2] = p & 0x0F
    out[1::2] = p >> 4
    out = out[:count]
    if signed:
        return np.where(out >= 8, out.astype(np.int16) - 16, out).astype(np.int8)
    return out


def bias_correction(
    dw: np.ndarray, mean: np.ndarray, *, layout: Literal["conv", "rows", "cols"], group: int = 1
) -> np.ndarray:
    """Per-output-channel mean error ``(W - Wq) . E[x]`` that rounding the weights introduces.

    Adding it to the bias makes the quantized layer unbiased on the calibration data (the
    closed form of Nagel et al.'s bias correction). Layouts: ``conv`` (W is [Cout, Cin/group,
    *kernel], padding ignored), ``rows`` (W is [N, K]: Gemm with transB) and ``cols`` (W is
    [K, N]: MatMul, Gemm without transB). `mean` holds E[x] per input channel.
    """
    d = np.asarray(dw, np.float64)
    m = np.asarray(mean, np.float64).reshape(-1)
    if layout == "rows":
        return d @ m
    if layout == "cols":
        return m @ d
    per_in = d.reshape(d.shape[0], d.shape[1], -1).sum(axis=2)
    cout, cin_g = per_in.shape
    grouped = per_in.reshape(group, cout // group, cin_g)
    return np.einsum("goc,gc->go", grouped, m.reshape(group, cin_g)).reshape(cout)


def pack_matmulnbits(
    q: np.ndarray, zero_point: np.ndarray, bits: int, block_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Weights [K, N] (unsigned codes) and block zero points [blocks, N] in MatMulNBits layout.

    MatMulNBits stores B transposed and blocked: ``[N, blocks, block_size * bits / 8]`` bytes,
    low nibble first for 4 bits, K zero-padded to whole blocks; zero points are packed the same
    way per column (``[N, ceil(blocks * bits / 8)]``).
    """
    k, n = q.shape
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, n), np.uint8)
    padded[:k] = np.asarray(q).astype(np.uint8)
    cols = padded.T.reshape(n, blocks, block_size)
    zp = np.asarray(zero_point).astype(np.uint8).reshape(blocks, n).T
    if bits == 8:
        return np.ascontiguousarray(cols), np.ascontiguousarray(zp)
    packed = (cols[..., 0::2] & 0x0F) | ((cols[..., 1::2] & 0x0F) << 4)
    if blocks % 2:
        zp = np.concatenate([zp, np.zeros((n, 1), np.uint8)], axis=1)
    zp_packed = (zp[:, 0::2] & 0x0F) | ((zp[:, 1::2] & 0x0F) << 4)
    return np.ascontiguousarray(packed.astype(np.uint8)), np.ascontiguousarray(
        zp_packed.astype(np.uint8)
    )


def smooth_factors(act_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant factors ``s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)``, clipped, 1 if undefined.

    Dividing x by `s` and multiplying W's input rows by `s` keeps ``x W`` exact in float while
    moving activation range into the weights.
    """
    a = np.asarray(act_absmax, np.float64)
    w = np.asarray(weight_absmax, np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s = np.power(a, alpha) / np.power(w, 1.0 - alpha)
    s = np.where(np.isfinite(s) & (s > 0) & (a > 0) & (w > 0), s, 1.0)
    return np.clip(s, 1e-4, 1e4)


def smoothed_int8_error(
    x: np.ndarray,
    weights: list[np.ndarray],
    s: np.ndarray,
    refs: list[np.ndarray] | None = None,
) -> float:
    """Relative output error of int8 ``(x / s) (diag(s) W)`` against float ``x W``, over layers.

    `x` holds sample rows [n, K]; each weight is [K, N]; `refs` are the float products
    ``x W`` when the caller evaluates several `s` (computed here otherwise). Activations:
    uint8 per tensor over the rows' range; weights: int8 symmetric per output column, as
    quant.qdq writes them.
    """
    x = np.asarray(x, np.float32)
    xs = x / s.astype(np.float32)
    sc, zp = choose_qparams(float(xs.min()), float(xs.max()), "uint8")
    xq = fake_quantize(xs, QParams(sc, zp, "uint8"))
    err = ref = 0.0
    for i, w in enumerate(weights):
        y = refs[i] if refs is not None else x @ w
        ws = (w * s[:, None]).astype(np.float32)
        wq = fake_quantize(ws, weight_qparams(ws, "int8", axis=1))
        err += float(np.sum((xq @ wq - y) ** 2))
        ref += float(np.sum(y**2))
    return err / ref if ref > 0 else 0.0


def scales_as(scale: np.ndarray, dtype: type[np.floating]) -> np.ndarray:
    """`scale` stored in a narrower float type, rounded up so that no value newly clips.

    Rounding a float32 scale down to float16 would shrink the representable range, so the
    largest weight of a group would saturate; rounding up costs at most one float16 ulp of
    resolution. Quantize with the returned values (cast back to float32) and the rounding
    bound ``|x - dequantize(q)| <= scale / 2`` holds for the stored scale. Scales never fall
    below the type's smallest subnormal, which for float16 tables is exact: a float16 value
    below ``127 * 2**-24`` is an integer multiple of ``2**-24``.
    """
    s = np.asarray(scale, np.float32)
    r = s.astype(dtype)
    r = np.where(r.astype(np.float32) < s, np.nextafter(r, dtype(np.inf)), r).astype(dtype)
    out: np.ndarray = np.maximum(r, np.finfo(dtype).smallest_subnormal).astype(dtype)
    return out


def pack_int4_rows(q: np.ndarray) -> np.ndarray:
    """Two 4-bit values per byte along the last axis, low nibble first, each row padded to even.

    This is onnxruntime's GatherBlockQuantized layout (uint8 data with ``bits = 4``), where
    rows stay byte-aligned so that a gathered row is a contiguous slice; :func:`pack_int4`
    packs a whole tensor flat instead.
    """
    a = np.asarray(q).astype(np.uint8) & 0x0F
    if a.shape[-1] % 2:
        a = np.concatenate([a, np.zeros((*a.shape[:-1], 1), np.uint8)], axis=-1)
    return np.ascontiguousarray((a[..., 0::2] | (a[..., 1::2] << 4)).astype(np.uint8))
