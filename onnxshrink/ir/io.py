"""Read and write ONNX models: validated loading, lazy external data, atomic saving.

Everything that touches model files goes through here, so the rest of the package can assume:
the model parsed and passed the checker, external weights resolve from any working directory,
and a save either leaves a complete output or nothing.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError

from onnxshrink.errors import ModelError, OutputError
from onnxshrink.ir import query
from onnxshrink.ir.export import node_metadata
from onnxshrink.ir.export import to_model as to_model
from onnxshrink.ir.external import (
    EXTERNAL_DATA_THRESHOLD,
    external_tensors,
    inline_external,
    resolve_external,
    use_external_values,
    weight_bytes,
    write_external,
)
from onnxshrink.ir.proto import copy_message, one_line
from onnxshrink.ir.proto import iter_all_graphs as iter_all_graphs
from onnxshrink.ir.proto import quiet_gs as quiet_gs

logger = logging.getLogger(__name__)


#: Operator domains onnxruntime's CPU build implements; anything else needs a custom-op library.
KNOWN_DOMAINS = frozenset(
    {
        "",
        "ai.onnx",
        "ai.onnx.ml",
        "ai.onnx.preview.training",
        "ai.onnx.training",
        "com.microsoft",
        "com.microsoft.nchwc",
        "com.microsoft.experimental",
        "com.ms.internal.nhwc",
        "org.pytorch.aten",
    }
)


@dataclass
class ModelInfo:
    """What gs does not keep but a faithful save must restore."""

    path: Path
    ir_version: int
    opset_imports: dict[str, int]
    producer_name: str = ""
    producer_version: str = ""
    domain: str = ""
    model_version: int = 0
    doc_string: str = ""
    metadata_props: dict[str, str] = field(default_factory=dict)
    input_order: list[str] = field(default_factory=list)
    initializer_inputs: list[str] = field(default_factory=list)
    main_initializers: frozenset[str] = frozenset()
    #: The graph's input and output declarations as written, restored verbatim on export.
    inputs: dict[str, onnx.ValueInfoProto] = field(default_factory=dict)
    outputs: dict[str, onnx.ValueInfoProto] = field(default_factory=dict)
    #: IR >= 4 initializers that are also graph inputs: defaults a caller may override, so the
    #: IR holds them as graph inputs (never folded) and the export puts the defaults back.
    overridable: dict[str, onnx.TensorProto] = field(default_factory=dict)
    #: IR 10 metadata gs drops: the main graph's, and each uniquely named node's (by op type).
    graph_metadata: dict[str, str] = field(default_factory=dict)
    node_metadata: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)
    had_value_info: bool = False
    external_data: bool = False
    file_bytes: int = 0

    @property
    def opset(self) -> int:
        """The default-domain opset version."""
        return self.opset_imports.get("", self.opset_imports.get("ai.onnx", 1))


@dataclass
class LoadedModel:
    """A model ready for passes: its gs graph plus what a save must restore."""

    graph: gs.Graph
    info: ModelInfo
    proto: onnx.ModelProto  # the weight-less proto as read (signature, for feeds and reports)


def _check_path(path: Path) -> None:
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    if path.is_dir():
        raise ModelError(f"{path}: is a directory, expected an .onnx file")
    if path.stat().st_size == 0:
        raise ModelError(f"{path}: empty file, expected an ONNX model")


def read_model(path: str | os.PathLike[str], *, check: bool = True) -> onnx.ModelProto:
    """Parse and check a model file without loading external weights.

    External tensor locations are rewritten to absolute paths so values resolve lazily from any
    working directory. Every failure becomes a one-line `ModelError` naming the file.
    """
    path = Path(path)
    _check_path(path)
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except DecodeError as e:
        raise ModelError(f"{path}: not an ONNX model (protobuf parse failed: {e})") from None
    except Exception as e:  # onnx raises several types for corrupt files
        raise ModelError(f"{path}: cannot be read as an ONNX model ({one_line(e)})") from None
    if not model.HasField("graph") or model.ir_version <= 0 or not model.opset_import:
        raise ModelError(
            f"{path}: a protobuf but not an ONNX model (no graph, ir_version or opset_import)"
        )
    base = path.resolve().parent
    for tensor in external_tensors(model):
        resolve_external(tensor, base, path)
    if check:
        check_model(model, path)
    _check_domains(model, path)
    return model


def check_model(model: onnx.ModelProto, path: Path | str) -> None:
    """Run the ONNX checker on a (weight-less) proto, as one clear error.

    The checker looks for external data files relative to the process's working directory,
    and our in-memory locations are absolute (so lazy weights resolve from anywhere): both
    would fail every external-data model. `resolve_external` already checked each location and
    byte range, so external tensors are shown to the checker as empty placeholders of the same
    name and type, and restored afterwards.
    """
    saved = []
    for tensor in external_tensors(model):
        saved.append((tensor, list(tensor.dims), list(tensor.external_data)))
        del tensor.dims[:]
        tensor.dims.append(0)
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        msg = " ".join(str(e).split())[:300]
        raise ModelError(f"{path}: fails the ONNX checker: {msg}") from None
    except ValueError as e:  # > 2 GiB of inline weights cannot be serialised for the checker
        raise ModelError(f"{path}: cannot be checked: {one_line(e)}") from None
    finally:
        for tensor, dims, external in saved:
            del tensor.dims[:]
            tensor.dims.extend(dims)
            tensor.external_data.extend(external)
            tensor.data_location = onnx.TensorProto.EXTERNAL


def _check_domains(model: onnx.ModelProto, path: Path) -> None:
    local = {f.domain for f in model.functions}
    unknown: dict[str, str] = {}
    for graph in iter_all_graphs(model):
        for node in graph.node:
            if node.domain not in KNOWN_DOMAINS and node.domain not in local:
                unknown.setdefault(node.domain, node.op_type)
    if unknown:
        items = ", ".join(f"{d!r} (e.g. {op})" for d, op in sorted(unknown.items()))
        raise ModelError(
            f"{path}: uses custom operator domain {items} that onnxruntime cannot run "
            "without its custom-op library"
        )


def model_info(model: onnx.ModelProto, path: Path) -> ModelInfo:
    """Capture the model-level fields and signature that gs drops."""
    init_names = {t.name for t in model.graph.initializer}
    return ModelInfo(
        path=path,
        ir_version=model.ir_version,
        opset_imports={o.domain: o.version for o in model.opset_import},
        producer_name=model.producer_name,
        producer_version=model.producer_version,
        domain=model.domain,
        model_version=model.model_version,
        doc_string=model.doc_string,
        metadata_props={p.key: p.value for p in model.metadata_props},
        input_order=[i.name for i in model.graph.input],
        initializer_inputs=[i.name for i in model.graph.input if i.name in init_names],
        main_initializers=frozenset(init_names),
        inputs={i.name: copy_message(i) for i in model.graph.input},
        outputs={o.name: copy_message(o) for o in model.graph.output},
        overridable=_overridable(model),
        graph_metadata={p.key: p.value for p in model.graph.metadata_props},
        node_metadata=node_metadata(model),
        had_value_info=any(len(g.value_info) for g in iter_all_graphs(model)),
        external_data=any(True for _ in external_tensors(model)),
        file_bytes=path.stat().st_size,
    )


def _overridable(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers that are also inputs in an IR >= 4 model (IR < 4 lists every weight so)."""
    if model.ir_version < 4:
        return {}
    inputs = {i.name for i in model.graph.input}
    return {t.name: copy_message(t) for t in model.graph.initializer if t.name in inputs}


