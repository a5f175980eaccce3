"""``onnxshrink batch``: many models, each in its own process, one summary.

Modules, one job each: `discover` (inputs -> models with mirrored names), `manifest` (per-model
recipes, samples, tolerances), `jobs` (the picklable plan), `worker` (the per-model job),
`local` and `cluster` (where jobs run), `summary` (the streamed summary files), `runner` (the
driver) and `display` (the terminal view). Dask is imported only by `cluster`, on demand.
"""

from onnxshrink.batch.row import Row
from onnxshrink.batch.runner import BatchInterrupted, BatchOptions, BatchResult, run_batch

__all__ = ["BatchInterrupted", "BatchOptions", "BatchResult", "Row", "run_batch"]
