"""Graph passes: functions from ONNX graphs to ONNX graphs (and a typed description of what
they did), separate from the backends that run sessions on them."""
