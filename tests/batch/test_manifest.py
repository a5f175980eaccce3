"""--manifest: strict validation with clear errors, and per-model settings reaching the jobs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from onnxshrink.batch import BatchOptions
from onnxshrink.batch.runner import plan_jobs
from onnxshrink.errors import RuleError
from tests.conftest import SAMPLES


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "models" / "sub").mkdir(parents=True)
    shutil.copy(SAMPLES / "cnn.onnx", tmp_path / "models" / "cnn.onnx")
    shutil.copy(SAMPLES / "mlp.onnx", tmp_path / "models" / "sub" / "mlp.onnx")
    (tmp_path / "data").mkdir()
    shutil.copy(SAMPLES / "mlp.npz", tmp_path / "data" / "mlp.npz")
    (tmp_path / "strict.toml").write_text(
        '[[step]]\npass = "graph.cleanup"\n[validate]\ntolerance = { max_abs = 0.5 }\n')
    return tmp_path


def _plan(folder: Path, text: str, **kw: object):  # type: ignore[no-untyped-def]
    path = folder / "batch.toml"
    path.write_text(text)
    return plan_jobs(BatchOptions(outdir=folder / "out", manifest=path, **kw))  # type: ignore[arg-type]


def test_settings_merge_defaults_then_entries_and_last_entry_wins(folder: Path) -> None:
    jobs = _plan(folder, """
schema = 1
[defaults]
seed = 3
timeout = 30
tolerance = { min_cosine = 0.99 }

[[model]]
path = "models"

[[model]]
path = "models/sub/*.onnx"
recipe = "strict.toml"
samples = "data"
dims = { batch = 2 }
timeout = 5
""")
    by_rel = {j.rel: j for j in jobs}
    assert list(by_rel) == ["cnn.onnx", "sub/mlp.onnx"]
    cnn, mlp = by_rel["cnn.onnx"], by_rel["sub/mlp.onnx"]
    assert (cnn.seed, cnn.timeout, cnn.samples, cnn.recipe_name) == (3, 30.0, None, "default")
    assert cnn.recipe.validate.tolerance.min_cosine == 0.99
    assert cnn.recipe.validate.tolerance.max_rel_l2 is None  # replaced, not merged
    assert (mlp.timeout, mlp.dims, mlp.recipe_name) == (5.0, {"batch": 2}, "strict")
    assert mlp.samples == str(folder / "data" / "mlp.npz")
    assert mlp.recipe.validate.tolerance.min_cosine == 0.99
    assert cnn.fingerprint != mlp.fingerprint


def test_cli_defaults_apply_under_the_manifest(folder: Path) -> None:
    text = '[[model]]\npath = "models/cnn.onnx"\n'
    jobs = _plan(folder, text, recipe=str(folder / "strict.toml"), timeout=7.0, seed=1)
    assert (jobs[0].recipe_name, jobs[0].timeout, jobs[0].seed) == ("strict", 7.0, 1)


@pytest.mark.parametrize(("text", "message"), [
    ('[[model]]\npath = "models"\nrecipee = "x"\n', "model 1: unknown key 'recipee' "
     "(did you mean 'recipe'?)"),
    ('[defaults]\nseed = "1"\n[[model]]\npath = "models"\n', "[defaults] seed must be int"),
    ('[[model]]\npath = "models"\ntimeout = -1\n', "timeout must be > 0"),
    ('[[model]]\npath = "models"\ntolerance = { min_cosin = 0.9 }\n', "did you mean 'min_cosine'"),
    ('[[model]]\npath = "models"\n[[model]]\npath = "nothing/*.onnx"\n',
     "model 2: path 'nothing/*.onnx' matched no .onnx files"),
    ('[[model]]\nrecipe = "default"\n', "model 1: missing 'path'"),
    ('schema = 2\n[[model]]\npath = "models"\n', "schema 2 is not supported"),
    ("[defaults]\nseed = 1\n", "at least one [[model]]"),
    ('[[model]]\npath = "models"\nsamples = "nowhere"\n', "samples: "),
    ('[[model]]\npath = "models"\nrecipe = "nope.toml"\n', "recipe file not found"),
    ('[[model]]\npath = "models"\ndims = { batch = 0 }\n', "dims.batch must be >= 1"),
    ("[[model]\n", "not valid TOML"),
])
def test_bad_manifests_name_file_table_and_key(folder: Path, text: str, message: str) -> None:
    with pytest.raises(RuleError) as info:
        _plan(folder, text)
    assert message in str(info.value)
    assert "batch.toml" in str(info.value) or "recipe file" in message


def test_manifest_and_inputs_are_exclusive(folder: Path) -> None:
    from onnxshrink.errors import OnnxShrinkError

    (folder / "batch.toml").write_text('[[model]]\npath = "models"\n')
    with pytest.raises(OnnxShrinkError, match="not both"):
        plan_jobs(BatchOptions(outdir=folder / "out", manifest=folder / "batch.toml",
                               inputs=(str(folder / "models"),)))
