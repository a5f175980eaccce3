"""The `onnxshrink` command: parse options, call the API, render with rich, map errors to codes.

No logic lives here beyond presentation. Exit codes: 0 ok, 1 error, 2 usage, 3 numerics outside
tolerance, 4 bad model, 5 bad recipe, 6 bad samples, 7 cannot write output.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from onnxshrink import api, passes
from onnxshrink._version import __version__
from onnxshrink.errors import NumericsError, OnnxShrinkError, RuleError
from onnxshrink.ir.stats import summarize
from onnxshrink.recipe.loader import load_recipe, shipped_names
from onnxshrink.report import RunReport, SizeReport
from onnxshrink.validate.compare import OutputMetrics
from onnxshrink.validate.runner import NumericReport

app = typer.Typer(
    help="Shrink ONNX models and prove they still behave like the original.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
rules_app = typer.Typer(help="Work with recipe files.", no_args_is_help=True)
app.add_typer(rules_app, name="rules")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
_state = {"debug": False}

RulesOpt = Annotated[
    Optional[str],  # noqa: UP045 (typer needs Optional on 3.10)
    typer.Option("--rules", "-r", help="Recipe: a .toml path or a shipped name (`rules list`)."),
]
SamplesOpt = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option("--samples", "-s", help=".npz (input names, leading sample axis) or a folder "
                 "of test_data_set_*/input_N.pb. Default: the recipe's, else seeded random."),
]
DimOpt = Annotated[
    Optional[list[str]],  # noqa: UP045
    typer.Option("--dim", help="Size of a dynamic dimension for random samples: NAME=N or "
                 "INPUT:AXIS=N (repeatable)."),
]
OptLevelOpt = Annotated[
    str, typer.Option("--ort-opt", help="onnxruntime optimization level used to validate: "
                      "all (what you deploy), extended, basic, none.")
]
HtmlOpt = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option("--html", help="Also write a self-contained HTML report (sizes per layer and "
                 "dtype, what each pass did, validation, weight histograms) to this path."),
]


def _version(value: bool) -> None:
    if value:
        out.print(f"onnxshrink {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log each step.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    """onnxshrink: prune, quantize, share and distill ONNX models, validated with onnxruntime."""
    _state["debug"] = debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@contextmanager
def _errors() -> Iterator[None]:
    """One red line and a distinct exit code instead of a traceback."""
    try:
        yield
    except OnnxShrinkError as e:
        if _state["debug"]:
            raise
        err.print(f"[red]error:[/red] {escape(_one_line(str(e)))}")
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        err.print("[red]interrupted[/red]")
        raise typer.Exit(130) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as e:
        if _state["debug"]:
            raise
        err.print(f"[red]internal error:[/red] {type(e).__name__}: {escape(_one_line(str(e)))} "
                  "(rerun with --debug for the traceback)")
        raise typer.Exit(1) from None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _dims(values: list[str] | None) -> dict[str, int]:
    dims = {}
    for item in values or []:
        name, sep, value = item.rpartition("=")
        if not sep or not name or not value.isdigit():
            raise typer.BadParameter(f"--dim wants NAME=N or INPUT:AXIS=N, got {item!r}")
        dims[name] = int(value)
    return dims


def _opt(level: str) -> Any:
    if level not in ("all", "extended", "basic", "none"):
        raise typer.BadParameter(f"--ort-opt must be all, extended, basic or none, got {level!r}")
    return level


@app.command()
def compress(
    model: Annotated[Path, typer.Argument(help="The ONNX model to shrink (never modified).")],
    rules: RulesOpt = None,
    output: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--output", "-o", help="Output model (default: MODEL.shrunk.onnx)."),
    ] = None,
    samples: SamplesOpt = None,
    report: Annotated[
        Optional[Path], typer.Option("--report", help="Write the run report as JSON here.")  # noqa: UP045
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for every random choice.")] = 0,
    no_validate: Annotated[
        bool, typer.Option("--no-validate", help="Skip the onnxruntime comparison.")
    ] = False,
    check_each_step: Annotated[
        bool, typer.Option("--check-each-step", help="Check and validate after every step.")
    ] = False,
    keep_failed: Annotated[
        bool, typer.Option("--keep-failed", help="Write the output even when it misses the "
                           "tolerance (exit code is still 3).")
    ] = False,
    dim: DimOpt = None,
    ort_opt: OptLevelOpt = "all",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    html: HtmlOpt = None,
) -> None:
    """Run a recipe on MODEL, validate the result with onnxruntime, write it and a report."""
    dims, level = _dims(dim), _opt(ort_opt)  # usage errors (exit 2) before any work
    with _errors():
        result = api.compress(
            model, rules, output, samples=samples, seed=seed, validate=not no_validate,
            dims=dims, check_each_step=check_each_step, ort_opt=level,
            report_path=report, keep_failed=keep_failed,
        )
        if html is not None:
            from onnxshrink.html import write_run_report

            write_run_report(result, model, Path(result.output) if result.output else None, html)
        if as_json:
            out.print_json(json.dumps(result.to_dict()))
        else:
            _render_run(result)
        if not result.ok:
            numerics = result.numerics.outputs if result.numerics else []
            failed = [o.name for o in numerics if not o.ok]
            note = "output kept" if keep_failed else "output not written (--keep-failed keeps it)"
            raise NumericsError(f"outputs {failed} are outside the recipe's tolerance; {note}")


@app.command()
def validate(
    original: Annotated[Path, typer.Argument(help="The reference model.")],
    candidate: Annotated[Path, typer.Argument(help="The model to check against it.")],
    rules: RulesOpt = None,
    samples: SamplesOpt = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for random samples.")] = None,  # noqa: UP045
    dim: DimOpt = None,
    ort_opt: OptLevelOpt = "all",
    as_json: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON.")] = False,
) -> None:
    """Compare CANDIDATE with ORIGINAL on the same inputs (exit 3 when outside tolerance)."""
    dims, level = _dims(dim), _opt(ort_opt)
    with _errors():
        rep = api.validate(original, candidate, samples=samples, recipe=rules, seed=seed,
                           dims=dims, ort_opt=level)
        if as_json:
            body = dataclasses.asdict(rep)
            body["ok"] = rep.ok
            out.print_json(json.dumps(body, default=str))
        else:
            _render_numerics(rep)
        if not rep.ok:
            raise NumericsError("outputs are outside the tolerance")


@app.command()
def inspect(
    model: Annotated[Path, typer.Argument(help="The ONNX model to describe.")],
    top: Annotated[int, typer.Option(help="How many of the largest layers to list.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Opset, inputs/outputs, parameters and bytes per dtype, op type and largest layers."""
    with _errors():
        s = summarize(model, top=top)
        if as_json:
            out.print_json(json.dumps(dataclasses.asdict(s)))
            return
        out.print(f"[bold]{escape(s.path)}[/bold]  ir {s.ir_version}, opsets {s.opsets}, "
                  f"producer {escape(s.producer or '-')}")
        out.print(f"inputs:  {escape('; '.join(s.inputs))}")
        out.print(f"outputs: {escape('; '.join(s.outputs))}")
        out.print(f"{s.nodes} nodes, {s.subgraphs} subgraphs, {s.params:,} parameters, "
                  f"{_mb(s.weight_bytes)} of weights, {_mb(s.file_bytes)} on disk"
                  + (", external data" if s.external_data else ""))
        out.print(_kv_table("bytes by dtype", {k: _mb(v) for k, v in s.bytes_by_dtype.items()}))
        t = Table(title="by op type", show_edge=False)
        for col in ("op", "count", "params", "bytes"):
            t.add_column(col, justify="left" if col == "op" else "right")
        for op, v in s.by_op_type.items():
            t.add_row(op, str(v["count"]), f"{v['params']:,}", _mb(v["bytes"]))
        out.print(t)
        t = Table(title="largest layers", show_edge=False)
        for col in ("node", "op", "params", "bytes"):
            t.add_column(col, justify="left" if col in ("node", "op") else "right")
        for layer in s.largest:
            t.add_row(escape(layer.name), layer.op_type, f"{layer.params:,}", _mb(layer.bytes))
        out.print(t)


