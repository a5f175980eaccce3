"""The HTML reports in a real browser: headless Chromium loads them offline, without errors.

Skips (with the reason) where Chromium is not installed; `.ci/run` installs Debian's package.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from onnxshrink import compress
from onnxshrink.batch.row import Row
from onnxshrink.html import write_run_report
from onnxshrink.html.index import write_index
from tests.conftest import SAMPLES

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]


@pytest.fixture(scope="module")
def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("Chromium is not installed (apt-get install chromium): browser check skipped")


def _run(chromium: str, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [chromium, *FLAGS, f"--user-data-dir={tmp / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pages")
    out = root / "cnn.onnx"
    report = compress(SAMPLES / "cnn.onnx", None, out, samples=SAMPLES / "cnn.npz")
    data = report.to_dict()
    data["steps"][0]["stats"] = {"centroids": {"head.fc": [-0.1, 0.0, 0.1]},
                                 "sensitivity": {"stem.conv": 0.3, "head.fc": 0.1}}
    write_run_report(data, SAMPLES / "cnn.onnx", out, root / "cnn.html")
    rows = [Row(index=0, input="cnn.onnx", status="passed", html="cnn.html", ratio=0.97,
                file_bytes_before=100, file_bytes_after=97),
            Row(index=1, input="bad.onnx", status="failed", error="not an ONNX model")]
    write_index(rows, 2, root / "index.html")
    (root / "blank.html").write_text("<!DOCTYPE html><html><body></body></html>")
    return {"report": root / "cnn.html", "index": root / "index.html",
            "blank": root / "blank.html"}


def _console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines()
            if "CONSOLE" in line or "Uncaught" in line or "net::ERR" in line]


def test_report_loads_with_tables_and_svg_plots(chromium: str, pages: dict[str, Path],
                                                tmp_path: Path) -> None:
    res = _run(chromium, tmp_path, "--dump-dom", pages["report"].as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    dom = res.stdout
    assert "<title>onnxshrink: cnn.onnx</title>" in dom
    for section in ("sizes", "layers", "passes", "validation", "weights", "sensitivity"):
        assert f'<section id="{section}">' in dom
    assert dom.count("<table") >= 6 and dom.count("<svg") >= 10
    assert dom.count('class="centroid"') == 3
    assert _console_errors(res.stderr) == []


def test_index_loads_and_links_reports(chromium: str, pages: dict[str, Path],
                                       tmp_path: Path) -> None:
    res = _run(chromium, tmp_path, "--dump-dom", pages["index"].as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    assert '<a href="cnn.html">cnn.onnx</a>' in res.stdout and "<svg" in res.stdout
    assert _console_errors(res.stderr) == []


def test_report_screenshot_is_not_blank(chromium: str, pages: dict[str, Path],
                                        tmp_path: Path) -> None:
    shots = {}
    for name in ("report", "blank"):
        png = tmp_path / f"{name}.png"
        res = _run(chromium, tmp_path, "--window-size=1200,2400", f"--screenshot={png}",
                   pages[name].as_uri())
        assert res.returncode == 0 and png.is_file(), res.stderr[-2000:]
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        shots[name] = len(data)
    # A white page compresses to a few KB; tables, text and plots cannot.
    assert shots["report"] > 10 * shots["blank"], shots
