"""Run original and candidate in onnxruntime on the same feeds and judge the difference."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxshrink import runtime
from onnxshrink.errors import ModelError, OnnxShrinkError, SampleError
from onnxshrink.recipe.schema import Tolerance
from onnxshrink.validate.compare import OutputMetrics, compare_output, flatten_outputs, judge
from onnxshrink.validate.feeds import Feeds
from onnxshrink.validate.reference import Reference

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
    session_config: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether every output held the tolerance."""
        return all(o.ok for o in self.outputs)


def run_model(
    path: Path,
    feeds: Feeds,
    *,
    opt: runtime.OptLevel = "all",
    role: str = "original",
    config: dict[str, str] | None = None,
) -> tuple[list[str], list[list[Any]]]:
    """Outputs of one model on every sample; errors name the model's role and the sample.

    The arrays are copies: onnxruntime's wrap its arena's buffers, which the shared arena
    could then not give back while the caller holds them."""
    try:
        sess = runtime.session(path, opt=opt, config=config)
    except Exception as e:
        msg = ort_message(e)
        if role == "original":
            raise ModelError(f"{path}: onnxruntime cannot load the model: {msg}") from None
        raise OnnxShrinkError(f"{path}: onnxruntime cannot load the {role} model: {msg}") from None
    names = runtime.output_names(sess)
    results = []
    for i, sample in enumerate(feeds.samples):
        try:
            results.append([_owned(v) for v in runtime.run(sess, sample)])
        except Exception as e:
            msg = ort_message(e)
            error: type[OnnxShrinkError] = OnnxShrinkError
            if role == "original":  # inputs that fit the signature: then the model is at fault
                error = ModelError if feeds.generated else SampleError
            hint = f"; {feeds.hint}" if role == "original" and feeds.hint else ""
            raise error(
                f"{path}: onnxruntime failed on sample {i} ({feeds.source}): {msg}{hint}"
            ) from None
    return names, results


def _owned(value: Any) -> Any:
    return np.array(value) if isinstance(value, np.ndarray) else value


_ORT_PREFIX = re.compile(r"\[ONNXRuntimeError\] : \d+ : \w+ : |Load model from .*? failed: ?")


def ort_message(exc: BaseException, limit: int = 300) -> str:
    """onnxruntime's error as one readable line: no status prefix, no C++ source location or
    function signature (they name onnxruntime's build tree, not the user's problem)."""
    text = _ORT_PREFIX.sub("", " ".join(str(exc).split()))
    while (start := text.find("/onnxruntime_src/")) >= 0:
        end = _after_signature(text, text.find(" ", start) + 1 or len(text))
        text = text[:start] + text[end:]
    text = " ".join(text.split()).strip(" :")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _after_signature(text: str, pos: int) -> int:
    """Index after a C++ signature starting at `pos` (balanced parentheses, then any
    ``::<lambda()>`` or `` const``); `pos` itself when no signature follows."""
    open_at = text.find("(", pos)
    if open_at < 0 or " " in text[pos:open_at].strip().replace("void ", "", 1):
        return pos
    depth = 0
    for i in range(open_at, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            end = i + 1
            for tail in ("::<lambda()>", " const"):
                if text.startswith(tail, end):
                    end += len(tail)
            return end
    return pos


def compare_runs(
    names: list[str],
    refs: list[list[Any]],
    cands: list[list[Any]],
    tolerance: Tolerance,
    probabilities: frozenset[str] = frozenset(),
) -> list[OutputMetrics]:
    """Judge candidate outputs against reference outputs, output by output (`probabilities`:
    the outputs ``validate.bounded`` finds to be probabilities)."""
    per_name_ref: dict[str, list[np.ndarray]] = {}
    per_name_cand: dict[str, list[np.ndarray | None]] = {}
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
        present = [c for c in cand_list if c is not None]
        metrics.append(
            judge(
                compare_output(name, per_name_ref[name], present),
                tolerance,
                probability=name in probabilities,
            )
        )
    return metrics


def validate_paths(
    original: Path,
    candidate: Path,
    feeds: Feeds,
    tolerance: Tolerance,
    *,
    opt: runtime.OptLevel = "all",
    reference: Reference | None = None,
    config: dict[str, str] | None = None,
    probabilities: frozenset[str] = frozenset(),
) -> NumericReport:
    """Compare `candidate` with `original` on `feeds`.

    `reference` holds the original's outputs on these feeds when the run already has them
    (the guards computed them); it is computed otherwise. `config` holds session options the
    candidate needs to compute what it will compute when deployed (e.g. the MatMulNBits
    accuracy level a weight-only pass chose); it is reported. `probabilities`: the original's
    outputs that are probabilities (``validate.bounded.probability_outputs``).
    """
    names, refs = (reference or Reference(original, feeds, opt)).outputs()
    cand_names, cands = run_model(candidate, feeds, opt=opt, role="compressed", config=config)
    if cand_names != names:
        raise OnnxShrinkError(f"{candidate}: outputs {cand_names} differ from original {names}")
    report = NumericReport(
        reference=str(original),
        samples=len(feeds.samples),
        feeds_source=feeds.source,
        tolerance=tolerance.to_dict(),
        ort_opt=opt,
        session_config=dict(config or {}),
    )
    report.outputs = compare_runs(names, refs, cands, tolerance, probabilities)
    return report

