"""``quant.qdq``: static int8 quantization in QDQ form that onnxruntime runs as integer kernels.

Three steps, each in its own module: `qdq_plan` decides (handlers + propagation), this module
calibrates (streaming observers on an instrumented copy in the work directory), and
`qdq_materialise` writes Q/DQ pairs, int8 weights and int32 biases.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.calibration import collect, sources
from onnxshrink.calibration.observers import (
    ChannelObserver,
    HistogramObserver,
    MinMaxObserver,
    make_observer,
    observed_range,
)
from onnxshrink.errors import PreconditionError
from onnxshrink.ir import edit
from onnxshrink.kernels import quantize as qk
from onnxshrink.passes import register
from onnxshrink.passes.base import (
    Context,
    Pass,
    PassParams,
    PassResult,
    expect,
    expect_guard,
)
from onnxshrink.passes.qdq_guard import CandidateBuilder, GuardOutcome, latency_gate, run_guard
from onnxshrink.passes.qdq_materialise import WeightConfig, materialise, weight_dtypes
from onnxshrink.passes.qdq_opset import blocker, raise_opset, softmax_inputs
from onnxshrink.passes.qdq_plan import (
    ANCHORS,
    CONTROL_FLOW,
    ELEMENTWISE_OPS,
    QLINEAR_OPS,
    SHARED_OPS,
    PlanOptions,
    QuantPlan,
)
from onnxshrink.passes.qdq_plan import plan as make_plan
from onnxshrink.passes.quant_smooth import SmoothQuantParams, smooth
from onnxshrink.passes.whole_guard import guard_tolerance, restore

logger = logging.getLogger(__name__)

#: Per-axis QuantizeLinear/DequantizeLinear (per-channel weights) need this opset.
QDQ_OPSET = 13


@dataclass(frozen=True, kw_only=True)
class QdqQuantParams(PassParams):
    """Parameters of ``quant.qdq``."""

    #: How activation ranges are chosen from the streamed statistics.
    calibration: Literal["minmax", "percentile", "entropy", "mse"] = "percentile"
    #: Percentile kept by ``calibration = "percentile"`` (two-sided).
    percentile: float = 99.99
    #: uint8 is what onnxruntime's x86 kernels fuse (int8 activations only fuse on ARM).
    activation_dtype: Literal["uint8", "int8"] = "uint8"
    activation_symmetric: bool = False
    #: int8 weights are fastest, but x86 u8s8 kernels without VNNI add pairs of products in
    #: int16 and saturate when inputs sit far from 0 in uint8 (any signed activation).
    #: "auto": int8 where every consumer's input has a zero point near 0 (ReLU-like); elsewhere
    #: 7-bit int8 for convolutions (cannot saturate, keeps the symmetric conv kernels) and uint8
    #: (zero point 128) for MatMul/Gemm (never saturates, as fast there, a full 8 bits).
    weight_dtype: Literal["auto", "int8", "uint8"] = "auto"
    #: Per output channel weight scales (per tensor when False).
    per_channel: bool = True
    #: Weight ranges: their min/max, or the clipping that minimizes the rounding error.
    weight_calibration: Literal["minmax", "mse"] = "minmax"
    #: 7-bit weights: avoids u8s8 int16 saturation on x86 CPUs without VNNI.
    reduce_range: bool = False
    #: Quantize activation x activation MatMuls (attention scores); no CPU speed-up measured.
    matmul_activations: bool = False
    #: Quantize Add/Mul whose inputs and output are quantized anyway (QLinearAdd/QLinearMul).
    elementwise: bool = False
    #: Carry int8 through Reshape/Transpose/MaxPool/Concat/pooling between quantized ops.
    propagate: bool = True
    #: Quantize ConvTranspose too (onnxruntime 1.32 runs it in float on CPU either way).
    conv_transpose: bool = False
    #: Use at most this many calibration samples (0: all).
    max_samples: int = 0
    #: Bins of each streaming histogram (memory per activation: 8 bytes a bin).
    histogram_bins: int = 4096
    #: Correct each quantized layer's bias for the mean error its int8 weights introduce.
    bias_correction: bool = True
    #: Check the result with onnxruntime against the recipe's tolerance ("accuracy": return
    #: the fewest, most error-adding layers to float until it holds) and/or against the float
    #: model's latency ("latency": never slower than float; layers int8 speeds up least go first).
    guard: Literal["off", "accuracy", "latency", "both"] = "off"
    #: Bound used by the accuracy guard when the run has no recipe tolerance.
    guard_min_cosine: float = 0.999
    #: The latency guard ships int8 only below this latency ratio to float at one thread: the
    #: margin keeps timing noise (a few percent on shared machines) from shipping a model
    #: that is not really faster. 1.0 keeps anything not slower (size over speed).
    guard_max_latency_ratio: float = 0.95
    #: SmoothQuant the MatMul/Gemm inputs first (see quant.smooth); undone if the guard leaves
    #: the model in float, so that case ships the original graph.
    smooth: bool = False
    smooth_alpha: float = 0.5
    #: Choose alpha per input from int8 error on sampled rows (smooth_alpha then unused).
    smooth_auto_alpha: bool = True
    #: Also smooth inputs no producer can absorb 1/s into, with an explicit Mul (one more
    #: elementwise pass over the activation at run time).
    smooth_insert_mul: bool = True

    def check(self) -> None:
        """Ranges of the numeric knobs."""
        expect(50.0 < self.percentile <= 100.0, "percentile", self.percentile, "in (50, 100]")
        expect(self.max_samples >= 0, "max_samples", self.max_samples, ">= 0")
        expect(0.0 <= self.smooth_alpha <= 1.0, "smooth_alpha", self.smooth_alpha, "in [0, 1]")
        expect_guard(self.guard_min_cosine, self.guard_max_latency_ratio, (0.1, 1.0))
        expect(
            64 <= self.histogram_bins <= 1 << 20,
            "histogram_bins",
            self.histogram_bins,
            "in [64, 1048576]",
        )


@register("quant.qdq")
class QdqQuantPass(Pass[QdqQuantParams]):
    """Static int8 quantization as QuantizeLinear/DequantizeLinear pairs, calibrated on samples.

    Ops: Conv, Gemm, MatMul (constant weight; activation x activation when
    ``matmul_activations``), ConvTranspose when ``conv_transpose``, and carriers between
    quantized ops (Reshape, Transpose, Flatten, Squeeze/Unsqueeze, MaxPool, Resize, Slice,
    Gather, Split, Concat, Global/AveragePool, and Add/Mul when ``elementwise``). Weights:
    per output channel (int8; 7-bit convs, uint8 MatMul/Gemm where u8s8 could saturate);
    activations: uint8 per tensor; biases: int32 with scale = input scale x weight scale;
    explicit zero points. MatMul/Gemm outputs stay float unless a quantized consumer wants
    them (MatMulIntegerToFloat / QGemm); a MatMul's bias Add gets an int32 bias so onnxruntime
    makes QGemm, not an fp32 Gemm. Tensors already carrying Q/DQ are left alone (idempotent);
    If/Loop bodies are skipped with a reason; float16 graphs are quantized with Casts around
    the integer region. Calibration streams samples through fixed-size observers (memory
    independent of the sample count); with no samples it uses seeded random inputs and says
    so. Optional: SmoothQuant (``smooth``), bias correction, and the guard (``guard``): the
    fewest layers back to float for the recipe's tolerance, and never slower than float.
    Preconditions: opset >= 10 (raised to 13 when that keeps the model's meaning). Numeric
    effect: int8 rounding of weights and activations, typically cosine > 0.99 on outputs.
    """

    params_type = QdqQuantParams
    default_ops = ANCHORS | SHARED_OPS | QLINEAR_OPS | ELEMENTWISE_OPS | CONTROL_FLOW

    def requires(self, graph: gs.Graph, ctx: Context) -> None:
        """Per-axis QuantizeLinear/DequantizeLinear need opset 13 (raised when that is safe)."""
        opset = int(graph.opset or ctx.opset)
        if opset < 10:
            raise PreconditionError(f"quant.qdq needs opset >= 10 (model has {opset})")
        reason = blocker(graph, opset, 13)
        if reason:
            raise PreconditionError(f"quant.qdq needs opset 13, and {reason}")

    def run(self, graph: gs.Graph, targets: Sequence[gs.Node], ctx: Context) -> PassResult:
        """Plan, calibrate, then materialise the Q/DQ pairs."""
        result = PassResult()
        if not targets:
            return result
        p = self.params
        opts = PlanOptions(
            per_channel=p.per_channel,
            matmul_activations=p.matmul_activations,
            elementwise=p.elementwise,
            propagate=p.propagate,
            conv_transpose=p.conv_transpose,
        )
        qplan = make_plan(graph, list(targets), opts)
        for node, reason in qplan.skipped:
            result.skip(node, reason)
        if not qplan.anchors:
            return result
        feeds, source = sources.calibration_feeds(graph, ctx.feeds, ctx.rng, p.max_samples)
        blocker = _opset_blocker(graph, int(graph.opset or ctx.opset), feeds, ctx)
        if blocker:
            for node in qplan.anchors:
                result.skip(node, f"needs opset {QDQ_OPSET}, and {blocker}")
            return result
        backup = graph.copy() if p.smooth and p.guard != "off" else None
        if p.smooth:
            linears = [t for t in targets if t.op in ("MatMul", "Gemm")]
            sp = SmoothQuantParams(
                alpha=p.smooth_alpha,
                auto_alpha=p.smooth_auto_alpha,
                max_samples=p.max_samples,
                insert_mul=p.smooth_insert_mul,
            )
            result.stats["smooth"] = smooth(graph, linears, ctx, sp).stats
            qplan = make_plan(graph, list(targets), opts)  # smoothing may insert a Mul
        wcfg = WeightConfig("int8", True, p.reduce_range, p.weight_calibration)
        gate: GuardOutcome | None = None
        gate_dtypes: dict[str, str] = {}
        calibrated = qplan
        if p.guard in ("latency", "both") and feeds:
            # speed first, on one sample's ranges (speed does not depend on them): a model int8
            # cannot make faster is left in float before the full calibration is paid for
            quick = self._quick_qparams(graph, qplan, feeds[:1], ctx)
            build = CandidateBuilder(graph, targets, opts, quick, {}, wcfg, p.weight_dtype)
            with collect.scratch(ctx.workdir) as wd:
                gate = latency_gate(
                    build,
                    qplan.anchors,
                    dict(feeds[0]),
                    guard_tolerance(ctx.tolerance, p.guard_min_cosine),
                    wd,
                    p.guard_max_latency_ratio,
                )
            if gate.excluded is None:
                self._record(graph, targets, qplan, opts, gate, result)
                _restore(graph, backup, result)
                return result
            if gate.excluded:  # the layers it returned to float stay there: not calibrated
                index = {id(n): i for i, n in enumerate(graph.nodes)}
                rest = [t for t in targets if index[id(t)] not in gate.excluded]
                calibrated = make_plan(graph, rest, opts)
            gate_dtypes = weight_dtypes(calibrated, quick, p.weight_dtype)
        act_qparams, means = self._calibrate(graph, calibrated, feeds, ctx)
        result.stats.update(
            calibration=p.calibration, calibration_samples=len(feeds), calibration_source=source
        )
        if p.guard != "off":
            # the gate timed the quick candidate: time the final one too if its weight formats
            # (chosen from the activation ranges) came out different
            recheck = bool(gate_dtypes) and (
                weight_dtypes(calibrated, act_qparams, p.weight_dtype) != gate_dtypes
            )
            guarded = self._guard(
                graph,
                targets,
                qplan,
                opts,
                (act_qparams, means, wcfg),
                (feeds, source),
                ctx,
                result,
                (gate, recheck),
            )
            if guarded is None:
                _restore(graph, backup, result)
                return result
            qplan = guarded
        self._write(graph, qplan, (act_qparams, means, wcfg), ctx, result)
        return result

    def _guard(
        self,
        graph: gs.Graph,
        targets: Sequence[gs.Node],
        qplan: QuantPlan,
        opts: PlanOptions,
        calibrated: tuple[dict[str, qk.QParams], dict[int, np.ndarray], WeightConfig],
        samples: tuple[Sequence[dict[str, np.ndarray]], str],
        ctx: Context,
        result: PassResult,
        gate: tuple[GuardOutcome | None, bool] = (None, False),
    ) -> QuantPlan | None:
        """The plan without the layers the guard keeps in float; None to leave all in float.
        `samples`: the feeds and where they come from (``calibration_feeds``)."""
        act_qparams, means, wcfg = calibrated
        feeds, source = samples
        p = self.params
        build = CandidateBuilder(graph, targets, opts, act_qparams, means, wcfg, p.weight_dtype)
        with collect.scratch(ctx.workdir) as wd:
            outcome = run_guard(
                p.guard,
                build,
                qplan.anchors,
                feeds,
                guard_tolerance(ctx.tolerance, p.guard_min_cosine),
                wd,
                p.guard_max_latency_ratio,
                start=gate[0],
                recheck_latency=gate[1],
                reference=ctx.reference_outputs(graph, len(feeds), source)
                if p.guard in ("accuracy", "both")
                else None,
            )
        return self._record(graph, targets, qplan, opts, outcome, result)

    def _record(
        self,
        graph: gs.Graph,
        targets: Sequence[gs.Node],
        qplan: QuantPlan,
        opts: PlanOptions,
        outcome: GuardOutcome,
        result: PassResult,
    ) -> QuantPlan | None:
        """Report the guard's decision; the plan it leaves (None: all in float)."""
        result.stats["guard"] = outcome.report.to_dict()
        if outcome.excluded is None:
            for node in qplan.anchors:
                result.skip(node, outcome.report.gave_up or "left in float by the guard")
            return None
        if not outcome.excluded:
            return qplan
        for k in sorted(outcome.excluded):
            result.skip(graph.nodes[k], "kept in float by the guard (see stats.guard)")
        dropped = {id(graph.nodes[k]) for k in outcome.excluded}
        return make_plan(graph, [t for t in targets if id(t) not in dropped], opts)

    def _write(
        self,
        graph: gs.Graph,
        qplan: QuantPlan,
        calibrated: tuple[dict[str, qk.QParams], dict[int, np.ndarray], WeightConfig],
        ctx: Context,
        result: PassResult,
    ) -> None:
        """Raise the opset if needed, materialise the plan, record what was written."""
        act_qparams, means, wcfg = calibrated
        names = edit.NameScope(graph)
        before = int(graph.opset or ctx.opset)
        adapted = raise_opset(graph, QDQ_OPSET, names)
        if adapted or before < QDQ_OPSET:
            result.stats["opset"] = f"{before} -> {QDQ_OPSET}"
            if adapted:
                result.stats["opset_adapted_nodes"] = adapted
        dtypes = weight_dtypes(qplan, act_qparams, self.params.weight_dtype)
        done = materialise(graph, qplan, act_qparams, names, wcfg, dtypes, means)
        for node in qplan.anchors:
            result.touch(node, role="anchor")
        for node in qplan.carriers:
            result.touch(node, role="carrier")
        result.stats.update(
            quantized_activations=len(qplan.activations), quantized_weights=len(done.weights)
        )
        if done.saturated_biases:
            result.stats["saturated_biases"] = done.saturated_biases
        if done.corrected_biases:
            result.stats["bias_correction_max_shift"] = done.corrected_biases

    def _quick_qparams(
        self,
        graph: gs.Graph,
        qplan: QuantPlan,
        feeds: Sequence[dict[str, np.ndarray]],
        ctx: Context,
    ) -> dict[str, qk.QParams]:
        """Activation parameters from min/max reduced inside onnxruntime: enough to time a
        candidate (speed does not depend on the ranges), at the memory of one inference."""
        p = self.params
        with collect.scratch(ctx.workdir) as wd:
            found = collect.ranges(graph, qplan.roots(), feeds, wd)
        out = {}
        for root in qplan.roots():
            lo, hi = found.get(root, (-1.0, 1.0))
            scale, zp = qk.choose_qparams(
                lo, hi, p.activation_dtype, symmetric=p.activation_symmetric
            )
            out[root] = qk.QParams(scale, zp, p.activation_dtype)
        return out

    def _calibrate(
        self,
        graph: gs.Graph,
        qplan: QuantPlan,
        feeds: Sequence[dict[str, np.ndarray]],
        ctx: Context,
    ) -> tuple[dict[str, qk.QParams], dict[int, np.ndarray]]:
        """Activation parameters per root tensor, and input means per anchor (bias correction)."""
        p = self.params
        observers: dict[str, list[MinMaxObserver | HistogramObserver | ChannelObserver]] = {}
        for root in qplan.roots():
            observers[root] = [make_observer(p.calibration, p.histogram_bins)]
        channel: dict[int, ChannelObserver] = {}
        if p.bias_correction:
            corrected = {id(u.anchor if u.anchor is not None else u.node) for u in qplan.biases}
            for node in qplan.anchors:
                if id(node) in corrected and node.op in ("Conv", "Gemm", "MatMul"):
                    obs = ChannelObserver(axis=1 if node.op == "Conv" else -1)
                    channel[id(node)] = obs
                    observers.setdefault(node.inputs[0].name, []).append(obs)
        with collect.scratch(ctx.workdir) as wd:
            collect.collect(graph, observers, feeds, wd)
        means = {k: o.mean() for k, o in channel.items() if o.count}
        result = {}
        for root in qplan.roots():
            ranged = observers[root][0]
            assert isinstance(ranged, (MinMaxObserver, HistogramObserver))
            lo, hi = observed_range(
                ranged,
                p.calibration,
                p.activation_dtype,
                symmetric=p.activation_symmetric,
                percentile=p.percentile,
            )
            scale, zp = qk.choose_qparams(
                lo, hi, p.activation_dtype, symmetric=p.activation_symmetric
            )
            result[root] = qk.QParams(scale, zp, p.activation_dtype)
        return result, means


def _restore(graph: gs.Graph, backup: gs.Graph | None, result: PassResult) -> None:
    """Ship the original graph, not a smoothed float one, when the guard leaves all in float."""
    if backup is not None:
        restore(graph, backup)
        result.stats.pop("smooth", None)


def _opset_blocker(
    graph: gs.Graph, opset: int, feeds: Sequence[dict[str, np.ndarray]], ctx: Context
) -> str | None:
    """Why opset 13 is out of reach, measuring Softmax input ranks shape inference missed."""
    names = softmax_inputs(graph, opset, QDQ_OPSET)
    ranks: dict[str, int] = {}
    if names and feeds:
        with collect.scratch(ctx.workdir) as wd:
            values = collect.run_outputs(graph, names, feeds[:1], wd, stem="ranks")[0]
        ranks = {n: np.ndim(v) for n, v in zip(names, values)}
    return blocker(graph, opset, QDQ_OPSET, ranks)
