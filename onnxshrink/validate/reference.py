"""The original model's outputs on the run's samples, computed once and shared.

Every tolerance guard judges its candidates against these, and validation reuses them. Two
reasons: a step's guard then holds the recipe's tolerance against the original, not against
whatever the previous step left (two steps each within cosine 0.99 of their own input can
end below 0.99 together, and validation would then reject the whole run); and the original
runs once per compress instead of once per guard plus once more for validation (on the
640x640 detector, one pass over 24 samples is 2-3 s).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from onnxshrink import runtime
from onnxshrink.validate.feeds import Feeds


class Reference:
    """Lazily computed outputs of `path` on `feeds` (onnxruntime, every fusion)."""

    def __init__(self, path: Path, feeds: Feeds, opt: runtime.OptLevel = "all") -> None:
        self.path = path
        self.feeds = feeds
        self.opt = opt
        self._names: list[str] | None = None
        self._outputs: list[list[Any]] = []

    def outputs(self) -> tuple[list[str], list[list[Any]]]:
        """Output names and, per sample, the outputs in that order."""
        if self._names is None:
            from onnxshrink.validate.runner import run_model  # the runner imports this module

            self._names, self._outputs = run_model(
                self.path, self.feeds, opt=self.opt, role="original"
            )
        return self._names, self._outputs

    def aligned(self, count: int, names: Sequence[str]) -> list[list[Any]] | None:
        """The outputs `names` on the run's first `count` samples; None when an output is not
        one of the original's (the caller then computes its own reference). Callers pass
        only feeds that are the run's samples (``calibration_feeds`` says so: "samples")."""
        have, outputs = self.outputs()
        where = {n: i for i, n in enumerate(have)}
        if not names or count > len(outputs) or any(n not in where for n in names):
            return None
        return [[values[where[n]] for n in names] for values in outputs[:count]]
