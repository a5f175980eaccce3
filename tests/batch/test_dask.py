"""The same batch on a Dask cluster (two worker processes on loopback) matches the local run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from onnxshrink.batch import BatchOptions, run_batch
from onnxshrink.batch.jobs import STAGING
from tests.batch.conftest import stable
from tests.batch.trees import LAYOUT, output_bytes

distributed = pytest.importorskip("distributed", reason="needs dask[distributed] (the dask extra)")


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A LocalCluster bound to 127.0.0.1 with two single-threaded worker processes."""
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address=None, silence_logs=50,
    ) as local:
        yield local.scheduler_address


def _options(tree: Path, out: Path, **kw: object) -> BatchOptions:
    """Part of the shared tree (each Dask task starts an interpreter: ~2 s each on CI)."""
    models = tree / "models"
    inputs = (str(models / "vision"), str(models / LAYOUT["mlp"]), str(models / "fp16.onnx"),
              str(models / "broken" / "truncated.onnx"))
    return BatchOptions(outdir=out, inputs=inputs, samples_dir=tree / "samples", **kw)  # type: ignore[arg-type]


def test_dask_run_matches_local_run_byte_for_byte(cluster: str, tree: Path, tmp_path: Path) -> None:
    assert cluster.startswith("tcp://127.0.0.1:")
    local = run_batch(_options(tree, tmp_path / "local", jobs=2))
    remote = run_batch(_options(tree, tmp_path / "dask", scheduler=cluster))
    assert remote.exit_code == local.exit_code == 1
    assert remote.counts == local.counts == {"passed": 3, "missed": 0, "failed": 1}
    assert output_bytes(tmp_path / "dask") == output_bytes(tmp_path / "local")
    assert len(output_bytes(tmp_path / "dask")) == 3
    assert stable(remote.summary_json) == stable(local.summary_json)
    assert (tmp_path / "dask" / "summary.csv").read_text().count("\n") == 5
    assert not (tmp_path / "dask" / STAGING).exists()


def test_dask_timeout_is_one_failed_row(cluster: str, tree: Path, tmp_path: Path) -> None:
    from tests.batch.jobfns import hang_on_fp16

    opts = BatchOptions(outdir=tmp_path / "out", inputs=(str(tree / "models" / "fp16.onnx"),),
                        scheduler=cluster, timeout=3)
    result = run_batch(opts, job_fn=hang_on_fp16)
    assert [(r.status, r.error_kind) for r in result.rows] == [("failed", "timeout")]
    assert "timed out after 3s" in result.rows[0].error
