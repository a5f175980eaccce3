"""Read and write ONNX models: validated loading, lazy external data, atomic saving.

Everything that touches model files goes through here, so the rest of the package can assume:
the model parsed and passed the checker, external weights resolve from any working directory,
and a save either leaves a complete output or nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from onnxshrink.errors import ModelError, OutputError

logger = logging.getLogger(__name__)

#: Above this many bytes of weights a model is written with external data (protobuf's 2 GiB cap).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
#: Tensors smaller than this stay inline even in an external-data model (onnx's own convention).
EXTERNAL_TENSOR_MIN_BYTES = 1024
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


@contextlib.contextmanager
def quiet_gs() -> Iterator[None]:
    """Silence onnx-graphsurgeon's own logger (it prints to stdout) around one call."""
    gl = gs.logger.G_LOGGER
    saved = gl.severity
    gl.severity = gl.ERROR
    try:
        yield
    finally:
        gl.severity = saved


def _check_path(path: Path) -> None:
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    if path.is_dir():
        raise ModelError(f"{path}: is a directory, expected an .onnx file")
    if path.stat().st_size == 0:
        raise ModelError(f"{path}: empty file, expected an ONNX model")


def _iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _iter_graphs(sub)


def iter_all_graphs(model: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    """The main graph, every subgraph, and the bodies of model-local functions' subgraphs."""
    yield from _iter_graphs(model.graph)


def _external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    for graph in iter_all_graphs(model):
        for tensor in graph.initializer:
            if external_data_helper.uses_external_data(tensor):
                yield tensor


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
        raise ModelError(f"{path}: cannot be read as an ONNX model ({_one_line(e)})") from None
    if not model.HasField("graph") or model.ir_version <= 0 or not model.opset_import:
        raise ModelError(
            f"{path}: a protobuf but not an ONNX model (no graph, ir_version or opset_import)"
        )
    base = path.resolve().parent
    for tensor in _external_tensors(model):
        info = {e.key: e for e in tensor.external_data}
        location = info["location"].value if "location" in info else ""
        target = (base / location).resolve()
        if not target.is_file():
            raise ModelError(
                f"{path}: tensor {tensor.name!r} refers to external data {location!r} "
                "that does not exist"
            )
        info["location"].value = str(target)
    if check:
        check_model(model, path)
    _check_domains(model, path)
    return model


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def check_model(model: onnx.ModelProto, path: Path | str) -> None:
    """Run the ONNX checker on a (weight-less) proto, as one clear error."""
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        msg = " ".join(str(e).split())[:300]
        raise ModelError(f"{path}: fails the ONNX checker: {msg}") from None


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
        had_value_info=any(len(g.value_info) for g in iter_all_graphs(model)),
        external_data=any(True for _ in _external_tensors(model)),
        file_bytes=path.stat().st_size,
    )


