"""Bad input, determinism, unusual signatures, no bloat, and a model over 2 GB.

Every bad input must give exactly one ``error:`` line on stderr (no traceback, nothing on
stdout), the exit code of its kind (4 model, 5 recipe, 6 samples, 7 output), leave every input
file byte-identical, and leave nothing in the output folder: no partial OUT, no temp files.
The CLI runs in-process through typer's CliRunner; where only a real process shows the problem
(onnxruntime's C++ logging goes straight to fd 2, hash randomisation differs per process), the
installed console script runs in a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from typer.testing import CliRunner

import onnxshrink
from onnxshrink.cli import app
from onnxshrink.errors import EXIT_CODES
from tests.conftest import SAMPLE_NAMES, SAMPLES

runner = CliRunner()
MODEL, RECIPE, SAMPLES_ERR, OUTPUT = (
    EXIT_CODES["model"], EXIT_CODES["recipe"], EXIT_CODES["samples"], EXIT_CODES["output"])


@dataclass
class Workspace:
    """A copy of the cnn sample model and its samples, and an empty output folder."""

    root: Path
    model: Path
    samples: Path
    out_dir: Path

    @property
    def out(self) -> Path:
        """Where compress is asked to write."""
        return self.out_dir / "out.onnx"

    def inputs(self) -> dict[str, str]:
        """sha256 of every file outside the output folder (what must stay untouched)."""
        return {
            str(p.relative_to(self.root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(self.root.rglob("*"))
            if p.is_file() and self.out_dir not in p.parents
        }


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    """Fresh inputs in ``in/`` and an empty ``out/``."""
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(SAMPLES / "cnn.onnx", src / "cnn.onnx")
    shutil.copy(SAMPLES / "cnn.npz", src / "cnn.npz")
    out = tmp_path / "out"
    out.mkdir()
    return Workspace(tmp_path, src / "cnn.onnx", src / "cnn.npz", out)


def invoke(*args: object):  # type: ignore[no-untyped-def]
    """Run the CLI in-process; exceptions escaping the CLI would be a bug, so let them raise."""
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def assert_refused(stdout: str, stderr: str, code: int, exit_code: int, needle: str) -> None:
    """Exactly one ``error:`` line naming the problem, the right code, no traceback."""
    assert exit_code == code, f"exit {exit_code} != {code}\nstdout: {stdout}\nstderr: {stderr}"
    assert "Traceback" not in stdout + stderr
    assert stdout.strip() == "", stdout
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines[0]
    assert needle in lines[0], lines[0]


def check_refusal(ws: Workspace, args: list[object], code: int, needle: str) -> None:
    """Run `compress` with `args` and check the refusal, the inputs and the output folder."""
    before = ws.inputs()
    result = invoke("compress", *args)
    assert_refused(result.stdout, result.stderr, code, result.exit_code, needle)
    assert ws.inputs() == before, "an input file changed"
    assert sorted(ws.out_dir.iterdir()) == [], "something was left in the output folder"


# ------------------------------------------------------------------ bad models


def relu_model(opset: int = 17) -> onnx.ModelProto:
    """x[1,4] -> Relu -> y: the smallest valid model, mutated below into invalid ones."""
    x = gs.Variable("x", np.float32, [1, 4])
    y = gs.Variable("y", np.float32, [1, 4])
    graph = gs.Graph(nodes=[gs.Node("Relu", "relu", inputs=[x], outputs=[y])],
                     inputs=[x], outputs=[y], opset=opset)
    model = gs.export_onnx(graph)
    model.ir_version = 9
    return model


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _missing(d: Path) -> Path:
    return d / "missing.onnx"


def _directory(d: Path) -> Path:
    (d / "folder.onnx").mkdir()
    return d / "folder.onnx"


def _empty(d: Path) -> Path:
    return _write(d / "empty.onnx", b"")


def _truncated(d: Path) -> Path:
    data = (SAMPLES / "cnn.onnx").read_bytes()
    return _write(d / "truncated.onnx", data[: len(data) // 2])


def _random_bytes(d: Path) -> Path:
    return _write(d / "random.onnx", np.random.default_rng(0).bytes(4096))


def _tensor_proto(d: Path) -> Path:
    tensor = onnx.numpy_helper.from_array(np.ones((3, 3), np.float32), "t")
    return _write(d / "tensor.onnx", tensor.SerializeToString())


def _node_proto(d: Path) -> Path:
    node = onnx.NodeProto(op_type="Relu", input=["x"], output=["y"], name="n")
    return _write(d / "node.onnx", node.SerializeToString())


def _fails_checker(d: Path) -> Path:
    model = relu_model()
    model.graph.node[0].input.append("nowhere")  # an input no one produces
    return _write(d / "checker.onnx", model.SerializeToString())


def _custom_domain(d: Path) -> Path:
    model = relu_model()
    model.graph.node[0].op_type = "MyOp"
    model.graph.node[0].domain = "com.example.custom"
    model.opset_import.append(onnx.OperatorSetIdProto(domain="com.example.custom", version=1))
    return _write(d / "custom.onnx", model.SerializeToString())


def _unsupported_opset(d: Path) -> Path:
    return _write(d / "opset99.onnx", relu_model(opset=99).SerializeToString())


def _fails_at_run_time(d: Path) -> Path:
    """Passes the checker and loads, but onnxruntime rejects the attribute when it runs."""
    x = gs.Variable("x", np.float32, [1, 4])
    y = gs.Variable("y", np.float32, [1, 4])
    graph = gs.Graph(nodes=[gs.Node("Gelu", "gelu", {"approximate": "bogus"}, inputs=[x],
                                    outputs=[y])], inputs=[x], outputs=[y], opset=20)
    model = gs.export_onnx(graph)
    model.ir_version = 9
    return _write(d / "gelu.onnx", model.SerializeToString())


def _needs_a_size(d: Path) -> Path:
    """Runs only when its dynamic length is at least 100 (a reflect pad of 99), which random
    inputs of the guessed size 64 are not: the error must say what was guessed."""
    x = gs.Variable("x", np.float32, [1, "time"])
    y = gs.Variable("y", np.float32, [1, "padded"])
    pads = gs.Constant("pads", np.array([0, 99, 0, 99], np.int64))
    graph = gs.Graph(nodes=[gs.Node("Pad", "pad", {"mode": "reflect"}, inputs=[x, pads],
                                    outputs=[y])], inputs=[x], outputs=[y], opset=17)
    model = gs.export_onnx(graph)
    model.ir_version = 9
    return _write(d / "pad.onnx", model.SerializeToString())


def _external_model(d: Path, name: str) -> tuple[Path, Path]:
    """The cnn sample with every weight in ``<name>.bin`` beside it."""
    model = onnx.load(str(SAMPLES / "cnn.onnx"))
    path = d / f"{name}.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{name}.bin", size_threshold=0)
    return path, d / f"{name}.bin"


def _external_missing(d: Path) -> Path:
    path, data = _external_model(d, "ext_missing")
    data.unlink()
    return path


def _external_truncated(d: Path) -> Path:
    path, data = _external_model(d, "ext_truncated")
    blob = data.read_bytes()
    data.write_bytes(blob[: len(blob) // 2])
    return path


def _external_outside(d: Path) -> Path:
    """A location that climbs out of the model's folder (onnx refuses these too)."""
    path, data = _external_model(d, "ext_outside")
    secret = d.parent / "secret.bin"
    shutil.move(data, secret)
    model = onnx.load_model(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../secret.bin"
    path.write_bytes(model.SerializeToString())
    return path


BAD_MODELS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "missing": (_missing, "no such file"),
    "directory": (_directory, "is a directory"),
    "empty": (_empty, "empty file"),
    "truncated": (_truncated, "not an ONNX model"),
    "random-bytes": (_random_bytes, "not an ONNX model"),
    "tensor-proto": (_tensor_proto, "not an ONNX model"),
    "node-proto": (_node_proto, "not an ONNX model"),
    "fails-checker": (_fails_checker, "fails the ONNX checker"),
    "custom-domain": (_custom_domain, "custom operator domain 'com.example.custom'"),
    "unsupported-opset": (_unsupported_opset, "onnxruntime cannot load the model"),
    "fails-at-run-time": (_fails_at_run_time, "onnxruntime failed on sample 0"),
    "needs-a-size": (_needs_a_size, "--dim (guessed: x:1 (time)=64)"),
    "external-missing": (_external_missing, "does not exist"),
    "external-truncated": (_external_truncated, "beyond the end"),
    "external-outside": (_external_outside, "outside the model's folder"),
}


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_bad_model_is_refused(ws: Workspace, case: str) -> None:
    """One line naming the file and the problem, exit code 4, nothing written."""
    build, needle = BAD_MODELS[case]
    model = build(ws.model.parent)
    check_refusal(ws, [model, "-o", ws.out], MODEL, needle)
    result = invoke("compress", model, "-o", ws.out)
    assert model.name in result.stderr


