"""A shared input tree (sample models, nested, plus three broken files) and its reference run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from onnxshrink.batch import BatchOptions, BatchResult, run_batch
from onnxshrink.batch.summary import stable_view
from tests.batch.trees import add_broken, sample_tree


@pytest.fixture(scope="session")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/models (5 samples + broken/*) and root/samples (<stem>.npz)."""
    root = tmp_path_factory.mktemp("tree")
    add_broken(sample_tree(root))
    return root


def options(tree: Path, outdir: Path, **kw: Any) -> BatchOptions:
    """Batch options over the shared tree, with per-model samples and the lossless recipe (fast,
    exact and reproducible byte for byte; the default's latency guard times the machine)."""
    kw.setdefault("recipe", "lossless")
    return BatchOptions(outdir=outdir, inputs=(str(tree / "models"),),
                        samples_dir=tree / "samples", **kw)


@pytest.fixture(scope="session")
def reference(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> BatchResult:
    """An uninterrupted local run with one worker: what every other way of running must match."""
    return run_batch(options(tree, tmp_path_factory.mktemp("reference"), jobs=1))


def stable(summary_json: Path) -> dict[str, Any]:
    """A summary file without timings and run details."""
    return stable_view(json.loads(summary_json.read_text()))
