"""quant.smooth: exact in float, folds into the producer, flattens activation outliers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from onnxshrink import runtime
from onnxshrink.passes.base import Context
from onnxshrink.passes.quant_smooth import SmoothQuantParams, SmoothQuantPass
from tests.graphs import save_graph
from tests.passes.quant_support import compress, worst_cosine


def _ln_block(seed: int = 0) -> gs.Graph:
    """x -> LayerNorm -> (MatMul q, MatMul k) with one outlier channel in LayerNorm's scale."""
    rng = np.random.default_rng(seed)
    d = 32
    gamma = np.ones(d, np.float32)
    gamma[3] = 40.0  # the outlier channel transformers are known for
    x = gs.Variable("x", np.float32, [2, 8, d])
    h = gs.Variable("h", np.float32, [2, 8, d])
    q = gs.Variable("q", np.float32, [2, 8, d])
    k = gs.Variable("k", np.float32, [2, 8, d])
    nodes = [
        gs.Node(
            "LayerNormalization",
            "ln",
            {"axis": -1},
            inputs=[
                x,
                gs.Constant("gamma", gamma),
                gs.Constant("beta", rng.standard_normal(d).astype(np.float32) * 0.1),
            ],
            outputs=[h],
        ),
        gs.Node(
            "MatMul",
            "mq",
            inputs=[
                h,
                gs.Constant("wq", (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)),
            ],
            outputs=[q],
        ),
        gs.Node(
            "MatMul",
            "mk",
            inputs=[
                h,
                gs.Constant("wk", (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)),
            ],
            outputs=[k],
        ),
    ]
    return gs.Graph(nodes=nodes, inputs=[x], outputs=[q, k], opset=17)


@pytest.mark.ort
def test_smoothing_is_exact_in_float_and_flattens_the_outlier(tmp_path: Path) -> None:
    graph = _ln_block()
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((2, 8, 32)).astype(np.float32)} for _ in range(4)]
    ref = save_graph(graph.copy(), tmp_path / "ref.onnx")
    p = SmoothQuantPass(SmoothQuantParams(alpha=0.5))
    result = p.run(
        graph,
        [n for n in graph.nodes if n.op == "MatMul"],
        Context(model_path=ref, opset=17, feeds=feeds, workdir=tmp_path),
    )
    graph.cleanup().toposort()
    assert set(result.touched) == {"mq", "mk"} and result.stats["groups"] == 1
    ln = next(n for n in graph.nodes if n.op == "LayerNormalization")
    gamma = ln.inputs[1].values
    assert gamma.max() / np.median(gamma) < 40.0 / 2  # the outlier is much smaller now
    out = save_graph(graph, tmp_path / "smooth.onnx")
    for f in feeds:
        for a, b in zip(runtime.run(runtime.session(ref), f), runtime.run(runtime.session(out), f)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.ort
def test_smoothing_then_int8_is_more_accurate_with_outliers(tmp_path: Path) -> None:
    from onnxshrink.passes.quant_qdq import QdqQuantPass

    rng = np.random.default_rng(2)
    feeds = [{"x": rng.standard_normal((2, 8, 32)).astype(np.float32)} for _ in range(8)]
    errors = {}
    for smooth in (False, True):
        graph = _ln_block()
        ref = save_graph(graph.copy(), tmp_path / "ref.onnx")
        ctx = Context(model_path=ref, opset=17, feeds=feeds, workdir=tmp_path)
        if smooth:
            SmoothQuantPass().run(graph, [n for n in graph.nodes if n.op == "MatMul"], ctx)
            graph.cleanup().toposort()
        QdqQuantPass().run(graph, [n for n in graph.nodes if n.op == "MatMul"], ctx)
        graph.cleanup().toposort()
        out = save_graph(graph, tmp_path / f"q{smooth}.onnx")
        err = 0.0
        for f in feeds:
            a = runtime.run(runtime.session(ref), f)[0]
            b = runtime.run(runtime.session(out), f)[0]
            err += float(np.linalg.norm(a - b) / np.linalg.norm(a))
        errors[smooth] = err
    assert errors[True] < 0.7 * errors[False], errors


@pytest.mark.ort
def test_transformer_sample_stays_exact(tmp_path: Path) -> None:
    report = compress(
        "transformer", [{"pass": "graph.cleanup"}, {"pass": "quant.smooth"}], tmp_path / "t.onnx"
    )
    assert worst_cosine(report) > 0.999999
    touched = report.steps[1].touched
    # q/k/v read LN1 and the FFN up LN2: the norms absorb 1/s; the output projection and the
    # FFN down read attention/Gelu outputs: a Mul in front of them scales instead
    assert not touched["attn.q.matmul"]["inserted_mul"]
    assert touched["attn.out.matmul"]["inserted_mul"]
    assert len(touched) == 6


def test_alpha_is_checked() -> None:
    with pytest.raises(Exception, match="alpha"):
        SmoothQuantParams(alpha=1.5).check()
