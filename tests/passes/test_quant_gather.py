"""quant.gather: embedding tables in int8/int4, dequantized after the Gather, run in onnxruntime.

Bounds come from the quantization step: min-max scales put every gathered value within half a
step of the float one (``step = max|row| / 127`` symmetric, ``(max - min) / 255`` with a zero
point, ranges widened to contain 0), plus float rounding of the final product.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from onnxshrink import runtime
from onnxshrink.errors import ParamError
from onnxshrink.kernels import quantize as qk
from onnxshrink.passes.base import Context, PassResult
from onnxshrink.passes.quant_gather import GatherQuantParams, GatherQuantPass
from tests.graphs import save_graph
from tests.passes.quant_support import compress, fused_ops, worst_cosine
from tests.realmodels import cache_dir

#: Negative indices, a repeated row, a 2-D index tensor (out-of-range is the runtime's business).
IDX = np.array([[0, 5, -1], [17, 5, -40]], np.int64)


def _table(rows: int = 200, cols: int = 24, dtype: type = np.float32, seed: int = 0) -> np.ndarray:
    """Rows of very different magnitudes (rare tokens), one all-zero row, one all-positive row."""
    rng = np.random.default_rng(seed)
    t = rng.standard_normal((rows, cols)) * rng.uniform(0.01, 2.0, (rows, 1))
    t[3] = 0.0
    t[5] = np.abs(t[5]) + 0.5
    return t.astype(dtype)


def _gather_graph(table: np.ndarray, *, axis: int = 0, opset: int = 17) -> gs.Graph:
    """idx -> Gather(table) -> y."""
    idx = gs.Variable("idx", np.int64, list(IDX.shape))
    shape = [*table.shape[:axis], *IDX.shape, *table.shape[axis + 1 :]]
    y = gs.Variable("y", table.dtype, shape)
    node = gs.Node(
        "Gather", "embed", {"axis": axis}, inputs=[gs.Constant("E", table), idx], outputs=[y]
    )
    return gs.Graph(nodes=[node], inputs=[idx], outputs=[y], opset=opset)


def _run_pass(graph: gs.Graph, tmp_path: Path, **params: Any) -> PassResult:
    ctx = Context(model_path=tmp_path / "in.onnx", opset=int(graph.opset), workdir=tmp_path)
    p = GatherQuantPass(GatherQuantParams(**params))
    p.requires(graph, ctx)
    result = p.run(graph, [n for n in graph.nodes if n.op == "Gather"], ctx)
    graph.cleanup().toposort()
    return result


def _outputs(graph: gs.Graph, path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """onnxruntime on the graph as written (no optimizations) and fully optimized."""
    model = save_graph(graph, path)
    onnx.checker.check_model(onnx.load(str(model)))
    return [runtime.run(runtime.session(model, opt=o), feed)[0] for o in ("none", "all")]


def _step(rows: np.ndarray, symmetric: bool, qmax: int = 127) -> np.ndarray:
    """The min-max quantization step of each row (reduced over the last axis)."""
    lo = np.minimum(rows.min(axis=-1, keepdims=True), 0).astype(np.float64)
    hi = np.maximum(rows.max(axis=-1, keepdims=True), 0).astype(np.float64)
    if symmetric:
        return np.maximum(-lo, hi) / qmax
    return (hi - lo) / (2 * qmax + 1)


def _initializers(graph: gs.Graph) -> dict[str, np.ndarray]:
    return {
        n: np.asarray(t.values) for n, t in graph.tensors().items() if isinstance(t, gs.Constant)
    }


@pytest.mark.ort
@pytest.mark.parametrize("symmetric", [True, False])
def test_gathered_rows_are_within_half_a_step(symmetric: bool, tmp_path: Path) -> None:
    table = _table()
    graph = _gather_graph(table)
    result = _run_pass(graph, tmp_path, symmetric=symmetric)
    assert set(result.touched) == {"embed"}
    assert result.stats["tables"] == 1 and result.stats["table_bytes_before"] == table.nbytes
    # int8 codes + one float32 scale (and zero point) per row
    extra = 8 if not symmetric else 4
    assert result.stats["table_bytes_after"] == table.size + extra * table.shape[0]
    inits = _initializers(graph)
    assert not [v for v in inits.values() if v.size == table.size and v.dtype.kind == "f"]
    codes = next(v for v in inits.values() if v.size == table.size)
    assert codes.dtype == (np.int8 if symmetric else np.uint8)
    ops = Counter(n.op for n in graph.nodes)
    assert ops == Counter(Gather=3 - symmetric, Cast=1, Mul=1, Sub=1 - symmetric)

    expected = table[IDX]
    bound = _step(expected, symmetric) / 2 + 1e-6 * np.abs(expected)
    for got in _outputs(graph, tmp_path / "q.onnx", {"idx": IDX}):
        assert got.shape == expected.shape and got.dtype == np.float32
        assert np.all(np.abs(got - expected) <= bound)
        np.testing.assert_array_equal(got[0, 1], got[1, 1])  # same row, same values
    zero_row = _outputs(graph, tmp_path / "z.onnx", {"idx": np.array([[3, 3, 3]] * 2, np.int64)})
    assert not np.any(zero_row[0])  # an all-zero row stays exactly zero


@pytest.mark.ort
def test_other_axes_get_one_scale_per_gathered_slice(tmp_path: Path) -> None:
    table = _table(cols=24).T.copy()  # [24, 200] gathered along axis 1: columns
    graph = _gather_graph(table, axis=1)
    result = _run_pass(graph, tmp_path)
    assert set(result.touched) == {"embed"}
    expected = np.take(table, IDX, axis=1)  # [24, 2, 3]
    step = _step(np.moveaxis(np.take(table, IDX, axis=1), 0, -1), True)  # per column
    bound = np.moveaxis(step, -1, 0) / 2 + 1e-6 * np.abs(expected)
    for got in _outputs(graph, tmp_path / "q.onnx", {"idx": IDX}):
        assert got.shape == expected.shape
        assert np.all(np.abs(got - expected) <= bound)


@pytest.mark.ort
def test_scalar_index_drops_the_axis(tmp_path: Path) -> None:
    table = _table()
    idx = gs.Variable("i", np.int64, [])
    y = gs.Variable("y", np.float32, [table.shape[1]])
    node = gs.Node("Gather", "embed", inputs=[gs.Constant("E", table), idx], outputs=[y])
    graph = gs.Graph(nodes=[node], inputs=[idx], outputs=[y], opset=17)
    _run_pass(graph, tmp_path)
    for got in _outputs(graph, tmp_path / "q.onnx", {"i": np.array(-2, np.int64)}):
        assert got.shape == (table.shape[1],)
        assert np.all(np.abs(got - table[-2]) <= _step(table[-2], True) / 2 + 1e-6)


@pytest.mark.ort
def test_float16_table_keeps_float16_and_the_bound(tmp_path: Path) -> None:
    table = _table(dtype=np.float16)
    table[7] = np.float16(2.0**-24) * np.arange(-36, 36, 3)  # tiny subnormals: stored exactly
    graph = _gather_graph(table)
    _run_pass(graph, tmp_path)
    inits = _initializers(graph)
    assert {v.dtype for v in inits.values()} == {np.dtype(np.int8), np.dtype(np.float16)}
    scale = next(v for v in inits.values() if v.dtype == np.float16).reshape(-1)
    # scales are rounded up to float16, never down: no row's maximum saturates
    assert np.all(scale.astype(np.float64) * 127 >= np.abs(table.astype(np.float64)).max(1))
    rows = table[IDX].astype(np.float64)
    bound = scale[IDX][..., None].astype(np.float64) / 2 + np.abs(rows) * 2.0**-10
    for got in _outputs(graph, tmp_path / "q.onnx", {"idx": IDX}):
        assert got.dtype == np.float16
        assert np.all(np.abs(got.astype(np.float64) - rows) <= bound)
    got = _outputs(graph, tmp_path / "s.onnx", {"idx": np.full((2, 3), 7, np.int64)})[0]
    np.testing.assert_array_equal(got[0, 0], table[7])


@pytest.mark.ort
def test_opset_9_model_runs(tmp_path: Path) -> None:
    table = _table()
    graph = _gather_graph(table, opset=9)
    _run_pass(graph, tmp_path, symmetric=False)
    for got in _outputs(graph, tmp_path / "q.onnx", {"idx": IDX % table.shape[0]}):
        rows = table[IDX % table.shape[0]]
        assert np.all(np.abs(got - rows) <= _step(rows, False) / 2 + 1e-6 * np.abs(rows))


def _tied_graph(table: np.ndarray) -> gs.Graph:
    """ids -> Gather(E) -> h -> Gemm(h, E, transB=1) -> logits: embedding tied to the LM head."""
    e = gs.Constant("E", table)
    ids = gs.Variable("ids", np.int64, [5])
    h = gs.Variable("h", np.float32, [5, table.shape[1]])
    logits = gs.Variable("logits", np.float32, [5, table.shape[0]])
    nodes = [
        gs.Node("Gather", "embed", inputs=[e, ids], outputs=[h]),
        gs.Node("Gemm", "lm_head", {"transB": 1}, inputs=[h, e], outputs=[logits]),
    ]
    return gs.Graph(nodes=nodes, inputs=[ids], outputs=[h, logits], opset=17)


@pytest.mark.ort
def test_tied_table_is_stored_once_and_read_consistently(tmp_path: Path) -> None:
    table = _table(rows=160, cols=32)
    graph = _tied_graph(table)
    result = _run_pass(graph, tmp_path)
    assert result.stats["dequantized_for_other_readers"] == {"E": ["lm_head"]}
    inits = _initializers(graph)
    big = [v for v in inits.values() if v.size == table.size]
    assert len(big) == 1 and big[0].dtype == np.int8  # one copy, integer
    scale = next(v for v in inits.values() if v.shape == (160, 1))
    deq = big[0].astype(np.float32) * scale
    ids = np.array([3, 0, -1, 17, 17], np.int64)
    model = save_graph(graph, tmp_path / "q.onnx")
    for opt in ("none", "all"):
        h, logits = runtime.run(runtime.session(model, opt=opt), {"ids": ids})
        np.testing.assert_array_equal(h, deq[ids])  # the Gather and the head see the same table
        np.testing.assert_allclose(logits, deq[ids] @ deq.T, rtol=1e-5, atol=1e-5)
        assert np.all(np.abs(h - table[ids]) <= _step(table[ids], True) / 2 + 1e-6)
    # onnxruntime folds the head's dequantization at load: one Cast/Mul left, on the Gather path
    ops = fused_ops(model)
    assert ops["Cast"] == 1 and ops["Mul"] == 1, dict(ops)


def test_tied_table_can_be_left_float(tmp_path: Path) -> None:
    graph = _tied_graph(_table(rows=160, cols=32))
    result = _run_pass(graph, tmp_path, shared="skip")
    assert not result.modified
    assert "also read by Gemm 'lm_head'" in result.skipped[0].reason


def test_contrib_form_does_not_share_its_layout(tmp_path: Path) -> None:
    graph = _tied_graph(_table(rows=160, cols=32))
    result = _run_pass(graph, tmp_path, form="contrib")
    assert not result.modified and "only GatherBlockQuantized" in result.skipped[0].reason


def test_small_computed_and_non_float_tables_are_skipped(tmp_path: Path) -> None:
    idx = gs.Variable("idx", np.int64, [2])
    outs = [gs.Variable(f"y{i}", None) for i in range(5)]
    computed = gs.Variable("computed", np.float32, [100, 64])
    nodes = [
        gs.Node(
            "Gather", "small", inputs=[gs.Constant("S", _table(8, 16)), idx], outputs=[outs[0]]
        ),
        gs.Node(
            "Gather",
            "ints",
            inputs=[gs.Constant("I", np.ones((100, 64), np.int64)), idx],
            outputs=[outs[1]],
        ),
        gs.Node(
            "Gather",
            "vector",
            inputs=[gs.Constant("V", np.ones(5000, np.float32)), idx],
            outputs=[outs[2]],
        ),
        gs.Node("Gather", "computed", inputs=[computed, idx], outputs=[outs[3]]),
        gs.Node(
            "Gather", "big", inputs=[gs.Constant("B", _table(200, 32)), idx], outputs=[outs[4]]
        ),
    ]
    graph = gs.Graph(nodes=nodes, inputs=[idx, computed], outputs=outs, opset=17)
    result = _run_pass(graph, tmp_path)
    reasons = {s.node: s.reason for s in result.skipped}
    assert set(result.touched) == {"big"}
    assert "below min_params = 4096" in reasons["small"]
    assert "not float32/float16" in reasons["ints"]
    assert "not an embedding" in reasons["vector"]
    assert "not an initializer" in reasons["computed"]
    small = _gather_graph(_table(8, 16))
    assert set(_run_pass(small, tmp_path, min_params=100).touched) == {"embed"}


def test_second_run_changes_nothing(tmp_path: Path) -> None:
    graph = _gather_graph(_table(rows=300, cols=16))
    assert _run_pass(graph, tmp_path, symmetric=False).modified
    again = _run_pass(graph, tmp_path, symmetric=False, min_params=1)
    # the codes are integers; the scale/zero-point tables (one value per row) stay float
    assert not again.modified
    assert {s.reason for s in again.skipped} == {
        "table dtype uint8 is not float32/float16",
        "gathered slices have fewer than 8 elements (not an embedding)",
    }


@pytest.mark.ort
@pytest.mark.parametrize(
    ("bits", "block", "symmetric"), [(8, 0, True), (8, 16, False), (4, 16, False), (4, 32, True)]
)
def test_contrib_form_runs_gather_block_quantized(
    bits: int, block: int, symmetric: bool, tmp_path: Path
) -> None:
    table = _table(cols=48)
    graph = _gather_graph(table)
    params = {"form": "contrib", "bits": bits, "block_size": block, "symmetric": symmetric}
    result = _run_pass(graph, tmp_path, **params)
    assert [(n.op, n.domain) for n in graph.nodes] == [("GatherBlockQuantized", "com.microsoft")]
    packed = table.size * bits // 8
    assert result.stats["table_bytes_after"] < packed + table.nbytes // 8
    expected = table[IDX]
    width = block or 64  # a per-row block spans the row (rounded up to a power of two)
    blocks = [expected[..., i : i + width] for i in range(0, 48, width)]
    qmax = (1 << (bits - 1)) - 1
    bound = np.concatenate(
        [np.broadcast_to(_step(b, symmetric, qmax) / 2, b.shape) for b in blocks], axis=-1
    )
    if symmetric:  # unsigned codes centred on 2^(bits-1) spend one more level on each side
        bound = bound * qmax / (qmax + 0.5)
    for got in _outputs(graph, tmp_path / "q.onnx", {"idx": IDX}):
        assert np.all(np.abs(got - expected) <= bound + 1e-6 * np.abs(expected))


def test_contrib_form_needs_axis_0_and_even_rows(tmp_path: Path) -> None:
    result = _run_pass(_gather_graph(_table(), axis=1), tmp_path, form="contrib")
    assert "gathered on axis 0" in result.skipped[0].reason
    odd = _gather_graph(_table(cols=25))
    result = _run_pass(odd, tmp_path, form="contrib", bits=4, block_size=16)
    assert "row length must be even" in result.skipped[0].reason


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"bits": 4}, "bits"),
        ({"block_size": 32}, "block_size"),
        ({"form": "contrib", "block_size": 24}, "block_size"),
        ({"form": "contrib", "bits": 4}, "block_size"),
        ({"min_params": -1}, "min_params"),
    ],
)
def test_invalid_params_name_the_parameter(params: dict[str, Any], name: str) -> None:
    with pytest.raises(ParamError, match=f"'{name}'"):
        GatherQuantParams(**params).check()


# ----------------------------------------------------------------------------- kernels


@given(
    arrays(
        np.float32, st.integers(1, 64), elements=st.floats(float(np.float32(1e-12)), 6e4, width=32)
    )
)
def test_float16_scales_are_rounded_up_by_at_most_one_ulp(scale: np.ndarray) -> None:
    stored = qk.scales_as(scale, np.float16)
    assert stored.dtype == np.float16
    assert np.all(stored.astype(np.float32) >= scale)  # the largest value never newly clips
    normal = scale >= np.finfo(np.float16).tiny
    assert np.all(stored[normal].astype(np.float64) <= scale[normal] * (1 + 2.0**-10))


@given(st.integers(1, 5), st.integers(1, 9), st.integers(0, 2**16))
def test_int4_rows_pack_byte_aligned(rows: int, cols: int, seed: int) -> None:
    q = np.random.default_rng(seed).integers(0, 16, (rows, cols)).astype(np.uint8)
    packed = qk.pack_int4_rows(q)
    assert packed.shape == (rows, -(-cols // 2))
    for r in range(rows):  # each row unpacks on its own: a gathered row is one byte slice
        np.testing.assert_array_equal(qk.unpack_int4(packed[r], cols, signed=False), q[r])


# ----------------------------------------------------------------------------- MiniLM

MINILM = cache_dir() / "quant-bench" / "minilm-l6-v2.onnx"
MINILM_DATA = MINILM.with_name("minilm.npz")


@pytest.mark.ort
@pytest.mark.slow
@pytest.mark.skipif(not MINILM_DATA.exists(), reason="MiniLM benchmark cache not prepared")
def test_minilm_embeddings_shrink_and_keep_the_sentence_embedding(tmp_path: Path) -> None:
    from onnxshrink import api
    from onnxshrink.recipe.loader import parse_recipe

    recipe = parse_recipe(
        {"recipe": {"name": "t"}, "step": [{"pass": "graph.cleanup"}, {"pass": "quant.gather"}]}
    )
    out = tmp_path / "q.onnx"
    report = api.compress(MINILM, recipe, out, validate=False)
    stats = report.steps[1].stats
    assert stats["tables"] == 2  # word and position embeddings
    # 30522 x 384 + 512 x 384 fp32 -> int8 + one scale per row: 36 MB less on disk
    assert MINILM.stat().st_size - out.stat().st_size > 35e6
    assert stats["table_bytes_after"] < stats["table_bytes_before"] / 3.9
    data = np.load(MINILM_DATA)
    ref, got = runtime.session(MINILM), runtime.session(out)
    cosines = []
    for ids, n in list(zip(data["ids"], data["lengths"]))[:32]:
        x = ids[None, : int(n)]
        feed = {"input_ids": x, "attention_mask": np.ones_like(x)}
        a = runtime.run(ref, feed)[0].ravel().astype(np.float64)
        b = runtime.run(got, feed)[0].ravel().astype(np.float64)
        cosines.append(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert min(cosines) >= 0.999, min(cosines)


@pytest.mark.ort
def test_transformer_sample_through_the_pipeline(tmp_path: Path) -> None:
    report = compress(
        "transformer", [{"pass": "graph.cleanup"}, {"pass": "quant.gather"}], tmp_path / "t.onnx"
    )
    step = report.steps[1]
    assert set(step.touched) == {"embed.gather"} and step.stats["tables"] == 1
    assert json.loads(json.dumps(step.stats)) == step.stats  # JSON-serialisable for the report
    assert worst_cosine(report) >= 0.9999
