"""Evaluate the constant-only node chains that feed a layer's weight, in numpy.

Compressed models store weights encoded (int8 + DequantizeLinear, k-means indices + Cast + Gather,
bitmask + values + BitShift/CumSum/Gather, ...). To draw a layer's weight histogram *as the layer
sees it*, the report decodes that chain with the handful of ops such encodings use. An op outside
this table raises `Unsupported` and the report says so instead of guessing. onnxruntime is not
used here: reports must stay cheap and work on models any runtime would refuse.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper


class Unsupported(Exception):
    """The chain uses an op (or a form of one) the decoder does not implement."""


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """A node attribute as a Python value (ints, floats, strings, lists, tensors)."""
    for a in node.attribute:
        if a.name != name:
            continue
        if a.type == onnx.AttributeProto.INT:
            return a.i
        if a.type == onnx.AttributeProto.FLOAT:
            return a.f
        if a.type == onnx.AttributeProto.STRING:
            return a.s.decode()
        if a.type == onnx.AttributeProto.INTS:
            return list(a.ints)
        if a.type == onnx.AttributeProto.FLOATS:
            return list(a.floats)
        if a.type == onnx.AttributeProto.TENSOR:
            return numpy_helper.to_array(a.t)
        raise Unsupported(f"{node.op_type} attribute {name} of type {a.type}")
    return default


def _float(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).astype(np.float64)


def _dequantize(node: onnx.NodeProto, xs: list[np.ndarray]) -> np.ndarray:
    x, scale = _float(xs[0]), _float(xs[1])
    zero = _float(xs[2]) if len(xs) > 2 and xs[2] is not None else np.zeros_like(scale)
    if scale.size == 1:
        return np.asarray((x - zero.reshape(())) * scale.reshape(()))
    axis = attr(node, "axis", 1) % x.ndim
    block = attr(node, "block_size", 0)
    if block:
        scale = np.repeat(scale, block, axis=axis).take(range(x.shape[axis]), axis=axis)
        zero = np.repeat(zero, block, axis=axis).take(range(x.shape[axis]), axis=axis)
        return np.asarray((x - zero) * scale)
    shape = [1] * x.ndim
    shape[axis] = -1
    return np.asarray((x - zero.reshape(shape)) * scale.reshape(shape))


def _cast(node: onnx.NodeProto, xs: list[np.ndarray]) -> np.ndarray:
    to = attr(node, "to")
    name = onnx.TensorProto.DataType.Name(to).lower()
    if "float" in name:
        return _float(xs[0])
    if name == "bool":
        return np.asarray(xs[0]).astype(bool)
    return np.asarray(xs[0]).astype(np.int64)


def _reshape(node: onnx.NodeProto, xs: list[np.ndarray]) -> np.ndarray:
    shape = [int(d) for d in xs[1]]
    if not attr(node, "allowzero", 0):
        shape = [xs[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return np.reshape(xs[0], shape)


def _axes(node: onnx.NodeProto, xs: list[np.ndarray]) -> list[int] | None:
    if len(xs) > 1 and xs[1] is not None:
        return [int(a) for a in xs[1]]
    axes = attr(node, "axes")
    return None if axes is None else [int(a) for a in axes]


def _unsqueeze(node: onnx.NodeProto, xs: list[np.ndarray]) -> np.ndarray:
    axes = _axes(node, xs) or []
    out = xs[0]
    for a in sorted(a % (out.ndim + len(axes)) for a in axes):
        out = np.expand_dims(out, a)
    return out


def _squeeze(node: onnx.NodeProto, xs: list[np.ndarray]) -> np.ndarray:
    axes = _axes(node, xs)
    return np.squeeze(xs[0], axis=None if axes is None else tuple(axes))


def _cumsum(node: onnx.NodeProto, xs: list[np.ndarray]) -> np.ndarray:
    x, axis = xs[0], int(np.asarray(xs[1]).reshape(()))
    if attr(node, "reverse", 0):
        x = np.flip(x, axis)
    out = np.cumsum(x, axis=axis, dtype=x.dtype)
    if attr(node, "exclusive", 0):
        out = out - x
    return np.flip(out, axis) if attr(node, "reverse", 0) else out


def _slice(node: onnx.NodeProto, xs: list[np.ndarray]) -> np.ndarray:
    data, starts, ends = xs[0], list(xs[1]), list(xs[2])
    axes = list(xs[3]) if len(xs) > 3 and xs[3] is not None else list(range(len(starts)))
    steps = list(xs[4]) if len(xs) > 4 and xs[4] is not None else [1] * len(starts)
    index = [slice(None)] * data.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        index[int(a)] = slice(int(s), int(e), int(st))
    return data[tuple(index)]


def _bitshift(node: onnx.NodeProto, xs: list[np.ndarray]) -> np.ndarray:
    if attr(node, "direction") == "LEFT":
        return np.asarray(np.left_shift(xs[0], xs[1]))
    return np.asarray(np.right_shift(xs[0], xs[1]))


OPS: Mapping[str, Callable[[onnx.NodeProto, list[np.ndarray]], np.ndarray]] = {
    "Identity": lambda n, xs: xs[0],
    "DequantizeLinear": _dequantize,
    "Cast": _cast,
    "Gather": lambda n, xs: np.take(
        xs[0], np.asarray(xs[1], dtype=np.int64), axis=attr(n, "axis", 0)
    ),
    "Reshape": _reshape,
    "Transpose": lambda n, xs: np.transpose(xs[0], attr(n, "perm")),
    "Flatten": lambda n, xs: xs[0].reshape(int(np.prod(xs[0].shape[: attr(n, "axis", 1)])), -1),
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Concat": lambda n, xs: np.concatenate(xs, axis=attr(n, "axis")),
    "Expand": lambda n, xs: np.broadcast_to(
        xs[0], np.broadcast_shapes(xs[0].shape, tuple(int(d) for d in xs[1]))
    ),
    "Slice": _slice,
    "Mul": lambda n, xs: np.multiply(xs[0], xs[1]),
    "Add": lambda n, xs: np.add(xs[0], xs[1]),
    "Sub": lambda n, xs: np.subtract(xs[0], xs[1]),
    "Div": lambda n, xs: np.divide(xs[0], xs[1]),
    "Neg": lambda n, xs: np.negative(xs[0]),
    "Where": lambda n, xs: np.where(xs[0], xs[1], xs[2]),
    "Equal": lambda n, xs: np.equal(xs[0], xs[1]),
    "Not": lambda n, xs: np.logical_not(xs[0]),
    "BitShift": _bitshift,
    "BitwiseAnd": lambda n, xs: np.bitwise_and(xs[0], xs[1]),
    "BitwiseOr": lambda n, xs: np.bitwise_or(xs[0], xs[1]),
    "CumSum": _cumsum,
}


def evaluate(
    name: str,
    producers: Mapping[str, onnx.NodeProto],
    leaf: Callable[[str], np.ndarray],
    memo: dict[str, np.ndarray] | None = None,
) -> np.ndarray:
    """The value of tensor `name`: a leaf (initializer/Constant) or decoded from its producer."""
    memo = {} if memo is None else memo
    if name in memo:
        return memo[name]
    node = producers.get(name)
    if node is None:
        value = leaf(name)
    else:
        if node.op_type not in OPS or node.domain not in ("", "ai.onnx"):
            raise Unsupported(f"cannot decode op {node.op_type}")
        xs = [evaluate(i, producers, leaf, memo) if i else None for i in node.input]
        out = OPS[node.op_type](node, xs)  # type: ignore[arg-type]
        if len(node.output) != 1:
            raise Unsupported(f"{node.op_type} with {len(node.output)} outputs")
        value = np.asarray(out)
    memo[name] = value
    return value
