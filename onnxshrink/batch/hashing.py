"""Content hashes that let ``--resume`` tell a finished, still-valid output from a stale one.

A model's hash covers its external data files too, so editing weights stored beside a model
invalidates its result. Hashes stream the files (models may be many GB).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import onnx

CHUNK = 1 << 20


def _update_file(digest: Any, path: Path) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)


def external_files(path: Path) -> list[Path]:
    """Files a model points at for external data (empty when it cannot be parsed)."""
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # a broken model has no usable references: hash its bytes alone
        return []
    found: set[str] = set()
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for tensor in graph.initializer:
            found.update(e.value for e in tensor.external_data if e.key == "location")
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)
    return [path.parent / name for name in sorted(found) if (path.parent / name).is_file()]


def model_sha256(path: Path) -> str:
    """SHA-256 over the model file and, in order, each external data file it references."""
    digest = hashlib.sha256()
    _update_file(digest, path)
    for extra in external_files(path):
        digest.update(b"\0" + extra.name.encode() + b"\0")
        _update_file(digest, extra)
    return digest.hexdigest()


def tree_sha256(path: Path) -> str:
    """SHA-256 of a file, or of every file under a folder (names and bytes, sorted)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        digest.update(f.relative_to(path).as_posix().encode() + b"\0" if f != path else b"")
        _update_file(digest, f)
    return digest.hexdigest()


def json_sha256(value: Any) -> str:
    """SHA-256 of a canonical JSON rendering (sorted keys, no whitespace)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()
