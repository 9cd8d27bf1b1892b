"""predict's throughput mode chooses the runtime's setting by measuring it on the run's own first
calls, as `unet-bench --mode throughput` measures it on its batch (bench/run.py _throughput_into):
which of ONNX Runtime's settings pays depends on the model and the image size (demo model, 2
cores: concurrent runs 1.63x one run at a time at 128x128, 0.86x at 640x960). Nothing runs twice:
the first calls of the stream are the probe, and their outputs come back in order as any other's."""

import itertools
from time import perf_counter
from typing import Iterable, Iterator

import torch

from unet_export.runtimes import Runner


class ThroughputProbe:
    """Sets ``runner`` up (before activate()) for its first throughput setting; stream() runs the
    first calls under each setting of runner.throughput_choices() in turn, then the rest under the
    fastest. A runtime with one setting (OpenVINO, torch, GPU providers) streams as it is."""

    def __init__(self, runner: Runner):
        self.runner, self.choices = runner, runner.throughput_choices()
        runner.for_throughput(self.choices[0])
        # Timed calls per setting: two rounds of the widest setting's concurrent runs (at least 4),
        # so each setting is timed with its calls in flight, and the probe stays a few calls long.
        self.timed = 2 * max(2, *(choice or 1 for choice in self.choices))
        self.ran: list[str] = []  # each setting as its first call ran
        self.measured: list[tuple[int | None, str, float]] = []  # (choice, setting, img/s), each timed in full
        self.calls = self.images = 0  # the probe's calls and their images (a tile or an envelope's part counts as one)

    def stream(self, calls: Iterable[torch.Tensor]) -> Iterator[tuple[torch.Tensor, float]]:
        """runner.stream(calls) with the setting chosen on the way: each output in the calls' order."""
        calls = iter(calls)
        if len(self.choices) > 1:
            for i, choice in enumerate(self.choices):
                if (calls := _more(calls)) is None:
                    return  # too few calls: the settings not reached are never built
                if i:
                    self._switch(choice)
                yield from self._measure(choice, calls)
            if len(self.measured) < len(self.choices) or (calls := _more(calls)) is None:
                return
            fastest = max(self.measured, key=lambda m: m[2])[0]
            if fastest != self.choices[-1]:
                self._switch(fastest)
        yield from self.runner.stream(calls)

    def _measure(self, choice, calls: Iterator[torch.Tensor]) -> Iterator[tuple[torch.Tensor, float]]:
        """One setting's share of the probe: a first call alone, untimed (a fresh session's first
        run sets up its memory and is slower), then ``self.timed`` calls streamed, their images/s
        over the wall clock from the first one's start to the last one's end, as the bench times a
        stream (bench/throughput.py time_stream). The clock runs on while the caller writes masks:
        what is timed is what predict gets from each setting, the decode and write threads along."""
        self.ran.append(self.runner.throughput_setting())
        yield from self.runner.stream(self._counted(itertools.islice(calls, 1)))
        calls_before, images_before, started = self.calls, self.images, perf_counter()
        yield from self.runner.stream(self._counted(itertools.islice(calls, self.timed)))
        seconds = perf_counter() - started
        if self.calls - calls_before == self.timed:  # a stream that ended first measured too little to compare
            rate = (self.images - images_before) / max(seconds, 1e-9)
            self.measured.append((choice, self.runner.throughput_setting(), rate))

    def _counted(self, calls: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        for x in calls:
            self.calls, self.images = self.calls + 1, self.images + x.shape[0]
            yield x

    def _switch(self, choice) -> None:
        """Another setting: for_throughput() takes effect when the session is built (activate)."""
        self.runner.deactivate()
        self.runner.for_throughput(choice)
        self.runner.activate()

    def setting(self) -> str:
        """What ran, for the report: the setting kept and what the other measured, in the bench's
        words; a stream too short to measure every setting says so, naming each setting that ran."""
        if len(self.choices) == 1:
            return self.runner.throughput_setting()
        if len(self.measured) < len(self.choices):
            ran = ", then ".join(self.ran) or self.runner.throughput_setting()
            return f"{ran} (not measured: {self.images} image(s), too few to compare settings)"
        _, kept, rate = max(self.measured, key=lambda m: m[2])
        others = "; ".join(f"{setting}: {other:.1f} img/s" for _, setting, other in self.measured if setting != kept)
        return f"{kept} (measured on the first {self.images} images: {rate:.1f} img/s, faster than {others})"


def _more(calls: Iterator[torch.Tensor]) -> Iterator[torch.Tensor] | None:
    """``calls`` as it was, or None when it has no call left (looked at before building a setting)."""
    first = next(calls, None)
    return None if first is None else itertools.chain([first], calls)
