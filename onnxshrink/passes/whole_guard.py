"""All-or-nothing guard for passes that rewrite many layers at once (``quant.dynamic``).

The per-layer search of ``quant.qdq``'s guard needs a plan it can rebuild for any subset; a
pass without one can still promise what the default recipe promises: its result is kept only
if onnxruntime finds it within the tolerance on the samples and faster than the graph it
started from at one thread, else that graph is restored. Both checks reuse ``qdq_guard``'s
evaluator and timing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.passes.qdq_guard import Evaluator, ModelFiles, latency, timed_ratio
from onnxshrink.recipe.schema import Tolerance


def guard_tolerance(recipe: dict[str, Any] | None, min_cosine: float) -> Tolerance:
    """The recipe's tolerance, else the guard's own cosine bound."""
    return Tolerance(**recipe) if recipe else Tolerance(min_cosine=min_cosine)


def restore(graph: gs.Graph, backup: gs.Graph) -> None:
    """Put `backup`'s nodes and signature back into `graph` (in place: callers hold it)."""
    graph.nodes = backup.nodes
    graph.inputs = backup.inputs
    graph.outputs = backup.outputs


@dataclass
class WholeVerdict:
    """Why the rewritten graph is rejected (None: keep it), with what was measured."""

    rejected: str | None
    stats: dict[str, Any] = field(default_factory=dict)


def check_whole(
    before: gs.Graph,
    after: gs.Graph,
    feeds: Sequence[dict[str, np.ndarray]],
    tolerance: Tolerance,
    workdir: Path,
    max_ratio: float,
    reference: list[list[Any]] | None = None,
) -> WholeVerdict:
    """Speed first (one timing), then accuracy on every sample (hardest first), on the same
    two sessions: building and exporting a 90 MB transformer's costs more than running its
    samples at one thread. `reference`: the original's outputs on `feeds` (else `before`
    runs for them)."""
    files = ModelFiles(workdir)
    stats: dict[str, Any] = {"tolerance": tolerance.to_dict()}
    if not feeds:  # nothing to measure on (as before: calibration always has samples)
        return WholeVerdict(None, stats)
    base = latency(before, files, "whole_float")
    quant = latency(after, files, "whole_quant")
    q, b, ratio = timed_ratio(quant, base, dict(feeds[0]), max_ratio)
    stats["latency"] = {
        "float_ms": round(b, 4),
        "quantized_ms": round(q, 4),
        "ratio": round(ratio, 3),
        "threads": 1,
    }
    if ratio > max_ratio:
        return WholeVerdict(
            f"not faster than float ({ratio:.2f}x at 1 thread, {max_ratio:g}x needed)", stats
        )
    evaluator = Evaluator(
        before, feeds, workdir, tolerance, files=files, session=base, reference=reference
    )
    del base
    broken = evaluator.failures(after, session=quant)
    if broken:
        stats["failures"] = broken
        return WholeVerdict(f"outside the tolerance ({'; '.join(broken)})", stats)
    return WholeVerdict(None, stats)
