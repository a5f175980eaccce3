"""External data: absolute locations for lazy reads, streaming into a new data file, inlining.

Weights of models over 2 GiB live beside the model; reading them lazily and streaming them
tensor by tensor keeps RAM bounded by the largest tensor, not by the model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import external_data_helper

from onnxshrink.errors import ModelError
from onnxshrink.ir import query
from onnxshrink.ir.proto import iter_all_graphs

logger = logging.getLogger(__name__)


#: Above this many bytes of weights a model is written with external data (protobuf's 2 GiB cap).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

#: Tensors smaller than this stay inline even in an external-data model (onnx's own convention).
EXTERNAL_TENSOR_MIN_BYTES = 1024


def external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every initializer of every (sub)graph whose bytes live in an external file."""
    for graph in iter_all_graphs(model):
        for tensor in graph.initializer:
            if external_data_helper.uses_external_data(tensor):
                yield tensor


def resolve_external(tensor: onnx.TensorProto, base: Path, path: Path) -> None:
    """Check one external tensor's location and byte range, and make the location absolute.

    Like onnx's own loader, a location must stay inside the model's folder: a model file must
    not be able to make us read (and copy into the output) an arbitrary file on the machine.
    """
    info = {e.key: e for e in tensor.external_data}
    location = info["location"].value if "location" in info else ""
    where = f"{path}: tensor {tensor.name!r} refers to external data {location!r}"
    target = (base / location).resolve()
    if not location or Path(location).is_absolute() or not target.is_relative_to(base):
        raise ModelError(f"{where} outside the model's folder")
    if not target.is_file():
        raise ModelError(f"{where} that does not exist")
    try:
        offset = int(info["offset"].value) if "offset" in info else 0
        length = int(info["length"].value) if "length" in info else None
    except ValueError:
        raise ModelError(f"{where} with a malformed offset or length") from None
    size = target.stat().st_size
    if (
        offset < 0
        or offset > size
        or (length is not None and (length < 0 or offset + length > size))
    ):
        raise ModelError(f"{where} beyond the end of that file ({size} bytes)")
    info["location"].value = str(target)


class ExternalValues(gs.ir.tensor.LazyValues):  # type: ignore[misc]
    """Lazy values of an external tensor, read from its absolute location on first use.

    onnx >= 1.17 refuses absolute locations when it reads external data (and resolves relative
    ones against the working directory), so gs's own loader fails for every external weight
    once `read_model` has made the locations absolute. Export still uses `.tensor` unchanged.
    """

    def load(self) -> np.ndarray:
        """The tensor's values as numpy (bytes read in chunks, decoded by onnx)."""
        inline = onnx.TensorProto()
        inline.CopyFrom(self.tensor)
        del inline.external_data[:]
        inline.data_location = onnx.TensorProto.DEFAULT
        inline.raw_data = b"".join(read_external(self.tensor))
        return np.array(onnx.numpy_helper.to_array(inline))


def use_external_values(graph: gs.Graph) -> None:
    """Give every external constant of `graph` and its subgraphs `ExternalValues`."""
    for g in query.walk_graphs(graph):
        for tensor in g.tensors().values():
            values = getattr(tensor, "_values", None)
            if (
                isinstance(values, gs.ir.tensor.LazyValues)
                and not isinstance(values, ExternalValues)
                and external_data_helper.uses_external_data(values.tensor)
            ):
                tensor._values = ExternalValues(values.tensor)


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
    return int(tensor.ByteSize())


def read_external(tensor: onnx.TensorProto) -> Iterator[bytes]:
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


def write_external(model: onnx.ModelProto, data_file: Path, data_name: str) -> None:
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
                    for chunk in read_external(tensor):
                        out.write(chunk)
                else:
                    if not tensor.HasField("raw_data"):
                        array = onnx.numpy_helper.to_array(tensor)
                        fresh = onnx.numpy_helper.from_array(array, tensor.name)
                        tensor.CopyFrom(fresh)
                    out.write(tensor.raw_data)
                _set_external(tensor, data_name, offset, out.tell() - offset)


def fix_data_locations(model: onnx.ModelProto) -> None:
    """Mark inline tensors inline again.

    gs copies a constant's original ``data_location`` onto its export even after a pass gave
    it new (in-memory) values, producing an EXTERNAL tensor without a location: invalid.
    """
    for graph in iter_all_graphs(model):
        for tensor in graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL and not any(
                e.key == "location" for e in tensor.external_data
            ):
                tensor.data_location = onnx.TensorProto.DEFAULT


def inline_external(model: onnx.ModelProto) -> None:
    """Pull the bytes of tensors still pointing at the input's data file into the proto."""
    for tensor in list(external_tensors(model)):
        data = b"".join(read_external(tensor))
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
        tensor.raw_data = data
