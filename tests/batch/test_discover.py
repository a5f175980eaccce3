"""Inputs -> models with mirrored names, and per-model samples lookup (no model is run)."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from onnxshrink.batch.discover import discover
from onnxshrink.batch.jobs import find_samples
from onnxshrink.errors import ModelError


def _touch(root: Path, *rels: str) -> None:
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")


def _rels(found: list) -> list[str]:  # type: ignore[type-arg]
    return [str(f.rel) for f in found]


def test_folder_is_recursive_and_mirrored(tmp_path: Path) -> None:
    _touch(tmp_path, "m/a.onnx", "m/sub/b.onnx", "m/sub/deeper/c.onnx", "m/notes.txt",
           "m/a.onnx.data")
    assert _rels(discover([str(tmp_path / "m")])) == ["a.onnx", "sub/b.onnx", "sub/deeper/c.onnx"]


def test_files_and_globs_share_one_root_and_order_is_canonical(tmp_path: Path) -> None:
    _touch(tmp_path, "x/a.onnx", "y/z/b.onnx", "y/z/c.onnx", "y/z/skip.bin")
    one = discover([str(tmp_path / "y/z/*.onnx"), str(tmp_path / "x/a.onnx")])
    two = discover([str(tmp_path / "x/a.onnx"), str(tmp_path / "y/**/*.onnx")])
    assert _rels(one) == _rels(two) == ["x/a.onnx", "y/z/b.onnx", "y/z/c.onnx"]


def test_relative_specs_resolve_against_base_and_duplicates_collapse(tmp_path: Path) -> None:
    _touch(tmp_path, "m/a.onnx", "m/b.onnx")
    found = discover(["m", "m/a.onnx", "m/*.onnx"], base=tmp_path)
    assert _rels(found) == ["a.onnx", "b.onnx"]
    assert all(f.path.is_absolute() for f in found)


def test_output_folder_and_scratch_folders_are_never_inputs(tmp_path: Path) -> None:
    _touch(tmp_path, "m/a.onnx", "m/out/a.onnx", "m/.onnxshrink-staging/1/a.onnx")
    assert _rels(discover([str(tmp_path / "m")], exclude=[tmp_path / "m" / "out"])) == ["a.onnx"]


def test_missing_inputs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="nope: no such file or folder"):
        discover(["nope"], base=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"matched no \.onnx files"):
        discover([str(tmp_path / "empty")])
    with pytest.raises(ModelError, match="matched no"):
        discover([str(tmp_path / "*.onnx")])


def test_samples_found_by_mirrored_name_then_by_stem(tmp_path: Path) -> None:
    samples = tmp_path / "s"
    _touch(samples, "cnn.npz", "sub/mlp.npz", "mlp.npz", "bert/test_data_set_0/input_0.pb")
    (samples / "empty").mkdir()
    model = tmp_path / "m" / "sub" / "mlp.onnx"
    assert find_samples(model, PurePosixPath("sub/mlp.onnx"), samples) == samples / "sub/mlp.npz"
    assert find_samples(model, PurePosixPath("other/mlp.onnx"), samples) == samples / "mlp.npz"
    assert find_samples(tmp_path / "cnn.onnx", PurePosixPath("cnn.onnx"), samples) == (
        samples / "cnn.npz")
    assert find_samples(tmp_path / "bert.onnx", PurePosixPath("bert.onnx"), samples) == (
        samples / "bert")
    assert find_samples(tmp_path / "empty.onnx", PurePosixPath("empty.onnx"), samples) is None
    # A sample set itself (a file, or a test-data folder) applies to every model.
    assert find_samples(model, PurePosixPath("x.onnx"), samples / "cnn.npz") == samples / "cnn.npz"
    assert find_samples(model, PurePosixPath("x.onnx"), samples / "bert") == samples / "bert"
