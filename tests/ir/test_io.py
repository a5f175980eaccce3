"""ir.io: what a load + export must keep, and how a save may fail (completely or not at all)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

import onnxshrink
from onnxshrink import runtime
from onnxshrink.errors import ModelError, OutputError
from onnxshrink.ir import io
from tests.conftest import SAMPLES


def _ort(model: Path | onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    source = model if isinstance(model, Path) else model.SerializeToString()
    return runtime.run(runtime.session(source, opt="none"), feeds)


def _round_trip(path: Path) -> onnx.ModelProto:
    loaded = io.load(path)
    return io.to_model(loaded.graph, loaded.info)


def _where(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Initializer name -> names of the graphs that store it."""
    found: dict[str, list[str]] = {}
    for graph in io.iter_all_graphs(model):
        for t in graph.initializer:
            found.setdefault(t.name, []).append(graph.name)
    return found


# ------------------------------------------------------------------ subgraph weights


def _strip_copies(graph: onnx.GraphProto, outer: frozenset[str] = frozenset()) -> None:
    """Make a gs export look like a well-formed file: a subgraph does not repeat an
    initializer its enclosing graphs already hold."""
    keep = [t for t in graph.initializer if t.name not in outer]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    inner = outer | {t.name for t in keep}
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _strip_copies(attr.g, inner)


def control_flow_model(path: Path) -> Path:
    """x -> Add(w) -> If(flag): then = Add(w), then nested If(flag) reading `v` from the then
    branch; else = Mul(w). `w` lives in the main graph, `v` in the then branch, once each."""
    rng = np.random.default_rng(0)
    w = gs.Constant("w", rng.standard_normal(4).astype(np.float32))
    v = gs.Constant("v", rng.standard_normal(4).astype(np.float32))
    x = gs.Variable("x", np.float32, [2, 4])
    flag = gs.Variable("flag", np.bool_, [])
    x2 = gs.Variable("x2", np.float32, [2, 4])

    def branch(name: str, op: str, a: gs.Tensor, b: gs.Tensor) -> gs.Graph:
        out = gs.Variable(f"{name}_out", np.float32, [2, 4])
        return gs.Graph(nodes=[gs.Node(op, name, inputs=[a, b], outputs=[out])], outputs=[out],
                        name=name)

    t1 = gs.Variable("t1", np.float32, [2, 4])
    t2 = gs.Variable("t2", np.float32, [2, 4])
    nested_out = gs.Variable("nested_out", np.float32, [2, 4])
    then = gs.Graph(
        nodes=[
            gs.Node("Add", "then_add", inputs=[x2, w], outputs=[t1]),
            gs.Node("Mul", "then_mul", inputs=[t1, v], outputs=[t2]),
            gs.Node("If", "nested", {"then_branch": branch("nested_then", "Add", t2, v),
                                     "else_branch": branch("nested_else", "Sub", t2, v)},
                    inputs=[flag], outputs=[nested_out]),
        ],
        outputs=[nested_out], name="then",
    )
    y = gs.Variable("y", np.float32, [2, 4])
    graph = gs.Graph(
        nodes=[
            gs.Node("Add", "pre", inputs=[x, w], outputs=[x2]),
            gs.Node("If", "if", {"then_branch": then, "else_branch": branch("else", "Mul", x2, w)},
                    inputs=[flag], outputs=[y]),
        ],
        inputs=[x, flag], outputs=[y], opset=17,
    )
    model = gs.export_onnx(graph)
    model.ir_version = 9
    assert len(_where(model)["w"]) > 1, "gs no longer copies outer weights: revisit this test"
    _strip_copies(model.graph)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_outer_scope_weights_are_stored_once_where_they_belong(tmp_path: Path) -> None:
    """gs writes `w` into every graph that reads it; the export keeps one copy in the graph
    that encloses all readers (main for `w`, the then branch for `v`)."""
    path = control_flow_model(tmp_path / "cf.onnx")
    loaded = io.load(path)
    with io.quiet_gs():
        naive = gs.export_onnx(loaded.graph, do_type_check=False)
    naive_where = _where(naive)  # the trap: a copy in every graph whose nodes read it
    assert len(naive_where["w"]) == 3 and len(naive_where["v"]) == 3, naive_where
    model = io.to_model(loaded.graph, loaded.info)
    assert _where(model) == {"w": [model.graph.name], "v": ["then"]}
    onnx.checker.check_model(model)
    assert len(model.SerializeToString()) <= path.stat().st_size
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    for flag in (True, False):
        feeds = {"x": x, "flag": np.array(flag)}
        np.testing.assert_array_equal(_ort(model, feeds)[0], _ort(path, feeds)[0])


