"""Strict TOML recipe loading: every mistake is a `RuleError` naming file, step and key.

All of this runs before any model loads, so a bad recipe fails in milliseconds, and a batch
fails before its first model.
"""

from __future__ import annotations

import sys
import typing
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from onnxshrink import passes
from onnxshrink.errors import ParamError, RuleError
from onnxshrink.passes.base import PassParams, is_optional
from onnxshrink.recipe.schema import (
    Override,
    Recipe,
    Selector,
    Step,
    ValidationSpec,
)
from onnxshrink.recipe.strict import as_table, check_keys, did_you_mean, typed
from onnxshrink.recipe.strict import tolerance as strict_tolerance

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TOP_KEYS = ("schema", "recipe", "step", "validate")
RECIPE_KEYS = ("name", "description", "min_opset")
STEP_KEYS = ("pass", "select", "params", "require_match", "override")
OVERRIDE_KEYS = ("select", "params")
SELECT_KEYS = ("op_types", "names", "exclude_names", "min_params")
VALIDATE_KEYS = ("inputs", "samples", "seed", "dims", "tolerance")


def shipped_dir() -> Path:
    """The folder of shipped recipes (installed package data, or the source tree's rules/)."""
    try:
        return Path(str(resources.files("onnxshrink.rules")))
    except ModuleNotFoundError:  # running from a source checkout without install
        return Path(__file__).resolve().parents[2] / "rules"


def shipped_names() -> list[str]:
    """Names accepted by ``-r NAME``."""
    return sorted(p.stem for p in shipped_dir().glob("*.toml"))


def resolve(spec: str | Path) -> Path:
    """Turn ``-r`` input (a path, or a shipped recipe name) into a file path."""
    path = Path(spec)
    if path.suffix == ".toml" or path.exists() or len(path.parts) > 1:
        if not path.is_file():
            raise RuleError(f"{path}: recipe file not found")
        return path
    candidate = shipped_dir() / f"{spec}.toml"
    if candidate.is_file():
        return candidate
    names = shipped_names()
    raise RuleError(f"unknown recipe {str(spec)!r}{did_you_mean(str(spec), names)}")


