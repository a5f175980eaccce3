"""Build the small, synthetic ONNX sample models used to exercise onnxshrink.

Every model gets seeded random weights (He-init weights, non-zero biases, non-trivial
BatchNorm/LayerNorm statistics) so that pruning, quantization and clustering passes see
realistic value distributions. Output is deterministic: running the script twice writes
byte-identical files.

The graphs are built with plain onnx.helper on purpose (hence the noqa for the project's
onnx.helper ban): test fixtures must not depend on onnxshrink.ir, the code under test.

Usage: python sample_models/make_samples.py [OUTDIR]   (default: this script's folder)
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper  # noqa: TID251

IR_VERSION = 10  # pinned so the files do not follow onnx's default IR version
PRODUCER_NAME = "onnxshrink-samples"
PRODUCER_VERSION = "1"
NUM_SAMPLES = 8
MAX_FILE_BYTES = 1_000_000

FLOAT = TensorProto.FLOAT
Samples = dict[str, np.ndarray]  # graph input name -> array with a leading sample axis
Built = tuple[onnx.ModelProto, Samples]


class GraphBuilder:
    """Collects nodes and initializers; one node per `op` call, outputs named `<node>_out`."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def init(self, name: str, value: np.ndarray) -> str:
        """Add an initializer and return its name."""
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, **attrs: object) -> str:
        """Add a single-output node named `name` and return its output name."""
        out = f"{name}_out"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        return out

    def rename_last_output(self, new_name: str) -> str:
        """Give the last node's output a public name (used for graph outputs)."""
        self.nodes[-1].output[0] = new_name
        return new_name

    # Weight helpers -------------------------------------------------------------------------

    def he_normal(
        self, shape: tuple[int, ...], fan_in: int, dtype: type = np.float32
    ) -> np.ndarray:
        """He (Kaiming) normal init, the default for ReLU networks."""
        std = np.sqrt(2.0 / fan_in)
        return (self.rng.standard_normal(shape) * std).astype(dtype)

    def bias(self, n: int, fan_in: int, dtype: type = np.float32) -> np.ndarray:
        """PyTorch-style U(-1/sqrt(fan_in), 1/sqrt(fan_in)) bias, so biases are non-zero."""
        bound = 1.0 / np.sqrt(fan_in)
        return self.rng.uniform(-bound, bound, size=n).astype(dtype)

    # Layer helpers --------------------------------------------------------------------------

    def conv(
        self,
        x: str,
        name: str,
        cin: int,
        cout: int,
        k: int,
        stride: int = 1,
        with_bias: bool = False,
    ) -> str:
        """Conv with 'same'-style padding; bias optional (convs feeding BN usually have none)."""
        w = self.init(f"{name}.weight", self.he_normal((cout, cin, k, k), cin * k * k))
        inputs = [x, w]
        if with_bias:
            inputs.append(self.init(f"{name}.bias", self.bias(cout, cin * k * k)))
        pad = k // 2
        return self.op(
            "Conv",
            inputs,
            name,
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[pad, pad, pad, pad],
        )

    def batchnorm(self, x: str, name: str, channels: int) -> str:
        """Inference-mode BatchNormalization with non-trivial running statistics."""
        rng = self.rng
        scale = self.init(f"{name}.weight", rng.uniform(0.5, 1.5, channels).astype(np.float32))
        bias = self.init(f"{name}.bias", rng.normal(0.0, 0.1, channels).astype(np.float32))
        mean = self.init(f"{name}.running_mean", rng.normal(0.0, 0.2, channels).astype(np.float32))
        var = self.init(f"{name}.running_var", rng.uniform(0.5, 2.0, channels).astype(np.float32))
        return self.op("BatchNormalization", [x, scale, bias, mean, var], name, epsilon=1e-5)

    def conv_bn(
        self, x: str, name: str, cin: int, cout: int, k: int, stride: int = 1, relu: bool = True
    ) -> str:
        """Conv -> BatchNormalization -> optional Relu, the classic ResNet unit."""
        y = self.conv(x, f"{name}.conv", cin, cout, k, stride)
        y = self.batchnorm(y, f"{name}.bn", cout)
        return self.op("Relu", [y], f"{name}.relu") if relu else y

    def gemm(self, x: str, name: str, fin: int, fout: int, dtype: type = np.float32) -> str:
        """Gemm with a PyTorch-layout [out, in] weight (transB=1), as nn.Linear exports."""
        w = self.init(f"{name}.weight", self.he_normal((fout, fin), fin, dtype))
        b = self.init(f"{name}.bias", self.bias(fout, fin, dtype))
        return self.op("Gemm", [x, w, b], name, transB=1)

    def matmul_add(self, x: str, name: str, fin: int, fout: int) -> str:
        """MatMul with an [in, out] weight followed by a bias Add (the exporter form for 3-D+)."""
        w = self.init(f"{name}.weight", self.he_normal((fin, fout), fin))
        b = self.init(f"{name}.bias", self.bias(fout, fin))
        y = self.op("MatMul", [x, w], f"{name}.matmul")
        return self.op("Add", [y, b], f"{name}.add")

    def layernorm(self, x: str, name: str, dim: int) -> str:
        """LayerNormalization over the last axis with perturbed (non-identity) scale and bias."""
        scale = self.rng.normal(1.0, 0.1, dim).astype(np.float32)
        bias = self.rng.normal(0.0, 0.05, dim).astype(np.float32)
        s = self.init(f"{name}.weight", scale)
        b = self.init(f"{name}.bias", bias)
        return self.op("LayerNormalization", [x, s, b], name, axis=-1, epsilon=1e-5)