@app.command("passes")
def passes_cmd(
    name: Annotated[Optional[str], typer.Argument(help="Show one pass in detail.")] = None,  # noqa: UP045
) -> None:
    """List the passes recipes can use, or one pass's parameters and documentation."""
    with _errors():
        names = passes.names() if name is None else [name]
        for n in names:
            if n not in passes.names():
                raise RuleError(f"unknown pass {n!r} (known: {', '.join(passes.names())})")
            cls = passes.get(n)
            doc = (cls.__doc__ or "").strip()
            out.print(f"[bold]{n}[/bold]  {escape(doc.splitlines()[0] if doc else '')}")
            if name is None:
                continue
            out.print(escape(doc))
            t = Table(show_edge=False)
            for col in ("parameter", "type", "default"):
                t.add_column(col)
            defaults = cls.params_type()
            for field, tp in cls.params_type.field_types().items():
                t.add_row(field, _type_name(tp), repr(getattr(defaults, field)))
            out.print(t)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


@rules_app.command("check")
def rules_check(
    files: Annotated[list[str], typer.Argument(help="Recipe files or shipped names.")],
) -> None:
    """Validate recipe files without loading any model."""
    with _errors():
        for f in files:
            recipe = load_recipe(f)
            from onnxshrink import pipeline

            planned = pipeline.plan(recipe)
            out.print(f"[green]ok[/green] {escape(recipe.source)}: {escape(recipe.name)}, "
                      f"{len(planned.steps)} step(s): "
                      + escape(", ".join(s.label for s in planned.steps)))