def load(path: str | os.PathLike[str]) -> LoadedModel:
    """Load a model as a gs graph with lazy weights and inferred shapes."""
    path = Path(path)
    model = read_model(path)
    info = model_info(model, path)
    inferred = infer_shapes(model)
    with quiet_gs():
        graph = gs.import_onnx(inferred)
    return LoadedModel(graph=graph, info=info, proto=model)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Best-effort shape inference; a model it cannot infer is returned unchanged."""
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as e:  # custom ops or malformed shapes: passes cope without value_info
        logger.debug("shape inference failed: %s", _one_line(e))
        return model


def to_model(graph: gs.Graph, info: ModelInfo) -> onnx.ModelProto:
    """Export a gs graph and restore everything gs drops (metadata, signature, opsets)."""
    opsets = dict(info.opset_imports)
    opsets[""] = max(opsets.get("", 1), int(graph.opset or 1))
    with quiet_gs():
        model = gs.export_onnx(graph, do_type_check=False)
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
    _hoist_outer_initializers(model, info.main_initializers)
    _restore_inputs(model, info)
    if not info.had_value_info:
        for graph_proto in iter_all_graphs(model):
            del graph_proto.value_info[:]
    return model


def _hoist_outer_initializers(model: onnx.ModelProto, main_names: frozenset[str]) -> None:
    """Undo gs copying outer-scope initializers into every subgraph that reads them."""
    main = model.graph
    present = {t.name for t in main.initializer}
    for sub in list(iter_all_graphs(model))[1:]:
        keep = []
        for tensor in sub.initializer:
            if tensor.name not in main_names:
                keep.append(tensor)
                continue
            if tensor.name not in present:
                main.initializer.append(tensor)
                present.add(tensor.name)
        if len(keep) != len(sub.initializer):
            del sub.initializer[:]
            sub.initializer.extend(keep)


def _restore_inputs(model: onnx.ModelProto, info: ModelInfo) -> None:
    """Keep the original input order, and initializers listed as inputs (IR < 4 style)."""
    graph = model.graph
    by_name = {i.name: i for i in graph.input}
    inits = {t.name: t for t in graph.initializer}
    ordered: list[onnx.ValueInfoProto] = []
    for name in info.input_order:
        if name in by_name:
            ordered.append(by_name.pop(name))
        elif name in info.initializer_inputs and name in inits:
            t = inits[name]
            vi = onnx.ValueInfoProto(name=name)
            vi.type.tensor_type.elem_type = t.data_type
            for d in t.dims:
                vi.type.tensor_type.shape.dim.add().dim_value = d
            ordered.append(vi)
    ordered.extend(by_name.values())
    del graph.input[:]
    graph.input.extend(ordered)


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of initializer payload, counting external tensors by their recorded length."""
    total = 0
    for graph in iter_all_graphs(model):
        for tensor in graph.initializer:
            total += tensor_nbytes(tensor)
    return total


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    """Payload bytes of one tensor, inline or external, without loading it."""
    if external_data_helper.uses_external_data(tensor):
        info = {e.key: e.value for e in tensor.external_data}
        if "length" in info:
            return int(info["length"])
        return os.path.getsize(info["location"]) - int(info.get("offset", 0))
    return tensor.ByteSize()


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
            _write_external(model, tmp_data, data_name)
        else:
            _inline_external(model)
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
    return Path(name)


def _read_external(tensor: onnx.TensorProto) -> Iterator[bytes]:
    info = {e.key: e.value for e in tensor.external_data}
    offset = int(info.get("offset", 0))
    length = int(info["length"]) if "length" in info else None
    with open(info["location"], "rb") as f:
        f.seek(offset)
        remaining = length
        while remaining is None or remaining > 0:
            chunk = f.read(1 << 24 if remaining is None else min(1 << 24, remaining))
            if not chunk:
                break
            if remaining is not None:
                remaining -= len(chunk)
            yield chunk


def _set_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.append(onnx.StringStringEntryProto(key=key, value=value))
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.ClearField("raw_data")


def _write_external(model: onnx.ModelProto, data_file: Path, data_name: str) -> None:
    """Stream every large tensor (inline or external) into one data file, 4 KiB aligned."""
    with open(data_file, "wb") as out:
        for graph in iter_all_graphs(model):
            for tensor in graph.initializer:
                is_external = external_data_helper.uses_external_data(tensor)
                if not is_external and tensor.ByteSize() < EXTERNAL_TENSOR_MIN_BYTES:
                    continue
                pad = (-out.tell()) % 4096
                out.write(b"\0" * pad)
                offset = out.tell()
                if is_external:
                    for chunk in _read_external(tensor):
                        out.write(chunk)
                else:
                    if not tensor.HasField("raw_data"):
                        array = onnx.numpy_helper.to_array(tensor)
                        fresh = onnx.numpy_helper.from_array(array, tensor.name)
                        tensor.CopyFrom(fresh)
                    out.write(tensor.raw_data)
                _set_external(tensor, data_name, offset, out.tell() - offset)


def _inline_external(model: onnx.ModelProto) -> None:
    """Pull the bytes of tensors still pointing at the input's data file into the proto."""
    for tensor in list(_external_tensors(model)):
        data = b"".join(_read_external(tensor))
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
        tensor.raw_data = data
