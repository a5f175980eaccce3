"""Calibration: sample sources, streaming observers, activation collection."""
