"""Plan a recipe into concrete steps (pure), then execute them on a gs graph.

`plan` does all validation that needs no model, so a batch can fail before loading anything;
`execute` owns selection, the pass lifecycle, housekeeping and per-step reports.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from onnxshrink import passes
from onnxshrink.errors import OnnxShrinkError, PassError, PreconditionError, RuleError
from onnxshrink.ir.stats import graph_weight_bytes
from onnxshrink.passes.base import Context, Pass
from onnxshrink.recipe import select
from onnxshrink.recipe.loader import build_params
from onnxshrink.recipe.schema import Recipe, Selector
from onnxshrink.report import StepReport

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedStep:
    """One pass application after override expansion."""

    index: int
    label: str
    pass_obj: Pass
    selects: tuple[Selector, ...]
    excludes: tuple[Selector, ...] = ()
    require_match: bool = False


@dataclass(frozen=True)
class Plan:
    """The recipe, expanded and validated; picklable so a batch ships it to workers."""

    recipe: Recipe
    steps: tuple[PlannedStep, ...]


def plan(recipe: Recipe) -> Plan:
    """Expand overrides: base selection minus override nodes, then each override on its own."""
    steps: list[PlannedStep] = []
    for i, step in enumerate(recipe.steps, start=1):
        cls = passes.get(step.pass_name)
        label = f"{i}:{step.pass_name}"
        ov_selects = tuple(ov.select for ov in step.overrides)
        steps.append(
            PlannedStep(i, label, cls(step.params), (step.select,), ov_selects, step.require_match)
        )
        for j, ov in enumerate(step.overrides, start=1):
            where = f"{recipe.source} step {i} '{step.pass_name}' override {j}"
            params = build_params(cls.params_type, {**step.raw_params, **ov.params}, where)
            later = ov_selects[j:]
            steps.append(
                PlannedStep(i, f"{label}/override{j}", cls(params), (step.select, ov.select), later)
            )
    return Plan(recipe, tuple(steps))


def execute(
    the_plan: Plan,
    graph: gs.Graph,
    ctx: Context,
    *,
    after_step: Callable[[PlannedStep, gs.Graph], None] | None = None,
) -> list[StepReport]:
    """Run every planned step in order; `after_step` may check the graph (and raise)."""
    reports = []
    for k, step in enumerate(the_plan.steps):
        ctx.step_index = k
        reports.append(_run_step(step, graph, ctx, the_plan.recipe.source))
        if after_step is not None:
            after_step(step, graph)
    return reports


def _run_step(step: PlannedStep, graph: gs.Graph, ctx: Context, source: str) -> StepReport:
    p = step.pass_obj
    report = StepReport(
        index=step.index,
        pass_name=p.name,
        label=step.label,
        params=_params_dict(p),
        select=step.selects[-1].to_dict(),
        weight_bytes_before=graph_weight_bytes(graph),
    )
    start = time.perf_counter()
    targets = select.resolve(graph, step.selects, step.excludes, p.default_ops)
    report.selected = len(targets)
    where = f"step {step.label} on {ctx.model_path.name}"
    if not targets:
        if step.require_match:
            raise RuleError(f"{source} {where}: selected no nodes and require_match is set")
        report.warnings.append("selected no nodes")
    else:
        try:
            p.requires(graph, ctx)
        except PreconditionError as e:
            report.warnings.append(f"step skipped: {e}")
            targets = []
    if targets:
        try:
            result = p.run(graph, targets, ctx)
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
            p.ensures(graph, ctx)
        except OnnxShrinkError as e:
            raise PassError(f"{where}: {e}") from e
        except Exception as e:
            raise PassError(f"{where}: {type(e).__name__}: {e}") from e
        report.touched = result.touched
        report.skipped = [s.__dict__ for s in result.skipped]
        report.stats = result.stats
    report.duration_s = round(time.perf_counter() - start, 4)
    report.weight_bytes_after = graph_weight_bytes(graph)
    logger.info("%s: touched %d, skipped %d", where, len(report.touched), len(report.skipped))
    return report


def _params_dict(p: Pass) -> dict[str, object]:
    import dataclasses

    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(p.params).items()
    }
