"""Per-layer facts that passes and validators leave in a run report, found by convention.

The HTML report does not know any pass. It looks for these keys wherever a report can carry
per-node data (a step's touched-node stats, a step's ``stats`` as ``{key: {node: value}}``, or a
top-level report field), so a new pass gets plots by naming its stats, not by changing this code:

- ``centroids`` or ``codebook``: numbers (or nested lists, e.g. per-channel codebooks) drawn as
  vertical lines on that layer's weight histogram;
- ``sensitivity``: a number, or ``{metric: number}``, per layer, drawn as a bar chart.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

CENTROID_KEYS = ("centroids", "codebook")
SENSITIVITY_KEY = "sensitivity"


def _flatten(value: Any) -> Iterator[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        yield float(value)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _flatten(v)


def _per_node(report: Mapping[str, Any], key: str) -> Iterator[tuple[str, Any]]:
    """(node, value) for `key` in touched stats, step stats mappings and the report itself."""
    for step in report.get("steps", []):
        for node, stats in step.get("touched", {}).items():
            if isinstance(stats, Mapping) and key in stats:
                yield node, stats[key]
        mapping = step.get("stats", {}).get(key)
        if isinstance(mapping, Mapping):
            yield from mapping.items()
    top = report.get(key)
    if isinstance(top, Mapping):
        yield from top.items()


def centroids(report: Mapping[str, Any]) -> dict[str, list[float]]:
    """Sorted distinct codebook values per layer, over every step that recorded some."""
    found: dict[str, set[float]] = {}
    for key in CENTROID_KEYS:
        for node, value in _per_node(report, key):
            found.setdefault(str(node), set()).update(_flatten(value))
    return {node: sorted(values) for node, values in found.items() if values}


def sensitivity(report: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Per-layer sensitivity metrics (a bare number becomes ``{"sensitivity": n}``)."""
    out: dict[str, dict[str, float]] = {}
    for node, value in _per_node(report, SENSITIVITY_KEY):
        if isinstance(value, Mapping):
            metrics = {
                str(k): float(v)
                for k, v in value.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics = {SENSITIVITY_KEY: float(value)}
        else:
            continue
        out.setdefault(str(node), {}).update(metrics)
    return out


def actions(report: Mapping[str, Any]) -> dict[str, dict[str, Mapping[str, Any] | str]]:
    """For each layer: step label -> what that step did (its stats) or why it skipped it."""
    out: dict[str, dict[str, Mapping[str, Any] | str]] = {}
    for step in report.get("steps", []):
        label = step.get("label", str(step.get("index", "?")))
        for node, stats in step.get("touched", {}).items():
            out.setdefault(node, {})[label] = stats if isinstance(stats, Mapping) else {}
        for skip in step.get("skipped", []):
            out.setdefault(skip.get("node", "?"), {})[label] = f"skipped: {skip.get('reason', '')}"
    return out
