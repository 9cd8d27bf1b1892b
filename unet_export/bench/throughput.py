"""Throughput mode's timing: the benchmark batch streamed through a runner set up for a stream
(Runner.for_throughput/stream: OpenVINO's THROUGHPUT hint and async infer queue, ONNX Runtime's
concurrent runs, torch's own threads), timed over the wall clock of the whole stream. Every output
is looked at; the one farthest from eager's is kept for the gate, so a runtime whose concurrent
runs disagree is judged on its worst."""

import itertools
import math
import time

import numpy as np
import torch

from unet_export.bench.stats import BenchConfig, more_iterations
from unet_export.runtimes import Runner


def time_stream(runner: Runner, x: torch.Tensor, reference: torch.Tensor,
                cfg: BenchConfig) -> tuple[list[float], float, torch.Tensor]:  # fmt: skip
    """Stream ``x`` through the active ``runner``: ``cfg.warmup`` untimed batches (at least one:
    compiling is not timed), then cfg's count or time. Returns the timed batches' latencies in ms,
    the seconds from the first one's start to the last one's end, and the output (warm-up ones
    included) farthest from ``reference``."""
    farthest = Farthest(reference.to(runner.device))
    for out, _ in runner.stream(itertools.repeat(x, max(cfg.warmup, 1))):
        farthest.see(out)
    latencies, started = [], time.perf_counter()

    def batches():
        for done in itertools.count():
            if not more_iterations(done, time.perf_counter() - started, cfg):
                return
            yield x

    for out, ms in runner.stream(batches()):
        latencies.append(ms)
        farthest.see(out)
    return latencies, time.perf_counter() - started, farthest.out


class Farthest:
    """The output farthest from ``reference`` (largest max |difference|; a wrong shape or a
    NaN/Inf is farthest of all), keeping only that one."""

    def __init__(self, reference: torch.Tensor):
        self.reference, self.out, self.distance = reference, None, -1.0

    def see(self, out: torch.Tensor) -> None:
        distance = self._distance(out)
        if distance > self.distance:
            self.out, self.distance = out, distance

    def _distance(self, out: torch.Tensor) -> float:
        if out.shape != self.reference.shape:
            return math.inf
        if out.device.type == "cpu":  # numpy's one thread: torch's OpenMP threads would spin on the stream's cores
            distance = float(np.abs(out.float().numpy() - self.reference.numpy()).max())
        else:
            distance = float((out.float() - self.reference).abs().max())
        return distance if math.isfinite(distance) else math.inf
