"""Evaluate constant-only nodes with onnxruntime, so folding computes what deployment computes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink import runtime
from onnxshrink.ir.external import fix_data_locations, inline_external
from onnxshrink.ir.proto import quiet_gs


def evaluate(
    nodes: Sequence[gs.Node], outputs: Sequence[gs.Tensor], opset: int
) -> dict[str, np.ndarray]:
    """Run `nodes` (whose inputs are all constants) and return the named `outputs`."""
    sub = gs.Graph(nodes=list(nodes), inputs=[], outputs=list(outputs), opset=opset)
    with quiet_gs():
        model = gs.export_onnx(sub, do_type_check=False)
    model.ir_version = min(model.ir_version, 10)
    fix_data_locations(model)
    inline_external(model)  # onnxruntime would resolve locations against the working directory
    sess = runtime.session(model.SerializeToString(), opt="none")
    names = runtime.output_names(sess)
    values = sess.run(None, {})
    return {name: np.asarray(v) for name, v in zip(names, values)}
