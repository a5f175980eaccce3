"""The batch index page: one row per model, linking to each model's report."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from onnxshrink.batch.row import PASSED, STATUSES, Row
from onnxshrink.batch.summary import write_atomic
from onnxshrink.html import page, svg
from onnxshrink.html.page import fmt_bytes

#: The ratio chart shows at most this many models (the table lists all).
MAX_CHART_ROWS = 60


def render_index(rows: Sequence[Row], total: int) -> str:
    """The index as a string; `total` is the batch size (rows may be fewer if interrupted)."""
    counts = {s: sum(r.status == s for r in rows) for s in STATUSES}
    head = (
        "<h1>onnxshrink batch</h1>"
        f'<p class="meta">{len(rows)} of {total} models done: '
        + " ".join(f"{page.badge(s)} {n}" for s, n in counts.items())
        + "</p>"
    )
    chart_rows = [r for r in rows if r.ratio is not None][:MAX_CHART_ROWS]
    chart = ""
    if chart_rows:
        chart = "<h2>Size after / before</h2>" + svg.hbars(
            [r.input for r in chart_rows],
            [svg.Series("file size ratio", [r.ratio or 0.0 for r in chart_rows], svg.AFTER)],
            label="file size ratio per model",
            fmt="{:.3f}x",
        )
    table = page.table(
        [
            "model",
            "status",
            "recipe",
            "before",
            "after",
            "ratio",
            "min cosine",
            "max rel L2",
            "time",
            "error",
        ],
        [
            (
                _name(r),
                page.badge(r.status),
                r.recipe,
                fmt_bytes(r.file_bytes_before),
                fmt_bytes(r.file_bytes_after) if r.status == PASSED else "-",
                "-" if r.ratio is None else f"{r.ratio:.3f}x",
                "-" if r.min_cosine is None else f"{r.min_cosine:.6f}",
                "-" if r.max_rel_l2 is None else f"{r.max_rel_l2:.3g}",
                f"{r.wall_s:.1f}s",
                r.error,
            )
            for r in rows
        ],
        left=3,
        cls="models",
    )
    return page.document("onnxshrink batch", [head, chart, "<h2>Models</h2>", table])


def _name(row: Row) -> object:
    if row.html:
        return page.link(quote(row.html), row.input)
    return row.input


def write_index(rows: Sequence[Row], total: int, path: Path) -> Path:
    """Write the index atomically (it is rewritten when a batch resumes)."""
    write_atomic(path, render_index(rows, total))
    return path