# ------------------------------------------------------------------ bad recipes

BAD_RECIPES: dict[str, tuple[str, str]] = {
    "unknown-param": ('[[step]]\npass = "graph.cleanup"\nparams = { fold_constantz = true }\n',
                      "did you mean 'fold_constants'"),
    "unknown-pass": ('[[step]]\npass = "graph.cleanupp"\n', "unknown pass 'graph.cleanupp'"),
    "unknown-step-key": ('[[step]]\npass = "graph.cleanup"\nbogus = 1\n', "unknown key 'bogus'"),
    "wrong-type": ('[[step]]\npass = "graph.cleanup"\nparams = { max_growth_bytes = "big" }\n',
                   "must be int"),
    "out-of-range": ('[[step]]\npass = "graph.cleanup"\nparams = { max_growth_bytes = -1 }\n',
                     "max_growth_bytes"),
    "bad-toml": ('[[step]\npass = "graph.cleanup"\n', "not valid TOML"),
}


@pytest.mark.parametrize("case", list(BAD_RECIPES))
def test_bad_recipe_is_refused(ws: Workspace, case: str) -> None:
    """Exit code 5 naming the recipe file, step and key."""
    text, needle = BAD_RECIPES[case]
    recipe = ws.model.parent / f"{case}.toml"
    recipe.write_text(text)
    check_refusal(ws, [ws.model, "-r", recipe, "-o", ws.out], RECIPE, needle)


