"""Raise a graph's default-domain opset (13 for per-axis QDQ, 21 for int4 and blocks).

Most operator updates between opset 11 and 21 only widen type lists or add attributes and
optional inputs with defaults that keep the old behaviour, so declaring a higher opset keeps
the model's meaning. The exceptions are handled here: attributes that became inputs (Squeeze,
Unsqueeze, Split, ReduceSum and Dropout at 12/13, the other Reduce ops at 18) are rewritten,
and ops whose meaning changed refuse the upgrade with a reason (Softmax over a non-last axis at
13, and the ops in `INCOMPATIBLE`), so the caller can skip instead of silently changing the
model. onnxruntime's own quantizer sets the opset to 13 without these checks.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.ir import edit, query

#: Opset 18 turned ``axes`` of these into an input.
REDUCE_18 = frozenset(
    {"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
     "ReduceMin", "ReduceProd", "ReduceSumSquare"}
)
#: Opset 13 turned these attributes into inputs (op -> attribute, input index).
ATTR_TO_INPUT_13 = {
    "Squeeze": ("axes", 1),
    "Unsqueeze": ("axes", 1),
    "Split": ("split", 1),
    "ReduceSum": ("axes", 1),
}
#: Opset 13 changed these from "flatten to 2-D from axis on" to "along axis".
SOFTMAX_13 = frozenset({"Softmax", "LogSoftmax", "Hardmax"})
#: Op -> first opset whose defaults changed the meaning of models written for earlier opsets.
INCOMPATIBLE = {
    "RoiAlign": 16,  # default coordinate_transformation_mode became half_pixel
    "GridSample": 20,  # mode names changed (bilinear -> linear, bicubic -> cubic)
    "DFT": 20,  # axis moved to an input
    "GroupNormalization": 21,  # scale/bias became per channel instead of per group
    "STFT": 21,
}


def _default(node: gs.Node) -> bool:
    return (node.domain or "") in ("", "ai.onnx")


def blocker(
    graph: gs.Graph, current: int, target: int, ranks: dict[str, int] | None = None
) -> str | None:
    """Why the graph cannot move from `current` to `target`, or None.

    A Softmax whose input rank is unknown counts as safe unless `ranks` (tensor name -> rank,
    measured by the caller) says otherwise; `softmax_inputs` lists the tensors to measure.
    """
    for g in query.walk_graphs(graph):
        for node in g.nodes:
            if not _default(node):
                continue
            since = INCOMPATIBLE.get(node.op)
            if since is not None and current < since <= target:
                return f"{node.op} ({node.name}) changes meaning from opset {current} to {target}"
            if node.op in SOFTMAX_13 and current < 13 <= target and not _last_axis(node, ranks):
                return f"{node.op} ({node.name}) over a non-last axis changes meaning at opset 13"
    return None


def softmax_inputs(graph: gs.Graph, current: int, target: int) -> list[str]:
    """Main-graph Softmax inputs of unknown rank that decide whether `target` is reachable."""
    if not current < 13 <= target:
        return []
    return [n.inputs[0].name for n in graph.nodes
            if n.op in SOFTMAX_13 and _default(n) and n.inputs and n.inputs[0].shape is None
            and int(n.attrs.get("axis", 1)) != -1]


def _last_axis(node: gs.Node, ranks: dict[str, int] | None) -> bool:
    """Softmax before opset 13 flattens from `axis` on: the same as opset 13 on the last axis."""
    axis = int(node.attrs.get("axis", 1))
    x = node.inputs[0] if node.inputs else None
    if x is None or axis == -1:
        return True
    rank = len(x.shape) if x.shape is not None else (ranks or {}).get(x.name)
    return rank is None or axis == rank - 1


def raise_opset(graph: gs.Graph, target: int, names: edit.NameScope) -> list[str]:
    """Move the graph to `target` (call `blocker` first); returns the nodes that were adapted."""
    current = int(graph.opset or 1)
    adapted: list[str] = []
    if current >= target:
        return adapted
    for g in query.walk_graphs(graph):
        for node in g.nodes:
            if _default(node) and _adapt(node, current, target, names):
                adapted.append(node.name or node.op)
    graph.opset = target
    for g in list(query.walk_graphs(graph))[1:]:
        g.opset = target
    graph.ir_version = max(int(graph.ir_version or 0), 10 if target >= 21 else 7)
    return adapted


def _adapt(node: gs.Node, current: int, target: int, names: edit.NameScope) -> bool:
    """Move an attribute that became an input between `current` and `target`."""
    value: np.ndarray
    if node.op == "Dropout" and current < 12 <= target and "ratio" in node.attrs:
        key, index, value = "ratio", 1, np.asarray(node.attrs["ratio"], np.float32).reshape(())
    elif node.op in ATTR_TO_INPUT_13 and current < 13 <= target:
        key, index = ATTR_TO_INPUT_13[node.op]
        if key not in node.attrs:
            return False
        value = np.asarray(node.attrs[key], np.int64).reshape(-1)
    elif node.op in REDUCE_18 and current < 18 <= target and "axes" in node.attrs:
        key, index = "axes", 1
        value = np.asarray(node.attrs["axes"], np.int64).reshape(-1)
    else:
        return False
    del node.attrs[key]
    const = gs.Constant(names.fresh(f"{node.name or node.op}_{key}"), value)
    while len(node.inputs) < index:
        node.inputs.append(gs.Variable.empty())
    if len(node.inputs) == index:
        node.inputs.append(const)
    else:
        node.inputs[index] = const
    return True
