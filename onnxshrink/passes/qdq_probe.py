"""Ask onnxruntime what it really runs: the optimized graph of the model as it stands.

Fusions decide speed and accuracy (DESIGN.md), and whether a pattern fuses depends on
neighbouring ops in ways no rule table captures, so quantization passes check the optimized
graph instead of assuming it.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxshrink.calibration import collect

#: Keep the optimized dump's weights out of the protobuf (models over 2 GiB).
_EXTERNAL = "session.optimized_model_external_initializers_file_name"
_EXTERNAL_MIN = "session.optimized_model_external_initializers_min_size_in_bytes"
_KERNEL = "_kernel_time"


def optimized_model(
    graph: gs.Graph, workdir: Path, config: dict[str, str] | None = None, stem: str = "probe"
) -> onnx.ModelProto:
    """The graph onnxruntime (CPU, all optimizations) builds from `graph`, without weights."""
    src = collect.instrumented_model(graph, [], workdir / f"{stem}.onnx")
    dst = workdir / f"{stem}.optimized.onnx"
    settings = {_EXTERNAL: f"{stem}.optimized.data", _EXTERNAL_MIN: "1024", **(config or {})}
    try:
        src.session(optimized_path=dst, config=settings)
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


def node_times(
    model: collect.ExportedModel,
    feed: dict[str, np.ndarray],
    workdir: Path,
    stem: str = "timing",
    runs: int = 6,
) -> dict[str, float]:
    """Median kernel time (ms) of every node onnxruntime runs for `model`, at one thread.

    Names are onnxruntime's after fusion: a fused node keeps the name of the node it replaced
    (QLinearConv: ``<conv>_token_<n>``; NCHWc convolutions: ``<output>_nchwc``), which is how
    `layer_times` finds each layer again. The median over `runs` drops the warm-up run.
    """
    try:
        sess = model.session(threads=1, profile_prefix=workdir / f"{stem}_profile")
        for _ in range(runs):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    finally:
        for p in workdir.glob(f"{stem}_profile*"):
            p.unlink(missing_ok=True)
    durations: dict[str, list[float]] = defaultdict(list)
    for e in events:
        name = str(e.get("name", ""))
        if e.get("cat") == "Node" and name.endswith(_KERNEL):
            durations[name[: -len(_KERNEL)]].append(float(e["dur"]) / 1e3)
    return {k: float(np.median(v)) for k, v in durations.items()}


def layer_times(times: dict[str, float], layers: dict[int, gs.Node]) -> dict[int, float]:
    """Time (ms) of each layer's kernel in a profile from `node_times`; layers not found (fused
    into a neighbour under another name) are left out."""
    owner: dict[str, int] = {}
    for k, node in layers.items():
        owner[node.name] = k
        for t in _chain_outputs(node):
            owner.setdefault(f"{t}_nchwc", k)
    out: dict[int, float] = {}
    for name, ms in times.items():
        k = owner.get(name)
        if k is None:
            base = name.split("/", 1)[0].rsplit("_token_", 1)[0]
            k = owner.get(base)
        if k is not None:
            out[k] = out.get(k, 0.0) + ms
    return out


def _chain_outputs(node: gs.Node, depth: int = 3) -> list[str]:
    """Output names of `node` and of the single-consumer chain after it (fusions such as
    Conv+Add+Relu name the fused kernel after the last output)."""
    names = []
    for _ in range(depth):
        if not node.outputs:
            break
        out = node.outputs[0]
        names.append(out.name)
        if len(out.outputs) != 1:
            break
        node = out.outputs[0]
    return names
