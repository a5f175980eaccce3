"""The Python API; the CLI is a thin layer over these functions.

`compress` loads and checks everything that can fail cheaply (recipe, model, samples, output
path) before any pass runs, writes the result atomically, and validates it with onnxruntime
before it moves into place, so a failed run never leaves a partial or unvalidated output.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxshrink import pipeline, runtime
from onnxshrink.errors import ModelError, OnnxShrinkError, OutputError, PassError, SampleError
from onnxshrink.ir import io
from onnxshrink.ir.stats import size_report
from onnxshrink.passes.base import Context
from onnxshrink.recipe.loader import load_recipe
from onnxshrink.recipe.schema import Recipe, Tolerance
from onnxshrink.report import RunReport, StepReport
from onnxshrink.runtime import OptLevel
from onnxshrink.validate import feeds as feeds_mod
from onnxshrink.validate.bounded import probability_outputs
from onnxshrink.validate.reference import Reference
from onnxshrink.validate.runner import NumericReport, validate_paths

logger = logging.getLogger(__name__)

DEFAULT_RECIPE = "default"


def default_output(model: Path) -> Path:
    """``model.onnx`` -> ``model.shrunk.onnx`` beside it."""
    return model.with_name(f"{model.stem}.shrunk.onnx")


def _recipe(recipe: Recipe | str | os.PathLike[str] | None) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    return load_recipe(DEFAULT_RECIPE if recipe is None else os.fspath(recipe))


def _check_output(model: Path, output: Path) -> None:
    if output.resolve() == model.resolve():
        raise OutputError(f"{output}: refusing to overwrite the input model")
    if output.exists() and output.is_dir():
        raise OutputError(f"{output}: is a directory, expected an output file path")
    if not output.parent.is_dir():
        raise OutputError(f"{output.parent}: output directory does not exist")


def index_bounds(graph: gs.Graph) -> dict[str, int]:
    """Upper bounds for integer inputs used directly as Gather indices into a constant table."""
    bounds: dict[str, int] = {}
    for inp in graph.inputs:
        for node in inp.outputs:
            if node.op == "Gather" and len(node.inputs) > 1 and node.inputs[1] is inp:
                data = node.inputs[0]
                if isinstance(data, gs.Constant) and data.shape:
                    axis = int(node.attrs.get("axis", 0))
                    bound = int(data.shape[axis])
                    bounds[inp.name] = min(bounds.get(inp.name, bound), bound)
    return bounds


def load_feeds(
    proto: onnx.ModelProto,
    graph: gs.Graph | None,
    samples: str | os.PathLike[str] | None,
    recipe: Recipe,
    *,
    seed: int | None = None,
    dims: dict[str, int] | None = None,
    model: str | os.PathLike[str] | None = None,
) -> feeds_mod.Feeds:
    """Samples for validation: the given source, else the recipe's, else seeded random.

    `model` names the file in errors that only know an input's name (e.g. a dtype that random
    samples cannot produce), so the one line the CLI prints says which model it is about.
    """
    spec = recipe.validate
    source = samples if samples is not None else spec.inputs
    try:
        specs = feeds_mod.input_specs(proto)
        return feeds_mod.load_samples(
            os.fspath(source),
            specs,
            count=spec.samples,
            seed=spec.seed if seed is None else seed,
            dims={**spec.dims, **(dims or {})},
            int_high=index_bounds(graph) if graph is not None else None,
        )
    except SampleError as e:
        if model is None or (str(source) != "random" and str(source) in str(e)):
            raise  # already names the samples file, which is what is wrong
        raise SampleError(f"{model}: {e}") from e


_P = ParamSpec("_P")


def _releasing_arena(fn: Callable[_P, RunReport]) -> Callable[_P, RunReport]:
    """The sessions share one arena: give its memory back to the caller's process after."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> RunReport:
        try:
            return fn(*args, **kwargs)
        finally:
            runtime.release_shared_arena()

    return wrapper


