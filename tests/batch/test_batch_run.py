"""End-to-end batches with real onnxruntime: broken inputs, --jobs, kills, resume, timeouts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import psutil
from typer.testing import CliRunner

from onnxshrink.batch import BatchOptions, BatchResult, run_batch
from onnxshrink.batch.jobs import STAGING
from onnxshrink.cli import app
from tests.batch.conftest import options, stable
from tests.batch.trees import LAYOUT, output_bytes
from tests.conftest import SAMPLES

CLI = [sys.executable, "-c", "from onnxshrink.cli import app; app()"]


def test_reference_run_compresses_good_models_and_fails_broken_ones(
    reference: BatchResult,
) -> None:
    rows = {r.input: r for r in reference.rows}
    assert reference.exit_code == 1
    assert reference.counts == {"passed": 5, "missed": 0, "failed": 3}
    for rel in LAYOUT.values():
        assert rows[rel].status == "passed", rows[rel]
        out = reference.summary_json.parent / rel
        onnx.checker.check_model(onnx.load(str(out)), full_check=True)
        assert rows[rel].output_sha256 and rows[rel].min_cosine > 0.9999
    expected = {"broken/truncated.onnx": "not an ONNX model",
                "broken/random_bytes.onnx": "not an ONNX model",
                "broken/fails_checker.onnx": "fails the ONNX checker"}
    for rel, words in expected.items():
        row = rows[rel]
        assert (row.status, row.error_kind) == ("failed", "model")
        assert words in row.error and rel.split("/")[-1] in row.error, row.error
        assert "\n" not in row.error and "Traceback" not in row.error
        assert not (reference.summary_json.parent / rel).exists()
    assert set(output_bytes(reference.summary_json.parent)) == set(LAYOUT.values())


def test_cli_with_two_jobs_matches_one_job_byte_for_byte(
    tree: Path, reference: BatchResult, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["batch", str(tree / "models"), "-o", str(out),
                                      "-s", str(tree / "samples"), "--jobs", "2",
                                      "-r", "lossless"])
    assert result.exit_code == 1, result.output
    assert "5 passed, 0 missed, 3 failed" in result.output
    assert "fails the ONNX checker" in result.output
    ref_dir = reference.summary_json.parent
    assert output_bytes(out) == output_bytes(ref_dir)
    assert stable(out / "summary.json") == stable(reference.summary_json)
    strip = [",".join(line.split(",")[:-1]) for line in
             (out / "summary.csv").read_text().splitlines()]  # wall_s is the last column
    ref = [",".join(line.split(",")[:-1]) for line in
           reference.summary_csv.read_text().splitlines()]
    assert strip == ref
    assert not (out / STAGING).exists()


def _wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _outputs(out: Path) -> list[Path]:
    """Published outputs; os.walk passes over staging folders removed while it walks."""
    found = []
    for root, dirs, files in os.walk(out):
        dirs[:] = [d for d in dirs if d != STAGING]
        found += [Path(root) / f for f in files if f.endswith(".onnx")]
    return found


def _start(tree: Path, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*CLI, "batch", str(tree / "models"), "-o", str(out), "-s", str(tree / "samples"),
         "-r", "lossless"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )


def _passed_rows(out: Path) -> int:
    try:
        rows = json.loads((out / "summary.json").read_text())["rows"]
    except (OSError, ValueError):
        return 0
    return sum(r["status"] == "passed" for r in rows)


def _session_alive(sid: int) -> bool:
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                return True
        except (OSError, psutil.Error):
            continue
    return False


def _assert_only_complete_outputs(out: Path) -> None:
    for path in _outputs(out):
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def test_killed_batch_resumes_to_the_uninterrupted_summary(
    tree: Path, reference: BatchResult, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    proc = _start(tree, out)
    _wait_for(lambda: bool(_outputs(out)) or proc.poll() is not None, 60, "a first output")
    assert proc.poll() is None, "the batch finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # Workers must not outlive a killed driver (they die with it, not finish on their own).
    _wait_for(lambda: not _session_alive(proc.pid), 15, "the killed batch's workers to exit")
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["complete"]
    _assert_only_complete_outputs(out)
    resumed = run_batch(options(tree, out, resume=True))
    assert stable(resumed.summary_json) == stable(reference.summary_json)
    assert output_bytes(out) == output_bytes(reference.summary_json.parent)
    assert not (out / STAGING).exists()


def test_ctrl_c_writes_the_summary_and_resume_skips_finished_models(
    tree: Path, reference: BatchResult, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    proc = _start(tree, out)
    _wait_for(lambda: _passed_rows(out) > 0 or proc.poll() is not None, 60, "a first passed row")
    assert proc.poll() is None, "the batch finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends: the whole process group
    assert proc.wait(timeout=30) == 130
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"]["interrupted"] and not summary["complete"]
    done = len(summary["rows"])
    assert 1 <= done < summary["total"]
    assert not (out / STAGING).exists()
    _assert_only_complete_outputs(out)
    result = CliRunner().invoke(app, ["batch", str(tree / "models"), "-o", str(out),
                                      "-s", str(tree / "samples"), "--resume", "-r", "lossless"])
    assert result.exit_code == 1, result.output
    passed_before = sum(r["status"] == "passed" for r in summary["rows"])
    assert passed_before >= 1 and f"({passed_before} resumed)" in result.output
    assert stable(out / "summary.json") == stable(reference.summary_json)


def _big_model(path: Path) -> Path:
    """Two 2048x2048 MatMuls (32 MiB of weights): compressing takes seconds, not milliseconds."""
    rng = np.random.default_rng(0)
    x = gs.Variable("x", np.float32, [1, 2048])
    h = gs.Variable("h", np.float32)
    y = gs.Variable("y", np.float32, [1, 2048])
    w1 = gs.Constant("w1", rng.standard_normal((2048, 2048)).astype(np.float32))
    w2 = gs.Constant("w2", rng.standard_normal((2048, 2048)).astype(np.float32))
    graph = gs.Graph(nodes=[gs.Node("MatMul", "mm1", inputs=[x, w1], outputs=[h]),
                            gs.Node("MatMul", "mm2", inputs=[h, w2], outputs=[y])],
                     inputs=[x], outputs=[y], opset=17)
    model = gs.export_onnx(graph)
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def test_a_model_past_its_timeout_is_one_failed_row(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    _big_model(models / "big.onnx")
    shutil.copy(SAMPLES / "mlp.onnx", models / "mlp.onnx")
    manifest = tmp_path / "batch.toml"
    manifest.write_text('schema = 1\n[[model]]\npath = "models"\n'
                        '[[model]]\npath = "models/big.onnx"\ntimeout = 1\n')
    out = tmp_path / "out"
    start = time.monotonic()
    result = CliRunner().invoke(app, ["batch", "--manifest", str(manifest), "-o", str(out),
                                      "--timeout", "120", "-j", "2"])
    assert result.exit_code == 1, result.output
    assert time.monotonic() - start < 60
    rows = {r["input"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert rows["big.onnx"]["status"] == "failed"
    assert rows["big.onnx"]["error_kind"] == "timeout"
    assert "timed out after 1s" in rows["big.onnx"]["error"]
    assert rows["mlp.onnx"]["status"] == "passed"
    assert not (out / "big.onnx").exists() and not (out / STAGING).exists()


def test_crash_and_memory_error_in_a_worker_are_rows_not_the_end(
    tree: Path, tmp_path: Path
) -> None:
    opts = BatchOptions(outdir=tmp_path / "out", inputs=(str(tree / "models"),),
                        samples_dir=tree / "samples", jobs=2)
    result = run_batch(opts, job_fn=_jobfn("crash_or_oom"))
    rows = {r.input: r for r in result.rows}
    assert rows[LAYOUT["mlp"]].error_kind == "crash"
    assert "SIGSEGV" in rows[LAYOUT["mlp"]].error
    assert rows[LAYOUT["cnn"]].error_kind == "memory"
    assert "MemoryError" in rows[LAYOUT["cnn"]].error
    for name in ("transformer", "control_flow", "fp16"):
        assert rows[LAYOUT[name]].status == "passed"
    assert result.exit_code == 1


def test_an_injected_hang_is_killed_at_the_timeout(tree: Path, tmp_path: Path) -> None:
    inputs = (str(tree / "models" / "fp16.onnx"), str(tree / "models" / LAYOUT["mlp"]))
    opts = BatchOptions(outdir=tmp_path / "out", inputs=inputs, jobs=2, timeout=2)
    result = run_batch(opts, job_fn=_jobfn("hang_on_fp16"))
    rows = {r.input: r for r in result.rows}
    assert rows["fp16.onnx"].error_kind == "timeout"
    assert rows[LAYOUT["mlp"]].status == "passed"


def _jobfn(name: str):  # type: ignore[no-untyped-def]
    from tests.batch import jobfns

    return getattr(jobfns, name)


def test_resume_reruns_only_what_changed_and_drops_stale_outputs(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    for name in ("mlp", "fp16", "cnn"):
        shutil.copy(SAMPLES / f"{name}.onnx", models / f"{name}.onnx")
    out = tmp_path / "out"
    opts = BatchOptions(outdir=out, inputs=(str(models),), samples_dir=SAMPLES, jobs=2)
    first = run_batch(opts)
    assert first.counts["passed"] == 3
    stamps = {p: p.stat().st_mtime_ns for p in _outputs(out)}

    again = run_batch(BatchOptions(**{**opts.__dict__, "resume": True}))
    assert again.resumed == 3
    assert {p: p.stat().st_mtime_ns for p in _outputs(out)} == stamps

    model = onnx.load(str(models / "mlp.onnx"))
    model.doc_string = "edited"
    onnx.save(model, str(models / "mlp.onnx"))
    (out / "fp16.onnx").write_bytes(b"half-written")
    (models / "cnn.onnx").write_bytes(b"no longer a model")
    third = run_batch(BatchOptions(**{**opts.__dict__, "resume": True}))
    rows = {r.input: r for r in third.rows}
    assert third.resumed == 0
    assert rows["mlp.onnx"].status == rows["fp16.onnx"].status == "passed"
    assert onnx.load(str(out / "mlp.onnx")).doc_string == "edited"
    assert rows["cnn.onnx"].status == "failed"
    assert not (out / "cnn.onnx").exists()  # the earlier run's output is stale: gone
    assert not (out / "cnn.report.json").exists()


def test_bad_inputs_fail_before_any_model_runs(tmp_path: Path) -> None:
    runner = CliRunner()
    bad_recipe = tmp_path / "bad.toml"
    bad_recipe.write_text('[[step]]\npass = "graph.clenup"\n')
    res = runner.invoke(app, ["batch", str(SAMPLES), "-o", str(tmp_path / "o"), "-r",
                              str(bad_recipe)])
    assert res.exit_code == 5 and "did you mean 'graph.cleanup'" in res.output
    assert not (tmp_path / "o").exists()
    res = runner.invoke(app, ["batch", str(tmp_path / "missing"), "-o", str(tmp_path / "o")])
    assert res.exit_code == 4 and "no such file or folder" in res.output
    res = runner.invoke(app, ["batch", str(SAMPLES), "-o", str(tmp_path / "o"), "-j", "0"])
    assert res.exit_code == 1 and "--jobs must be at least 1" in res.output
    res = runner.invoke(app, ["batch", str(SAMPLES), "-o", str(tmp_path / "o"), "-s",
                              str(tmp_path / "no-samples")])
    assert res.exit_code == 6 and "samples not found" in res.output
    res = runner.invoke(app, ["batch", str(SAMPLES)])
    assert res.exit_code == 2
    assert not (tmp_path / "o").exists()


def test_external_data_goes_beside_each_output(tmp_path: Path) -> None:
    models = tmp_path / "models" / "sub"
    models.mkdir(parents=True)
    model = onnx.load(str(SAMPLES / "mlp.onnx"))
    onnx.save_model(model, str(models / "mlp.onnx"), save_as_external_data=True,
                    location="mlp.weights", size_threshold=1024)
    out = tmp_path / "out"
    opts = BatchOptions(outdir=out, inputs=(str(tmp_path / "models"),), samples_dir=SAMPLES,
                        html=True)
    first = run_batch(opts)
    assert first.rows[0].status == "passed", first.rows[0].error
    assert first.rows[0].input == "sub/mlp.onnx"
    assert {"sub/mlp.onnx", "sub/mlp.onnx.data"} <= set(output_bytes(out))
    from onnxshrink import runtime

    runtime.session(out / "sub" / "mlp.onnx")  # the output's data file resolves beside it
    assert "fc1" in (out / "sub" / "mlp.html").read_text()
    # Editing only the external weights invalidates the finished result.
    data = bytearray((models / "mlp.weights").read_bytes())
    data[100] ^= 0xFF
    (models / "mlp.weights").write_bytes(bytes(data))
    second = run_batch(BatchOptions(**{**opts.__dict__, "resume": True}))
    assert second.resumed == 0
    assert second.rows[0].input_sha256 != first.rows[0].input_sha256
