"""The one module that imports onnxruntime: sessions built the same way everywhere."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort

OptLevel = Literal["none", "basic", "extended", "all"]
_LEVELS = {
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def version() -> str:
    """onnxruntime's version, for reports."""
    return str(ort.__version__)


@functools.cache
def _shared_arena() -> bool:
    """Register one CPU arena shared by every session of the process (once; False if refused).

    Each session otherwise grows its own arena, by powers of two, to its largest run and keeps
    it while alive. The passes build sessions one after another (profiles, timing, calibration,
    the guard's candidates), so one arena that grows by what is requested serves them all.
    Measured on the 640x640 detector's default: 376-392 -> 303-324 MB peak (calibration had
    pinned a private arena of about twice its 110 MB of activations); MiniLM, the recognizer
    and the classifier the same or lower, at the same speed. (An earlier version of the
    guard fragmented a shared arena; that was before the range probe's ordering and without
    the memory pattern.) It keeps its memory for the process until `release_shared_arena`.
    """
    try:
        info = ort.OrtMemoryInfo(
            "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
        )
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))
    except Exception:  # an allocator already registered by the host application
        return False
    return True


def session(
    model: str | os.PathLike[str] | bytes,
    *,
    opt: OptLevel = "all",
    threads: int = 0,
    optimized_path: str | os.PathLike[str] | None = None,
    config: dict[str, str] | None = None,
    profile_prefix: str | os.PathLike[str] | None = None,
    initializers: Mapping[str, np.ndarray] | None = None,
    shared_arena: bool = True,
) -> ort.InferenceSession:
    """A CPU session; `optimized_path` dumps the graph ORT really runs (to check fusions),
    `profile_prefix` turns on per-node profiling (written by ``end_profiling``),
    `initializers` fill the model's external-data initializers of those names from memory,
    `shared_arena=False` gives the session an arena of its own, freed with it."""
    so = ort.SessionOptions()
    so.graph_optimization_level = _LEVELS[opt]
    so.log_severity_level = 4  # errors reach the user as exceptions, never as C++ log lines
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # the memory pattern plans one block per run for shapes seen before: on a 640x640
    # detector it holds 106 MB against 58 MB without it, at the same speed (also on MiniLM)
    so.enable_mem_pattern = False
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_prefix)
    if shared_arena and _shared_arena():
        so.add_session_config_entry("session.use_env_allocators", "1")
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in (initializers or {}).values()]
    if values:  # replaces the model's external-data placeholders before any optimization
        so.add_external_initializers(list(initializers or {}), values)
    source = model if isinstance(model, bytes) else str(Path(model))
    return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])


def release_shared_arena() -> None:
    """Return the shared arena's free memory to the system (the end of a compression: a
    library caller's process should not keep the largest run's activations reserved)."""
    if _shared_arena():
        release_arena(session(_relu_model(), opt="none", threads=1), {"x": np.zeros(1, np.float32)})


@functools.cache
def _relu_model() -> bytes:
    """A one-node model whose run carries the arena shrinkage option."""
    import onnx_graphsurgeon as gs

    x = gs.Variable("x", np.float32, [1])
    y = gs.Variable("y", np.float32, [1])
    graph = gs.Graph([gs.Node("Relu", "relu", inputs=[x], outputs=[y])], [x], [y], opset=13)
    model = gs.export_onnx(graph)
    model.ir_version = 7
    return bytes(model.SerializeToString())


def release_arena(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> None:
    """One more run of `sess` that returns its arena's free chunks to the system afterwards
    (the shared arena would otherwise keep the timing runs' memory for the whole process)."""
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    sess.run(None, feeds, options)


def run(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> list[Any]:
    """Run one sample; outputs in graph-output order (sequences come back as lists)."""
    return list(sess.run(None, feeds))


def output_names(sess: ort.InferenceSession) -> list[str]:
    """Names of the session's outputs, in order."""
    return [o.name for o in sess.get_outputs()]
