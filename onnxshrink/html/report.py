"""One model's HTML report: sizes, per-layer changes, what each pass did, fidelity, histograms.

Inputs are the run report plus the model files themselves: per-layer sizes and weight values are
read from the original and the compressed file (`layers`), so passes never compute anything for
reports; the histogram and sensitivity sections live in `weights`. The page is a single file
with inline CSS and SVG (no scripts, no network at view time).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from onnxshrink.html import conventions, page, svg, weights
from onnxshrink.html.layers import ModelLayers, analyse
from onnxshrink.html.page import Raw, fmt_bytes, fmt_num, fmt_ratio, fmt_value
from onnxshrink.report import RunReport

logger = logging.getLogger(__name__)

#: How many layers the per-layer bar chart shows (the table lists all of them).
MAX_BARS = 20


def write_run_report(
    report: RunReport | Mapping[str, Any],
    model: Path,
    output: Path | None,
    dest: Path,
    *,
    title: str | None = None,
) -> Path:
    """Render and write the report for one run (`output` None when it was not written)."""
    dest.write_text(render_run(report, model, output, title=title), encoding="utf-8")
    return dest


def _load(path: Path | None) -> ModelLayers | None:
    if path is None or not path.is_file():
        return None
    try:
        return analyse(path)
    except Exception as e:  # a report must not fail a run: say what is missing instead
        logger.warning("%s: cannot read layers for the report: %s", path, e)
        return None


def render_run(
    report: RunReport | Mapping[str, Any],
    model: Path,
    output: Path | None,
    *,
    title: str | None = None,
) -> str:
    """The report page as a string."""
    data = report.to_dict() if isinstance(report, RunReport) else dict(report)
    before, after = _load(model), _load(output)
    name = title or model.name
    body = [
        _header(data, name),
        _sizes(data),
        _layers(before, after),
        _passes(data),
        _validation(data),
        weights.histograms(data, before, after),
        weights.sensitivity(data),
        _timings(data),
    ]
    return page.document(f"onnxshrink: {name}", [b for b in body if b])


def _header(d: Mapping[str, Any], name: str) -> str:
    status = "passed" if d.get("ok", True) else "missed"
    return (
        f"<h1>onnxshrink report: {page.cell(name)}</h1>"
        f'<p class="meta">{page.badge(status)} recipe <b>{page.cell(d.get("recipe"))}</b> · '
        f"model <code>{page.cell(d.get('model'))}</code> · output "
        f"<code>{page.cell(d.get('output') or '(not written)')}</code> · seed "
        f"{page.cell(d.get('seed'))} · onnxshrink {page.cell(d.get('tool_version'))}</p>"
    )


def _sizes(d: Mapping[str, Any]) -> str:
    b, a = d.get("before") or {}, d.get("after") or {}
    rows = [
        (
            label,
            fmt_bytes(b.get(k)),
            fmt_bytes(a.get(k)) if a else "-",
            fmt_ratio(b.get(k), a.get(k)) if a else "-",
        )
        for label, k in (
            ("file", "file_bytes"),
            ("gzip -9", "gzip_bytes"),
            ("weights", "weight_bytes"),
        )
    ]
    rows.append(
        (
            "parameters",
            f"{b.get('params', 0):,}",
            f"{a['params']:,}" if a else "-",
            fmt_ratio(b.get("params"), a.get("params")),
        )
    )
    bd, ad = b.get("bytes_by_dtype", {}), a.get("bytes_by_dtype", {})
    dtypes = sorted(set(bd) | set(ad))
    by_dtype = [
        (
            t,
            fmt_bytes(bd.get(t, 0)),
            fmt_bytes(ad.get(t, 0)) if a else "-",
            fmt_ratio(bd.get(t), ad.get(t, 0)) if a else "-",
        )
        for t in dtypes
    ]
    chart = svg.hbars(
        dtypes,
        [
            svg.Series("before", [bd.get(t, 0) for t in dtypes], svg.BEFORE),
            svg.Series("after", [ad.get(t, 0) for t in dtypes], svg.AFTER),
        ],
        label="weight bytes by dtype",
        fmt="{:,.0f} B",
    )
    return (
        '<section id="sizes"><h2>Size</h2>'
        + page.table(["", "before", "after", "ratio"], rows)
        + "<h3>Weights by dtype</h3>"
        + page.table(["dtype", "before", "after", "ratio"], by_dtype)
        + chart
        + "</section>"
    )


def _layers(before: ModelLayers | None, after: ModelLayers | None) -> str:
    if before is None:
        return (
            '<section id="layers"><h2>Per layer</h2><p>The original model could not be read, '
            "so per-layer sizes are not available.</p></section>"
        )
    names = [n for n, lay in before.layers.items() if lay.bytes]
    if after is not None:
        names += [n for n, lay in after.layers.items() if lay.bytes and n not in before.layers]
    rows = []
    for n in names:
        lb = before.layers.get(n)
        la = after.layers.get(n) if after is not None else None
        either = lb or la
        op = either.op_type if either is not None else ""
        b_bytes = lb.bytes if lb else 0
        a_bytes = la.bytes if la else (0 if after is not None else None)
        rows.append((n, op, _dtypes(lb), _dtypes(la, after is not None), b_bytes, a_bytes))
    rows.sort(key=lambda r: (-(r[4] or 0), r[0]))
    top = rows[:MAX_BARS]
    chart = svg.hbars(
        [r[0] for r in top],
        [svg.Series("before", [r[4] for r in top], svg.BEFORE)]
        + ([svg.Series("after", [r[5] or 0 for r in top], svg.AFTER)] if after is not None else []),
        label="largest layers: weight bytes before and after",
        fmt="{:,.0f} B",
    )
    table = page.table(
        ["layer", "op", "dtypes before", "dtypes after", "bytes before", "bytes after", "ratio"],
        [
            (n, op, db, da, fmt_bytes(b), fmt_bytes(a), fmt_ratio(b, a))
            for n, op, db, da, b, a in rows
        ],
        left=4,
        cls="layers",
    )
    note = (
        ""
        if after is not None
        else "<p>The compressed model was not written, so only sizes before are shown.</p>"
    )
    extra = ""
    if before.unattributed_bytes or (after is not None and after.unattributed_bytes):
        extra = (
            f'<p class="meta">Weights used by no layer: {fmt_bytes(before.unattributed_bytes)}'
            f" before, {fmt_bytes(after.unattributed_bytes if after else None)} after.</p>"
        )
    return (
        '<section id="layers"><h2>Per layer</h2>'
        + note
        + f'<p class="meta">{len(rows)} layers with weights, largest first.</p>'
        + chart
        + table
        + extra
        + "</section>"
    )


def _dtypes(layer: Any, known: bool = False) -> str:
    if layer is None:
        return "removed" if known else "-"
    return ", ".join(sorted(layer.bytes_by_dtype)) or "-"


def _passes(d: Mapping[str, Any]) -> str:
    steps = d.get("steps", [])
    rows = [
        (
            s.get("label"),
            s.get("selected"),
            len(s.get("touched", {})),
            len(s.get("skipped", [])),
            fmt_bytes(s.get("weight_bytes_before")),
            fmt_bytes(s.get("weight_bytes_after")),
            "; ".join(s.get("warnings", [])) or "",
        )
        for s in steps
    ]
    parts = [
        '<section id="passes"><h2>What each pass did</h2>',
        page.table(
            [
                "step",
                "selected",
                "changed",
                "skipped",
                "weights before",
                "weights after",
                "warnings",
            ],
            rows,
        ),
    ]
    acts = conventions.actions(d)
    if acts:
        labels = [s.get("label") for s in steps]
        matrix = [(node, *[_action(acts[node].get(lab)) for lab in labels]) for node in acts]
        parts += [
            "<h3>Per layer</h3>",
            page.table(["layer", *labels], matrix, left=1 + len(labels)),
        ]
    else:
        parts.append("<p>No step changed or skipped a layer.</p>")
    for s in steps:
        if s.get("stats"):
            parts.append(
                f"<details><summary>step {page.cell(s.get('label'))} statistics</summary>"
                f"<code>{page.cell(fmt_value(s['stats']))}</code></details>"
            )
    return "".join(parts) + "</section>"


def _action(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return fmt_value(dict(value)) if value else "changed"


def _validation(d: Mapping[str, Any]) -> str:
    n = d.get("numerics")
    if not n:
        return '<section id="validation"><h2>Validation</h2><p>Not validated.</p></section>'
    rows = [
        (
            o["name"],
            page.badge("ok" if o.get("ok") else "bad"),
            fmt_num(o.get("max_abs")),
            fmt_num(o.get("rel_l2")),
            fmt_num(o.get("cosine"), 6),
            fmt_num(o.get("snr_db")),
            "-" if o.get("top1") is None else fmt_num(o["top1"]),
            "; ".join(o.get("failures", [])),
        )
        for o in n.get("outputs", [])
    ]
    return (
        '<section id="validation"><h2>Validation</h2>'
        f'<p class="meta">{n.get("samples")} samples from <code>{page.cell(n.get("feeds_source"))}'
        f"</code>, onnxruntime {page.cell(n.get('ort_version'))} (optimization "
        f"{page.cell(n.get('ort_opt'))}); tolerance "
        f"<code>{page.cell(fmt_value(n.get('tolerance', {})))}"
        "</code></p>"
        + page.table(
            ["output", "verdict", "max abs", "rel L2", "cosine", "SNR dB", "top-1", "failures"],
            rows,
            left=2,
        )
        + "</section>"
    )


def _timings(d: Mapping[str, Any]) -> str:
    t = d.get("timings") or {}
    if not t:
        return ""
    text = ", ".join(f"{k.removesuffix('_s')} {v:.2f}s" for k, v in t.items())
    return f'<footer><p class="meta">time: {page.cell(text)}</p></footer>'


__all__ = ["Raw", "render_run", "write_run_report"]
