"""``summary.json`` and ``summary.csv``: one row per model, rewritten atomically as rows arrive.

Both files are complete and parseable at every moment (temp file + rename), so a batch that is
interrupted or killed leaves a summary of exactly what finished. Rows are always written in the
batch's canonical order, never in completion order, and everything that varies between runs of
the same batch (timings, ``--jobs``, the host) sits in the ``run`` block and the rows' `wall_s`,
which `stable_view` drops for comparisons.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from onnxshrink._version import __version__
from onnxshrink.batch.row import FAILED, MISSED, PASSED, STATUSES, VOLATILE_FIELDS, Row, columns

SCHEMA_VERSION = 1
JSON_NAME = "summary.json"
CSV_NAME = "summary.csv"

#: Exit codes of a batch: every model passed / some missed the tolerance / some failed.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_MISSED = 3


def exit_code(rows: Iterable[Row]) -> int:
    """0 when every model passed, 1 when any failed, else 3 when any missed the tolerance."""
    statuses = {r.status for r in rows}
    if FAILED in statuses:
        return EXIT_FAILED
    if MISSED in statuses:
        return EXIT_MISSED
    return EXIT_OK


def counts(rows: Iterable[Row]) -> dict[str, int]:
    """Rows per status (every status present, zero or not)."""
    out = dict.fromkeys(STATUSES, 0)
    for r in rows:
        out[r.status] += 1
    return out


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` in one rename, so readers never see a half-written file.

    The temp file is created with mode 0666 minus the umask (mkstemp's 0600 would hide the
    summary from other users of a shared output folder).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class SummaryWriter:
    """Collects rows for a batch of `total` models and keeps the two files up to date."""

    #: Time between rewrites is at least this many times what the last rewrite took, so a summary
    #: of thousands of rows costs at most ~5% of the driver's time and a small one stays current.
    BACKOFF = 20.0

    def __init__(self, outdir: Path, total: int, run: dict[str, Any]):
        self.outdir = outdir
        self.total = total
        self.run = dict(run)
        self.rows: dict[int, Row] = {}
        self._started = time.perf_counter()
        self._next_write = 0.0

    def add(self, row: Row) -> None:
        """Record a row and rewrite the files unless the last rewrite was very recent."""
        self.rows[row.index] = row
        if time.perf_counter() >= self._next_write:
            self.write(complete=False)

    def ordered(self) -> list[Row]:
        """Rows in canonical (input) order."""
        return [self.rows[i] for i in sorted(self.rows)]

    def write(self, *, complete: bool, interrupted: bool = False) -> None:
        """Write both files now."""
        rows = self.ordered()
        run = {
            **self.run,
            "wall_s": round(time.perf_counter() - self._started, 3),
            "interrupted": interrupted,
        }
        body = {
            "schema_version": SCHEMA_VERSION,
            "tool_version": __version__,
            "complete": complete and len(rows) == self.total,
            "total": self.total,
            "counts": counts(rows),
            "exit_code": exit_code(rows),
            "rows": [r.to_dict() for r in rows],
            "run": run,
        }
        start = time.perf_counter()
        write_atomic(self.outdir / JSON_NAME, json.dumps(body, indent=2) + "\n")
        write_atomic(self.outdir / CSV_NAME, to_csv(rows))
        now = time.perf_counter()
        self._next_write = now + self.BACKOFF * (now - start)


def to_csv(rows: Iterable[Row]) -> str:
    """The rows as CSV with a header (floats in repr form, so values round-trip)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns(), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if v is None else v for k, v in r.to_dict().items()})
    return buf.getvalue()


def load_rows(outdir: Path) -> dict[int, Row]:
    """Rows of an earlier run's summary, by index (empty if there is none or it is unreadable)."""
    path = outdir / JSON_NAME
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
        return {int(r["index"]): Row.from_dict(r) for r in body.get("rows", [])}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def stable_view(summary: dict[str, Any]) -> dict[str, Any]:
    """A summary without what legitimately varies between runs (for comparing runs)."""
    out = {k: v for k, v in summary.items() if k != "run"}
    out["rows"] = [
        {k: v for k, v in r.items() if k not in VOLATILE_FIELDS} for r in summary.get("rows", [])
    ]
    return out


__all__ = ["EXIT_FAILED", "EXIT_MISSED", "EXIT_OK", "MISSED", "PASSED", "SummaryWriter"]
