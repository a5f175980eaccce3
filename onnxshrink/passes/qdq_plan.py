"""Phase one of QDQ quantization: decide what to quantize, without touching the graph.

Per-op handlers (a plain ``dict[str, Handler]``) look at one node and return a `NodePlan` (the
activations, weights and biases it wants quantized) or a skip reason. `propagate` then extends
the set of quantized activations through the ops that move bytes without arithmetic (Reshape,
Transpose, MaxPool... which onnxruntime runs directly on int8 when input and output share
scale and zero point) and through ops with integer kernels (Concat, pooling, Add/Mul) whose
output a quantized consumer wants. The result is a `QuantPlan`; `qdq_materialise` is the only
place that edits the graph.

The rules follow what onnxruntime (1.32, CPU) fuses, measured and recorded in DESIGN.md:
Conv needs a quantized output (QLinearConv); MatMul and Gemm outputs stay float unless a
consumer wants them (MatMulIntegerToFloat and QGemm with float output, the accurate forms);
a Relu/Clip right after a linear op is absorbed by the quantizer's range; activation x
activation MatMuls gain nothing on CPU and stay float unless asked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.ir import query

#: Ops whose int8 form needs input and output to share scale and zero point.
SHARED_OPS = frozenset(
    {
        "Reshape",
        "Transpose",
        "Flatten",
        "Squeeze",
        "Unsqueeze",
        "MaxPool",
        "Resize",
        "Slice",
        "Expand",
        "Tile",
        "Gather",
        "Split",
    }
)
#: Ops with a QLinear kernel and their own output scale, quantized only when a consumer wants it.
QLINEAR_OPS = frozenset({"Concat", "GlobalAveragePool", "AveragePool"})
ELEMENTWISE_OPS = frozenset({"Add", "Mul"})
#: Activations onnxruntime folds into the preceding QLinear op's output range.
REMOVABLE = frozenset({"Relu", "Clip"})
ANCHORS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})
FLOATS = (np.float32, np.float16)


@dataclass(frozen=True)
class PlanOptions:
    """The subset of pass parameters that planning needs."""

    per_channel: bool = True
    matmul_activations: bool = False
    elementwise: bool = False
    propagate: bool = True
    conv_transpose: bool = False


@dataclass
class WeightUse:
    """One consumer input that reads a constant weight to be quantized."""

    node: gs.Node
    index: int
    tensor: str
    axis: int | None


@dataclass
class BiasUse:
    """A bias input quantized to int32 with scale = input scale x weight scale."""

    node: gs.Node
    index: int
    tensor: str
    act: str
    weight: str
    beta: float = 1.0
    #: The linear op whose weight error the bias absorbs (None: `node` itself).
    anchor: gs.Node | None = None
    #: False: keep the bias float (only bias correction touches it).
    quantize: bool = True


@dataclass
class NodePlan:
    """What one handler wants for its node."""

    node: gs.Node
    acts: list[str] = field(default_factory=list)
    weights: list[WeightUse] = field(default_factory=list)
    biases: list[BiasUse] = field(default_factory=list)
    output_required: bool = False


@dataclass
class ActSpec:
    """An activation that gets a Q/DQ pair; `share_with` names the tensor whose params it uses."""

    tensor: str
    share_with: str | None = None


@dataclass
class QuantPlan:
    """Everything materialise needs: activations, weight and bias uses, anchors, skips."""

    activations: dict[str, ActSpec] = field(default_factory=dict)
    weights: list[WeightUse] = field(default_factory=list)
    biases: list[BiasUse] = field(default_factory=list)
    anchors: list[gs.Node] = field(default_factory=list)
    carriers: list[gs.Node] = field(default_factory=list)
    skipped: list[tuple[gs.Node, str]] = field(default_factory=list)

    def root(self, name: str) -> str:
        """The tensor whose statistics decide `name`'s scale and zero point."""
        seen = set()
        while name in self.activations and self.activations[name].share_with:
            if name in seen:
                break
            seen.add(name)
            name = self.activations[name].share_with or name
        return name

    def roots(self) -> list[str]:
        """Tensors that need calibration, in insertion order."""
        return [n for n, s in self.activations.items() if s.share_with is None]


