"""Probability outputs are found from the graph, and judged equal within `prob_atol`."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from onnxshrink.recipe.schema import Tolerance
from onnxshrink.validate.bounded import probability_outputs
from onnxshrink.validate.compare import compare_output, judge


def _graph(*ops: tuple[str, dict[str, object]], extra: str | None = None) -> gs.Graph:
    """x -> Sigmoid -> ops... -> y; `extra`: also a second input joined by that op at the end."""
    x = gs.Variable("x", np.float32, [1, 4])
    t = gs.Variable("s", np.float32)
    nodes = [gs.Node("Sigmoid", "sig", inputs=[x], outputs=[t])]
    inputs = [x]
    for i, (op, attrs) in enumerate(ops):
        out = gs.Variable(f"t{i}", np.float32)
        nodes.append(gs.Node(op, f"n{i}", dict(attrs), inputs=[t], outputs=[out]))
        t = out
    if extra is not None:
        z = gs.Variable("z", np.float32, [1, 4])
        inputs.append(z)
        out = gs.Variable("joined", np.float32)
        nodes.append(gs.Node(extra, "join", {"axis": 1} if extra == "Concat" else {},
                             inputs=[t, z], outputs=[out]))
        t = out
    return gs.Graph(nodes=nodes, inputs=inputs, outputs=[t], opset=17)


@pytest.mark.parametrize(
    ("ops", "extra", "expected"),
    [
        ((), None, True),
        ((("Transpose", {"perm": [1, 0]}), ("Flatten", {})), None, True),
        ((("Cast", {"to": 10}),), None, True),  # to float16: same values
        ((("Cast", {"to": 7}),), None, False),  # to int64: no longer a probability
        ((("Relu", {}),), None, False),
        ((), "Add", False),
        ((), "Concat", False),  # the other half is not bounded
    ],
)
def test_probability_outputs_follow_carriers_only(
    ops: tuple[tuple[str, dict[str, object]], ...], extra: str | None, expected: bool
) -> None:
    graph = _graph(*ops, extra=extra)
    assert (graph.outputs[0].name in probability_outputs(graph)) is expected


def test_a_probability_map_that_moved_by_rounding_is_equal() -> None:
    rng = np.random.default_rng(0)
    ref = (rng.random((1, 1, 32, 32)) * 1e-5).astype(np.float32)  # "nothing detected"
    cand = ref + rng.normal(0, 5e-7, ref.shape).astype(np.float32)
    tol = Tolerance(min_cosine=0.999)

    plain = judge(compare_output("p", [ref], [cand]), tol)
    prob = judge(compare_output("p", [ref], [cand]), tol, probability=True)

    assert not plain.ok  # relative to values of 1e-5, rounding is large
    assert prob.ok and prob.within_prob_atol
    same = judge(compare_output("p", [ref], [ref.copy()]), tol, probability=True)
    assert same.ok and not same.within_prob_atol  # reported only where the floor decided
    strict = judge(compare_output("p", [ref], [cand]), Tolerance(min_cosine=0.999, max_abs=1e-8),
                   probability=True)
    assert not strict.ok  # an explicit max_abs still holds


def test_a_probability_that_really_moved_is_judged_relatively() -> None:
    ref = np.array([[0.9, 0.05, 0.05]], np.float32)
    cand = np.array([[0.5, 0.45, 0.05]], np.float32)
    m = judge(compare_output("p", [ref], [cand]), Tolerance(min_cosine=0.99), probability=True)
    assert not m.ok and not m.within_prob_atol
    off = Tolerance(min_cosine=0.99, prob_atol=None)
    tiny = judge(compare_output("p", [ref * 1e-6], [cand * 1e-6]), off, probability=True)
    assert not tiny.ok  # prob_atol = None turns the floor off
