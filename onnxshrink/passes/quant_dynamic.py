"""``quant.dynamic``: int8 weights, activations quantized at run time (no calibration).

The graph uses only standard ops, in the form onnxruntime fuses:
``DynamicQuantizeLinear(x) -> MatMulInteger(x_q, W_q, x_zp, w_zp) -> Cast -> Mul(x_s * w_s)
[-> Add(bias)]`` becomes MatMulIntegerToFloat, and with its DynamicQuantizeLinear
DynamicQuantizeMatMul. One DynamicQuantizeLinear is shared by every MatMul reading the same
tensor (Q/K/V projections quantize their input once).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxshrink.calibration import collect, sources
from onnxshrink.errors import PreconditionError
from onnxshrink.ir import edit
from onnxshrink.kernels import quantize as qk
from onnxshrink.passes import register
from onnxshrink.passes.base import Context, Pass, PassParams, PassResult, expect_guard
from onnxshrink.passes.qdq_plan import already_quantized, is_float
from onnxshrink.passes.quant_saturation import Choice, SaturationProbe, choose
from onnxshrink.passes.quant_smooth import SmoothQuantParams, smooth
from onnxshrink.passes.whole_guard import check_whole, guard_tolerance, restore


@dataclass(frozen=True, kw_only=True)
class DynamicQuantParams(PassParams):
    """Parameters of ``quant.dynamic``."""

    #: Activations are uint8 with a run-time zero point near 128 for signed inputs, where x86
    #: u8s8 kernels without VNNI saturate int16 pair sums; uint8 weights (zero point 128) use
    #: the u8u8 kernels that do not. int8 is faster where that saturation cannot happen.
    #: "auto": int8, with 7-bit codes in the output columns where the u8s8 kernels' saturation,
    #: emulated on the samples, costs more than the bit (``quant_saturation``); same kernels.
    weight_dtype: Literal["uint8", "int8", "auto"] = "uint8"
    #: "auto" measures on the first this many samples, at most `saturation_rows` rows (tokens)
    #: per input.
    saturation_samples: int = 8
    saturation_rows: int = 512
    #: 7-bit int8 weights: the u8s8 kernels' int16 pair sums cannot saturate.
    reduce_range: bool = False
    per_channel: bool = True
    #: Clip weight ranges to minimize rounding error instead of using min/max.
    weight_calibration: Literal["minmax", "mse"] = "minmax"
    #: SmoothQuant the inputs first (quant.smooth with auto alpha; needs samples), inside the
    #: pass so that a guard rejecting the result restores the unsmoothed graph.
    smooth: bool = False
    #: "both": keep the result only if onnxruntime finds it within the recipe's tolerance on
    #: the samples and faster than the input graph at one thread; otherwise restore it.
    guard: Literal["off", "both"] = "off"
    #: Bound used by the guard when the run has no recipe tolerance.
    guard_min_cosine: float = 0.999
    #: The guard keeps the result only below this latency ratio to the input graph.
    guard_max_latency_ratio: float = 0.95

    def check(self) -> None:
        """Ranges of the guard's bounds (any ratio: tests force either verdict with it)."""
        expect_guard(self.guard_min_cosine, self.guard_max_latency_ratio, (1e-6, 1e6))


@dataclass
class _Job:
    """One MatMul/Gemm to rewrite: its input, weight as [K, N], bias and output scale."""

    node: gs.Node
    x: gs.Tensor
    weight: np.ndarray
    weight_name: str
    bias: np.ndarray | None
    alpha: float


