"""Calibration samples when the run has none: seeded random inputs from the graph signature.

Real samples (``--samples``) always win; these only keep a pass usable from the API or the
contract tests without data, and the pass says so in its report.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

#: Dynamic dimensions become 1 on the first axis and this elsewhere (short sequences).
DYNAMIC_DIM = 16
#: Samples drawn when the run provides none.
RANDOM_SAMPLES = 8


def _int_bound(graph: gs.Graph, t: gs.Tensor) -> int:
    """Rows of the constant table an integer input indexes (ids), else 2."""
    for node in t.outputs:
        if node.op == "Gather" and len(node.inputs) > 1 and node.inputs[1] is t:
            data = node.inputs[0]
            if isinstance(data, gs.Constant) and data.shape:
                return int(data.shape[int(node.attrs.get("axis", 0))])
    return 2


def random_feeds(
    graph: gs.Graph, rng: np.random.Generator, count: int = 8
) -> list[dict[str, np.ndarray]]:
    """`count` samples respecting each input's dtype and shape (dynamic dims filled in)."""
    samples = []
    for _ in range(count):
        sample: dict[str, np.ndarray] = {}
        for t in graph.inputs:
            shape = _shape(t.shape)
            dtype = np.dtype(t.dtype) if t.dtype is not None else np.dtype(np.float32)
            if dtype.kind == "f":
                sample[t.name] = rng.standard_normal(shape).astype(dtype)
            elif dtype.kind in "iu":
                sample[t.name] = rng.integers(0, _int_bound(graph, t), size=shape).astype(dtype)
            elif dtype.kind == "b":
                sample[t.name] = np.asarray(rng.random(shape) < 0.5)
        samples.append(sample)
    return samples


def _shape(dims: Sequence[int | str | None] | None) -> tuple[int, ...]:
    if dims is None:
        return ()
    out = []
    for axis, d in enumerate(dims):
        if isinstance(d, int) and d > 0:
            out.append(d)
        else:
            out.append(1 if axis == 0 and len(dims) > 1 else DYNAMIC_DIM)
    return tuple(out)


def calibration_feeds(
    graph: gs.Graph,
    given: Sequence[dict[str, np.ndarray]],
    rng: np.random.Generator,
    limit: int = 0,
) -> tuple[Sequence[dict[str, np.ndarray]], str]:
    """The run's samples (at most `limit`, 0: all), else seeded random ones; and which.
    Samples read lazily from disk stay lazy."""
    if given:
        return (given[:limit] if limit else given), "samples"
    return random_feeds(graph, rng, RANDOM_SAMPLES), "random (no samples given)"
