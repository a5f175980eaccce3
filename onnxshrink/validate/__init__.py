"""Validation: feeds, onnxruntime runs of both models, metrics and verdicts."""