@register("quant.dynamic")
class DynamicQuantPass(Pass[DynamicQuantParams]):
    """Dynamic int8 quantization of MatMul/Gemm weights (DynamicQuantizeMatMul in onnxruntime).

    Ops: MatMul with a constant 2-D right operand, Gemm with a constant B (transA = 0).
    Weights: symmetric per output column (uint8 with zero point 128 by default, int8 on
    request); activations: uint8 per tensor, quantized at run time by DynamicQuantizeLinear.
    Gemm's alpha folds into the weight scale, beta x C becomes the fused bias. Float16 and
    already-quantized nodes are skipped with a reason. Preconditions: opset >= 11. Numeric
    effect: int8 weight rounding plus per-batch activation rounding; no calibration data needed.
    With ``smooth`` the inputs are SmoothQuant-ed first (from the samples); with
    ``guard = "both"`` the result is kept only if onnxruntime finds it within the tolerance and
    faster than the input graph, else the input graph is restored and every layer is skipped
    with the measured reason.
    """

    params_type = DynamicQuantParams
    default_ops = frozenset({"MatMul", "Gemm"})

    def requires(self, graph: gs.Graph, ctx: Context) -> None:
        """DynamicQuantizeLinear and MatMulInteger need opset 11 (10 for MatMulInteger)."""
        opset = int(graph.opset or ctx.opset)
        if opset < 11:
            raise PreconditionError(f"quant.dynamic needs opset >= 11 (model has {opset})")

    def run(self, graph: gs.Graph, targets: Sequence[gs.Node], ctx: Context) -> PassResult:
        """Rewrite every eligible MatMul/Gemm into the integer pattern."""
        result = PassResult()
        jobs = []
        for node in targets:
            got = _job(node)
            if isinstance(got, str):
                result.skip(node, got)
            else:
                jobs.append(got)
        if not jobs:
            return result
        p = self.params
        backup = graph.copy() if p.guard != "off" else None
        if p.smooth:
            linears = [job.node for job in jobs]
            sp = SmoothQuantParams(auto_alpha=True)
            result.stats["smooth"] = smooth(graph, linears, ctx, sp).stats
            jobs = [j for j in (_job(job.node) for job in jobs) if not isinstance(j, str)]
        chosen = self._weights(graph, jobs, ctx, result)
        self._rewrite_all(graph, jobs, result, chosen)
        if backup is not None:
            self._guard(graph, backup, targets, ctx, result)
        return result

    def _guard(
        self,
        graph: gs.Graph,
        backup: gs.Graph,
        targets: Sequence[gs.Node],
        ctx: Context,
        result: PassResult,
    ) -> None:
        """Restore `backup` unless the rewritten graph is within tolerance and faster."""
        p = self.params
        feeds, source = sources.calibration_feeds(backup, ctx.feeds, ctx.rng, 0)
        tol = guard_tolerance(ctx.tolerance, p.guard_min_cosine)
        reference = ctx.reference_outputs(backup, len(feeds), source)
        with collect.scratch(ctx.workdir) as wd:
            verdict = check_whole(
                backup, graph, feeds, tol, wd, p.guard_max_latency_ratio, reference
            )
        result.stats["guard"] = verdict.stats
        if verdict.rejected is None:
            return
        restore(graph, backup)
        result.touched.clear()
        result.stats = {"guard": {**verdict.stats, "gave_up": verdict.rejected}}
        for node in targets:
            result.skip(node, f"left in float by the guard: {verdict.rejected}")

    def _weights(
        self, graph: gs.Graph, jobs: list[_Job], ctx: Context, result: PassResult
    ) -> dict[str, tuple[np.ndarray, qk.QParams]]:
        """Codes and parameters per weight key ("auto": each output column full int8 or
        7-bit, whichever gives the lower error once the u8s8 kernels' saturation is counted,
        measured on the samples)."""
        p = self.params
        dtype = "int8" if p.weight_dtype == "auto" else p.weight_dtype
        first: dict[str, _Job] = {}  # each weight key's first reader
        for job in jobs:
            first.setdefault(_key(job), job)
        params = {k: self._qparams(j.weight, dtype, p.reduce_range) for k, j in first.items()}
        auto = p.weight_dtype == "auto" and not p.reduce_range  # 7-bit codes cannot saturate
        measured = self._saturation(graph, jobs, params, ctx, result) if auto else {}
        chosen: dict[str, tuple[np.ndarray, qk.QParams]] = {}
        for key, qp in params.items():
            got = measured.get(id(first[key]))  # a weight read by several inputs: its first
            if got is None:
                chosen[key] = (qk.quantize(first[key].weight, qp), qp)
            elif not got.taken.get("int7"):
                chosen[key] = (got.codes, qp)  # the probe's int8 codes, not made twice
            else:
                zero = np.zeros(got.scale.shape, np.int8)
                chosen[key] = (got.codes, qk.QParams(got.scale, zero, "int8", axis=1))
        return chosen

    def _saturation(
        self,
        graph: gs.Graph,
        jobs: list[_Job],
        params: dict[str, qk.QParams],
        ctx: Context,
        result: PassResult,
    ) -> dict[int, Choice]:
        """Per job (by id), its weight's columns in int8 or 7-bit, measured on the samples."""
        p = self.params
        probes: dict[str, SaturationProbe] = {}
        sevens: dict[str, qk.QParams] = {}
        for job in jobs:
            key = _key(job)
            if key not in sevens:
                sevens[key] = self._qparams(job.weight, "int8", reduce_range=True)
            probe = probes.setdefault(job.x.name, SaturationProbe(p.saturation_rows))
            probe.add(id(job), job.weight, {"int8": params[key], "int7": sevens[key]})
        feeds, source = sources.calibration_feeds(graph, ctx.feeds, ctx.rng, p.saturation_samples)
        with collect.scratch(ctx.workdir) as wd:
            observers = {name: [probe] for name, probe in probes.items()}
            collect.collect(graph, observers, feeds, wd, stem="saturation")
        measured = choose(list(probes.values()))
        names = {id(job): job.node.name for job in jobs}
        result.stats["saturation"] = {
            "source": source,
            "int7_columns": sum(m.taken.get("int7", 0) for m in measured.values()),
            "columns": sum(sum(m.taken.values()) for m in measured.values()),
            "relative_error": {
                names[k]: {e: round(v, 5) for e, v in m.errors.items()}
                for k, m in measured.items()
            },
        }
        return measured

    def _qparams(self, weight: np.ndarray, dtype: str, reduce_range: bool) -> qk.QParams:
        p = self.params
        axis = 1 if p.per_channel else None
        choose_qp = qk.mse_weight_qparams if p.weight_calibration == "mse" else qk.weight_qparams
        return choose_qp(weight, dtype, axis=axis, symmetric=True, reduce_range=reduce_range)

    def _rewrite_all(
        self,
        graph: gs.Graph,
        jobs: list[_Job],
        result: PassResult,
        chosen: dict[str, tuple[np.ndarray, qk.QParams]],
    ) -> None:
        """Rewrite the jobs, sharing input quantizers and weights."""
        names = edit.NameScope(graph)
        quantized_inputs: dict[str, tuple[gs.Variable, gs.Variable, gs.Variable]] = {}
        weights: dict[str, tuple[gs.Constant, gs.Constant, gs.Constant, qk.QParams]] = {}
        new_nodes: list[gs.Node] = []
        for job in jobs:
            if job.x.name not in quantized_inputs:
                quantized_inputs[job.x.name] = _dynamic_quantize(job.x, names, new_nodes)
            key = _key(job)
            if key not in weights:
                weights[key] = _constants(job, *chosen[key], names)
            err = _rewrite(job, quantized_inputs[job.x.name], weights[key], names, new_nodes)
            result.touch(job.node, weight_dtype=weights[key][3].dtype, rel_rms_error=err)
        graph.nodes.extend(new_nodes)
        result.stats.update(
            quantized_matmuls=len(jobs),
            shared_input_quantizers=len(quantized_inputs),
            weight_dtype=self.params.weight_dtype,
        )


