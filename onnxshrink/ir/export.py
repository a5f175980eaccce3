"""gs graph -> ModelProto, restoring what onnx-graphsurgeon drops.

gs loses the input signature (initializer inputs, scalar shapes), metadata, opsets and the
placement of shared initializers in subgraphs; `to_model` puts all of it back so a save is
faithful to the input model.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import onnx
import onnx_graphsurgeon as gs

from onnxshrink.ir.external import fix_data_locations
from onnxshrink.ir.proto import copy_message, iter_all_graphs, quiet_gs

if TYPE_CHECKING:
    from onnxshrink.ir.io import ModelInfo

logger = logging.getLogger(__name__)


def _unique_nodes(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Nodes whose name occurs once in the whole model (subgraph branches often repeat names)."""
    seen: dict[str, onnx.NodeProto] = {}
    repeated: set[str] = set()
    for graph in iter_all_graphs(model):
        for node in graph.node:
            if node.name in seen:
                repeated.add(node.name)
            seen[node.name] = node
    return {k: v for k, v in seen.items() if k and k not in repeated}


def node_metadata(model: onnx.ModelProto) -> dict[str, tuple[str, dict[str, str]]]:
    return {
        name: (node.op_type, {p.key: p.value for p in node.metadata_props})
        for name, node in _unique_nodes(model).items()
        if len(node.metadata_props)
    }


def _restore_metadata(model: onnx.ModelProto, info: ModelInfo) -> None:
    """Put back the metadata gs drops; a node keeps its own if it survived under its name."""
    for key, value in info.graph_metadata.items():
        model.graph.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    if not info.node_metadata:
        return
    for name, node in _unique_nodes(model).items():
        op_type, props = info.node_metadata.get(name, ("", {}))
        if op_type == node.op_type:
            for key, value in props.items():
                node.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))


def to_model(graph: gs.Graph, info: ModelInfo) -> onnx.ModelProto:
    """Export a gs graph and restore everything gs drops (metadata, signature, opsets)."""
    opsets = dict(info.opset_imports)
    opsets[""] = max(opsets.get("", 1), int(graph.opset or 1))
    with quiet_gs():
        model: onnx.ModelProto = gs.export_onnx(graph, do_type_check=False)
    fix_data_locations(model)
    for graph_proto in iter_all_graphs(model):
        for node in graph_proto.node:
            if node.domain not in opsets and node.domain != "ai.onnx":
                opsets[node.domain] = 1
    del model.opset_import[:]
    for domain, version in sorted(opsets.items()):
        model.opset_import.append(onnx.OperatorSetIdProto(domain=domain, version=version))
    model.ir_version = max(info.ir_version, int(graph.ir_version or 0))
    for name in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        value = getattr(info, name)
        if value:
            setattr(model, name, value)
        else:  # proto2: an explicitly set empty field still costs bytes and shows in diffs
            model.ClearField(name)
    del model.metadata_props[:]
    for key, value in info.metadata_props.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    _place_shared_initializers(graph, model)
    _restore_metadata(model, info)
    if model.ir_version < 4:
        for sub in list(iter_all_graphs(model))[1:]:
            _initializers_as_constants(sub)
    _restore_signature(model, info)
    if not info.had_value_info:
        for graph_proto in iter_all_graphs(model):
            del graph_proto.value_info[:]
    return model


def _graph_pairs(
    graph: gs.Graph, proto: onnx.GraphProto
) -> list[tuple[gs.Graph, onnx.GraphProto, int]]:
    """Every (sub)graph with its exported proto and its parent's index (-1 for the main graph).

    Matched through node positions and attribute names, never through graph names (the two
    branches of an If are often both called ``sub_graph``).
    """
    pairs: list[tuple[gs.Graph, onnx.GraphProto, int]] = [(graph, proto, -1)]
    k = 0
    while k < len(pairs):
        g, gp, _ = pairs[k]
        for node, node_proto in zip(g.nodes, gp.node):
            for attr in node_proto.attribute:
                value = node.attrs.get(attr.name)
                if attr.type == onnx.AttributeProto.GRAPH and isinstance(value, gs.Graph):
                    pairs.append((value, attr.g, k))
                elif attr.type == onnx.AttributeProto.GRAPHS and isinstance(value, list):
                    pairs.extend((v, sub, k) for v, sub in zip(value, attr.graphs))
        k += 1
    return pairs


def _ancestors(parents: list[int], k: int) -> list[int]:
    chain = []
    while k >= 0:
        chain.append(k)
        k = parents[k]
    return chain


