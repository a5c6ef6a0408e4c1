"""torch -> staged ONNX bundle (export, verification) and ONNX -> TensorRT engines."""