def _key(job: _Job) -> str:
    """Jobs with one key share one quantized weight (tied weights, Q/K/V of one tensor)."""
    return f"{job.weight_name}/{job.node.op}/{job.alpha}"


def _constants(
    job: _Job, codes: np.ndarray, qp: qk.QParams, names: edit.NameScope
) -> tuple[gs.Constant, gs.Constant, gs.Constant, qk.QParams]:
    scale = np.asarray(qp.scale, np.float32) * np.float32(job.alpha)
    base = job.weight_name
    return (
        gs.Constant(names.fresh(f"{base}_quantized"), codes),
        gs.Constant(names.fresh(f"{base}_scale"), scale),
        gs.Constant(names.fresh(f"{base}_zero_point"), np.asarray(qp.zero_point)),
        qp,
    )


def _job(node: gs.Node) -> _Job | str:
    """What to rewrite for `node`, or why it is left alone."""
    if len(node.inputs) < 2:
        return "expected at least two inputs"
    x, w = node.inputs[0], node.inputs[1]
    if isinstance(x, gs.Constant) or not is_float(x):
        return "input is not a float activation"
    if already_quantized(x):
        return "input already carries Q/DQ"
    if not isinstance(w, gs.Constant):
        return "no constant weight (activation x activation)"
    if len(w.shape) != 2:
        return f"weight has rank {len(w.shape)}, expected 2"
    values = np.asarray(w.values)
    if values.dtype not in (np.float32, np.float16):
        return f"weight dtype {values.dtype} is not float"
    values = values.astype(np.float32, copy=False)  # a float32 weight is used in place
    if node.op == "MatMul":
        return _Job(node, x, values, w.name, None, 1.0)
    if int(node.attrs.get("transA", 0)):
        return "Gemm with transA"
    weight = values.T if int(node.attrs.get("transB", 0)) else values
    bias = None
    if len(node.inputs) > 2 and node.inputs[2].name:
        c = node.inputs[2]
        if not isinstance(c, gs.Constant) or int(np.prod(c.shape)) not in (1, weight.shape[1]):
            return "Gemm bias is not a constant per-output vector"
        bias = np.broadcast_to(np.asarray(c.values, np.float32).reshape(-1), (weight.shape[1],))
        bias = bias * np.float32(node.attrs.get("beta", 1.0))
    return _Job(
        node, x, np.ascontiguousarray(weight), w.name, bias, float(node.attrs.get("alpha", 1.0))
    )