def test_same_name_in_sibling_branches_stays_apart(tmp_path: Path) -> None:
    """Two different constants that happen to share a name in two branches are two tensors."""
    x = gs.Variable("x", np.float32, [3])
    flag = gs.Variable("flag", np.bool_, [])
    outs = []
    branches = []
    for name, value in (("then", 1.0), ("else", 2.0)):
        c = gs.Constant("c", np.full(3, value, np.float32))
        out = gs.Variable(f"{name}_out", np.float32, [3])
        outs.append(out)
        branches.append(gs.Graph(nodes=[gs.Node("Add", name, inputs=[x, c], outputs=[out])],
                                 outputs=[out], name=name))
    y = gs.Variable("y", np.float32, [3])
    graph = gs.Graph(nodes=[gs.Node("If", "if", {"then_branch": branches[0],
                                                 "else_branch": branches[1]},
                                    inputs=[flag], outputs=[y])],
                     inputs=[x, flag], outputs=[y], opset=17)
    model = gs.export_onnx(graph)
    model.ir_version = 9
    path = tmp_path / "siblings.onnx"
    onnx.save(model, str(path))
    out = _round_trip(path)
    assert _where(out) == {"c": ["then", "else"]}
    feeds = {"x": np.zeros(3, np.float32)}
    assert _ort(out, {**feeds, "flag": np.array(True)})[0].tolist() == [1.0, 1.0, 1.0]
    assert _ort(out, {**feeds, "flag": np.array(False)})[0].tolist() == [2.0, 2.0, 2.0]


# ------------------------------------------------------------------ signature and metadata


def ir3_model(path: Path) -> Path:
    """IR 3 (every initializer is also a graph input): y = x @ Transpose(W) + b."""
    rng = np.random.default_rng(1)
    x = gs.Variable("x", np.float32, [2, 3])
    w = gs.Constant("W", rng.standard_normal((4, 3)).astype(np.float32))
    b = gs.Constant("b", rng.standard_normal(4).astype(np.float32))
    wt, mm = gs.Variable("Wt", np.float32), gs.Variable("mm", np.float32)
    y = gs.Variable("y", np.float32, [2, 4])
    graph = gs.Graph(nodes=[
        gs.Node("Transpose", "t", {"perm": [1, 0]}, inputs=[w], outputs=[wt]),
        gs.Node("MatMul", "mm", inputs=[x, wt], outputs=[mm]),
        gs.Node("Add", "add", inputs=[mm, b], outputs=[y]),
    ], inputs=[x], outputs=[y], opset=8)
    model = gs.export_onnx(graph)
    model.ir_version = 3
    for t in model.graph.initializer:
        vi = model.graph.input.add(name=t.name)
        vi.type.tensor_type.elem_type = t.data_type
        vi.type.tensor_type.shape.dim.extend(onnx.TensorShapeProto.Dimension(dim_value=d)
                                             for d in t.dims)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_ir3_initializers_stay_listed_as_inputs(tmp_path: Path) -> None:
    """Folding Transpose(W) creates a weight: in IR 3 it must be an input too (the checker
    says so), the folded-away W disappears from both lists, and `x` stays first."""
    path = ir3_model(tmp_path / "ir3.onnx")
    out = tmp_path / "out.onnx"
    report = onnxshrink.compress(path, None, out)
    assert report.ok
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    assert model.ir_version == 3
    inits = {t.name for t in model.graph.initializer}
    inputs = [i.name for i in model.graph.input]
    assert inputs[0] == "x" and set(inputs[1:]) == inits
    assert "W" not in inits and "b" in inits  # Transpose folded, W no longer needed
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Add"]
    feeds = {"x": np.ones((2, 3), np.float32)}
    np.testing.assert_allclose(_ort(out, feeds)[0], _ort(path, feeds)[0], rtol=1e-6)


def test_overridable_initializer_stays_an_input(tmp_path: Path) -> None:
    """IR >= 4: an initializer listed as an input is a default the caller may override, so
    nothing may fold through it, and the default comes back on export."""
    x = gs.Variable("x", np.float32, [3])
    scale = gs.Variable("scale", np.float32, [1])
    two = gs.Constant("two", np.array([2.0], np.float32))
    s2, y = gs.Variable("s2", np.float32), gs.Variable("y", np.float32, [3])
    graph = gs.Graph(nodes=[gs.Node("Mul", "s2", inputs=[scale, two], outputs=[s2]),
                            gs.Node("Mul", "y", inputs=[x, s2], outputs=[y])],
                     inputs=[x, scale], outputs=[y], opset=17)
    model = gs.export_onnx(graph)
    model.ir_version = 9
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([5.0], np.float32),
                                                                 "scale"))
    path = tmp_path / "override.onnx"
    onnx.save(model, str(path))
    out = tmp_path / "out.onnx"
    assert onnxshrink.compress(path, None, out).ok
    result = onnx.load(str(out))
    assert [i.name for i in result.graph.input] == ["x", "scale"]
    assert "scale" in {t.name for t in result.graph.initializer}
    assert [n.op_type for n in result.graph.node] == ["Mul", "Mul"]  # not folded
    x1 = np.ones(3, np.float32)
    assert _ort(out, {"x": x1})[0].tolist() == [10.0] * 3  # the default
    fed = {"x": x1, "scale": np.array([0.5], np.float32)}
    assert _ort(out, fed)[0].tolist() == _ort(path, fed)[0].tolist() == [1.0] * 3


