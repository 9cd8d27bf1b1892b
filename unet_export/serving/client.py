"""Talking to a Triton server with tritonclient, over HTTP or gRPC, on 127.0.0.1.

``TritonRunner`` is a Runner (unet_export.runtimes.base): a batch in, the served model's output
out, so the parity machinery that judges artefacts judges served models unchanged. One client
per runner and per thread: the HTTP client is gevent-based and must stay on the thread that made
it. Clients are always closed (an open HTTP client holds the server's shutdown for 30 s).
"""

import numpy as np
import torch

from unet_export.errors import require
from unet_export.runtimes.base import Runner

PROTOCOLS = ("http", "grpc")


def client_module(protocol: str):
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r}: use http or grpc")
    return require(f"tritonclient.{protocol}", extra="serve")


def make_client(protocol: str, url: str, timeout_s: float = 60.0):
    module = client_module(protocol)
    if protocol == "http":
        return module.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
    return module.InferenceServerClient(url)


def infer(client, protocol: str, model: str, inputs: dict[str, np.ndarray], outputs: list[str],
          timeout_s: float = 60.0, binary: bool = True) -> dict[str, np.ndarray]:  # fmt: skip
    """One request; a server-side error raises tritonclient's InferenceServerException. ``binary``
    False sends and asks for HTTP tensors as JSON lists (KServe's plain form: every float as text,
    several times slower at image sizes; gRPC tensors are always binary)."""
    module = client_module(protocol)
    from tritonclient.utils import np_to_triton_dtype

    tensors = []
    encoding = {"binary_data": binary} if protocol == "http" else {}  # gRPC's tensors have no other form
    for name, array in inputs.items():
        tensor = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(np.ascontiguousarray(array), **encoding)
        tensors.append(tensor)
    wanted = [module.InferRequestedOutput(name, **encoding) for name in outputs]
    if protocol == "grpc":
        result = client.infer(model, tensors, outputs=wanted, client_timeout=timeout_s)
    else:  # the HTTP client's network_timeout bounds the request
        result = client.infer(model, tensors, outputs=wanted)
    return {name: result.as_numpy(name) for name in outputs}


class TritonRunner(Runner):
    """A model served by Triton, as a runner: float32 NCHW in, the named output out (on the CPU)."""

    name = "triton"

    def __init__(self, url: str, model: str, input_name: str, output_name: str, protocol: str = "http",
                 precision: str = "fp32", timeout_s: float = 60.0, binary: bool = True):  # fmt: skip
        super().__init__("cpu", precision)
        client_module(protocol)  # a missing tritonclient is a one-line error before anything starts
        self.url, self.model, self.protocol, self.timeout_s = url, model, protocol, timeout_s
        self.binary = binary
        self.input_name, self.output_name = input_name, output_name
        self.client = None

    def _activate_impl(self) -> None:
        self.client = make_client(self.protocol, self.url, self.timeout_s)

    def _infer_impl(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().contiguous().numpy().astype(np.float32, copy=False)
        outputs = [self.output_name]
        out = infer(self.client, self.protocol, self.model, {self.input_name: array}, outputs, self.timeout_s,
                    self.binary)
        return torch.from_numpy(np.array(out[self.output_name], dtype=np.float32))

    def _deactivate_impl(self) -> None:
        self.client.close()
        self.client = None

    def describe(self) -> str:
        return f"{self.model} over {self.protocol.upper()} at {self.url}"


def model_statistics(url: str, model: str) -> list[dict]:
    """The server's statistics endpoint for ``model`` (each version's cumulative counts and ns)."""
    client = make_client("http", url)
    try:
        return client.get_inference_statistics(model)["model_stats"]
    finally:
        client.close()


# Where a request's time goes inside the server, as its statistics split it: waiting for an
# instance (and for dynamic batching to fill a batch), handing the inputs to the model (for the
# Python backend: into the stub's shared memory), the model's execute(), the outputs back.
SERVER_PARTS = ("queue", "compute_input", "compute_infer", "compute_output")


def server_time_ns(stats: list[dict]) -> dict[str, int]:
    """Cumulative ns per SERVER_PARTS, plus "request" (arrival to response) and "requests", from
    model_statistics()."""
    totals = dict.fromkeys((*SERVER_PARTS, "request", "requests"), 0)
    for model_stats in stats:
        stats = model_stats.get("inference_stats", {})
        for part in SERVER_PARTS:
            totals[part] += int(stats.get(part, {}).get("ns", 0))
        totals["request"] += int(stats.get("success", {}).get("ns", 0))
        totals["requests"] += int(stats.get("success", {}).get("count", 0))
    return totals


def batch_counts(stats: list[dict]) -> dict[int, int]:
    """{batch size: executions} from model_statistics(): the batches that dynamic batching formed
    (a Python-backend execution counts the requests it received together)."""
    counts: dict[int, int] = {}
    for model_stats in stats:
        for entry in model_stats.get("batch_stats", []):
            size = int(entry["batch_size"])
            counts[size] = counts.get(size, 0) + int(entry["compute_infer"]["count"])
    return counts