@rules_app.command("list")
def rules_list() -> None:
    """The recipes shipped with onnxshrink (usable as `-r NAME`)."""
    with _errors():
        for name in shipped_names():
            recipe = load_recipe(name)
            out.print(f"[bold]{name}[/bold]  {escape(recipe.description)}")


@app.command()
def batch(
    inputs: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Argument(help="Model files, folders (searched recursively for *.onnx) and globs "
                       "(quote them). Outputs mirror their tree under OUTDIR."),
    ] = None,
    outdir: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--output", "-o", help="Output folder (created if missing). Required."),
    ] = None,
    rules: RulesOpt = None,
    jobs: Annotated[
        int, typer.Option("--jobs", "-j", help="Models run at once, each in its own process.")
    ] = 1,
    resume: Annotated[
        bool, typer.Option("--resume", help="Skip models whose output is already complete and "
                           "valid for the same input bytes and settings.")
    ] = False,
    timeout: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option("--timeout", help="Seconds per model; a model past it is killed and fails."),
    ] = None,
    samples: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--samples", "-s", help="Folder of per-model samples found by model name "
                     "(DIR/<name>.npz or DIR/<name>/test_data_set_*), else the recipe's default."),
    ] = None,
    manifest: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--manifest", help="TOML file mapping models to recipes, samples and "
                     "tolerances, instead of INPUTS (format: docs/batch.md)."),
    ] = None,
    html: Annotated[
        bool, typer.Option("--html", help="Write an HTML report per model and OUTDIR/index.html.")
    ] = False,
    scheduler: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--scheduler", help="Run on a Dask cluster, e.g. tcp://HOST:8786 "
                     "(pip install 'onnxshrink[dask]'; workers must see the same paths)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for every random choice.")] = 0,
    no_validate: Annotated[
        bool, typer.Option("--no-validate", help="Skip the onnxruntime comparison.")
    ] = False,
    fail_fast: Annotated[
        bool, typer.Option("--fail-fast", help="Start no new model after the first failure.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print summary.json at the end.")] = False,
) -> None:
    """Compress many models, each in its own process; write OUTDIR/summary.json and .csv.

    Exit code: 0 every model passed; 1 some model failed (unreadable, error, crash, timeout);
    3 none failed but some missed the recipe's tolerance; 130 interrupted (rerun with --resume).
    """
    from onnxshrink.batch import BatchOptions, display, run_batch

    if outdir is None:
        raise typer.BadParameter("an output folder is required", param_hint="'--output' / '-o'")
    with _errors():
        options = BatchOptions(
            outdir=outdir, inputs=tuple(inputs or ()), recipe=rules, manifest=manifest,
            samples_dir=samples, jobs=jobs, timeout=timeout, resume=resume, html=html, seed=seed,
            validate=not no_validate, scheduler=scheduler, fail_fast=fail_fast,
        )
        with _sigterm_interrupts(), display.LiveDisplay(err) as live:
            result = run_batch(options, live)
        if as_json:
            out.print_json(result.summary_json.read_text(encoding="utf-8"))
        else:
            out.print(display.table(result.rows))
            out.print(display.footer(result))
        if result.exit_code:
            raise typer.Exit(result.exit_code)


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Treat SIGTERM (kill, job schedulers) like Ctrl-C: the summary is written on the way out."""
    import signal

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------- rendering


def _mb(n: int | float) -> str:
    if n < 1024:
        return f"{int(n)} B"
    if n < 1 << 20:
        return f"{n / 1024:.1f} KiB"
    return f"{n / (1 << 20):.2f} MiB"


def _kv_table(title: str, rows: dict[str, Any]) -> Table:
    t = Table(title=title, show_header=False, show_edge=False)
    t.add_column("key")
    t.add_column("value", justify="right")
    for k, v in rows.items():
        t.add_row(k, str(v))
    return t


def _ratio(a: int, b: int) -> str:
    return f"{b / a:.3f}x" if a else "-"


def _render_run(r: RunReport) -> None:
    out.print(f"[bold]{escape(r.model)}[/bold] -> {escape(r.output or '(not written)')}  "
              f"recipe {escape(r.recipe)}")
    _render_sizes(r.before, r.after)
    t = Table(title="steps", show_edge=False)
    for col in ("step", "selected", "changed", "skipped", "weights", "time"):
        t.add_column(col, justify="left" if col == "step" else "right")
    for s in r.steps:
        t.add_row(s.label, str(s.selected), str(len(s.touched)), str(len(s.skipped)),
                  f"{_mb(s.weight_bytes_before)} -> {_mb(s.weight_bytes_after)}",
                  f"{s.duration_s:.2f}s")
    out.print(t)
    for s in r.steps:
        for w in s.warnings:
            out.print(f"[yellow]step {s.label}: {escape(w)}[/yellow]")
        reasons: dict[str, int] = {}
        for sk in s.skipped:
            reasons[sk["reason"]] = reasons.get(sk["reason"], 0) + 1
        for reason, count in reasons.items():
            out.print(f"  step {s.label}: skipped {count} node(s): {escape(reason)}")
    if r.numerics is not None:
        _render_numerics(r.numerics)
    out.print("time: " + ", ".join(f"{k[:-2]} {v:.2f}s" for k, v in r.timings.items()))


def _render_sizes(before: SizeReport, after: SizeReport | None) -> None:
    t = Table(title="size", show_edge=False)
    for col in ("", "before", "after", "ratio"):
        t.add_column(col, justify="left" if not col else "right")
    rows: list[tuple[str, Callable[[SizeReport], int]]] = [
        ("file", lambda s: s.file_bytes),
        ("gzip -9" + (" (est.)" if before.gzip_estimated or (after and after.gzip_estimated)
                      else ""), lambda s: s.gzip_bytes),
        ("weights", lambda s: s.weight_bytes),
    ]
    for label, get in rows:
        a, b = get(before), get(after) if after else 0
        t.add_row(label, _mb(a), _mb(b) if after else "-", _ratio(a, b) if after else "-")
    dtypes = sorted(set(before.bytes_by_dtype) | set(after.bytes_by_dtype if after else {}))
    for d in dtypes:
        a = before.bytes_by_dtype.get(d, 0)
        b = after.bytes_by_dtype.get(d, 0) if after else 0
        t.add_row(f"  {d}", _mb(a), _mb(b) if after else "-", _ratio(a, b) if after else "-")
    out.print(t)


def _verdict(o: OutputMetrics) -> str:
    if not o.ok:
        return escape("; ".join(o.failures))
    return "ok (prob_atol)" if o.within_prob_atol else "ok"


def _render_numerics(n: NumericReport) -> None:
    verdict = "[green]within tolerance[/green]" if n.ok else "[red]OUTSIDE tolerance[/red]"
    out.print(f"validation vs {escape(n.reference)}: {n.samples} samples from "
              f"{escape(n.feeds_source)}, "
              f"onnxruntime {n.ort_version} (opt {n.ort_opt}): {verdict}")
    t = Table(show_edge=False)
    for col in ("output", "max_abs", "rel_l2", "cosine", "snr_db", "top1", "verdict"):
        t.add_column(col, justify="left" if col in ("output", "verdict") else "right")
    for o in n.outputs:
        t.add_row(escape(o.name), f"{o.max_abs:.3g}", f"{o.rel_l2:.3g}", f"{o.cosine:.6f}",
                  f"{o.snr_db:.1f}", "-" if o.top1 is None else f"{o.top1:.3f}",
                  _verdict(o))
    out.print(t)
    out.print(f"tolerance: {n.tolerance}")
    if n.session_config:
        out.print(f"compressed model validated with session options {n.session_config}")
