"""TensorRT engines, run with torch CUDA tensors as I/O (set_input_shape, set_tensor_address,
execute_async_v3 on a stream of the runner's own, ordered after and before torch's current stream), for
any batch and size inside one of the engine's optimisation profiles: each input runs on the first
profile that holds it (set_optimization_profile_async on the runner's stream when it changes)."""

from pathlib import Path

import torch

from unet_export.errors import UserError
from unet_export.runtimes.base import Runner
from unet_export.runtimes.tensorrt.build import import_tensorrt, make_logger
from unet_export.runtimes.tensorrt.plan import Profile, check_engine_compat, entry_profiles


def gpu_identity(device: torch.device) -> tuple[str, str]:
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


class TensorRTRunner(Runner):
    name = "tensorrt"

    def __init__(self, path: str | Path, device="cuda", precision="fp16", record: dict | None = None):
        super().__init__(device, precision)
        self.path = Path(path)
        self.record = record or {}  # the engine's manifest entry: version, GPU, profiles
        self.profiles: list[Profile] = entry_profiles(self.record)  # none known: TensorRT's profile 0 and its checks
        self.stream = None
        self.active = 0  # the context's optimisation profile: 0 when it is created

    def _activate_impl(self) -> None:
        trt = import_tensorrt()
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise UserError("TensorRT engines run on an NVIDIA GPU; torch sees no CUDA device here")
        if not self.path.is_file():
            raise UserError(f"TensorRT engine not found: {self.path}")
        if self.record:
            check_engine_compat(self.record, trt.__version__, *gpu_identity(self.device))
        self.trt, self.logger = trt, make_logger(trt)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:  # TensorRT returns None (and logs) for another version or GPU
            detail = self.logger.errors[-1] if self.logger.errors else "unreadable plan"
            raise UserError(f"TensorRT cannot load {self.path.name} ({detail}); rebuild it with `unet-export trt`")
        self.context = self.engine.create_execution_context()
        if self.context is None:  # TensorRT returns None (and logs) when it cannot allocate the context
            detail = self.logger.errors[-1] if self.logger.errors else "no error was logged"
            raise UserError(f"TensorRT could not create an execution context for {self.path.name} ({detail}); "
                            "is the GPU out of memory?")  # fmt: skip
        self.input_name, self.output_name = self._io_names(trt)
        self.active = 0
        # TensorRT (10.13, 11.4) warns that enqueueing on the default stream adds cudaDeviceSynchronize calls.
        self.stream = torch.cuda.Stream(self.device)

    def _io_names(self, trt) -> tuple[str, str]:
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise UserError(f"{self.path.name} has inputs {inputs} and outputs {outputs}; "
                            "a segmentation engine has one of each")  # fmt: skip
        return inputs[0], outputs[0]

    def _dtype(self, name: str) -> torch.dtype:
        trt = self.trt
        table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16}
        dtype = self.engine.get_tensor_dtype(name)
        if dtype not in table:
            raise UserError(f"{self.path.name}: tensor {name} is {dtype}; the runner passes float32/float16/bfloat16")
        return table[dtype]

    def _infer_impl(self, x: torch.Tensor) -> torch.Tensor:
        self._select(self.profile_for(tuple(x.shape)))
        x = x.to(self._dtype(self.input_name)).contiguous()
        if not self.context.set_input_shape(self.input_name, tuple(x.shape)):
            raise UserError(f"TensorRT refused input shape {tuple(x.shape)} for {self.path.name}")
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)),
                          dtype=self._dtype(self.output_name), device=x.device)  # fmt: skip
        for name, tensor in ((self.input_name, x), (self.output_name, out)):
            if not self.context.set_tensor_address(name, tensor.data_ptr()):
                raise RuntimeError(f"TensorRT refused the address of {name} for {self.path.name}")
        self._enqueue()
        return out.float()

    def _select(self, index: int) -> None:
        """Make profile ``index`` the context's before the input shape is set (TensorRT checks the shape
        against the active profile). The switch is queued on the runner's stream, behind its last run."""
        if index == self.active:
            return
        if not self.context.set_optimization_profile_async(index, self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT refused optimisation profile {index} of {self.path.name}")
        self.active = index

    def profile_for(self, shape: tuple[int, ...]) -> int:
        """The index of the first profile that holds ``shape``; one that none holds is refused, naming them."""
        if not self.profiles:
            return 0
        index = next((i for i, p in enumerate(self.profiles) if p.contains(shape)), None)
        if index is None:
            boxes = " or ".join(_box(p) for p in self.profiles)
            raise UserError(f"input {'x'.join(map(str, shape))} is outside the engine's profiles ({boxes}): "
                            "rebuild it with a --profile that holds it")  # fmt: skip
        return index

    def _enqueue(self) -> None:
        """Run on the runner's stream between two waits, so torch's current stream (its copies, its timing
        events, the caching allocator that frees x and reuses memory) sees TensorRT's work in order."""
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)  # x and out were written there
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT execute_async_v3 failed for {self.path.name}")
        caller.wait_stream(self.stream)

    def _deactivate_impl(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()  # no context may be destroyed while its work is queued
        self.context = self.engine = self.stream = None

    def describe(self) -> str:
        return f"TensorRT {self.record.get('tensorrt_version', '?')}, {self.record.get('gpu', self.device)}"


def _box(profile: Profile) -> str:
    """A profile as the envelope describes a box: batch, height and width ranges (not the channels)."""
    spans = {name: (profile.min[i], profile.max[i]) for name, i in (("batch", 0), ("height", 2), ("width", 3))}
    return ", ".join(f"{name} {lo if lo == hi else f'{lo}-{hi}'}" for name, (lo, hi) in spans.items())
