"""``--manifest FILE.toml``: which recipe, samples and tolerance each model of a batch gets.

The format (paths are relative to the manifest's folder)::

    schema = 1

    [defaults]                       # optional; any key below, applied to every model
    recipe = "default"               # a shipped recipe name or a .toml path
    samples = "samples"              # .npz, a test_data_set_* folder, or a folder searched by stem
    seed = 0
    timeout = 600                    # seconds per model
    dims = { batch = 1 }             # sizes of dynamic dims for random samples
    tolerance = { min_cosine = 0.999 }  # replaces the recipe's [validate] tolerance

    [[model]]
    path = "vision/**/*.onnx"        # a file, a folder (recursive) or a glob; required
    recipe = "rules/int8.toml"       # plus any key of [defaults]

A model matched by several ``[[model]]`` tables takes its settings from the last one (so a broad
entry can come first and exceptions after it). Loading is strict like the recipe loader: an
unknown key, a wrong type, a bad value or an entry that matches no model is a `RuleError` naming
the file, the table and the key.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnxshrink.batch import discover
from onnxshrink.errors import ModelError, RuleError
from onnxshrink.recipe.schema import Tolerance
from onnxshrink.recipe.strict import TOLERANCE_KEYS, as_table, check_keys, typed
from onnxshrink.recipe.strict import tolerance as strict_tolerance

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TOP_KEYS = ("schema", "defaults", "model")
SETTING_KEYS = ("recipe", "samples", "seed", "timeout", "dims", "tolerance")
MODEL_KEYS = ("path", *SETTING_KEYS)


@dataclass(frozen=True)
class Settings:
    """Per-model choices; None means "not set here" (fall back to defaults, then the CLI)."""

    recipe: str | None = None
    samples: Path | None = None
    seed: int | None = None
    timeout: float | None = None
    dims: dict[str, int] | None = None
    tolerance: Tolerance | None = None

    def over(self, base: Settings) -> Settings:
        """These settings on top of `base`, key by key."""
        values = {
            f.name: getattr(self, f.name)
            if getattr(self, f.name) is not None
            else getattr(base, f.name)
            for f in dataclasses.fields(self)
        }
        return Settings(**values)


@dataclass(frozen=True)
class Entry:
    """One ``[[model]]`` table."""

    number: int
    path: str
    settings: Settings


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated manifest."""

    source: Path
    defaults: Settings
    entries: tuple[Entry, ...]

    @property
    def base(self) -> Path:
        """The folder that relative paths in the manifest start from."""
        return self.source.parent


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest file (no model is opened)."""
    path = Path(path)
    if not path.is_file():
        raise RuleError(f"{path}: manifest not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise RuleError(f"{path}: not valid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RuleError(f"{path}: cannot read manifest: {e}") from None
    return parse_manifest(data, path.absolute())


def parse_manifest(data: Mapping[str, Any], source: Path) -> Manifest:
    """Validate a manifest already parsed into a dict."""
    where = str(source)
    check_keys(data, TOP_KEYS, where)
    if data.get("schema", 1) != 1:
        raise RuleError(
            f"{where}: schema {data['schema']!r} is not supported (this version reads 1)"
        )
    defaults = _settings(
        as_table(data.get("defaults", {}), f"{where} [defaults]"),
        f"{where} [defaults]",
        source.parent,
        SETTING_KEYS,
    )
    raw_models = data.get("model", [])
    if not isinstance(raw_models, list) or not raw_models:
        raise RuleError(f"{where}: a manifest needs at least one [[model]] table with a 'path'")
    entries = []
    for number, raw in enumerate(raw_models, start=1):
        at = f"{where} model {number}"
        table = as_table(raw, at)
        if "path" not in table:
            raise RuleError(f"{at}: missing 'path' (a file, folder or glob)")
        entries.append(
            Entry(
                number,
                typed(table["path"], str, f"{at} path"),
                _settings(table, at, source.parent, MODEL_KEYS),
            )
        )
    return Manifest(source, defaults, tuple(entries))


def resolve(
    manifest: Manifest, exclude: Sequence[Path] = ()
) -> list[tuple[discover.Found, Settings]]:
    """Every model the manifest names, with its merged settings, in mirrored-name order."""
    roots: list[Path] = []
    files: list[Path] = []
    owner: dict[Path, Entry] = {}
    for entry in manifest.entries:
        try:
            root, found = discover.expand(entry.path, manifest.base)
        except ModelError as e:
            raise RuleError(f"{manifest.source} model {entry.number}: {e}") from None
        if not found:
            raise RuleError(
                f"{manifest.source} model {entry.number}: path {entry.path!r} "
                "matched no .onnx files"
            )
        roots.append(root)
        files.extend(found)
        for f in found:
            owner[f.resolve()] = entry  # later entries win
    models = discover.relativize(roots, files, [p.resolve() for p in exclude])
    return [(m, owner[m.path.resolve()].settings.over(manifest.defaults)) for m in models]


def _settings(
    table: Mapping[str, Any], where: str, base: Path, allowed: tuple[str, ...]
) -> Settings:
    check_keys(table, allowed, where)
    recipe = table.get("recipe")
    if recipe is not None:
        recipe = typed(recipe, str, f"{where} recipe")
        if recipe.endswith(".toml") or "/" in recipe or "\\" in recipe:
            recipe = str(base / recipe)
    samples = table.get("samples")
    if samples is not None:
        samples = base / typed(samples, str, f"{where} samples")
        if not samples.exists():
            raise RuleError(f"{where} samples: {samples} not found")
    seed = table.get("seed")
    if seed is not None:
        seed = typed(seed, int, f"{where} seed")
    timeout = table.get("timeout")
    if timeout is not None:
        timeout = typed(timeout, float, f"{where} timeout")
        if timeout <= 0:
            raise RuleError(f"{where} timeout must be > 0 seconds, got {timeout}")
    return Settings(
        recipe,
        samples,
        seed,
        timeout,
        _dims(table.get("dims"), where),
        _tolerance(table.get("tolerance"), where),
    )


def _dims(raw: Any, where: str) -> dict[str, int] | None:
    if raw is None:
        return None
    raw_dims = as_table(raw, f"{where} dims")
    dims = {str(k): typed(v, int, f"{where} dims.{k}") for k, v in raw_dims.items()}
    for k, v in dims.items():
        if v < 1:
            raise RuleError(f"{where} dims.{k} must be >= 1, got {v}")
    return dims


def _tolerance(raw: Any, where: str) -> Tolerance | None:
    if raw is None:
        return None
    tol = strict_tolerance(raw, where)
    if tol is None:
        raise RuleError(f"{where} tolerance is empty (valid keys: {', '.join(TOLERANCE_KEYS)})")
    return tol
