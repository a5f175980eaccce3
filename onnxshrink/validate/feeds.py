"""Sample inputs for validation and calibration: .npz, onnx test-data folders, or seeded random.

Every source is checked against the model's input signature up front, so a mismatch is one
clear `SampleError`, not an onnxruntime stack trace halfway through a run.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
import onnx
from onnx import numpy_helper

from onnxshrink.errors import SampleError

#: Size given to a dynamic dimension the recipe does not name: batch-like first axes get 1,
#: others 64 (enough for strided convolutions and short sequences).
DEFAULT_BATCH = 1
DEFAULT_DYNAMIC = 64
#: Vocabulary of random string inputs.
WORDS = np.array(["monday", "Tuesday", "the", "ONNX", "model", "shrink", "a", ""], dtype=object)


@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, numpy dtype, dims (int, dim_param string, or None)."""

    name: str
    dtype: np.dtype[Any]
    dims: tuple[int | str | None, ...] | None

    def describe(self) -> str:
        """Readable signature, e.g. ``x float32[batch,3,32,32]``."""
        if self.dims is None:
            return f"{self.name} {self.dtype}[?]"
        dims = ",".join("?" if d is None else str(d) for d in self.dims)
        return f"{self.name} {self.dtype}[{dims}]"


class LazySamples(Sequence[dict[str, np.ndarray]]):
    """Samples read from disk on each access instead of held in memory.

    24 detector inputs at 640x640 are 118 MB, more than the rest of a run holds at once; read
    again when used (a few milliseconds each), they cost one sample's memory. Slices load their
    samples (callers slice off one or a few)."""

    def __init__(self, load: Callable[[int], dict[str, np.ndarray]], count: int) -> None:
        self._load = load
        self._count = count

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> dict[str, np.ndarray]: ...

    @overload
    def __getitem__(self, index: slice) -> list[dict[str, np.ndarray]]: ...

    def __getitem__(
        self, index: int | slice
    ) -> dict[str, np.ndarray] | list[dict[str, np.ndarray]]:
        if isinstance(index, slice):
            return [self._load(i) for i in range(*index.indices(self._count))]
        if index < 0:
            index += self._count
        if not 0 <= index < self._count:
            raise IndexError(index)
        return self._load(index)


#: Test-data folders whose inputs add up to more than this are read lazily (`LazySamples`).
LAZY_SAMPLE_BYTES = 16 << 20


@dataclass
class Feeds:
    """Samples (one dict per sample) plus reference outputs when the source ships them."""

    samples: Sequence[dict[str, np.ndarray]]
    source: str
    references: list[list[np.ndarray]] | None = None
    #: Made up from the input signature: a model that fails on them is at fault, not the user.
    generated: bool = False
    #: What to do when a model fails on generated feeds (the sizes that were guessed).
    hint: str = ""


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller must feed (initializers listed as inputs are left out)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise SampleError(f"input {vi.name!r} is not a tensor; only tensor inputs can be fed")
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))  # noqa: TID251
        dims: tuple[int | str | None, ...] | None = None
        if tt.HasField("shape"):
            dims = tuple(  # 0 is a real (empty) dim: onnxruntime insists on it
                d.dim_value if d.HasField("dim_value") and d.dim_value >= 0
                else (d.dim_param or None)
                for d in tt.shape.dim
            )
        specs.append(InputSpec(vi.name, dtype, dims))
    return specs


def concrete_shape(spec: InputSpec, dims: dict[str, int]) -> tuple[int, ...]:
    """Fill dynamic dims from `dims` (by dim_param name or ``input:axis``), else defaults."""
    if spec.dims is None:
        raise SampleError(
            f"input {spec.name!r} has no shape in the model; provide samples (--samples)"
        )
    shape = []
    for axis, d in enumerate(spec.dims):
        key = f"{spec.name}:{axis}"
        if key in dims:
            shape.append(dims[key])
        elif isinstance(d, int):
            shape.append(d)
        elif isinstance(d, str) and d in dims:
            shape.append(dims[d])
        else:
            shape.append(_default_size(axis, len(spec.dims)))
    return tuple(shape)


def _default_size(axis: int, rank: int) -> int:
    """The size a dynamic dim gets when nobody says: a batch of one, else a short length."""
    return DEFAULT_BATCH if axis == 0 and rank > 1 else DEFAULT_DYNAMIC


