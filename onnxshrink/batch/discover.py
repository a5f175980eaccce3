"""Turn files, folders and globs into an ordered list of models with mirrored output names.

Every input contributes a *root*: a folder for a folder, the parent for a file, the part before
the first wildcard for a glob. Models are named relative to the common path of all roots, so the
output tree under OUTDIR mirrors the input tree, two different inputs never share an output name,
and the order (sorted by that relative name) does not depend on how the arguments were written.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from onnxshrink.errors import ModelError

MODEL_SUFFIX = ".onnx"
_MAGIC = frozenset("*?[")


@dataclass(frozen=True)
class Found:
    """A model file and the relative name its outputs get under OUTDIR."""

    path: Path
    rel: PurePosixPath


def has_magic(pattern: str) -> bool:
    """Whether `pattern` is a glob rather than a literal path."""
    return any(c in _MAGIC for c in pattern)


def _glob_root(pattern: str) -> Path:
    parts = Path(pattern).parts
    literal = []
    for part in parts:
        if has_magic(part):
            break
        literal.append(part)
    return Path(*literal) if literal else Path(".")


def _skip(path: Path, excluded: Sequence[Path]) -> bool:
    """Outputs of an earlier batch and our own scratch folders are never inputs."""
    resolved = path.resolve()
    if any(resolved.is_relative_to(ex) for ex in excluded):
        return True
    return any(part.startswith(".onnxshrink") for part in path.parts)


def _folder_models(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob(f"*{MODEL_SUFFIX}") if p.is_file())


def expand(spec: str, base: Path) -> tuple[Path, list[Path]]:
    """One input argument -> (its root, the model files it names). Relative to `base`."""
    if has_magic(spec):
        pattern = spec if os.path.isabs(spec) else str(base / spec)
        files: list[Path] = []
        for match in sorted(glob.glob(pattern, recursive=True)):
            path = Path(match)
            if path.is_dir():
                files.extend(_folder_models(path))
            elif path.suffix == MODEL_SUFFIX:
                files.append(path)
        return _glob_root(pattern), files
    path = base / spec
    if path.is_dir():
        return path, _folder_models(path)
    if path.is_file():
        return path.parent, [path]
    raise ModelError(f"{spec}: no such file or folder")


def discover(
    specs: Iterable[str], *, base: Path | None = None, exclude: Sequence[Path] = ()
) -> list[Found]:
    """Models named by `specs`, de-duplicated and sorted by their mirrored relative name."""
    base = base or Path.cwd()
    excluded = [p.resolve() for p in exclude]
    roots: list[Path] = []
    files: list[Path] = []
    for spec in specs:
        root, found = expand(spec, base)
        if not found:
            raise ModelError(f"{spec}: matched no {MODEL_SUFFIX} files")
        roots.append(root)
        files.extend(found)
    return relativize(roots, files, excluded)


def relativize(
    roots: Sequence[Path], files: Sequence[Path], excluded: Sequence[Path]
) -> list[Found]:
    """Name each file relative to the common root; drop duplicates and excluded files."""
    if not roots:
        return []
    common = Path(os.path.commonpath([str(r.absolute()) for r in roots]))
    seen: set[Path] = set()
    found = []
    for f in files:
        resolved = f.resolve()
        if resolved in seen or _skip(f, excluded):
            continue
        seen.add(resolved)
        rel = PurePosixPath(Path(os.path.relpath(f.absolute(), common)).as_posix())
        found.append(Found(f.absolute(), rel))
    return sorted(found, key=lambda x: str(x.rel))
