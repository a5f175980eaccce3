"""Calibration runs onnxruntime on an instrumented copy in the work dir, one sample at a time."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from onnxshrink import runtime
from onnxshrink.calibration import collect
from onnxshrink.calibration.observers import MinMaxObserver
from onnxshrink.ir import io
from tests.conftest import SAMPLES


@pytest.mark.ort
def test_streams_every_sample_into_observers_and_leaves_no_file(tmp_path: Path) -> None:
    loaded = io.load(SAMPLES / "cnn.onnx")
    graph = loaded.graph
    conv = next(n for n in graph.nodes if n.op == "Conv")
    names = [conv.outputs[0].name, "image"]
    observers = {n: [MinMaxObserver()] for n in names}
    npz = np.load(SAMPLES / "cnn.npz")
    feeds = [{"image": npz["image"][i]} for i in range(8)]
    cwd_before = sorted(os.listdir(Path.cwd()))
    used = collect.collect(graph, observers, feeds, tmp_path)
    assert used == 8
    assert list(tmp_path.iterdir()) == []  # the instrumented copy is removed
    assert sorted(os.listdir(Path.cwd())) == cwd_before  # nothing written to the CWD
    assert observers["image"][0].range() == (float(npz["image"].min()), float(npz["image"].max()))
    lo, hi = observers[conv.outputs[0].name][0].range()
    assert lo < 0 < hi
    # the caller's graph is unchanged (outputs restored)
    assert [t.name for t in graph.outputs] == ["logits"]


@pytest.mark.ort
def test_dynamic_shapes_calibrate_with_varying_lengths(tmp_path: Path) -> None:
    loaded = io.load(SAMPLES / "transformer.onnx")
    graph = loaded.graph
    mm = next(n for n in graph.nodes if n.op == "MatMul")
    obs = {mm.inputs[0].name: [MinMaxObserver()]}
    rng = np.random.default_rng(0)
    feeds = [{"input_ids": rng.integers(0, 128, (1, n)).astype(np.int64)} for n in (3, 17, 40)]
    assert collect.collect(graph, obs, feeds, tmp_path) == 3
    assert obs[mm.inputs[0].name][0].count == 64 * (3 + 17 + 40)


@pytest.mark.ort
@pytest.mark.parametrize("model", ["cnn", "transformer"])
def test_ranges_reduced_in_onnxruntime_equal_the_streamed_min_max(
    model: str, tmp_path: Path
) -> None:
    graph = io.load(SAMPLES / f"{model}.onnx").graph
    npz = np.load(SAMPLES / f"{model}.npz")
    feeds = [{k: npz[k][i] for k in npz.files} for i in range(4)]
    names = [n.outputs[0].name for n in graph.nodes if n.op in ("Conv", "MatMul", "Gemm", "Relu")]
    names += [t.name for t in graph.inputs]
    observers = {n: [MinMaxObserver()] for n in names}
    collect.collect(graph, observers, feeds, tmp_path)
    got = collect.ranges(graph, names, feeds, tmp_path)
    float_names = {n for n in names if observers[n][0].count}
    assert set(got) == float_names and float_names  # integer inputs (token ids) left out
    for n in float_names:
        assert got[n] == pytest.approx(observers[n][0].range(), rel=1e-6, abs=1e-7)
    assert list(tmp_path.iterdir()) == []
    original = io.load(SAMPLES / f"{model}.onnx").graph
    assert [t.name for t in graph.outputs] == [t.name for t in original.outputs]  # unchanged


def _refuse_placeholders(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on onnxruntime refuses weights handed over from memory (as some builds do)."""
    real_session = runtime.session

    def refusing(path: Path, **kw: object) -> object:
        if kw.get("initializers"):
            raise RuntimeError("external initializers refused")
        return real_session(path, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(runtime, "session", refusing)


@pytest.mark.ort
def test_exported_weights_come_from_memory_and_fall_back_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    graph = io.load(SAMPLES / "cnn.onnx").graph
    feed = {"image": np.load(SAMPLES / "cnn.npz")["image"][0]}
    model = collect.instrumented_model(graph, [], tmp_path / "m.onnx")
    assert model.initializers  # conv weights are placeholders in a small file
    small = model.path.stat().st_size
    expected = model.session().run(None, feed)
    _refuse_placeholders(monkeypatch)
    got = model.session().run(None, feed)  # rewritten once with its weights inside
    assert not model.initializers and model.path.stat().st_size > small
    np.testing.assert_array_equal(got[0], expected[0])
    model.remove()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.ort
def test_an_in_place_export_leaves_the_graph_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    graph = io.load(SAMPLES / "cnn.onnx").graph
    graph.toposort()
    feed = {"image": np.load(SAMPLES / "cnn.npz")["image"][0]}
    before = {t.name: t._values for t in graph.tensors().values() if hasattr(t, "_values")}
    copied = collect.instrumented_model(graph, [], tmp_path / "c.onnx")
    model = collect.instrumented_model(graph, [], tmp_path / "m.onnx", in_place=True)
    assert model.initializers  # the weights went out as placeholders ...
    after = {t.name: t._values for t in graph.tensors().values() if hasattr(t, "_values")}
    assert all(after[k] is v for k, v in before.items())  # ... and came back
    got, expected = model.session().run(None, feed), copied.session().run(None, feed)
    np.testing.assert_array_equal(got[0], expected[0])
    _refuse_placeholders(monkeypatch)
    np.testing.assert_array_equal(model.session().run(None, feed)[0], expected[0])
    with pytest.raises(ValueError, match="adds no outputs"):
        collect.instrumented_model(graph, ["image"], tmp_path / "x.onnx", in_place=True)


_CHAIN = """
import json, sys
import numpy as np
import onnx_graphsurgeon as gs
from onnxshrink.calibration import collect

n = 1 << 21  # 8 MB per activation
x = gs.Variable("x", np.float32, [n])
t, nodes = x, []
for i in range(12):
    y = gs.Variable(f"t{i}", np.float32, [n])
    nodes.append(gs.Node(("Sin", "Cos", "Exp")[i % 3], f"n{i}", inputs=[t], outputs=[y]))
    t = y
graph = gs.Graph(nodes, [x], [t], opset=13)
feeds = [{"x": np.linspace(-1, 1, n, dtype=np.float32)}]
base = mark()
collect.ranges(graph, [f"t{i}" for i in range(12)], feeds, Path(sys.argv[1]))
print(json.dumps(peak_mb() - base))
"""


@pytest.mark.ort
def test_range_probe_frees_each_activation_once_reduced(tmp_path: Path) -> None:
    """Each tensor's ReduceMin/Max must run as soon as it exists: in graph order onnxruntime
    runs them at the end with all twelve 8 MB activations alive (108 MB measured; 34 MB in
    the right order)."""
    from tests.memory import needs_proc, run_child

    needs_proc()
    grown = run_child(_CHAIN, str(tmp_path))
    assert isinstance(grown, float) and grown < 6 * 8, f"{grown:.0f} MB for 8 MB activations"
