"""Plan a batch: every model becomes a self-contained, picklable `Job` before anything runs.

All recipes are loaded and planned here, in the driver, so a bad recipe or manifest fails before
the first model loads. A job carries its recipe *object* (not a path), so a worker on another
host needs the model and output folders but not the recipe files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from onnxshrink import pipeline
from onnxshrink._version import __version__
from onnxshrink.api import DEFAULT_RECIPE
from onnxshrink.batch import hashing
from onnxshrink.batch.discover import Found
from onnxshrink.batch.manifest import Settings
from onnxshrink.errors import RuleError
from onnxshrink.recipe.loader import load_recipe
from onnxshrink.recipe.schema import Recipe, Tolerance

#: Hidden folder under OUTDIR where workers build their outputs before the atomic move.
STAGING = ".onnxshrink-staging"


@dataclass(frozen=True)
class Job:
    """Everything one worker needs to compress one model, and where its results go."""

    index: int
    source: str
    rel: str
    outdir: str
    recipe: Recipe
    recipe_name: str
    samples: str | None = None
    seed: int = 0
    dims: dict[str, int] = field(default_factory=dict)
    validate: bool = True
    html: bool = False
    timeout: float | None = None
    fingerprint: str = ""
    run_id: str = ""  # the driver's id: a worker of an earlier, killed run never shares staging

    def _under(self, rel: PurePosixPath) -> Path:
        return Path(self.outdir, *rel.parts)

    @property
    def output(self) -> Path:
        """The compressed model's final path (its external data goes beside it)."""
        return self._under(PurePosixPath(self.rel))

    @property
    def report(self) -> Path:
        """The JSON run report, beside the output."""
        rel = PurePosixPath(self.rel)
        return self._under(rel.with_name(rel.stem + ".report.json"))

    @property
    def html_path(self) -> Path:
        """The HTML report, beside the output."""
        rel = PurePosixPath(self.rel)
        return self._under(rel.with_name(rel.stem + ".html"))

    @property
    def staging(self) -> Path:
        """This job's scratch folder (on the output's filesystem, so moves are atomic)."""
        return Path(self.outdir, STAGING, f"{self.run_id}-{self.index:06d}")

    def rel_to_outdir(self, path: Path) -> str:
        """A path under OUTDIR as the POSIX string the summary records."""
        return path.relative_to(self.outdir).as_posix()

    def job_sha256(self, input_sha256: str) -> str:
        """Identity of this job's result: the settings plus the exact input bytes."""
        return hashing.json_sha256({"settings": self.fingerprint, "input": input_sha256})


@dataclass(frozen=True)
class Defaults:
    """What the command line sets for every model (a manifest may override per model)."""

    recipe: str | None = None
    samples_dir: Path | None = None
    seed: int = 0
    timeout: float | None = None
    validate: bool = True
    html: bool = False


def find_samples(source: Path, rel: PurePosixPath, where: Path) -> Path | None:
    """Samples for one model: `where` itself if it is a sample set, else looked up by name.

    Lookup order under a folder: the mirrored name (``DIR/sub/model.npz``, ``DIR/sub/model/``),
    then the stem alone (``DIR/model.npz``, ``DIR/model/``); a folder counts only if it holds
    ``test_data_set_*`` folders. None means "use the recipe's default".
    """
    if where.is_file() or _is_test_data(where):
        return where
    stem = PurePosixPath(rel.with_suffix(""))
    for base in (Path(where, *stem.parts), where / source.stem):
        if base.with_name(base.name + ".npz").is_file():
            return base.with_name(base.name + ".npz")
        if _is_test_data(base):
            return base
    return None


def _is_test_data(path: Path) -> bool:
    return path.is_dir() and any(p.is_dir() for p in path.glob("test_data_set_*"))


class _RecipeCache:
    """Load, plan and fingerprint each distinct recipe once per batch."""

    def __init__(self) -> None:
        self._recipes: dict[tuple[str, str], Recipe] = {}

    def get(self, spec: str, tolerance: Tolerance | None) -> Recipe:
        key = (spec, repr(tolerance))
        if key not in self._recipes:
            recipe = load_recipe(spec)
            if tolerance is not None:
                spec_v = dataclasses.replace(recipe.validate, tolerance=tolerance)
                recipe = dataclasses.replace(recipe, validate=spec_v)
            pipeline.plan(recipe)  # every recipe fails here, before any model loads
            self._recipes[key] = recipe
        return self._recipes[key]


def build_jobs(
    models: Sequence[tuple[Found, Settings]], outdir: Path, defaults: Defaults, run_id: str = ""
) -> list[Job]:
    """One job per model, in the given (canonical) order."""
    recipes = _RecipeCache()
    sample_hashes: dict[Path, str] = {}
    jobs = []
    for index, (found, settings) in enumerate(models):
        spec = settings.recipe or defaults.recipe or DEFAULT_RECIPE
        recipe = recipes.get(spec, settings.tolerance)
        where = settings.samples or defaults.samples_dir
        samples = find_samples(found.path, found.rel, where) if where is not None else None
        if samples is not None and samples not in sample_hashes:
            sample_hashes[samples] = hashing.tree_sha256(samples)
        seed = settings.seed if settings.seed is not None else defaults.seed
        dims = dict(settings.dims or {})
        fingerprint = hashing.json_sha256(
            {
                "tool": __version__,
                "recipe": _recipe_identity(recipe),
                "samples": sample_hashes.get(samples) if samples else None,
                "seed": seed,
                "dims": dims,
                "validate": defaults.validate,
            }
        )
        jobs.append(
            Job(
                index=index,
                source=str(found.path),
                rel=str(found.rel),
                outdir=str(outdir.absolute()),
                recipe=recipe,
                recipe_name=recipe.name,
                samples=str(samples) if samples is not None else None,
                seed=seed,
                dims=dims,
                validate=defaults.validate,
                html=defaults.html,
                timeout=settings.timeout if settings.timeout is not None else defaults.timeout,
                fingerprint=fingerprint,
                run_id=run_id,
            )
        )
    _check_collisions(jobs)
    return jobs


def _recipe_identity(recipe: Recipe) -> object:
    """The recipe's content without where it was read from (moving a file changes nothing)."""
    return dataclasses.asdict(dataclasses.replace(recipe, source=""))


def _check_collisions(jobs: Sequence[Job]) -> None:
    """Two models whose reports would land on the same file (``a.onnx`` beside ``a.ONNX``)."""
    seen: dict[Path, str] = {}
    for job in jobs:
        for path in (job.report, job.html_path):
            if path in seen and seen[path] != job.rel:
                raise RuleError(f"{seen[path]} and {job.rel} would share the report {path}")
            seen[path] = job.rel
