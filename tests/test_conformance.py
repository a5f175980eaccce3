"""Conformance: every model in the onnx wheel's backend test data goes through `compress`.

Each model either comes out matching the reference outputs that ship beside it, or is refused
with one clear `OnnxShrinkError` line. onnxruntime itself does not always reproduce onnx's
reference outputs, so the original model is run too: the compressed model must be within onnx's
own tolerance of the reference, at least as close to it as the original, or equal to the
original within a tight tolerance. A crash, a numerics failure of the (exact) lossless recipe, a
refusal that blames our own code, or a silently different output fails the test.

`test_conformance_summary` prints the counts (matched / refused, refusals grouped by reason) and
stores them in pytest's cache under ``onnxshrink/conformance``.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

import onnxshrink
from onnxshrink import runtime
from onnxshrink.errors import ModelError, OnnxShrinkError
from onnxshrink.validate import feeds as feeds_mod

DATA = Path(onnx.__file__).resolve().parent / "backend" / "test" / "data"
SUITES = ("simple", "pytorch-converted", "pytorch-operator", "light")
#: onnx's runner defaults when a model has no data.json.
DEFAULT_RTOL, DEFAULT_ATOL = 1e-3, 1e-7
#: "Equal to the original": what float rounding in constant folding may change.
TIGHT_RTOL, TIGHT_ATOL = 1e-5, 1e-6
#: Refusals that are about the input model (onnxruntime cannot load or run it), not our bugs.
ACCEPTED_REFUSALS = (ModelError,)


@dataclass(frozen=True)
class Case:
    """One backend-test model: where it is and which tolerance onnx's runner uses for it."""

    suite: str
    name: str
    model: Path
    data: Path | None  # the folder holding test_data_set_* (None: light model, built at test time)
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL

    @property
    def id(self) -> str:
        """Readable test id, e.g. ``simple/test_sign_model``."""
        return f"{self.suite}/{self.name}"


@dataclass
class Outcome:
    """What happened to one model: matched, refused (with the error) or failed (with why)."""

    status: str  # "matched" | "matched-original" | "refused" | "failed"
    detail: str = ""
    error_type: str = ""


def _light_tolerance(name: str) -> tuple[float, float]:
    meta = DATA / "real" / f"test_{name}" / "data.json"
    if meta.is_file():
        spec = json.loads(meta.read_text())
        return float(spec.get("rtol", DEFAULT_RTOL)), float(spec.get("atol", DEFAULT_ATOL))
    return DEFAULT_RTOL, DEFAULT_ATOL


def discover() -> list[Case]:
    """Every model in the four suites, in a stable order."""
    cases = []
    for suite in SUITES:
        folder = DATA / suite
        if not folder.is_dir():
            continue
        if suite == "light":
            for model in sorted(folder.glob("light_*.onnx")):
                name = model.stem[len("light_"):]
                rtol, atol = _light_tolerance(name)
                cases.append(Case(suite, name, model, None, rtol, atol))
            continue
        for sub in sorted(p for p in folder.iterdir() if (p / "model.onnx").is_file()):
            cases.append(Case(suite, sub.name, sub / "model.onnx", sub))
    return cases


CASES = discover()
_OUTCOMES: dict[str, Outcome] = {}


def light_data(case: Case, workdir: Path) -> Path:
    """onnx's runner data for a light model: input ``arange(n).reshape(shape)/n`` (float32,
    dynamic dims 1) and the shipped ``light_<name>_output_N.pb`` as reference."""
    model = onnx.load_model(str(case.model), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    folder = workdir / "test_data_set_0"
    folder.mkdir(parents=True)
    real_inputs = [vi for vi in model.graph.input if vi.name not in inits]
    for i, vi in enumerate(real_inputs):
        dims = vi.type.tensor_type.shape.dim
        shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in dims)
        n = int(np.prod(shape))
        value = (np.arange(n).reshape(shape) / n).astype(np.float32)
        tensor = onnx.numpy_helper.from_array(value)
        (folder / f"input_{i}.pb").write_bytes(tensor.SerializeToString())
    for i in range(len(model.graph.output)):
        ref = case.model.with_name(f"{case.model.stem}_output_{i}.pb")
        shutil.copy(ref, folder / f"output_{i}.pb")
    return workdir


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def excess(out: Any, ref: Any, rtol: float, atol: float) -> float:
    """How far `out` is outside ``atol + rtol * |ref|`` (<= 0 means allclose); inf on a shape,
    dtype or NaN-pattern mismatch. Sequences take the worst element."""
    if isinstance(ref, (list, tuple)):
        outs = _as_list(out)
        if len(outs) != len(ref):
            return float("inf")
        return max((excess(o, r, rtol, atol) for o, r in zip(outs, ref)), default=0.0)
    out, ref = np.asarray(out), np.asarray(ref)
    if out.shape != ref.shape or out.dtype != ref.dtype:
        return float("inf")
    if ref.dtype.kind not in "fc":
        return 0.0 if np.array_equal(out, ref) else float("inf")
    if ref.size == 0:
        return 0.0
    o64, r64 = out.astype(np.float64), ref.astype(np.float64)
    nan_o, nan_r = np.isnan(o64), np.isnan(r64)
    if np.any(nan_o != nan_r):
        return float("inf")
    same = nan_r | (o64 == r64)  # covers equal infinities
    gap = np.where(same, 0.0, np.abs(o64 - r64) - (atol + rtol * np.abs(r64)))
    gap = np.where(np.isnan(gap), np.inf, gap)  # inf - inf: different infinities
    return float(gap.max())


def _run(path: Path, samples: list[dict[str, np.ndarray]]) -> list[list[Any]]:
    sess = runtime.session(path)
    return [runtime.run(sess, s) for s in samples]


