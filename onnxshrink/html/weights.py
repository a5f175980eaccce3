"""The weight sections of a run report: histograms (with codebook centroids) and sensitivity.

Weights are read from the model files through `layers.ModelLayers.weight`, decoded the way each
layer consumes them; centroids and sensitivity come from the report by the conventions in
`conventions`, so these sections appear only when a run recorded something to show.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from onnxshrink.html import conventions, page, svg
from onnxshrink.html.decode import Unsupported
from onnxshrink.html.layers import ModelLayers
from onnxshrink.html.page import fmt_num

#: How many layers get a weight histogram (layers with codebooks first, then the largest).
MAX_HISTOGRAMS = 12
#: How many layers the sensitivity chart shows (the table lists all of them).
MAX_BARS = 20
#: Histogram bins, and the most values a histogram reads (larger weights are strided).
BINS = 60
MAX_VALUES = 4_000_000
#: More centroids than this are counted in the caption but not drawn.
MAX_MARKERS = 256


def _values(model: ModelLayers | None, layer: str) -> tuple[np.ndarray | None, str]:
    if model is None or layer not in model.layers:
        return None, ""
    try:
        values = model.weight(layer).ravel()
    except (KeyError, Unsupported) as e:
        return None, str(e)
    values = values[np.isfinite(values)]
    if values.size > MAX_VALUES:
        values = values[:: values.size // MAX_VALUES + 1]
    return values, ""


def histograms(d: Mapping[str, Any], before: ModelLayers | None, after: ModelLayers | None) -> str:
    codebooks = conventions.centroids(d)
    pool = before or after
    if pool is None:
        return ""
    sized = sorted(
        (lay for lay in pool.layers.values() if lay.main_input), key=lambda lay: -lay.params
    )
    chosen = [n for n in pool.layers if n in codebooks] + [lay.name for lay in sized]
    chosen = list(dict.fromkeys(chosen))[:MAX_HISTOGRAMS]
    figures = []
    for name in chosen:
        vb, why_b = _values(before, name)
        va, why_a = _values(after, name)
        if vb is None and va is None:
            continue
        figures.append(_figure(name, vb, va, codebooks.get(name, []), why_a or why_b))
    if not figures:
        return ""
    return (
        '<section id="weights"><h2>Weight histograms</h2><p class="meta">Grey bars: original '
        "weights; blue line: weights as the compressed layer computes with them (decoded); "
        "red dashes: codebook centroids where weight sharing ran.</p>"
        f'<div class="grid">{"".join(figures)}</div></section>'
    )


def _figure(
    name: str, vb: np.ndarray | None, va: np.ndarray | None, marks: list[float], note: str
) -> str:
    present = [v for v in (vb, va) if v is not None and v.size]
    if not present:
        return ""
    lo = min(float(v.min()) for v in present)
    hi = max(float(v.max()) for v in present)
    if hi <= lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, BINS + 1)
    series = []
    if vb is not None:
        series.append(svg.Series("before", np.histogram(vb, edges)[0].tolist(), svg.BEFORE))
    if va is not None:
        series.append(svg.Series("after", np.histogram(va, edges)[0].tolist(), svg.AFTER))
    chart = svg.histogram(
        edges.tolist(),
        series,
        markers=marks if len(marks) <= MAX_MARKERS else [],
        label=f"weight histogram of {name}",
    )
    facts = []
    if vb is not None:
        facts.append(f"before: {vb.size:,} values, {np.unique(vb).size:,} distinct")
    if va is not None:
        facts.append(
            f"after: {va.size:,} values, {np.unique(va).size:,} distinct, "
            f"{float(np.mean(va == 0)):.1%} zeros"
        )
    if marks:
        facts.append(f"{len(marks)} centroids")
    if note:
        facts.append(note)
    return (
        f"<figure><h3>{page.cell(name)}</h3>{chart}"
        f"<figcaption>{page.cell('; '.join(facts))}</figcaption></figure>"
    )


def sensitivity(d: Mapping[str, Any]) -> str:
    sens = conventions.sensitivity(d)
    if not sens:
        return ""
    metrics = sorted({m for v in sens.values() for m in v})
    first = metrics[0]
    ordered = sorted(sens, key=lambda n: -sens[n].get(first, 0.0))
    chart = svg.hbars(
        ordered[:MAX_BARS],
        [svg.Series(first, [sens[n].get(first, 0.0) for n in ordered[:MAX_BARS]], svg.AFTER)],
        label=f"per-layer sensitivity ({first})",
        fmt="{:.3g}",
    )
    rows = [
        (n, *[fmt_num(sens[n].get(m)) if m in sens[n] else "-" for m in metrics]) for n in ordered
    ]
    return (
        '<section id="sensitivity"><h2>Per-layer sensitivity</h2>'
        f'<p class="meta">As measured during the run, most sensitive first (by {page.cell(first)}).'
        "</p>" + chart + page.table(["layer", *metrics], rows) + "</section>"
    )
