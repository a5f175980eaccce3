"""The terminal view of a batch: a live progress bar with per-model status, then a table.

Presentation only: it implements the runner's `Events` on a console the CLI hands in, so the CLI
stays a thin layer of options and the batch logic never imports rich.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from types import TracebackType

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from onnxshrink.batch.jobs import Job
from onnxshrink.batch.row import FAILED, MISSED, PASSED, Row
from onnxshrink.batch.runner import BatchResult

STYLE = {PASSED: "green", MISSED: "yellow", FAILED: "red"}
#: Above this many rows the final table lists only models that did not pass.
FULL_TABLE_MAX = 100


class LiveDisplay:
    """A context manager showing the bar and the models in flight; finished ones scroll above."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]batch"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
        )
        self.task = self.progress.add_task("batch", total=None, status="")
        self.running: dict[int, tuple[str, float]] = {}
        self.done: dict[str, int] = {PASSED: 0, MISSED: 0, FAILED: 0}
        self.live = Live(
            self._render(),
            console=console,
            refresh_per_second=4,
            transient=True,
            get_renderable=self._render,
        )

    def __enter__(self) -> LiveDisplay:
        self.live.__enter__()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.live.__exit__(et, ev, tb)

    def _render(self) -> Group:
        now = time.monotonic()
        table = Table.grid(padding=(0, 2))
        for name, since in list(self.running.values())[:12]:
            table.add_row("[cyan]running[/cyan]", escape(name), f"{now - since:.0f}s")
        return Group(self.progress, table)

    def _status(self) -> str:
        return "  ".join(f"[{STYLE[k]}]{k} {v}[/{STYLE[k]}]" for k, v in self.done.items())

    def planned(self, jobs: Sequence[Job], resumed: Sequence[Row]) -> None:
        """Set the total; resumed models count as done already."""
        for row in resumed:
            self.done[row.status] += 1
        self.progress.update(
            self.task, total=len(jobs), completed=len(resumed), status=self._status()
        )
        if resumed:
            self.console.print(f"resume: {len(resumed)} of {len(jobs)} models already done")

    def started(self, job: Job) -> None:
        """Show the model as running."""
        self.running[job.index] = (job.rel, time.monotonic())

    def finished(self, row: Row) -> None:
        """Print the model's one-line verdict above the bar."""
        self.running.pop(row.index, None)
        self.done[row.status] += 1
        self.progress.update(self.task, advance=1, status=self._status())
        self.console.print(line(row))


def line(row: Row) -> str:
    """One line per finished model: status, name, ratio or error, time."""
    style = STYLE[row.status]
    detail = f"{row.ratio:.3f}x" if row.ratio is not None else ""
    if row.error:
        detail = f"{detail} {row.error}".strip()
    return (
        f"[{style}]{row.status:>6}[/{style}] {escape(row.input)}  {escape(detail)}"
        f"  [dim]{row.wall_s:.1f}s[/dim]"
    )


def table(rows: Sequence[Row]) -> Table:
    """The end-of-batch table (only the models that did not pass when there are many)."""
    shown = list(rows) if len(rows) <= FULL_TABLE_MAX else [r for r in rows if r.status != PASSED]
    t = Table(title="batch summary", show_edge=False)
    for col in ("model", "status", "before", "after", "ratio", "min cosine", "time", "error"):
        left = col in ("model", "status", "error")
        t.add_column(col, justify="left" if left else "right", overflow="fold", no_wrap=not left)
    for r in shown:
        style = STYLE[r.status]
        t.add_row(
            escape(r.input),
            f"[{style}]{r.status}[/{style}]",
            _kib(r.file_bytes_before),
            _kib(r.file_bytes_after if r.status == PASSED else None),
            "-" if r.ratio is None else f"{r.ratio:.3f}x",
            "-" if r.min_cosine is None else f"{r.min_cosine:.6f}",
            f"{r.wall_s:.1f}s",
            escape(r.error[:120]),
        )
    return t


def _kib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024:,.1f} KiB"


def footer(result: BatchResult) -> str:
    """Counts and where the summary (and the HTML index) went."""
    counts = ", ".join(f"{v} {k}" for k, v in result.counts.items())
    resumed = f" ({result.resumed} resumed)" if result.resumed else ""
    index = f"; report {escape(str(result.index_html))}" if result.index_html else ""
    files = f"{escape(str(result.summary_json))}, {escape(str(result.summary_csv))}"
    return f"{len(result.rows)} models: {counts}{resumed}\nsummary: {files}{index}"
