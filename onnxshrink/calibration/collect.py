"""Run onnxruntime on an instrumented copy of the graph and stream activations into observers.

The copy lives in the caller's work directory (a temporary directory, never the CWD) and
exposes every requested tensor as an extra graph output. Samples run one at a time and each
output is folded into its observers and dropped at once, so memory holds one sample's
activations plus the observers' fixed-size state, whatever the number of samples.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxshrink import runtime
from onnxshrink.calibration.observers import Observer
from onnxshrink.errors import OnnxShrinkError
from onnxshrink.ir import io
from onnxshrink.ir.external import ExternalValues

logger = logging.getLogger(__name__)

#: ORT optimizations while calibrating: "basic" folds constants but keeps every op as written,
#: so the observed tensors are the ones the graph names.
CALIBRATION_OPT: runtime.OptLevel = "basic"


@contextlib.contextmanager
def scratch(workdir: Path | None) -> Iterator[Path]:
    """`workdir` when the run gave one, else a temporary directory removed afterwards."""
    if workdir is not None:
        yield workdir
        return
    with tempfile.TemporaryDirectory(prefix=".onnxshrink-") as tmp:
        yield Path(tmp)


#: Weights at least this big reach onnxruntime as in-memory initializers: serialising them into
#: every scratch model (calibration, probes, guard candidates) cost about a second per export
#: of a 90 MB transformer, several times per run. Smaller ones (shapes, scalars) stay inline,
#: where onnxruntime's shape inference can read them.
IN_MEMORY_MIN_BYTES = 1024
_IN_MEMORY_TYPES = frozenset(
    np.dtype(t)
    for t in (
        np.float16,
        np.float32,
        np.float64,
        np.int8,
        np.uint8,
        np.int16,
        np.uint16,
        np.int32,
        np.uint32,
        np.int64,
        np.uint64,
        np.bool_,
    )
)

_IN_MEMORY_ONNX_TYPES = frozenset(
    onnx.helper.np_dtype_to_tensor_dtype(t)  # noqa: TID251
    for t in _IN_MEMORY_TYPES
)


@dataclass
class ExportedModel:
    """A scratch model file whose large weights are handed to onnxruntime from memory.

    The file holds every node and small constant; each large weight is an external-data
    placeholder of the right name, type and shape (pointing at an empty sidecar file), and
    `initializers` holds its values, which onnxruntime uses instead of reading the file.
    """

    path: Path
    initializers: dict[str, np.ndarray] = field(default_factory=dict)
    rewrite: Callable[[], None] | None = None

    def session(self, **kwargs: Any) -> Any:
        """An onnxruntime session (runtime.session's options); a runtime that refuses the
        in-memory weights gets the model rewritten with its weights inside, once."""
        try:
            return runtime.session(self.path, initializers=self.initializers, **kwargs)
        except Exception:
            if not self.initializers or self.rewrite is None:
                raise
        self.rewrite()
        self.initializers = {}
        return runtime.session(self.path, **kwargs)

    def remove(self) -> None:
        """Delete the file and its sidecars."""
        _remove(self.path)


def instrumented_model(
    graph: gs.Graph,
    names: Sequence[str],
    path: Path,
    *,
    toposort: bool = True,
    in_place: bool = False,
) -> ExportedModel:
    """Write `graph` with `names` added as outputs to `path` (the graph itself is unchanged).

    `toposort=False` keeps the node order of a graph already in order: onnxruntime's
    execution order follows it where the graph leaves a choice (see `ranges`). `in_place`:
    `graph` is clean and in order already and nothing is added (a quantization candidate the
    guard just built), so it is written as it is, without the copy, cleanup and sort that
    cost a 2000-node recognizer 0.1 s per candidate (its weights swapped for placeholders
    while it is written, then put back)."""
    if in_place:
        if names:
            raise ValueError("in_place export adds no outputs")
        copy = graph
    else:
        copy = graph.copy()  # values are shared, not duplicated; the caller's graph stays as is
        tensors = copy.tensors()
        present = {t.name for t in copy.outputs}
        copy.outputs = list(copy.outputs) + [tensors[n] for n in names if n not in present]
        copy.cleanup(remove_unused_graph_inputs=False)  # drop disconnected nodes
        if toposort:
            copy.toposort()

    sidecar = path.parent / (path.name + ".in-memory")
    originals: dict[str, Any] = {}
    arrays = _to_placeholders(copy, sidecar.name, originals)
    try:
        _write(copy, graph, path, sidecar if arrays else None)
    finally:
        if in_place:
            _put_back(copy, originals)

    def rewrite() -> None:
        _put_back(copy, originals)
        _write(copy, graph, path, None)

    return ExportedModel(path, arrays, rewrite)


def _put_back(graph: gs.Graph, originals: dict[str, Any]) -> None:
    """Undo `_to_placeholders`: each swapped weight gets its own values again."""
    for t in graph.tensors().values():
        if t.name in originals:
            t._values = originals[t.name]


def _write(copy: gs.Graph, graph: gs.Graph, path: Path, sidecar: Path | None) -> None:
    """Export `copy` to `path` at `graph`'s opset and IR version. With placeholders (`sidecar`)
    the file is small and written as is: io.save would inline, so read, their data."""
    with io.quiet_gs():
        model = gs.export_onnx(copy, do_type_check=False)
    for entry in model.opset_import:  # gs keeps the imported opset; a pass may have raised it
        if entry.domain in ("", "ai.onnx"):
            entry.version = max(entry.version, int(graph.opset or 1))
    model.ir_version = max(min(model.ir_version, 10), int(graph.ir_version or 0))
    if sidecar is None:
        io.save(model, path)
        return
    path.write_bytes(model.SerializeToString())
    sidecar.touch()


def _plain_values(t: gs.Constant) -> np.ndarray | None:
    """The values of `t` when they are stored as written (a plain numpy dtype), else None.

    Lazily loaded weights are read from their proto: `Constant.values` would cache the decoded
    array in place of the proto (unpacking int4, for one) and change what gets exported."""
    if isinstance(t._values, LazyValues):
        proto = t._values.tensor
        if proto.data_type not in _IN_MEMORY_ONNX_TYPES:
            return None
        values: np.ndarray = onnx.numpy_helper.to_array(proto)
        return values
    values = np.asarray(t.values)
    export = getattr(t, "export_dtype", None)
    if values.dtype not in _IN_MEMORY_TYPES or (export is not None and export != values.dtype):
        return None
    return values


def _to_placeholders(graph: gs.Graph, location: str, originals: dict[str, Any]) -> dict[str, Any]:
    """Swap the large weights of `graph` (a copy) for external-data placeholders; their values.

    Weights still read lazily from the input's own data file are left to `io.save`, which
    streams them (a multi-GB model is never loaded here): such graphs keep the file route."""
    constants = [t for t in graph.tensors().values() if isinstance(t, gs.Constant)]
    if any(isinstance(t._values, ExternalValues) for t in constants):
        return {}
    arrays: dict[str, np.ndarray] = {}
    for t in constants:
        values = _plain_values(t)
        if values is None or values.nbytes < IN_MEMORY_MIN_BYTES:
            continue
        proto = onnx.TensorProto(
            name=t.name,
            dims=values.shape,
            data_type=onnx.helper.np_dtype_to_tensor_dtype(values.dtype),  # noqa: TID251
            data_location=onnx.TensorProto.EXTERNAL,
        )
        for key, value in (("location", location), ("offset", "0"), ("length", str(values.nbytes))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        originals[t.name] = t._values
        t._values = LazyValues(proto)
        arrays[t.name] = np.ascontiguousarray(values)
    return arrays


def observable(graph: gs.Graph, names: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split `names` into tensors that need an extra output and graph inputs read from feeds."""
    tensors = graph.tensors()
    inputs = {t.name for t in graph.inputs}
    outputs: list[str] = []
    fed: list[str] = []
    for name in dict.fromkeys(names):
        t = tensors.get(name)
        if t is None or isinstance(t, gs.Constant):
            continue
        (fed if name in inputs else outputs).append(name)
    return outputs, fed


def collect(
    graph: gs.Graph,
    observers: Mapping[str, Sequence[Observer]],
    feeds: Sequence[Mapping[str, np.ndarray]],
    workdir: Path,
    *,
    stem: str = "calibration",
    opt: runtime.OptLevel = CALIBRATION_OPT,
) -> int:
    """Fold every sample's value of each observed tensor into its observers.

    Returns the number of samples used. Raises `OnnxShrinkError` naming the sample when
    onnxruntime cannot run the instrumented model.
    """
    if not feeds or not observers:
        return 0
    outputs, fed = observable(graph, observers)
    model = instrumented_model(graph, outputs, workdir / f"{stem}.onnx")
    try:
        sess = model.session(opt=opt)
    except Exception as e:
        model.remove()
        raise OnnxShrinkError(f"calibration model does not load in onnxruntime: {_short(e)}") from e
    try:
        for i, sample in enumerate(feeds):
            try:
                values = sess.run(outputs, dict(sample)) if outputs else []
            except Exception as e:
                raise OnnxShrinkError(f"calibration failed on sample {i}: {_short(e)}") from e
            for name, value in zip(outputs, values):
                _fold(observers[name], value)
            for name in fed:
                _fold(observers[name], np.asarray(sample[name]))
            del values
    finally:
        del sess
        model.remove()
    logger.debug("calibrated %d tensors on %d samples", len(outputs) + len(fed), len(feeds))
    return len(feeds)


def ranges(
    graph: gs.Graph,
    names: Sequence[str],
    feeds: Sequence[Mapping[str, np.ndarray]],
    workdir: Path,
    *,
    stem: str = "ranges",
) -> dict[str, tuple[float, float]]:
    """Min and max of each float tensor in `names` over the samples, reduced by onnxruntime.

    Each run returns two scalars per tensor instead of the tensor itself: the activations of a
    640x640 detector are 110 MB per sample, more than the rest of a run holds, and decisions
    that need only ranges (the latency gate's candidate) need not pay for them. Tensors of
    unknown or non-float type, and ranges that are not finite, are left out.
    """
    outputs, fed = observable(graph, names)
    copy = graph.copy()
    copy.toposort()
    tensors = copy.tensors()
    reduced: list[tuple[str, str, str]] = []
    reductions: list[gs.Node] = []
    for name in outputs:
        t = tensors[name]
        if t.dtype is None or np.dtype(t.dtype).kind != "f":
            continue
        pair = []
        for op in ("ReduceMin", "ReduceMax"):
            out = gs.Variable(f"{name}__{op}", dtype=t.dtype, shape=[])
            reductions.append(gs.Node(op, f"{name}__{op}", {"keepdims": 0}, [t], [out]))
            pair.append(out.name)
        reduced.append((name, pair[0], pair[1]))
    # onnxruntime orders a graph's leaves by a depth-first walk from the last node: the
    # reductions of the last tensors go first so that each runs as soon as its tensor exists
    # (in graph order every activation waits for the end of the run: 3.5x the memory)
    position = {id(n): i for i, n in enumerate(copy.nodes)}
    copy.nodes += sorted(
        reductions,
        key=lambda n: -position.get(id(n.inputs[0].inputs[0]), -1) if n.inputs[0].inputs else 1,
    )
    wanted = [n for _, lo, hi in reduced for n in (lo, hi)]
    found: dict[str, list[float]] = {}
    model = instrumented_model(copy, wanted, workdir / f"{stem}.onnx", toposort=False)
    try:
        sess = model.session(opt=CALIBRATION_OPT) if wanted else None
        for sample in feeds:
            values = sess.run(wanted, dict(sample)) if sess is not None else []
            got = dict(zip(wanted, values))
            pairs = [(n, float(got[lo]), float(got[hi])) for n, lo, hi in reduced]
            pairs += [(n, float(np.min(sample[n])), float(np.max(sample[n]))) for n in fed
                      if np.asarray(sample[n]).dtype.kind == "f" and np.size(sample[n])]
            for n, lo, hi in pairs:
                old = found.setdefault(n, [lo, hi])
                old[0], old[1] = min(old[0], lo), max(old[1], hi)
        del sess
    except Exception as e:
        raise OnnxShrinkError(f"range probe failed: {_short(e)}") from e
    finally:
        model.remove()
    return {n: (lo, hi) for n, (lo, hi) in found.items() if np.isfinite([lo, hi]).all()}


def _fold(obs: Sequence[Observer], value: Any) -> None:
    arr = np.asarray(value)
    if arr.dtype.kind != "f":
        return
    for o in obs:
        o.update(arr)


def _remove(path: Path) -> None:
    for p in path.parent.glob(path.name + "*"):
        p.unlink(missing_ok=True)


def _short(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def run_outputs(
    graph: gs.Graph,
    names: Sequence[str],
    feeds: Sequence[Mapping[str, np.ndarray]],
    workdir: Path,
    *,
    stem: str = "probe",
    opt: runtime.OptLevel = CALIBRATION_OPT,
) -> list[list[np.ndarray]]:
    """Values of `names` on every sample (for small probes such as per-layer error checks)."""
    outputs, fed = observable(graph, names)
    model = instrumented_model(graph, outputs, workdir / f"{stem}.onnx")
    try:
        sess = model.session(opt=opt)
        results = []
        for sample in feeds:
            got = dict(zip(outputs, sess.run(outputs, dict(sample)))) if outputs else {}
            got.update({n: np.asarray(sample[n]) for n in fed})
            results.append([np.asarray(got[n]) for n in names if n in got])
        del sess
    finally:
        model.remove()
    return results
