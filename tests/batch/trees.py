"""Input trees for batch tests: the sample models in nested folders, and broken files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx

from tests.conftest import SAMPLE_NAMES, SAMPLES

#: Where each sample model goes in the test tree (nested, so mirroring is exercised).
LAYOUT = {
    "cnn": "vision/cnn.onnx",
    "mlp": "tabular/deep/mlp.onnx",
    "transformer": "text/transformer.onnx",
    "control_flow": "control_flow.onnx",
    "fp16": "fp16.onnx",
}
BROKEN = ("broken/truncated.onnx", "broken/random_bytes.onnx", "broken/fails_checker.onnx")


def sample_tree(root: Path) -> Path:
    """Copy the sample models into `root/models` (nested) and their samples into `root/samples`."""
    models, samples = root / "models", root / "samples"
    samples.mkdir(parents=True)
    for name in SAMPLE_NAMES:
        dest = models / LAYOUT[name]
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SAMPLES / f"{name}.onnx", dest)
        shutil.copy(SAMPLES / f"{name}.npz", samples / f"{name}.npz")
    return models


def add_broken(models: Path) -> list[Path]:
    """Three files that are not usable models, each broken in a different way."""
    (models / "broken").mkdir(parents=True, exist_ok=True)
    good = (SAMPLES / "cnn.onnx").read_bytes()
    truncated, random_bytes, bad = (models / p for p in BROKEN)
    truncated.write_bytes(good[: len(good) // 2])
    random_bytes.write_bytes(np.random.default_rng(0).bytes(4096))
    model = onnx.load(str(SAMPLES / "mlp.onnx"))
    # A node reading a tensor nothing produces: parses fine, fails onnx.checker.
    model.graph.node.append(
        onnx.NodeProto(op_type="Relu", name="dangling", input=["nowhere"], output=["dangling_out"])
    )
    bad.write_bytes(model.SerializeToString())
    return [truncated, random_bytes, bad]


def output_bytes(outdir: Path) -> dict[str, bytes]:
    """Every model output (and external data file) under `outdir`, by relative path."""
    return {
        p.relative_to(outdir).as_posix(): p.read_bytes()
        for p in sorted(outdir.rglob("*"))
        if p.is_file() and (p.suffix == ".onnx" or p.name.endswith(".onnx.data"))
    }
