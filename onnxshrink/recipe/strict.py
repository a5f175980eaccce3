"""Strict reading of TOML tables, shared by recipes and batch manifests.

Each helper raises `RuleError` naming where the value sits (file, table, key) with what was
expected and found, and a "did you mean" for misspelt keys.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

from onnxshrink.errors import RuleError
from onnxshrink.recipe.schema import Tolerance

TOLERANCE_KEYS = tuple(f.name for f in dataclasses.fields(Tolerance))


def typed(value: Any, tp: type, where: str, error: type[RuleError] = RuleError) -> Any:
    """`value` if it is a `tp` (ints are accepted as floats, booleans only as bools)."""
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is not bool and isinstance(value, bool):
        raise error(f"{where} must be {tp.__name__}, got a boolean {value!r}")
    if not isinstance(value, tp):
        raise error(f"{where} must be {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def as_table(value: Any, where: str) -> Mapping[str, Any]:
    """`value` if it is a TOML table."""
    if not isinstance(value, Mapping):
        raise RuleError(f"{where} must be a table, got {type(value).__name__} {value!r}")
    return value


def check_keys(tbl: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    """Refuse any key not in `allowed`, suggesting the closest valid one."""
    for key in tbl:
        if key not in allowed:
            hint = did_you_mean(key, list(allowed))
            raise RuleError(
                f"{where}: unknown key {key!r}{hint} (valid keys: {', '.join(allowed)})"
            )


def did_you_mean(word: str, choices: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def tolerance(raw: Any, where: str) -> Tolerance | None:
    """A tolerance table as `Tolerance`, or None when the table is empty."""
    tbl = as_table(raw, f"{where} tolerance")
    check_keys(tbl, TOLERANCE_KEYS, f"{where} tolerance")
    if not tbl:
        return None
    return Tolerance(**{k: typed(v, float, f"{where} tolerance.{k}") for k, v in tbl.items()})
