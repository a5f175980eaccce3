"""``quant.weight_only``: int4/int8 weights behind DequantizeLinear, activations untouched.

``DequantizeLinear(W_q, scale, zero_point; axis=0, block_size) -> MatMul`` is the standard
form onnxruntime turns into MatMulNBits, which keeps the packed weights in memory and never
materialises the float matrix. Gemm is rewritten to MatMul (+ Add for the bias) first, with
B transposed to [K, N] and alpha folded into the scales, so every linear op takes that form.
int4 and blocked quantization need opset 21; the graph is moved there when that keeps the
model's meaning (see `qdq_opset`), otherwise the pass skips with the reason.

What the fused kernel computes depends on a session option, not on the model:
``session.qdq_matmulnbits_accuracy_level`` (onnxruntime's default 4 quantizes activations to
int8 per block). The pass reports the level it was configured for in
``stats["session_config"]``, so validation and deployment can use the same setting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxshrink.calibration.collect import scratch
from onnxshrink.errors import PreconditionError
from onnxshrink.ir import edit
from onnxshrink.kernels import quantize as qk
from onnxshrink.passes import register
from onnxshrink.passes.base import Context, Pass, PassParams, PassResult, expect
from onnxshrink.passes.qdq_opset import blocker, raise_opset
from onnxshrink.passes.qdq_plan import already_quantized
from onnxshrink.passes.qdq_probe import node_names, op_counts, optimized_model

ACCURACY_CONFIG = "session.qdq_matmulnbits_accuracy_level"
#: What MatMulNBits computes at each accuracy level (onnxruntime's documentation).
ACCURACY_LEVELS = {
    0: "unset: the kernel's default (float32 activations on CPU)",
    1: "float32 activations and accumulation",
    2: "float16 activations",
    3: "bfloat16 activations",
    4: "int8 activations (quantized per block of K at run time), int32 accumulation",
}
_ML = {"int4": ml_dtypes.int4, "uint4": ml_dtypes.uint4}


@dataclass(frozen=True, kw_only=True)
class WeightOnlyQuantParams(PassParams):
    """Parameters of ``quant.weight_only``."""

    bits: Literal[4, 8] = 4
    #: Elements of K sharing one scale (a power of two >= 16); 0 means one scale per column.
    block_size: int = 32
    #: Symmetric signed weights (zero point 0) or asymmetric unsigned ones with a zero point.
    symmetric: bool = False
    #: Clip each block's range to minimize rounding error (matters most at 4 bits).
    weight_calibration: Literal["minmax", "mse"] = "mse"
    #: MatMulNBits accuracy level the result is meant to run with (reported for validation).
    accuracy_level: Literal[0, 1, 2, 3, 4] = 4

    def check(self) -> None:
        """block_size is 0 or a power of two >= 16 (what MatMulNBits accepts)."""
        ok = self.block_size == 0 or (
            self.block_size >= 16 and self.block_size & (self.block_size - 1) == 0
        )
        expect(ok, "block_size", self.block_size, "0 or a power of two >= 16")
        expect(
            not (self.bits == 4 and self.block_size == 0),
            "block_size",
            self.block_size,
            "> 0 when bits = 4 (per-column int4 loses too much accuracy)",
        )


@register("quant.weight_only")
class WeightOnlyQuantPass(Pass[WeightOnlyQuantParams]):
    """Weight-only int4/int8 quantization of MatMul/Gemm as DequantizeLinear -> MatMul.

    Ops: MatMul with a constant 2-D right operand; Gemm with a constant B and transA = 0
    (rewritten as MatMul + Add). Weights: per block of ``block_size`` along K (or per column),
    int4/uint4 or int8/uint8, scales chosen by min/max or by minimizing the rounding error.
    Activations stay float. onnxruntime fuses the result into MatMulNBits (weights packed in
    memory). Preconditions: opset >= 13, and for int4 or blocks a graph that can move to
    opset 21. Numeric effect: 4-bit rounding of weights (relative error ~10%) and, at
    accuracy level 4, int8 rounding of activations inside the fused kernel.
    """

    params_type = WeightOnlyQuantParams
    default_ops = frozenset({"MatMul", "Gemm"})

    def _target_opset(self) -> int:
        return 21 if self.params.bits == 4 or self.params.block_size else 13

    def requires(self, graph: gs.Graph, ctx: Context) -> None:
        """The opset this form needs, reachable without changing the model's meaning."""
        current = int(graph.opset or ctx.opset)
        if current < 10:
            raise PreconditionError(f"quant.weight_only needs opset >= 10 (model has {current})")
        reason = blocker(graph, current, self._target_opset())
        if reason:
            raise PreconditionError(f"cannot move to opset {self._target_opset()}: {reason}")

    def run(self, graph: gs.Graph, targets: Sequence[gs.Node], ctx: Context) -> PassResult:
        """Quantize each eligible weight and put a DequantizeLinear in front of its MatMul."""
        result = PassResult()
        jobs = []
        for node in targets:
            reason = _eligible(node)
            if reason:
                result.skip(node, reason)
            else:
                jobs.append(node)
        if not jobs:
            return result
        names = edit.NameScope(graph)
        before = int(graph.opset or ctx.opset)
        target = self._target_opset()
        half = [n for n in jobs if np.asarray(n.inputs[1].values).dtype == np.float16]
        if half and target < 19:  # float16 scales need opset 19
            if blocker(graph, before, 19) is None:
                target = 19
            else:
                for n in half:
                    result.skip(n, "float16 weight needs opset 19, which would change the model")
                jobs = [n for n in jobs if all(n is not h for h in half)]
        if not jobs:
            return result
        adapted = raise_opset(graph, target, names)
        new_nodes: list[gs.Node] = []
        written: list[_Written] = []
        for node in jobs:
            w = self._quantize(node, names, new_nodes)
            written.append(w)
            result.touch(
                node,
                bits=self.params.bits,
                block_size=self.params.block_size,
                rel_rms_error=w.error,
            )
        graph.nodes.extend(new_nodes)
        level = self.params.accuracy_level
        config = {ACCURACY_CONFIG: str(level)}
        with scratch(ctx.workdir) as wd:
            unfused = _unfused(graph, written, wd, config)
            explicit = [self._explicit(w, names, graph) for w in unfused]
            fused = op_counts(optimized_model(graph, wd, config)) if explicit else None
        result.stats.update(
            opset=f"{before} -> {int(graph.opset)}" if int(graph.opset) != before else before,
            session_config=config,
            fused_compute=f"MatMulNBits accuracy_level={level}: {ACCURACY_LEVELS[level]}",
        )
        if explicit:
            result.stats["explicit_matmulnbits"] = explicit
            result.stats["fused_ops"] = fused
        if adapted:
            result.stats["opset_adapted_nodes"] = adapted
        return result

    def _explicit(self, w: _Written, names: edit.NameScope, graph: gs.Graph) -> str:
        """Replace DQ -> MatMul [-> Add] that onnxruntime did not fuse by a MatMulNBits node.

        Happens for 2-D MatMul + bias + activation: onnxruntime turns it into a Gemm with a
        fused activation before its MatMulNBits fusion can see it, and would then run an fp32
        Gemm on weights dequantized at every call.
        """
        p = self.params
        node, dq = w.node, w.dq
        k, n = w.codes.shape
        bits = p.bits
        # One scale per column is one block spanning K (rounded up to a power of two >= 16).
        block = p.block_size or max(16, 1 << (k - 1).bit_length())
        offset = 0 if w.dtype.startswith("u") else 1 << (bits - 1)
        codes = (w.codes.astype(np.int16) + offset).astype(np.uint8)
        zps = (np.asarray(w.zero_point).astype(np.int16) + offset).astype(np.uint8)
        scale = np.asarray(w.scale).reshape(-1, n)
        packed, zp_packed = qk.pack_matmulnbits(codes, zps.reshape(-1, n), bits, block)
        a = node.inputs[0]
        inputs = [
            a,
            gs.Constant(names.fresh(f"{w.base}_nbits"), packed),
            gs.Constant(names.fresh(f"{w.base}_nbits_scale"), np.ascontiguousarray(scale.T)),
            gs.Constant(names.fresh(f"{w.base}_nbits_zero_point"), zp_packed),
        ]
        out = node.outputs[0]
        add = _bias_add(node, graph, n)
        if add is not None:
            bias_index = 1 if add.inputs[0] is out else 0
            bias = np.asarray(add.inputs[bias_index].values).reshape(-1)
            inputs += [
                gs.Variable.empty(),
                gs.Constant(
                    names.fresh(f"{w.base}_nbits_bias"), bias.astype(np.asarray(w.scale).dtype)
                ),
            ]
            out = add.outputs[0]
            edit.disconnect(add)
        attrs = {
            "K": k,
            "N": n,
            "bits": bits,
            "block_size": block,
            "accuracy_level": p.accuracy_level,
        }
        name = node.name
        edit.disconnect(node)
        edit.disconnect(dq)
        graph.nodes.append(
            gs.Node(
                "MatMulNBits", name, attrs, inputs=inputs, outputs=[out], domain="com.microsoft"
            )
        )
        return name

    def _dtype(self) -> str:
        signed = self.params.symmetric
        if self.params.bits == 4:
            return "int4" if signed else "uint4"
        return "int8" if signed else "uint8"

    def _quantize(self, node: gs.Node, names: edit.NameScope, new_nodes: list[gs.Node]) -> _Written:
        """Rewrite one node into DQ -> MatMul [-> Add]."""
        p = self.params
        w_const = node.inputs[1]
        assert isinstance(w_const, gs.Constant)
        w = np.asarray(w_const.values, np.float32)
        alpha = 1.0
        if node.op == "Gemm":
            if int(node.attrs.get("transB", 0)):
                w = w.T
            alpha = float(node.attrs.get("alpha", 1.0))
        w = np.ascontiguousarray(w)
        dtype = self._dtype()
        block = p.block_size or None
        axis = 0 if block else 1
        choose = qk.mse_weight_qparams if p.weight_calibration == "mse" else qk.weight_qparams
        qp = choose(w, dtype, axis=axis, block_size=block, symmetric=p.symmetric)
        qw = qk.quantize(w, qp)
        err = _rel_error(w, qk.dequantize(qw, qp))
        scale_dtype = np.float16 if np.asarray(w_const.values).dtype == np.float16 else np.float32
        scale = (np.asarray(qp.scale, np.float32) * np.float32(alpha)).astype(scale_dtype)
        base = w_const.name
        attrs: dict[str, int] = {"axis": axis}
        if block:
            attrs["block_size"] = block
        dq_out = gs.Variable(names.fresh(f"{base}_dequantized"), scale_dtype, list(w.shape))
        dq = gs.Node(
            "DequantizeLinear",
            names.fresh(f"{base}_DequantizeLinear"),
            attrs,
            inputs=[
                _int_const(names, f"{base}_quantized", qw, dtype),
                gs.Constant(names.fresh(f"{base}_scale"), scale),
                _int_const(names, f"{base}_zero_point", np.asarray(qp.zero_point), dtype),
            ],
            outputs=[dq_out],
        )
        new_nodes.append(dq)
        if node.op == "MatMul":
            node.inputs[1] = dq_out
        else:
            _gemm_to_matmul(node, dq_out, names, new_nodes)
        return _Written(node, dq, base, qw, scale, np.asarray(qp.zero_point), dtype, err)