def test_recipe_is_checked_before_the_model(ws: Workspace) -> None:
    """A bad recipe fails fast even when the model is bad too (no model is loaded first)."""
    recipe = ws.model.parent / "bad.toml"
    recipe.write_text('[[step]]\npass = "nope"\n')
    check_refusal(ws, [ws.model.parent / "missing.onnx", "-r", recipe, "-o", ws.out], RECIPE,
                  "unknown pass")


def test_model_below_the_recipes_min_opset_is_refused(ws: Workspace) -> None:
    """A recipe states the oldest opset it is written for: an older model is refused (exit 4)
    before any pass runs, naming both versions."""
    recipe = ws.model.parent / "new.toml"
    recipe.write_text(
        'schema = 1\n[recipe]\nname = "new"\nmin_opset = 99\n[[step]]\npass = "graph.cleanup"\n'
    )
    check_refusal(ws, [ws.model, "-r", recipe, "-o", ws.out], MODEL, "min_opset 99")


def test_missing_recipe_is_refused(ws: Workspace) -> None:
    """A recipe path that does not exist (or a shipped name that is unknown)."""
    check_refusal(ws, [ws.model, "-r", ws.root / "nope.toml", "-o", ws.out], RECIPE, "not found")
    check_refusal(ws, [ws.model, "-r", "no-such-recipe", "-o", ws.out], RECIPE, "unknown recipe")


# ------------------------------------------------------------------ bad samples


