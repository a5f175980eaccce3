"""One exception family; the CLI maps each class to its own exit code.

Library code raises these with a message that says where (file, step, pass, node), what was
expected and what was found, so the CLI can print one line and never a traceback.
"""

from __future__ import annotations


class OnnxShrinkError(Exception):
    """Base of every error onnxshrink raises on purpose (exit code 1)."""

    exit_code = 1


class ModelError(OnnxShrinkError):
    """The input model cannot be read, is not a valid ONNX model, or onnxruntime refuses it."""

    exit_code = 4


class RuleError(OnnxShrinkError):
    """A recipe file is malformed: unknown key, wrong type, unknown pass."""

    exit_code = 5


class ParamError(RuleError):
    """A pass parameter has an invalid value."""


class SampleError(OnnxShrinkError):
    """Sample inputs do not match the model (names, dtypes, shapes) or cannot be read."""

    exit_code = 6


class OutputError(OnnxShrinkError):
    """The output cannot be written (bad path, same as the input, no permission)."""

    exit_code = 7


class PreconditionError(OnnxShrinkError):
    """A pass cannot run on this graph (opset too low, weights not constant)."""


class PassError(OnnxShrinkError):
    """A pass failed unexpectedly; the message names the step, the pass and the model."""


class NumericsError(OnnxShrinkError):
    """The compressed model's outputs are outside the recipe's tolerance (exit code 3)."""

    exit_code = 3


EXIT_CODES: dict[str, int] = {
    "ok": 0,
    "error": OnnxShrinkError.exit_code,
    "usage": 2,
    "numerics": NumericsError.exit_code,
    "model": ModelError.exit_code,
    "recipe": RuleError.exit_code,
    "samples": SampleError.exit_code,
    "output": OutputError.exit_code,
}
