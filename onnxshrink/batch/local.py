"""Run jobs on this machine, each in a fresh process, with a deadline per job.

A fresh process per model is the isolation the batch promises: a segfault, an out-of-memory kill
or a hang takes down one model's process, never the driver. Processes come from a fork server
that has already imported onnxshrink (and onnxruntime), so starting one costs milliseconds rather
than the ~2 s of a cold interpreter. Where fork servers do not exist (Windows), spawn is used.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import select
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

from onnxshrink.batch.isolation import (
    Failure,
    die_with_parent,
    execute,
    exit_failure,
    timeout_failure,
)

#: Modules the fork server imports once, so each worker starts warm ("__main__" is the
#: multiprocessing default: without it every worker would re-run the entry script).
PRELOAD = ["__main__", "onnxshrink.batch.worker", "onnxshrink.html.report"]
#: Exit code of a worker whose driver disappeared (it stops at once, leaving no output).
EXIT_ORPHANED = 70
#: How often (seconds) the driver wakes up to check deadlines when nothing else happens.
TICK = 0.5


class Task(Protocol):
    """What the executor needs to know about a job."""

    @property
    def timeout(self) -> float | None:
        """Seconds the job may run, None for no limit."""


def context() -> Any:
    """The multiprocessing context: a preloaded fork server where available, else spawn."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        return ctx
    return mp.get_context("spawn")


def _child(fn: Callable[[Any], Any], job: Any, conn: Connection) -> None:
    """Worker process body: the driver alone decides about Ctrl-C, so ignore SIGINT here."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    threading.Thread(target=_exit_without_driver, args=(conn.fileno(),), daemon=True).start()
    outcome = execute(fn, job)
    conn.send(outcome)
    conn.close()


def _exit_without_driver(fd: int) -> None:
    """Worker-side watchdog: end this process as soon as nobody can read its result.

    The driver holds the only read end of the result pipe, so the write end reports an error
    when the driver is gone, however it died (SIGKILL included). Fork-server children are not
    the driver's children, so the kernel's parent-death signal alone would not reach them.
    """
    if not hasattr(select, "poll"):  # pragma: no cover (Windows: spawn children die with us)
        return
    poller = select.poll()
    poller.register(fd, select.POLLERR | select.POLLHUP)
    while True:
        events = poller.poll()
        if any(ev & (select.POLLERR | select.POLLHUP) for _, ev in events):
            os._exit(EXIT_ORPHANED)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C/SIGTERM while a worker starts, so none is interrupted half-way into existence.

    An interrupt landing inside ``Process.start()`` would leave a running worker the driver does
    not know about and cannot kill. The handlers are swapped only for these few milliseconds and
    only on the main thread (the only one Python runs signal handlers on); a signal that arrived
    meanwhile is handed to the previous handler right after.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    wanted = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
                for sig in wanted}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in caught:
            handler = previous[signal.Signals(signum)]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL and signum == signal.SIGINT:
                raise KeyboardInterrupt


@dataclass
class _Running:
    job: Any
    process: Any
    conn: Connection
    started: float


def run_local(
    jobs: Sequence[Task],
    fn: Callable[[Any], Any],
    *,
    workers: int,
    on_start: Callable[[Any], None],
    on_outcome: Callable[[Any, Any], None],
    stop: Callable[[], bool] = lambda: False,
) -> None:
    """Run `fn(job)` for every job, at most `workers` at a time, reporting each outcome.

    `on_outcome(job, result_or_Failure)` is called in the driver as results arrive. When `stop()`
    turns true no new job starts. On KeyboardInterrupt every running worker is killed before the
    exception propagates, so nothing keeps writing after the driver returns.
    """
    ctx = context()
    pending = deque(jobs)
    running: list[_Running] = []
    try:
        while pending or running:
            while pending and len(running) < workers and not stop():
                job = pending.popleft()
                with _signals_deferred():
                    running.append(_start(ctx, fn, job))
                on_start(job)
            if not running:
                break
            wait(
                [r.conn for r in running] + [r.process.sentinel for r in running],
                timeout=_next_wakeup(running),
            )
            for r in list(running):
                outcome = _poll(r)
                if outcome is not None:
                    running.remove(r)
                    on_outcome(r.job, outcome)
    except BaseException:
        for r in running:
            _kill(r)
        raise


def _start(ctx: Any, fn: Callable[[Any], Any], job: Task) -> _Running:
    recv, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(fn, job, send), daemon=True)
    process.start()
    send.close()  # the child holds the only write end: EOF on recv means it is gone
    return _Running(job, process, recv, time.monotonic())


def _next_wakeup(running: list[_Running]) -> float:
    now = time.monotonic()
    waits = [TICK]
    for r in running:
        if r.job.timeout is not None:
            waits.append(max(0.0, r.started + r.job.timeout - now))
    return min(waits)


def _poll(r: _Running) -> Any | None:
    """The job's outcome if it finished, crashed or overran; None while it is still running."""
    elapsed = time.monotonic() - r.started
    if r.conn.poll():
        try:
            outcome = r.conn.recv()
        except (EOFError, OSError):  # the child is gone without a word: it is exiting
            r.process.join(5.0)
            _kill(r)
            return exit_failure(r.process.exitcode, elapsed)
        r.process.join()
        r.conn.close()
        return outcome
    if not r.process.is_alive():
        r.process.join()
        r.conn.close()
        return exit_failure(r.process.exitcode, elapsed)
    if r.job.timeout is not None and elapsed > r.job.timeout:
        _kill(r)
        return timeout_failure(r.job.timeout)
    return None


def _kill(r: _Running) -> None:
    if r.process.is_alive():
        r.process.kill()
    r.process.join()
    r.conn.close()


__all__ = ["Failure", "run_local"]