def _npz(ws: Workspace, name: str, **arrays: np.ndarray) -> Path:
    path = ws.model.parent / name
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def _image(ws: Workspace) -> np.ndarray:
    with np.load(ws.samples) as data:
        return data["image"]  # (8, 1, 3, 32, 32): 8 samples of the [batch, 3, 32, 32] input


BAD_SAMPLES: dict[str, tuple[Callable[[Workspace], Path], str]] = {
    "wrong-name": (lambda w: _npz(w, "name.npz", pixels=_image(w)), "missing: ['image']"),
    "extra-name": (lambda w: _npz(w, "extra.npz", image=_image(w), mask=_image(w)),
                   "unexpected: ['mask']"),
    "wrong-dtype": (lambda w: _npz(w, "dtype.npz", image=_image(w).astype(np.int64)),
                    "has dtype int64, the model expects float32"),
    "wrong-shape": (lambda w: _npz(w, "shape.npz", image=_image(w)[..., :5]),
                    "has shape [1, 3, 32, 5]"),
    "wrong-rank": (lambda w: _npz(w, "rank.npz", image=_image(w)[:, 0]), "expects rank 4"),
    "no-samples": (lambda w: _npz(w, "none.npz", image=_image(w)[:0]), "leading sample axis"),
    "not-an-npz": (lambda w: _write(w.model.parent / "text.npz", b"not a zip"),
                   "not an .npz file"),
    "wrong-suffix": (lambda w: _write(w.model.parent / "samples.txt", b"x"),
                     "must be an .npz file or a folder"),
    "missing": (lambda w: w.model.parent / "nothere.npz", "samples not found"),
    "empty-folder": (lambda w: _mkdir(w.model.parent / "data"), "no test_data_set_*"),
    "pb-count": (lambda w: _pb_folder(w, 2), "2 input files, but the model takes 1"),
}


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _pb_folder(ws: Workspace, inputs: int) -> Path:
    folder = ws.model.parent / "data"
    (folder / "test_data_set_0").mkdir(parents=True)
    tensor = onnx.numpy_helper.from_array(_image(ws)[0])
    for i in range(inputs):
        (folder / "test_data_set_0" / f"input_{i}.pb").write_bytes(tensor.SerializeToString())
    return folder


@pytest.mark.parametrize("case", list(BAD_SAMPLES))
def test_bad_samples_are_refused(ws: Workspace, case: str) -> None:
    """Exit code 6 naming the samples and what does not match the model's signature."""
    build, needle = BAD_SAMPLES[case]
    check_refusal(ws, [ws.model, "--samples", build(ws), "-o", ws.out], SAMPLES_ERR, needle)


# ------------------------------------------------------------------ bad outputs


def test_output_in_missing_folder_is_refused(ws: Workspace) -> None:
    """Exit code 7; the missing folder is not created."""
    check_refusal(ws, [ws.model, "-o", ws.out_dir / "sub" / "out.onnx"], OUTPUT,
                  "output directory does not exist")


def test_output_onto_the_input_is_refused(ws: Workspace) -> None:
    """Writing over the input model would destroy it."""
    check_refusal(ws, [ws.model, "-o", ws.model], OUTPUT, "refusing to overwrite the input")


def test_output_onto_a_directory_is_refused(ws: Workspace) -> None:
    """An existing directory as OUT is refused and stays as it was."""
    target = ws.out_dir / "dir.onnx"
    target.mkdir()
    before = ws.inputs()
    result = invoke("compress", ws.model, "-o", target)
    assert_refused(result.stdout, result.stderr, OUTPUT, result.exit_code, "is a directory")
    assert ws.inputs() == before
    assert sorted(ws.out_dir.iterdir()) == [target] and not any(target.iterdir())


def test_success_leaves_only_the_requested_files(ws: Workspace) -> None:
    """No temp files or folders beside OUT and the report after a successful run."""
    report = ws.out_dir / "report.json"
    before = ws.inputs()
    result = invoke("compress", ws.model, "-o", ws.out, "--samples", ws.samples,
                    "--report", report)
    assert result.exit_code == 0, result.stderr
    assert ws.inputs() == before
    assert sorted(p.name for p in ws.out_dir.iterdir()) == ["out.onnx", "report.json"]


