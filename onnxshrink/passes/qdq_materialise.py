"""Phase two of QDQ quantization: the one place that inserts Q/DQ nodes and integer weights.

Given a `QuantPlan` and calibrated activation parameters, this module:

- gives each planned activation one QuantizeLinear -> DequantizeLinear pair (carriers reuse
  their source's scale and zero point initializers), and points every consumer at the
  dequantized tensor, so the producer's output feeds only Q (what the fusions require);
- quantizes each weight once (tied weights share one int8 initializer and one scale, with one
  DequantizeLinear per consumer, as onnxruntime's fusions want a DQ per node);
- turns biases into int32 with scale = input scale x weight scale and zero point 0;
- always writes explicit zero points (QGemm is only fused with them);
- keeps float16 graphs float16 outside the quantized ops: Cast to float32 before Q, and a Cast
  back to float16 after an anchor's output and for float consumers of a DQ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxshrink.ir import edit
from onnxshrink.kernels import quantize as qk
from onnxshrink.passes.qdq_plan import BiasUse, QuantPlan, WeightUse

_NP = {"int8": np.int8, "uint8": np.uint8, "int32": np.int32}


@dataclass(frozen=True)
class WeightConfig:
    """How weights are quantized."""

    dtype: str = "int8"
    symmetric: bool = True
    reduce_range: bool = False
    method: str = "minmax"


@dataclass
class Materialised:
    """What was written, for the pass result."""

    weights: dict[str, dict[str, Any]] = field(default_factory=dict)
    activations: dict[str, dict[str, float]] = field(default_factory=dict)
    saturated_biases: list[str] = field(default_factory=list)
    corrected_biases: dict[str, float] = field(default_factory=dict)


def const(names: edit.NameScope, base: str, values: np.ndarray) -> gs.Constant:
    """A new initializer with a fresh deterministic name."""
    return gs.Constant(names.fresh(base), np.array(values, copy=True, order="C"))


def materialise(
    graph: gs.Graph,
    plan: QuantPlan,
    act_qparams: dict[str, qk.QParams],
    names: edit.NameScope,
    wcfg: WeightConfig,
    weight_dtypes: dict[str, str] | None = None,
    input_means: dict[int, np.ndarray] | None = None,
) -> Materialised:
    """Insert every Q/DQ the plan asks for (the only graph mutation of quant.qdq).

    `weight_dtypes` overrides ``wcfg.dtype`` per weight tensor name; `input_means` (keyed by
    ``id(anchor)``) enables bias correction for those anchors.
    """
    out = Materialised()
    anchor_ids = {id(n) for n in plan.anchors}
    new_nodes: list[gs.Node] = []
    weights = _weights(plan.weights, names, wcfg, out, new_nodes, weight_dtypes or {})
    _biases(plan, plan.biases, act_qparams, weights, names, out, new_nodes, input_means or {})
    _activations(graph, plan, act_qparams, anchor_ids, names, out, new_nodes)
    for node in plan.anchors:
        _float16_anchor(node, names, new_nodes)
    graph.nodes.extend(new_nodes)
    return out


def _q_dq(
    names: edit.NameScope,
    base: str,
    x: gs.Tensor,
    scale: gs.Constant,
    zp: gs.Constant,
    qdtype: type[np.integer],
    axis: int | None = None,
) -> tuple[list[gs.Node], gs.Variable]:
    q_out = gs.Variable(names.fresh(f"{base}_quantized"), qdtype, x.shape)
    dq_out = gs.Variable(names.fresh(f"{base}_dequantized"), np.float32, x.shape)
    attrs = {} if axis is None else {"axis": axis}
    q = gs.Node(
        "QuantizeLinear",
        names.fresh(f"{base}_QuantizeLinear"),
        dict(attrs),
        inputs=[x, scale, zp],
        outputs=[q_out],
    )
    dq = gs.Node(
        "DequantizeLinear",
        names.fresh(f"{base}_DequantizeLinear"),
        dict(attrs),
        inputs=[q_out, scale, zp],
        outputs=[dq_out],
    )
    return [q, dq], dq_out


def _activations(
    graph: gs.Graph,
    plan: QuantPlan,
    act_qparams: dict[str, qk.QParams],
    anchor_ids: set[int],
    names: edit.NameScope,
    out: Materialised,
    new_nodes: list[gs.Node],
) -> None:
    tensors = graph.tensors()
    params: dict[str, tuple[gs.Constant, gs.Constant, qk.QParams]] = {}
    for name in plan.activations:
        root = plan.root(name)
        if root not in params:
            qp = act_qparams[root]
            params[root] = (
                const(names, f"{root}_scale", np.asarray(qp.scale, np.float32).reshape(())),
                const(names, f"{root}_zero_point", np.asarray(qp.zero_point).reshape(())),
                qp,
            )
            out.activations[root] = {
                "scale": float(np.asarray(qp.scale).reshape(-1)[0]),
                "zero_point": int(np.asarray(qp.zero_point).reshape(-1)[0]),
            }
        scale, zp, qp = params[root]
        x = tensors[name]
        consumers = list(x.outputs)
        is_half = x.dtype is not None and np.dtype(x.dtype) == np.float16
        src: gs.Tensor = x
        if is_half:
            src = gs.Variable(names.fresh(f"{name}_float"), np.float32, x.shape)
            new_nodes.append(edit.cast_node(names, name, x, src, onnx.TensorProto.FLOAT))
        nodes, dq_out = _q_dq(names, name, src, scale, zp, qk.container(qp.dtype))
        new_nodes += nodes
        half_out: gs.Variable | None = None
        for node in consumers:
            target: gs.Tensor = dq_out
            if is_half and id(node) not in anchor_ids:
                if half_out is None:
                    half_out = gs.Variable(
                        names.fresh(f"{name}_dequantized_half"), np.float16, x.shape
                    )
                    half = onnx.TensorProto.FLOAT16
                    new_nodes.append(edit.cast_node(names, name, dq_out, half_out, half))
                target = half_out
            for i, t in enumerate(node.inputs):
                if t is x:
                    node.inputs[i] = target


def _unify_axis(uses: Sequence[WeightUse]) -> int | None:
    """One axis for all consumers of a tied weight; per-tensor if they disagree."""
    axes = {u.axis for u in uses}
    return axes.pop() if len(axes) == 1 else None


def _weights(
    uses: list[WeightUse],
    names: edit.NameScope,
    wcfg: WeightConfig,
    out: Materialised,
    new_nodes: list[gs.Node],
    dtypes: dict[str, str],
) -> dict[str, tuple[qk.QParams, gs.Constant]]:
    groups: dict[str, list[WeightUse]] = {}
    for u in uses:
        groups.setdefault(u.tensor, []).append(u)
    result: dict[str, tuple[qk.QParams, gs.Constant]] = {}
    for name, group in groups.items():
        tensor = group[0].node.inputs[group[0].index]
        assert isinstance(tensor, gs.Constant)
        w = np.asarray(tensor.values, dtype=np.float32)
        axis = _unify_axis(group)
        choose = qk.mse_weight_qparams if wcfg.method == "mse" else qk.weight_qparams
        dtype = dtypes.get(name, wcfg.dtype)
        reduce = dtype == "int7" or (wcfg.reduce_range and dtype == "int8")
        dtype = "int8" if dtype == "int7" else dtype
        qp = choose(w, dtype, axis=axis, symmetric=wcfg.symmetric, reduce_range=reduce)
        qw = qk.quantize(w, qp)
        shape = np.shape(qp.scale)
        q_const = const(names, f"{name}_quantized", qw)
        s_const = const(names, f"{name}_scale", np.asarray(qp.scale, np.float32).reshape(shape))
        z_const = const(names, f"{name}_zero_point", np.asarray(qp.zero_point).reshape(shape))
        for u in group:
            dq = _dequantize(names, name, (q_const, s_const, z_const), axis, list(w.shape))
            u.node.inputs[u.index] = dq.outputs[0]
            new_nodes.append(dq)
        result[name] = (qp, tensor)
        err = float(
            np.sqrt(np.mean((qk.dequantize(qw, qp) - w) ** 2))
            / max(float(np.sqrt(np.mean(w**2))), 1e-30)
        )
        out.weights[name] = {
            "dtype": "int7" if reduce else dtype,
            "axis": axis,
            "consumers": len(group),
            "rel_rms_error": round(err, 6),
        }
    return result


def _biases(
    plan: QuantPlan,
    uses: list[BiasUse],
    act_qparams: dict[str, qk.QParams],
    weights: dict[str, tuple[qk.QParams, gs.Constant]],
    names: edit.NameScope,
    out: Materialised,
    new_nodes: list[gs.Node],
    means: dict[int, np.ndarray],
) -> None:
    for u in uses:
        tensor = u.node.inputs[u.index]
        assert isinstance(tensor, gs.Constant)
        b = np.asarray(tensor.values, dtype=np.float64).reshape(-1) * u.beta
        x_qp = act_qparams[plan.root(u.act)]
        w_qp, w_const = weights[u.weight]
        anchor = u.anchor if u.anchor is not None else u.node
        if id(anchor) in means:
            shift = _correction(anchor, w_const, w_qp, means[id(anchor)])
            if shift is not None:
                b = b + shift
                out.corrected_biases[tensor.name] = round(float(np.abs(shift).max()), 6)
        if not u.quantize:
            values = (b / u.beta).astype(np.asarray(tensor.values).dtype).reshape(tensor.shape)
            u.node.inputs[u.index] = const(names, f"{tensor.name}_corrected", values)
            continue
        bqp = qk.quantize_bias(b, float(np.asarray(x_qp.scale).reshape(-1)[0]), w_qp.scale)
        qb = qk.quantize_int32(b, bqp)
        if np.any(np.abs(qb.astype(np.int64)) >= 2**31 - 1):
            out.saturated_biases.append(tensor.name)
        shape = np.shape(bqp.scale)
        q_const = const(names, f"{tensor.name}_quantized", qb)
        s_const = const(names, f"{tensor.name}_scale", np.asarray(bqp.scale, np.float32))
        z_const = const(names, f"{tensor.name}_zero_point", np.zeros(shape, np.int32))
        axis = None if bqp.axis is None else 0
        dq = _dequantize(names, tensor.name, (q_const, s_const, z_const), axis, [b.size])
        u.node.inputs[u.index] = dq.outputs[0]
        if u.beta != 1.0:
            u.node.attrs["beta"] = 1.0
        new_nodes.append(dq)


def _correction(
    anchor: gs.Node, w_const: gs.Constant, w_qp: qk.QParams, mean: np.ndarray
) -> np.ndarray | None:
    """Bias shift that cancels the mean output error of rounding `anchor`'s weight."""
    w = np.asarray(w_const.values, np.float32)
    dw = w - qk.dequantize(qk.quantize(w, w_qp), w_qp)
    if anchor.op == "Conv":
        group = int(anchor.attrs.get("group", 1))
        if mean.size != dw.shape[1] * group:
            return None
        return qk.bias_correction(dw, mean, layout="conv", group=group)
    if anchor.op == "Gemm":
        if int(anchor.attrs.get("transA", 0)):
            return None
        alpha = float(anchor.attrs.get("alpha", 1.0))
        layout: Literal["rows", "cols"] = "rows" if int(anchor.attrs.get("transB", 0)) else "cols"
        return alpha * qk.bias_correction(dw, mean, layout=layout)
    if anchor.op == "MatMul" and dw.ndim == 2 and mean.size == dw.shape[0]:
        return qk.bias_correction(dw, mean, layout="cols")
    return None


