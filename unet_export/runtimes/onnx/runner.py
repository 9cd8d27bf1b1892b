"""ONNX Runtime. CPU provider with tuned session options; CUDA provider with IO binding (inputs
and outputs stay on the GPU as torch tensors) when the runner is on CUDA and onnxruntime-gpu
is installed; TensorRT provider on request. describe() says which provider actually ran."""

from pathlib import Path

import numpy as np
import torch

from unet_export.device import physical_cores
from unet_export.errors import UserError, require
from unet_export.runtimes.base import Runner
from unet_export.runtimes.onnx.export import refuse_outside_data

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"

    def __init__(self, path: str | Path, device="cpu", precision="fp32", provider: str | None = None,
                 threads: int | None = None, cuda_graph: bool = False):  # fmt: skip
        super().__init__(device, precision)
        self.path = Path(path)
        self.wanted = provider or ("cuda" if self.device.type == "cuda" else "cpu")
        self.threads = threads
        self.cuda_graph = cuda_graph
        self.session = None
        self.provider = None

    def _activate_impl(self) -> None:
        ort = require("onnxruntime")
        if not self.path.is_file():
            raise UserError(f"ONNX model not found: {self.path}")
        options, providers = self._options(ort), self._providers(ort)
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception:
            refuse_outside_data(self.path)  # bad input, not a crash (checked on failure only: free otherwise)
            raise
        self.provider = self.session.get_providers()[0]
        self.input_name = self.session.get_inputs()[0].name
        self.output = self.session.get_outputs()[0]
        self.io_binding = self.provider != "CPUExecutionProvider" and self.device.type == "cuda"

    def _options(self, ort):
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: ORT warns about unused initialisers
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = self.threads or physical_cores()
        if self.shares_cpu:  # idle intra-op threads spin by default, taking the cores decode needs
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return options

    def _providers(self, ort) -> list:
        available = ort.get_available_providers()
        wanted = PROVIDERS[self.wanted]
        if self.wanted != "cpu" and wanted not in available:
            raise UserError(
                f"ONNX Runtime has no {wanted} here (available: {', '.join(available)}); "
                'on an NVIDIA machine: pip install "unet-export[gpu]"'
            )
        if self.wanted == "cuda":
            cuda = {"device_id": self.device.index or 0, "prefer_nhwc": "1", "cudnn_conv_algo_search": "EXHAUSTIVE"}
            if self.cuda_graph:
                cuda["enable_cuda_graph"] = "1"  # needs IO binding and one fixed shape
            return [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
        return [wanted] + (["CPUExecutionProvider"] if wanted != "CPUExecutionProvider" else [])

    def _infer_impl(self, x: torch.Tensor) -> torch.Tensor:
        if self.io_binding:
            return self._infer_bound(x)
        (logits,) = self.session.run(None, {self.input_name: x.detach().cpu().numpy()})
        return torch.from_numpy(logits).to(self.device)

    def _infer_bound(self, x: torch.Tensor) -> torch.Tensor:
        """Run on device memory: no host copies inside the timed call."""
        x = x.contiguous()
        out = torch.empty(self._output_shape(x), device=x.device, dtype=torch.float32)
        binding = self.session.io_binding()
        index = x.device.index or 0
        binding.bind_input(self.input_name, "cuda", index, np.float32, tuple(x.shape), x.data_ptr())
        binding.bind_output(self.output.name, "cuda", index, np.float32, tuple(out.shape), out.data_ptr())
        self.session.run_with_iobinding(binding)
        return out

    def _output_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        """Resolve the output's symbolic dims (batch, height, width) from the input's."""
        names = {"batch": x.shape[0], "height": x.shape[2], "width": x.shape[3]}
        dims = [d if isinstance(d, int) else names.get(d) for d in self.output.shape]
        if None in dims:
            raise UserError(f"cannot infer output shape {self.output.shape} for input {tuple(x.shape)}")
        return tuple(dims)

    def for_throughput(self, streams: int | None = None) -> "OnnxRuntimeRunner":
        """On the CPU: by default one batch per physical core at once, each on one intra-op thread
        (concurrent run() calls on the one session: ONNX Runtime releases the GIL while it
        computes), rather than every core on one batch, whose small layers leave cores waiting.
        That pays on small images and loses on large ones (demo model, 2 cores: 1.63x at 128x128,
        0.86x at 640x960), so ``streams`` can ask for fewer. GPU providers keep one stream."""
        if self.wanted == "cpu":
            self.streams = min(streams or physical_cores(), physical_cores())
            self.threads = max(1, physical_cores() // self.streams)
        return super().for_throughput(streams)

    def throughput_choices(self) -> list[int | None]:
        # one run at a time first: the allocator keeps what concurrent runs took, which would
        # count in the next setting's peak memory
        cores = physical_cores()
        return [1, cores] if self.wanted == "cpu" and cores > 1 else [None]

    def throughput_setting(self) -> str:
        if self.streams == 1:
            return f"1 run at a time, {self.threads or physical_cores()} intra-op thread(s)"
        return f"{self.streams} concurrent runs of one session, {self.threads} intra-op thread(s) each"

    def _deactivate_impl(self) -> None:
        self.session = None

    def describe(self) -> str:
        return self.provider or "onnxruntime"