# ------------------------------------------------------------------ real processes


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("onnxshrink")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from onnxshrink.cli import app; app()"]


def run_cli(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The installed command in its own process (what a user's shell sees)."""
    return subprocess.run([*_cli(), *(str(a) for a in args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})}, check=False)


@pytest.mark.parametrize(
    "case",
    [
        "truncated",
        "custom-domain",
        "unsupported-opset",
        "fails-at-run-time",
    ],
)
def test_bad_model_in_a_real_process_prints_one_line(ws: Workspace, case: str) -> None:
    """Native code (onnxruntime's logger) writes to fd 2 directly, which CliRunner never sees."""
    build, needle = BAD_MODELS[case]
    model = build(ws.model.parent)
    before = ws.inputs()
    proc = run_cli("compress", model, "-o", ws.out)
    assert_refused(proc.stdout, proc.stderr, MODEL, proc.returncode, needle)
    assert ws.inputs() == before
    assert sorted(ws.out_dir.iterdir()) == []


def test_bad_recipe_and_samples_in_a_real_process(ws: Workspace) -> None:
    """The console script maps errors to the same codes as the in-process CLI."""
    recipe = ws.model.parent / "r.toml"
    recipe.write_text('[[step]]\npass = "graph.cleanupp"\n')
    proc = run_cli("compress", ws.model, "-r", recipe, "-o", ws.out)
    assert_refused(proc.stdout, proc.stderr, RECIPE, proc.returncode, "did you mean")
    bad = _npz(ws, "bad.npz", image=_image(ws).astype(np.int64))
    proc = run_cli("compress", ws.model, "--samples", bad, "-o", ws.out)
    assert_refused(proc.stdout, proc.stderr, SAMPLES_ERR, proc.returncode, "dtype int64")
    assert sorted(ws.out_dir.iterdir()) == []


# ------------------------------------------------------------------ determinism


#: Static int8 with the accuracy guard only: every decision comes from the samples (the latency
#: guard times this machine, so "default" and "int8" may differ between runs by design).
INT8_ACCURACY = """schema = 1
[recipe]
name = "int8-accuracy"
[[step]]
pass = "graph.cleanup"
[[step]]
pass = "quant.qdq"
params = { calibration = "mse", smooth = true, guard = "accuracy" }
[validate]
tolerance = { min_cosine = 0.99 }
"""


def _recipe(tmp_path: Path, which: str) -> str:
    if which == "lossless":
        return which
    path = tmp_path / "int8-accuracy.toml"
    path.write_text(INT8_ACCURACY)
    return str(path)


@pytest.mark.parametrize("which", ["lossless", "int8-accuracy"])
@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_same_input_same_bytes(tmp_path: Path, name: str, which: str) -> None:
    """Same model, recipe and seed: byte-identical OUT (and the same report numbers)."""
    outs = []
    for k in range(2):
        out = tmp_path / f"run{k}.onnx"
        report = onnxshrink.compress(SAMPLES / f"{name}.onnx", _recipe(tmp_path, which), out,
                                     samples=SAMPLES / f"{name}.npz", seed=7)
        assert report.ok
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


@pytest.mark.parametrize("name", ["cnn", "control_flow", "transformer"])
def test_same_bytes_across_processes(tmp_path: Path, name: str) -> None:
    """Set and dict order must not leak into the output: another PYTHONHASHSEED, same bytes."""
    outs = []
    for hashseed in ("1", "2"):
        out = tmp_path / f"out{hashseed}.onnx"
        proc = run_cli("compress", SAMPLES / f"{name}.onnx", "-o", out, "--no-validate",
                       "-r", _recipe(tmp_path, "int8-accuracy"), env={"PYTHONHASHSEED": hashseed})
        assert proc.returncode == 0, proc.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


# ------------------------------------------------------------------ > 2 GB

BIG_SHAPES = ((16384, 12800), (12800, 16384), (16384, 12800))  # 3 x 800 MiB of float32
BIG_BYTES = sum(a * b * 4 for a, b in BIG_SHAPES)


def write_big_model(folder: Path) -> Path:
    """x[1,16384] -> MatMul W0 -> Add -> MatMul W1 -> MatMul W2 -> y, weights in big.onnx.data.

    Weights are written chunk by chunk (never all in memory) as a sawtooth whose period is a
    different prime per tensor: any shifted or misplaced block changes the output, while gzip
    (which `compress` runs for its size report) stays fast on them; random weights would cost
    minutes of gzip -9 per pass.
    """
    path, data = folder / "big.onnx", folder / "big.onnx.data"
    inits: list[onnx.TensorProto] = []
    with open(data, "wb") as f:
        for k, (rows, cols) in enumerate(BIG_SHAPES):
            offset, period = f.tell(), (997, 1009, 1013)[k]
            for start in range(0, rows * cols, 1 << 24):
                i = np.arange(start, min(start + (1 << 24), rows * cols), dtype=np.int64)
                block = ((i % period) / period - 0.5) * (2 / np.sqrt(rows))
                f.write(block.astype(np.float32).tobytes())
            tensor = onnx.TensorProto(name=f"w{k}", data_type=onnx.TensorProto.FLOAT,
                                      dims=[rows, cols])
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data.name), ("offset", str(offset)),
                               ("length", str(rows * cols * 4))):
                tensor.external_data.append(onnx.StringStringEntryProto(key=key, value=value))
            inits.append(tensor)
    x = gs.Variable("x", np.float32, [1, BIG_SHAPES[0][0]])
    bias = gs.Constant("bias", np.full(BIG_SHAPES[0][1], 0.5, np.float32))
    h0, h1, h2 = (gs.Variable(f"h{i}", np.float32) for i in range(3))
    y = gs.Variable("y", np.float32, [1, BIG_SHAPES[2][1]])
    w = [gs.Variable(f"w{k}", np.float32, list(s)) for k, s in enumerate(BIG_SHAPES)]
    graph = gs.Graph(nodes=[
        gs.Node("MatMul", "mm0", inputs=[x, w[0]], outputs=[h0]),
        gs.Node("Add", "add", inputs=[h0, bias], outputs=[h1]),
        gs.Node("MatMul", "mm1", inputs=[h1, w[1]], outputs=[h2]),
        gs.Node("MatMul", "mm2", inputs=[h2, w[2]], outputs=[y]),
    ], inputs=[x], outputs=[y], opset=17)
    model = gs.export_onnx(graph)
    model.ir_version = 9
    del model.graph.value_info[:]  # the weights were Variables only to wire the graph up
    model.graph.initializer.extend(inits)
    path.write_bytes(model.SerializeToString())
    return path


