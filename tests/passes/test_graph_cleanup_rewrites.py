"""graph.cleanup rewrites: affine folding into Conv/ConvTranspose/Gemm and hard-swish fusion.

Every positive case compares onnxruntime on the original and the rewritten graph (optimizations
off, so the graph as written is measured) within a relative L2 of 1e-5: the rewrites only
change float rounding. Negative cases check the graph is left as it was.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from onnxshrink import runtime
from onnxshrink.passes.base import Context, PassResult
from onnxshrink.passes.graph_cleanup import CleanupGraphPass, CleanupParams
from tests.graphs import save_graph

REL_L2 = 1e-5


def _run(graph: gs.Graph, **params: object) -> PassResult:
    p = CleanupGraphPass(CleanupParams(**params))
    ctx = Context(model_path=Path("t.onnx"), opset=int(graph.opset))
    result = p.run(graph, list(graph.nodes), ctx)
    graph.cleanup().toposort()
    return result


def _ops(graph: gs.Graph) -> Counter[str]:
    return Counter(n.op for n in graph.nodes)


def _check(graph: gs.Graph, tmp_path: Path, **params: object) -> tuple[PassResult, Counter[str]]:
    """Run the pass; outputs must match the original's within REL_L2 on random inputs."""
    before = save_graph(graph.copy(), tmp_path / "before.onnx")
    result = _run(graph, **params)
    after = save_graph(graph, tmp_path / "after.onnx")
    onnx.checker.check_model(onnx.load(str(after)), full_check=True)
    rng = np.random.default_rng(7)
    feeds = {t.name: rng.uniform(-5, 5, t.shape).astype(np.float32) for t in graph.inputs}
    ref = runtime.run(runtime.session(before, opt="none"), feeds)
    got = runtime.run(runtime.session(after, opt="none"), feeds)
    for a, b in zip(ref, got):
        assert a.shape == b.shape
        err = np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(a.astype(np.float64))
        assert err <= REL_L2, err
    return result, _ops(graph)


def _const(name: str, values: np.ndarray | float) -> gs.Constant:
    return gs.Constant(name, np.asarray(values, np.float32))


def _var(name: str, shape: list[int] | None = None) -> gs.Variable:
    return gs.Variable(name, np.float32, shape)


def _rand(name: str, shape: tuple[int, ...], seed: int = 0) -> gs.Constant:
    return _const(name, np.random.default_rng(seed).standard_normal(shape))


def _graph(
    nodes: list[gs.Node], inputs: list[gs.Variable], outputs: list[gs.Variable], opset: int = 17
) -> gs.Graph:
    """A graph with inferred shapes, as `io.load` gives the passes."""
    model = gs.export_onnx(gs.Graph(nodes=nodes, inputs=inputs, outputs=outputs, opset=opset))
    return gs.import_onnx(onnx.shape_inference.infer_shapes(model, strict_mode=True))


def _after(op: str, name: str, x: gs.Tensor, const: gs.Constant, out: gs.Variable) -> gs.Node:
    return gs.Node(op, name, inputs=[x, const], outputs=[out])


# --- affine after a linear op ---------------------------------------------------------------