def test_signature_metadata_and_producer_survive(tmp_path: Path) -> None:
    """Inputs and outputs exactly as declared (a scalar keeps its empty shape, dim names stay),
    model, graph and node metadata, producer, doc string, versions and opsets."""
    n = gs.Variable("n", np.int64, [])
    x = gs.Variable("x", np.float32, ["batch", 4])
    xf, y = gs.Variable("xf", np.float32), gs.Variable("y", np.float32, ["batch", 4])
    graph = gs.Graph(nodes=[gs.Node("Cast", "cast", {"to": onnx.TensorProto.FLOAT},
                                    inputs=[n], outputs=[xf]),
                            gs.Node("Add", "add", inputs=[x, xf], outputs=[y])],
                     inputs=[n, x], outputs=[y], opset=17)
    model = gs.export_onnx(graph)
    model.ir_version = 10
    model.graph.input[0].type.tensor_type.shape.SetInParent()  # declared scalar: shape {}
    model.producer_name, model.producer_version = "maker", "1.2"
    model.doc_string, model.domain, model.model_version = "doc", "org.example", 7
    model.metadata_props.add(key="license", value="MIT")
    model.graph.metadata_props.add(key="graph.key", value="g")
    model.graph.node[1].metadata_props.add(key="pkg.torch.onnx.stack_trace", value="line 1")
    model.opset_import.add(domain="ai.onnx.ml", version=3)
    path = tmp_path / "meta.onnx"
    onnx.save(model, str(path))
    out = _round_trip(path)
    original = onnx.load(str(path))
    assert list(out.graph.input) == list(original.graph.input)
    assert out.graph.input[0].type.tensor_type.HasField("shape")
    assert list(out.graph.output) == list(original.graph.output)
    for field in ("ir_version", "producer_name", "producer_version", "doc_string", "domain",
                  "model_version"):
        assert getattr(out, field) == getattr(original, field), field
    assert list(out.metadata_props) == list(original.metadata_props)
    assert list(out.graph.metadata_props) == list(original.graph.metadata_props)
    add = next(node for node in out.graph.node if node.name == "add")
    assert list(add.metadata_props) == list(original.graph.node[1].metadata_props)
    assert sorted((o.domain, o.version) for o in out.opset_import) == sorted(
        (o.domain, o.version) for o in original.opset_import)


# ------------------------------------------------------------------ external data and saving


