"""Per-model job functions that misbehave on purpose, for isolation tests.

They are passed to `run_batch(job_fn=...)` the way any alternative job would be: by import
name, run inside the worker processes. Library code has no test-only branch.
"""

from __future__ import annotations

import ctypes
import time

from onnxshrink.batch import worker
from onnxshrink.batch.jobs import Job
from onnxshrink.batch.row import Row


def crash_or_oom(job: Job) -> Row:
    """Segfault on the MLP, raise MemoryError on the CNN, run the real job otherwise."""
    if job.rel.endswith("mlp.onnx"):
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    if job.rel.endswith("cnn.onnx"):
        raise MemoryError
    return worker.run_job(job)


def hang_on_fp16(job: Job) -> Row:
    """Never return for the fp16 model (a stand-in for a pass stuck in a loop)."""
    if job.rel.endswith("fp16.onnx"):
        time.sleep(3600)
    return worker.run_job(job)
