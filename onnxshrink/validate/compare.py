"""Metrics between original and compressed outputs, and the verdict against a tolerance."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxshrink.recipe.schema import Tolerance


@dataclass
class OutputMetrics:
    """How close one output stays to the original, over all samples."""

    name: str
    dtype: str
    shape: list[int]
    max_abs: float = 0.0
    rel_l2: float = 0.0
    cosine: float = 1.0
    snr_db: float = float("inf")
    top1: float | None = None
    mismatch: float = 0.0
    failures: list[str] = field(default_factory=list)
    #: A probability output within ``Tolerance.prob_atol`` everywhere: judged equal.
    within_prob_atol: bool = False

    @property
    def ok(self) -> bool:
        """Whether every bound held."""
        return not self.failures


def flatten_outputs(names: Sequence[str], values: Sequence[Any]) -> list[tuple[str, Any]]:
    """Expand sequence outputs into ``name[i]`` entries so every entry is one array."""
    out: list[tuple[str, Any]] = []
    for name, value in zip(names, values):
        if isinstance(value, (list, tuple)):
            out.extend((f"{name}[{i}]", np.asarray(v)) for i, v in enumerate(value))
        else:
            out.append((name, np.asarray(value) if value is not None else value))
    return out


def _looks_like_classes(ref: np.ndarray) -> bool:
    return ref.dtype.kind == "f" and ref.ndim == 2 and ref.shape[-1] >= 2


def compare_output(name: str, refs: list[np.ndarray], cands: list[np.ndarray]) -> OutputMetrics:
    """Metrics over samples: worst-case max-abs and cosine, pooled relative L2 and SNR."""
    first = refs[0]
    metrics = OutputMetrics(name, str(first.dtype), list(first.shape))
    for i, (r, c) in enumerate(zip(refs, cands)):
        if r.shape != c.shape:
            metrics.failures.append(f"sample {i}: shape {list(c.shape)} != {list(r.shape)}")
            return metrics
    if first.dtype.kind not in "fc":
        diff = [np.asarray(r != c).ravel() for r, c in zip(refs, cands)]
        metrics.mismatch = float(np.concatenate(diff).mean()) if diff and diff[0].size else 0.0
        return metrics
    err2 = ref2 = 0.0
    max_abs, cosines, agree, total = 0.0, [], 0, 0
    for r, c in zip(refs, cands):
        r64, c64 = r.astype(np.float64).ravel(), c.astype(np.float64).ravel()
        if np.isfinite(r64).all() and np.isfinite(c64).all():  # the common case: no masks
            d, r_clean, c_clean = r64 - c64, r64, c64
        else:
            both_nan = np.isnan(r64) & np.isnan(c64)
            same_inf = np.isinf(r64) & (r64 == c64)
            skip = both_nan | same_inf
            if np.any(np.isnan(c64) & ~skip) or np.any(np.isinf(c64) & ~skip):
                metrics.failures.append("non-finite values where the original is finite")
            d = np.where(skip, 0.0, r64 - c64)
            r_clean = np.where(skip, 0.0, r64)
            c_clean = np.where(skip, 0.0, c64)
        if d.size:
            max_abs = max(max_abs, float(np.nanmax(np.abs(d))))
        err2 += float(np.dot(d, d))
        ref2 += float(np.dot(r_clean, r_clean))
        cosines.append(_cosine(r_clean, c_clean))
        if _looks_like_classes(r):
            agree += int(np.sum(np.argmax(r, axis=-1) == np.argmax(c, axis=-1)))
            total += r.shape[0]
    metrics.max_abs = max_abs
    metrics.rel_l2 = float(np.sqrt(err2 / ref2)) if ref2 > 0 else (0.0 if err2 == 0 else np.inf)
    if err2 == 0:
        metrics.snr_db = float("inf")
    else:  # an all-zero reference with any error has no signal at all: -inf, not a warning
        metrics.snr_db = float(10 * np.log10(ref2 / err2)) if ref2 > 0 else float("-inf")
    metrics.cosine = float(min(cosines)) if cosines else 1.0
    metrics.top1 = agree / total if total else None
    return metrics


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def judge(metrics: OutputMetrics, tol: Tolerance, probability: bool = False) -> OutputMetrics:
    """Append a failure line for every bound the output breaks. A `probability` output (see
    ``validate.bounded``) that moved by at most ``tol.prob_atol`` is equal to the original:
    only an explicit `max_abs` still applies to it."""
    m = metrics
    if m.dtype[0] not in "fc" and "float" not in m.dtype:
        if m.mismatch > tol.max_mismatch:
            m.failures.append(f"mismatch {m.mismatch:.4g} > {tol.max_mismatch:g}")
        return m
    floor = tol.prob_atol
    exempt = probability and floor is not None and not m.failures and m.max_abs <= floor
    checks: list[tuple[float | None, float | None, str, Callable[[float, float], bool]]] = [
        (tol.max_abs, m.max_abs, "max_abs", lambda v, t: v <= t),
        (tol.max_rel_l2, m.rel_l2, "rel_l2", lambda v, t: v <= t),
        (tol.min_cosine, m.cosine, "cosine", lambda v, t: v >= t),
        (tol.min_snr_db, m.snr_db, "snr_db", lambda v, t: v >= t),
        (tol.min_top1, m.top1, "top1", lambda v, t: v >= t),
    ]
    for bound, value, label, holds in checks:
        if bound is None or value is None:
            continue
        if not holds(value, bound):
            if exempt and label != "max_abs":
                m.within_prob_atol = True  # reported: only the floor made it pass
                continue
            sign = "<" if label in ("cosine", "snr_db", "top1") else ">"
            m.failures.append(f"{label} {value:.6g} {sign} {bound:g}")
    return m
