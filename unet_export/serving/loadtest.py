"""A bounded load test on a served model: N concurrent clients (half HTTP, half gRPC, or one
protocol) each send M requests of ``batch`` images back to back, and stop at a deadline. Reported:
requests/s and images/s, latency p50/p90/p99, the batch sizes dynamic batching formed and where a
request's time went in the server (its statistics, before and after). Every
response is then compared with eager's output for the same input (after the timed part, so the
comparison does not compete with the server for the CPU); every request must be answered and match."""

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from unet_export.parity.gate import compare, seeded_inputs, tolerance_from_record
from unet_export.runtimes import EagerRunner
from unet_export.serving.client import PROTOCOLS, SERVER_PARTS, TritonRunner, batch_counts, model_statistics, server_time_ns

POOL = 4  # distinct inputs cycled through, so a wrong answer for one input cannot hide


@dataclass
class LoadReport:
    model: str
    clients: int
    requests: int  # per client
    shape: list[int]
    protocols: tuple[str, ...] = PROTOCOLS
    binary: bool = True  # HTTP tensors as binary (tritonclient's default), else as JSON lists
    inputs: str = "seeded"  # what the requests carried: "seeded" or "real images"
    judged: bool = True  # False: answers counted, not compared (reduced precision without real images)
    answered: int = 0
    mismatched: int = 0
    distinct_answers: int = 0  # (input, output bytes) pairs: batching may change the last bits
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    batches: dict[int, int] = field(default_factory=dict)  # batch size -> executions
    server_ms: dict[str, float] = field(default_factory=dict)  # SERVER_PARTS and "request": mean ms per request

    @property
    def expected(self) -> int:
        return self.clients * self.requests

    @property
    def requests_per_s(self) -> float:
        return self.answered / self.seconds if self.seconds else 0.0

    @property
    def images_per_s(self) -> float:
        return self.requests_per_s * self.shape[0]

    @property
    def passed(self) -> bool:
        return self.answered == self.expected and not self.errors and self.mismatched == 0


def load_test(server, name: str, config, model_record: dict, net, *, clients: int = 8, requests: int = 50,
              deadline_s: float = 180.0, seed: int = 0, threshold: float = 0.0, batch: int = 1,
              protocols: tuple[str, ...] = PROTOCOLS, binary: bool = True,
              real: list[torch.Tensor] | None = None, judge: bool = True) -> LoadReport:  # fmt: skip
    """``real``: request tensors of real images (all of one shape; their batch replaces
    ``batch``), sent instead of seeded ones: what a reduced-precision model is judged on.
    ``judge`` False: every answer must come, none is compared (a reduced-precision model on
    seeded requests, where a comparison says nothing)."""
    artifact = model_record["artifact"]
    shape = list(real[0].shape) if real else [batch, *artifact["parity_shapes"][0][1:]]
    report = LoadReport(name, clients, requests, shape, tuple(protocols), binary, "real images" if real else "seeded",
                        judge)  # fmt: skip
    inputs = real[:POOL] if real else seeded_inputs([tuple(shape)] * POOL, seed + 1)
    refs = _references(net, inputs) if judge else []
    before = _statistics(server, name, report)
    urls = {"http": server.http_url, "grpc": server.grpc_url}
    deadline = time.monotonic() + deadline_s
    io = (config.input[0].name, config.output[0].name)
    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(lambda k: _client(k, report, urls, io, inputs, deadline), range(clients)))
    report.seconds = time.perf_counter() - began
    after = _settled(server, name, report, before, shape[0] * sum(len(lat) for lat, _, _ in results))
    report.batches = _formed(before, after)
    report.server_ms = _split(before, after)
    _judge(report, results, refs, tolerance_from_record(artifact.get("limits"), artifact["precision"]), threshold)
    return report