def _float16_anchor(node: gs.Node, names: edit.NameScope, new_nodes: list[gs.Node]) -> None:
    """Run a float16 anchor in float32 between its DQ inputs and a Cast back to float16."""
    for i, t in enumerate(node.inputs):
        if t.name and t.dtype is not None and np.dtype(t.dtype) == np.float16:
            if isinstance(t, gs.Constant):
                node.inputs[i] = gs.Constant(
                    names.fresh(f"{t.name}_float"), np.asarray(t.values, np.float32)
                )
            else:
                y = gs.Variable(names.fresh(f"{t.name}_float"), np.float32, t.shape)
                new_nodes.append(edit.cast_node(names, t.name, t, y, onnx.TensorProto.FLOAT))
                node.inputs[i] = y
    for i, y in enumerate(list(node.outputs)):
        if y.dtype is not None and np.dtype(y.dtype) == np.float16:
            y32 = gs.Variable(names.fresh(f"{y.name}_float"), np.float32, y.shape)
            node.outputs[i] = y32
            new_nodes.append(edit.cast_node(names, y.name, y32, y, onnx.TensorProto.FLOAT16))


#: u8s8 kernels on x86 without VNNI add pairs of uint8 x int8 products in int16: two inputs
#: above ~129 with weights near 127 saturate. Below this zero point, inputs that high are the
#: rare top of a one-sided range (ReLU/HardSwish outputs), so int8 weights stay safe.
SATURATION_SAFE_ZERO_POINT = 32


