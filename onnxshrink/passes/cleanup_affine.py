"""Fold per-channel ``Mul``/``Add`` constants into adjacent Conv, ConvTranspose and Gemm weights.

Exporters leave affine ops beside linear layers: PaddlePaddle's PP-LCNet "learnable affine"
blocks write ``Conv -> Mul(c) -> Add(c)`` and ``Mul(c) -> Add(c) -> Conv``, with scalar
constants shaped ``[1]``. onnxruntime does not fuse them (its Conv+Mul/Add fusions want
constants shaped like the output channels), so each one costs a full pass over the activation.
Folding them makes the model faster as written and leaves fewer ops for int8 quantization.

- After a linear op (output read only by the Mul/Add, not a graph output): ``Mul(c)`` scales the
  weight along its output-channel axis and the bias; ``Add(c)`` adds to the bias (created if
  absent). The constant must be per output channel under ONNX broadcasting, so the output shape
  never changes.
- Before a Conv (the Mul/Add output read only as the input of Convs): ``Mul(c)`` scales the
  weight per input channel, exact with any padding; ``Add(c)`` folds ``sum(W * c)`` into the
  bias only when the Conv has no padding, since padded zeros would otherwise read as ``c``. For
  a padded Conv behind ``Mul(s) -> Add(t)``, the pair becomes ``Add(t / s)`` and ``s`` folds in.

Float32/float64 weights only: folded fp16 weights would be rounded to fp16 again (about 5e-4
relative), more than the default recipe's tolerance, so fp16 models keep their Mul/Add. Never a
weight another node also reads (a private copy would grow the file).
Numeric effect: float rounding only (computed in float64, cast back).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.ir import edit, query
from onnxshrink.kernels.folding import (
    channel_vector,
    fold_affine,
    fold_input_scale,
    fold_input_shift,
    shift_before_scale,
)
from onnxshrink.passes.base import PassResult

LINEAR = frozenset({"Conv", "ConvTranspose", "Gemm"})
#: Weight dtypes folded here; fp16 models keep their Mul/Add.
FOLD_DTYPES = (np.float32, np.float64)


def fold(graph: gs.Graph, chosen: set[int], result: PassResult, names: edit.NameScope) -> None:
    """One sweep over the chosen Mul/Add nodes in topological order.

    A chain ``Conv -> Mul -> Add`` folds fully in one sweep (the Add then reads the Conv); the
    caller repeats sweeps until nothing changes. Mul/Add nodes next to a linear op that stay
    get a skip with the reasons.
    """
    for node in list(graph.nodes):
        if id(node) not in chosen or node.op not in ("Mul", "Add") or len(node.outputs) != 1:
            continue
        after = _fold_after_linear(graph, node, result, names)
        if after is None:
            continue
        before = _fold_before_conv(graph, node, result, names)
        if before is None:
            continue
        if _next_to_linear(node):
            result.skip(node, f"not folded: {after}; {before}")


def _next_to_linear(node: gs.Node) -> bool:
    """Whether `node` has a constant operand and reads a linear op's output or feeds a Conv
    (a near miss, worth a skip entry; residual Adds and the like are not)."""
    if split_constant(node) is None:
        return False
    reads = any(getattr(query.producer(t), "op", None) in LINEAR for t in node.inputs)
    return reads or any(c.op == "Conv" for c in node.outputs[0].outputs)


def split_constant(node: gs.Node) -> tuple[np.ndarray, gs.Variable] | None:
    """(constant values, variable input) of a binary op with exactly one constant operand."""
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if isinstance(a, gs.Constant) and isinstance(b, gs.Variable):
        return np.asarray(a.values), b
    if isinstance(b, gs.Constant) and isinstance(a, gs.Variable):
        return np.asarray(b.values), a
    return None


def _fold_after_linear(
    graph: gs.Graph, node: gs.Node, result: PassResult, names: edit.NameScope
) -> str | None:
    """Fold ``linear -> node`` into the linear op; None when done, else why not."""
    operands = split_constant(node)
    if operands is None:
        return "no single constant operand"
    const, y = operands
    lin = query.producer(y)
    if lin is None or lin.op not in LINEAR:
        return "input is not produced by Conv/ConvTranspose/Gemm"
    reason = linear_blocker(graph, lin, y) or _exclusive_weight(lin)
    if reason is not None:
        return reason
    rank, axis, channels = _output_layout(lin)
    vec = channel_vector(const, rank, axis, channels)
    if vec is None or const.dtype.kind != "f":
        return f"constant of shape {list(const.shape)} is not per output channel of {lin.op}"
    if node.op == "Mul":
        scale_shift_linear(lin, vec, np.zeros(channels), names)
    else:
        scale_shift_linear(lin, np.ones(channels), vec, names)
    result.touch(label(node), action="folded into " + (lin.name or lin.op))
    out = node.outputs[0]
    edit.disconnect(node)
    lin.outputs.clear()
    lin.outputs.append(out)
    return None


def linear_blocker(graph: gs.Graph, lin: gs.Node, y: gs.Tensor) -> str | None:
    """Why a per-channel affine map of `lin`'s output `y` cannot fold into `lin`, or None."""
    if len(y.outputs) != 1 or query.is_graph_output(graph, y):
        return f"{lin.op} output has other consumers"
    if len(lin.inputs) < 2 or not isinstance(lin.inputs[1], gs.Constant):
        return f"{lin.op} weight is not constant"
    if len(lin.inputs) > 2 and lin.inputs[2].name and not isinstance(lin.inputs[2], gs.Constant):
        return f"{lin.op} bias is not constant"
    if lin.op == "ConvTranspose" and lin.attrs.get("group", 1) != 1:
        return "grouped ConvTranspose"
    if lin.op == "Gemm":
        c = lin.inputs[2] if len(lin.inputs) > 2 and lin.inputs[2].name else None
        if c is not None and int(np.prod(c.shape)) not in (1, _output_layout(lin)[2]):
            return "Gemm bias is not per output channel"
    if np.asarray(lin.inputs[1].values).dtype.kind != "f":
        return f"{lin.op} weight is not floating point"
    return None


