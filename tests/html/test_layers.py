"""Per-layer sizes and decoded weights from model files, checked against onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from onnxshrink import runtime
from onnxshrink.html.decode import Unsupported
from onnxshrink.html.layers import analyse
from tests.conftest import SAMPLES
from tests.graphs import save_graph


def _encoded_graph() -> gs.Graph:
    """x -> MatMul(k-means W1) -> MatMul(per-axis int8 W2) -> MatMul(blocked int8 W3) -> Add.

    The decoded weights are also graph outputs, so onnxruntime tells what the layers compute.
    """
    rng = np.random.default_rng(0)
    x = gs.Variable("x", np.float32, [1, 8])
    codebook = gs.Constant("w1.codebook", np.linspace(-1, 1, 16).astype(np.float32))
    indices = gs.Constant("w1.indices", rng.integers(0, 16, (8, 12)).astype(np.uint8))
    idx32, w1 = gs.Variable("w1.idx32", np.int32), gs.Variable("w1", np.float32, [8, 12])
    q2 = gs.Constant("w2.q", rng.integers(-127, 128, (12, 6)).astype(np.int8))
    s2 = gs.Constant("w2.scale", rng.uniform(0.01, 0.1, 6).astype(np.float32))
    z2 = gs.Constant("w2.zero", rng.integers(-3, 4, 6).astype(np.int8))
    w2 = gs.Variable("w2", np.float32, [12, 6])
    q3 = gs.Constant("w3.q", rng.integers(-127, 128, (6, 4)).astype(np.int8))
    s3 = gs.Constant("w3.scale", rng.uniform(0.01, 0.1, (2, 4)).astype(np.float32))
    z3 = gs.Constant("w3.zero", np.zeros((2, 4), np.int8))
    w3 = gs.Variable("w3", np.float32, [6, 4])
    bias = gs.Constant("bias", rng.standard_normal(4).astype(np.float32))
    h1, h2, h3 = (gs.Variable(n, np.float32) for n in ("h1", "h2", "h3"))
    y = gs.Variable("y", np.float32, [1, 4])
    nodes = [
        gs.Node("Cast", "w1.cast", {"to": 6}, inputs=[indices], outputs=[idx32]),
        gs.Node("Gather", "w1.decode", inputs=[codebook, idx32], outputs=[w1]),
        gs.Node("MatMul", "fc1", inputs=[x, w1], outputs=[h1]),
        gs.Node("DequantizeLinear", "w2.dq", {"axis": 1}, inputs=[q2, s2, z2], outputs=[w2]),
        gs.Node("MatMul", "fc2", inputs=[h1, w2], outputs=[h2]),
        gs.Node("DequantizeLinear", "w3.dq", {"axis": 0, "block_size": 3}, inputs=[q3, s3, z3],
                outputs=[w3]),
        gs.Node("MatMul", "fc3", inputs=[h2, w3], outputs=[h3]),
        gs.Node("Add", "fc3.bias", inputs=[h3, bias], outputs=[y]),
    ]
    return gs.Graph(nodes=nodes, inputs=[x], outputs=[y, w1, w2, w3], opset=21)


@pytest.fixture
def encoded(tmp_path: Path) -> Path:
    return save_graph(_encoded_graph(), tmp_path / "encoded.onnx", ir_version=10)


def test_weights_behind_decoders_count_for_the_layer_that_uses_them(encoded: Path) -> None:
    layers = analyse(encoded).layers
    assert [n for n, lay in layers.items() if lay.bytes] == ["fc1", "fc2", "fc3", "fc3.bias"]
    assert sorted(layers["fc1"].weights) == ["w1.codebook", "w1.indices"]
    assert set(layers["fc1"].bytes_by_dtype) == {"float", "uint8"}
    assert set(layers["fc2"].bytes_by_dtype) == {"int8", "float"}
    assert layers["fc2"].params == 12 * 6 + 6 + 6
    assert "w1.cast" not in layers and "w2.dq" not in layers


@pytest.mark.ort
def test_decoded_weights_equal_what_onnxruntime_computes(encoded: Path) -> None:
    sess = runtime.session(encoded, opt="none")
    x = np.zeros((1, 8), np.float32)
    _, w1, w2, w3 = runtime.run(sess, {"x": x})
    model = analyse(encoded)
    for layer, expected in (("fc1", w1), ("fc2", w2), ("fc3", w3)):
        np.testing.assert_allclose(model.weight(layer), expected, rtol=1e-6, atol=1e-7)


def test_unknown_decoder_ops_are_reported_not_guessed(tmp_path: Path) -> None:
    w = gs.Constant("w", np.ones((4, 4), np.float32))
    t, h, y = gs.Variable("t", np.float32), gs.Variable("h", np.float32), gs.Variable(
        "y", np.float32)
    x = gs.Variable("x", np.float32, [1, 4])
    graph = gs.Graph(nodes=[gs.Node("Softmax", "weird", inputs=[w], outputs=[t]),
                            gs.Node("MatMul", "mm", inputs=[x, t], outputs=[h]),
                            gs.Node("Relu", "relu", inputs=[h], outputs=[y])],
                     inputs=[x], outputs=[y], opset=17)
    model = analyse(save_graph(graph, tmp_path / "m.onnx"))
    assert model.layers["mm"].weights == ["w"]
    with pytest.raises(Unsupported, match="Softmax"):
        model.weight("mm")


def test_sample_models_attribute_every_weight_byte() -> None:
    for name in ("cnn", "mlp", "transformer", "control_flow", "fp16"):
        model = analyse(SAMPLES / f"{name}.onnx")
        total = sum(lay.bytes for lay in model.layers.values()) + model.unattributed_bytes
        assert total > 0
        for layer in model.layers.values():
            if layer.main_input is not None:
                assert np.isfinite(model.weight(layer.name)).all()
    flow = analyse(SAMPLES / "control_flow.onnx")
    assert any(lay.bytes for n, lay in flow.layers.items() if n not in ("If", "Loop"))
