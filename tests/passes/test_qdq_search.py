"""The tolerance guard's layer search, on a stand-in evaluator whose verdicts are known exactly.

onnxruntime is not needed to test the search itself: a candidate here is the set of layers
kept in float, and it holds the tolerance exactly when it contains every culprit."""

from __future__ import annotations

from typing import Any

import pytest

from onnxshrink.passes import qdq_guard


class _Evaluator:
    def __init__(self, culprits: set[int], share: dict[int, float]) -> None:
        self.culprits = culprits
        self.share = share
        self.runs = 0

    def failures(self, candidate: frozenset[int], session: Any = None) -> list[str]:
        self.runs += 1
        return [] if self.culprits <= candidate else ["y: cosine 0.9 < 0.99"]

    def isolated_error(self, build: Any, layers: dict[int, Any]) -> dict[int, float]:
        return {k: self.share[k] for k in layers}


def _search(culprits: set[int], share: dict[int, float]) -> tuple[frozenset[int], int]:
    layers = {k: (f"in{k}", f"out{k}") for k in share}
    evaluator = _Evaluator(culprits, share)
    report = qdq_guard.GuardReport(tolerance={"min_cosine": 0.99})
    kept = qdq_guard.accuracy_guard(
        lambda excluded: excluded,  # type: ignore[arg-type,return-value]
        evaluator,  # type: ignore[arg-type]
        layers,
        lambda k: {"node": f"n{k}"},
        report,
    )
    return kept, report.evaluations


@pytest.mark.parametrize("culprits", [{0}, {0, 1}, {0, 1, 2}])
def test_a_few_culprits_are_found_in_a_few_runs(culprits: set[int]) -> None:
    """Of 14 layers, the sensitive ones (ranked first by their isolated error) go to float and
    no other: all int8 fails, then halving the error budget from the whole leaves few layers
    in float. Bisecting up from the smallest budget took 18 runs on the recognizer."""
    share = {k: (0.2 if k in culprits else 0.01 + 0.001 * k) for k in range(14)}
    kept, runs = _search(culprits, share)
    assert kept == frozenset(culprits)
    assert runs <= 6


def test_a_tolerance_no_subset_holds_gives_up() -> None:
    share = dict.fromkeys(range(6), 0.1)
    kept, _ = _search({0, 1, 2, 3, 4, 5, 99}, share)  # 99 is no layer: nothing holds
    assert kept == frozenset(range(6))