def load_recipe(spec: str | Path) -> Recipe:
    """Load and fully validate a recipe given by path or shipped name."""
    path = resolve(spec)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise RuleError(f"{path}: not valid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RuleError(f"{path}: cannot read recipe: {e}") from None
    return parse_recipe(data, source=str(path))


def parse_recipe(data: Mapping[str, Any], *, source: str = "<memory>") -> Recipe:
    """Validate a recipe already parsed into a dict (the TOML layout)."""
    check_keys(data, TOP_KEYS, source)
    schema = data.get("schema", 1)
    if schema != 1:
        raise RuleError(f"{source}: schema {schema!r} is not supported (this version reads 1)")
    meta = as_table(data.get("recipe", {}), f"{source} [recipe]")
    check_keys(meta, RECIPE_KEYS, f"{source} [recipe]")
    raw_steps = data.get("step", [])
    if not isinstance(raw_steps, list) or not raw_steps:
        raise RuleError(f"{source}: a recipe needs at least one [[step]] table")
    steps = tuple(_step(raw, i, source) for i, raw in enumerate(raw_steps, start=1))
    return Recipe(
        name=typed(meta.get("name", Path(source).stem), str, f"{source} [recipe] name"),
        description=typed(meta.get("description", ""), str, f"{source} [recipe] description"),
        min_opset=typed(meta.get("min_opset", 1), int, f"{source} [recipe] min_opset"),
        steps=steps,
        validate=_validation(data.get("validate", {}), source),
        source=source,
    )


def _step(raw: Any, index: int, source: str) -> Step:
    where = f"{source} step {index}"
    raw = as_table(raw, where)
    check_keys(raw, STEP_KEYS, where)
    if "pass" not in raw:
        raise RuleError(f"{where}: missing 'pass' (one of {', '.join(passes.names())})")
    name = typed(raw["pass"], str, f"{where} pass")
    if name not in passes.names():
        raise RuleError(f"{where}: unknown pass {name!r}{did_you_mean(name, passes.names())}")
    where = f"{where} '{name}'"
    cls = passes.get(name)
    raw_params = dict(as_table(raw.get("params", {}), f"{where} params"))
    params = build_params(cls.params_type, raw_params, where)
    overrides = []
    for j, ov in enumerate(raw.get("override", []), start=1):
        ov_where = f"{where} override {j}"
        ov = as_table(ov, ov_where)
        check_keys(ov, OVERRIDE_KEYS, ov_where)
        ov_params = dict(as_table(ov.get("params", {}), f"{ov_where} params"))
        build_params(cls.params_type, {**raw_params, **ov_params}, ov_where)
        overrides.append(Override(_selector(ov.get("select", {}), ov_where), ov_params))
    return Step(
        pass_name=name,
        params=params,
        select=_selector(raw.get("select", {}), where),
        require_match=typed(raw.get("require_match", False), bool, f"{where} require_match"),
        overrides=tuple(overrides),
        raw_params=raw_params,
    )


def build_params(cls: type[PassParams], raw: Mapping[str, Any], where: str) -> PassParams:
    """Convert a params table into the pass's frozen dataclass, then run its `check`."""
    types = cls.field_types()
    check_keys(raw, tuple(types), f"{where} params")
    values = {k: _coerce(v, types[k], f"{where} params.{k}") for k, v in raw.items()}
    params = cls(**values)
    try:
        params.check()
    except ParamError as e:
        raise ParamError(f"{where}: {e}") from None
    return params


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against a type hint, converting lists to tuples and ints to floats."""
    if is_optional(tp):
        if value is None:
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = inner[0] if len(inner) == 1 else typing.Union[tuple(inner)]  # noqa: UP007
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ParamError(f"{where} must be one of {list(allowed)}, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ParamError(f"{where} must be a list, got {type(value).__name__} {value!r}")
        item_tp = args[0] if args else Any
        return tuple(_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        table = as_table(value, where)
        return {str(k): _coerce(v, val_tp, f"{where}.{k}") for k, v in table.items()}
    if tp is Any:
        return value
    return typed(value, tp, where, error=ParamError)


def _str_list(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RuleError(f"{where} must be a list of strings, got {value!r}")
    return tuple(value)


def _selector(raw: Any, where: str) -> Selector:
    import re

    raw = as_table(raw, f"{where} select")
    check_keys(raw, SELECT_KEYS, f"{where} select")
    names = _str_list(raw.get("names", []), f"{where} select.names")
    excludes = _str_list(raw.get("exclude_names", []), f"{where} select.exclude_names")
    for pattern in names + excludes:
        try:
            re.compile(pattern)
        except re.error as e:
            raise RuleError(f"{where} select: bad regex {pattern!r}: {e}") from None
    op_types = raw.get("op_types")
    min_params = typed(raw.get("min_params", 0), int, f"{where} select.min_params")
    if min_params < 0:
        raise RuleError(f"{where} select.min_params must be >= 0, got {min_params}")
    return Selector(
        op_types=None if op_types is None else _str_list(op_types, f"{where} select.op_types"),
        names=names,
        exclude_names=excludes,
        min_params=min_params,
    )


def _validation(raw: Any, source: str) -> ValidationSpec:
    where = f"{source} [validate]"
    raw = as_table(raw, where)
    check_keys(raw, VALIDATE_KEYS, where)
    tolerance = strict_tolerance(raw.get("tolerance", {}), where) or ValidationSpec().tolerance
    dims = {
        str(k): typed(v, int, f"{where} dims.{k}")
        for k, v in as_table(raw.get("dims", {}), f"{where} dims").items()
    }
    samples = typed(raw.get("samples", ValidationSpec.samples), int, f"{where} samples")
    if samples < 1:
        raise RuleError(f"{where} samples must be >= 1, got {samples}")
    return ValidationSpec(
        inputs=typed(raw.get("inputs", "random"), str, f"{where} inputs"),
        samples=samples,
        seed=typed(raw.get("seed", 0), int, f"{where} seed"),
        dims=dims,
        tolerance=tolerance,
    )
