"""The rules that decide what a benchmark row says (unet_export/bench/stats.py), pinned value by
value: these are the modules `make mutation` mutates."""

import io
from types import SimpleNamespace

import numpy as np
import pytest

from unet_export.bench.stats import (
    CV_WARNING,
    BenchConfig,
    Row,
    exit_code,
    latency_stats,
    more_iterations,
    parity_record,
    record_timing,
    set_speedups,
    vm_hwm_mb,
)
from unet_export.bench import stats


def test_latency_stats_values():
    stats = latency_stats([10.0, 20.0, 30.0, 40.0], batch=4)
    lat = stats["latency_ms"]
    assert lat == {"mean": 25.0, "min": 10.0, "p50": 25.0, "p90": pytest.approx(37.0), "p99": pytest.approx(39.7),
                   "max": 40.0}  # fmt: skip
    assert stats["cv"] == pytest.approx(np.std([10, 20, 30, 40]) / 25.0)
    assert stats["img_per_s"] == pytest.approx(4 * 1000.0 / 25.0)


def test_latency_stats_of_one_constant_sample():
    stats = latency_stats([5.0], batch=1)
    assert stats["cv"] == 0.0 and stats["img_per_s"] == 200.0 and set(stats["latency_ms"].values()) == {5.0}


def test_latency_stats_of_a_clock_that_resolved_nothing_has_no_rate():
    stats = latency_stats([0.0, 0.0], batch=2)
    assert stats["cv"] == 0.0 and stats["img_per_s"] is None and stats["latency_ms"]["max"] == 0.0


@pytest.mark.parametrize("done, elapsed, more", [(0, 0.0, True), (2, 99.0, True), (3, 0.0, False), (4, 0.0, False)])
def test_exact_iteration_count_ignores_time(done, elapsed, more):
    assert more_iterations(done, elapsed, BenchConfig(iters=3, min_time=50.0)) is more


@pytest.mark.parametrize(
    "done, elapsed, more",
    [
        (0, 100.0, True),  # fewer than min_iters: always on, however long it took
        (4, 100.0, True),
        (5, 100.0, False),  # min_iters reached and min_time passed
        (5, 1.9, True),  # min_time not yet passed
        (5, 2.0, False),  # exactly min_time: done
        (9, 1.0, True),
        (10, 1.0, False),  # max_iters reached before min_time
    ],
)
def test_timed_mode_runs_min_iters_then_until_min_time_or_max_iters(done, elapsed, more):
    cfg = BenchConfig(iters=None, min_time=2.0, min_iters=5, max_iters=10)
    assert more_iterations(done, elapsed, cfg) is more


def test_bench_config_defaults():
    cfg = BenchConfig()
    assert (cfg.batch, cfg.height, cfg.width, cfg.warmup, cfg.iters) == (8, 256, 256, 3, None)
    assert (cfg.min_time, cfg.min_iters, cfg.max_iters, cfg.seed) == (5.0, 5, 1000, 0)


def test_record_timing_fills_the_row_and_warns_only_above_the_cv_limit():
    steady = Row("eager", "fp32", "ok")
    record_timing(steady, [10.0, 10.0, 10.0], batch=2)
    assert steady.img_per_s == 200.0 and steady.iters == 3 and steady.cv == 0.0 and steady.latency_ms["p50"] == 10.0
    assert steady.warnings == []
    noisy = Row("eager", "fp32", "ok")
    record_timing(noisy, [10.0, 20.0], batch=2)
    assert noisy.cv == pytest.approx(1 / 3) and noisy.iters == 2
    assert noisy.warnings == ["latency varies by 33.3% (CV > 5%): the machine may be busy"]


def test_cv_exactly_at_the_limit_does_not_warn():
    row = Row("eager", "fp32", "ok")
    spread = CV_WARNING * 10.0  # mean 10, population std = spread
    record_timing(row, [10.0 - spread, 10.0 + spread], batch=1)
    assert row.cv == pytest.approx(CV_WARNING) and row.cv <= CV_WARNING and row.warnings == []
    assert CV_WARNING == 0.05


