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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink import runtime
from onnxshrink.calibration.observers import Observer
from onnxshrink.errors import OnnxShrinkError
from onnxshrink.ir import io

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


def instrumented_model(graph: gs.Graph, names: Sequence[str], path: Path) -> Path:
    """Write `graph` with `names` added as outputs to `path` (the graph itself is unchanged)."""
    copy = graph.copy()  # values are shared, not duplicated; the caller's graph stays as is
    tensors = copy.tensors()
    present = {t.name for t in copy.outputs}
    copy.outputs = list(copy.outputs) + [tensors[n] for n in names if n not in present]
    copy.cleanup(remove_unused_graph_inputs=False).toposort()  # drop disconnected nodes
    with io.quiet_gs():
        model = gs.export_onnx(copy, do_type_check=False)
    for entry in model.opset_import:  # gs keeps the imported opset; a pass may have raised it
        if entry.domain in ("", "ai.onnx"):
            entry.version = max(entry.version, int(graph.opset or 1))
    model.ir_version = max(min(model.ir_version, 10), int(graph.ir_version or 0))
    io.save(model, path)
    return path


def observable(graph: gs.Graph, names: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split `names` into tensors that need an extra output and graph inputs read from feeds."""
    tensors = graph.tensors()
    inputs = {t.name for t in graph.inputs}
    outputs, fed = [], []
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
    path = instrumented_model(graph, outputs, workdir / f"{stem}.onnx")
    try:
        sess = runtime.session(path, opt=opt)
    except Exception as e:
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
        _remove(path)
    logger.debug("calibrated %d tensors on %d samples", len(outputs) + len(fed), len(feeds))
    return len(feeds)


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
    path = instrumented_model(graph, outputs, workdir / f"{stem}.onnx")
    try:
        sess = runtime.session(path, opt=opt)
        results = []
        for sample in feeds:
            got = dict(zip(outputs, sess.run(outputs, dict(sample)))) if outputs else {}
            got.update({n: np.asarray(sample[n]) for n in fed})
            results.append([np.asarray(got[n]) for n in names if n in got])
        del sess
    finally:
        _remove(path)
    return results
