"""Shipped recipes; installed as the ``onnxshrink.rules`` package so ``-r NAME`` works anywhere."""