def classify(case: Case, workdir: Path) -> Outcome:
    """Compress one model with the lossless recipe and judge it against the references."""
    data = case.data if case.data is not None else light_data(case, workdir / "data")
    out = workdir / "out.onnx"
    try:
        report = onnxshrink.compress(case.model, "lossless", out, samples=data)
    except OnnxShrinkError as e:
        text = str(e)
        if "\n" in text or "Traceback" in text:
            return Outcome("failed", f"refusal is not one line: {text!r}", type(e).__name__)
        if out.exists() or any(p.name.startswith(".") for p in workdir.iterdir()):
            return Outcome("failed", f"refused but left files behind: {sorted(workdir.iterdir())}")
        if not isinstance(e, ACCEPTED_REFUSALS):
            return Outcome("failed", f"refused by our own code: {type(e).__name__}: {text}")
        return Outcome("refused", text, type(e).__name__)
    except Exception as e:  # the point of the test: nothing else may escape
        return Outcome("failed", f"unexpected {type(e).__name__}: {e}")
    if not report.ok:
        assert report.numerics is not None
        bad = {o.name: o.failures for o in report.numerics.outputs if not o.ok}
        return Outcome("failed", f"the exact lossless recipe broke the tolerance: {bad}")
    if not out.is_file():
        return Outcome("failed", "compress reported success but wrote no output")
    return judge_against_reference(case, data, out)


def judge_against_reference(case: Case, data: Path, out: Path) -> Outcome:
    """Compressed vs reference, with the original under onnxruntime as the fallback bar."""
    proto = onnx.load_model(str(case.model), load_external_data=False)
    feeds = feeds_mod.load_dir(data, feeds_mod.input_specs(proto))
    assert feeds.references is not None, f"{data}: no reference outputs"
    originals = _run(case.model, feeds.samples)
    compressed = _run(out, feeds.samples)
    worst = "matched"
    for k, (refs, origs, comps) in enumerate(zip(feeds.references, originals, compressed)):
        if len(comps) != len(refs):
            return Outcome("failed", f"sample {k}: {len(comps)} outputs, reference has {len(refs)}")
        for i, (ref, orig, comp) in enumerate(zip(refs, origs, comps)):
            e_comp = excess(comp, ref, case.rtol, case.atol)
            if e_comp <= 0:
                continue
            e_orig = excess(orig, ref, case.rtol, case.atol)
            same_as_orig = excess(comp, orig, TIGHT_RTOL, TIGHT_ATOL) <= 0
            if e_orig > 0 and (e_comp <= e_orig or same_as_orig):
                worst = "matched-original"
                continue
            return Outcome(
                "failed",
                f"sample {k} output {i}: compressed is {e_comp:.3g} outside rtol={case.rtol} "
                f"atol={case.atol} of the reference (original: {e_orig:.3g})",
            )
    return Outcome(worst)


@pytest.fixture(scope="module")
def conformance_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One scratch folder for the module (one sub-folder per model)."""
    return tmp_path_factory.mktemp("conformance")


def outcome(case: Case, root: Path) -> Outcome:
    """Classify once per session (the summary reuses what the per-model tests computed)."""
    if case.id not in _OUTCOMES:
        workdir = root / re.sub(r"[^A-Za-z0-9_.-]", "_", case.id)
        workdir.mkdir()
        _OUTCOMES[case.id] = classify(case, workdir)
    return _OUTCOMES[case.id]


def test_backend_data_is_present() -> None:
    """Guard: an onnx wheel without test data would make every other test vacuous."""
    suites = Counter(c.suite for c in CASES)
    assert all(suites[s] > 0 for s in SUITES), f"backend test data missing under {DATA}: {suites}"


@pytest.mark.ort
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_conformance(case: Case, conformance_dir: Path) -> None:
    """The model matches its references or is refused with one clear line, nothing else."""
    result = outcome(case, conformance_dir)
    assert result.status != "failed", result.detail


def refusal_reason(message: str) -> str:
    """Group refusals: the message without the model path and node-specific details."""
    text = message.split(": ", 1)[-1]
    m = re.search(r"Could not find an implementation for (\w+)\((\d+)\)", text)
    if m:
        return f"onnxruntime has no kernel for {m.group(1)} at opset {m.group(2)}"
    m = re.search(r"Fatal error: ([\w.]+):(\w+)\(", text)
    if m:
        return f"onnxruntime does not implement {m.group(1)}:{m.group(2)}"
    if "locale" in text:
        return "onnxruntime cannot construct the locale StringNormalizer needs"
    return text[:120]


@pytest.mark.ort
def test_conformance_summary(conformance_dir: Path, request: pytest.FixtureRequest) -> None:
    """Counts for the closing note: matched, matched-as-original, refused grouped by reason."""
    results = {c.id: outcome(c, conformance_dir) for c in CASES}
    status = Counter(r.status for r in results.values())
    reasons = Counter(
        f"{r.error_type}: {refusal_reason(r.detail)}"
        for r in results.values()
        if r.status == "refused"
    )
    summary = {
        "total": len(results),
        "by_status": dict(status),
        "refusals": dict(reasons.most_common()),
        "failed": {k: r.detail for k, r in results.items() if r.status == "failed"},
    }
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    if cache is not None:
        cache.set("onnxshrink/conformance", summary)
    lines = [
        f"conformance: {len(results)} models: {status['matched']} matched the reference, "
        f"{status['matched-original']} matched the original where onnxruntime differs from the "
        f"reference, {status['refused']} refused, {status['failed']} failed",
        *(f"  refused {n:3d} x {reason}" for reason, n in reasons.most_common()),
    ]
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print("\n" + "\n".join(lines))
    assert status["failed"] == 0, summary["failed"]
    assert status["matched"] + status["matched-original"] > len(results) // 2
