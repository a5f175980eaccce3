"""Small seeded gs graphs built in code for unit tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs


def conv_bn_graph(seed: int = 0, *, shared_weight: bool = False) -> gs.Graph:
    """x -> Conv -> BatchNormalization -> Relu -> Gemm(BN) -> y, with realistic BN statistics."""
    rng = np.random.default_rng(seed)
    x = gs.Variable("x", np.float32, [1, 3, 8, 8])
    w = gs.Constant("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32))
    b = gs.Constant("b", rng.standard_normal(4).astype(np.float32))
    conv_out = gs.Variable("conv_out", np.float32)
    bn_out = gs.Variable("bn_out", np.float32)
    relu_out = gs.Variable("relu_out", np.float32)
    flat = gs.Variable("flat", np.float32)

    def bn_params(prefix: str, n: int) -> list[gs.Constant]:
        return [
            gs.Constant(f"{prefix}_scale", rng.uniform(0.5, 2, n).astype(np.float32)),
            gs.Constant(f"{prefix}_bias", rng.standard_normal(n).astype(np.float32)),
            gs.Constant(f"{prefix}_mean", rng.standard_normal(n).astype(np.float32)),
            gs.Constant(f"{prefix}_var", rng.uniform(0.5, 2, n).astype(np.float32)),
        ]

    gw = gs.Constant("gw", rng.standard_normal((5, 4 * 6 * 6)).astype(np.float32))
    gc = gs.Constant("gc", rng.standard_normal(5).astype(np.float32))
    gemm_out = gs.Variable("gemm_out", np.float32)
    y = gs.Variable("y", np.float32, [1, 5])
    nodes = [
        gs.Node("Conv", "conv", inputs=[x, w, b], outputs=[conv_out]),
        gs.Node("BatchNormalization", "bn", {"epsilon": 1e-3},
                inputs=[conv_out, *bn_params("bn", 4)], outputs=[bn_out]),
        gs.Node("Relu", "relu", inputs=[bn_out], outputs=[relu_out]),
        gs.Node("Flatten", "flatten", inputs=[relu_out], outputs=[flat]),
        gs.Node("Gemm", "gemm", {"transB": 1, "alpha": 0.5, "beta": 2.0},
                inputs=[flat, gw, gc], outputs=[gemm_out]),
        gs.Node("BatchNormalization", "bn2", inputs=[gemm_out, *bn_params("bn2", 5)], outputs=[y]),
    ]
    if shared_weight:
        side = gs.Variable("side", np.float32, [1, 4, 6, 6])
        nodes.append(gs.Node("Conv", "conv_side", inputs=[x, w], outputs=[side]))
        outputs = [y, side]
    else:
        outputs = [y]
    return gs.Graph(nodes=nodes, inputs=[x], outputs=outputs, opset=17)


def save_graph(graph: gs.Graph, path: Path, ir_version: int = 9) -> Path:
    """Export a test graph to a file."""
    model = gs.export_onnx(graph)
    model.ir_version = ir_version
    onnx.save(model, str(path))
    return path
