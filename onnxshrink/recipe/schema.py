"""Typed recipe: what the TOML file says, after strict validation, as frozen dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from onnxshrink.passes.base import PassParams


@dataclass(frozen=True)
class Selector:
    """Which nodes a step touches: fields are AND-ed, list items OR-ed, exclusions win."""

    op_types: tuple[str, ...] | None = None
    names: tuple[str, ...] = ()
    exclude_names: tuple[str, ...] = ()
    min_params: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form for reports."""
        out: dict[str, Any] = {}
        if self.op_types is not None:
            out["op_types"] = list(self.op_types)
        if self.names:
            out["names"] = list(self.names)
        if self.exclude_names:
            out["exclude_names"] = list(self.exclude_names)
        if self.min_params:
            out["min_params"] = self.min_params
        return out


@dataclass(frozen=True)
class Override:
    """A narrower selection inside a step that runs with merged parameters."""

    select: Selector
    params: dict[str, Any]


@dataclass(frozen=True)
class Step:
    """One pass application as written in the recipe."""

    pass_name: str
    params: PassParams
    select: Selector = Selector()
    require_match: bool = False
    overrides: tuple[Override, ...] = ()
    raw_params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Tolerance:
    """Bounds every float output must hold against the original; None means unchecked."""

    max_abs: float | None = None
    max_rel_l2: float | None = None
    min_cosine: float | None = None
    min_snr_db: float | None = None
    min_top1: float | None = None
    max_mismatch: float = 0.0
    #: A probability output (a Sigmoid's or Softmax's, see ``validate.bounded``) whose every
    #: value moved by at most this much is equal: the relative bounds are not applied to it.
    prob_atol: float | None = 1e-5

    def to_dict(self) -> dict[str, float]:
        """Only the bounds that are set."""
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class ValidationSpec:
    """How the compressed model is compared with the original."""

    inputs: str = "random"
    samples: int = 4
    seed: int = 0
    dims: dict[str, int] = field(default_factory=dict)
    tolerance: Tolerance = Tolerance(max_rel_l2=0.05, min_cosine=0.999)


@dataclass(frozen=True)
class Recipe:
    """A whole recipe: metadata, ordered steps, validation settings."""

    name: str
    steps: tuple[Step, ...]
    description: str = ""
    #: The oldest default-domain opset the recipe is written for: older models are refused
    #: before any pass runs (api.compress raises ModelError), not half compressed.
    min_opset: int = 1
    validate: ValidationSpec = ValidationSpec()
    source: str = "<memory>"
