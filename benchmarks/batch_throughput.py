"""Batch throughput: models per minute at --jobs 1 and 2, and the overhead per model versus a
direct `onnxshrink.compress` call, measured in one run on the same 50 small models.

    python benchmarks/batch_throughput.py [--models 50] [--rules lossless] [--workdir DIR]

The models are copies of the five sample models (each copy with its own doc_string, so every
file is distinct), in a nested tree, with per-model samples found by name. The batch is timed
end to end through the CLI (a fresh `onnxshrink batch` process, as a user runs it); the direct
API loop runs in this (already warm) process. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx

from onnxshrink import compress

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
NAMES = ("cnn", "mlp", "transformer", "control_flow", "fp16")
CLI = [sys.executable, "-c", "from onnxshrink.cli import app; app()"]


def make_models(root: Path, count: int) -> tuple[Path, Path]:
    """`count` distinct models under root/models/<name>/vNN/<name>.onnx, samples in root/samples."""
    models, samples = root / "models", root / "samples"
    samples.mkdir(parents=True)
    for name in NAMES:
        shutil.copy(SAMPLES / f"{name}.npz", samples / f"{name}.npz")
    for i in range(count):
        name = NAMES[i % len(NAMES)]
        model = onnx.load(str(SAMPLES / f"{name}.onnx"))
        model.doc_string = f"{model.doc_string} (benchmark copy {i})"
        dest = models / name / f"v{i // len(NAMES):02d}" / f"{name}.onnx"
        dest.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(dest))
    return models, samples


def time_api(models: Path, samples: Path, out: Path, rules: str) -> float:
    """Seconds to compress every model with direct API calls in this process (after a warm-up)."""
    files = sorted(models.rglob("*.onnx"))
    compress(files[0], rules, out / "warmup.onnx", samples=samples / f"{files[0].stem}.npz")
    start = time.perf_counter()
    for i, f in enumerate(files):
        report = compress(f, rules, out / f"{i}.onnx", samples=samples / f"{f.stem}.npz")
        assert report.ok, f
    return time.perf_counter() - start


def time_cli(args: list[str]) -> float:
    """Wall seconds of one CLI run (it must succeed)."""
    start = time.perf_counter()
    subprocess.run([*CLI, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def time_batch(models: Path, samples: Path, out: Path, rules: str, jobs: int) -> float:
    """Seconds for `onnxshrink batch` over every model; checks that all of them passed."""
    seconds = time_cli(["batch", str(models), "-o", str(out), "-s", str(samples), "-r", rules,
                        "--jobs", str(jobs)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["passed"] == summary["total"], summary["counts"]
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--rules", default="lossless")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds (interleaved); the best time of each setting is reported")
    args = parser.parse_args()
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        models, samples = make_models(root, args.models)
        for r in range(args.repeat):
            (root / f"api{r}").mkdir()
            timings = {
                "api": time_api(models, samples, root / f"api{r}", args.rules),
                "startup": time_cli(["--version"]),
                **{f"jobs{j}": time_batch(models, samples, root / f"jobs{j}-{r}", args.rules, j)
                   for j in (1, 2)},
            }
            best = {k: min(v, best.get(k, v)) for k, v in timings.items()}
    api_s, startup_s = best["api"], best["startup"]
    runs = {1: best["jobs1"], 2: best["jobs2"]}
    n = args.models
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(f"{n} models (copies of the 5 sample models), recipe {args.rules!r}, "
          f"best of {args.repeat} interleaved rounds, CLI start-up {startup_s:.2f}s, "
          f"{os.cpu_count()} CPUs, load average after the run {load}\n")
    print("| run | wall s | models/min | s/model | vs direct API |")
    print("|---|---:|---:|---:|---:|")
    print(f"| direct API calls, one warm process | {api_s:.2f} | {60 * n / api_s:.0f} | "
          f"{api_s / n:.3f} | 1.00x |")
    for jobs, secs in runs.items():
        print(f"| `onnxshrink batch --jobs {jobs}` | {secs:.2f} | {60 * n / secs:.0f} | "
              f"{secs / n:.3f} | {secs / api_s:.2f}x |")
    per_model = (runs[1] - startup_s - api_s) / n
    print(f"\nOverhead per model at --jobs 1 (batch minus CLI start-up minus direct API, / {n}): "
          f"{1000 * per_model:.0f} ms; --jobs 2 speed-up over --jobs 1: {runs[1] / runs[2]:.2f}x")


if __name__ == "__main__":
    main()