def weight_dtypes(
    qplan: QuantPlan, act_qparams: dict[str, qk.QParams], choice: str
) -> dict[str, str]:
    """Weight dtype per weight tensor; "auto" avoids u8s8 saturation at the lowest cost.

    x86 u8s8 kernels without VNNI add pairs of uint8 x int8 products in int16. Inputs whose
    uint8 zero point sits far from 0 (signed activations) make that sum overflow with full-range
    int8 weights (measured: OCR recognizer character agreement 0.94 -> 0.90, MiniLM cosine
    0.9986 -> 0.9977). Two exact ways out, chosen per op from measurements:
    - Conv: weights in [-64, 63] ("int7") cannot overflow (2 x 255 x 64 < 32768) and keep the
      symmetric int8 convolution kernels; uint8 weights run 1.6x slower there (OCR detector).
    - MatMul/Gemm: uint8 weights (zero point 128) never saturate and run as fast as int8 in
      MatMulIntegerToFloat / QGemm, with a full 8 bits (MiniLM: 0.9986 vs 0.9976 with int7).
    A weight shared by several consumers takes the safer choice.
    """
    if choice != "auto":
        return {u.tensor: choice for u in qplan.weights}
    inputs: dict[int, str] = {}
    for node in qplan.anchors:
        if node.inputs and node.inputs[0].name in qplan.activations:
            inputs[id(node)] = qplan.root(node.inputs[0].name)
    out: dict[str, str] = {}
    for u in qplan.weights:
        act = inputs.get(id(u.node))
        risky = False
        if act is not None and act_qparams[act].dtype == "uint8":
            zp = int(np.asarray(act_qparams[act].zero_point).reshape(-1)[0])
            risky = zp > SATURATION_SAFE_ZERO_POINT
        if out.get(u.tensor) in ("int7", "uint8"):
            continue  # another consumer already needed the safe form
        safe = "uint8" if u.node.op in ("MatMul", "Gemm") else "int7"
        out[u.tensor] = safe if risky else "int8"
    return out


def _dequantize(
    names: edit.NameScope,
    base: str,
    qsz: tuple[gs.Constant, gs.Constant, gs.Constant],
    axis: int | None,
    shape: list[int],
) -> gs.Node:
    """A float32 DequantizeLinear of (values, scale, zero point); `axis` when per channel."""
    out = gs.Variable(names.fresh(f"{base}_dequantized"), np.float32, shape)
    attrs = {} if axis is None else {"axis": axis}
    return gs.Node(
        "DequantizeLinear", names.fresh(f"{base}_DequantizeLinear"), attrs,
        inputs=list(qsz), outputs=[out],
    )