def _exclusive_weight(node: gs.Node) -> str | None:
    """Why `node`'s weight may not be rewritten here (shared, or not float32/64), or None."""
    weight = node.inputs[1]
    if len(weight.outputs) != 1:
        return f"{node.op} weight is shared with another node"
    if np.asarray(weight.values).dtype not in FOLD_DTYPES:
        return f"{node.op} weight is not float32/float64"
    return None


def _output_layout(lin: gs.Node) -> tuple[int, int, int]:
    """(output rank, channel axis, output channels) of a Conv/ConvTranspose/Gemm."""
    shape = lin.inputs[1].shape
    if lin.op == "Gemm":
        return 2, 1, shape[0] if lin.attrs.get("transB", 0) else shape[1]
    if lin.op == "ConvTranspose":
        return len(shape), 1, shape[1] * lin.attrs.get("group", 1)
    return len(shape), 1, shape[0]


def scale_shift_linear(lin: gs.Node, s: np.ndarray, t: np.ndarray, names: edit.NameScope) -> None:
    """Rewrite `lin` so its output becomes ``s * y + t`` per output channel."""
    if lin.op == "Gemm":
        _scale_shift_gemm(lin, s, t, names)
        return
    axis = 0 if lin.op == "Conv" else 1
    bias = lin.inputs[2].values if len(lin.inputs) > 2 and lin.inputs[2].name else None
    new_w, new_b = fold_affine(lin.inputs[1].values, bias, s, t, axis)
    set_input(lin, 1, new_w, names)
    set_input(lin, 2, new_b, names)


def _scale_shift_gemm(gemm: gs.Node, s: np.ndarray, t: np.ndarray, names: edit.NameScope) -> None:
    w = gemm.inputs[1].values
    axis = 0 if gemm.attrs.get("transB", 0) else 1
    beta = float(gemm.attrs.get("beta", 1.0))
    c = None
    if len(gemm.inputs) > 2 and gemm.inputs[2].name:  # alpha scales A.B only: scaling W is exact
        c = np.broadcast_to(gemm.inputs[2].values.astype(np.float64).reshape(-1), s.shape)
    new_w, new_c = fold_affine(w, None if c is None else beta * c, s, t, axis)
    set_input(gemm, 1, new_w, names)
    set_input(gemm, 2, new_c, names)
    gemm.attrs["beta"] = 1.0


def set_input(node: gs.Node, index: int, values: np.ndarray, names: edit.NameScope) -> None:
    """Give `node` new constant values at `index`, never mutating a tensor others share."""
    if index < len(node.inputs) and isinstance(node.inputs[index], gs.Constant):
        old = node.inputs[index]
        if len(old.outputs) == 1:
            old.values = values
            return
        name = names.fresh(f"{old.name}_folded")
    else:
        name = names.fresh(f"{node.name or node.op}_bias")
    while len(node.inputs) <= index:
        node.inputs.append(gs.Variable.empty())
    node.inputs[index] = gs.Constant(name, values)


def label(node: gs.Node) -> str:
    """A report key for a node (call before disconnecting it): exporters often leave nodes
    unnamed, so those are keyed by op and output name."""
    if node.name:
        return str(node.name)
    out = node.outputs[0].name if node.outputs else ""
    return f"{node.op}:{out}"


