"""Self-contained HTML reports: one page per run, an index page per batch.

`report` renders a run (sizes, per-layer changes read from the model files, what each pass did,
validation) with `weights` adding histograms with codebook centroids and sensitivity; `index`
renders a batch;
`svg` draws the charts; `layers`/`decode` read per-layer weights; `conventions` finds per-layer
facts in reports by convention; `page` holds the shared HTML shell.
"""

from onnxshrink.html.report import render_run, write_run_report

__all__ = ["render_run", "write_run_report"]