@_releasing_arena
def compress(
    model: str | os.PathLike[str],
    recipe: Recipe | str | os.PathLike[str] | None = None,
    output: str | os.PathLike[str] | None = None,
    *,
    samples: str | os.PathLike[str] | None = None,
    seed: int = 0,
    validate: bool = True,
    dims: dict[str, int] | None = None,
    check_each_step: bool = False,
    ort_opt: OptLevel = "all",
    report_path: str | os.PathLike[str] | None = None,
    keep_failed: bool = False,
) -> RunReport:
    """Compress `model` with `recipe` into `output` and validate it against the original.

    Returns the report; `report.ok` is False when validation ran and missed the tolerance
    (the output is then not written unless `keep_failed`). Raises `OnnxShrinkError` subclasses
    for bad input, with the input untouched and no output file left behind.
    """
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    the_recipe = _recipe(recipe)
    the_plan = pipeline.plan(the_recipe)
    model_path = Path(model)
    out_path = Path(output) if output is not None else default_output(model_path)
    _check_output(model_path, out_path)
    loaded = io.load(model_path)
    if loaded.info.opset < the_recipe.min_opset:
        raise ModelError(
            f"{model_path}: opset {loaded.info.opset} is below recipe '{the_recipe.name}''s "
            f"min_opset {the_recipe.min_opset} (onnx.version_converter can upgrade it)"
        )
    timings["load_s"] = time.perf_counter() - t0
    probabilities = probability_outputs(loaded.graph)  # before the passes change the graph
    feeds = (  # samples given calibrate the passes even when validation is off
        load_feeds(loaded.proto, loaded.graph, samples, the_recipe, dims=dims, model=model_path)
        if validate or samples is not None
        else None
    )
    report = RunReport(
        model=str(model_path),
        output=None,
        recipe=the_recipe.name,
        recipe_source=the_recipe.source,
        seed=seed,
        before=size_report(model_path, loaded.proto),
    )
    with tempfile.TemporaryDirectory(prefix=".onnxshrink-", dir=out_path.parent) as tmp:
        reference = Reference(model_path, feeds, ort_opt) if feeds is not None else None
        if validate and reference is not None:
            reference.outputs()  # validation needs them: an original that fails on the feeds
            # (random ones of a guessed size) is reported as such, not as a pass's failure
        ctx = Context(model_path=model_path, seed=seed, workdir=Path(tmp),
                      feeds=feeds.samples if feeds else [], opset=loaded.info.opset,
                      tolerance=the_recipe.validate.tolerance.to_dict(), reference=reference)
        t1 = time.perf_counter()
        hook = (
            _step_checker(
                loaded.info, reference if validate else None, the_recipe, Path(tmp), probabilities
            )
            if check_each_step
            else None
        )
        report.steps = pipeline.execute(the_plan, loaded.graph, ctx, after_step=hook)
        timings["passes_s"] = time.perf_counter() - t1
        candidate = Path(tmp) / out_path.name
        written = _write(loaded.graph, loaded.info, candidate)
        if validate and feeds is not None:
            t2 = time.perf_counter()
            report.numerics = validate_paths(
                model_path, candidate, feeds, the_recipe.validate.tolerance, opt=ort_opt,
                reference=reference, config=session_config(report.steps),
                probabilities=probabilities,
            )
            timings["validate_s"] = time.perf_counter() - t2
        report.after = size_report(candidate, written)
        if report.ok or keep_failed:
            _move_into_place(candidate, out_path)
            report.output = str(out_path)
    timings["total_s"] = time.perf_counter() - t0
    report.timings = {k: round(v, 4) for k, v in timings.items()}
    if report_path is not None:
        write_json(report.to_dict(), Path(report_path))
    return report


def session_config(steps: list[StepReport]) -> dict[str, str]:
    """Session options the passes say the output needs (later steps win on a conflict)."""
    config: dict[str, str] = {}
    for step in steps:
        config.update(step.stats.get("session_config", {}))
    return config


def _write(graph: gs.Graph, info: io.ModelInfo, path: Path) -> onnx.ModelProto:
    """Export, check and save `graph`; the proto as saved (external data references set)."""
    try:
        proto = io.to_model(graph, info)
    except Exception as e:  # gs export errors are bugs in a pass, but still one clear line
        raise PassError(f"the compressed graph cannot be exported: {type(e).__name__}: {e}") from e
    try:
        io.check_model(proto, path.name)
    except OnnxShrinkError as e:
        raise PassError(f"the compressed model is invalid (a pass bug, please report): {e}") from e
    io.save(proto, path, external_data=True if info.external_data else None)
    return proto


def _move_into_place(candidate: Path, out_path: Path) -> None:
    """Data file first, then the model, each an atomic rename on the same filesystem."""
    data = candidate.with_name(candidate.name + ".data")
    try:
        if data.exists():
            os.replace(data, out_path.with_name(out_path.name + ".data"))
        os.replace(candidate, out_path)
    except OSError as e:
        raise OutputError(f"{out_path}: cannot write output ({e.strerror or e})") from None


def _step_checker(
    info: io.ModelInfo,
    reference: Reference | None,
    recipe: Recipe,
    workdir: Path,
    probabilities: frozenset[str] = frozenset(),
) -> Callable[[pipeline.PlannedStep, gs.Graph], None]:
    """After each step: the graph must export, pass the checker, and hold the tolerance."""

    def check(step: pipeline.PlannedStep, graph: gs.Graph) -> None:
        path = workdir / f"step{step.index}.onnx"
        try:
            _write(graph, info, path)
        except OnnxShrinkError as e:
            raise PassError(f"after step {step.label}: {e}") from e
        if reference is not None:
            rep = validate_paths(
                info.path, path, reference.feeds, recipe.validate.tolerance, opt=reference.opt,
                reference=reference, probabilities=probabilities,
            )
            if not rep.ok:
                bad = "; ".join(
                    f"{o.name}: {', '.join(o.failures)}" for o in rep.outputs if not o.ok
                )
                raise PassError(f"step {step.label} is the first to break the tolerance: {bad}")
        for p in path.parent.glob(path.name + "*"):
            p.unlink()

    return check


def validate(
    original: str | os.PathLike[str],
    candidate: str | os.PathLike[str],
    *,
    samples: str | os.PathLike[str] | None = None,
    recipe: Recipe | str | os.PathLike[str] | None = None,
    tolerance: Tolerance | None = None,
    seed: int | None = None,
    dims: dict[str, int] | None = None,
    ort_opt: OptLevel = "all",
) -> NumericReport:
    """Compare two models on the same feeds (the recipe gives samples settings and tolerance)."""
    the_recipe = _recipe(recipe)
    orig = io.load(Path(original))
    io.read_model(Path(candidate))
    feeds = load_feeds(orig.proto, orig.graph, samples, the_recipe, seed=seed, dims=dims,
                       model=original)
    tol = tolerance if tolerance is not None else the_recipe.validate.tolerance
    return validate_paths(
        Path(original), Path(candidate), feeds, tol, opt=ort_opt,
        probabilities=probability_outputs(orig.graph),
    )


def write_json(data: object, path: Path) -> None:
    """Write JSON atomically (temp file + rename)."""
    if not path.parent.is_dir():
        raise OutputError(f"{path.parent}: report directory does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.chmod(tmp, 0o644)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, default=_json_default)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
