"""Run one job in a child interpreter: ``python -m onnxshrink.batch.child``.

Used where multiprocessing cannot start workers, notably inside Dask worker processes (which are
daemonic). The driver writes a pickled ``(fn, job)`` on stdin and reads a pickled result or
`Failure` from stdout. Our stdout is redirected to stderr while the job runs, so a library that
prints cannot corrupt the result stream.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from onnxshrink.batch.isolation import (
    Failure,
    die_with_parent,
    execute,
    exit_failure,
    timeout_failure,
)


def run_in_subprocess(fn: Callable[[Any], Any], job: Any, timeout: float | None) -> Any:
    """`fn(job)` in a fresh interpreter with a deadline; a crash or overrun is a `Failure`."""
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "onnxshrink.batch.child"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = proc.communicate(pickle.dumps((fn, job)), timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        assert timeout is not None
        return timeout_failure(timeout)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    if proc.returncode == 0 and out:
        return pickle.loads(out)
    failure = exit_failure(proc.returncode, time.monotonic() - start)
    tail = err.decode(errors="replace").strip().splitlines()[-1:] if err else []
    return Failure(failure.kind, failure.message + (f": {tail[0][:300]}" if tail else ""))


def main() -> int:
    """Child side: read the job, run it, write the outcome to the saved stdout."""
    die_with_parent()
    result_stream = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    fn, job = pickle.load(sys.stdin.buffer)
    outcome = execute(fn, job)
    pickle.dump(outcome, result_stream)
    result_stream.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
