"""The per-model job: compress one model into its staging folder, then move results into place.

This runs in a worker process (local or on a Dask worker) and returns a plain `Row`. Everything a
run writes is built in the job's private staging folder under OUTDIR and moved into the mirrored
tree with atomic renames (external data first, then the model), so an interrupted batch never
leaves a partial output where a finished one belongs.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from onnxshrink import api
from onnxshrink.batch import hashing
from onnxshrink.batch.jobs import Job
from onnxshrink.batch.row import FAILED, MISSED, PASSED, Row
from onnxshrink.errors import (
    ModelError,
    OnnxShrinkError,
    OutputError,
    PassError,
    RuleError,
    SampleError,
)
from onnxshrink.report import RunReport

logger = logging.getLogger(__name__)

_KINDS: tuple[tuple[type[OnnxShrinkError], str], ...] = (
    (ModelError, "model"),
    (SampleError, "samples"),
    (RuleError, "recipe"),
    (OutputError, "output"),
    (PassError, "pass"),
)


def error_kind(error: OnnxShrinkError) -> str:
    """A short, stable name for the kind of error (a summary column users filter on)."""
    for cls, kind in _KINDS:
        if isinstance(error, cls):
            return kind
    return "error"


def run_job(job: Job) -> Row:
    """Compress `job`'s model; every expected failure becomes a failed row, never an exception."""
    start = time.perf_counter()
    staging = job.staging
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    input_sha = ""
    try:
        input_sha = hashing.model_sha256(Path(job.source))
        return _compress(job, staging, input_sha, start)
    except OnnxShrinkError as e:
        message = " ".join(str(e).replace(str(staging), str(job.output.parent)).split())
        row = failure_row(job, error_kind(e), message, time.perf_counter() - start)
        row.input_sha256 = input_sha
        return row
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def failure_row(job: Job, kind: str, message: str, wall_s: float = 0.0) -> Row:
    """The row of a model that produced no output."""
    return Row(
        index=job.index,
        input=job.rel,
        status=FAILED,
        error_kind=kind,
        error=message,
        recipe=job.recipe_name,
        samples=job.samples or "",
        wall_s=round(wall_s, 3),
    )


def _compress(job: Job, staging: Path, input_sha: str, start: float) -> Row:
    staged = staging / job.output.name
    report = api.compress(
        job.source,
        job.recipe,
        staged,
        samples=job.samples,
        seed=job.seed,
        validate=job.validate,
        dims=job.dims,
        keep_failed=True,
    )
    report.output = str(job.output) if report.ok else None
    files: list[tuple[Path, Path]] = []
    if report.ok:
        data = staged.with_name(staged.name + ".data")
        if data.exists():
            files.append((data, job.output.with_name(job.output.name + ".data")))
        files.append((staged, job.output))
    api.write_json(report.to_dict(), staging / "report.json")
    files.append((staging / "report.json", job.report))
    if job.html:
        from onnxshrink.html.report import write_run_report

        write_run_report(report, Path(job.source), staged, staging / "report.html", title=job.rel)
        files.append((staging / "report.html", job.html_path))
    job.output.parent.mkdir(parents=True, exist_ok=True)
    for src, dst in files:
        os.replace(src, dst)
    row = _row(job, report, input_sha)
    row.output_sha256 = hashing.model_sha256(job.output) if report.ok else ""
    row.wall_s = round(time.perf_counter() - start, 3)
    return row


def _row(job: Job, report: RunReport, input_sha: str) -> Row:
    before, after = report.before, report.after
    row = Row(
        index=job.index,
        input=job.rel,
        status=PASSED if report.ok else MISSED,
        output=job.rel if report.ok else "",
        report=job.rel_to_outdir(job.report),
        html=job.rel_to_outdir(job.html_path) if job.html else "",
        recipe=job.recipe_name,
        samples=job.samples or "",
        file_bytes_before=before.file_bytes,
        gzip_bytes_before=before.gzip_bytes,
        weight_bytes_before=before.weight_bytes,
        input_sha256=input_sha,
        job_sha256=job.job_sha256(input_sha),
    )
    if after is not None:
        row.file_bytes_after = after.file_bytes
        row.gzip_bytes_after = after.gzip_bytes
        row.weight_bytes_after = after.weight_bytes
        row.ratio = round(after.file_bytes / before.file_bytes, 6) if before.file_bytes else None
    if report.numerics is not None and report.numerics.outputs:
        outs = report.numerics.outputs
        row.min_cosine = min(o.cosine for o in outs)
        row.max_rel_l2 = max(o.rel_l2 for o in outs)
        row.max_abs = max(o.max_abs for o in outs)
        if not report.ok:
            bad = [f"{o.name}: {'; '.join(o.failures)}" for o in outs if not o.ok]
            row.error_kind = "tolerance"
            row.error = "outside the recipe's tolerance: " + " | ".join(bad)
    return row