def load(path: str | os.PathLike[str]) -> LoadedModel:
    """Load a model as a gs graph with lazy weights and inferred shapes.

    Overridable initializers (IR >= 4, also listed as inputs) become plain graph inputs in the
    IR: a caller may feed them, so no pass may treat them as constants.
    """
    path = Path(path)
    model = read_model(path)
    info = model_info(model, path)
    slim, weights = _weightless(model)
    inferred = infer_shapes(slim)
    if info.overridable:
        kept = [t for t in inferred.graph.initializer if t.name not in info.overridable]
        del inferred.graph.initializer[:]
        inferred.graph.initializer.extend(kept)
    try:
        with quiet_gs():
            graph = gs.import_onnx(inferred)
    except Exception as e:  # gs raises bare exceptions on constructs it does not model
        raise ModelError(f"{path}: cannot be imported ({one_line(e)})") from None
    # the placeholders read the loaded weights (an outer weight may be read only in a subgraph)
    tensors = (t for g in query.walk_graphs(graph) for t in g.tensors().values())
    for tensor in tensors:
        if isinstance(tensor, gs.Constant) and tensor.name in weights:
            weight = weights[tensor.name]
            tensor._values = gs.ir.tensor.LazyValues(weight)
            # as gs's own import: the field's value when set, else None (written back unset)
            has = weight.HasField("data_location")
            tensor.data_location = int(weight.data_location) if has else None
    if info.external_data:
        use_external_values(graph)
    return LoadedModel(graph=graph, info=info, proto=model)


