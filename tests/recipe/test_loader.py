"""Strict recipe loading: every mistake names file, step and key, before any model loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from onnxshrink import pipeline
from onnxshrink.errors import ParamError, PreconditionError, RuleError
from onnxshrink.passes.base import Context
from onnxshrink.recipe.loader import load_recipe, parse_recipe, shipped_names
from onnxshrink.recipe.schema import Recipe, Selector


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.toml"
    path.write_text(text)
    return path


def test_minimal_recipe_is_only_steps(tmp_path: Path) -> None:
    recipe = load_recipe(_write(tmp_path, '[[step]]\npass = "graph.cleanup"\n'))
    assert recipe.name == "r"
    assert [s.pass_name for s in recipe.steps] == ["graph.cleanup"]
    assert recipe.validate.samples >= 1


@pytest.mark.parametrize("name", shipped_names())
def test_shipped_recipes_load_and_plan(name: str) -> None:
    recipe = load_recipe(name)
    assert recipe.steps
    assert pipeline.plan(recipe).steps


def _refusals(recipe: Recipe, opset: int) -> list[str]:
    """The passes of `recipe` that refuse a small MatMul graph at `opset`."""
    x = gs.Variable("x", np.float32, [1, 64])
    w = gs.Constant("w", np.ones((64, 64), np.float32))
    y = gs.Variable("y", np.float32, [1, 64])
    refused = []
    for step in pipeline.plan(recipe).steps:
        graph = gs.Graph([gs.Node("MatMul", "mm", inputs=[x, w], outputs=[y])], [x], [y],
                         opset=opset)
        try:
            step.pass_obj.requires(graph, Context(model_path=Path("m.onnx"), opset=opset))
        except PreconditionError:
            refused.append(step.label)
    return refused


@pytest.mark.parametrize("name", shipped_names())
def test_shipped_min_opset_is_exactly_what_the_passes_need(name: str) -> None:
    """min_opset refuses older models outright, so a shipped recipe that declares one claims
    what its passes need and no more: all accept a graph at that opset (raising it themselves
    where they must), and one refuses the opset below. Recipes without one (default, lossless)
    take any model, and a step that cannot run on it is skipped with the reason."""
    recipe = load_recipe(name)
    if recipe.min_opset > 1:
        assert _refusals(recipe, recipe.min_opset) == []
        assert _refusals(recipe, recipe.min_opset - 1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[[step]]\npas = "graph.cleanup"\n', "unknown key 'pas' (did you mean 'pass'?)"),
        ('[[step]]\npass = "graph.cleanp"\n', "did you mean 'graph.cleanup'?"),
        ('[[step]]\npass = "graph.cleanup"\nparams = { fold_constant = true }\n',
         "did you mean 'fold_constants'?"),
        ('[[step]]\npass = "graph.cleanup"\nparams = { fold_constants = 3 }\n', "must be bool"),
        ('[[step]]\npass = "graph.cleanup"\nparams = { max_growth_bytes = -1 }\n',
         "'max_growth_bytes' parameter must be >= 0"),
        ('[[step]]\npass = "graph.cleanup"\nselect = { names = ["("] }\n', "bad regex"),
        ('[[step]]\npass = "graph.cleanup"\nselect = { op_type = ["Conv"] }\n',
         "did you mean 'op_types'?"),
        ('[[step]]\npass = "graph.cleanup"\n[validate]\ntolerance = { min_cos = 0.9 }\n',
         "did you mean 'min_cosine'?"),
        ('[[step]]\npass = "graph.cleanup"\n[validate]\nsamples = 0\n', "samples must be >= 1"),
        ("schema = 2\n[[step]]\npass = \"graph.cleanup\"\n", "schema 2 is not supported"),
        ('[recipe]\nname = "x"\n', "at least one [[step]]"),
        ("[[step]\n", "not valid TOML"),
    ],
)
def test_errors_name_the_problem(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(RuleError) as info:
        load_recipe(path)
    assert expected in str(info.value)
    assert str(path) in str(info.value)


def test_param_errors_are_param_errors(tmp_path: Path) -> None:
    path = _write(tmp_path, '[[step]]\npass = "graph.cleanup"\nparams = { fold_constants = 1 }\n')
    with pytest.raises(ParamError, match=r"step 1 'graph.cleanup' params.fold_constants"):
        load_recipe(path)


def test_unknown_shipped_name_suggests() -> None:
    with pytest.raises(RuleError, match="did you mean 'default'"):
        load_recipe("defualt")


def test_missing_recipe_file() -> None:
    with pytest.raises(RuleError, match="recipe file not found"):
        load_recipe("nowhere/recipe.toml")


def test_overrides_expand_into_disjoint_substeps() -> None:
    recipe = parse_recipe(
        {
            "step": [
                {
                    "pass": "graph.cleanup",
                    "select": {"op_types": ["Conv", "Gemm"]},
                    "params": {"max_growth_bytes": 10},
                    "override": [{"select": {"names": ["head.*"]},
                                  "params": {"fold_batchnorm": False}}],
                }
            ]
        }
    )
    planned = pipeline.plan(recipe).steps
    assert [s.label for s in planned] == ["1:graph.cleanup", "1:graph.cleanup/override1"]
    base, over = planned
    assert base.excludes == (Selector(names=("head.*",)),)
    assert over.pass_obj.params.fold_batchnorm is False
    assert over.pass_obj.params.max_growth_bytes == 10  # merged from the step
    assert over.selects == (Selector(op_types=("Conv", "Gemm")), Selector(names=("head.*",)))


def test_override_params_are_validated() -> None:
    with pytest.raises(ParamError, match="override 1"):
        parse_recipe(
            {"step": [{"pass": "graph.cleanup",
                       "override": [{"params": {"max_growth_bytes": -5}}]}]}
        )