def _place_shared_initializers(graph: gs.Graph, model: onnx.ModelProto) -> None:
    """Store each constant once, in the innermost graph that encloses all its readers.

    gs exports a constant as an initializer of every (sub)graph whose nodes read it, so an
    outer-scope weight used in both If branches (or in a Loop body and its parent) is written
    once per reader (+41% on silero-vad). The same gs object read from several graphs is one
    tensor; it moves to the lowest common ancestor of its readers, which every reader can see.
    Distinct objects that merely share a name (e.g. in two independent branches) stay apart.
    """
    pairs = _graph_pairs(graph, model.graph)
    parents = [p for _, _, p in pairs]
    readers: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for k, (g, _, _) in enumerate(pairs):
        for name, tensor in g.tensors().items():
            if isinstance(tensor, gs.Constant):
                readers.setdefault(id(tensor), []).append(k)
                names[id(tensor)] = name
    drop: dict[int, set[str]] = {}
    add: list[tuple[int, int, str]] = []  # (target graph, a reader graph holding it, name)
    for key, ks in readers.items():
        if len(ks) < 2:
            continue
        common = set(_ancestors(parents, ks[0]))
        for k in ks[1:]:
            common &= set(_ancestors(parents, k))
        target = max(common)  # ancestors have smaller indices: the largest is the deepest
        for k in ks:
            if k != target:
                drop.setdefault(k, set()).add(names[key])
        if target not in ks:
            add.append((target, ks[0], names[key]))
    for target, reader, name in add:  # copy up first: the reader's copy is deleted below
        source = next(t for t in pairs[reader][1].initializer if t.name == name)
        pairs[target][1].initializer.add().CopyFrom(source)
    for k, dropped in drop.items():
        gp = pairs[k][1]
        keep = [t for t in gp.initializer if t.name not in dropped]
        del gp.initializer[:]
        gp.initializer.extend(keep)


def _initializers_as_constants(graph: onnx.GraphProto) -> None:
    """IR < 4 wants every initializer listed as an input, which a subgraph cannot do (If
    branches take no inputs): a weight a pass created there becomes a Constant node instead."""
    if not graph.initializer:
        return
    nodes = []
    for tensor in graph.initializer:
        attr = onnx.AttributeProto(name="value", type=onnx.AttributeProto.TENSOR)
        attr.t.CopyFrom(tensor)
        nodes.append(onnx.NodeProto(op_type="Constant", output=[tensor.name], attribute=[attr]))
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes, *rest])
    del graph.initializer[:]


def _restore_signature(model: onnx.ModelProto, info: ModelInfo) -> None:
    """Put back the inputs and outputs exactly as declared, in their order.

    gs rebuilds declarations from its tensors (losing, e.g., the empty shape of a scalar) and
    drops initializers listed as inputs. Overridable defaults come back as initializers. In an
    IR < 4 model every initializer must be an input, so weights a pass created are appended; the
    ones it removed disappear from both lists, which keeps the set of inputs a caller must feed.
    """
    graph = model.graph
    by_name = {i.name: i for i in graph.input}
    for name, tensor in info.overridable.items():
        if name in by_name:
            graph.initializer.append(copy_message(tensor))
    inits = {t.name: t for t in graph.initializer}
    ordered: list[onnx.ValueInfoProto] = []
    for name in info.input_order:
        if name in by_name:
            by_name.pop(name)
            ordered.append(copy_message(info.inputs[name]))
        elif name in info.initializer_inputs and name in inits:
            ordered.append(copy_message(info.inputs[name]))
    ordered.extend(by_name.values())
    if model.ir_version < 4:
        listed = {vi.name for vi in ordered}
        ordered.extend(_tensor_value_info(t) for t in graph.initializer if t.name not in listed)
    del graph.input[:]
    graph.input.extend(ordered)
    for i, out in enumerate(graph.output):
        if out.name in info.outputs:
            graph.output[i].CopyFrom(info.outputs[out.name])


def _tensor_value_info(tensor: onnx.TensorProto) -> onnx.ValueInfoProto:
    """The input declaration of an initializer (a scalar still gets an empty shape)."""
    vi = onnx.ValueInfoProto(name=tensor.name)
    vi.type.tensor_type.elem_type = tensor.data_type
    vi.type.tensor_type.shape.SetInParent()
    for d in tensor.dims:
        vi.type.tensor_type.shape.dim.add().dim_value = d
    return vi
