"""unet-export: U-Net checkpoints to verified ONNX, TorchScript and TensorRT artefacts.

The library API lives in ``unet_export.api``; the CLI is a thin layer over it.
"""

__version__ = "0.1.0"
