"""quant.qdq: numerics against the original AND the integer kernels onnxruntime really runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from onnxshrink import runtime
from onnxshrink.calibration import collect
from onnxshrink.ir import io
from onnxshrink.kernels import quantize as qk
from onnxshrink.passes import qdq_probe
from onnxshrink.passes.base import Context
from onnxshrink.passes.qdq_guard import CandidateBuilder, layer_gains
from onnxshrink.passes.qdq_materialise import WeightConfig
from onnxshrink.passes.qdq_plan import PlanOptions, plan
from onnxshrink.passes.quant_qdq import QdqQuantParams, QdqQuantPass
from tests.conftest import SAMPLES
from tests.graphs import save_graph
from tests.passes.quant_support import compress, fused_ops, worst_cosine

CLEANUP = {"pass": "graph.cleanup"}

#: model -> (minimum cosine to the original, fused op types that must appear, op types that
#: must not: float kernels the quantized ops would otherwise run in)
EXPECT = {
    "cnn": (
        0.95,
        {"QLinearConv": 8, "QGemm": 1, "QLinearConcat": 1, "QLinearGlobalAveragePool": 1},
        {"Conv", "Gemm", "FusedConv", "FusedGemm"},
    ),
    "mlp": (0.998, {"QGemm": 3}, {"Gemm", "FusedGemm", "MatMul"}),
    "transformer": (0.999, {"MatMulIntegerToFloat": 6}, {"QLinearMatMul"}),
    "fp16": (0.999, {"QGemm": 2}, {"Gemm", "FusedGemm"}),
    "control_flow": (0.999999, {"If": 1, "Loop": 1}, {"QuantizeLinear"}),
}


@pytest.mark.ort
@pytest.mark.parametrize("model", sorted(EXPECT))
def test_sample_models_run_as_integer_kernels(model: str, tmp_path: Path) -> None:
    min_cos, present, absent = EXPECT[model]
    out = tmp_path / f"{model}.onnx"
    report = compress(model, [CLEANUP, {"pass": "quant.qdq"}], out)
    assert worst_cosine(report) >= min_cos
    ops = fused_ops(out)
    for op, count in present.items():
        assert ops[op] >= count, (op, dict(ops))
    assert not absent & set(ops), dict(ops)
    step = report.steps[1]
    if model == "control_flow":
        reasons = {s["node"]: s["reason"] for s in step.skipped}
        assert "control-flow" in reasons["if"] and "control-flow" in reasons["loop"]
    else:
        assert step.stats["calibration_source"] == "samples"
        assert report.after is not None
        assert report.after.weight_bytes < report.before.weight_bytes


@pytest.mark.ort
@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_every_calibration_method_holds_on_the_transformer(method: str, tmp_path: Path) -> None:
    report = compress(
        "transformer",
        [CLEANUP, {"pass": "quant.qdq", "params": {"calibration": method}}],
        tmp_path / "t.onnx",
    )
    assert worst_cosine(report) >= 0.998


def _run(graph: gs.Graph, feeds: list[dict[str, np.ndarray]], **params: object) -> object:
    ctx = Context(model_path=Path("m.onnx"), opset=int(graph.opset), feeds=feeds)
    p = QdqQuantPass(QdqQuantParams(**params))
    targets = [n for n in graph.nodes if p.default_ops is None or n.op in p.default_ops]
    result = p.run(graph, targets, ctx)
    graph.cleanup().toposort()
    return result


def _mlp_feeds() -> list[dict[str, np.ndarray]]:
    npz = np.load(SAMPLES / "mlp.npz")
    return [{"features": npz["features"][i]} for i in range(8)]


def test_idempotent_second_run_changes_nothing() -> None:
    loaded = io.load(SAMPLES / "mlp.onnx")
    first = _run(loaded.graph, _mlp_feeds())
    assert first.modified
    before = io.to_model(loaded.graph, loaded.info).SerializeToString()
    second = _run(loaded.graph, _mlp_feeds())
    assert not second.modified
    assert all("Q/DQ" in s.reason or "carry" in s.reason for s in second.skipped)
    assert io.to_model(loaded.graph, loaded.info).SerializeToString() == before


def _tied_graph() -> gs.Graph:
    rng = np.random.default_rng(0)
    x = gs.Variable("x", np.float32, [2, 16])
    w = gs.Constant("w", rng.standard_normal((16, 16)).astype(np.float32))
    h = gs.Variable("h", np.float32, [2, 16])
    r = gs.Variable("r", np.float32, [2, 16])
    y = gs.Variable("y", np.float32, [2, 16])
    nodes = [
        gs.Node("MatMul", "mm1", inputs=[x, w], outputs=[h]),
        gs.Node("Relu", "relu", inputs=[h], outputs=[r]),
        gs.Node("MatMul", "mm2", inputs=[r, w], outputs=[y]),
    ]
    return gs.Graph(nodes=nodes, inputs=[x], outputs=[y], opset=17)


@pytest.mark.ort
def test_tied_weight_gets_one_quantization(tmp_path: Path) -> None:
    graph = _tied_graph()
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((2, 16)).astype(np.float32)} for _ in range(4)]
    ref = save_graph(graph.copy(), tmp_path / "ref.onnx")
    _run(graph, feeds)
    int8 = [
        t
        for t in graph.tensors().values()
        if isinstance(t, gs.Constant)
        and t.values.dtype in (np.int8, np.uint8)
        and len(t.shape) == 2
    ]
    assert len(int8) == 1, [t.name for t in int8]  # one quantized weight for both consumers
    dqs = [n for n in graph.nodes if n.op == "DequantizeLinear" and n.inputs[0] is int8[0]]
    assert len(dqs) == 2  # one DequantizeLinear per consumer (what the fusions want)
    assert dqs[0].inputs[1] is dqs[1].inputs[1]  # same scale: one consistent quantization
    out = save_graph(graph, tmp_path / "q.onnx")
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert fused_ops(out)["MatMulIntegerToFloat"] + fused_ops(out)["QLinearMatMul"] == 2
    for f in feeds:
        a = runtime.run(runtime.session(ref), f)[0]
        b = runtime.run(runtime.session(out), f)[0]
        cos = float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))
        assert cos > 0.999


def test_without_samples_calibrates_on_seeded_random_inputs() -> None:
    loaded = io.load(SAMPLES / "mlp.onnx")
    result = _run(loaded.graph, [])
    assert result.stats["calibration_source"].startswith("random")


@pytest.mark.ort
def test_matmul_bias_add_becomes_qgemm_not_an_fp32_gemm(tmp_path: Path) -> None:
    """The DESIGN.md trap: DQ -> MatMul -> Add(bias) fused into an fp32 Gemm (slower than fp32)."""
    loaded = io.load(SAMPLES / "mlp.onnx")
    _run(loaded.graph, _mlp_feeds())
    add = next(n for n in loaded.graph.nodes if n.name == "fc2.add")
    bias_dq = next(t for t in add.inputs if t.inputs and t.inputs[0].op == "DequantizeLinear")
    assert bias_dq.inputs[0].inputs[0].values.dtype == np.int32
    path = tmp_path / "mlp.onnx"
    io.save(io.to_model(loaded.graph, loaded.info), path)
    ops = fused_ops(path)
    assert ops["QGemm"] == 3 and "FusedGemm" not in ops and "Gemm" not in ops


def _weight_codes(graph: gs.Graph) -> dict[str, np.ndarray]:
    return {
        n.name: n.inputs[0].values
        for n in graph.nodes
        if n.op == "DequantizeLinear"
        and isinstance(n.inputs[0], gs.Constant)
        and n.inputs[0].values.dtype != np.int32
    }


def test_weight_dtype_auto_avoids_u8s8_saturation_on_signed_inputs() -> None:
    loaded = io.load(SAMPLES / "mlp.onnx")
    _run(loaded.graph, _mlp_feeds())
    weights = _weight_codes(loaded.graph)
    # fc1 reads the signed model input (zero point ~128): uint8 weights (zero point 128), which
    # u8u8 kernels never saturate; the others read ReLU outputs (zero point 0): full int8
    assert weights["fc1.weight_DequantizeLinear"].dtype == np.uint8
    fc3 = weights["fc3.weight_DequantizeLinear"]
    assert fc3.dtype == np.int8 and (fc3.min() < -64 or fc3.max() > 63)


def test_weight_dtype_auto_gives_convolutions_7_bit_weights_on_signed_inputs() -> None:
    """uint8 weights would push QLinearConv onto slower u8u8 kernels: 7-bit int8 instead."""
    loaded = io.load(SAMPLES / "cnn.onnx")
    npz = np.load(SAMPLES / "cnn.npz")
    _run(loaded.graph, [{"image": npz["image"][i]} for i in range(8)])
    weights = _weight_codes(loaded.graph)
    assert all(w.dtype == np.int8 for w in weights.values())
    narrow = [w for w in weights.values() if w.min() >= -64 and w.max() <= 63]
    wide = [w for w in weights.values() if w.min() < -64 or w.max() > 63]
    assert narrow and wide, "signed inputs get 7-bit weights, ReLU-fed layers full int8"


def test_unknown_param_value_is_rejected() -> None:
    with pytest.raises(Exception, match="percentile"):
        QdqQuantParams(percentile=10.0).check()


@pytest.mark.ort
def test_accuracy_guard_returns_the_fewest_sensitive_layers_to_float(tmp_path: Path) -> None:
    """The cnn's classifier logits cancel 12x, so its head dominates the error: the guard finds
    it from the graph and the samples, keeps it in float and quantizes everything else."""
    step = {"pass": "quant.qdq", "params": {"guard": "accuracy"}}
    out = tmp_path / "cnn.onnx"
    report = compress("cnn", [CLEANUP, step], out, min_cosine=0.99)
    guard = report.steps[1].stats["guard"]
    assert [k["node"] for k in guard["kept_float"]] == ["head.fc"]
    assert guard["kept_float"][0]["error"] > 0
    # all int8 (fails), then the most sensitive layer alone in float (holds): no search
    assert guard["evaluations"] == 2
    assert report.ok and worst_cosine(report) >= 0.99
    ops = fused_ops(out)
    assert ops["QLinearConv"] == 8 and ops["Gemm"] == 1  # the head alone runs in float


@pytest.mark.ort
def test_latency_guard_never_ships_a_slower_model(tmp_path: Path) -> None:
    """On a tiny MLP every int8 variant is slower than fp32 (DESIGN.md): leave it in float."""
    step = {"pass": "quant.qdq", "params": {"guard": "latency"}}
    out = tmp_path / "mlp.onnx"
    report = compress("mlp", [CLEANUP, step], out)
    guard = report.steps[1].stats["guard"]
    assert "not faster than float" in guard["gave_up"]
    # timed, or found slower on every layer and as a whole by the probe (then never timed)
    measured = guard.get("latency") or {"ratio": guard["probe"]["kernel_time_ratio"]}
    assert measured["ratio"] > 1.0
    assert not report.steps[1].touched
    assert "QuantizeLinear" not in fused_ops(out)


def _opset11_graph(softmax_axis: int, rank3: bool) -> gs.Graph:
    """Conv -> Relu -> Unsqueeze(axes attr) -> ... -> Softmax, written for opset 11."""
    rng = np.random.default_rng(3)
    x = gs.Variable("x", np.float32, [1, 3, 8, 8])
    w = gs.Constant("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32))
    c = gs.Variable("c", np.float32)
    r = gs.Variable("r", np.float32)
    u = gs.Variable("u", np.float32)
    f = gs.Variable("f", np.float32)
    y = gs.Variable("y", np.float32)
    nodes = [
        gs.Node("Conv", "conv", inputs=[x, w], outputs=[c]),
        gs.Node("Relu", "relu", inputs=[c], outputs=[r]),
        gs.Node("Unsqueeze", "unsq", {"axes": [0]}, inputs=[r], outputs=[u]),
        gs.Node(
            "Reshape",
            "flat",
            inputs=[u, gs.Constant("shape", np.array([1, 4, 36] if rank3 else [1, 144], np.int64))],
            outputs=[f],
        ),
        gs.Node("Softmax", "sm", {"axis": softmax_axis}, inputs=[f], outputs=[y]),
    ]
    return gs.Graph(nodes=nodes, inputs=[x], outputs=[y], opset=11)


@pytest.mark.ort
def test_opset_11_model_is_raised_to_13_safely(tmp_path: Path) -> None:
    graph = _opset11_graph(softmax_axis=1, rank3=False)
    feeds = [
        {"x": np.random.default_rng(i).standard_normal((1, 3, 8, 8)).astype(np.float32)}
        for i in range(4)
    ]
    ref = save_graph(graph.copy(), tmp_path / "ref.onnx", ir_version=7)
    result = _run(graph, feeds)
    assert result.stats["opset"] == "11 -> 13"
    assert result.stats["opset_adapted_nodes"] == ["unsq"]
    unsq = next(n for n in graph.nodes if n.op == "Unsqueeze")
    assert "axes" not in unsq.attrs and unsq.inputs[1].values.tolist() == [0]
    out = save_graph(graph, tmp_path / "q.onnx", ir_version=7)
    assert fused_ops(out)["QLinearConv"] == 1
    for f in feeds:
        a = runtime.run(runtime.session(ref), f)[0]
        b = runtime.run(runtime.session(out), f)[0]
        assert float(np.abs(a - b).max()) < 0.05


def test_softmax_over_a_non_last_axis_blocks_the_opset_change() -> None:
    graph = _opset11_graph(softmax_axis=1, rank3=True)  # flattens [4, 36] before opset 13
    feeds = [{"x": np.zeros((1, 3, 8, 8), np.float32)}]
    before = [n.op for n in graph.nodes]
    result = _run(graph, feeds)
    assert not result.modified and [n.op for n in graph.nodes] == before
    assert any("non-last axis" in s.reason for s in result.skipped)


@pytest.mark.ort
def test_model_with_external_data(tmp_path: Path) -> None:
    from onnxshrink import api
    from onnxshrink.recipe.loader import parse_recipe

    src = tmp_path / "src"
    src.mkdir()
    model = onnx.load(str(SAMPLES / "mlp.onnx"))
    onnx.save(
        model,
        str(src / "mlp.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="mlp.weights",
        size_threshold=0,
    )
    out = tmp_path / "out" / "mlp.onnx"
    out.parent.mkdir()
    recipe = parse_recipe(
        {"step": [CLEANUP, {"pass": "quant.qdq"}], "validate": {"tolerance": {"min_cosine": 0.998}}}
    )
    report = api.compress(src / "mlp.onnx", recipe, out, samples=SAMPLES / "mlp.npz")
    assert report.ok
    assert report.steps[1].stats["calibration_source"] == "samples"
    assert fused_ops(out)["QGemm"] == 3


def test_conv_transpose_is_left_float_where_onnxruntime_has_no_int8_kernel() -> None:
    rng = np.random.default_rng(4)
    x = gs.Variable("x", np.float32, [1, 4, 8, 8])
    y = gs.Variable("y", np.float32, [1, 2, 16, 16])
    w = gs.Constant("w", rng.standard_normal((4, 2, 2, 2)).astype(np.float32))
    node = gs.Node("ConvTranspose", "up", {"strides": [2, 2]}, inputs=[x, w], outputs=[y])
    graph = gs.Graph(nodes=[node], inputs=[x], outputs=[y], opset=17)
    result = _run(graph, [{"x": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)}])
    assert not result.modified
    assert "ConvTranspose" in result.skipped[0].reason or "ConvTranspose" in str(result.skipped)


def _cnn_candidates() -> tuple[gs.Graph, CandidateBuilder, dict[int, gs.Node], dict]:
    """The sample cnn, a builder of its int8 candidates, its layers by index, one feed."""
    graph = io.load(SAMPLES / "cnn.onnx").graph
    feed = {"image": np.load(SAMPLES / "cnn.npz")["image"][0]}
    qparams = {}
    anchors = [n for n in graph.nodes if n.op in ("Conv", "Gemm")]
    qplan = plan(graph, anchors, PlanOptions())
    for name in qplan.activations:  # wide ranges: the probe only times, numerics do not matter
        qparams[name] = qk.QParams(np.float32(0.05), np.uint8(128), "uint8")
    build = CandidateBuilder(graph, anchors, PlanOptions(), qparams, {}, WeightConfig(), "auto")
    return graph, build, {graph.nodes.index(a): a for a in qplan.anchors}, feed


@pytest.mark.ort
def test_latency_probe_times_every_layer_in_float_and_int8(tmp_path: Path) -> None:
    """onnxruntime's profiler names each fused kernel after the node it replaced (NCHWc convs
    after their output), so every planned layer of the cnn gets a float and an int8 time."""
    graph, build, layers, feed = _cnn_candidates()
    files = build.files(tmp_path)
    with files.exported(graph, "f") as model:
        t_float = qdq_probe.layer_times(qdq_probe.node_times(model, feed, tmp_path), layers)
    with files.exported(build(frozenset()), "q") as model:
        t_quant = qdq_probe.layer_times(qdq_probe.node_times(model, feed, tmp_path), layers)
    assert set(t_float) == set(layers) and set(t_quant) == set(layers)
    assert all(v > 0 for v in [*t_float.values(), *t_quant.values()])
    gains, ratio = layer_gains(build, layers, feed, tmp_path)
    assert set(gains) == set(layers) and ratio > 0
    # profiles are removed; the float graph and the full candidate stay for reuse, once each
    models = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".onnx")
    assert models == ["kept0.onnx", "kept1.onnx"]
    # their weights reach onnxruntime from memory: the files hold placeholders only
    assert all((tmp_path / m).stat().st_size < 64 << 10 for m in models)


@pytest.mark.ort
def test_the_probe_profiles_float_and_int8_in_alternation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One run of each in turn, the same number of runs each, at least `min_runs` (in sequence
    a slow spell of a shared machine lands on one model only)."""
    graph, build, _, feed = _cnn_candidates()
    files = build.files(tmp_path)
    order: list[int] = []
    made: list[object] = []
    real_session = collect.ExportedModel.session

    def recorded(self: collect.ExportedModel, **kwargs: object) -> object:
        sess = real_session(self, **kwargs)
        index = len(made)  # sessions are made in the order of the models given
        made.append(sess)

        class Recorded:
            def run(self, *a: object, **k: object) -> object:
                order.append(index)
                return sess.run(*a, **k)

            def end_profiling(self) -> str:
                return str(sess.end_profiling())

        return Recorded()

    monkeypatch.setattr(collect.ExportedModel, "session", recorded)
    with files.exported(graph, "f") as f, files.exported(build(frozenset()), "q") as q:
        times = qdq_probe.paired_node_times([f, q], feed, tmp_path, min_runs=4, budget_s=0.0)
    assert order == [0, 1] * 5  # a warm-up run each, then 4 alternating pairs
    assert all(t for t in times) and set(times[0]) != set(times[1])  # int8 has other kernels


