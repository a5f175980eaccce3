"""Read-only questions about gs graphs: constant weights, consumers, parameter counts."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx_graphsurgeon as gs


def constant_inputs(node: gs.Node) -> list[gs.Constant]:
    """The node's inputs that are initializers."""
    return [t for t in node.inputs if isinstance(t, gs.Constant)]


def param_count(node: gs.Node) -> int:
    """Elements in the node's constant inputs (its weights)."""
    return sum(int(np.prod(t.shape)) if t.shape else 1 for t in constant_inputs(node))


def constant_weight(node: gs.Node, index: int = 1) -> gs.Constant | None:
    """The constant at input `index` (the weight of Conv/Gemm/MatMul), or None."""
    if len(node.inputs) > index and isinstance(node.inputs[index], gs.Constant):
        return node.inputs[index]
    return None


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    """Nodes reading `tensor` in the same graph."""
    return list(tensor.outputs)


def producer(tensor: gs.Tensor) -> gs.Node | None:
    """The node writing `tensor`, or None for graph inputs and constants."""
    return tensor.inputs[0] if tensor.inputs else None


def subgraphs(node: gs.Node) -> Iterator[gs.Graph]:
    """Graphs held in the node's attributes (If branches, Loop/Scan bodies)."""
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (v for v in value if isinstance(v, gs.Graph))


def walk_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """The graph and all nested subgraphs, depth first."""
    yield graph
    for node in graph.nodes:
        for sub in subgraphs(node):
            yield from walk_graphs(sub)


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    """Whether `tensor` is one of the graph's outputs (compared by name, never by ==)."""
    return any(out.name == tensor.name for out in graph.outputs)
