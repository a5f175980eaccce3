"""Closed-form folding of an affine normalisation into the preceding linear layer."""

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