def random_feeds(
    specs: list[InputSpec],
    count: int,
    seed: int,
    dims: dict[str, int] | None = None,
    int_high: dict[str, int] | None = None,
) -> Feeds:
    """Seeded samples that respect each input's dtype and shape.

    Floats are standard normal; integers lie in ``[0, int_high[name])`` (the caller derives that
    bound from the graph, e.g. an embedding table's rows) or ``[0, 2)``; booleans are fair coins.
    """
    rng = np.random.default_rng(seed)
    given = dims or {}
    # a named dynamic dim is one size everywhere (silero's `batch` is axis 0 of its audio and
    # axis 1 of its state): the first place it appears decides which default it gets
    named: dict[str, int] = {}
    for spec in specs:
        for axis, d in enumerate(spec.dims or ()):
            if isinstance(d, str) and d not in given:
                named.setdefault(d, _default_size(axis, len(spec.dims or ())))
    dims = {**named, **given}
    shapes = {spec.name: concrete_shape(spec, dims) for spec in specs}
    int_high = int_high or {}
    samples = [
        {
            spec.name: _random_array(rng, spec, shapes[spec.name], int_high.get(spec.name, 2))
            for spec in specs
        }
        for _ in range(count)
    ]
    guessed = [
        f"{spec.name}:{axis}{f' ({d})' if isinstance(d, str) else ''}={size}"
        for spec in specs
        for axis, (d, size) in enumerate(zip(spec.dims or (), shapes[spec.name]))
        if not isinstance(d, int) and f"{spec.name}:{axis}" not in given and d not in given
    ]
    hint = "the inputs were random: give real ones with --samples"
    if guessed:
        hint += f", or the dynamic sizes with --dim (guessed: {', '.join(guessed)})"
    return Feeds(samples, source=f"random(seed={seed})", generated=True, hint=hint)


def _random_array(
    rng: np.random.Generator, spec: InputSpec, shape: tuple[int, ...], high: int
) -> np.ndarray:
    kind = spec.dtype.kind
    if kind == "f":
        return rng.standard_normal(shape).astype(spec.dtype)
    if kind in "iu":
        return rng.integers(0, max(high, 1), size=shape).astype(spec.dtype)
    if kind == "b":
        return np.asarray(rng.random(shape) < 0.5)  # a 0-d draw is a numpy scalar otherwise
    if kind in "OU":  # strings: short words, so text ops see real content
        return WORDS[rng.integers(0, len(WORDS), size=shape)]
    if kind == "V":  # bfloat16, float8, int4 (ml_dtypes): numpy cannot hand them to onnxruntime
        raise SampleError(
            f"input {spec.name!r} has dtype {spec.dtype}, which onnxruntime's Python API cannot "
            "feed, so this model cannot be validated"
        )
    raise SampleError(
        f"input {spec.name!r} has dtype {spec.dtype}, which random samples cannot produce; "
        "provide samples (--samples)"
    )


