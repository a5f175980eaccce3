"""The only graph-mutation helpers: rewire consumers, disconnect nodes, fresh names."""

from __future__ import annotations

import onnx_graphsurgeon as gs


def redirect(old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every consumer of `old` (including subgraph nodes) read `new` instead."""
    for node in list(old.outputs):
        for i, tensor in enumerate(node.inputs):
            if tensor is old:
                node.inputs[i] = new


def disconnect(node: gs.Node) -> None:
    """Detach a node so the driver's cleanup removes it."""
    node.inputs.clear()
    node.outputs.clear()


def replace_with_constant(tensor: gs.Variable, values: object) -> gs.Constant:
    """Swap a computed tensor for an initializer of the same name holding `values`."""
    const = gs.Constant(tensor.name, values)
    redirect(tensor, const)
    return const


def cast_node(names: NameScope, base: str, x: gs.Tensor, y: gs.Variable, to: int) -> gs.Node:
    """A Cast of `x` into `y` (element type `to`, an onnx.TensorProto code), freshly named."""
    return gs.Node("Cast", names.fresh(f"{base}_Cast"), {"to": to}, inputs=[x], outputs=[y])


class NameScope:
    """Deterministic unique names (never uuids): ``base``, then ``base_1``, ``base_2``..."""

    def __init__(self, graph: gs.Graph) -> None:
        from onnxshrink.ir.query import walk_graphs

        self._used: set[str] = set()
        for g in walk_graphs(graph):
            self._used.update(g.tensors().keys())
            self._used.update(n.name for n in g.nodes if n.name)

    def fresh(self, base: str) -> str:
        """A name not used anywhere in the graph, reserved from now on."""
        name, k = base, 0
        while name in self._used:
            k += 1
            name = f"{base}_{k}"
        self._used.add(name)
        return name
