"""Run reports as dataclasses with a versioned, JSON-ready `to_dict()`; rendering is the CLI's."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from onnxshrink._version import __version__
from onnxshrink.validate.runner import NumericReport

SCHEMA_VERSION = 1


@dataclass
class SizeReport:
    """How big a model is: on disk, gzipped, and its weights by dtype."""

    file_bytes: int
    gzip_bytes: int
    weight_bytes: int
    params: int
    bytes_by_dtype: dict[str, int] = field(default_factory=dict)
    gzip_estimated: bool = False  # True above 32 MiB: extrapolated from sampled chunks


@dataclass
class StepReport:
    """What one step did to the graph."""

    index: int
    pass_name: str
    label: str
    params: dict[str, Any]
    select: dict[str, Any]
    selected: int = 0
    touched: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0


@dataclass
class RunReport:
    """Everything one `compress` run did and measured."""

    model: str
    output: str | None
    recipe: str
    recipe_source: str
    seed: int
    before: SizeReport
    after: SizeReport | None = None
    steps: list[StepReport] = field(default_factory=list)
    numerics: NumericReport | None = None
    timings: dict[str, float] = field(default_factory=dict)
    tool_version: str = __version__

    @property
    def ok(self) -> bool:
        """True unless validation ran and failed."""
        return self.numerics is None or self.numerics.ok

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with a schema version; non-finite floats become strings."""
        body = dataclasses.asdict(self)
        if self.numerics is not None:
            body["numerics"]["ok"] = self.numerics.ok
            for out, metrics in zip(body["numerics"]["outputs"], self.numerics.outputs):
                out["ok"] = metrics.ok
        return {"schema_version": SCHEMA_VERSION, "ok": self.ok, **_finite(body)}


def _finite(value: Any) -> Any:
    """JSON has no inf/nan: write them as strings so the file stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
