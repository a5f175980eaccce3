"""The CLI as users meet it: exit codes, key output lines, the JSON report schema."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from typer.testing import CliRunner

from onnxshrink import __version__
from onnxshrink.cli import app
from tests.conftest import SAMPLES

runner = CliRunner()


def _invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_version() -> None:
    result = _invoke("--version")
    assert result.exit_code == 0 and __version__ in result.stdout


def test_compress_prints_summary_and_writes_report(tmp_path: Path) -> None:
    out, rep = tmp_path / "cnn.small.onnx", tmp_path / "report.json"
    result = _invoke("compress", SAMPLES / "cnn.onnx", "-o", out, "--report", rep,
                     "--samples", SAMPLES / "cnn.npz")
    assert result.exit_code == 0, result.stdout
    for needle in ("gzip -9", "1:graph.cleanup", "within tolerance", "logits"):
        assert needle in result.stdout
    assert out.is_file()
    data = json.loads(rep.read_text())
    assert data["schema_version"] == 1 and data["ok"] is True
    assert data["after"]["file_bytes"] == out.stat().st_size
    assert data["steps"][0]["pass_name"] == "graph.cleanup"
    assert data["steps"][0]["touched"]  # BN folding happened
    assert data["numerics"]["outputs"][0]["name"] == "logits"
    assert data["numerics"]["samples"] == 8


def test_tolerance_miss_exits_3_and_writes_nothing(tmp_path: Path) -> None:
    recipe = tmp_path / "strict.toml"
    recipe.write_text('[[step]]\npass = "graph.cleanup"\n[validate]\n'
                      "tolerance = { max_abs = 0.0 }\n")
    out = tmp_path / "out.onnx"
    result = _invoke("compress", SAMPLES / "cnn.onnx", "-r", recipe, "-o", out)
    assert result.exit_code == 3
    assert "outside the recipe's tolerance" in result.stderr
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [recipe]
    kept = _invoke("compress", SAMPLES / "cnn.onnx", "-r", recipe, "-o", out, "--keep-failed")
    assert kept.exit_code == 3 and out.is_file()


def test_validate_detects_a_changed_weight(tmp_path: Path) -> None:
    model = onnx.load(str(SAMPLES / "mlp.onnx"))
    same = tmp_path / "same.onnx"
    onnx.save(model, str(same))
    init = model.graph.initializer[0]
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1.1), init.name))
    changed = tmp_path / "changed.onnx"
    onnx.save(model, str(changed))
    # the lossless recipe's tolerance (the default's cosine >= 0.99 accepts a 10% weight change)
    assert _invoke("validate", SAMPLES / "mlp.onnx", same, "-r", "lossless").exit_code == 0
    result = _invoke("validate", SAMPLES / "mlp.onnx", changed, "-r", "lossless", "--json")
    assert result.exit_code == 3
    body = json.loads(result.stdout)
    assert body["ok"] is False and body["outputs"][0]["failures"]


def test_inspect_json() -> None:
    result = _invoke("inspect", SAMPLES / "transformer.onnx", "--json")
    assert result.exit_code == 0
    body = json.loads(result.stdout)
    assert body["opsets"] == {"": 20}
    assert body["inputs"] == ["input_ids int64[batch,seq]"]
    assert body["by_op_type"]["MatMul"]["count"] >= 6
    assert body["largest"][0]["bytes"] >= body["largest"][-1]["bytes"]


def test_passes_and_rules_commands(tmp_path: Path) -> None:
    listing = _invoke("passes")
    assert listing.exit_code == 0 and "graph.cleanup" in listing.stdout
    detail = _invoke("passes", "graph.cleanup")
    assert "max_growth_bytes" in detail.stdout
    assert _invoke("passes", "nope.nope").exit_code == 5
    assert _invoke("rules", "check", "default").exit_code == 0
    bad = tmp_path / "bad.toml"
    bad.write_text('[[step]]\npass = "graph.cleanup"\nparams = { fold = 1 }\n')
    result = _invoke("rules", "check", bad)
    assert result.exit_code == 5 and "unknown key 'fold'" in result.stderr
    assert "default" in _invoke("rules", "list").stdout


def test_check_each_step_and_dims(tmp_path: Path) -> None:
    out = tmp_path / "t.onnx"
    result = _invoke("compress", SAMPLES / "transformer.onnx", "-o", out, "--check-each-step",
                     "--dim", "seq=12", "--json")
    assert result.exit_code == 0, result.stdout
    assert json.loads(result.stdout)["numerics"]["samples"] == 8  # the default recipe's count


def test_bad_dim_is_a_usage_error() -> None:
    result = runner.invoke(app, ["compress", str(SAMPLES / "cnn.onnx"), "--dim", "seq"])
    assert result.exit_code == 2


def test_weight_only_validation_uses_the_pass_session_config(tmp_path: Path) -> None:
    rep = tmp_path / "r.json"
    result = _invoke("compress", SAMPLES / "mlp.onnx", "-r", "int4-weights", "-o",
                     tmp_path / "m.onnx", "--report", rep, "--samples", SAMPLES / "mlp.npz")
    assert result.exit_code == 0, result.stdout
    data = json.loads(rep.read_text())
    step = next(s for s in data["steps"] if s["pass_name"] == "quant.weight_only")
    assert data["numerics"]["session_config"] == step["stats"]["session_config"]
    assert any("accuracy_level" in k for k in data["numerics"]["session_config"])
    assert "validated with session options" in result.stdout