#: The child reports VmHWM, its own peak RSS. Not ru_maxrss: Linux carries the parent's peak
#: over exec into it, so a child of a big pytest process would seem big.
_RSS_WRAPPER = (
    "import atexit, os\n"
    "def _hwm():\n"
    "    line = next(x for x in open('/proc/self/status') if x.startswith('VmHWM:'))\n"
    "    open(os.environ['RSS_FILE'], 'w').write(str(int(line.split()[1]) * 1024))\n"
    "atexit.register(_hwm)\n"
    "from onnxshrink.cli import app\n"
    "app()\n"
)


def run_measured(tmp: Path, *args: object) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run the CLI in a child process; also return the child's own peak RSS in bytes."""
    rss = tmp / "rss.txt"
    proc = subprocess.run([sys.executable, "-c", _RSS_WRAPPER, *(str(a) for a in args)],
                          capture_output=True, text=True, timeout=1800, check=False,
                          env={**os.environ, "RSS_FILE": str(rss)})
    return proc, int(rss.read_text())


@pytest.mark.slow
@pytest.mark.ort
def test_model_over_2gb_round_trips_with_external_data(tmp_path: Path) -> None:
    """Compress streams weights (lazy load, chunked save) and writes OUT + OUT.data that
    onnxruntime loads and that validates against the original."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("peak RSS is read from /proc (Linux)")
    free = shutil.disk_usage(tmp_path).free
    if free < 10 * 2**30:
        pytest.skip(f"needs ~10 GB free in {tmp_path}, has {free / 2**30:.1f} GB")
    src = tmp_path / "in"
    src.mkdir()
    out_dir = tmp_path / "out"
    try:
        model = write_big_model(src)
        before = hashlib.sha256(model.read_bytes()).hexdigest()
        out = out_dir / "big.small.onnx"
        out_dir.mkdir()

        # The passes and the save alone: weights stay lazy and are streamed, never all in memory.
        proc, peak = run_measured(tmp_path, "compress", model, "-o", out, "--no-validate",
                                  "-r", "lossless")
        assert proc.returncode == 0, proc.stderr
        assert peak < 2**29, f"peak RSS {peak / 2**30:.2f} GiB for {BIG_BYTES / 2**30:.1f} GiB"
        data = out.with_name(out.name + ".data")
        assert sorted(p.name for p in out.parent.iterdir()) == [out.name, data.name]
        assert out.stat().st_size < 1 << 20 and data.stat().st_size >= BIG_BYTES
        assert hashlib.sha256(model.read_bytes()).hexdigest() == before

        # onnxruntime loads OUT and it computes exactly what the original does (the comparison
        # `compress` runs, minus a second gzip of 2.4 GB for the size report); the sessions come
        # one after the other, so memory stays near the one copy of the weights onnxruntime needs.
        proc, peak = run_measured(tmp_path, "validate", model, out, "--json")
        assert proc.returncode == 0, proc.stderr
        assert peak < 1.5 * BIG_BYTES + 2**30, f"peak RSS {peak / 2**30:.2f} GiB to validate"
        body = json.loads(proc.stdout)
        (y,) = body["outputs"]
        assert body["ok"] and y["name"] == "y" and y["shape"] == [1, BIG_SHAPES[2][1]]
        assert y["max_abs"] == 0.0 and y["cosine"] > 1 - 1e-12
        assert hashlib.sha256(model.read_bytes()).hexdigest() == before
    finally:  # 5 GB per run: never leave it in pytest's kept temp folders
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(out_dir, ignore_errors=True)


# ------------------------------------------------------------------ shapes users bring


def _single_op(op: str, dtype: type, shape: list[int | str], attrs: dict | None = None,
               opset: int = 20) -> onnx.ModelProto:
    x = gs.Variable("x", dtype, shape)
    y = gs.Variable("y", dtype, shape)
    graph = gs.Graph(nodes=[gs.Node(op, "op", attrs or {}, inputs=[x], outputs=[y])],
                     inputs=[x], outputs=[y], opset=opset)
    model = gs.export_onnx(graph)
    model.ir_version = 9
    return model


EDGE_MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    "zero-size-dim": lambda: _single_op("Relu", np.float32, [0, 4]),
    "scalar": lambda: _single_op("Neg", np.float32, []),
    "dynamic-rank-1": lambda: _single_op("Abs", np.float32, ["n"]),
    "string-input": lambda: _single_op("StringNormalizer", object, [3],
                                       {"case_change_action": "NONE"}),
    "bool-input": lambda: _single_op("Not", np.bool_, [2, 2]),
    "float16-input": lambda: _single_op("Relu", np.float16, [2, 2]),
}


@pytest.mark.parametrize("case", list(EDGE_MODELS))
def test_unusual_signatures_compress_and_validate(tmp_path: Path, case: str) -> None:
    """Empty dims (onnxruntime insists on 0), scalars, strings: random samples fit them."""
    path = tmp_path / f"{case}.onnx"
    onnx.save(EDGE_MODELS[case](), str(path))
    out = tmp_path / "out.onnx"
    report = onnxshrink.compress(path, None, out)
    assert report.ok and out.is_file()
    assert report.numerics is not None and report.numerics.samples > 0


# ------------------------------------------------------------------ the default never bloats


def _cleanup(graph: gs.Graph) -> dict[str, object]:
    from onnxshrink.passes.base import Context
    from onnxshrink.passes.graph_cleanup import CleanupGraphPass

    result = CleanupGraphPass().run(graph, list(graph.nodes), Context(Path("t.onnx"), opset=17))
    graph.cleanup().toposort()
    return {"touched": result.touched, "stats": result.stats}


def test_folding_never_stores_a_shared_weight_twice() -> None:
    """Transpose(W) with W also read by a Gather (tied embeddings) would store W twice: not
    folded. A weight only the folded node reads moves into its folded form."""
    rng = np.random.default_rng(0)
    table = gs.Constant("table", rng.standard_normal((64, 16)).astype(np.float32))
    own = gs.Constant("own", rng.standard_normal((16, 8)).astype(np.float32))
    ids = gs.Variable("ids", np.int64, [1, 3])
    h = gs.Variable("h", np.float32, [1, 3, 16])
    emb, tt, ot = (gs.Variable(n, np.float32) for n in ("emb", "tt", "ot"))
    logits, y = gs.Variable("logits", np.float32), gs.Variable("y", np.float32)
    graph = gs.Graph(nodes=[
        gs.Node("Gather", "embed", inputs=[table, ids], outputs=[emb]),
        gs.Node("Transpose", "tied_t", {"perm": [1, 0]}, inputs=[table], outputs=[tt]),
        gs.Node("MatMul", "head", inputs=[emb, tt], outputs=[logits]),
        gs.Node("Transpose", "own_t", {"perm": [1, 0]}, inputs=[own], outputs=[ot]),
        gs.Node("MatMul", "proj", inputs=[h, gs.Constant("p", np.ones((16, 16), np.float32))],
                outputs=[gs.Variable("hp", np.float32)]),
    ], inputs=[ids, h], outputs=[logits], opset=17)
    hp = graph.nodes[-1].outputs[0]
    graph.nodes.append(gs.Node("MatMul", "out", inputs=[hp, ot], outputs=[y]))
    graph.outputs.append(y)
    before = _constant_bytes(graph)
    touched = _cleanup(graph)["touched"]
    assert "own_t" in touched and "tied_t" not in touched  # type: ignore[operator]
    assert _constant_bytes(graph) <= before


def _constant_bytes(graph: gs.Graph) -> int:
    return sum(t.values.nbytes for t in graph.tensors().values() if isinstance(t, gs.Constant))


def test_huge_constant_expansion_is_never_evaluated() -> None:
    """ConstantOfShape([2**20, 2**20]) (4 TiB) is skipped from its inferred shape, before
    onnxruntime would try to build it; the harmless fold beside it still happens."""
    shape = gs.Constant("shape", np.array([1 << 20, 1 << 20], np.int64))
    huge = gs.Variable("huge", np.float32, [1 << 20, 1 << 20])
    w = gs.Constant("w", np.arange(12, dtype=np.float32).reshape(3, 4))
    wt, y, z = gs.Variable("wt", np.float32), gs.Variable("y", np.float32), gs.Variable(
        "z", np.float32)
    x = gs.Variable("x", np.float32, [2, 4])
    graph = gs.Graph(nodes=[
        gs.Node("ConstantOfShape", "cos", inputs=[shape], outputs=[huge]),
        gs.Node("Add", "use_huge", inputs=[huge, gs.Constant("one", np.ones(1, np.float32))],
                outputs=[z]),
        gs.Node("Transpose", "t", {"perm": [1, 0]}, inputs=[w], outputs=[wt]),
        gs.Node("MatMul", "mm", inputs=[x, wt], outputs=[y]),
    ], inputs=[x], outputs=[y, z], opset=17)
    result = _cleanup(graph)
    assert "t" in result["touched"] and "cos" not in result["touched"]  # type: ignore[operator]
    assert "fold_errors" not in result["stats"]  # type: ignore[operator]
