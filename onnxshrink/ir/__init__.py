"""The IR layer: onnx-graphsurgeon graphs, loaded, queried and edited only through here."""