def test_parity_record_copies_every_statistic():
    case = SimpleNamespace(max_abs_err=1.0, mean_abs_err=2.0, max_err_fp64=3.0, mean_err_fp64=4.0, noise_floor=5.0,
                           atol=6.0, argmax_disagreement=7.0, tie_pixels=8, dice_vs_eager=9.0, passed=False)  # fmt: skip
    assert parity_record(case) == {"max_abs_err": 1.0, "mean_abs_err": 2.0, "max_err_fp64": 3.0, "mean_err_fp64": 4.0,
                                   "noise_floor": 5.0, "allowed": 6.0, "argmax_disagreement": 7.0, "tie_pixels": 8,
                                   "dice_vs_eager": 9.0, "passed": False}  # fmt: skip


def _row(backend, status="ok", img_per_s=None):
    return Row(backend, "fp32", status, img_per_s=img_per_s)


def test_speedups_are_relative_to_the_eager_row_that_ran():
    rows = [_row("onnxruntime", img_per_s=30.0), _row("eager", img_per_s=10.0), _row("openvino", "parity_failed", 5.0),
            _row("tensorrt", "unavailable")]  # fmt: skip
    set_speedups(rows)
    assert [r.speedup_vs_eager for r in rows] == [3.0, 1.0, 0.5, None]


def test_no_speedups_without_an_eager_row_that_ran():
    rows = [_row("eager", "error", img_per_s=None), _row("onnxruntime", img_per_s=30.0)]
    set_speedups(rows)
    assert [r.speedup_vs_eager for r in rows] == [None, None]
    failed = [_row("eager", "parity_failed", img_per_s=10.0), _row("onnxruntime", img_per_s=30.0)]
    set_speedups(failed)
    assert [r.speedup_vs_eager for r in failed] == [None, None]


@pytest.mark.parametrize(
    "statuses, gate, code",
    [
        (["ok", "ok"], True, 0),
        (["ok", "unavailable"], True, 0),  # a runtime that is not installed is not a failure
        (["ok", "parity_failed"], True, 1),
        (["ok", "parity_failed"], False, 0),  # --no-gate: parity failures are reported, not fatal
        (["ok", "error"], True, 1),
        (["ok", "error"], False, 1),  # a crash fails the run even without the gate
        (["error", "parity_failed"], False, 1),
        ([], True, 0),
    ],
)
def test_exit_code(statuses, gate, code):
    assert exit_code([_row(f"b{i}", s) for i, s in enumerate(statuses)], gate) == code


def test_exit_code_gates_by_default():
    assert exit_code([_row("eager"), _row("onnxruntime", "parity_failed")]) == 1


def test_row_to_dict_has_every_field():
    row = Row("eager", "fp32", "ok", reason="r", iters=3, warnings=["w"])
    d = row.to_dict()
    assert d["backend"] == "eager" and d["precision"] == "fp32" and d["status"] == "ok" and d["reason"] == "r"
    assert d["iters"] == 3 and d["warnings"] == ["w"] and d["peak_mem_mb"] is None and len(d) == 16
    assert d["throughput"] is None  # latency mode, the default
    row.throughput = stats.Throughput(2, "2 streams", img_per_s=5.0)
    fast = row.to_dict()["throughput"]
    assert fast["streams"] == 2 and fast["setting"] == "2 streams" and fast["img_per_s"] == 5.0 and len(fast) == 10


# --- throughput mode ------------------------------------------------------------------------------


def test_throughput_is_images_over_the_streams_wall_time_not_over_mean_latency():
    """Two streams: 4 batches of 2 images, each 100 ms, overlapping in 0.2 s: 40 img/s, where
    batch / mean latency would say 20."""
    record = stats.throughput_record([100.0, 100.0, 100.0, 100.0], 0.2, batch=2, streams=2, setting="s")
    assert record.img_per_s == pytest.approx(40.0) and record.iters == 4 and record.seconds == 0.2
    assert record.streams == 2 and record.setting == "s"
    assert record.latency_ms == {"mean": 100.0, "min": 100.0, "p50": 100.0, "p90": 100.0, "p99": 100.0, "max": 100.0}
    assert stats.throughput_record([1.0], 0.0, 1, 1, "s").img_per_s is None  # nothing resolved: no rate


def _verdict(status, reason=""):
    return Row("openvino", "fp32", status, reason=reason)


