"""Run original and candidate in onnxruntime on the same feeds and judge the difference."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxshrink import runtime
from onnxshrink.errors import ModelError, OnnxShrinkError, SampleError
from onnxshrink.recipe.schema import Tolerance
from onnxshrink.validate.compare import OutputMetrics, compare_output, flatten_outputs, judge
from onnxshrink.validate.feeds import Feeds

logger = logging.getLogger(__name__)


@dataclass
class NumericReport:
    """Per-output metrics of candidate vs reference, and the overall verdict."""

    reference: str
    samples: int
    feeds_source: str
    tolerance: dict[str, float]
    ort_opt: str
    ort_version: str = field(default_factory=runtime.version)
    outputs: list[OutputMetrics] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether every output held the tolerance."""
        return all(o.ok for o in self.outputs)


def run_model(
    path: Path, feeds: Feeds, *, opt: runtime.OptLevel = "all", role: str = "original"
) -> tuple[list[str], list[list[Any]]]:
    """Outputs of one model on every sample; errors name the model's role and the sample."""
    try:
        sess = runtime.session(path, opt=opt)
    except Exception as e:
        msg = " ".join(str(e).split())[:300]
        if role == "original":
            raise ModelError(f"{path}: onnxruntime cannot load the model: {msg}") from None
        raise OnnxShrinkError(f"{path}: onnxruntime cannot load the {role} model: {msg}") from None
    names = runtime.output_names(sess)
    results = []
    for i, sample in enumerate(feeds.samples):
        try:
            results.append(runtime.run(sess, sample))
        except Exception as e:
            msg = " ".join(str(e).split())[:300]
            error = SampleError if role == "original" else OnnxShrinkError
            raise error(f"{path}: onnxruntime failed on sample {i} ({feeds.source}): {msg}") from None
    return names, results


def compare_runs(
    names: list[str],
    refs: list[list[Any]],
    cands: list[list[Any]],
    tolerance: Tolerance,
) -> list[OutputMetrics]:
    """Judge candidate outputs against reference outputs, output by output."""
    per_name_ref: dict[str, list[np.ndarray]] = {}
    per_name_cand: dict[str, list[np.ndarray]] = {}
    order: list[str] = []
    for ref_values, cand_values in zip(refs, cands):
        ref_flat = flatten_outputs(names, ref_values)
        cand_flat = dict(flatten_outputs(names, cand_values))
        for name, value in ref_flat:
            if name not in per_name_ref:
                order.append(name)
            per_name_ref.setdefault(name, []).append(value)
            per_name_cand.setdefault(name, []).append(cand_flat.get(name))
    metrics = []
    for name in order:
        cand_list = per_name_cand[name]
        if any(c is None for c in cand_list):
            m = OutputMetrics(name, "missing", [])
            m.failures.append("output missing from the candidate")
            metrics.append(m)
            continue
        metrics.append(judge(compare_output(name, per_name_ref[name], cand_list), tolerance))
    return metrics


def validate_paths(
    original: Path,
    candidate: Path,
    feeds: Feeds,
    tolerance: Tolerance,
    *,
    opt: runtime.OptLevel = "all",
    reference_outputs: list[list[Any]] | None = None,
) -> NumericReport:
    """Compare `candidate` with `original` (or with shipped reference outputs when given)."""
    if reference_outputs is None:
        names, refs = run_model(original, feeds, opt=opt, role="original")
        reference = str(original)
    else:
        names = _candidate_names(candidate)
        refs, reference = reference_outputs, f"{feeds.source} (reference outputs)"
    cand_names, cands = run_model(candidate, feeds, opt=opt, role="compressed")
    if cand_names != names:
        raise OnnxShrinkError(f"{candidate}: outputs {cand_names} differ from original {names}")
    report = NumericReport(
        reference=reference,
        samples=len(feeds.samples),
        feeds_source=feeds.source,
        tolerance=tolerance.to_dict(),
        ort_opt=opt,
    )
    report.outputs = compare_runs(names, refs, cands, tolerance)
    return report


def _candidate_names(path: Path) -> list[str]:
    sess = runtime.session(path, opt="none")
    return runtime.output_names(sess)
