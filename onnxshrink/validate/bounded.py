"""Which outputs are probabilities: values a bounded op (Sigmoid, Softmax, Tanh) makes.

Relative metrics (cosine, relative L2) measure an output against its own size. A probability's
size is its range, [0, 1], not the values a sample happens to produce: on random inputs a text
detector's map is all 1e-7 to 1e-3 ("nothing here"), and float rounding alone (an exact
rewrite such as folding BatchNorm) moves those by 1e-7 and reads as cosine 0.96. Validation
then rejected exact rewrites of such models. So a probability output that moved by no more
than `Tolerance.prob_atol` anywhere is judged equal (`compare.judge`); other outputs have no
natural scale and keep relative bounds only.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

#: Ops whose outputs lie in [0, 1] or [-1, 1] whatever their inputs.
BOUNDED_OPS = frozenset({"Sigmoid", "HardSigmoid", "Softmax", "Tanh", "Softsign"})

#: Ops that only move, select or repeat their first input's values (or, for Concat, all of
#: their inputs'), so a bounded input gives a bounded output.
_CARRIERS = frozenset(
    {
        "Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice",
        "Gather", "GatherElements", "GatherND", "Split", "Expand", "Tile", "DepthToSpace",
        "SpaceToDepth", "MaxPool", "Resize", "Upsample", "Concat", "Cast",
    }
)


#: onnx.TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16: a Cast to these keeps the values.
_FLOAT_TYPES = frozenset({1, 10, 11, 16})


def probability_outputs(graph: gs.Graph) -> frozenset[str]:
    """Names of `graph`'s outputs whose values come from a bounded op through carriers only
    (a Resize after a Sigmoid still holds probabilities; an Add after it does not)."""
    return frozenset(t.name for t in graph.outputs if _bounded(t, depth=16))


def _bounded(tensor: gs.Tensor, depth: int) -> bool:
    if depth == 0 or not isinstance(tensor, gs.Variable) or not tensor.inputs:
        return False
    node = tensor.inputs[0]
    if node.op in BOUNDED_OPS:
        return True
    if node.op not in _CARRIERS or not node.inputs:
        return False
    if node.op == "Cast" and node.attrs.get("to") not in _FLOAT_TYPES:
        return False
    carried = node.inputs if node.op == "Concat" else node.inputs[:1]
    return all(_bounded(t, depth - 1) for t in carried)
