"""The contract between a batch driver and the process that runs one model.

A job function returns a result for everything it expects (a bad model is a failed row, not an
exception). What it does not expect (a bug, a `MemoryError`, a crash of the process, a hang) is
reported as a `Failure`, so both the local pool and the Dask path turn every way a model can go
wrong into exactly one row.
"""

from __future__ import annotations

import ctypes
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

R = TypeVar("R")

TIMEOUT = "timeout"
CRASH = "crash"
MEMORY = "memory"
INTERNAL = "internal"


@dataclass(frozen=True)
class Failure:
    """Why a job produced no result: its kind (one of the constants above) and a message."""

    kind: str
    message: str


def execute(fn: Callable[[Any], R], payload: Any) -> R | Failure:
    """Run `fn(payload)` in the current (worker) process; unexpected errors become `Failure`."""
    try:
        return fn(payload)
    except MemoryError:
        return Failure(MEMORY, "out of memory (MemoryError) in the worker process")
    except Exception as e:
        text = " ".join(str(e).split())[:500]
        return Failure(INTERNAL, f"internal error: {type(e).__name__}: {text}")


def exit_failure(code: int | None, seconds: float) -> Failure:
    """Describe a worker process that ended without sending a result."""
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (the out-of-memory killer sends SIGKILL)" if -code == signal.SIGKILL else ""
        return Failure(CRASH, f"worker process killed by {name} after {seconds:.1f}s{hint}")
    return Failure(
        CRASH, f"worker process exited with code {code} after {seconds:.1f}s without a result"
    )


def timeout_failure(timeout: float) -> Failure:
    """A worker that ran past its deadline and was killed."""
    return Failure(TIMEOUT, f"timed out after {timeout:g}s (worker killed)")


def die_with_parent() -> None:
    """Ask Linux to kill this process when its parent dies, so a killed batch leaves no orphans.

    A no-op elsewhere: there, a killed driver's workers finish their current model and exit.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
