"""The wheel must carry every subpackage and the shipped recipes (pyproject lists them)."""

from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "onnxshrink").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert on_disk | {"onnxshrink.rules"} == listed
    assert config["package-dir"]["onnxshrink.rules"] == "rules"
    assert (ROOT / "rules" / "default.toml").is_file()
