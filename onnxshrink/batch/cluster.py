"""Run the same per-model job on an existing Dask distributed cluster (``--scheduler``).

Each task runs the job in a fresh interpreter on the worker (`child.run_in_subprocess`), so the
isolation and the per-model deadline are the same as on one machine, and a Dask worker survives a
model that crashes. Workers must see the input and output paths at the same locations as the
driver (a shared filesystem) and have onnxshrink installed. Dask is imported only here, and only
when a scheduler is given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from onnxshrink.batch.child import run_in_subprocess
from onnxshrink.batch.isolation import CRASH, Failure
from onnxshrink.errors import OnnxShrinkError

#: Seconds to wait for the scheduler before giving up with a clear error.
CONNECT_TIMEOUT = 20


def _client(address: str) -> Any:
    try:
        from distributed import Client
    except ImportError:
        raise OnnxShrinkError(
            "--scheduler needs Dask distributed, which is not installed: "
            "pip install 'onnxshrink[dask]'"
        ) from None
    try:
        return Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False)  # type: ignore[no-untyped-call]
    except (OSError, TimeoutError) as e:
        raise OnnxShrinkError(f"cannot reach the Dask scheduler at {address}: {e}") from None


def run_on_cluster(
    address: str,
    jobs: Sequence[Any],
    fn: Callable[[Any], Any],
    *,
    on_start: Callable[[Any], None],
    on_outcome: Callable[[Any, Any], None],
    stop: Callable[[], bool] = lambda: False,
) -> None:
    """Submit every job to the cluster and report outcomes as they complete.

    `on_start` is called at submission (Dask decides when a task really starts). When `stop()`
    turns true, tasks not yet finished are cancelled; so are all of them on KeyboardInterrupt.
    """
    from distributed import as_completed

    client = _client(address)
    try:
        futures = {}
        for job in jobs:
            future = client.submit(run_in_subprocess, fn, job, job.timeout, pure=False)
            futures[future.key] = (future, job)
            on_start(job)
        try:
            pending = [f for f, _ in futures.values()]
            for future in as_completed(pending, loop=client.loop):  # type: ignore[no-untyped-call]
                job = futures[future.key][1]
                on_outcome(job, _result(future))
                if stop():
                    client.cancel([f for f, _ in futures.values() if not f.done()])
                    break
        except BaseException:
            client.cancel([f for f, _ in futures.values()])
            raise
    finally:
        client.close()


def _result(future: Any) -> Any:
    """The task's outcome; a task Dask itself gave up on (e.g. its worker died) is a crash."""
    try:
        return future.result()
    except Exception as e:
        text = " ".join(str(e).split())[:300]
        return Failure(CRASH, f"Dask task failed: {type(e).__name__}: {text}")