def _client(k: int, report: LoadReport, urls: dict, io: tuple, inputs: list, deadline: float):
    """Client ``k`` (the protocols in turn: with both, HTTP for even k, gRPC for odd):
    (latencies ms, [(input index, output)], errors)."""
    protocol, requests = report.protocols[k % len(report.protocols)], report.requests
    runner = TritonRunner(urls[protocol], report.model, *io, protocol, binary=report.binary)
    latencies, outputs, errors = [], [], []
    try:
        runner.activate()
    except Exception as exc:
        return latencies, outputs, [f"client {k} ({protocol}): {' '.join(str(exc).split())[:160]}"]
    try:
        for i in range(requests):
            if time.monotonic() > deadline:
                errors.append(f"client {k}: {requests - i} requests not sent before the deadline")
                break
            j = (k + i) % len(inputs)
            began = time.perf_counter()
            try:
                outputs.append((j, runner.infer(inputs[j])))
            except Exception as exc:  # Triton's error or a timeout: counted, never a crash
                errors.append(f"client {k} ({protocol}): {' '.join(str(exc).split())[:160]}")
                continue
            latencies.append((time.perf_counter() - began) * 1e3)
    finally:
        runner.deactivate()  # an open HTTP client would hold the server's shutdown for 30 s
    return latencies, outputs, errors


def _references(net, inputs: list) -> list[tuple]:
    """Eager's fp32 and float64 answer for each input."""
    with EagerRunner(net, "cpu") as reference, EagerRunner(net, "cpu", "fp64") as exact:
        return [(reference.infer(x), exact.infer(x)) for x in inputs]


def _settled(server, name: str, report: LoadReport, before: list[dict], answered: int) -> list[dict]:
    """The statistics once they account for the test. Triton may record an execution's statistics
    after its responses went out, so the endpoint is read until its batches hold every answered
    image (``answered``: the sum of size x executions), for at most 5 s."""
    deadline = time.monotonic() + 5.0
    while True:
        after = _statistics(server, name, report)
        if sum(n * count for n, count in _formed(before, after).items()) >= answered or time.monotonic() > deadline \
                or not after:  # fmt: skip
            return after
        time.sleep(0.1)


def _statistics(server, name: str, report: LoadReport) -> list[dict]:
    try:
        return model_statistics(server.http_url, name)
    except Exception as exc:  # a server that died under load: reported, the load test still ends
        report.errors.append(f"statistics endpoint: {' '.join(str(exc).split())[:160]}")
        return []


def _formed(before: list[dict], after: list[dict]) -> dict[int, int]:
    """Executions per batch size between two reads of the statistics."""
    old, new = batch_counts(before), batch_counts(after)
    return {n: new[n] - old.get(n, 0) for n in sorted(new) if new[n] > old.get(n, 0)}


def _split(before: list[dict], after: list[dict]) -> dict[str, float]:
    """Mean ms per request in each part of the server during the test (empty if unread)."""
    if not before or not after:
        return {}
    old, new = server_time_ns(before), server_time_ns(after)
    requests = new["requests"] - old["requests"]
    return {part: (new[part] - old[part]) / requests / 1e6 for part in (*SERVER_PARTS, "request")} if requests > 0 else {}


def _judge(report: LoadReport, results, refs, tol, threshold: float) -> None:
    latencies = [ms for lat, _, _ in results for ms in lat]
    report.answered = len(latencies)
    report.errors += [e for _, _, errors in results for e in errors]
    verdicts = {}  # identical answers (most are) are judged once: comparing costs more than serving
    for _, outputs, _ in results if report.judged else []:
        for j, out in outputs:
            key = (j, hashlib.sha256(out.numpy().tobytes()).hexdigest())
            if key not in verdicts:
                verdicts[key] = compare(out, refs[j][0], tol, exact=refs[j][1], threshold=threshold).passed
            report.mismatched += not verdicts[key]
    report.distinct_answers = len(verdicts)
    if latencies:
        p50, p90, p99 = np.percentile(latencies, [50, 90, 99])
        report.latency_ms = {"mean": float(np.mean(latencies)), "p50": float(p50), "p90": float(p90), "p99": float(p99)}
