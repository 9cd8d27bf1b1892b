"""One folder per runtime, the writer and the runner side by side (onnx/, openvino/, tensorrt/,
aoti/, torchscript/, torch/ for eager and torch.compile); base.py holds the Runner every one of
them is. Runners take paths, never manifest entries (unet_export.workdir.runners maps an entry to
its runner). Each runner imports its runtime lazily, so importing this package costs nothing."""

from unet_export.runtimes.aoti.runner import AotiRunner
from unet_export.runtimes.base import Runner
from unet_export.runtimes.onnx.runner import OnnxRuntimeRunner
from unet_export.runtimes.openvino.runner import OpenVinoRunner
from unet_export.runtimes.tensorrt.runner import TensorRTRunner
from unet_export.runtimes.torch.compiled import TorchCompileRunner
from unet_export.runtimes.torch.eager import EagerRunner
from unet_export.runtimes.torchscript.runner import TorchScriptRunner

__all__ = ["AotiRunner", "EagerRunner", "OnnxRuntimeRunner", "OpenVinoRunner", "Runner", "TensorRTRunner",
           "TorchCompileRunner", "TorchScriptRunner"]  # fmt: skip
