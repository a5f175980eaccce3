"""One summary row per model: a plain, picklable record that crosses process and host borders.

Rows travel from worker processes (local or on a Dask cluster) back to the batch driver, so they
hold only JSON-ready scalars. Everything except `VOLATILE_FIELDS` is a pure function of the input
bytes, the recipe and the seed, which is what makes a summary independent of ``--jobs`` and of
where a model ran.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

PASSED = "passed"
MISSED = "missed"  # ran to the end, but the result is outside the recipe's tolerance
FAILED = "failed"
STATUSES = (PASSED, MISSED, FAILED)

#: Row fields that describe how a run went rather than what it produced (excluded from
#: comparisons between runs).
VOLATILE_FIELDS = ("wall_s",)


@dataclass
class Row:
    """What happened to one model; paths are POSIX paths relative to the output folder."""

    index: int
    input: str
    status: str
    error_kind: str = ""
    error: str = ""
    output: str = ""
    report: str = ""
    html: str = ""
    recipe: str = ""
    samples: str = ""
    file_bytes_before: int | None = None
    file_bytes_after: int | None = None
    ratio: float | None = None
    gzip_bytes_before: int | None = None
    gzip_bytes_after: int | None = None
    weight_bytes_before: int | None = None
    weight_bytes_after: int | None = None
    min_cosine: float | None = None
    max_rel_l2: float | None = None
    max_abs: float | None = None
    input_sha256: str = ""
    output_sha256: str = ""
    job_sha256: str = ""
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; non-finite floats become strings so the file stays standard JSON."""
        return {k: _finite(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Row:
        """Inverse of `to_dict` for the fields this version knows (used by ``--resume``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: _unfinite(v) for k, v in data.items() if k in names})


def columns() -> list[str]:
    """Field names in CSV column order."""
    return [f.name for f in dataclasses.fields(Row)]


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _unfinite(value: Any) -> Any:
    if value in ("inf", "-inf", "nan"):
        return float(value)
    return value
