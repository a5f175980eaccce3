"""Per-layer weight sizes, read from saved model files (never from the passes).

A *layer* is a node that computes on activations (at least one input not derived from constants).
Its weights are the initializers (and Constant nodes) reachable backwards from its inputs through
constant-only nodes, so an int8 weight behind a DequantizeLinear, or k-means indices behind
Cast + Gather, count for the Conv or MatMul that uses them, not for the decoding nodes. An
initializer shared by several layers counts once, for the first one in graph order.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxshrink.html.decode import Unsupported, attr, evaluate
from onnxshrink.ir.external import tensor_nbytes
from onnxshrink.ir.stats import dtype_name

#: Never treated as constant even with constant inputs (their value is not a function of them).
NOT_CONSTANT = frozenset(
    {
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
        "Dropout",
    }
)


@dataclass
class Layer:
    """One compute node's weights."""

    name: str
    op_type: str
    bytes: int = 0
    params: int = 0
    bytes_by_dtype: dict[str, int] = field(default_factory=dict)
    weights: list[str] = field(default_factory=list)
    main_input: str | None = None  # the constant-derived input with the most parameters


@dataclass
class _Leaf:
    tensor: onnx.TensorProto
    bytes: int
    params: int


@dataclass
class ModelLayers:
    """Layers of one model file in graph order, plus what is needed to decode their weights."""

    path: Path
    layers: dict[str, Layer] = field(default_factory=dict)
    unattributed_bytes: int = 0
    _leaves: dict[str, _Leaf] = field(default_factory=dict, repr=False)
    _producers: dict[str, onnx.NodeProto] = field(default_factory=dict, repr=False)

    def weight(self, layer: str) -> np.ndarray:
        """The layer's main weight as float64, decoded the way the layer consumes it.

        Raises KeyError for an unknown layer or one without weights, `Unsupported` when the
        decoding chain uses an op the decoder does not implement.
        """
        name = self.layers[layer].main_input
        if name is None:
            raise KeyError(layer)
        value = evaluate(name, self._producers, self._leaf_value)
        return np.asarray(value).astype(np.float64)

    def _leaf_value(self, name: str) -> np.ndarray:
        leaf = self._leaves.get(name)
        if leaf is None:
            raise Unsupported(f"tensor {name} has no value")
        return np.asarray(numpy_helper.to_array(leaf.tensor, base_dir=str(self.path.parent)))


def analyse(path: Path) -> ModelLayers:
    """Read `path` (weights stay on disk) and attribute every weight byte to a layer."""
    model = onnx.load_model(str(path), load_external_data=False)
    result = ModelLayers(path=path)
    origins: dict[str, frozenset[str]] = {}
    claimed: set[str] = set()
    _walk(model.graph, origins, claimed, result)
    result.unattributed_bytes = sum(
        leaf.bytes for name, leaf in result._leaves.items() if name not in claimed
    )
    return result


def _params(tensor: onnx.TensorProto) -> int:
    return int(np.prod(tensor.dims)) if tensor.dims else 1


def _nbytes(tensor: onnx.TensorProto, base: Path) -> int:
    """Payload bytes; an external tensor without a recorded length is sized from its file."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        info: dict[str, str] = {e.key: e.value for e in tensor.external_data}
        if "length" not in info and "location" in info:
            return (base / info["location"]).stat().st_size - int(info.get("offset", "0"))
    return tensor_nbytes(tensor)


def _add_leaf(
    result: ModelLayers, name: str, tensor: onnx.TensorProto, origins: dict[str, frozenset[str]]
) -> None:
    size = _nbytes(tensor, result.path.parent)
    result._leaves[name] = _Leaf(tensor, size, _params(tensor))
    origins[name] = frozenset({name})


def _subgraphs(node: onnx.NodeProto) -> Iterable[onnx.GraphProto]:
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        yield from a.graphs


def _walk(
    graph: onnx.GraphProto,
    origins: dict[str, frozenset[str]],
    claimed: set[str],
    result: ModelLayers,
) -> None:
    """One graph; `origins` holds constant-derived tensors visible here (outer scope included)."""
    origins = dict(origins)
    for t in graph.initializer:
        _add_leaf(result, t.name, t, origins)
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            tensor = _constant_tensor(node)
            if tensor is not None:
                _add_leaf(result, node.output[0], tensor, origins)
                continue
        inputs = [i for i in node.input if i]
        subs = list(_subgraphs(node))
        if (
            inputs
            and not subs
            and node.op_type not in NOT_CONSTANT
            and all(i in origins for i in inputs)
        ):
            merged = frozenset().union(*(origins[i] for i in inputs))
            for out in node.output:
                origins[out] = merged
                result._producers[out] = node
            continue
        _claim(node, origins, claimed, result)
        for sub in subs:
            _walk(sub, origins, claimed, result)


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    for a in node.attribute:
        if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(a.t)
            tensor.name = node.output[0]
            return tensor
    value = attr(node, "value_float", None)
    if value is None:
        value = attr(node, "value_floats", None)
    if value is None:
        return None
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), node.output[0])


def _claim(
    node: onnx.NodeProto, origins: dict[str, frozenset[str]], claimed: set[str], result: ModelLayers
) -> None:
    name = node.name or f"{node.op_type}({node.output[0] if node.output else '?'})"
    base, k = name, 1
    while name in result.layers:
        k += 1
        name = f"{base}#{k}"
    layer = Layer(name, node.op_type)
    best = -1
    for inp in node.input:
        if not inp or inp not in origins:
            continue
        size = sum(result._leaves[o].params for o in origins[inp])
        if size > best:
            best, layer.main_input = size, inp
        for origin in sorted(origins[inp]):
            if origin in claimed:
                continue
            claimed.add(origin)
            leaf = result._leaves[origin]
            layer.weights.append(origin)
            layer.bytes += leaf.bytes
            layer.params += leaf.params
            dtype = dtype_name(leaf.tensor.data_type)
            layer.bytes_by_dtype[dtype] = layer.bytes_by_dtype.get(dtype, 0) + leaf.bytes
    result.layers[name] = layer
