"""graph.cleanup: BN folding and size-bounded constant folding, checked with onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from onnxshrink import compress, runtime
from onnxshrink.ir import io
from onnxshrink.passes.base import Context
from onnxshrink.passes.graph_cleanup import CleanupGraphPass, CleanupParams
from tests.graphs import conv_bn_graph, save_graph


def _run(graph: gs.Graph, **params: object) -> dict:
    p = CleanupGraphPass(CleanupParams(**params))
    result = p.run(graph, list(graph.nodes), Context(model_path=Path("t.onnx"), opset=17))
    graph.cleanup().toposort()
    return result.touched


def _ort(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return runtime.run(runtime.session(path, opt="none"), feeds)


def _ops(graph: gs.Graph) -> list[str]:
    return [n.op for n in graph.nodes]


@pytest.mark.parametrize("shared", [False, True])
def test_batchnorm_folds_into_conv_and_gemm_exactly(tmp_path: Path, shared: bool) -> None:
    graph = conv_bn_graph(shared_weight=shared)
    before = save_graph(graph.copy(), tmp_path / "before.onnx")
    touched = _run(graph)
    assert set(touched) == {"bn", "bn2"}
    assert "BatchNormalization" not in _ops(graph)
    after = save_graph(graph, tmp_path / "after.onnx")
    onnx.checker.check_model(onnx.load(str(after)), full_check=True)
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    for a, b in zip(_ort(before, {"x": x}), _ort(after, {"x": x})):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    if shared:  # the weight shared with conv_side must keep its original values
        side = next(n for n in graph.nodes if n.name == "conv_side")
        assert side.inputs[1].name == "w"
        conv = next(n for n in graph.nodes if n.name == "conv")
        assert conv.inputs[1].name != "w"


def test_batchnorm_with_other_consumer_is_skipped() -> None:
    graph = conv_bn_graph()
    conv_out = next(n for n in graph.nodes if n.name == "conv").outputs[0]
    graph.outputs.append(conv_out)
    p = CleanupGraphPass()
    result = p.run(graph, list(graph.nodes), Context(model_path=Path("t.onnx"), opset=17))
    assert "bn" not in result.touched
    assert any(s.node == "bn" and "other consumers" in s.reason for s in result.skipped)


def _const_chain_graph() -> gs.Graph:
    """A weight behind Transpose (foldable), a ConstantOfShape that would bloat (not folded)."""
    w = gs.Constant("w", np.arange(12, dtype=np.float32).reshape(3, 4))
    wt = gs.Variable("wt", np.float32)
    x = gs.Variable("x", np.float32, [2, 3])
    mm = gs.Variable("mm", np.float32)
    shape = gs.Constant("shape", np.array([2, 4096], dtype=np.int64))
    big = gs.Variable("big", np.float32)
    y = gs.Variable("y", np.float32, [2, 4])
    z = gs.Variable("z", np.float32, [2, 4096])
    nodes = [
        gs.Node("Transpose", "t", {"perm": [1, 0]}, inputs=[w], outputs=[wt]),
        gs.Node("MatMul", "mm", inputs=[x, gs.Constant("w2", np.ones((3, 4), np.float32))],
                outputs=[mm]),
        gs.Node("Add", "add", inputs=[mm, gs.Variable("wt_sum", np.float32)], outputs=[y]),
        gs.Node("ReduceSum", "rs", {"keepdims": 0}, inputs=[wt, gs.Constant(
            "axes", np.array([1], np.int64))], outputs=[gs.Variable("unused")]),
        gs.Node("ConstantOfShape", "cos", {"value": gs.Constant("v", np.array([1.5], np.float32))},
                inputs=[shape], outputs=[big]),
        gs.Node("Mul", "mul", inputs=[big, gs.Constant("two", np.array(2, np.float32))],
                outputs=[z]),
    ]
    # wire: Add reads the Transpose output through a MatMul-compatible shape
    nodes[2].inputs[1] = gs.Constant("bias", np.ones(4, np.float32))
    nodes[1].inputs[1] = wt if False else nodes[1].inputs[1]
    return gs.Graph(nodes=nodes, inputs=[x], outputs=[y, z], opset=17)


def test_constant_folding_is_size_bounded() -> None:
    graph = _const_chain_graph()
    touched = _run(graph)
    assert "cos" not in touched and "mul" not in touched  # would store 32 KiB from 16 bytes
    assert "ConstantOfShape" in _ops(graph)


def test_folding_grows_the_whole_model_by_the_allowance_at_most() -> None:
    """Eight biases made by ConstantOfShape, 512 bytes each: each fits the 1 KiB allowance on
    its own, together they would add 4 KiB (onnx's "light" densenet121 grew 1.8x that way)."""
    x = gs.Variable("x", np.float32, [1, 128])
    t, nodes = x, []
    for i in range(8):
        bias = gs.Variable(f"b{i}", np.float32, [128])
        out = gs.Variable(f"y{i}", np.float32, [1, 128])
        nodes += [
            gs.Node("ConstantOfShape", f"cos{i}",
                    {"value": gs.Constant(f"v{i}", np.array([0.5 * i], np.float32))},
                    inputs=[gs.Constant(f"s{i}", np.array([128], np.int64))], outputs=[bias]),
            gs.Node("Add", f"add{i}", inputs=[t, bias], outputs=[out]),
        ]
        t = out
    graph = gs.Graph(nodes=nodes, inputs=[x], outputs=[t], opset=17)
    touched = _run(graph, max_growth_bytes=1024)
    folded = [n for n in touched if n.startswith("cos")]
    assert 0 < len(folded) <= 2  # 512 bytes each (less the 8 they came from): two fit
    assert _ops(graph).count("ConstantOfShape") == 8 - len(folded)


def test_transpose_of_weight_is_folded(tmp_path: Path) -> None:
    x = gs.Variable("x", np.float32, [2, 4])
    w = gs.Constant("w", np.arange(12, dtype=np.float32).reshape(3, 4))
    wt = gs.Variable("wt", np.float32)
    y = gs.Variable("y", np.float32, [2, 3])
    graph = gs.Graph(
        nodes=[gs.Node("Transpose", "t", {"perm": [1, 0]}, inputs=[w], outputs=[wt]),
               gs.Node("MatMul", "mm", inputs=[x, wt], outputs=[y])],
        inputs=[x], outputs=[y], opset=17,
    )
    before = save_graph(graph.copy(), tmp_path / "before.onnx")
    assert "t" in _run(graph)
    assert _ops(graph) == ["MatMul"]
    assert isinstance(graph.nodes[0].inputs[1], gs.Constant)
    after = save_graph(graph, tmp_path / "after.onnx")
    feeds = {"x": np.ones((2, 4), np.float32)}
    np.testing.assert_array_equal(_ort(before, feeds)[0], _ort(after, feeds)[0])


def test_dequantize_on_weights_is_not_undone() -> None:
    x = gs.Variable("x", np.float32, [2, 4])
    q = gs.Constant("q", np.ones((4, 3), np.int8))
    scale = gs.Constant("s", np.array(0.1, np.float32))
    zp = gs.Constant("zp", np.array(0, np.int8))
    deq = gs.Variable("deq", np.float32)
    y = gs.Variable("y", np.float32, [2, 3])
    graph = gs.Graph(
        nodes=[gs.Node("DequantizeLinear", "dq", inputs=[q, scale, zp], outputs=[deq]),
               gs.Node("MatMul", "mm", inputs=[x, deq], outputs=[y])],
        inputs=[x], outputs=[y], opset=17,
    )
    assert _run(graph) == {}
    assert _ops(graph) == ["DequantizeLinear", "MatMul"]


def test_cleanup_on_sample_models_keeps_outputs(tmp_path: Path, sample_model) -> None:
    model, samples = sample_model
    report = compress(model, "lossless", tmp_path / "out.onnx", samples=samples)
    assert report.ok, [o.failures for o in report.numerics.outputs]
    assert report.after.file_bytes <= report.before.file_bytes
    original = io.read_model(model)
    result = io.read_model(tmp_path / "out.onnx")
    assert [i.name for i in result.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in result.graph.output] == [o.name for o in original.graph.output]
    assert result.opset_import == original.opset_import