def _conv_mul_add(
    mul_shape: tuple[int, ...],
    add_shape: tuple[int, ...],
    *,
    group: int = 1,
    bias: bool = True,
    extra_out: bool = False,
) -> gs.Graph:
    """x[1,4,6,6] -> Conv(8 out, 3x3, pad 1, group) -> Mul(c) -> Add(c) -> y."""
    x, h, m, y = _var("x", [1, 4, 6, 6]), _var("h"), _var("m"), _var("y")
    inputs = [x, _rand("w", (8, 4 // group, 3, 3))] + ([_rand("b", (8,), 1)] if bias else [])
    conv = gs.Node(
        "Conv", "conv", {"pads": [1, 1, 1, 1], "group": group}, inputs=inputs, outputs=[h]
    )
    scale = _const("s", np.random.default_rng(2).uniform(0.5, 2, mul_shape))
    shift = _const("t", np.random.default_rng(3).standard_normal(add_shape))
    nodes = [conv, _after("Mul", "mul", h, scale, m), _after("Add", "add", m, shift, y)]
    return _graph(nodes, [x], [y, h] if extra_out else [y])


@pytest.mark.parametrize(
    ("mul_shape", "add_shape"),
    [((1,), ()), ((), (1, 8, 1, 1)), ((8, 1, 1), (1,)), ((1, 8, 1, 1), (8, 1, 1))],
)
@pytest.mark.parametrize("group", [1, 2, 4])
def test_conv_mul_add_fold_into_conv(
    tmp_path: Path, mul_shape: tuple[int, ...], add_shape: tuple[int, ...], group: int
) -> None:
    result, ops = _check(_conv_mul_add(mul_shape, add_shape, group=group), tmp_path)
    assert ops == {"Conv": 1}
    assert {"mul", "add"} <= set(result.touched)


def test_add_creates_a_missing_conv_bias(tmp_path: Path) -> None:
    graph = _conv_mul_add((1,), (1,), bias=False)
    _, ops = _check(graph, tmp_path)
    assert ops == {"Conv": 1}
    assert len(graph.nodes[0].inputs) == 3


@pytest.mark.parametrize(
    "add_shape",
    [(8,), (1, 1, 1, 1, 8), (1, 8, 6, 1)],  # width axis; adds an axis; varies along height
    ids=["last-axis", "rank-5", "per-row"],
)
def test_constant_not_per_output_channel_is_left(
    tmp_path: Path, add_shape: tuple[int, ...]
) -> None:
    x, h, y = _var("x", [1, 4, 6, 8]), _var("h"), _var("y")
    graph = _graph(
        [
            gs.Node(
                "Conv",
                "conv",
                {"pads": [1, 1, 1, 1]},
                inputs=[x, _rand("w", (8, 4, 3, 3))],
                outputs=[h],
            ),
            _after("Add", "add", h, _rand("t", add_shape), y),
        ],
        [x],
        [y],
    )
    result, ops = _check(graph, tmp_path)
    assert ops == {"Conv": 1, "Add": 1}
    assert any(s.node == "add" and "not per output channel" in s.reason for s in result.skipped)


def test_conv_output_read_elsewhere_is_left(tmp_path: Path) -> None:
    result, ops = _check(_conv_mul_add((1,), (1,), extra_out=True), tmp_path)
    assert ops == {"Conv": 1, "Mul": 1, "Add": 1}
    assert any(s.node == "mul" and "other consumers" in s.reason for s in result.skipped)


def test_shared_conv_weight_is_never_rewritten(tmp_path: Path) -> None:
    graph = _conv_mul_add((1,), (1,))
    x, w = graph.inputs[0], graph.nodes[0].inputs[1]
    side = _var("side", [1, 8, 6, 6])
    graph.nodes.append(
        gs.Node("Conv", "side", {"pads": [1, 1, 1, 1]}, inputs=[x, w], outputs=[side])
    )
    graph.outputs.append(side)
    result, ops = _check(graph, tmp_path)
    assert ops == {"Conv": 2, "Mul": 1, "Add": 1}
    assert any("shared" in s.reason for s in result.skipped)


def test_fp16_weights_are_left(tmp_path: Path) -> None:
    x, h, y = (
        gs.Variable("x", np.float16, [1, 2, 4, 4]),
        gs.Variable("h", np.float16),
        gs.Variable("y", np.float16),
    )
    w = gs.Constant("w", np.ones((2, 2, 1, 1), np.float16))
    graph = _graph(
        [
            gs.Node("Conv", "conv", inputs=[x, w], outputs=[h]),
            _after("Mul", "mul", h, gs.Constant("s", np.array([2], np.float16)), y),
        ],
        [x],
        [y],
    )
    _run(graph)
    assert _ops(graph) == {"Conv": 1, "Mul": 1}


def test_switched_off_leaves_affine_ops(tmp_path: Path) -> None:
    graph = _conv_mul_add((1,), (1,))
    _run(graph, fold_affine=False)
    assert _ops(graph) == {"Conv": 1, "Mul": 1, "Add": 1}


def test_conv_transpose_folds_and_enables_batchnorm(tmp_path: Path) -> None:
    """ConvTranspose -> Add(c) -> BatchNorm -> Mul(c): the Add folds, then the BN, then the Mul."""
    x, h, a, z, y = _var("x", [1, 4, 5, 5]), _var("h"), _var("a"), _var("z"), _var("y")
    rng = np.random.default_rng(4)
    bn = [
        _const(f"bn{k}", v)
        for k, v in enumerate(
            [
                rng.uniform(0.5, 2, 6),
                rng.standard_normal(6),
                rng.standard_normal(6),
                rng.uniform(0.5, 2, 6),
            ]
        )
    ]
    graph = _graph(
        [
            gs.Node(
                "ConvTranspose",
                "ct",
                {"strides": [2, 2]},
                inputs=[x, _rand("w", (4, 6, 3, 3))],
                outputs=[h],
            ),
            _after("Add", "add", h, _rand("t", (1, 6, 1, 1), 5), a),
            gs.Node("BatchNormalization", "bn", inputs=[a, *bn], outputs=[z]),
            _after("Mul", "mul", z, _const("s", [0.5]), y),
        ],
        [x],
        [y],
    )
    result, ops = _check(graph, tmp_path)
    assert ops == {"ConvTranspose": 1}
    assert {"add", "bn", "mul"} <= set(result.touched)


def test_grouped_conv_transpose_is_left(tmp_path: Path) -> None:
    x, h, y = _var("x", [1, 4, 5, 5]), _var("h"), _var("y")
    graph = _graph(
        [
            gs.Node(
                "ConvTranspose",
                "ct",
                {"group": 2},
                inputs=[x, _rand("w", (4, 3, 3, 3))],
                outputs=[h],
            ),
            _after("Mul", "mul", h, _const("s", [2.0]), y),
        ],
        [x],
        [y],
    )
    result, ops = _check(graph, tmp_path)
    assert ops == {"ConvTranspose": 1, "Mul": 1}
    assert any("grouped ConvTranspose" in s.reason for s in result.skipped)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("with_c", [False, True])
def test_gemm_mul_add_fold(tmp_path: Path, trans_b: int, with_c: bool) -> None:
    x, h, m, y = _var("x", [3, 4]), _var("h"), _var("m"), _var("y")
    w = _rand("w", (5, 4) if trans_b else (4, 5))
    inputs = [x, w] + ([_rand("c", (5,), 1)] if with_c else [])
    graph = _graph(
        [
            gs.Node(
                "Gemm",
                "gemm",
                {"transB": trans_b, "alpha": 0.5, "beta": 2.0},
                inputs=inputs,
                outputs=[h],
            ),
            _after("Mul", "mul", h, _rand("s", (5,), 2), m),
            _after("Add", "add", m, _rand("t", (1, 5), 3), y),
        ],
        [x],
        [y],
    )
    _, ops = _check(graph, tmp_path)
    assert ops == {"Gemm": 1}


def test_gemm_constant_per_row_is_left(tmp_path: Path) -> None:
    x, h, y = _var("x", [3, 4]), _var("h"), _var("y")
    graph = _graph(
        [
            gs.Node("Gemm", "gemm", inputs=[x, _rand("w", (4, 3))], outputs=[h]),
            _after("Mul", "mul", h, _rand("s", (3, 1)), y),
        ],
        [x],
        [y],
    )
    _, ops = _check(graph, tmp_path)
    assert ops == {"Gemm": 1, "Mul": 1}


# --- affine before a Conv -------------------------------------------------------------------


def _affine_conv(
    op: str,
    const_shape: tuple[int, ...],
    *,
    pads: int = 0,
    group: int = 1,
    x_shape: list[int] | None = None,
    convs: int = 1,
    auto_pad: str = "NOTSET",
) -> gs.Graph:
    """x -> op(c) -> z -> Conv(8 out, 3x3, group) [x convs] -> y..."""
    x, z = _var("x", x_shape or [1, 4, 7, 7]), _var("z")
    const = _const("c", np.random.default_rng(1).uniform(0.5, 2, const_shape))
    nodes, outs = [_after(op, "pre", x, const, z)], []
    for k in range(convs):
        outs.append(_var(f"y{k}"))
        nodes.append(
            gs.Node(
                "Conv",
                f"conv{k}",
                {"pads": [pads] * 4, "group": group, "auto_pad": auto_pad}
                if auto_pad == "NOTSET"
                else {"auto_pad": auto_pad},
                inputs=[z, _rand(f"w{k}", (8, 4 // group, 3, 3), k)],
                outputs=[outs[-1]],
            )
        )
    return _graph(nodes, [x], outs)


@pytest.mark.parametrize("const_shape", [(), (1,), (4, 1, 1), (1, 4, 1, 1)])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("pads", [0, 1])
def test_mul_folds_into_following_conv(
    tmp_path: Path, const_shape: tuple[int, ...], group: int, pads: int
) -> None:
    _, ops = _check(_affine_conv("Mul", const_shape, pads=pads, group=group), tmp_path)
    assert ops == {"Conv": 1}


@pytest.mark.parametrize("const_shape", [(), (4, 1, 1)])
@pytest.mark.parametrize("group", [1, 4])
def test_add_folds_into_unpadded_conv(
    tmp_path: Path, const_shape: tuple[int, ...], group: int
) -> None:
    _, ops = _check(_affine_conv("Add", const_shape, group=group), tmp_path)
    assert ops == {"Conv": 1}


def test_add_before_padded_conv_is_left(tmp_path: Path) -> None:
    result, ops = _check(_affine_conv("Add", (1,), pads=1), tmp_path)
    assert ops == {"Add": 1, "Conv": 1}
    assert any(s.node == "pre" and "pads" in s.reason for s in result.skipped)


def test_add_before_same_padded_conv_is_left(tmp_path: Path) -> None:
    graph = _affine_conv("Add", (1,), auto_pad="SAME_UPPER")
    _, ops = _check(graph, tmp_path)
    assert ops == {"Add": 1, "Conv": 1}


def test_affine_read_by_two_convs_folds_into_both(tmp_path: Path) -> None:
    _, ops = _check(_affine_conv("Add", (4, 1, 1), convs=2), tmp_path)
    assert ops == {"Conv": 2}


def test_affine_output_as_graph_output_is_left(tmp_path: Path) -> None:
    graph = _affine_conv("Mul", (1,))
    graph.outputs.append(graph.nodes[0].outputs[0])
    _, ops = _check(graph, tmp_path)
    assert ops == {"Mul": 1, "Conv": 1}


def test_affine_read_by_another_op_is_left(tmp_path: Path) -> None:
    graph = _affine_conv("Mul", (1,))
    side = _var("side", [1, 4, 7, 7])
    graph.nodes.append(gs.Node("Relu", "relu", inputs=[graph.nodes[0].outputs[0]], outputs=[side]))
    graph.outputs.append(side)
    _, ops = _check(graph, tmp_path)
    assert ops == {"Mul": 1, "Conv": 1, "Relu": 1}


def test_constant_that_would_broadcast_the_input_is_left(tmp_path: Path) -> None:
    """x has 1 channel; Mul by a [1,4,1,1] constant makes 4: folding would feed the Conv 1."""
    _, ops = _check(_affine_conv("Mul", (1, 4, 1, 1), x_shape=[1, 1, 7, 7]), tmp_path)
    assert ops == {"Mul": 1, "Conv": 1}


def test_rank_raising_constant_before_conv1d_is_left(tmp_path: Path) -> None:
    """x is [4, 9]; Mul by a [1, 1, 1] constant makes the [1, 4, 9] the Conv needs."""
    x, z, y = _var("x", [4, 9]), _var("z"), _var("y")
    graph = _graph(
        [
            _after("Mul", "pre", x, _const("c", np.full((1, 1, 1), 2.0)), z),
            gs.Node("Conv", "conv", inputs=[z, _rand("w", (3, 4, 3))], outputs=[y]),
        ],
        [x],
        [y],
    )
    result, ops = _check(graph, tmp_path)
    assert ops == {"Mul": 1, "Conv": 1}
    assert any("broadcast" in s.reason for s in result.skipped)


@pytest.mark.parametrize("scale_shape", [(1,), (4, 1, 1)])
@pytest.mark.parametrize("group", [1, 4])
def test_mul_add_before_padded_conv_keeps_one_add(
    tmp_path: Path, scale_shape: tuple[int, ...], group: int
) -> None:
    """Mul(s) -> Add(t) -> padded Conv becomes Add(t / s) -> Conv(W * s)."""
    x, m, z, y = _var("x", [1, 4, 7, 7]), _var("m"), _var("z"), _var("y")
    graph = _graph(
        [
            _after(
                "Mul",
                "mul",
                x,
                _const("s", np.random.default_rng(1).uniform(-2, 2, scale_shape)),
                m,
            ),
            _after("Add", "add", m, _const("t", [0.75]), z),
            gs.Node(
                "Conv",
                "conv",
                {"pads": [1, 1, 1, 1], "group": group},
                inputs=[z, _rand("w", (8, 4 // group, 3, 3))],
                outputs=[y],
            ),
        ],
        [x],
        [y],
    )
    result, ops = _check(graph, tmp_path)
    assert ops == {"Add": 1, "Conv": 1}
    assert "mul" in result.touched
    assert _run(graph).modified is False  # idempotent


# --- hard-sigmoid / hard-swish --------------------------------------------------------------


def _hardswish(variant: str, opset: int = 17, *, clip_attrs: bool = False) -> gs.Graph:
    """x -> Conv -> hard-swish in the exported form `variant` -> y."""
    x, h = _var("x", [1, 3, 6, 6]), _var("h", [1, 4, 6, 6])
    a, c, m, y = _var("a"), _var("c"), _var("m"), _var("y")
    nodes = [
        gs.Node(
            "Conv",
            "conv",
            {"pads": [1, 1, 1, 1]},
            inputs=[x, _rand("w", (4, 3, 3, 3))],
            outputs=[h],
        )
    ]
    add_in = [_const("three", [3.0]), h] if variant == "commuted" else [h, _const("three", [3.0])]
    nodes.append(gs.Node("Add", "add", inputs=add_in, outputs=[a]))
    if clip_attrs:
        nodes.append(gs.Node("Clip", "clip", {"min": 0.0, "max": 6.0}, inputs=[a], outputs=[c]))
    else:
        nodes.append(
            gs.Node("Clip", "clip", inputs=[a, _const("lo", 0.0), _const("hi", 6.0)], outputs=[c])
        )
    six, sixth = _const("six", 6.0), _const("sixth", np.float32(1 / 6))
    if variant in ("mul-div", "commuted"):
        nodes += [
            gs.Node("Mul", "mul", inputs=[c, h] if variant == "commuted" else [h, c], outputs=[m]),
            gs.Node("Div", "div", inputs=[m, six], outputs=[y]),
        ]
    elif variant == "div-mul":
        nodes += [
            gs.Node("Div", "div", inputs=[c, six], outputs=[m]),
            gs.Node("Mul", "mul", inputs=[m, h], outputs=[y]),
        ]
    elif variant == "mul-sixth":
        nodes += [
            gs.Node("Mul", "mul", inputs=[h, c], outputs=[m]),
            gs.Node("Mul", "mul6", inputs=[sixth, m], outputs=[y]),
        ]
    elif variant == "hardsigmoid":
        nodes.append(gs.Node("Div", "div", inputs=[c, six], outputs=[y]))
    return _graph(nodes, [x], [y], opset)


@pytest.mark.parametrize("variant", ["mul-div", "div-mul", "mul-sixth", "commuted"])
@pytest.mark.parametrize("opset", [13, 14, 17])
def test_hardswish_variants_are_fused(tmp_path: Path, variant: str, opset: int) -> None:
    result, ops = _check(_hardswish(variant, opset), tmp_path)
    if opset >= 14:
        assert ops == {"Conv": 1, "HardSwish": 1}
    else:
        assert ops == {"Conv": 1, "HardSigmoid": 1, "Mul": 1}
    assert any("HardS" in str(t.get("action")) for t in result.touched.values())


def test_hardswish_with_clip_attributes(tmp_path: Path) -> None:
    _, ops = _check(_hardswish("mul-div", opset=10, clip_attrs=True), tmp_path)
    assert ops == {"Conv": 1, "HardSigmoid": 1, "Mul": 1}


def test_hardsigmoid_alone_is_fused(tmp_path: Path) -> None:
    graph = _hardswish("hardsigmoid")
    _, ops = _check(graph, tmp_path)
    assert ops == {"Conv": 1, "HardSigmoid": 1}
    node = next(n for n in graph.nodes if n.op == "HardSigmoid")
    assert node.attrs == {"alpha": pytest.approx(1 / 6), "beta": pytest.approx(0.5)}


@pytest.mark.parametrize("tensor", ["a", "c", "m"])
def test_hardswish_with_intermediate_read_elsewhere_is_left(tmp_path: Path, tensor: str) -> None:
    graph = _hardswish("mul-div")
    graph.outputs.append(graph.tensors()[tensor])
    _, ops = _check(graph, tmp_path)
    assert ops["Clip"] == 1 and "HardSwish" not in ops


def test_hardswish_with_wrong_constants_is_left(tmp_path: Path) -> None:
    graph = _hardswish("mul-div")
    graph.tensors()["six"].values = np.asarray(5.0, np.float32)
    _, ops = _check(graph, tmp_path)
    assert ops["Clip"] == 1 and "HardSwish" not in ops


def test_fuse_activations_switched_off(tmp_path: Path) -> None:
    graph = _hardswish("mul-div")
    _run(graph, fuse_activations=False)
    assert _ops(graph)["Clip"] == 1


def test_learnable_affine_block_shrinks(tmp_path: Path) -> None:
    """The PP-LCNet block: Conv -> Mul -> Add -> hard-swish -> Mul -> Add -> depthwise Conv."""
    x, h, m1, a1 = _var("x", [1, 4, 8, 8]), _var("h", [1, 8, 8, 8]), _var("m1"), _var("a1")
    p, c, q, r, m2, a2, y = (_var(n) for n in ("p", "c", "q", "r", "m2", "a2", "y"))
    graph = _graph(
        [
            gs.Node("Conv", "pw", inputs=[x, _rand("w", (8, 4, 1, 1))], outputs=[h]),
            _after("Mul", "lab_mul", h, _const("s1", [1.3]), m1),
            _after("Add", "lab_add", m1, _const("t1", [-0.2]), a1),
            _after("Add", "hs_add", a1, _const("three", [3.0]), p),
            gs.Node(
                "Clip", "hs_clip", inputs=[p, _const("lo", 0.0), _const("hi", 6.0)], outputs=[c]
            ),
            gs.Node("Mul", "hs_mul", inputs=[a1, c], outputs=[q]),
            _after("Div", "hs_div", q, _const("six", [6.0]), r),
            _after("Mul", "lab2_mul", r, _const("s2", [0.8]), m2),
            _after("Add", "lab2_add", m2, _const("t2", [0.1]), a2),
            gs.Node(
                "Conv",
                "dw",
                {"pads": [1, 1, 1, 1], "group": 8},
                inputs=[a2, _rand("dw_w", (8, 1, 3, 3), 1), _rand("dw_b", (8,), 2)],
                outputs=[y],
            ),
        ],
        [x],
        [y],
        opset=12,
    )
    _, ops = _check(graph, tmp_path)
    assert ops == {"Conv": 2, "HardSigmoid": 1, "Mul": 1, "Add": 1}
