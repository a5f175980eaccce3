"""The pass contract: frozen parameters, a run on a driver-owned graph, a result that explains.

A pass object holds only its parameters (so it pickles across a batch); whatever it computes goes
into the graph or into `PassResult.stats`. The pipeline owns cleanup, toposort and reporting.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.errors import ParamError

if TYPE_CHECKING:
    from onnxshrink.validate.reference import Reference


def expect(ok: bool, name: str, value: object, wanted: str) -> None:
    """Raise a uniform `ParamError` when a parameter check fails."""
    if not ok:
        raise ParamError(f"The {name!r} parameter must be {wanted}. Got {value!r} instead.")


def expect_guard(min_cosine: float, max_ratio: float, ratio_range: tuple[float, float]) -> None:
    """The bounds every guarded pass takes: a cosine in (0, 1] and a latency ratio in range."""
    expect(0.0 < min_cosine <= 1.0, "guard_min_cosine", min_cosine, "in (0, 1]")
    lo, hi = ratio_range
    expect(lo <= max_ratio <= hi, "guard_max_latency_ratio", max_ratio, f"in [{lo:g}, {hi:g}]")


@dataclass(frozen=True, kw_only=True)
class PassParams:
    """Base of every pass's parameters; subclasses add fields with defaults and a `check`."""

    def check(self) -> None:
        """Validate values once, at plan time (types are checked by the loader)."""

    @classmethod
    def field_types(cls) -> dict[str, Any]:
        """Resolved type hints of the parameter fields."""
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


P = TypeVar("P", bound=PassParams)


@dataclass
class NodeSkip:
    """A node a pass was asked to touch but left alone, and why."""

    node: str
    op_type: str
    reason: str


@dataclass
class PassResult:
    """What a pass did: touched nodes with per-node stats, skipped nodes with reasons."""

    touched: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: list[NodeSkip] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def modified(self) -> bool:
        """Whether the graph changed (derived, so it cannot disagree with `touched`)."""
        return bool(self.touched)

    def touch(self, node: gs.Node | str, **stats: Any) -> None:
        """Record that `node` changed, with JSON-serialisable per-node statistics."""
        name = node if isinstance(node, str) else node.name
        self.touched.setdefault(name, {}).update(stats)

    def skip(self, node: gs.Node, reason: str) -> None:
        """Record that `node` was selected but left alone."""
        self.skipped.append(NodeSkip(node.name, node.op, reason))


@dataclass
class Context:
    """What a pass may ask of its surroundings; passes never open files or sessions themselves."""

    model_path: Path
    seed: int = 0
    step_index: int = 0
    workdir: Path | None = None
    feeds: Sequence[dict[str, np.ndarray]] = field(default_factory=list)
    opset: int = 1
    #: The recipe's validation bounds (``Tolerance.to_dict()``), for passes that check
    #: themselves against them (the quantization tolerance guard); empty when unknown.
    tolerance: dict[str, float] = field(default_factory=dict)
    #: The original model's outputs on `feeds`, shared by every guard and by validation so
    #: that a guard holds the recipe's tolerance against the original; None without samples.
    reference: Reference | None = None

    def reference_outputs(
        self, graph: gs.Graph, count: int, source: str
    ) -> list[list[Any]] | None:
        """The original's outputs, in `graph`'s output order, on the first `count` samples:
        what a guard judges candidates against when its feeds are the run's samples (`source`
        as ``calibration_feeds`` names it); None when they are not, or without samples."""
        if self.reference is None or source != "samples":
            return None
        return self.reference.aligned(count, [t.name for t in graph.outputs])

    @property
    def rng(self) -> np.random.Generator:
        """A generator seeded from the run seed and the step, so steps do not share streams."""
        return np.random.default_rng([self.seed, self.step_index])


class Pass(Generic[P]):
    """Base class: subclasses set `name`, `params_type`, `default_ops` and implement `run`."""

    name: ClassVar[str] = ""
    params_type: ClassVar[type[PassParams]] = PassParams
    #: Op types selected when a step's selector names none; None means every node.
    default_ops: ClassVar[frozenset[str] | None] = None

    def __init__(self, params: P | None = None) -> None:
        self.params: P = params if params is not None else self.params_type()  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params!r})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.params == self.params  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self.params))

    def requires(self, graph: gs.Graph, ctx: Context) -> None:
        """Raise `PreconditionError` if the pass cannot run on this graph at all."""

    def run(self, graph: gs.Graph, targets: Sequence[gs.Node], ctx: Context) -> PassResult:
        """Change `graph` in place on the selected `targets`; never cleanup or toposort."""
        raise NotImplementedError

    def ensures(self, graph: gs.Graph, ctx: Context) -> None:
        """Check invariants after `run` (raise `PassError` on a violation)."""


def is_optional(tp: Any) -> bool:
    """Whether a type hint admits None."""
    origin = typing.get_origin(tp)
    union = origin is typing.Union or origin is types.UnionType
    return union and type(None) in typing.get_args(tp)
