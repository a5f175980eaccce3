"""Small helpers over onnx protos shared by the IR modules: graph walks, copies, quiet gs."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TypeVar

import onnx
import onnx_graphsurgeon as gs

logger = logging.getLogger(__name__)


_M = TypeVar("_M", onnx.ValueInfoProto, onnx.TensorProto, onnx.ModelProto)


def copy_message(message: _M) -> _M:
    fresh = type(message)()
    fresh.CopyFrom(message)
    return fresh


def _iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _iter_graphs(sub)


def iter_all_graphs(model: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    """The main graph, every subgraph, and the bodies of model-local functions' subgraphs."""
    yield from _iter_graphs(model.graph)


@contextlib.contextmanager
def quiet_gs() -> Iterator[None]:
    """Silence onnx-graphsurgeon's own logger (it prints to stdout) around one call."""
    gl = gs.logger.G_LOGGER
    saved = gl.severity
    gl.severity = gl.ERROR
    try:
        yield
    finally:
        gl.severity = saved


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
