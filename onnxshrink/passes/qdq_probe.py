"""Ask onnxruntime what it really runs: the optimized graph of the model as it stands.

Fusions decide speed and accuracy (DESIGN.md), and whether a pattern fuses depends on
neighbouring ops in ways no rule table captures, so quantization passes check the optimized
graph instead of assuming it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from onnxshrink import runtime
from onnxshrink.calibration import collect

#: Keep the optimized dump's weights out of the protobuf (models over 2 GiB).
_EXTERNAL = "session.optimized_model_external_initializers_file_name"
_EXTERNAL_MIN = "session.optimized_model_external_initializers_min_size_in_bytes"


def optimized_model(
    graph: gs.Graph, workdir: Path, config: dict[str, str] | None = None, stem: str = "probe"
) -> onnx.ModelProto:
    """The graph onnxruntime (CPU, all optimizations) builds from `graph`, without weights."""
    src = collect.instrumented_model(graph, [], workdir / f"{stem}.onnx")
    dst = workdir / f"{stem}.optimized.onnx"
    settings = {_EXTERNAL: f"{stem}.optimized.data", _EXTERNAL_MIN: "1024", **(config or {})}
    try:
        runtime.session(src, optimized_path=dst, config=settings)
        return onnx.load_model(str(dst), load_external_data=False)
    finally:
        for p in workdir.glob(f"{stem}.*"):
            p.unlink(missing_ok=True)


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """How many nodes of each op type the main graph holds, sorted by name."""
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def node_names(model: onnx.ModelProto) -> set[str]:
    """Names of the main graph's nodes (unfused nodes keep the names we gave them)."""
    return {n.name for n in model.graph.node}