Handler = Callable[[gs.Node, gs.Graph, PlanOptions], "NodePlan | str"]


def is_float(t: gs.Tensor) -> bool:
    """Whether a tensor is known to hold float32/float16 values."""
    return t.dtype is not None and np.dtype(t.dtype) in (np.dtype(np.float32), np.dtype(np.float16))


def already_quantized(t: gs.Tensor) -> bool:
    """Produced by DequantizeLinear or read by QuantizeLinear: leave it as it is."""
    prod = query.producer(t)
    if prod is not None and prod.op in ("DequantizeLinear", "QuantizeLinear"):
        return True
    return any(c.op == "QuantizeLinear" for c in t.outputs)


def _activation(t: gs.Tensor) -> str | None:
    """Why `t` cannot be a quantized activation input, or None."""
    if isinstance(t, gs.Constant):
        return "input is a constant"
    if not is_float(t):
        return f"input {t.name!r} is not float32/float16 (dtype {t.dtype})"
    if already_quantized(t):
        return f"input {t.name!r} already carries Q/DQ"
    return None


def _weight(t: gs.Tensor, ndim: int | None = None) -> str | None:
    if not isinstance(t, gs.Constant):
        return "weight is not a constant"
    values = t.values
    if np.asarray(values).dtype not in (np.float32, np.float16):
        return f"weight {t.name!r} is not float32/float16"
    if ndim is not None and len(t.shape) != ndim:
        return f"weight {t.name!r} has rank {len(t.shape)}, expected {ndim}"
    return None


def _bias(node: gs.Node, index: int, n_out: int) -> gs.Constant | None:
    """A constant bias with one value per output channel at `index`, else None."""
    if len(node.inputs) <= index or not node.inputs[index].name:
        return None
    b = node.inputs[index]
    if not isinstance(b, gs.Constant) or np.asarray(b.values).dtype not in (np.float32, np.float16):
        return None
    return b if int(np.prod(b.shape)) == n_out and max(b.shape, default=1) == n_out else None


def conv_handler(node: gs.Node, graph: gs.Graph, opt: PlanOptions) -> NodePlan | str:
    """Conv/ConvTranspose: uint8 input, per-channel int8 weight, int32 bias, quantized output."""
    if len(node.inputs) < 2:
        return "missing weight"
    x, w = node.inputs[0], node.inputs[1]
    reason = _activation(x) or _weight(w)
    if reason:
        return reason
    out = quantized_output(node, graph)
    if out is None:
        return "output is a graph output or feeds several ops that need float"
    group = int(node.attrs.get("group", 1))
    axis: int | None
    if node.op == "Conv":
        axis, n_out = 0, int(w.shape[0])
    else:
        axis, n_out = (1 if group == 1 else None), int(w.shape[1]) * group
    plan = NodePlan(node, acts=[x.name], output_required=True)
    plan.weights.append(WeightUse(node, 1, w.name, axis if opt.per_channel else None))
    b = _bias(node, 2, n_out)
    if len(node.inputs) > 2 and node.inputs[2].name and b is None:
        return "bias is not a constant vector"
    if b is not None:
        plan.biases.append(BiasUse(node, 2, b.name, x.name, w.name))
    return plan


def convtranspose_handler(node: gs.Node, graph: gs.Graph, opt: PlanOptions) -> NodePlan | str:
    """ConvTranspose: onnxruntime 1.32's CPU QDQ fusions have no ConvTranspose rule, so Q/DQ
    around it would only add work to a float kernel; left in float unless asked for."""
    if not opt.conv_transpose:
        return "no int8 ConvTranspose kernel is fused by onnxruntime on CPU; left in float"
    return conv_handler(node, graph, opt)