def load_npz(path: Path, specs: list[InputSpec], limit: int | None = None) -> Feeds:
    """Samples from an .npz whose keys are input names and whose first axis indexes samples."""
    if not zipfile.is_zipfile(path):
        raise SampleError(f"{path}: not an .npz file (numpy.savez writes a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as e:
        raise SampleError(f"{path}: cannot read samples as .npz ({e})") from None
    names = [s.name for s in specs]
    missing = [n for n in names if n not in arrays]
    extra = [k for k in arrays if k not in names]
    if missing or extra:
        raise SampleError(
            f"{path}: sample names do not match the model inputs "
            f"(missing: {missing or 'none'}, unexpected: {extra or 'none'}; "
            f"the model takes {', '.join(s.describe() for s in specs)})"
        )
    counts = {arrays[n].shape[0] if arrays[n].ndim else 0 for n in names}
    if len(counts) != 1 or 0 in counts:
        raise SampleError(
            f"{path}: every array needs the same leading sample axis, got sizes {sorted(counts)}"
        )
    count = counts.pop()
    if limit is not None:
        count = min(count, limit)
    samples = [{s.name: _conform(arrays[s.name][i], s, f"{path} sample {i}") for s in specs}
               for i in range(count)]
    return Feeds(samples, source=str(path))


def load_dir(path: Path, specs: list[InputSpec], limit: int | None = None) -> Feeds:
    """Samples from onnx's layout: ``test_data_set_*/input_N.pb`` (and ``output_N.pb``)."""
    sets = sorted(p for p in path.glob("test_data_set_*") if p.is_dir())
    if not sets:
        raise SampleError(f"{path}: no test_data_set_* folders with input_N.pb files")
    if limit is not None:
        sets = sets[:limit]
    def load(index: int) -> dict[str, np.ndarray]:
        folder = sets[index]
        inputs = _read_pbs(folder, "input")
        if len(inputs) != len(specs):
            raise SampleError(
                f"{folder}: {len(inputs)} input files, but the model takes {len(specs)} inputs "
                f"({', '.join(s.describe() for s in specs)})"
            )
        return {s.name: _conform(a, s, f"{folder} input_{i}") for i, (s, a) in
                enumerate(zip(specs, inputs))}

    samples: list[dict[str, np.ndarray]] = []
    refs, total = [], 0
    for i, folder in enumerate(sets):  # every sample is checked up front, lazy or not
        sample = load(i)
        total += sum(a.nbytes for a in sample.values())
        samples.append(sample)
        if total > LAZY_SAMPLE_BYTES:
            samples = []  # too big to hold: drop them, read each again when used
        refs.append(_read_pbs(folder, "output"))
    has_refs = all(refs)
    held = samples if total <= LAZY_SAMPLE_BYTES else LazySamples(load, len(sets))
    return Feeds(held, source=str(path), references=refs if has_refs else None)


def _read_pbs(folder: Path, prefix: str) -> list[Any]:
    files = sorted(folder.glob(f"{prefix}_*.pb"), key=lambda p: int(p.stem.split("_")[-1]))
    return [read_pb(f) for f in files]


def read_pb(path: Path) -> Any:
    """A serialized TensorProto, SequenceProto or OptionalProto as numpy (lists for sequences)."""
    data = path.read_bytes()
    tensor = onnx.TensorProto()
    try:
        tensor.ParseFromString(data)
        if tensor.data_type:
            return numpy_helper.to_array(tensor)
    except Exception:  # not a tensor: try the container types below
        pass
    seq = onnx.SequenceProto()
    try:
        seq.ParseFromString(data)
        return numpy_helper.to_list(seq)
    except Exception as e:
        raise SampleError(f"{path}: not a TensorProto or SequenceProto ({e})") from None


def _conform(value: Any, spec: InputSpec, where: str) -> np.ndarray:
    """Check dtype and static dims; allow only value-preserving casts (float64 -> float32)."""
    array: np.ndarray = np.asarray(value)
    if array.dtype != spec.dtype:
        same_kind = array.dtype.kind == spec.dtype.kind or (
            array.dtype.kind in "iu" and spec.dtype.kind in "iu"
        ) or (array.dtype.kind in "US" and spec.dtype.kind == "O")
        if not same_kind:
            raise SampleError(
                f"{where}: input {spec.name!r} has dtype {array.dtype}, the model expects "
                f"{spec.dtype}"
            )
        array = array.astype(spec.dtype)
    if spec.dims is not None:
        if array.ndim != len(spec.dims):
            raise SampleError(
                f"{where}: input {spec.name!r} has shape {list(array.shape)}, the model expects "
                f"rank {len(spec.dims)} ({spec.describe()})"
            )
        for axis, (got, want) in enumerate(zip(array.shape, spec.dims)):
            if isinstance(want, int) and got != want:
                raise SampleError(
                    f"{where}: input {spec.name!r} has shape {list(array.shape)}, the model "
                    f"expects {spec.describe()} (axis {axis})"
                )
    return array


def load_samples(
    source: str | Path,
    specs: list[InputSpec],
    *,
    count: int,
    seed: int,
    dims: dict[str, int] | None = None,
    int_high: dict[str, int] | None = None,
) -> Feeds:
    """Dispatch on the source: ``"random"``, an ``.npz`` file, or a test-data folder."""
    if str(source) == "random":
        return random_feeds(specs, count, seed, dims, int_high)
    path = Path(source)
    if not path.exists():
        raise SampleError(f"{path}: samples not found")
    if path.is_dir():
        return load_dir(path, specs, limit=None)
    if path.suffix == ".npz":
        return load_npz(path, specs, limit=None)
    raise SampleError(f"{path}: samples must be an .npz file or a folder of test_data_set_*")