def tensor_values(model: onnx.ModelProto, tensor: str, feeds: Samples) -> np.ndarray:
    """Evaluate any intermediate tensor for every sample (stacked on a leading sample axis)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.append(helper.make_tensor_value_info(tensor, FLOAT, None))
    return run_samples(probe, feeds)[0]


def center_head_bias(model: onnx.ModelProto, features: str, head: str, calib: Samples) -> None:
    """Set head bias so mean logits are ~0 on calibration data.

    With random weights, post-ReLU features share a large positive mean, so one class wins for
    every input. A trained classifier would not behave that way, and it would make "top-1 still
    agrees after compression" checks trivially true. Centering gives predictions that depend on
    the input.
    """
    inits = {t.name: t for t in model.graph.initializer}
    weight = numpy_helper.to_array(inits[f"{head}.weight"])  # [out, in] (Gemm, transB=1)
    bias = numpy_helper.to_array(inits[f"{head}.bias"])
    feats = tensor_values(model, features, calib).reshape(-1, weight.shape[1])
    offset = weight.astype(np.float64) @ feats.astype(np.float64).mean(0)
    # Rounded so last-bit differences between CPUs/BLAS builds do not change the file.
    centered = np.round(bias - offset, 2).astype(bias.dtype)
    inits[f"{head}.bias"].CopyFrom(numpy_helper.from_array(centered, f"{head}.bias"))


def make_model(
    b: GraphBuilder,
    name: str,
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    opset: int,
    doc: str,
) -> onnx.ModelProto:
    """Wrap the builder's nodes into a model with pinned IR version and producer metadata."""
    graph = helper.make_graph(b.nodes, name, inputs, outputs, b.initializers, doc_string=doc)
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        ir_version=IR_VERSION,
        producer_name=PRODUCER_NAME,
        producer_version=PRODUCER_VERSION,
        doc_string=doc,
    )


# Models -------------------------------------------------------------------------------------


