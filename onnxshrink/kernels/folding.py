"""Closed-form folding of per-channel affine maps into the weights of a linear layer.

An affine map after a Conv/Gemm (BatchNorm, or a Mul/Add by a per-channel constant) folds into
its weight and bias; a scale before a Conv folds into its weight, and a shift into its bias when
the Conv has no padding. Everything is computed in float64 and cast back to the weight's dtype.
"""

from __future__ import annotations

import numpy as np


def batchnorm_scale_shift(
    scale: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (s, t) with ``bn(y) == s * y + t``, in float64."""
    s = scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
    t = beta.astype(np.float64) - mean.astype(np.float64) * s
    return s, t


def fold_affine(
    weight: np.ndarray,
    bias: np.ndarray | None,
    s: np.ndarray,
    t: np.ndarray,
    axis: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Weights and bias of ``s * (W x + b) + t`` with ``s`` applied along `axis` of W.

    Computed in float64 and returned in the weight's dtype, so fp16 models stay fp16.
    """
    shape = [1] * weight.ndim
    shape[axis] = -1
    new_w = weight.astype(np.float64) * s.reshape(shape)
    b = np.zeros_like(s) if bias is None else bias.astype(np.float64)
    new_b = b * s + t
    return new_w.astype(weight.dtype), new_b.astype(weight.dtype)


def channel_vector(const: np.ndarray, rank: int, axis: int, channels: int) -> np.ndarray | None:
    """`const` as a float64 vector over `channels`, if it is per channel along `axis`.

    ONNX broadcasting aligns shapes on the right, so `const` qualifies against a rank-`rank`
    tensor with `channels` at `axis` only when its rank is not larger (the result would gain
    axes) and every axis but `axis` has size 1 (it would vary along them, or expand them).
    Returns None otherwise.
    """
    if const.ndim > rank:
        return None
    dims = np.array((1,) * (rank - const.ndim) + tuple(const.shape), dtype=np.int64)
    on_axis = np.arange(rank) == axis
    if not np.all((dims == 1) | (on_axis & (dims == channels))):
        return None
    vec: np.ndarray = np.broadcast_to(const.astype(np.float64).reshape(-1), (channels,)).copy()
    return vec


def _per_input(vec: np.ndarray, weight: np.ndarray, group: int) -> np.ndarray:
    """A per-input-channel vector laid out like `weight` ``[Cout, Cin/group, k...]``.

    Output channel ``o`` of group ``g = o // (Cout/group)`` reads input channels
    ``g*Cin/group ... (g+1)*Cin/group - 1``, so the vector is split per group and repeated
    over that group's outputs.
    """
    cout, cin_g = weight.shape[:2]
    per_group = vec.reshape(group, 1, cin_g)
    full: np.ndarray = np.broadcast_to(per_group, (group, cout // group, cin_g))
    return full.reshape(cout, cin_g, *([1] * (weight.ndim - 2)))


def fold_input_scale(weight: np.ndarray, s: np.ndarray, group: int) -> np.ndarray:
    """Conv weight with ``conv(x * s) == conv'(x)``, `s` per input channel (exact with padding,
    since padded zeros stay zero). Computed in float64, returned in the weight's dtype."""
    new_w: np.ndarray = weight.astype(np.float64) * _per_input(s, weight, group)
    return new_w.astype(weight.dtype)


def fold_input_shift(
    weight: np.ndarray, bias: np.ndarray | None, t: np.ndarray, group: int
) -> np.ndarray:
    """Conv bias with ``conv(x + t) == conv(x) + b'``, `t` per input channel.

    Only valid without padding: every output then sums the whole kernel over shifted inputs,
    so the shift contributes ``sum(W * t)`` per output channel.
    """
    w = weight.astype(np.float64)
    shift = (w * _per_input(t, weight, group)).sum(axis=tuple(range(1, weight.ndim)))
    b = np.zeros(weight.shape[0]) if bias is None else bias.astype(np.float64)
    new_b: np.ndarray = (b + shift).astype(weight.dtype)
    return new_b


def shift_before_scale(s: np.ndarray, t: np.ndarray) -> np.ndarray | None:
    """`u` with ``x * s + t == (x + u) * s`` (``u = t / s``), or None if some ``s`` is 0 or
    the quotient is not finite."""
    if not np.all(s != 0):
        return None
    with np.errstate(over="ignore"):
        u = t.astype(np.float64) / s.astype(np.float64)
    return u if np.all(np.isfinite(u)) else None
