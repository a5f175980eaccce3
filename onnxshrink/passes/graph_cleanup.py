"""``graph.cleanup``: safe housekeeping that every compression pass wants first.

- Constant folding of nodes whose inputs are all initializers, evaluated by onnxruntime itself
  (so the folded values are what deployment would compute). Subgraphs are folded in place and
  never flattened. Folded tensors may not be larger than the constants they came from (plus a
  small allowance for the whole model), so ``ConstantOfShape`` or a Cast of fp16 weights to
  fp32 never bloats the file, and an existing DequantizeLinear on weights is never undone.
- Decomposed hard-sigmoid/hard-swish (``Add -> Clip -> Mul -> Div``) rewritten into
  HardSigmoid/HardSwish (`cleanup_activations`), before any folding so their ``Add(x, 3)`` is
  never mistaken for a bias.
- BatchNormalization folded into the preceding Conv, ConvTranspose (group 1) or Gemm when the
  linear output feeds only the BN: the graph loses one op per pair and later passes see the real
  weights.
- Per-channel ``Mul``/``Add`` constants folded into an adjacent Conv/ConvTranspose/Gemm
  (`cleanup_affine`). BN and affine folding repeat until nothing changes, so chains such as
  ``ConvTranspose -> Add(c) -> BN`` or ``Conv -> Mul -> Add`` fold completely.
- Dead nodes are dropped by the pipeline's cleanup after the step.

Numeric effect: float rounding only (folding computes in float64 and casts back).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.ir import edit, query
from onnxshrink.ir.evaluate import evaluate
from onnxshrink.kernels.folding import batchnorm_scale_shift
from onnxshrink.passes import cleanup_activations, cleanup_affine, register
from onnxshrink.passes.base import Context, Pass, PassParams, PassResult, expect
from onnxshrink.passes.cleanup_affine import label as _label

logger = logging.getLogger(__name__)

#: Ops never folded: random or stateful, control flow, or producing non-tensors.
# fmt: off
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
# fmt: on
LINEAR_BEFORE_BN = cleanup_affine.LINEAR


@dataclass(frozen=True, kw_only=True)
class CleanupParams(PassParams):
    """Parameters of ``graph.cleanup``."""

    fold_constants: bool = True
    fold_batchnorm: bool = True
    #: Fold per-channel Mul/Add constants into adjacent Conv/ConvTranspose/Gemm weights.
    fold_affine: bool = True
    #: Rewrite decomposed hard-sigmoid/hard-swish into HardSigmoid/HardSwish.
    fuse_activations: bool = True
    #: Folded tensors may exceed the bytes of the constants they came from by at most this
    #: much, all together.
    max_growth_bytes: int = 1024

    def check(self) -> None:
        """Growth allowance must be non-negative."""
        expect(self.max_growth_bytes >= 0, "max_growth_bytes", self.max_growth_bytes, ">= 0")


@register("graph.cleanup")
class CleanupGraphPass(Pass[CleanupParams]):
    """Fold constants (with onnxruntime, size-bounded), hard-swish, BatchNorm and affine ops.

    Ops: any default-domain op with constant inputs; Add/Clip/Mul/Div forming hard-sigmoid or
    hard-swish; BatchNormalization after Conv, ConvTranspose (group 1) or Gemm; Mul/Add by a
    per-channel constant after those, or before a Conv. Subgraphs of If/Loop/Scan are
    constant-folded but never flattened; the rewrites run on the main graph.
    Preconditions: none. Numeric effect: float rounding only.
    """

    params_type = CleanupParams
    default_ops = None

    def run(self, graph: gs.Graph, targets: Sequence[gs.Node], ctx: Context) -> PassResult:
        """Fold constants in every (sub)graph, then rewrite and fold among `targets`."""
        result = PassResult()
        chosen = {id(n) for n in targets}
        opset = int(graph.opset or ctx.opset)
        if self.params.fold_constants:
            for g in list(query.walk_graphs(graph)):
                nodes = [n for n in g.nodes if g is not graph or id(n) in chosen]
                self._fold_constants(g, nodes, opset, result)
        names = edit.NameScope(graph)
        if self.params.fuse_activations:
            cleanup_activations.fuse(graph, chosen, opset, result, names)
        if self.params.fold_batchnorm or self.params.fold_affine:
            self._fold_linear(graph, chosen, result, names)
        return result

    def _fold_linear(
        self, graph: gs.Graph, chosen: set[int], result: PassResult, names: edit.NameScope
    ) -> None:
        """BatchNorm and affine folding, repeated until a round changes nothing.

        One fold can enable another (an Add folded into a ConvTranspose makes the BN after it
        foldable), so rounds repeat; skips are reported from the last round only, once per node.
        """
        while True:
            round_result = PassResult()
            if self.params.fold_batchnorm:
                for node in [n for n in graph.nodes if n.op == "BatchNormalization"]:
                    if id(node) in chosen and node.outputs:
                        _fold_batchnorm(graph, node, round_result, names)
            if self.params.fold_affine:
                cleanup_affine.fold(graph, chosen, round_result, names)
            for key, stats in round_result.touched.items():
                result.touch(key, **stats)
            if not round_result.touched:
                result.skipped.extend(round_result.skipped)
                return

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
    grown: list[tuple[int, list[gs.Variable]]] = []
    for members in groups.values():
        sources = set().union(*(src.cones.get(t.name, frozenset()) for t in members))
        freed = sum(src.nbytes[s] for s in sources if all(r in keep for r in src.readers[s]))
        new = sum(int(values[t.name].nbytes) for t in members)
        if new > freed + allowance:
            stuck.add(producer[_largest(members, values).name])
        elif new > freed:
            grown.append((new - freed, members))
    if not stuck and sum(g for g, _ in grown) > allowance:
        # the allowance bounds the whole file's growth, not each group's: onnx's "light" test
        # models make every bias with a ConstantOfShape, and a kilobyte per bias grew
        # densenet121's file 1.8x
        _, members = max(grown, key=lambda gm: gm[0])
        stuck.add(producer[_largest(members, values).name])
    return stuck


def _largest(members: list[gs.Variable], values: dict[str, np.ndarray]) -> gs.Variable:
    return max(members, key=lambda t: int(values[t.name].nbytes))


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
    cleanup_affine.scale_shift_linear(lin, s, t, names)
    z = bn.outputs[0]
    edit.disconnect(bn)
    lin.outputs.clear()
    lin.outputs.append(z)
    result.touch(bn, action="folded into " + (lin.name or lin.op))


def _bn_blocker(graph: gs.Graph, bn: gs.Node, lin: gs.Node | None) -> str | None:
    """Why this BatchNormalization cannot be folded, or None (a shared weight is copied)."""
    if lin is None or lin.op not in LINEAR_BEFORE_BN:
        return "input is not produced by Conv/ConvTranspose/Gemm"
    if any(not isinstance(t, gs.Constant) for t in bn.inputs[1:5]):
        return "BatchNormalization parameters are not constant"
    if bn.attrs.get("training_mode", 0) or bn.attrs.get("spatial", 1) != 1:
        return "BatchNormalization in training mode or non-spatial"
    if any(t.outputs or query.is_graph_output(graph, t) for t in bn.outputs[1:]):
        return "BatchNormalization statistics outputs are used"
    return cleanup_affine.linear_blocker(graph, lin, bn.inputs[0])
