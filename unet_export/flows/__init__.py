"""One use case per command family, each read top to bottom: export.py (onnx/torchscript/aoti, fp16,
trt), openvino.py, int8.py (quantize_int8), verify.py (the `verify` command), evaluate.py, train.py,
cpp_check.py."""
