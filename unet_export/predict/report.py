"""The JSON report of a predict run (local or Ray): counts, speed, the runtime, every mask with
its sha256, and every failure with its reason."""

import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from unet_export.bench.stats import vm_hwm_mb
from unet_export.predict.stages import Outcome


def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM on Linux (ru_maxrss there starts from the
    parent's RSS: benchmarks/predict.py's 7 GB showed as predict's peak), else ru_maxrss
    (macOS reports bytes, the others KiB)."""
    own = vm_hwm_mb()
    if own is not None:
        return round(own, 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)


@dataclass
class Report:
    model: str
    runtime: str
    out: str
    batch_size: int
    workers: int
    engine: str = "local"  # local | ray
    # latency: one runtime call at a time (the Ray job's workers); throughput: the runner's stream of
    # batches (Runner.for_throughput, the local pipeline's default). setting: what the runtime ran
    # ("" when it did not run: every mask was already done, --resume).
    mode: str = "latency"
    setting: str = "one batch at a time"
    inputs: int = 0
    outcomes: list[Outcome] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0
    interrupted: bool = False
    extra: dict = field(default_factory=dict)  # the engine's own facts (Ray: nodes, address)
    positions: dict[str, int] = field(default_factory=dict)  # job.rel -> its place in the inputs

    def order(self, outcome: Outcome) -> int:
        return self.positions.get(outcome.job.rel, len(self.positions))

    def add(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)

    def finish(self) -> "Report":
        self.seconds = time.perf_counter() - self.started
        return self

    @property
    def written(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.sha256]

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.reason]

    @property
    def skipped(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.skipped]

    @property
    def images_per_s(self) -> float:
        return len(self.written) / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        out = Path(self.out)
        return {
            "model": self.model, "runtime": self.runtime, "engine": self.engine, "mode": self.mode,
            "setting": self.setting, "out": self.out,
            "batch_size": self.batch_size, "workers": self.workers, "inputs": self.inputs,
            "written": len(self.written), "skipped": len(self.skipped), "failed": len(self.failed),
            "not_run": self.inputs - len(self.outcomes), "interrupted": self.interrupted,
            "seconds": round(self.seconds, 3), "images_per_s": round(self.images_per_s, 2),
            "peak_rss_mb": peak_rss_mb(), **self.extra,
            "failures": [{"input": str(o.job.src), "reason": o.reason} for o in self.failed],
            "masks": [{"input": str(o.job.src), "mask": o.mask.relative_to(out).as_posix(), "sha256": o.sha256}
                      for o in sorted(self.written, key=self.order)],
        }  # fmt: skip