def build_cnn(rng: np.random.Generator) -> Built:
    """Small ResNet-like CNN: Conv+BN folding, residual Adds, strided projection, Concat."""
    b = GraphBuilder(rng)
    # Stem: the stem conv keeps its bias so BN folding must handle both with and without bias.
    x = b.conv("image", "stem.conv", 3, 16, 3, with_bias=True)
    x = b.batchnorm(x, "stem.bn", 16)
    x = b.op("Relu", [x], "stem.relu")
    x = b.op("MaxPool", [x], "stem.maxpool", kernel_shape=[2, 2], strides=[2, 2])  # 16x16

    # Residual block 1: identity shortcut.
    y = b.conv_bn(x, "block1.0", 16, 16, 3)
    y = b.conv_bn(y, "block1.1", 16, 16, 3, relu=False)
    x = b.op("Relu", [b.op("Add", [y, x], "block1.add")], "block1.relu")

    # Residual block 2: stride 2 and a 1x1 Conv+BN projection on the shortcut.
    y = b.conv_bn(x, "block2.0", 16, 32, 3, stride=2)  # 8x8
    y = b.conv_bn(y, "block2.1", 32, 32, 3, relu=False)
    shortcut = b.conv_bn(x, "block2.downsample", 16, 32, 1, stride=2, relu=False)
    x = b.op("Relu", [b.op("Add", [y, shortcut], "block2.add")], "block2.relu")

    # Two-branch (Inception-style) part joined by Concat on channels; branch convs have bias.
    left = b.op("Relu", [b.conv(x, "branch1x1.conv", 32, 16, 1, with_bias=True)], "branch1x1.relu")
    right = b.op("Relu", [b.conv(x, "branch3x3.conv", 32, 16, 3, with_bias=True)], "branch3x3.relu")
    x = b.op("Concat", [left, right], "branches.concat", axis=1)  # [B, 32, 8, 8]

    x = b.op("GlobalAveragePool", [x], "head.gap")
    x = b.op("Flatten", [x], "head.flatten", axis=1)
    b.gemm(x, "head.fc", 32, 10)
    b.rename_last_output("logits")

    model = make_model(
        b,
        "cnn",
        [helper.make_tensor_value_info("image", FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", FLOAT, ["batch", 10])],
        opset=17,
        doc="Synthetic ResNet-style CNN (Conv/BN/Relu, residual Add, strided projection, "
        "Concat branches, MaxPool, GlobalAveragePool, Gemm) for onnxshrink tests.",
    )
    samples = {"image": rng.standard_normal((NUM_SAMPLES, 1, 3, 32, 32)).astype(np.float32)}
    calib = {"image": rng.standard_normal((64, 1, 3, 32, 32)).astype(np.float32)}
    center_head_bias(model, "head.flatten_out", "head.fc", calib)
    return model, samples


def build_mlp(rng: np.random.Generator) -> Built:
    """MLP mixing Gemm layers with the MatMul+Add form that PyTorch exporters emit."""
    b = GraphBuilder(rng)
    x = b.op("Relu", [b.gemm("features", "fc1", 64, 256)], "fc1.relu")
    x = b.op("Relu", [b.matmul_add(x, "fc2", 256, 128)], "fc2.relu")
    b.gemm(x, "fc3", 128, 10)
    b.rename_last_output("logits")
    model = make_model(
        b,
        "mlp",
        [helper.make_tensor_value_info("features", FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", FLOAT, ["batch", 10])],
        opset=17,
        doc="Synthetic MLP: Gemm+Relu, MatMul+Add+Relu, Gemm, for onnxshrink tests.",
    )
    samples = {"features": rng.standard_normal((NUM_SAMPLES, 1, 64)).astype(np.float32)}
    calib = {"features": rng.standard_normal((64, 1, 64)).astype(np.float32)}
    center_head_bias(model, "fc2.relu_out", "fc3", calib)
    return model, samples


def build_transformer(rng: np.random.Generator) -> Built:
    """One pre-LN transformer encoder block with dynamic batch/seq, as opset-20 exports look."""
    vocab, max_pos, dim, heads, head_dim, ffn = 128, 128, 64, 4, 16, 256
    b = GraphBuilder(rng)

    # Token embedding plus a learned positional table sliced to the dynamic sequence length.
    tok = b.init("embed.tokens", rng.standard_normal((vocab, dim)).astype(np.float32))
    pos = b.init("embed.positions", rng.normal(0.0, 0.1, (max_pos, dim)).astype(np.float32))
    x = b.op("Gather", [tok, "input_ids"], "embed.gather", axis=0)
    seq_len = b.op("Shape", ["input_ids"], "embed.seq_len", start=1, end=2)
    zero = b.init("const.zero_1d", np.array([0], dtype=np.int64))
    pos_slice = b.op("Slice", [pos, zero, seq_len, zero], "embed.pos_slice")
    x0 = b.op("Add", [x, pos_slice], "embed.add_pos")  # [B, S, 64]

    # Self-attention. One shared shape constant for all head splits (0 = copy dynamic dim).
    heads_shape = b.init("const.heads_shape", np.array([0, 0, heads, head_dim], dtype=np.int64))
    merge_shape = b.init("const.merge_shape", np.array([0, 0, dim], dtype=np.int64))
    h = b.layernorm(x0, "attn.ln", dim)

    def split_heads(t: str, name: str, perm: list[int]) -> str:
        r = b.op("Reshape", [t, heads_shape], f"{name}.reshape")
        return b.op("Transpose", [r], f"{name}.transpose", perm=perm)

    q = split_heads(b.matmul_add(h, "attn.q", dim, dim), "attn.q", [0, 2, 1, 3])  # [B,H,S,D]
    k_t = split_heads(b.matmul_add(h, "attn.k", dim, dim), "attn.k", [0, 2, 3, 1])  # [B,H,D,S]
    v = split_heads(b.matmul_add(h, "attn.v", dim, dim), "attn.v", [0, 2, 1, 3])  # [B,H,S,D]
    scale = b.init("attn.scale", np.array(1.0 / np.sqrt(head_dim), dtype=np.float32))
    scores = b.op("Mul", [b.op("MatMul", [q, k_t], "attn.qk"), scale], "attn.scale_mul")
    probs = b.op("Softmax", [scores], "attn.softmax", axis=-1)
    ctx = b.op("MatMul", [probs, v], "attn.context")
    ctx = b.op("Transpose", [ctx], "attn.merge.transpose", perm=[0, 2, 1, 3])
    ctx = b.op("Reshape", [ctx, merge_shape], "attn.merge.reshape")
    x1 = b.op("Add", [x0, b.matmul_add(ctx, "attn.out", dim, dim)], "attn.residual")

    # Feed-forward.
    h = b.layernorm(x1, "ffn.ln", dim)
    h = b.op("Gelu", [b.matmul_add(h, "ffn.up", dim, ffn)], "ffn.gelu")
    b.op("Add", [x1, b.matmul_add(h, "ffn.down", ffn, dim)], "ffn.residual")
    hidden = b.rename_last_output("hidden")

    axes = b.init("const.seq_axis", np.array([1], dtype=np.int64))
    b.op("ReduceMean", [hidden, axes], "pool.mean", keepdims=0)
    b.rename_last_output("embedding")

    model = make_model(
        b,
        "transformer",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [
            helper.make_tensor_value_info("hidden", FLOAT, ["batch", "seq", dim]),
            helper.make_tensor_value_info("embedding", FLOAT, ["batch", dim]),
        ],
        opset=20,
        doc="Synthetic pre-LN transformer encoder block (Gather embedding, LayerNormalization, "
        "4-head attention, Gelu FFN, ReduceMean pooling) for onnxshrink tests. seq <= 128.",
    )
    samples = {"input_ids": rng.integers(0, vocab, size=(NUM_SAMPLES, 1, 16), dtype=np.int64)}
    return model, samples


def build_control_flow(rng: np.random.Generator) -> Built:
    """If + Loop whose subgraphs read outer-scope initializers, which passes must not miss."""
    b = GraphBuilder(rng)
    dim = 16
    vec = [1, dim]
    # Outer-scope weights used only inside subgraphs; if_weight is shared by both branches.
    if_w = b.init("if.weight", b.he_normal((dim, dim), dim))
    if_b = b.init("if.then.bias", b.bias(dim, dim))
    loop_w = b.init("loop.weight", b.he_normal((dim, dim), dim))
    loop_b = b.init("loop.bias", b.bias(dim, dim))
    trip = b.init("loop.trip_count", np.array(3, dtype=np.int64))
    cond = b.init("loop.cond", np.array(True))

    then_b = GraphBuilder(rng)
    t = then_b.op("MatMul", ["x", if_w], "then.matmul")
    t = then_b.op("Add", [t, if_b], "then.add")
    then_b.op("Relu", [t], "then.relu")
    then_graph = helper.make_graph(
        then_b.nodes,
        "then_branch",
        [],
        [helper.make_tensor_value_info("then.relu_out", FLOAT, vec)],
    )

    else_b = GraphBuilder(rng)
    e = else_b.op("MatMul", ["x", if_w], "else.matmul")
    else_b.op("Sigmoid", [e], "else.sigmoid")
    else_graph = helper.make_graph(
        else_b.nodes,
        "else_branch",
        [],
        [helper.make_tensor_value_info("else.sigmoid_out", FLOAT, vec)],
    )
    branch = b.op("If", ["flag"], "if", then_branch=then_graph, else_branch=else_graph)

    body_b = GraphBuilder(rng)
    s = body_b.op("MatMul", ["loop.state_in", loop_w], "body.matmul")
    s = body_b.op("Add", [s, loop_b], "body.add")
    body_b.op("Tanh", [s], "body.tanh")
    body_b.op("Identity", ["loop.cond_in"], "body.cond")
    body = helper.make_graph(
        body_b.nodes,
        "loop_body",
        [
            helper.make_tensor_value_info("loop.iter", TensorProto.INT64, []),
            helper.make_tensor_value_info("loop.cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("loop.state_in", FLOAT, vec),
        ],
        [
            helper.make_tensor_value_info("body.cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("body.tanh_out", FLOAT, vec),
        ],
    )
    b.op("Loop", [trip, cond, branch], "loop", body=body)
    b.rename_last_output("y")

    model = make_model(
        b,
        "control_flow",
        [
            helper.make_tensor_value_info("x", FLOAT, vec),
            helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", FLOAT, vec)],
        opset=17,
        doc="Synthetic control-flow model: If (Relu/Sigmoid branches) then a 3-step Loop, "
        "subgraphs using outer-scope initializers, for onnxshrink tests.",
    )
    samples = {
        "x": rng.standard_normal((NUM_SAMPLES, 1, dim)).astype(np.float32),
        "flag": rng.permutation(np.array([True, False] * (NUM_SAMPLES // 2))),
    }
    return model, samples


def build_fp16(rng: np.random.Generator) -> Built:
    """MLP entirely in float16, to check passes do not silently assume float32."""
    b = GraphBuilder(rng)
    x = b.op("Relu", [b.gemm("x", "fc1", 32, 64, np.float16)], "fc1.relu")
    b.gemm(x, "fc2", 64, 8, np.float16)
    b.rename_last_output("y")
    model = make_model(
        b,
        "fp16",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", 8])],
        opset=17,
        doc="Synthetic float16 MLP (Gemm+Relu+Gemm, fp16 weights and I/O) for onnxshrink tests.",
    )
    samples = {"x": rng.standard_normal((NUM_SAMPLES, 1, 32)).astype(np.float16)}
    return model, samples


# name -> (builder, seed). Each model has its own seed so adding a model changes no other.
MODELS: dict[str, tuple[Callable[[np.random.Generator], Built], int]] = {
    "cnn": (build_cnn, 1001),
    "mlp": (build_mlp, 1002),
    "transformer": (build_transformer, 1003),
    "control_flow": (build_control_flow, 1004),
    "fp16": (build_fp16, 1005),
}


# Checking and writing -----------------------------------------------------------------------


def run_samples(model: onnx.ModelProto, samples: Samples) -> list[np.ndarray]:
    """Run every sample through onnxruntime on CPU; return each output stacked over samples."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # single thread: same float results on any machine
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    count = len(next(iter(samples.values())))
    runs = [sess.run(None, {k: v[i, ...] for k, v in samples.items()}) for i in range(count)]
    return [np.stack(outs) for outs in zip(*runs, strict=True)]


def check(condition: bool, message: str) -> None:
    """Raise instead of assert, so `python -O` cannot skip verification."""
    if not condition:
        raise RuntimeError(message)


def verify(name: str, model: onnx.ModelProto, samples: Samples) -> None:
    """Fail loudly unless the model is valid, runs, and gives finite, sample-dependent output."""
    onnx.checker.check_model(model, full_check=True)
    input_names = sorted(i.name for i in model.graph.input)
    check(sorted(samples) == input_names, f"{name}: npz keys differ from inputs {input_names}")
    for out_info, out in zip(model.graph.output, run_samples(model, samples), strict=True):
        label = f"{name}:{out_info.name}"
        check(bool(np.all(np.isfinite(out))), f"{label} has non-finite values")
        distinct = len({sample.tobytes() for sample in out})
        check(distinct == len(out), f"{label}: only {distinct} distinct outputs")


def main(outdir: Path) -> None:
    """Build, verify and write every sample model plus its inputs."""
    outdir.mkdir(parents=True, exist_ok=True)
    for name, (build, seed) in MODELS.items():
        model, samples = build(np.random.default_rng(seed))
        verify(name, model, samples)
        onnx_path, npz_path = outdir / f"{name}.onnx", outdir / f"{name}.npz"
        onnx_path.write_bytes(model.SerializeToString())
        np.savez(npz_path, **samples)
        sizes = {path.name: path.stat().st_size for path in (onnx_path, npz_path)}
        for file_name, size in sizes.items():
            check(size < MAX_FILE_BYTES, f"{file_name} is {size} bytes, over the 1 MB budget")
        print(f"{name}: {len(model.graph.node)} nodes, file sizes {sizes}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
