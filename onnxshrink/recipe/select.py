"""Resolve selectors against the graph as it stands when a step runs."""

from __future__ import annotations

import re
from collections.abc import Sequence

import onnx_graphsurgeon as gs

from onnxshrink.ir import query
from onnxshrink.recipe.schema import Selector


def matches(node: gs.Node, sel: Selector, default_ops: frozenset[str] | None) -> bool:
    """Whether one node satisfies one selector (exclusions win)."""
    ops = sel.op_types if sel.op_types is not None else default_ops
    if ops is not None and node.op not in ops:
        return False
    name = node.name or ""
    if any(re.fullmatch(p, name) for p in sel.exclude_names):
        return False
    if sel.names and not any(re.fullmatch(p, name) for p in sel.names):
        return False
    return not (sel.min_params and query.param_count(node) < sel.min_params)


def resolve(
    graph: gs.Graph,
    selects: Sequence[Selector],
    excludes: Sequence[Selector],
    default_ops: frozenset[str] | None,
) -> list[gs.Node]:
    """Main-graph nodes in graph order matching every `selects` and none of `excludes`."""
    return [
        node
        for node in graph.nodes
        if all(matches(node, s, default_ops) for s in selects)
        and not any(matches(node, s, default_ops) for s in excludes)
    ]
