"""Sessions share one arena, and a compression gives its memory back when it ends."""

from __future__ import annotations

import numpy as np
import pytest

from onnxshrink import runtime
from tests.memory import needs_proc, run_child

_BIG_RUN = """
import json, sys
import numpy as np
import onnx_graphsurgeon as gs
from onnxshrink import runtime

x = gs.Variable("x", np.float32, [1 << 24])  # 64 MB through two activations
y = gs.Variable("y", np.float32, [1 << 24])
z = gs.Variable("z", np.float32, [1])
nodes = [gs.Node("Exp", "e", inputs=[x], outputs=[y]),
         gs.Node("ReduceMax", "r", {"keepdims": 1}, inputs=[y], outputs=[z])]
model = gs.export_onnx(gs.Graph(nodes, [x], [z], opset=13))
model.ir_version = 8
sess = runtime.session(model.SerializeToString(), opt="none")
feed = {"x": np.zeros(1 << 24, np.float32)}
sess.run(None, feed)
del sess, feed
held = rss_mb()
runtime.release_shared_arena()
print(json.dumps(held - rss_mb()))
"""


@pytest.mark.ort
def test_sessions_share_one_arena_unless_asked() -> None:
    model = runtime._relu_model()
    shared = runtime.session(model)
    own = runtime.session(model, shared_arena=False)
    key = "session.use_env_allocators"
    assert shared.get_session_options().get_session_config_entry(key) == "1"
    with pytest.raises(RuntimeError, match="does not have configuration"):
        own.get_session_options().get_session_config_entry(key)
    assert shared.run(None, {"x": np.array([-1.0], np.float32)})[0].tolist() == [0.0]


@pytest.mark.ort
def test_releasing_the_shared_arena_returns_a_run_s_memory() -> None:
    """The arena keeps a finished run's 64 MB activation; the release gives it back."""
    needs_proc()
    freed = run_child(_BIG_RUN)
    assert isinstance(freed, float) and freed > 48, f"{freed:.0f} MB released"