def gemm_handler(node: gs.Node, graph: gs.Graph, opt: PlanOptions) -> NodePlan | str:
    """Gemm: uint8 A, per-channel int8 B, int32 C; output float unless a consumer wants it."""
    if len(node.inputs) < 2:
        return "missing weight"
    a, b = node.inputs[0], node.inputs[1]
    reason = _activation(a) or _weight(b, 2)
    if reason:
        return reason
    trans_b = int(node.attrs.get("transB", 0))
    n_out = int(b.shape[0] if trans_b else b.shape[1])
    plan = NodePlan(node, acts=[a.name])
    plan.weights.append(
        WeightUse(node, 1, b.name, (0 if trans_b else 1) if opt.per_channel else None)
    )
    c = _bias(node, 2, n_out)
    if len(node.inputs) > 2 and node.inputs[2].name and c is None:
        return "bias C is not a constant vector of one value per output"
    if c is not None:
        beta = float(node.attrs.get("beta", 1.0))
        plan.biases.append(BiasUse(node, 2, c.name, a.name, b.name, beta))
    return plan


def matmul_handler(node: gs.Node, graph: gs.Graph, opt: PlanOptions) -> NodePlan | str:
    """MatMul: weight on the right (per-column int8), or activation x activation if enabled."""
    if len(node.inputs) != 2:
        return "expected two inputs"
    a, b = node.inputs
    if isinstance(a, gs.Constant):
        return "constant left operand (weight on the left is not fused by onnxruntime)"
    reason = _activation(a)
    if reason:
        return reason
    if isinstance(b, gs.Constant):
        reason = _weight(b, 2)
        if reason:
            return reason
        plan = NodePlan(node, acts=[a.name])
        plan.weights.append(WeightUse(node, 1, b.name, 1 if opt.per_channel else None))
        bias = _bias_add(node, graph, int(b.shape[1]))
        if bias is not None:
            add, index = bias
            # onnxruntime fuses MatMul + Add into Gemm only for 2-D inputs; elsewhere an int32
            # bias would only add a DequantizeLinear at run time.
            two_d = a.shape is None or len(a.shape) == 2
            plan.biases.append(
                BiasUse(
                    add, index, add.inputs[index].name, a.name, b.name, anchor=node, quantize=two_d
                )
            )
        return plan
    if not opt.matmul_activations:
        return (
            "activation x activation MatMul left in float "
            "(no speed-up on CPU; set matmul_activations)"
        )
    reason = _activation(b)
    if reason:
        return reason
    return NodePlan(node, acts=[a.name, b.name])


def _bias_add(node: gs.Node, graph: gs.Graph, n_out: int) -> tuple[gs.Node, int] | None:
    """The Add of a constant per-column bias right after a MatMul, and the bias input index.

    onnxruntime fuses MatMul + Add into Gemm before its QDQ fusions; with a float bias that
    Gemm has a non-DQ input and runs in fp32 (slower than the original). An int32 bias behind
    a DequantizeLinear turns it into QGemm instead, and costs nothing when no fusion happens.
    """
    y = node.outputs[0]
    if len(y.outputs) != 1 or query.is_graph_output(graph, y):
        return None
    add = y.outputs[0]
    if add.op != "Add" or len(add.inputs) != 2:
        return None
    index = 1 if add.inputs[0] is y else 0
    c = add.inputs[index]
    if not isinstance(c, gs.Constant) or np.asarray(c.values).dtype not in (np.float32, np.float16):
        return None
    if len(c.shape) != 1 or int(c.shape[0]) != n_out:
        return None
    return add, index


HANDLERS: dict[str, Handler] = {
    "Conv": conv_handler,
    "ConvTranspose": convtranspose_handler,
    "Gemm": gemm_handler,
    "MatMul": matmul_handler,
}


def quantized_output(node: gs.Node, graph: gs.Graph) -> gs.Tensor | None:
    """The tensor to quantize after `node`: its output, or the output of a lone Relu/Clip.

    None when that tensor is a graph output (quantizing it would change the model's output)
    or when the node's output also feeds other consumers next to a Relu/Clip.
    """
    if not node.outputs:
        return None
    y = node.outputs[0]
    if query.is_graph_output(graph, y):
        return None
    users = y.outputs
    if len(users) == 1 and users[0].op in REMOVABLE and _clip_removable(users[0]):
        z = users[0].outputs[0]
        return None if query.is_graph_output(graph, z) else z
    return y


def _clip_removable(node: gs.Node) -> bool:
    """Relu always; Clip when its bounds are constants (then the quantizer's range clips)."""
    if node.op == "Relu":
        return True
    return all(isinstance(t, gs.Constant) for t in node.inputs[1:] if t.name)


