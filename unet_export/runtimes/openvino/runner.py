"""OpenVINO on the CPU, reading an OpenVINO IR (``.xml`` + its ``.bin``) or the ONNX artefact.
Each new input shape is compiled static once (static kernels are faster than dynamic ones);
``precision`` names what the artefact is (fp32, fp16, bf16, int8) and sets the inference
precision hint: fp32 keeps full precision, bf16 uses the CPU's bf16 units where it has them
(emulated, slowly, on AVX-512 without avx512_bf16; on an AVX2-only CPU OpenVINO lists no BF16
capability and compiles the hint as f32: openvino_cpu_bf16), int8 runs the quantised layers in
INT8 (VNNI/AMX) and the layers left in FP32 in f32.

An IR is two files: the runner takes both paths (workdir/ir.py finds and checks the .bin of a
workdir's IR).

for_throughput() compiles with PERFORMANCE_HINT THROUGHPUT (the CPU split into streams) instead of
LATENCY, at the same precision hint; stream() then keeps the compiled model's
OPTIMAL_NUMBER_OF_INFER_REQUESTS in flight through an AsyncInferQueue, as benchmark_app -hint
throughput does."""

import time
from pathlib import Path

import torch

from unet_export.errors import UserError, require
from unet_export.runtimes.base import Runner
from unet_export.runtimes.onnx.export import refuse_outside_data

HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}


def openvino_cpu_bf16() -> bool:
    """Whether OpenVINO's CPU plugin runs bf16 here; without BF16 in its capabilities the bf16
    hint compiles f32 (the compiled model's INFERENCE_PRECISION_HINT reads f32)."""
    ov = require("openvino", extra="openvino")
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class OpenVinoRunner(Runner):
    name = "openvino"

    def __init__(self, path: str | Path, device="cpu", precision="fp32", weights: str | Path | None = None,
                 hint: str | None = None):  # fmt: skip
        super().__init__(device, precision)
        if self.device.type != "cpu":
            raise UserError("the OpenVINO runner runs on the CPU only")
        if precision not in HINTS:
            raise UserError(f"OpenVINO precision {precision!r}: choose one of {', '.join(HINTS)}")
        self.path = Path(path)
        self.weights = Path(weights) if weights else None
        self.hint = hint or HINTS[precision]
        self.performance = "LATENCY"
        self.compiled, self.requests = {}, {}
        self.setting = ""

    def _activate_impl(self) -> None:
        ov = require("openvino", extra="openvino")
        if not self.path.is_file():
            raise UserError(f"OpenVINO model not found: {self.path}")
        self.core = ov.Core()
        files = (str(self.path), str(self.weights)) if self.weights else (str(self.path),)
        try:
            self.model = self.core.read_model(*files)
        except Exception:
            if self.path.suffix == ".onnx":  # an ONNX model read by OpenVINO (no IR in the workdir)
                refuse_outside_data(self.path)
            raise
        self.compiled, self.requests = {}, {}

    def _compiled(self, shape: tuple[int, ...]):
        if shape not in self.compiled:
            model = self.model.clone()
            model.reshape({model.input(0).get_any_name(): list(shape)})
            config = {"INFERENCE_PRECISION_HINT": self.hint, "PERFORMANCE_HINT": self.performance}
            self.compiled[shape] = self.core.compile_model(model, "CPU", config)
        return self.compiled[shape]

    def _request(self, shape: tuple[int, ...]):
        if shape not in self.requests:
            compiled = self._compiled(shape)
            self.requests[shape] = (compiled.create_infer_request(), compiled.output(0))
        return self.requests[shape]

    def _infer_impl(self, x: torch.Tensor) -> torch.Tensor:
        request, output = self._request(tuple(x.shape))
        request.infer({0: x.detach().contiguous().numpy()})
        return torch.from_numpy(request.get_tensor(output).data.copy())

    def for_throughput(self, streams: int | None = None) -> "OpenVinoRunner":
        self.performance = "THROUGHPUT"  # OpenVINO picks its streams and requests for the shape
        return super().for_throughput(streams)

    def stream(self, batches):
        """As Runner.stream, through one AsyncInferQueue per input shape (compiled THROUGHPUT
        after for_throughput(); LATENCY otherwise: one request at a time, as infer())."""
        if self.performance != "THROUGHPUT":
            yield from super().stream(batches)
            return
        done, queues, submitted, next_out = {}, {}, 0, 0
        for x in batches:
            shape = tuple(x.shape)
            if shape not in queues:
                queues[shape] = self._queue(shape, done)
            queues[shape].get_idle_request_id()  # waits for a free request: its latency starts when it can run
            queues[shape].start_async({0: x.detach().contiguous().numpy()}, (submitted, time.perf_counter()))
            submitted += 1
            while next_out in done:
                yield done.pop(next_out)
                next_out += 1
        for queue in queues.values():
            queue.wait_all()
        for index in range(next_out, submitted):
            if index not in done:
                raise RuntimeError(f"OpenVINO finished no output for batch {index} of the stream")
            yield done.pop(index)

    def _queue(self, shape: tuple[int, ...], done: dict):
        """An AsyncInferQueue with the compiled model's optimal number of requests, whose
        callback puts each output (copied: the request's buffer is reused) and latency in ``done``."""
        ov = require("openvino", extra="openvino")
        compiled = self._compiled(shape)
        jobs = compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")
        queue = ov.AsyncInferQueue(compiled, jobs)

        def finished(request, userdata):
            index, started = userdata
            out = torch.from_numpy(request.get_output_tensor(0).data.copy())
            done[index] = (out, (time.perf_counter() - started) * 1000.0)

        queue.set_callback(finished)
        self.streams = jobs
        self.setting = f"THROUGHPUT hint, {compiled.get_property('NUM_STREAMS')} streams, {jobs} infer requests"
        return queue

    def throughput_setting(self) -> str:
        return self.setting or super().throughput_setting()

    def _deactivate_impl(self) -> None:
        self.compiled, self.requests = {}, {}
        self.model = None

    def describe(self) -> str:
        source = ", IR" if self.path.suffix == ".xml" else ""
        if self.precision == "int8":
            return f"CPU{source}, INT8 ({self.hint} for the layers left in FP32)"
        return f"CPU{source}, {self.hint} inference precision"
