"""Feeds: random samples respect the signature; files are checked against it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxshrink.errors import SampleError
from onnxshrink.validate.feeds import (
    InputSpec,
    input_specs,
    load_dir,
    load_npz,
    load_samples,
    random_feeds,
)
from tests.conftest import SAMPLES


def test_specs_of_transformer() -> None:
    specs = input_specs(onnx.load(str(SAMPLES / "transformer.onnx")))
    assert [(s.name, s.dtype, s.dims) for s in specs] == [
        ("input_ids", np.dtype(np.int64), ("batch", "seq"))
    ]


def test_random_feeds_respect_dtype_shape_dims_and_bounds() -> None:
    specs = [
        InputSpec("x", np.dtype(np.float16), ("batch", 3, "h")),
        InputSpec("ids", np.dtype(np.int64), ("batch", "seq")),
        InputSpec("flag", np.dtype(np.bool_), ()),
    ]
    feeds = random_feeds(specs, 3, seed=1, dims={"h": 5, "ids:1": 7}, int_high={"ids": 10})
    assert len(feeds.samples) == 3
    s = feeds.samples[0]
    assert s["x"].dtype == np.float16 and s["x"].shape == (1, 3, 5)
    assert s["ids"].shape == (1, 7) and s["ids"].max() < 10 and s["ids"].min() >= 0
    assert s["flag"].dtype == np.bool_ and s["flag"].shape == ()
    again = random_feeds(specs, 3, seed=1, dims={"h": 5, "ids:1": 7}, int_high={"ids": 10})
    assert all(np.array_equal(a["x"], b["x"]) for a, b in zip(feeds.samples, again.samples))


def test_npz_round_trip_and_mismatches(tmp_path: Path) -> None:
    specs = [InputSpec("x", np.dtype(np.float32), ("batch", 4))]
    good = tmp_path / "good.npz"
    np.savez(good, x=np.zeros((5, 2, 4), np.float64))  # float64 is cast, same kind
    feeds = load_npz(good, specs)
    assert len(feeds.samples) == 5 and feeds.samples[0]["x"].dtype == np.float32
    bad_name = tmp_path / "name.npz"
    np.savez(bad_name, y=np.zeros((5, 2, 4), np.float32))
    with pytest.raises(SampleError, match=r"missing: \['x'\], unexpected: \['y'\]"):
        load_npz(bad_name, specs)
    bad_shape = tmp_path / "shape.npz"
    np.savez(bad_shape, x=np.zeros((5, 2, 3), np.float32))
    with pytest.raises(SampleError, match="axis 1"):
        load_npz(bad_shape, specs)
    bad_dtype = tmp_path / "dtype.npz"
    np.savez(bad_dtype, x=np.zeros((5, 2, 4), np.int32))
    with pytest.raises(SampleError, match="dtype int32"):
        load_npz(bad_dtype, specs)


def test_test_data_dir_with_varying_shapes(tmp_path: Path) -> None:
    specs = [InputSpec("x", np.dtype(np.float32), ("batch", "n"))]
    for i, n in enumerate([3, 5]):
        d = tmp_path / f"test_data_set_{i}"
        d.mkdir()
        arr = np.full((1, n), i, np.float32)
        (d / "input_0.pb").write_bytes(numpy_helper.from_array(arr).SerializeToString())
        (d / "output_0.pb").write_bytes(numpy_helper.from_array(arr * 2).SerializeToString())
    feeds = load_dir(tmp_path, specs)
    assert [s["x"].shape for s in feeds.samples] == [(1, 3), (1, 5)]
    assert feeds.references is not None and feeds.references[1][0][0, 0] == 2


def test_large_test_data_dirs_are_read_lazily_and_checked_up_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from onnxshrink.validate import feeds as feeds_mod

    monkeypatch.setattr(feeds_mod, "LAZY_SAMPLE_BYTES", 100)  # 3 samples of 64 bytes each
    specs = [InputSpec("x", np.dtype(np.float32), (1, 16))]
    for i in range(3):
        d = tmp_path / f"test_data_set_{i}"
        d.mkdir()
        arr = np.full((1, 16), i, np.float32)
        (d / "input_0.pb").write_bytes(numpy_helper.from_array(arr).SerializeToString())
    samples = load_dir(tmp_path, specs).samples
    assert isinstance(samples, feeds_mod.LazySamples) and len(samples) == 3
    assert [float(s["x"][0, 0]) for s in samples] == [0.0, 1.0, 2.0]
    assert float(samples[-1]["x"][0, 0]) == 2.0 and len(samples[1:]) == 2
    with pytest.raises(IndexError):
        samples[3]
    # a bad sample is still refused when loading, not halfway through a run
    bad = tmp_path / "test_data_set_3"
    bad.mkdir()
    (bad / "input_0.pb").write_bytes(
        numpy_helper.from_array(np.zeros((1, 15), np.float32)).SerializeToString()
    )
    with pytest.raises(SampleError, match="test_data_set_3"):
        load_dir(tmp_path, specs)


def test_unknown_source_is_refused(tmp_path: Path) -> None:
    specs = [InputSpec("x", np.dtype(np.float32), (1,))]
    with pytest.raises(SampleError, match="not found"):
        load_samples(tmp_path / "nope.npz", specs, count=1, seed=0)
    other = tmp_path / "x.txt"
    other.write_text("hi")
    with pytest.raises(SampleError, match=r"must be an \.npz"):
        load_samples(other, specs, count=1, seed=0)


def test_a_named_dynamic_dim_gets_one_size_everywhere() -> None:
    # silero's `batch` is axis 0 of its audio and axis 1 of its state: both must agree
    specs = [
        InputSpec("input", np.dtype(np.float32), ("batch", "sequence")),
        InputSpec("state", np.dtype(np.float32), (2, "batch", 128)),
    ]
    feeds = random_feeds(specs, 1, seed=0)
    s = feeds.samples[0]
    assert s["input"].shape[0] == s["state"].shape[1] == 1
    assert "input:1 (sequence)=64" in feeds.hint and "--dim" in feeds.hint
    given = random_feeds(specs, 1, seed=0, dims={"sequence": 512})
    assert given.samples[0]["input"].shape == (1, 512)
    assert "sequence" not in given.hint
