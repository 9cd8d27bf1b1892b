"""Serving with NVIDIA Triton Inference Server.

- ``repository``: the manifest's verified artefacts -> a Triton model repository (native models, a
  Python-backend model that runs anywhere, an optional image-in/mask-out ensemble), written to a
  temp dir, every config parsed with Triton's ModelConfig protobuf and checked, then renamed.
- ``configs``: the config.pbtxt builders and the checks a written repository must pass.
- ``install``: the ``tritonserver`` binary (the nvidia-pytriton wheel's, fetched and verified once).
- ``server``: start a server on 127.0.0.1, wait until ready, stop it (only the process it started).
- ``check``: responses judged by the parity gate against eager over HTTP and gRPC, and a load test.
- ``triton_model``: the standalone model.py every Python-backend model in a repository runs.

Heavy and optional packages (tritonclient, onnx, onnxruntime, openvino) load inside functions.
"""
