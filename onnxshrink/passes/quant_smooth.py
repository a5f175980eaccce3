"""``quant.smooth``: SmoothQuant-style equalization of activations and weights before int8.

Transformer activations carry a few channels with outliers 10-100x the rest; per-tensor int8
spends its levels on them and rounds every other channel to a handful of values. For a linear
layer ``y = x W`` the pass picks per input channel ``s_j = max|x_j|^alpha / max|W_j|^(1-alpha)``
and rewrites ``x' = x / s`` (folded into the producer of x, so no op is added) and
``W' = diag(s) W``: the float function is unchanged, but the activation range flattens and the
weights absorb part of it (Xiao et al., SmoothQuant). Producers that can absorb ``1/s``:
LayerNormalization (scale and bias), and ``Mul``/``Add`` by a constant per-channel vector
(decomposed layer norms), when only the linear layers read x. Otherwise (post-norm BERT, where
the norm output also feeds the residual Add) a ``Mul(x, 1/s)`` feeds the linear layers alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.calibration import collect, sources
from onnxshrink.calibration.observers import ChannelObserver, Observer, RowReservoir
from onnxshrink.ir import edit, query
from onnxshrink.kernels import quantize as qk
from onnxshrink.passes import register
from onnxshrink.passes.base import Context, Pass, PassParams, PassResult, expect


@dataclass(frozen=True, kw_only=True)
class SmoothQuantParams(PassParams):
    """Parameters of ``quant.smooth``."""

    #: Migration strength: 0 leaves activations alone, 1 moves all their range into weights.
    alpha: float = 0.5
    #: Where no producer can absorb 1/s (post-norm transformers, whose norm output also feeds
    #: the residual), scale with an explicit Mul in front of the linear layers instead.
    insert_mul: bool = True
    #: Pick alpha per input from `alpha_grid` by the int8 error it leaves on sampled rows
    #: (``alpha`` is then unused); no smoothing where none of them helps.
    auto_alpha: bool = False
    alpha_grid: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    #: Rows of each input kept (reservoir sampling) to score alphas: memory per input.
    reservoir_rows: int = 512
    #: Calibration samples used (0: all).
    max_samples: int = 0

    def check(self) -> None:
        """alpha and the grid in [0, 1]."""
        expect(0.0 <= self.alpha <= 1.0, "alpha", self.alpha, "in [0, 1]")
        ok = bool(self.alpha_grid) and all(0.0 <= a <= 1.0 for a in self.alpha_grid)
        expect(ok, "alpha_grid", self.alpha_grid, "a non-empty list of values in [0, 1]")
        expect(self.reservoir_rows >= 16, "reservoir_rows", self.reservoir_rows, ">= 16")
        expect(self.max_samples >= 0, "max_samples", self.max_samples, ">= 0")


@dataclass
class _Group:
    """One activation, the linear layers reading it, and the ops that absorb 1/s."""

    x: gs.Tensor
    linears: list[gs.Node]
    absorbers: list[tuple[gs.Node, int]]


@register("quant.smooth")
class SmoothQuantPass(Pass[SmoothQuantParams]):
    """Equalize activation outliers into weights (SmoothQuant) before int8 quantization.

    Ops: MatMul (constant 2-D weight) and Gemm (constant B, transA = 0) whose input comes from
    LayerNormalization or a Mul/Add by a constant per-channel vector, and is read only by such
    linear layers. Params: ``alpha`` (migration strength). Calibration: per-channel absolute
    maxima of the inputs, streamed. Preconditions: none. Numeric effect: none in float (up to
    rounding); lower int8 error afterwards on models with outlier channels.
    """

    params_type = SmoothQuantParams
    default_ops = frozenset({"MatMul", "Gemm"})

    def run(self, graph: gs.Graph, targets: Sequence[gs.Node], ctx: Context) -> PassResult:
        """Group linears by input, calibrate channel statistics, then rescale."""
        return smooth(graph, targets, ctx, self.params)


def smooth(
    graph: gs.Graph, targets: Sequence[gs.Node], ctx: Context, p: SmoothQuantParams
) -> PassResult:
    """SmoothQuant on the linear layers among `targets` (also used by quant.qdq's `smooth`)."""
    result = PassResult()
    groups: dict[str, _Group] = {}
    chosen = {id(n) for n in targets}
    for node in targets:
        reason = _linear(node)
        if reason:
            result.skip(node, reason)
            continue
        x = node.inputs[0]
        if x.name in groups:
            continue
        group_or_reason = _group(graph, x, chosen, p.insert_mul)
        if isinstance(group_or_reason, str):
            result.skip(node, group_or_reason)
        else:
            groups[x.name] = group_or_reason
    if not groups:
        return result
    channels = {name: ChannelObserver(axis=-1) for name in groups}
    rows = {name: RowReservoir(p.reservoir_rows, ctx.rng) for name in groups if p.auto_alpha}
    observers: dict[str, list[Observer]] = {
        name: [channels[name], *([rows[name]] if rows else [])] for name in groups
    }
    feeds, source = sources.calibration_feeds(graph, ctx.feeds, ctx.rng, p.max_samples)
    with collect.scratch(ctx.workdir) as wd:
        collect.collect(graph, observers, feeds, wd)
    names = edit.NameScope(graph)
    alphas: dict[str, float] = {}
    for name, group in groups.items():
        absmax = channels[name].absmax
        wmax = _weight_absmax(group.linears)
        alpha: float | None = p.alpha
        if p.auto_alpha and absmax is not None:
            sample = rows[name].rows
            alpha = None if sample is None else _choose_alpha(absmax, wmax, sample, group, p)
        if absmax is None or alpha is None:
            why = "input never observed" if absmax is None else "smoothing does not help here"
            for node in group.linears:
                result.skip(node, why)
            continue
        s = _factors(absmax, wmax, alpha)
        _apply(group, s, names, graph)
        alphas[name] = alpha
        for node in group.linears:
            result.touch(
                node,
                input=name,
                alpha=alpha,
                inserted_mul=not group.absorbers,
                max_factor=round(float(s.max()), 4),
            )
    result.stats.update(groups=len(alphas), alphas=alphas, calibration_source=source)
    return result


def _linear(node: gs.Node) -> str | None:
    if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        return "no constant weight"
    w = node.inputs[1]
    if len(w.shape) != 2 or np.asarray(w.values).dtype.kind != "f":
        return "weight is not a 2-D float tensor"
    if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
        return "Gemm with transA"
    if isinstance(node.inputs[0], gs.Constant):
        return "constant input"
    return None


def _group(graph: gs.Graph, x: gs.Tensor, chosen: set[int], insert_mul: bool) -> _Group | str:
    """The linears reading `x` and the producer params that absorb 1/s (none: insert a Mul)."""
    linears = [n for n in x.outputs if id(n) in chosen and not _linear(n) and n.inputs[0] is x]
    others = len(linears) != len(x.outputs) or query.is_graph_output(graph, x)
    absorbers = None if others else _absorbers(x)
    if absorbers is not None:
        return _Group(x, linears, absorbers)
    if insert_mul and linears and x.dtype is not None:
        return _Group(x, linears, [])
    if others:
        return "input also feeds ops other than selected linear layers"
    return "producer of the input cannot absorb the scale (not a norm or constant Mul/Add)"


def _vector(t: gs.Tensor, n: int | None) -> bool:
    if not isinstance(t, gs.Constant) or len(t.outputs) != 1:
        return False
    shape = [int(d) for d in t.shape]
    return len(shape) >= 1 and all(d == 1 for d in shape[:-1]) and (n is None or shape[-1] == n)


def _absorbers(x: gs.Tensor) -> list[tuple[gs.Node, int]] | None:
    """(node, input index) of constant vectors that scale x linearly, or None."""
    prod = query.producer(x)
    if prod is None or len(x.outputs) == 0:
        return None
    if prod.op == "LayerNormalization" and int(prod.attrs.get("axis", -1)) == -1:
        out = [(prod, 1)]
        if len(prod.inputs) > 2 and prod.inputs[2].name:
            out.append((prod, 2))
        return out if all(_vector(prod.inputs[i], None) for _, i in out) else None
    if prod.op == "Mul":
        idx = [i for i, t in enumerate(prod.inputs) if _vector(t, None)]
        return [(prod, idx[0])] if len(idx) == 1 else None
    if prod.op == "Add":
        idx = [i for i, t in enumerate(prod.inputs) if _vector(t, None)]
        if len(idx) != 1:
            return None
        other = prod.inputs[1 - idx[0]]
        inner = query.producer(other)
        if inner is None or inner.op != "Mul" or len(other.outputs) != 1:
            return None
        m_idx = [i for i, t in enumerate(inner.inputs) if _vector(t, None)]
        return [(prod, idx[0]), (inner, m_idx[0])] if len(m_idx) == 1 else None
    return None


def _rows(node: gs.Node) -> np.ndarray:
    """The weight as [K, N] (input channels first)."""
    w = np.asarray(node.inputs[1].values, np.float64)
    return w.T if node.op == "Gemm" and int(node.attrs.get("transB", 0)) else w


def _weight_absmax(linears: list[gs.Node]) -> np.ndarray:
    """Largest |W| per input channel over every linear reading the input."""
    return np.max([np.abs(_rows(n)).max(axis=1) for n in linears], axis=0)


def _factors(act_absmax: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant factors per input channel, shared by every linear reading the input."""
    if np.shape(act_absmax) != wmax.shape:
        return np.ones_like(wmax)
    return qk.smooth_factors(act_absmax, wmax, alpha)


def _choose_alpha(
    absmax: np.ndarray, wmax: np.ndarray, rows: np.ndarray, group: _Group, p: SmoothQuantParams
) -> float | None:
    """The grid alpha with the lowest smoothed int8 error on the sampled rows (None: leaving
    the input alone is better).

    The grid is walked from its largest alpha down and the walk stops after two alphas in a
    row that do not beat the best: the error is unimodal in alpha in practice (22 of MiniLM's
    24 inputs; the other two dip at the top end) and transformers' optimum lies high (0.7-0.9
    on all 24), so most walks stop after four or five of the seven products.
    """
    weights = [_rows(n).astype(np.float32) for n in group.linears]
    if rows.shape[1] != weights[0].shape[0]:
        return None
    refs = [rows.astype(np.float32) @ w for w in weights]  # float products, shared by the grid
    best, best_err = None, qk.smoothed_int8_error(rows, weights, np.ones(rows.shape[1]), refs)
    best_alpha_err, misses = np.inf, 0
    for alpha in sorted(p.alpha_grid, reverse=True):
        err = qk.smoothed_int8_error(rows, weights, _factors(absmax, wmax, alpha), refs)
        if err < best_err:
            best, best_err = alpha, err
        misses = 0 if err < best_alpha_err else misses + 1
        best_alpha_err = min(best_alpha_err, err)
        if misses == 2:
            break
    return best


def _apply(group: _Group, s: np.ndarray, names: edit.NameScope, graph: gs.Graph) -> None:
    """x' = x / s in the producer (or a new Mul), W' = diag(s) W in every linear."""
    if not group.absorbers:
        dtype = np.dtype(group.x.dtype)
        inv = gs.Constant(names.fresh(f"{group.x.name}_smooth_scale"), (1.0 / s).astype(dtype))
        y = gs.Variable(names.fresh(f"{group.x.name}_smoothed"), dtype, group.x.shape)
        graph.nodes.append(
            gs.Node(
                "Mul", names.fresh(f"{group.x.name}_smooth_Mul"), inputs=[group.x, inv], outputs=[y]
            )
        )
        for node in group.linears:
            node.inputs[0] = y
    for node, index in group.absorbers:
        t = node.inputs[index]
        v = np.asarray(t.values)
        node.inputs[index] = gs.Constant(
            names.fresh(f"{t.name}_smoothed"), (v.astype(np.float64) / s).astype(v.dtype)
        )
    for node in group.linears:
        t = node.inputs[1]
        v = np.asarray(t.values)
        transposed = node.op == "Gemm" and int(node.attrs.get("transB", 0))
        scaled = v.astype(np.float64) * (s[None, :] if transposed else s[:, None])
        node.inputs[1] = gs.Constant(names.fresh(f"{t.name}_smoothed"), scaled.astype(v.dtype))
