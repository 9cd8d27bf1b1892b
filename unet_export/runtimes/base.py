"""The one interface every runtime implements; parity checks and benchmarks both use it.

A template in the manner of Polygraphy's runners: the public methods do the state checks
once, each runtime writes only ``_activate_impl`` / ``_infer_impl`` / ``_deactivate_impl``.
Construction is cheap (paths and options only); loading and building happen in activate().

Two ways to run: infer(), one batch at a time (what latency is measured on), and stream(), a
stream of batches run the way the runtime is fastest for one, set up by for_throughput() (what
throughput is measured on, and what batch work can use).
"""

import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

import torch


def torch_stream(device: torch.device) -> str:
    """The throughput setting of a torch runtime: one batch at a time on torch's own intra-op
    threads, which already take every core (or on the GPU)."""
    if device.type == "cpu":
        return f"1 stream, torch's own {torch.get_num_threads()} intra-op thread(s)"
    return "1 stream"


class Runner:
    name = "runner"

    def __init__(self, device: str | torch.device = "cpu", precision: str = "fp32"):
        self.device = torch.device(device)
        self.precision = precision
        self.is_active = False
        # Set before activate() when other threads need the CPU alongside (predict's decode and
        # write stages): a runtime that would spin-wait between calls yields instead.
        self.shares_cpu = False
        # Batches stream() runs at once; for_throughput() sets what the runtime runs best at.
        self.streams = 1

    def activate(self) -> "Runner":
        if not self.is_active:
            self._activate_impl()
            self.is_active = True
        return self

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 NCHW batch in, float32 logits out, both on ``self.device``."""
        if not self.is_active:
            raise RuntimeError(f"{self.name}: call activate() (or use a with-block) before infer()")
        return self._infer_impl(x.to(self.device, non_blocking=True))

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate_impl()
            self.is_active = False

    def synchronize(self) -> None:
        """Wait for queued device work, so a timer around infer() measures all of it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def for_throughput(self, streams: int | None = None) -> "Runner":
        """Set up, before activate(), for a stream of batches rather than one request at a time;
        ``streams``: one of throughput_choices() (None: the runtime's default). A runtime without
        a setting of its own keeps one stream (torch: its own intra-op threads)."""
        if self.is_active:
            raise RuntimeError(f"{self.name}: for_throughput() before activate(), not after")
        return self

    def throughput_choices(self) -> list[int | None]:
        """The settings for_throughput() can take where which one pays depends on the model and
        the shape, for a benchmark to measure each (None: the runtime's own, one setting)."""
        return [None]

    def throughput_setting(self) -> str:
        """What stream() runs, as reports show it."""
        return f"{self.streams} stream{'s' if self.streams > 1 else ''}, one batch each"

    def stream(self, batches: Iterable[torch.Tensor]) -> Iterator[tuple[torch.Tensor, float]]:
        """Each batch's output, in the batches' order, with its latency in ms (start to finish,
        under the load of the others in flight). ``self.streams`` batches run at once, each an
        infer() on its own thread (for runtimes that release the GIL while they compute)."""
        if self.streams == 1:
            yield from map(self._timed, batches)
            return
        with ThreadPoolExecutor(self.streams) as pool:
            running = deque()
            for x in batches:
                if len(running) == self.streams:
                    yield running.popleft().result()
                running.append(pool.submit(self._timed, x))
            while running:
                yield running.popleft().result()

    def _timed(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        started = time.perf_counter()
        out = self.infer(x)
        self.synchronize()
        return out, (time.perf_counter() - started) * 1000.0

    def describe(self) -> str:
        """Where it runs, as shown in reports (e.g. the ONNX Runtime provider actually used)."""
        return str(self.device)

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def _activate_impl(self) -> None:
        raise NotImplementedError

    def _infer_impl(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _deactivate_impl(self) -> None:
        """Drop what activate() loaded; most runtimes need nothing more."""