#: Main-graph initializers at least this big are left out of the copy shape inference works on.
WEIGHTLESS_MIN_BYTES = 1024


def _weightless(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, onnx.TensorProto]]:
    """A copy of `model` whose large inline main-graph initializers are placeholders (name, type
    and dims only), and the loaded initializers they stand for, by name.

    onnx's shape inference serialises the whole model and parses its result back: with the
    weights that was two more copies of them (0.6 s and 170 MB on a 90 MB transformer) for
    shapes that only need the dims. Small initializers stay, for data propagation (shapes).
    """
    slim = onnx.ModelProto()
    for name in ("ir_version", "producer_name", "producer_version", "domain", "model_version",
                 "doc_string"):
        setattr(slim, name, getattr(model, name))
    slim.opset_import.extend(model.opset_import)
    slim.functions.extend(model.functions)
    slim.metadata_props.extend(model.metadata_props)
    source, graph = model.graph, slim.graph
    graph.name, graph.doc_string = source.name, source.doc_string
    for name in ("node", "input", "output", "value_info", "sparse_initializer", "metadata_props",
                 "quantization_annotation"):
        getattr(graph, name).extend(getattr(source, name))
    weights: dict[str, onnx.TensorProto] = {}
    for tensor in source.initializer:
        if (
            tensor.data_location == onnx.TensorProto.EXTERNAL
            or tensor.ByteSize() < WEIGHTLESS_MIN_BYTES
            or tensor.name in weights
        ):
            graph.initializer.append(tensor)
            continue
        placeholder = graph.initializer.add()
        placeholder.name, placeholder.data_type = tensor.name, tensor.data_type
        placeholder.dims.extend(tensor.dims)
        placeholder.data_location = onnx.TensorProto.EXTERNAL
        entry = placeholder.external_data.add()
        entry.key, entry.value = "location", "weightless-placeholder"
        weights[tensor.name] = tensor
    return slim, weights


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Best-effort shape inference; a model it cannot infer is returned unchanged."""
    try:
        inferred: onnx.ModelProto = onnx.shape_inference.infer_shapes(
            model, strict_mode=False, data_prop=True
        )
        return inferred
    except Exception as e:  # custom ops or malformed shapes: passes cope without value_info
        logger.debug("shape inference failed: %s", one_line(e))
        return model


def save(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
) -> Path:
    """Write atomically; external data goes to ``<name>.data`` beside the model.

    ``external_data=None`` decides from the weight size (protobuf cannot hold 2 GiB). Tensors that
    still point at the input's external file are streamed into the new data file, never loaded.
    """
    path = Path(path)
    if path.exists() and path.is_dir():
        raise OutputError(f"{path}: is a directory, expected an output file path")
    if not path.parent.is_dir():
        raise OutputError(f"{path.parent}: output directory does not exist")
    if external_data is None:
        external_data = weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    data_path = path.parent / data_name
    tmp_model = _temp_sibling(path)
    tmp_data = _temp_sibling(data_path) if external_data else None
    try:
        if external_data:
            assert tmp_data is not None
            write_external(model, tmp_data, data_name)
        else:
            inline_external(model)
        with open(tmp_model, "wb") as f:
            f.write(model.SerializeToString())
        if tmp_data is not None:
            os.replace(tmp_data, data_path)
        os.replace(tmp_model, path)
    except OSError as e:
        raise OutputError(f"{path}: cannot write output ({e.strerror or e})") from None
    finally:
        for tmp in (tmp_model, tmp_data):
            if tmp is not None and tmp.exists():
                tmp.unlink()
    return path


def _temp_sibling(path: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(name, 0o644)  # mkstemp makes 0600; outputs are ordinary files once renamed
    return Path(name)
