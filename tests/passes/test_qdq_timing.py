"""When the latency guard stops timing: decided early, or after enough pairs to trust medians.

The sessions here are stand-ins on a fake clock (each run advances it by a set time), so the
stopping rule is tested exactly; the real timings are the benchmark's job.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from onnxshrink.passes import qdq_guard


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class _Session:
    """Runs take the next of `times_ms` (cycled); the arena release run takes no time."""

    def __init__(self, clock: _Clock, times_ms: list[float]) -> None:
        self.clock = clock
        self.times: Iterator[float] = itertools.cycle(times_ms)
        self.runs = 0

    def run(self, names: object, feed: object, options: object = None) -> list[object]:
        if options is None:
            self.clock.now += next(self.times) / 1e3
            self.runs += 1
        return []


def _pairs(quant_ms: list[float], base_ms: list[float], monkeypatch: pytest.MonkeyPatch) -> int:
    clock = _Clock()
    monkeypatch.setattr(qdq_guard.time, "perf_counter", clock.perf_counter)
    quant, base = _Session(clock, quant_ms), _Session(clock, base_ms)
    qdq_guard.timed_ratio(quant, base, {}, threshold=0.95, budget_s=1.0)
    return base.runs - 1  # one warm-up run each


def test_a_ratio_far_from_the_threshold_stops_after_five_pairs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert _pairs([50.0], [100.0], monkeypatch) == 5


def test_pairs_that_agree_near_the_threshold_stop_at_five(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """0.90-0.94 is within 10% of 0.95, but five pairs that agree that closely are more than
    three standard errors below it."""
    assert _pairs([91.0, 93.0, 92.0, 90.0, 94.0], [100.0], monkeypatch) == 5


def test_a_pair_hit_by_another_process_does_not_stall_the_decision(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One pair in five runs 1.5x slow (another process took the core): the median and MAD
    ignore it. A sign test needed all of 7 pairs on one side and timed on to 15."""
    assert _pairs([92.0, 91.0, 150.0, 93.0, 92.0], [100.0], monkeypatch) == 5


def test_noisy_pairs_near_the_threshold_take_at_least_fifteen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pairs on both sides of 0.95 decide nothing: 15 pairs (and the 1 s budget) at least."""
    n = _pairs([90.0, 100.0], [100.0], monkeypatch)
    assert n >= 15 and n * 0.195 >= 1.0


def test_layers_returned_to_float_for_accuracy_are_retimed_only_when_they_matter() -> None:
    """A layer the probe says int8 saves 0.3 ms on cannot move a 120 ms model's timed ratio
    beyond noise: not timed again. One that saves 3 ms (2.5%) is."""
    report = qdq_guard.GuardReport(tolerance={}, latency={"float_ms": 120.0})
    gains = {3: 0.3, 7: 3.0, 9: -2.0}
    assert qdq_guard._below_resolution(frozenset({3}), gains, report)
    assert qdq_guard._below_resolution(frozenset({3, 9}), gains, report)  # float is faster there
    assert not qdq_guard._below_resolution(frozenset({7}), gains, report)
    assert not qdq_guard._below_resolution(frozenset({7, 9}), gains, report)  # no offsetting
    assert not qdq_guard._below_resolution(frozenset(), gains, report)
    assert not qdq_guard._below_resolution(frozenset({3}), {}, report)  # no probe: retime
    untimed = qdq_guard.GuardReport(tolerance={})
    assert not qdq_guard._below_resolution(frozenset({3}), gains, untimed)


def test_the_gate_retries_with_a_quarter_of_the_layers_still_int8(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    """12 of 20 layers are slower in int8 (back to float at once); the other 8 time 0.97x.
    The retry returns a quarter of those 8 (the 2 that save least), not a quarter of all 20
    (5 of the 8 left, after which too little was int8 to be faster)."""
    gains = dict.fromkeys(range(12), -1.0) | {12 + i: 0.1 * (i + 1) for i in range(8)}
    ratio_by_int8 = {8: 0.97, 6: 0.93}

    class Build:
        def files(self, workdir: object) -> None:
            return None

        def __call__(self, excluded: frozenset[int]) -> frozenset[int]:
            return excluded

    def timed(quant: frozenset[int], base: object, feed: object, max_ratio: float) -> tuple:
        ratio = ratio_by_int8.get(20 - len(quant), 1.0)
        return ratio * 100.0, 100.0, ratio

    monkeypatch.setattr(qdq_guard, "latency", lambda graph, files, stem: graph)
    monkeypatch.setattr(qdq_guard, "timed_ratio", timed)
    report = qdq_guard.GuardReport(tolerance={})
    kept = qdq_guard.latency_guard(
        Build(), frozenset(), frozenset(), gains, {}, tmp_path, report, max_ratio=0.95  # type: ignore[arg-type]
    )
    assert kept == frozenset(range(14))  # the slower 12, then the 2 that save least
    assert report.latency["ratio"] == 0.93 and report.gave_up is None
