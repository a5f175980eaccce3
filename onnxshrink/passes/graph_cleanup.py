"""``graph.cleanup``: safe housekeeping that every compression pass wants first.

- Constant folding of nodes whose inputs are all initializers, evaluated by onnxruntime itself
  (so the folded values are what deployment would compute). Subgraphs are folded in place and
  never flattened. A folded tensor may not be larger than the constants it came from (plus a
  small allowance), so ``ConstantOfShape`` or a Cast of fp16 weights to fp32 never bloats the file,
  and an existing DequantizeLinear on weights is never undone.
- BatchNormalization folded into the preceding Conv, ConvTranspose (group 1) or Gemm when the
  linear output feeds only the BN: the graph loses one op per pair and later passes see the real
  weights.
- Dead nodes are dropped by the pipeline's cleanup after the step.

Numeric effect: float rounding only (BN folding computes in float64 and casts back).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.ir import edit, query
from onnxshrink.ir.evaluate import evaluate
from onnxshrink.kernels.folding import batchnorm_scale_shift, fold_affine
from onnxshrink.passes import register
from onnxshrink.passes.base import Context, Pass, PassParams, PassResult, expect

logger = logging.getLogger(__name__)

#: Ops never folded: random or stateful, control flow, or producing non-tensors.
NOT_FOLDABLE = frozenset(
    {
        "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
        "Multinomial", "Bernoulli", "Dropout", "If", "Loop", "Scan",
        "SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase", "SequenceAt",
        "SplitToSequence", "ConcatFromSequence", "SequenceLength", "SequenceMap",
        "Optional", "OptionalGetElement", "OptionalHasElement",
        "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
    }
)
LINEAR_BEFORE_BN = frozenset({"Conv", "ConvTranspose", "Gemm"})


@dataclass(frozen=True, kw_only=True)
class CleanupParams(PassParams):
    """Parameters of ``graph.cleanup``."""

    fold_constants: bool = True
    fold_batchnorm: bool = True
    #: A folded tensor may exceed the bytes of the constants it came from by at most this much.
    max_growth_bytes: int = 1024

    def check(self) -> None:
        """Growth allowance must be non-negative."""
        expect(self.max_growth_bytes >= 0, "max_growth_bytes", self.max_growth_bytes, ">= 0")


@register("graph.cleanup")
class CleanupGraphPass(Pass[CleanupParams]):
    """Fold constants (with onnxruntime, size-bounded) and BatchNorm into Conv/Gemm.

    Ops: any default-domain op with constant inputs; BatchNormalization after Conv,
    ConvTranspose (group 1) or Gemm. Subgraphs of If/Loop/Scan are folded but never flattened.
    Preconditions: none. Numeric effect: float rounding only.
    """

    params_type = CleanupParams
    default_ops = None

    def run(self, graph: gs.Graph, targets: Sequence[gs.Node], ctx: Context) -> PassResult:
        """Fold constants in every (sub)graph, then fold BatchNorms among `targets`."""
        result = PassResult()
        chosen = {id(n) for n in targets}
        if self.params.fold_constants:
            for g in list(query.walk_graphs(graph)):
                nodes = [n for n in g.nodes if g is not graph or id(n) in chosen]
                self._fold_constants(g, nodes, int(graph.opset or ctx.opset), result)
        if self.params.fold_batchnorm:
            names = edit.NameScope(graph)
            bns = [n for n in graph.nodes if id(n) in chosen and n.op == "BatchNormalization"]
            for node in bns:
                _fold_batchnorm(graph, node, result, names)
        return result

    def _fold_constants(
        self, graph: gs.Graph, nodes: Sequence[gs.Node], opset: int, result: PassResult
    ) -> None:
        foldable = _foldable(nodes, self.params.max_growth_bytes)
        if not foldable:
            return
        outputs = [t for n in foldable for t in n.outputs if t.name]
        try:
            values = evaluate(foldable, outputs, opset)
        except Exception as e:  # onnxruntime refuses some ops at some opsets: fold nothing
            result.stats.setdefault("fold_errors", []).append(" ".join(str(e).split())[:200])
            return
        keep = _bounded(graph, foldable, values, self.params.max_growth_bytes)
        folded = [n for n in foldable if id(n) in keep]
        frontier = _frontier(graph, folded)
        for tensor in frontier:
            edit.replace_with_constant(tensor, values[tensor.name])
        for node in folded:
            result.touch(_label(node), action="folded")
            edit.disconnect(node)


def _label(node: gs.Node) -> str:
    """A report key for a node: exporters often leave Constant nodes unnamed."""
    if node.name:
        return str(node.name)
    out = node.outputs[0].name if node.outputs else ""
    return f"{node.op}:{out}"


def _foldable(nodes: Sequence[gs.Node], allowance: int) -> list[gs.Node]:
    """Nodes computable from constants alone, in order (closure over earlier foldable nodes).

    A node whose inferred output is already larger than every constant it derives from (plus
    the allowance) is left out before anything runs: it could never be stored, and evaluating
    it (a ConstantOfShape or Tile to gigabytes) could exhaust memory.
    """
    bound: dict[str, int] = {}  # upper bound of source bytes behind each produced tensor
    out = []
    for node in nodes:
        if (node.domain or "") not in ("", "ai.onnx") or node.op in NOT_FOLDABLE:
            continue
        if any(isinstance(v, gs.Graph) for v in node.attrs.values()):
            continue
        inputs = [t for t in node.inputs if t.name]
        if not all(isinstance(t, gs.Constant) or t.name in bound for t in inputs):
            continue
        if not node.outputs:
            continue
        source = _inline_bytes(node) + sum(
            _nbytes(t) if isinstance(t, gs.Constant) else bound[t.name] for t in inputs
        )
        if any(_static_nbytes(t) > source + allowance for t in node.outputs):
            continue
        out.append(node)
        bound.update((t.name, source) for t in node.outputs)
    return out


def _nbytes(tensor: gs.Constant) -> int:
    """Bytes of a constant without loading lazy (external) values."""
    nbytes = getattr(tensor._values, "nbytes", None)
    return int(nbytes) if nbytes is not None else int(np.asarray(tensor.values).nbytes)


def _static_nbytes(tensor: gs.Tensor) -> int:
    """Bytes of a tensor whose shape and dtype inference fixed, else 0 (unknown)."""
    shape = tensor.shape
    if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
        return 0
    try:
        itemsize = int(np.dtype(tensor.dtype).itemsize)
    except TypeError:
        return 0
    return int(np.prod(shape, dtype=np.int64)) * itemsize


@dataclass
class _Sources:
    """The constants each folded tensor derives from: gs.Constant inputs and Constant nodes."""

    cones: dict[str, frozenset[int]]  # tensor name -> ids of source constants
    nbytes: dict[int, int]  # source id -> bytes
    readers: dict[int, list[int]]  # source id -> ids of nodes that must fold for it to vanish

    @classmethod
    def of(cls, nodes: list[gs.Node]) -> _Sources:
        """Trace sources through `nodes` (in topological order)."""
        cones: dict[str, frozenset[int]] = {}
        nbytes: dict[int, int] = {}
        readers: dict[int, list[int]] = {}
        for node in nodes:
            cone: set[int] = set()
            if node.op == "Constant":
                nbytes[id(node)] = _inline_bytes(node)
                readers[id(node)] = [id(node)]
                cone.add(id(node))
            for t in node.inputs:
                if isinstance(t, gs.Constant):
                    if id(t) not in nbytes:
                        nbytes[id(t)] = _nbytes(t)
                        readers[id(t)] = [id(c) for c in t.outputs]  # subgraph readers too
                    cone.add(id(t))
                elif t.name in cones:
                    cone |= cones[t.name]
            frozen = frozenset(cone)
            cones.update((t.name, frozen) for t in node.outputs)
        return cls(cones, nbytes, readers)


def _bounded(
    graph: gs.Graph, nodes: list[gs.Node], values: dict[str, np.ndarray], allowance: int
) -> set[int]:
    """Ids of nodes whose folding keeps the file from growing; graph outputs stay computed.

    Folded tensors that share a source are judged together: their bytes may not exceed the
    bytes of the sources that disappear with them (plus the allowance). A source something else
    still reads (another node, a subgraph, a graph output) does not disappear, so it pays for
    nothing: folding ``Transpose(W)`` while ``W`` is also read elsewhere would store W twice.
    While a group is too big, its largest tensor goes back to being computed.
    """
    src = _Sources.of(nodes)
    producer = {t.name: id(n) for n in nodes for t in n.outputs}
    keep = {id(n) for n in nodes}
    while True:
        frontier = _frontier(graph, [n for n in nodes if id(n) in keep])
        stuck = {
            producer[t.name]
            for t in frontier
            if query.is_graph_output(graph, t) or t.name not in values
        }
        stuck |= {
            producer[t.name]
            for n in nodes
            if id(n) in keep
            for t in n.outputs
            if query.is_graph_output(graph, t)
        }
        if not stuck:
            stuck = _over_budget(frontier, src, keep, values, allowance, producer)
        if not stuck:
            return keep
        keep -= stuck


def _over_budget(
    frontier: list[gs.Variable],
    src: _Sources,
    keep: set[int],
    values: dict[str, np.ndarray],
    allowance: int,
    producer: dict[str, int],
) -> set[int]:
    """Producers of the largest tensor of every group of frontier tensors that outgrows its
    disappearing sources (groups: frontier tensors connected through shared sources)."""
    parent: dict[int, int] = {}
    for t in frontier:
        for s in src.cones.get(t.name, ()):
            parent[_find(parent, id(t))] = _find(parent, s)
    groups: dict[int, list[gs.Variable]] = {}
    for t in frontier:
        groups.setdefault(_find(parent, id(t)), []).append(t)
    stuck = set()
    for members in groups.values():
        sources = set().union(*(src.cones.get(t.name, frozenset()) for t in members))
        freed = sum(src.nbytes[s] for s in sources if all(r in keep for r in src.readers[s]))
        new = sum(int(values[t.name].nbytes) for t in members)
        if new > freed + allowance:
            largest = max(members, key=lambda t: int(values[t.name].nbytes))
            stuck.add(producer[largest.name])
    return stuck


def _find(parent: dict[int, int], x: int) -> int:
    """Union-find root of `x` (with path halving)."""
    while parent.setdefault(x, x) != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


def _inline_bytes(node: gs.Node) -> int:
    """Bytes a Constant node already stores inline (folding it into an initializer is free)."""
    value = node.attrs.get("value") if node.op == "Constant" else None
    if isinstance(value, gs.Constant):
        return int(np.asarray(value.values).nbytes)
    return 0


def _frontier(graph: gs.Graph, folded: list[gs.Node]) -> list[gs.Variable]:
    """Outputs of folded nodes that something outside the folded set still reads."""
    ids = {id(n) for n in folded}
    out = []
    for node in folded:
        for t in node.outputs:
            if any(id(c) not in ids for c in t.outputs):
                out.append(t)
    return out


def _fold_batchnorm(
    graph: gs.Graph, bn: gs.Node, result: PassResult, names: edit.NameScope
) -> None:
    if not bn.inputs:
        return
    y = bn.inputs[0]
    lin = query.producer(y)
    reason = _bn_blocker(graph, bn, lin)
    if reason is not None:
        result.skip(bn, reason)
        return
    assert lin is not None
    scale, beta, mean, var = (t.values for t in bn.inputs[1:5])
    s, t = batchnorm_scale_shift(scale, beta, mean, var, float(bn.attrs.get("epsilon", 1e-5)))
    w_tensor = lin.inputs[1]
    if lin.op == "Gemm":
        _fold_into_gemm(lin, s, t, names)
    else:
        axis = 0 if lin.op == "Conv" else 1
        bias = lin.inputs[2].values if len(lin.inputs) > 2 and lin.inputs[2].name else None
        new_w, new_b = fold_affine(w_tensor.values, bias, s, t, axis)
        _set_input(lin, 1, new_w, names)
        _set_input(lin, 2, new_b, names)
    z = bn.outputs[0]
    edit.disconnect(bn)
    lin.outputs.clear()
    lin.outputs.append(z)
    result.touch(bn, action="folded into " + (lin.name or lin.op))


def _bn_blocker(graph: gs.Graph, bn: gs.Node, lin: gs.Node | None) -> str | None:
    """Why this BatchNormalization cannot be folded, or None."""
    if lin is None or lin.op not in LINEAR_BEFORE_BN:
        return "input is not produced by Conv/ConvTranspose/Gemm"
    if any(not isinstance(t, gs.Constant) for t in bn.inputs[1:5]):
        return "BatchNormalization parameters are not constant"
    if bn.attrs.get("training_mode", 0) or bn.attrs.get("spatial", 1) != 1:
        return "BatchNormalization in training mode or non-spatial"
    if any(t.outputs or query.is_graph_output(graph, t) for t in bn.outputs[1:]):
        return "BatchNormalization statistics outputs are used"
    y = bn.inputs[0]
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
        if c is not None and int(np.prod(c.shape)) not in (1, bn.inputs[1].shape[0]):
            return "Gemm bias is not per output channel"
    if np.asarray(lin.inputs[1].values).dtype.kind != "f":
        return f"{lin.op} weight is not floating point"
    return None


def _fold_into_gemm(gemm: gs.Node, s: np.ndarray, t: np.ndarray, names: edit.NameScope) -> None:
    w = gemm.inputs[1].values
    axis = 0 if gemm.attrs.get("transB", 0) else 1
    beta = float(gemm.attrs.get("beta", 1.0))
    has_c = len(gemm.inputs) > 2 and gemm.inputs[2].name
    c = None
    if has_c:  # alpha still scales A.B, so scaling W by s keeps it exact
        c = np.broadcast_to(gemm.inputs[2].values.astype(np.float64).reshape(-1), s.shape)
    new_w, new_c = fold_affine(w, None if c is None else beta * c, s, t, axis)
    _set_input(gemm, 1, new_w, names)
    _set_input(gemm, 2, new_c, names)
    gemm.attrs["beta"] = 1.0


def _set_input(node: gs.Node, index: int, values: np.ndarray, names: edit.NameScope) -> None:
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