def external_cnn(folder: Path, name: str = "cnn") -> Path:
    """The cnn sample with every tensor >= 1 KiB in ``<name>.bin``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.onnx"
    onnx.save_model(onnx.load(str(SAMPLES / "cnn.onnx")), str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=f"{name}.bin", size_threshold=1024)
    return path


def _cnn_feeds() -> dict[str, np.ndarray]:
    return {"image": np.random.default_rng(0).standard_normal((1, 3, 32, 32), np.float32)}


@pytest.mark.parametrize("external", [True, False])
def test_external_data_round_trip_from_another_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, external: bool
) -> None:
    """Loaded from one folder with the working directory elsewhere, saved into another:
    weights are copied (streamed) into OUT.data, or inlined; never left pointing back."""
    src = external_cnn(tmp_path / "a")
    monkeypatch.chdir(tmp_path)
    loaded = io.load(src)
    out = tmp_path / "b" / "model.onnx"
    out.parent.mkdir()
    io.save(io.to_model(loaded.graph, loaded.info), out, external_data=external)
    files = sorted(p.name for p in out.parent.iterdir())
    assert files == (["model.onnx", "model.onnx.data"] if external else ["model.onnx"])
    proto = onnx.load_model(str(out), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data
                 if e.key == "location"}
    assert locations == ({"model.onnx.data"} if external else set())
    for t in proto.graph.initializer:
        info = {e.key: e.value for e in t.external_data}
        assert ("offset" in info) == (len(t.raw_data) == 0 and external)
        if info:
            assert int(info["offset"]) % 4096 == 0
    before = {t.name: onnx.numpy_helper.to_array(t)
              for t in onnx.load(str(SAMPLES / "cnn.onnx")).graph.initializer}
    after = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    assert after.keys() == before.keys()
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value)
    np.testing.assert_array_equal(_ort(out, _cnn_feeds())[0],
                                  _ort(SAMPLES / "cnn.onnx", _cnn_feeds())[0])


def test_compress_keeps_external_data_external(tmp_path: Path) -> None:
    """A model that came with external data leaves with it (OUT + OUT.data), and validates."""
    src = external_cnn(tmp_path / "in")
    out = tmp_path / "out" / "small.onnx"
    out.parent.mkdir()
    report = onnxshrink.compress(src, None, out, samples=SAMPLES / "cnn.npz")
    assert report.ok
    assert sorted(p.name for p in out.parent.iterdir()) == ["small.onnx", "small.onnx.data"]
    np.testing.assert_allclose(_ort(out, _cnn_feeds())[0], _ort(src, _cnn_feeds())[0],
                               rtol=1e-5, atol=1e-5)


def test_failed_save_leaves_the_old_output_and_no_temp_files(tmp_path: Path) -> None:
    """A save that fails midway (its source weights vanished) is an OutputError; the file that
    was there before is untouched and no temp file remains."""
    src = external_cnn(tmp_path / "in")
    loaded = io.load(src)
    proto = io.to_model(loaded.graph, loaded.info)
    (tmp_path / "in" / "cnn.bin").unlink()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "model.onnx"
    out.write_bytes(b"previous")
    for external in (True, False):
        with pytest.raises(OutputError, match="cannot write output"):
            io.save(proto, out, external_data=external)
        assert out.read_bytes() == b"previous"
        assert sorted(p.name for p in out_dir.iterdir()) == ["model.onnx"]


def test_save_replaces_atomically(tmp_path: Path) -> None:
    """A successful save swaps the complete file in: same folder, no leftovers."""
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous")
    loaded = io.load(SAMPLES / "mlp.onnx")
    io.save(io.to_model(loaded.graph, loaded.info), out)
    assert onnx.load(str(out)).graph.node
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]


def test_external_location_must_stay_in_the_model_folder(tmp_path: Path) -> None:
    """A location that escapes the folder (or is absolute) is refused before anything reads it:
    a model must not make onnxshrink copy an arbitrary file into its output."""
    src = external_cnn(tmp_path / "in")
    model = onnx.load_model(str(src), load_external_data=False)
    for location in ("../cnn.bin", str(tmp_path / "in" / "cnn.bin")):
        for t in model.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = location
        src.write_bytes(model.SerializeToString())
        with pytest.raises(ModelError, match="outside the model's folder"):
            io.read_model(src)


def test_checker_runs_on_external_models_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnx's checker resolves external files against the working directory; ours must not."""
    src = external_cnn(tmp_path / "in")
    monkeypatch.chdir(tmp_path)
    model = io.read_model(src)
    io.check_model(model, src)  # absolute locations, another cwd: still fine
    assert all(os.path.isabs(e.value) for t in model.graph.initializer for e in t.external_data
               if e.key == "location")


def test_weight_read_only_by_branches_moves_up(tmp_path: Path) -> None:
    """`u` lives in the main graph but only the two branches read it: gs exports it into each
    branch and not into main; the export moves it back up, once."""
    x = gs.Variable("x", np.float32, [3])
    flag = gs.Variable("flag", np.bool_, [])
    u = gs.Constant("u", np.array([1.0, 2.0, 3.0], np.float32))
    branches = []
    for name, op in (("then", "Add"), ("else", "Sub")):
        out = gs.Variable(f"{name}_out", np.float32, [3])
        branches.append(gs.Graph(nodes=[gs.Node(op, name, inputs=[x, u], outputs=[out])],
                                 outputs=[out], name=name))
    y = gs.Variable("y", np.float32, [3])
    graph = gs.Graph(nodes=[gs.Node("If", "if", {"then_branch": branches[0],
                                                 "else_branch": branches[1]},
                                    inputs=[flag], outputs=[y])],
                     inputs=[x, flag], outputs=[y], opset=17, name="main")
    model = gs.export_onnx(graph)
    model.ir_version = 9
    assert _where(model) == {"u": ["then", "else"]}
    model.graph.initializer.add().CopyFrom(model.graph.node[0].attribute[0].g.initializer[0])
    _strip_copies(model.graph)  # now stored once, in main, as a file would have it
    path = tmp_path / "up.onnx"
    onnx.save(model, str(path))
    out = _round_trip(path)
    assert _where(out) == {"u": ["main"]}
    onnx.checker.check_model(out)
    feeds = {"x": np.zeros(3, np.float32)}
    assert _ort(out, {**feeds, "flag": np.array(True)})[0].tolist() == [1.0, 2.0, 3.0]
    assert _ort(out, {**feeds, "flag": np.array(False)})[0].tolist() == [-1.0, -2.0, -3.0]
