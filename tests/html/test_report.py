"""HTML run reports and the batch index: content, hooks for codebooks and sensitivity, safety."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from onnxshrink import compress
from onnxshrink.batch.row import Row
from onnxshrink.cli import app
from onnxshrink.html import render_run
from onnxshrink.html.index import render_index
from tests.conftest import SAMPLES


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("cnn") / "cnn.onnx"
    report = compress(SAMPLES / "cnn.onnx", None, out, samples=SAMPLES / "cnn.npz")
    return report.to_dict(), out


def _sections(html: str) -> set[str]:
    return set(re.findall(r'<section id="([a-z]+)"', html))


def test_report_shows_sizes_layers_passes_validation_and_histograms(
    cnn_run: tuple[dict[str, Any], Path],
) -> None:
    data, out = cnn_run
    html = render_run(data, SAMPLES / "cnn.onnx", out)
    assert _sections(html) == {"sizes", "layers", "passes", "validation", "weights"}
    assert html.count("<svg") >= 2 + 12  # dtype and layer charts, then 12 histograms
    assert "folded into block1.0.conv" in html  # what graph.cleanup did to a layer
    assert "removed" in html  # the folded BatchNorms are gone after
    assert "block2.1.conv" in html and "logits" in html
    assert "centroid" not in html.split("<section id=\"weights\">")[1].split("</p>")[1]
    assert not re.search(r"(src|href)=\"?(https?:)?//", html)  # nothing fetched at view time
    assert "<script" not in html


def test_codebook_centroids_and_sensitivity_are_drawn_when_a_report_carries_them(
    cnn_run: tuple[dict[str, Any], Path],
) -> None:
    data, out = cnn_run
    data = {**data, "steps": [dict(s) for s in data["steps"]]}
    step = data["steps"][0]
    step["touched"] = {**step["touched"],
                       "head.fc": {"clusters": 4, "centroids": [-0.2, -0.05, 0.05, 0.2]}}
    step["stats"] = {"codebook": {"block1.0.conv": [[-0.1, 0.1], [0.0, 0.3]]},
                     "sensitivity": {"stem.conv": {"rel_l2": 0.4, "cosine_drop": 0.01},
                                     "head.fc": 0.02}}
    html = render_run(data, SAMPLES / "cnn.onnx", out)
    assert "sensitivity" in _sections(html)
    assert html.count('class="centroid"') == 4 + 4
    assert "4 centroids" in html
    figures = re.findall(r"<figure><h3>([^<]+)</h3>", html)
    assert figures[:2] == ["block1.0.conv", "head.fc"]  # layers with codebooks come first


def test_report_without_output_or_validation_still_renders(
    cnn_run: tuple[dict[str, Any], Path], tmp_path: Path,
) -> None:
    data, _ = cnn_run
    data = {**data, "numerics": None, "after": None, "output": None, "ok": True}
    html = render_run(data, SAMPLES / "cnn.onnx", None, title="<img src=x onerror=alert(1)>")
    assert "Not validated" in html and "was not written" in html
    assert "<img src=x" not in html and "&lt;img src=x" in html


def test_cli_compress_html_writes_a_report(tmp_path: Path) -> None:
    html = tmp_path / "report.html"
    res = CliRunner().invoke(app, ["compress", str(SAMPLES / "mlp.onnx"), "-o",
                                   str(tmp_path / "mlp.onnx"), "--html", str(html)])
    assert res.exit_code == 0, res.output
    text = html.read_text()
    assert text.startswith("<!DOCTYPE html>") and "fc1" in text and "<svg" in text


def test_index_links_each_model_report_and_shows_failures() -> None:
    rows = [
        Row(index=0, input="a b/m1.onnx", status="passed", html="a b/m1.html", recipe="default",
            file_bytes_before=1000, file_bytes_after=250, ratio=0.25, min_cosine=0.9999),
        Row(index=1, input="bad.onnx", status="failed", error_kind="model",
            error="bad.onnx: not an ONNX model <oops>"),
    ]
    html = render_index(rows, total=3)
    assert '<a href="a%20b/m1.html">a b/m1.onnx</a>' in html
    assert "2 of 3 models done" in html
    assert "not an ONNX model &lt;oops&gt;" in html
    assert html.count("<tr>") == 3 and "<svg" in html
