"""Drive a batch: plan every job, skip finished ones on resume, run the rest, stream the summary.

The driver is the only writer of ``summary.json``/``summary.csv`` and the only one that decides
what stays in OUTDIR: outputs are moved into place by the workers, and a model that does not pass
loses any stale output an earlier run left at its name, so the folder always agrees with the
summary.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from onnxshrink.batch import discover, hashing, manifest, summary, worker
from onnxshrink.batch.isolation import Failure
from onnxshrink.batch.jobs import STAGING, Defaults, Job, build_jobs
from onnxshrink.batch.row import FAILED, MISSED, PASSED, Row
from onnxshrink.errors import ModelError, OnnxShrinkError, OutputError, SampleError

logger = logging.getLogger(__name__)

INDEX_NAME = "index.html"


class BatchInterrupted(OnnxShrinkError):
    """Ctrl-C or SIGTERM stopped the batch; the summary says what finished (exit code 130)."""

    exit_code = 130


@dataclass(frozen=True)
class BatchOptions:
    """What ``onnxshrink batch`` was asked to do."""

    outdir: Path
    inputs: tuple[str, ...] = ()
    recipe: str | None = None
    manifest: Path | None = None
    samples_dir: Path | None = None
    jobs: int = 1
    timeout: float | None = None
    resume: bool = False
    html: bool = False
    seed: int = 0
    validate: bool = True
    scheduler: str | None = None
    fail_fast: bool = False


class Events(Protocol):
    """Progress callbacks (the CLI's live display implements them)."""

    def planned(self, jobs: Sequence[Job], resumed: Sequence[Row]) -> None:
        """Called once, before any model runs."""

    def started(self, job: Job) -> None:
        """A model's worker started (or, on Dask, its task was submitted)."""

    def finished(self, row: Row) -> None:
        """A model's row is final."""


class _Quiet:
    def planned(self, jobs: Sequence[Job], resumed: Sequence[Row]) -> None:
        pass

    def started(self, job: Job) -> None:
        pass

    def finished(self, row: Row) -> None:
        pass


@dataclass
class BatchResult:
    """The finished batch: rows in input order, the summary files and the exit code."""

    rows: list[Row]
    summary_json: Path
    summary_csv: Path
    exit_code: int
    resumed: int = 0
    index_html: Path | None = None
    counts: dict[str, int] = field(default_factory=dict)


def plan_jobs(options: BatchOptions) -> list[Job]:
    """Discover the models and build their jobs; fails before any model loads."""
    if options.manifest is not None and options.inputs:
        raise OnnxShrinkError("give model paths or --manifest, not both")
    exclude = [options.outdir]
    if options.manifest is not None:
        models = manifest.resolve(manifest.load_manifest(options.manifest), exclude)
    elif options.inputs:
        models = [
            (m, manifest.Settings()) for m in discover.discover(options.inputs, exclude=exclude)
        ]
    else:
        raise OnnxShrinkError("no inputs: give model files, folders or globs, or --manifest")
    if not models:
        raise ModelError("no models to compress (inputs inside the output folder are skipped)")
    defaults = Defaults(
        options.recipe,
        options.samples_dir,
        options.seed,
        options.timeout,
        options.validate,
        options.html,
    )
    jobs = build_jobs(models, options.outdir, defaults, run_id=str(os.getpid()))
    for job in jobs:
        if job.output.resolve() == Path(job.source).resolve():
            raise OutputError(f"{job.output}: refusing to overwrite the input model")
    return jobs


def run_batch(
    options: BatchOptions,
    events: Events | None = None,
    *,
    job_fn: Callable[[Job], Row] = worker.run_job,
) -> BatchResult:
    """Run a whole batch and return its rows; see the module docstring for the guarantees.

    `job_fn` is the per-model job (the real one by default); it runs in worker processes, so it
    must be importable by name there.
    """
    _check_options(options)
    events = events or _Quiet()
    outdir = options.outdir
    if outdir.exists() and not outdir.is_dir():
        raise OutputError(f"{outdir}: exists and is not a folder")
    jobs = plan_jobs(options)
    outdir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(outdir / STAGING, ignore_errors=True)
    resumed = _resumable(jobs, outdir) if options.resume else {}
    writer = summary.SummaryWriter(outdir, len(jobs), _run_info(options))
    for row in resumed.values():
        writer.add(row)
    todo = [j for j in jobs if j.index not in resumed]
    events.planned(jobs, list(resumed.values()))
    writer.write(complete=False)
    state = _State(writer, events, options.fail_fast)
    try:
        _execute(options, todo, job_fn, state)
    except KeyboardInterrupt:
        shutil.rmtree(outdir / STAGING, ignore_errors=True)
        writer.write(complete=False, interrupted=True)
        _index(options, writer)
        done = len(writer.rows)
        raise BatchInterrupted(
            f"interrupted after {done} of {len(jobs)} models; {outdir / summary.JSON_NAME} lists "
            "them; run again with --resume to finish"
        ) from None
    for job in todo:
        if job.index not in writer.rows:
            state.record(
                job,
                worker.failure_row(
                    job, "not_run", "not run: --fail-fast stopped the batch after a failure"
                ),
            )
    shutil.rmtree(outdir / STAGING, ignore_errors=True)
    writer.write(complete=True)
    rows = writer.ordered()
    return BatchResult(
        rows=rows,
        summary_json=outdir / summary.JSON_NAME,
        summary_csv=outdir / summary.CSV_NAME,
        exit_code=summary.exit_code(rows),
        resumed=len(resumed),
        index_html=_index(options, writer),
        counts=summary.counts(rows),
    )


def _check_options(options: BatchOptions) -> None:
    if options.jobs < 1:
        raise OnnxShrinkError(f"--jobs must be at least 1, got {options.jobs}")
    if options.timeout is not None and options.timeout <= 0:
        raise OnnxShrinkError(f"--timeout must be > 0 seconds, got {options.timeout}")
    if options.samples_dir is not None and not options.samples_dir.exists():
        raise SampleError(f"{options.samples_dir}: samples not found")


class _State:
    """Turns outcomes into rows, tidies OUTDIR for them and passes them on."""

    def __init__(self, writer: summary.SummaryWriter, events: Events, fail_fast: bool) -> None:
        self.writer = writer
        self.events = events
        self.fail_fast = fail_fast
        self.failed = False
        self.started: dict[int, float] = {}

    def start(self, job: Job) -> None:
        self.started[job.index] = time.perf_counter()
        self.events.started(job)

    def outcome(self, job: Job, outcome: Any) -> None:
        if isinstance(outcome, Failure):
            wall = time.perf_counter() - self.started.get(job.index, time.perf_counter())
            shutil.rmtree(job.staging, ignore_errors=True)
            outcome = worker.failure_row(job, outcome.kind, outcome.message, wall)
        self.record(job, outcome)

    def record(self, job: Job, row: Row) -> None:
        _discard_stale(job, row)
        self.failed = self.failed or row.status == FAILED
        self.writer.add(row)
        self.events.finished(row)

    def stop(self) -> bool:
        return self.fail_fast and self.failed


def _execute(
    options: BatchOptions, todo: list[Job], job_fn: Callable[[Job], Row], state: _State
) -> None:
    if not todo:
        return
    if options.scheduler:
        from onnxshrink.batch.cluster import run_on_cluster

        run_on_cluster(
            options.scheduler,
            todo,
            job_fn,
            on_start=state.start,
            on_outcome=state.outcome,
            stop=state.stop,
        )
    else:
        from onnxshrink.batch.local import run_local

        run_local(
            todo,
            job_fn,
            workers=options.jobs,
            on_start=state.start,
            on_outcome=state.outcome,
            stop=state.stop,
        )


def _discard_stale(job: Job, row: Row) -> None:
    """A model that did not pass must not leave an earlier run's output at its name."""
    if row.status == PASSED:
        return
    stale = [job.output, job.output.with_name(job.output.name + ".data")]
    if row.status == FAILED:
        stale += [job.report, job.html_path]
    for path in stale:
        path.unlink(missing_ok=True)


def _resumable(jobs: Sequence[Job], outdir: Path) -> dict[int, Row]:
    """Rows of an earlier run that still hold: same settings, same input bytes, output intact."""
    previous = {r.input: r for r in summary.load_rows(outdir).values()}
    done: dict[int, Row] = {}
    for job in jobs:
        row = previous.get(job.rel)
        if row is None or row.status not in (PASSED, MISSED) or not job.report.is_file():
            continue
        if job.html and not job.html_path.is_file():
            continue
        if row.job_sha256 != job.job_sha256(hashing.model_sha256(Path(job.source))):
            continue
        if row.status == PASSED and (
            not job.output.is_file() or hashing.model_sha256(job.output) != row.output_sha256
        ):
            continue
        row.index = job.index
        row.html = job.rel_to_outdir(job.html_path) if job.html else ""
        done[job.index] = row
    return done


def _run_info(options: BatchOptions) -> dict[str, Any]:
    return {
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "jobs": options.jobs,
        "scheduler": options.scheduler,
        "resume": options.resume,
    }


def _index(options: BatchOptions, writer: summary.SummaryWriter) -> Path | None:
    if not options.html:
        return None
    from onnxshrink.html.index import write_index

    path = options.outdir / INDEX_NAME
    write_index(writer.ordered(), writer.total, path)
    return path