def plan(
    graph: gs.Graph,
    targets: list[gs.Node],
    opt: PlanOptions,
    handlers: dict[str, Handler] | None = None,
) -> QuantPlan:
    """Run handlers on `targets` and propagate quantized activations through carrier ops."""
    handlers = HANDLERS if handlers is None else handlers
    result = QuantPlan()
    carriers: list[gs.Node] = []
    for node in targets:
        if node.op in CONTROL_FLOW:
            result.skipped.append((node, "control-flow body left in float (not quantized inside)"))
            continue
        if node.op in SHARED_OPS or node.op in QLINEAR_OPS or node.op in ELEMENTWISE_OPS:
            carriers.append(node)
            continue
        handler = handlers.get(node.op)
        if handler is None:
            result.skipped.append((node, f"no quantization handler for {node.op}"))
            continue
        got = handler(node, graph, opt)
        if isinstance(got, str):
            result.skipped.append((node, got))
            continue
        _add_node_plan(result, got, graph)
    if opt.propagate:
        _propagate(result, graph, carriers, opt)
    return result


def _add_node_plan(result: QuantPlan, p: NodePlan, graph: gs.Graph) -> None:
    result.anchors.append(p.node)
    for name in p.acts:
        result.activations.setdefault(name, ActSpec(name))
    if p.output_required:
        out = quantized_output(p.node, graph)
        if out is not None:
            result.activations.setdefault(out.name, ActSpec(out.name))
    result.weights.extend(p.weights)
    result.biases.extend(p.biases)


def _propagate(
    result: QuantPlan, graph: gs.Graph, carriers: list[gs.Node], opt: PlanOptions
) -> None:
    """Extend quantized activations through carrier ops until nothing changes."""
    acts = result.activations
    used: dict[int, gs.Node] = {}
    changed = True
    while changed:
        changed = False
        for node in carriers:
            if node.op in SHARED_OPS:
                applies, grew = _shared(node, graph, acts)
            elif node.op in QLINEAR_OPS or (opt.elementwise and node.op in ELEMENTWISE_OPS):
                applies, grew = _qlinear(node, graph, acts)
            else:
                applies, grew = False, False
            changed = changed or grew
            if applies:
                used[id(node)] = node
    result.carriers = list(used.values())
    chosen = {id(n) for n in result.carriers}
    for node in carriers:
        if id(node) not in chosen:
            result.skipped.append((node, "no quantized neighbour to carry int8 through"))


def _shared(node: gs.Node, graph: gs.Graph, acts: dict[str, ActSpec]) -> tuple[bool, bool]:
    """Input and outputs quantized with the input's parameters, if either side already is.

    Returns (the op carries int8, the activation set grew).
    """
    if not node.inputs or not node.outputs:
        return False, False
    x = node.inputs[0]
    outs = [o for o in node.outputs if o.name]
    if _activation(x) is not None or np.dtype(x.dtype) != np.float32:
        return False, False
    if any(
        not is_float(o) or already_quantized(o) or query.is_graph_output(graph, o) for o in outs
    ):
        return False, False
    if x.name not in acts and not any(o.name in acts for o in outs):
        return False, False
    changed = False
    if x.name not in acts:
        acts[x.name] = ActSpec(x.name)
        changed = True
    for o in outs:
        spec = acts.get(o.name)
        if spec is None or spec.share_with != x.name:
            acts[o.name] = ActSpec(o.name, share_with=x.name)
            changed = True
    return True, changed


def _qlinear(node: gs.Node, graph: gs.Graph, acts: dict[str, ActSpec]) -> tuple[bool, bool]:
    """All float inputs quantized when a consumer wants the (post-Relu) output quantized."""
    out = quantized_output(node, graph)
    if out is None or out.name not in acts:
        return False, False
    data = node.inputs if node.op in ("Concat", "Add", "Mul") else node.inputs[:1]
    if any(isinstance(t, gs.Constant) for t in data):
        return False, False
    if any(_activation(t) is not None or np.dtype(t.dtype) != np.float32 for t in data):
        return False, False
    changed = False
    for t in data:
        if t.name not in acts:
            acts[t.name] = ActSpec(t.name)
            changed = True
    return True, changed
