"""Metrics and verdicts: each metric moves the right way and each bound can fail."""

from __future__ import annotations

import numpy as np
import pytest

from onnxshrink.recipe.schema import Tolerance
from onnxshrink.validate.compare import compare_output, judge
from onnxshrink.validate.runner import compare_runs


def _pair(noise: float, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    refs = [rng.standard_normal((2, 10)).astype(np.float32) for _ in range(3)]
    cands = [(r + noise * rng.standard_normal(r.shape)).astype(np.float32) for r in refs]
    return refs, cands


def test_identical_outputs_are_perfect() -> None:
    refs, _ = _pair(0)
    m = compare_output("y", refs, refs)
    assert m.max_abs == 0 and m.rel_l2 == 0 and m.cosine == pytest.approx(1.0)
    assert m.snr_db == float("inf") and m.top1 == 1.0


def test_metrics_degrade_with_noise() -> None:
    small = compare_output("y", *_pair(1e-3))
    large = compare_output("y", *_pair(1e-1))
    assert small.max_abs < large.max_abs
    assert small.rel_l2 < large.rel_l2
    assert small.cosine > large.cosine
    assert small.snr_db > large.snr_db
    assert large.rel_l2 == pytest.approx(0.1, rel=0.3)


@pytest.mark.parametrize(
    ("tol", "label"),
    [
        (Tolerance(max_abs=1e-3), "max_abs"),
        (Tolerance(max_rel_l2=1e-3), "rel_l2"),
        (Tolerance(min_cosine=0.99999), "cosine"),
        (Tolerance(min_snr_db=60), "snr_db"),
    ],
)
def test_each_bound_can_fail(tol: Tolerance, label: str) -> None:
    m = judge(compare_output("y", *_pair(1e-1)), tol)
    assert not m.ok
    assert m.failures[0].startswith(label)


def test_top1_bound() -> None:
    refs = [np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)]
    cands = [np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)]
    m = judge(compare_output("p", refs, cands), Tolerance(min_top1=0.9))
    assert m.top1 == 0.5 and not m.ok


def test_nan_where_original_is_finite_fails() -> None:
    refs = [np.ones(4, np.float32)]
    cands = [np.array([1, np.nan, 1, 1], np.float32)]
    assert not judge(compare_output("y", refs, cands), Tolerance()).ok


def test_matching_nans_are_equal() -> None:
    refs = [np.array([1, np.nan], np.float32)]
    m = judge(compare_output("y", refs, [refs[0].copy()]), Tolerance(max_abs=0.0))
    assert m.ok and m.max_abs == 0


def test_integer_outputs_compare_exactly() -> None:
    refs = [np.array([1, 2, 3], np.int64)]
    m = judge(compare_output("ids", refs, [np.array([1, 2, 4], np.int64)]), Tolerance())
    assert m.mismatch == pytest.approx(1 / 3) and not m.ok


def test_shape_change_fails() -> None:
    m = compare_output("y", [np.zeros((2, 3), np.float32)], [np.zeros((3, 2), np.float32)])
    assert not m.ok and "shape" in m.failures[0]


def test_sequence_outputs_are_flattened() -> None:
    refs = [[[np.ones(2, np.float32), np.zeros(2, np.float32)]]]
    cands = [[[np.ones(2, np.float32), np.ones(2, np.float32)]]]
    metrics = compare_runs(["seq"], refs, cands, Tolerance(max_abs=0.5))
    assert [m.name for m in metrics] == ["seq[0]", "seq[1]"]
    assert metrics[0].ok and not metrics[1].ok