@pytest.mark.parametrize(
    "before, verdict, after",
    [
        (("ok", ""), ("ok", ""), ("ok", "")),
        (("parity_failed", "a"), ("ok", ""), ("parity_failed", "a")),
        (("ok", ""), ("parity_failed", "b"), ("parity_failed", "throughput mode: b")),
        (("parity_failed", "a"), ("parity_failed", "b"), ("parity_failed", "a; throughput mode: b")),
        (("not_judged", "n"), ("not_judged", "n"), ("not_judged", "n")),
        (("ok", ""), ("not_judged", "n"), ("not_judged", "n")),  # --mode throughput: no latency verdict
        (("not_judged", "n"), ("parity_failed", "NaN"), ("parity_failed", "throughput mode: NaN")),
    ],
)
def test_throughput_verdict_folds_into_the_row(before, verdict, after):
    row = _verdict(*before)
    stats.merge_verdict(row, _verdict(*verdict))
    assert (row.status, row.reason) == after


def _fast(backend, status="ok", img_per_s=10.0, streamed=None):
    row = _row(backend, status, img_per_s)
    row.throughput = None if streamed is False else stats.Throughput(1, "", img_per_s=streamed)
    return row


def test_throughput_speedups_are_relative_to_eagers_throughput_and_to_the_rows_latency():
    rows = [_fast("eager", img_per_s=10.0, streamed=8.0), _fast("openvino", img_per_s=20.0, streamed=32.0),
            _fast("onnxruntime", img_per_s=None, streamed=16.0), _fast("aoti", streamed=None),
            _fast("torchscript", streamed=False)]  # fmt: skip
    set_speedups(rows)
    assert [r.throughput and r.throughput.speedup_vs_eager for r in rows] == [1.0, 4.0, 2.0, None, None]
    assert [r.throughput and r.throughput.vs_latency for r in rows] == [0.8, 1.6, None, None, None]
    assert [r.speedup_vs_eager for r in rows] == [1.0, 2.0, None, 1.0, 1.0]


def test_no_throughput_speedups_without_an_eager_stream():
    rows = [_fast("eager", streamed=False), _fast("openvino", img_per_s=20.0, streamed=30.0)]
    set_speedups(rows)
    assert rows[1].throughput.speedup_vs_eager is None and rows[1].throughput.vs_latency == 1.5
    rows = [_fast("eager", streamed=None), _fast("openvino", img_per_s=20.0, streamed=30.0)]
    set_speedups(rows)
    assert rows[1].throughput.speedup_vs_eager is None


def _vm_hwm_kb() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))


def test_vm_hwm_mb_is_this_process_high_water_mark_in_mb():
    """The kB figure Linux reports, in MB (2**10 kB), read between two independent reads of it."""
    before = _vm_hwm_kb()
    mb = vm_hwm_mb()
    after = _vm_hwm_kb()
    assert (mb * 1024).is_integer() and before <= mb * 1024 <= after
    assert 1 < mb < 1024 * 1024  # a Python process: more than 1 MB, less than 1 TB


@pytest.mark.parametrize(
    "status, mb",
    [
        ("Name:\tpython\nVmPeak:\t  900000 kB\nVmHWM:\t    2560 kB\nVmRSS:\t    1024 kB\n", 2.5),
        ("VmHWM:\t7340032 kB\n", 7168.0),
        ("Name:\tpython\nvmhwm:\t2048 kB\nVMHWM:\t2048 kB\nVmRSS:\t2048 kB\n", None),  # no VmHWM line
        ("", None),
    ],
)
def test_vm_hwm_mb_reads_the_vmhwm_line_of_proc_self_status(monkeypatch, status, mb):
    opened = []
    monkeypatch.setattr(stats, "open", lambda path: (opened.append(path), io.StringIO(status))[1], raising=False)
    assert vm_hwm_mb() == mb
    assert opened == ["/proc/self/status"]


def test_vm_hwm_mb_is_none_where_proc_has_no_status(monkeypatch):
    def no_proc(path):
        raise FileNotFoundError(2, "No such file or directory", path)

    monkeypatch.setattr(stats, "open", no_proc, raising=False)
    assert vm_hwm_mb() is None