def _is_half(t: gs.Tensor) -> bool:
    return t.dtype is not None and np.dtype(t.dtype) == np.float16


def _dynamic_quantize(
    x: gs.Tensor, names: edit.NameScope, new_nodes: list[gs.Node]
) -> tuple[gs.Variable, gs.Variable, gs.Variable]:
    """DynamicQuantizeLinear of `x` (after a Cast to float32 for float16 graphs)."""
    if _is_half(x):
        x32 = gs.Variable(names.fresh(f"{x.name}_float"), np.float32, x.shape)
        new_nodes.append(edit.cast_node(names, x.name, x, x32, onnx.TensorProto.FLOAT))
        x = x32
    xq = gs.Variable(names.fresh(f"{x.name}_quantized"), np.uint8, x.shape)
    xs = gs.Variable(names.fresh(f"{x.name}_scale"), np.float32, [])
    xz = gs.Variable(names.fresh(f"{x.name}_zero_point"), np.uint8, [])
    new_nodes.append(
        gs.Node(
            "DynamicQuantizeLinear",
            names.fresh(f"{x.name}_DynamicQuantizeLinear"),
            inputs=[x],
            outputs=[xq, xs, xz],
        )
    )
    return xq, xs, xz


def _rewrite(
    job: _Job,
    xq: tuple[gs.Variable, gs.Variable, gs.Variable],
    w: tuple[gs.Constant, gs.Constant, gs.Constant, qk.QParams],
    names: edit.NameScope,
    new_nodes: list[gs.Node],
) -> float:
    """Replace `job.node` by MatMulInteger -> Cast -> Mul [-> Add]; returns the weight error."""
    node, base = job.node, job.node.name or job.node.op
    y = node.outputs[0]
    if _is_half(y):  # compute in float32, hand float16 back to the rest of the graph
        y32 = gs.Variable(names.fresh(f"{y.name}_float"), np.float32, y.shape)
        new_nodes.append(edit.cast_node(names, y.name, y32, y, onnx.TensorProto.FLOAT16))
        y = y32
    acc = gs.Variable(names.fresh(f"{base}_int32"), np.int32)
    acc_f = gs.Variable(names.fresh(f"{base}_int32_float"), np.float32)
    scale = gs.Variable(names.fresh(f"{base}_output_scale"), np.float32)
    new_nodes += [
        gs.Node(
            "MatMulInteger",
            names.fresh(f"{base}_MatMulInteger"),
            inputs=[xq[0], w[0], xq[2], w[2]],
            outputs=[acc],
        ),
        edit.cast_node(names, base, acc, acc_f, onnx.TensorProto.FLOAT),
        gs.Node("Mul", names.fresh(f"{base}_scale_Mul"), inputs=[xq[1], w[1]], outputs=[scale]),
    ]
    if job.bias is None:
        mul_out: gs.Variable = y
    else:
        mul_out = gs.Variable(names.fresh(f"{base}_unbiased"), np.float32)
        bias = gs.Constant(names.fresh(f"{base}_bias"), np.ascontiguousarray(job.bias, np.float32))
        new_nodes.append(
            gs.Node("Add", names.fresh(f"{base}_bias_Add"), inputs=[mul_out, bias], outputs=[y])
        )
    edit.disconnect(node)
    new_nodes.append(
        gs.Node("Mul", names.fresh(f"{base}_Mul"), inputs=[acc_f, scale], outputs=[mul_out])
    )
    qp = w[3]
    deq = qk.dequantize(np.asarray(w[0].values), qp)
    denom = max(float(np.sqrt(np.mean(job.weight**2))), 1e-30)
    return round(float(np.sqrt(np.mean((deq - job.weight) ** 2))) / denom, 6)