@dataclass
class _Written:
    """One rewritten weight: enough to turn it into MatMulNBits if onnxruntime does not."""

    node: gs.Node
    dq: gs.Node
    base: str
    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    dtype: str
    error: float


def _unfused(
    graph: gs.Graph, written: list[_Written], workdir: Path, config: dict[str, str]
) -> list[_Written]:
    """The rewritten weights whose DequantizeLinear survives in onnxruntime's optimized graph."""
    left = node_names(optimized_model(graph, workdir, config))
    return [w for w in written if w.dq.name in left]


def _bias_add(node: gs.Node, graph: gs.Graph, n: int) -> gs.Node | None:
    """A lone Add of a constant [N] bias right after `node`, or None."""
    y = node.outputs[0]
    if len(y.outputs) != 1 or any(o.name == y.name for o in graph.outputs):
        return None
    add = y.outputs[0]
    if add.op != "Add" or len(add.inputs) != 2:
        return None
    c = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
    if not isinstance(c, gs.Constant) or int(np.prod(c.shape)) != n or len(c.shape) > 1:
        return None
    return add


def _eligible(node: gs.Node) -> str | None:
    """Why `node` is left alone, or None."""
    if len(node.inputs) < 2:
        return "expected at least two inputs"
    x, w = node.inputs[0], node.inputs[1]
    if isinstance(x, gs.Constant):
        return "constant left operand"
    if already_quantized(x) or not isinstance(w, gs.Constant):
        return "no constant float weight (already quantized, or activation x activation)"
    if len(w.shape) != 2:
        return f"weight has rank {len(w.shape)}, expected 2"
    if np.asarray(w.values).dtype not in (np.float32, np.float16):
        return "weight is not float32/float16"
    if node.op == "Gemm":
        if int(node.attrs.get("transA", 0)):
            return "Gemm with transA"
        if len(node.inputs) > 2 and node.inputs[2].name:
            c = node.inputs[2]
            n = int(w.shape[0] if node.attrs.get("transB", 0) else w.shape[1])
            if not isinstance(c, gs.Constant) or int(np.prod(c.shape)) not in (1, n):
                return "Gemm bias is not a constant per-output vector"
    return None


