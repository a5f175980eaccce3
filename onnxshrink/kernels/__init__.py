"""Pure numpy numerics: no onnx, gs or onnxruntime imports, no I/O, no logging."""