@pytest.mark.ort
def test_probe_charges_each_layer_for_the_kernels_around_it(tmp_path: Path) -> None:
    """int8 adds kernels a layer's own time leaves out (the Q/DQ pairs at its edges, the
    activations float had fused into it): each is charged to a layer, so that a layer's gain is
    what the model saves, and only onnxruntime's own layout kernels stay uncharged."""
    graph, build, layers, feed = _cnn_candidates()
    with build.files(tmp_path).exported(build(frozenset()), "q") as model:
        times = qdq_probe.node_times(model, feed, tmp_path)
    owner = qdq_probe.regions(graph, layers)
    qdq = [n for n in times
           if qdq_probe.base_name(n).endswith(("_QuantizeLinear", "_DequantizeLinear"))]
    assert qdq  # the image is quantized and the logits dequantized, at least
    assert all(owner[qdq_probe.base_name(n)] in layers for n in qdq)
    alone = qdq_probe.layer_times(times, layers)
    charged = qdq_probe.layer_times(times, layers, graph)
    extra = sum(times[n] for n in qdq)
    assert sum(charged.values()) >= sum(alone.values()) + extra - 1e-6
    # every node of the float graph after the first layer has an owner
    first = min(layers)
    assert all(n.name in owner for n in graph.nodes[first:])


@pytest.mark.ort
def test_guard_checks_speed_before_paying_for_the_accuracy_search(tmp_path: Path) -> None:
    """The sample cnn is far too small for int8 to pay (about 1.6x slower at one thread): with
    guard = "both" the probe times every layer (then either finds each one slower in int8 or
    the latency guard finds no faster set) and leaves the model in float with no accuracy run."""
    step = {"pass": "quant.qdq", "params": {"guard": "both"}}
    out = tmp_path / "cnn.onnx"
    report = compress("cnn", [CLEANUP, step], out, min_cosine=0.99)
    guard = report.steps[1].stats["guard"]
    assert guard["probe"]["layers_timed"] == 9
    assert "not faster than float" in guard["gave_up"]
    assert guard["evaluations"] == 0 and "ranking" not in guard
    assert report.ok and not report.steps[1].touched
    assert "QLinearConv" not in fused_ops(out)