def _int_const(names: edit.NameScope, base: str, values: np.ndarray, dtype: str) -> gs.Constant:
    """An integer initializer; 4-bit values go through onnx's packing (gs cannot pack them)."""
    name = names.fresh(base)
    if dtype in _ML:
        proto = numpy_helper.from_array(np.asarray(values).astype(_ML[dtype]), name)
        return gs.Constant(name, LazyValues(proto))
    return gs.Constant(name, np.ascontiguousarray(values))


def _gemm_to_matmul(
    node: gs.Node, weight: gs.Variable, names: edit.NameScope, new_nodes: list[gs.Node]
) -> None:
    """Gemm(A, B, C) -> MatMul(A, DQ(B')) [+ Add(beta * C)], reusing the node object."""
    y = node.outputs[0]
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    beta = float(node.attrs.get("beta", 1.0))
    node.op = "MatMul"
    node.attrs.clear()
    a = node.inputs[0]
    node.inputs.clear()
    node.inputs.extend([a, weight])
    if bias is None:
        return
    assert isinstance(bias, gs.Constant)
    values = (np.asarray(bias.values).reshape(-1) * beta).astype(np.asarray(bias.values).dtype)
    mm_out = gs.Variable(names.fresh(f"{node.name or 'gemm'}_matmul"), y.dtype, y.shape)
    node.outputs[0] = mm_out
    new_nodes.append(
        gs.Node(
            "Add",
            names.fresh(f"{node.name or 'gemm'}_bias_Add"),
            inputs=[mm_out, gs.Constant(names.fresh(f"{bias.name}_beta"), values)],
            outputs=[y],
        )
    )


def _rel_error(w: np.ndarray, wq: np.ndarray) -> float:
    denom = max(float(np.sqrt(np.mean(w.astype(np.float64) ** 2))), 1e-30)
    return round(float(np.sqrt(np.mean((w - wq).astype(np.float64) ** 2))) / denom, 6)
