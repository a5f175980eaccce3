"""Shared fixtures: sample model paths, a scratch dir, hypothesis profiles."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
SAMPLE_NAMES = ["cnn", "mlp", "transformer", "control_flow", "fp16"]

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=50)
settings.register_profile("dev", deadline=None, max_examples=100)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(params=SAMPLE_NAMES)
def sample_model(request: pytest.FixtureRequest) -> tuple[Path, Path]:
    """(model, samples) for each shipped sample model."""
    name = request.param
    return SAMPLES / f"{name}.onnx", SAMPLES / f"{name}.npz"
