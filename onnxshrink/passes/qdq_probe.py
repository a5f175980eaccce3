"""Ask onnxruntime what it really runs: the optimized graph of the model as it stands.

Fusions decide speed and accuracy (DESIGN.md), and whether a pattern fuses depends on
neighbouring ops in ways no rule table captures, so quantization passes check the optimized
graph instead of assuming it.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
    `layer_times` finds each layer again. The median over `runs` drops the warm-up run."""
    return paired_node_times([model], feed, workdir, stem, min_runs=runs, max_runs=runs)[0]


def paired_node_times(
    models: Sequence[collect.ExportedModel],
    feed: dict[str, np.ndarray],
    workdir: Path,
    stem: str = "timing",
    min_runs: int = 6,
    max_runs: int = 20,
    budget_s: float = 1.5,
) -> list[dict[str, float]]:
    """`node_times` of several models profiled in alternation (one run of each in turn), with
    at least `min_runs` and at most `max_runs` runs each, more while `budget_s` lasts.

    Alternation is what makes two profiles comparable here: profiled one after the other,
    a shared machine's slow spell lands on one model only. Four probes of the same detector
    graphs, 6 runs each, read int8's total saving as -59 to +5 ms profiled in sequence and
    -35 to -21 ms in alternation; per-layer readings of the recognizer spread 5x less."""
    try:
        sessions = [
            m.session(threads=1, profile_prefix=workdir / f"{stem}{i}_profile")
            for i, m in enumerate(models)
        ]
        for sess in sessions:  # the warm-up run, dropped below
            sess.run(None, feed)
        deadline = time.perf_counter() + budget_s
        runs = 0
        while runs < min_runs or (runs < max_runs and time.perf_counter() < deadline):
            for sess in sessions:
                sess.run(None, feed)
            runs += 1
        profiles = [json.loads(Path(sess.end_profiling()).read_text()) for sess in sessions]
    finally:
        for p in workdir.glob(f"{stem}*_profile*"):
            p.unlink(missing_ok=True)
    return [_medians(events) for events in profiles]


def _medians(events: list[dict[str, Any]]) -> dict[str, float]:
    """Median kernel time per node over a profile's runs, the first (warm-up) run dropped."""
    durations: dict[str, list[float]] = defaultdict(list)
    for e in events:
        name = str(e.get("name", ""))
        if e.get("cat") == "Node" and name.endswith(_KERNEL):
            durations[name[: -len(_KERNEL)]].append(float(e["dur"]) / 1e3)
    return {k: float(np.median(v[1:] if len(v) > 1 else v)) for k, v in durations.items()}


def layer_times(
    times: dict[str, float], layers: dict[int, gs.Node], graph: gs.Graph | None = None
) -> dict[int, float]:
    """Time (ms) charged to each layer in a profile from `node_times`; layers not found (fused
    into a neighbour under another name) are left out.

    With `graph`, each layer is also charged for the kernels around it (see `regions`): in
    float the activation after a convolution is fused into it, in int8 it runs alone between
    a DequantizeLinear and a QuantizeLinear, and a probe that compared the convolutions alone
    found int8 20 ms faster on a detector that it made 25 ms slower."""
    owner = regions(graph, layers) if graph is not None else {}
    for k, node in layers.items():  # a layer's own kernels first: fused chains bear its name
        owner[node.name] = k
        for t in _chain_outputs(node):
            owner[f"{t}_nchwc"] = k
    out: dict[int, float] = {}
    for name, ms in times.items():
        layer = owner.get(name)
        if layer is None:
            layer = owner.get(base_name(name))
        if layer is not None:
            out[layer] = out.get(layer, 0.0) + ms
    return out


def base_name(kernel: str) -> str:
    """The node name a profiled kernel stands for: onnxruntime suffixes the nodes it makes
    from ours (``<name>_token_<n>`` after fusion, ``<name>/duplicated`` for shared DQs)."""
    return kernel.split("/", 1)[0].rsplit("_token_", 1)[0]


def regions(graph: gs.Graph, layers: dict[int, gs.Node]) -> dict[str, int]:
    """Kernel names (as onnxruntime profiles them) charged to each layer: the nodes that
    consume its output up to the next layer, and the Q/DQ pairs of the tensors they make.

    A node is charged to the layer of its most recently produced input (the residual Add
    after a projection goes with the projection, not with the block that made its skip
    input); a layer's input that no layer makes (a graph input) is charged to the layer.
    Kernels onnxruntime adds itself (layout reorders, transposes) stay uncharged."""
    position = {id(n): i for i, n in enumerate(graph.nodes)}
    layer_of = {id(n): k for k, n in layers.items()}
    tensor_owner: dict[str, int] = {}
    names: dict[str, int] = {}
    for node in graph.nodes:
        k = layer_of.get(id(node))
        if k is None:
            made = [
                (position.get(id(t.inputs[0]), -1), tensor_owner[t.name])
                for t in node.inputs
                if isinstance(t, gs.Variable) and t.name in tensor_owner and t.inputs
            ]
            if not made:
                continue
            k = max(made)[1]
        names[node.name] = k
        for t in node.outputs:
            tensor_owner[t.name] = k
            names[f"{t.name}_nchwc"] = k
    for k, node in layers.items():  # its weights, bias and unowned inputs
        for t in node.inputs:
            tensor_owner.setdefault(t.name, k)
    for t, k in tensor_owner.items():
        names[f"{t}_QuantizeLinear"] = k
        names[f"{t}_DequantizeLinear"] = k
    return names


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