def _fold_before_conv(
    graph: gs.Graph, node: gs.Node, result: PassResult, names: edit.NameScope
) -> str | None:
    """Fold ``node -> Conv`` into every Conv reading it; None when done, else why not."""
    operands = split_constant(node)
    z = node.outputs[0]
    convs = list(z.outputs)
    if operands is None or not convs or query.is_graph_output(graph, z):
        return "output is not read only by Convs"
    if any(
        c.op != "Conv" or c.inputs[0] is not z or any(t is z for t in c.inputs[1:]) for c in convs
    ):
        return "output is not read only as the input of Convs"
    const, x = operands
    vecs = []
    for conv in convs:
        vec = _input_vector(conv, const, x)
        if isinstance(vec, str):
            return vec
        vecs.append(vec)
    if node.op == "Add" and any(_padded(c) for c in convs):
        return _swap_into_padded(graph, node, convs, vecs, result, names)
    for conv, vec in zip(convs, vecs):
        _fold_into_input(conv, node.op, vec, names)
        conv.inputs[0] = x
    result.touch(label(node), action="folded into " + ", ".join(c.name or c.op for c in convs))
    edit.disconnect(node)
    return None


def _input_vector(conv: gs.Node, const: np.ndarray, x: gs.Tensor) -> np.ndarray | str:
    """`const` per input channel of `conv` when ``x op const`` keeps x's shape, or why not."""
    if len(conv.inputs) < 2 or not isinstance(conv.inputs[1], gs.Constant):
        return "Conv weight is not constant"
    if len(conv.inputs) > 2 and conv.inputs[2].name and not isinstance(conv.inputs[2], gs.Constant):
        return "Conv bias is not constant"
    reason = _exclusive_weight(conv)
    if reason is not None:
        return reason
    shape = conv.inputs[1].shape
    rank, cin = len(shape), shape[1] * int(conv.attrs.get("group", 1))
    vec = channel_vector(const, rank, 1, cin)
    if vec is None or const.dtype.kind != "f":
        return f"constant of shape {list(const.shape)} is not per input channel of Conv"
    if not _keeps_shape(x, const, rank, cin):
        return "the constant could broadcast the Conv input to a larger shape"
    return vec


def _keeps_shape(x: gs.Tensor, const: np.ndarray, rank: int, cin: int) -> bool:
    """Whether ``x op const`` surely has x's shape: the constant adds no axes and does not
    expand a size-1 channel axis of x (checked on x's inferred shape when it could)."""
    known = x.shape is not None and len(x.shape) == rank
    if const.ndim == rank and not known:
        return False
    if const.size == 1:
        return True
    return known and x.shape[1] == cin


def _padded(conv: gs.Node) -> bool:
    """Whether the Conv may pad its input (explicit pads or SAME auto-padding)."""
    auto_pad = conv.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    return auto_pad not in ("NOTSET", "VALID") or any(int(p) for p in conv.attrs.get("pads", []))


def _fold_into_input(conv: gs.Node, op: str, vec: np.ndarray, names: edit.NameScope) -> None:
    weight = conv.inputs[1].values
    group = int(conv.attrs.get("group", 1))
    if op == "Mul":
        set_input(conv, 1, fold_input_scale(weight, vec, group), names)
        return
    bias = conv.inputs[2].values if len(conv.inputs) > 2 and conv.inputs[2].name else None
    set_input(conv, 2, fold_input_shift(weight, bias, vec, group), names)


def _swap_into_padded(
    graph: gs.Graph,
    add: gs.Node,
    convs: list[gs.Node],
    shifts: list[np.ndarray],
    result: PassResult,
    names: edit.NameScope,
) -> str | None:
    """``Mul(s) -> Add(t) -> padded Conv`` becomes ``Add(t / s) -> Conv(W * s)``: one op less,
    and exact up to rounding, since padded zeros of ``x + t/s`` stay zeros after the scale."""
    blocked = "Conv pads its input (an Add before it is not foldable)"
    add_operands = split_constant(add)
    assert add_operands is not None  # checked by the caller
    t_const, y = add_operands
    mul = query.producer(y)
    if mul is None or mul.op != "Mul" or len(y.outputs) != 1 or query.is_graph_output(graph, y):
        return blocked
    mul_operands = split_constant(mul)
    if mul_operands is None:
        return blocked
    s_const, x = mul_operands
    scales = [_input_vector(conv, s_const, x) for conv in convs]
    if any(not np.array_equal(t, shifts[0]) for t in shifts):
        return blocked
    u = None if isinstance(scales[0], str) else shift_before_scale(scales[0], shifts[0])
    if u is None or any(isinstance(s, str) for s in scales):
        return blocked
    rank = len(convs[0].inputs[1].shape)
    if np.ptp(u) == 0:  # one value: keep the Add's constant shape (it already keeps x's shape)
        u_const = np.full(t_const.shape, u[0])
    else:  # per channel, rank - 1 so it aligns with axis 1; x's channels are known (checked)
        u_const = u.reshape((-1,) + (1,) * (rank - 2))
    for conv, s in zip(convs, scales):
        _fold_into_input(conv, "Mul", np.asarray(s), names)
    index = next(i for i, t in enumerate(add.inputs) if isinstance(t, gs.Constant))
    set_input(add, index, u_const.astype(t_const.dtype), names)
    add.inputs[1 - index] = x
    result.touch(label(mul), action="moved after the Add and folded into Conv")
    result.touch(label(add), action="shift divided by the folded scale")
    edit.disconnect(mul)
    return None
