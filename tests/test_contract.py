"""One contract over every registered pass: docs, params, empty selection, determinism, pickling."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import onnx
import pytest

from onnxshrink import passes
from onnxshrink.ir import io
from onnxshrink.passes.base import Context, PassParams
from tests.conftest import SAMPLES


@pytest.fixture(params=passes.names())
def pass_cls(request: pytest.FixtureRequest) -> type[passes.Pass]:
    return passes.get(request.param)


def test_has_docstring_and_valid_name(pass_cls: type[passes.Pass]) -> None:
    assert pass_cls.__doc__ and len(pass_cls.__doc__.strip()) > 40
    family, method = pass_cls.name.split(".")
    assert pass_cls.__name__.endswith("Pass")
    module = pass_cls.__module__.rsplit(".", 1)[-1]
    assert module == f"{family}_{method}", "one name per pass: module matches the registry name"


def test_default_params_pass_check(pass_cls: type[passes.Pass]) -> None:
    params = pass_cls.params_type()
    assert isinstance(params, PassParams)
    params.check()
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.__setattr__(next(iter(pass_cls.params_type.field_types())), None)


def test_pickles(pass_cls: type[passes.Pass]) -> None:
    p = pass_cls()
    assert pickle.loads(pickle.dumps(p)) == p


def test_empty_selection_changes_nothing(pass_cls: type[passes.Pass]) -> None:
    loaded = io.load(SAMPLES / "cnn.onnx")
    before = io.to_model(loaded.graph, loaded.info).SerializeToString()
    result = pass_cls().run(loaded.graph, [], Context(model_path=SAMPLES / "cnn.onnx", opset=17))
    assert not result.modified
    assert io.to_model(loaded.graph, loaded.info).SerializeToString() == before


@pytest.mark.parametrize("model", ["cnn", "transformer"])
def test_deterministic_for_a_seed(pass_cls: type[passes.Pass], model: str, tmp_path: Path) -> None:
    outs = []
    for _ in range(2):
        loaded = io.load(SAMPLES / f"{model}.onnx")
        ctx = Context(model_path=SAMPLES / f"{model}.onnx", seed=3, opset=loaded.info.opset,
                      workdir=tmp_path)
        pass_cls().run(loaded.graph, list(loaded.graph.nodes), ctx)
        loaded.graph.cleanup().toposort()
        model_proto = io.to_model(loaded.graph, loaded.info)
        onnx.checker.check_model(model_proto)
        outs.append(model_proto.SerializeToString())
    assert outs[0] == outs[1]
