"""The pass registry: the one module-level table, filled by explicit imports, read-only after.

Registry names are ``family.method``; the CLI's `passes` listing, recipe validation and the
contract tests all read this table, so a new pass needs only its module and one import below.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

from onnxshrink.passes.base import Context, Pass, PassParams, PassResult

_REGISTRY: dict[str, type[Pass]] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*$")

T = TypeVar("T", bound=type[Pass])


def register(name: str) -> Callable[[T], T]:
    """Class decorator adding a pass under ``family.method``; duplicates and bad names fail."""

    def deco(cls: T) -> T:
        if not _NAME.match(name):
            raise ValueError(f"pass name {name!r} must look like 'family.method'")
        if name in _REGISTRY:
            raise ValueError(f"pass {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def get(name: str) -> type[Pass]:
    """The pass class registered as `name` (KeyError if unknown)."""
    return _REGISTRY[name]


def names() -> list[str]:
    """Every registered pass name, sorted."""
    return sorted(_REGISTRY)


# Explicit imports fill the registry (no star imports, no plugin scanning).
from onnxshrink.passes import graph_cleanup as _graph_cleanup  # noqa: E402
from onnxshrink.passes import quant_dynamic as _quant_dynamic  # noqa: E402
from onnxshrink.passes import quant_gather as _quant_gather  # noqa: E402
from onnxshrink.passes import quant_qdq as _quant_qdq  # noqa: E402
from onnxshrink.passes import quant_smooth as _quant_smooth  # noqa: E402
from onnxshrink.passes import quant_weight_only as _quant_weight_only  # noqa: E402

__all__ = ["Context", "Pass", "PassParams", "PassResult", "get", "names", "register"]
del _graph_cleanup, _quant_dynamic, _quant_gather, _quant_qdq, _quant_smooth, _quant_weight_only
