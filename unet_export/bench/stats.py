"""What a benchmark row says: its status, its timing statistics, its speed-up and the run's exit
code. Pure functions over data, kept apart from the timing harness (bench/run.py) so the rules that
decide a row's verdict are small enough to test exhaustively (``make mutation``)."""

from dataclasses import asdict, dataclass, field

import numpy as np

CV_WARNING = 0.05  # trtexec warns when GPU time varies by more than a few percent
MODES = ("latency", "throughput", "both")  # latency: one batch at a time; throughput: a stream of them


@dataclass
class BenchConfig:
    batch: int = 8
    height: int = 256
    width: int = 256
    warmup: int = 3
    iters: int | None = None  # exact count; None: time for min_time seconds (min_iters..max_iters)
    min_time: float = 5.0
    min_iters: int = 5
    max_iters: int = 1000
    seed: int = 0


@dataclass
class Throughput:
    """A row's throughput-mode run: batches streamed as the runtime is fastest for a stream."""

    streams: int  # batches in flight
    setting: str  # what ran, e.g. "THROUGHPUT hint, 2 streams, 2 infer requests"
    img_per_s: float | None = None  # images over the wall time of the whole stream
    latency_ms: dict | None = None  # per batch, start to finish, under the load of the others
    iters: int = 0
    seconds: float = 0.0
    speedup_vs_eager: float | None = None  # over the eager row's throughput
    vs_latency: float | None = None  # over the same row's latency-mode img/s (--mode both)
    peak_mem_mb: float | None = None
    parity: dict | None = None  # the gate on the stream's output farthest from eager's


@dataclass
class Row:
    backend: str
    precision: str
    status: str  # ok | parity_failed | unavailable | error
    reason: str = ""
    runs_on: str = ""
    img_per_s: float | None = None
    latency_ms: dict | None = None
    cv: float | None = None
    speedup_vs_eager: float | None = None
    peak_mem_mb: float | None = None
    h2d_ms: float | None = None
    d2h_ms: float | None = None
    iters: int = 0
    parity: dict | None = None
    warnings: list[str] = field(default_factory=list)
    throughput: Throughput | None = None  # --mode throughput/both; the fields above are latency mode's

    def to_dict(self) -> dict:
        return asdict(self)


def latency_stats(latencies_ms: list[float], batch: int) -> dict:
    """mean/min/percentiles/max in ms per batch, coefficient of variation and images/s."""
    lat = np.asarray(latencies_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(lat, [50, 90, 99])
    mean = float(lat.mean())
    latency = {"mean": mean, "min": float(lat.min()), "p50": float(p50), "p90": float(p90),
               "p99": float(p99), "max": float(lat.max())}  # fmt: skip
    if not mean:  # a clock too coarse to resolve the call measured nothing: no rate, not a crash
        return {"latency_ms": latency, "cv": 0.0, "img_per_s": None}
    return {"latency_ms": latency, "cv": float(lat.std() / mean), "img_per_s": batch * 1000.0 / mean}


def more_iterations(done: int, elapsed: float, cfg: BenchConfig) -> bool:
    """Whether the timing loop goes on: an exact ``iters`` count, else at least ``min_iters``
    and then until ``min_time`` seconds have passed or ``max_iters`` were run."""
    if cfg.iters is not None:
        return done < cfg.iters
    return done < cfg.min_iters or (elapsed < cfg.min_time and done < cfg.max_iters)


def record_timing(row: Row, latencies_ms: list[float], batch: int) -> None:
    """Fill ``row``'s timing fields from its latencies, with a warning when they vary too much."""
    stats = latency_stats(latencies_ms, batch)
    row.img_per_s, row.latency_ms, row.cv, row.iters = stats["img_per_s"], stats["latency_ms"], stats["cv"], len(latencies_ms)
    if row.cv > CV_WARNING:
        row.warnings.append(f"latency varies by {row.cv:.1%} (CV > {CV_WARNING:.0%}): the machine may be busy")


def throughput_record(latencies_ms: list[float], seconds: float, batch: int, streams: int,
                      setting: str) -> Throughput:  # fmt: skip
    """Images/s over the wall time of the stream (batches overlap: not batch over mean latency),
    and the latency distribution under that load."""
    record = Throughput(streams, setting, latency_ms=latency_stats(latencies_ms, batch)["latency_ms"],
                        iters=len(latencies_ms), seconds=seconds)  # fmt: skip
    if seconds > 0:
        record.img_per_s = len(latencies_ms) * batch / seconds
    return record


def merge_verdict(row: Row, verdict: Row) -> None:
    """Fold the verdict on the throughput-mode outputs into ``row``'s: a failure of either fails
    the row, naming which mode failed; an unjudged batch is unjudged in both modes."""
    if verdict.status == "ok" or verdict.status == row.status == "not_judged":
        return
    if verdict.status == "not_judged":
        row.status, row.reason = verdict.status, verdict.reason
        return
    reason = f"throughput mode: {verdict.reason}"
    row.reason = f"{row.reason}; {reason}" if row.status == "parity_failed" else reason
    row.status = verdict.status


def parity_record(case) -> dict:
    """Errors against eager fp32 and against float64, next to eager fp32's own (the noise floor)."""
    return {"max_abs_err": case.max_abs_err, "mean_abs_err": case.mean_abs_err,
            "max_err_fp64": case.max_err_fp64, "mean_err_fp64": case.mean_err_fp64, "noise_floor": case.noise_floor,
            "allowed": case.atol, "argmax_disagreement": case.argmax_disagreement, "tie_pixels": case.tie_pixels,
            "dice_vs_eager": case.dice_vs_eager, "passed": case.passed}  # fmt: skip


def set_speedups(rows: list[Row]) -> None:
    """Each timed row's images/s over the eager row's (none when eager did not run), in each mode,
    and its throughput over its own latency-mode images/s."""
    base = next((r for r in rows if r.backend == "eager" and r.status == "ok"), None)
    for row in rows:
        if base and row.img_per_s:
            row.speedup_vs_eager = row.img_per_s / base.img_per_s
        fast = row.throughput
        if fast is None or not fast.img_per_s:
            continue
        if base and base.throughput and base.throughput.img_per_s:
            fast.speedup_vs_eager = fast.img_per_s / base.throughput.img_per_s
        if row.img_per_s:
            fast.vs_latency = fast.img_per_s / row.img_per_s


def exit_code(rows: list[Row], gate: bool = True) -> int:
    """1 if any row errored, or (with the gate on) failed parity; else 0."""
    if any(r.status == "error" for r in rows):
        return 1
    return 1 if gate and any(r.status == "parity_failed" for r in rows) else 0


def vm_hwm_mb() -> float | None:
    """This process's resident-memory high-water mark (Linux VmHWM), None where /proc has none.
    Unlike ru_maxrss it is this program's own: Linux carries ru_maxrss across fork and exec, so
    a child started by a 7 GB process reports at least 7 GB."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None
