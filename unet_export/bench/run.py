"""Timing harness over runners: every row is parity-checked on the benchmark batch against the
eager model (fp32, and float64 as the exact answer: the export gate's rule), then warmed up and
timed. Results are data; the CLI renders them.

CPU: perf_counter around infer(). CUDA: CUDA events around infer() with the input already on
the device; host-to-device and device-to-host copies are timed on their own (as trtexec does).
That is latency mode; throughput mode (--mode throughput|both) streams the batch through the
runner set up for a stream instead (bench/throughput.py), its outputs gated the same way.
"""

import functools
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from unet_export.bench.backends import BackendContext, BACKENDS, CUDA_ROWS, Unavailable, row_entry
from unet_export.bench.stats import (  # noqa: F401 (CV_WARNING, exit_code, latency_stats: the bench API)
    CV_WARNING,
    MODES,
    BenchConfig,
    Row,
    exit_code,
    latency_stats,
    merge_verdict,
    more_iterations,
    parity_record,
    record_timing,
    set_speedups,
    throughput_record,
    vm_hwm_mb,
)
from unet_export.bench.throughput import time_stream
from unet_export.checkpoint import build_model
from unet_export.data.dataset import image_to_tensor, Preprocess
from unet_export.data.images import load_image
from unet_export.device import device_info, resolve_device
from unet_export.errors import IntegrityError, UserError
from unet_export.models import get_spec, mask_threshold
from unet_export.parity import envelope
from unet_export.parity.gate import TOLERANCES, Tolerance, compare, exact_runner, tolerance_for
from unet_export.parity.realimages import image_paths, judged_on_images_only, not_judged, place, real_images_for  # noqa: F401
from unet_export.runtimes import EagerRunner, Runner
from unet_export.workdir.lookup import manifest_checkpoint
from unet_export.workdir.manifest import checked_path, load_manifest, tool_versions


def time_infer(runner: Runner, x: torch.Tensor, cfg: BenchConfig) -> list[float]:
    """Per-iteration latencies in ms, after ``cfg.warmup`` untimed calls."""
    for _ in range(cfg.warmup):
        runner.infer(x)
    runner.synchronize()
    cuda = runner.device.type == "cuda"
    latencies, started = [], time.perf_counter()
    while more_iterations(len(latencies), time.perf_counter() - started, cfg):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            runner.infer(x)
            end.record()
            end.synchronize()
            latencies.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            runner.infer(x)
            runner.synchronize()
            latencies.append((time.perf_counter() - t0) * 1000.0)
    return latencies


def copy_times_ms(x: torch.Tensor, out: torch.Tensor, device: torch.device) -> tuple[float, float]:
    """Host-to-device time of the input batch and device-to-host time of the output (pinned)."""
    host_in, host_out = x.cpu().pin_memory(), torch.empty(out.shape, dtype=out.dtype).pin_memory()
    on_device = torch.empty_like(host_in, device=device)
    times = []
    for dst, src in ((on_device, host_in), (host_out, out)):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return times[0], times[1]


class PeakMemory:
    """Peak memory of one row: CUDA max allocated (torch's allocator only), else process RSS
    high-water mark, reset through /proc/self/clear_refs where Linux allows it."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")  # resets VmHWM to the current RSS
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        self.mb = torch.cuda.max_memory_allocated() / 2**20 if self.cuda else vm_hwm_mb()


def bench_row(name: str, make: Callable[[], Runner], x: torch.Tensor, reference: torch.Tensor, cfg: BenchConfig, *,
              exact: torch.Tensor | None = None, tolerances: dict[str, Tolerance] | None = None,
              no_images: str = "", threshold: float = 0.0, mode: str = "latency") -> Row:  # fmt: skip
    """Build, parity-check and time one runtime; every outcome is a row, nothing raises. ``exact``:
    the eager model's float64 logits on ``x``; ``tolerances``: the gate per precision; ``no_images``:
    why ``x`` is not real images ("" when it is): FP16/BF16/INT8 rows are then timed, not judged.
    ``threshold``: where the model's one-class output turns into class 1 (models.mask_threshold).
    ``mode``: latency (one batch at a time), throughput (a stream, Runner.for_throughput) or both,
    each mode's outputs gated alike."""
    try:
        runner = make()
    except IntegrityError:
        raise  # a missing or changed artefact is an error for the whole run, not an empty row
    except (Unavailable, UserError) as exc:
        return Row(name, "-", "unavailable", reason=str(exc))
    row = Row(name, runner.precision, "ok", runs_on=runner.describe())
    judge = functools.partial(_judge_row, reference=reference, tol=(tolerances or TOLERANCES)[runner.precision],
                              exact=exact, no_images=no_images, threshold=threshold)  # fmt: skip
    try:
        if mode != "throughput":
            _latency_into(row, runner, x, judge, cfg)
        if mode != "latency":
            _throughput_into(row, runner, x, reference, judge, cfg)
    except IntegrityError:
        raise  # found when the runtime opened it (ONNX data outside the model's folder): as above
    except (Unavailable, UserError) as exc:
        return Row(name, runner.precision, "unavailable", reason=str(exc))
    except Exception as exc:  # a runtime that crashes is reported, never stops the run
        row.status, row.reason = "error", f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    return row


def _latency_into(row: Row, runner: Runner, x: torch.Tensor, judge: Callable, cfg: BenchConfig) -> None:
    """Latency mode: one batch at a time, gated on the first output, then timed call by call."""
    with PeakMemory(runner.device) as memory, runner:
        row.runs_on = runner.describe()
        x_dev = x.to(runner.device)
        out = runner.infer(x_dev)
        judge(row, out)
        _time_into(row, runner, x_dev, out, cfg)
    row.peak_mem_mb = memory.mb


def _throughput_into(row: Row, runner: Runner, x: torch.Tensor, reference: torch.Tensor, judge: Callable,
                     cfg: BenchConfig) -> None:  # fmt: skip
    """Throughput mode: the batch streamed (bench/throughput.py) in each setting the runtime
    offers (Runner.throughput_choices: ONNX Runtime's concurrent runs or one run on every core,
    whichever pays at this shape), the fastest kept as the row's and the others named in its
    setting. Each setting's farthest output is gated as latency mode's first one is; every
    verdict folds into the row's."""
    records = []
    for choice in runner.throughput_choices():
        verdict = Row(row.backend, row.precision, "ok")
        with PeakMemory(runner.device) as memory, runner.for_throughput(choice):
            row.runs_on = runner.describe()
            latencies, seconds, farthest = time_stream(runner, x.to(runner.device), reference, cfg)
            judge(verdict, farthest)
            record = throughput_record(latencies, seconds, x.shape[0], runner.streams, runner.throughput_setting())
        record.peak_mem_mb, record.parity = memory.mb, verdict.parity
        merge_verdict(row, verdict)
        records.append(record)
    row.throughput = max(records, key=lambda r: r.img_per_s or 0.0)
    others = [f"{r.setting}: {r.img_per_s or 0:.2f} img/s" for r in records if r is not row.throughput]
    if others:
        row.throughput.setting += f" (faster than {'; '.join(others)})"


def _judge_row(row: Row, out: torch.Tensor, *, reference: torch.Tensor, tol: Tolerance, exact, no_images: str,
               threshold: float) -> None:  # fmt: skip
    """The parity verdict of a row. On noise a reduced-precision row is not judged (class changes
    there say nothing), but a wrong shape or NaN/Inf says something on any input."""
    if no_images and judged_on_images_only(row.precision):
        if out.shape == reference.shape and bool(torch.isfinite(out.float()).all()):
            row.status, row.reason = "not_judged", not_judged(row.precision, no_images)
            return
    case = compare(out, reference, tol, exact=exact, threshold=threshold)
    row.parity = parity_record(case)
    if not case.passed:
        row.status, row.reason = "parity_failed", "; ".join(case.failures)


def _time_into(row: Row, runner: Runner, x: torch.Tensor, out: torch.Tensor, cfg: BenchConfig) -> None:
    record_timing(row, time_infer(runner, x, cfg), x.shape[0])
    if runner.device.type == "cuda":
        row.h2d_ms, row.d2h_ms = copy_times_ms(x, out, runner.device)


def bench_batch(cfg: BenchConfig, channels: int, images: list[Path] | None = None,
                preprocess: dict | None = None) -> torch.Tensor:  # fmt: skip
    """The real ``images`` (cycled to fill the batch, resized to the bench size), with the model's
    pixel normalisation (an smp encoder's mean/std: reduced precision is judged on what the model
    sees in use, not raw pixels), else seeded noise, on which only FP32 rows are judged."""
    if not images:
        gen = torch.Generator().manual_seed(cfg.seed)
        return torch.rand(cfg.batch, channels, cfg.height, cfg.width, generator=gen)
    record = Preprocess.from_dict(preprocess)  # the bench sets the size itself: only the pixel values
    pixels = Preprocess(mean=record.mean, std=record.std, bgr=record.bgr)
    tensors = [image_to_tensor(load_image(images[i % len(images)]), pixels) for i in range(cfg.batch)]
    if any(img.shape[0] != channels for img in tensors):
        raise UserError(f"images in {images[0].parent} do not have the model's {channels} channel(s)")
    return torch.stack([_sized(img, cfg.height, cfg.width) for img in tensors])


def _sized(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """An image at the bench size: mirror-padded up where it is smaller on both sides (as predict
    pads it: the scale it was trained at), else resized."""
    if img.shape[-2] <= height and img.shape[-1] <= width:
        return place(img[None], height, width)[0]
    return F.interpolate(img[None], (height, width), mode="bilinear")[0]


def run_benchmark(makers: dict[str, Callable[[], Runner]], reference_runner: Runner, cfg: BenchConfig,
                  x: torch.Tensor, on_row: Callable[[Row], None] | None = None, *,
                  tolerances: dict[str, Tolerance] | None = None, no_images: str = "",
                  threshold: float = 0.0, mode: str = "latency") -> list[Row]:  # fmt: skip
    """Bench every runner in ``makers`` (the first, "eager", is the baseline) on the batch ``x``,
    each gated against the reference's output and its float64 run (when it is an eager model);
    ``no_images``: why ``x`` is not real images, "" when it is; ``threshold``, ``mode``: see bench_row."""
    with reference_runner:
        reference = reference_runner.infer(x.to(reference_runner.device)).cpu()
    exact = None
    if (twin := exact_runner(reference_runner)) is not None:
        with twin:  # float64 on the CPU: once per run, released before anything is timed
            exact = twin.infer(x)
    rows = []
    for name, make in makers.items():
        rows.append(bench_row(name, make, x, reference, cfg, exact=exact, tolerances=tolerances, no_images=no_images,
                              threshold=threshold, mode=mode))  # fmt: skip
        if on_row:
            on_row(rows[-1])
    set_speedups(rows)
    return rows


@dataclass
class BenchReport:
    device: dict
    versions: dict
    config: dict
    rows: list

    def to_dict(self) -> dict:
        return {"device": self.device, "versions": self.versions, "config": self.config,
                "results": [row.to_dict() for row in self.rows]}  # fmt: skip


def benchmark(
    workdir: str | Path = "exports",
    *,
    batch: int = 8,
    height: int | None = None,
    width: int | None = None,
    backends: list[str] | None = None,
    device: str = "auto",
    weights: str | Path | None = None,
    compile_mode: str = "default",
    data: str | Path | None = None,
    on_row=None,
    rtol: float | None = None,
    atol: float | None = None,
    max_class_change: float | None = None,
    min_dice: float | None = None,
    model=None,
    mode: str = "latency",
    emulated: bool | None = None,
    **timing,
) -> BenchReport:
    """Parity-gate and time every backend on the workdir's model; ``timing`` goes to BenchConfig.
    ``rtol``/``atol`` replace the FP32 gate's, ``max_class_change``/``min_dice`` the reduced-precision ones.
    ``model`` rebuilds a factory's (--model-factory) or an in-memory module's eager model.
    ``mode``: latency, throughput or both (bench_row). ``emulated``: time rows this CPU only
    emulates (eager-bf16 without native bf16); default: only when ``backends`` names them."""
    check_mode(mode)
    workdir = Path(workdir)
    manifest = load_manifest(workdir)
    if manifest.get("model") is None:
        raise UserError(f"no manifest with a model in {workdir}: run `unet-export onnx WEIGHTS --workdir {workdir}` first")
    for entry in manifest["artifacts"]:  # every file's bytes before minutes of timing: a changed one stops here
        checked_path(workdir, entry)
    ckpt = manifest_checkpoint(manifest, weights, model)
    # Reduced precision is judged on real images only: --data, else the held-out images the
    # manifest records; on seeded noise its rows are timed but not judged.
    images, source, why = real_images_for(manifest, None, data, IMAGES_PER_RUN)
    sizes = get_spec(ckpt.architecture).sizes(ckpt.config)
    given_size = height is not None or width is not None
    height, width = _bench_size(manifest, height, width, images, sizes)
    sizes.check(height, width)
    if batch < 1:
        raise UserError(f"--batch must be at least 1, got {batch}")
    for option, least in (("iters", 1), ("warmup", 0), ("min_time", 0)):
        if timing.get(option) is not None and timing[option] < least:
            raise UserError(f"--{option.replace('_', '-')} must be at least {least}, got {timing[option]}")
    names = backend_names(backends)
    channels = ckpt.config.get("n_channels", 3)
    dev = resolve_device(device)
    if not given_size:  # images smaller than what was proven run padded up to it, as predict runs them
        height, width = padded_up(manifest, names, dev, sizes, height, width)
    check_envelopes(manifest, names, (batch, channels, height, width), dev)
    limits = dict(rtol=rtol, atol=atol, max_class_change=max_class_change, min_dice=min_dice)
    tolerances = {precision: tolerance_for(precision, **limits) for precision in TOLERANCES}
    net = build_model(ckpt)
    cfg = BenchConfig(batch=batch, height=height, width=width, **timing)
    emulated = backends is not None if emulated is None else emulated
    ctx = BackendContext(net, workdir, manifest, dev, (batch, channels, height, width), compile_mode, emulated)
    makers = {name: functools.partial(BACKENDS[name], ctx) for name in names}
    rows = run_benchmark(makers, EagerRunner(net, dev), cfg, bench_batch(cfg, channels, images, manifest["model"].get("preprocess")), on_row,
                         tolerances=tolerances, no_images=why, threshold=mask_threshold(ckpt.config), mode=mode)  # fmt: skip
    config = asdict(cfg) | {"mode": mode, "backends": names, "compile_mode": compile_mode, "workdir": str(workdir),
                            "inputs": source if images else f"{NOISE_NOTE} ({why})", "model": manifest["model"],
                            "tolerances": {p: t.to_dict() for p, t in tolerances.items()}}  # fmt: skip
    return BenchReport(device_info(dev), tool_versions("torch", "onnx", "onnxruntime", "openvino", "unet-export"), config, rows)


NOISE_NOTE = "seeded noise: FP32 rows judged, FP16/BF16/INT8 rows timed but not judged (pass --data DIR)"
IMAGES_PER_RUN = 64  # images cycled into the benchmark batch: more than any batch needs to differ


def _bench_size(manifest: dict, height, width, images=None, sizes=None) -> tuple[int, int]:
    """--height/--width; else, with images, their own size (when the model takes it); else the
    export's. Images rescaled away from their own scale are not the images the model was trained
    on: the demo model's OpenVINO bf16 run changes 0.100% of pixels on its 128x128 validation
    images upscaled to 256x256 and 0.002% at 128x128, where it was trained."""
    native = _image_size(images[0]) if images else None
    if native and sizes is not None:
        try:
            sizes.check(height or native[0], width or native[1])
        except UserError:
            native = None  # e.g. the unpadded U-Net takes only some sizes: fall back to the export's
    exported = [a["export_size"] for a in manifest["artifacts"] if "export_size" in a]
    default = native or (exported[0] if exported else (256, 256))
    return height or default[0], width or default[1]


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image."""
    width, height = load_image(path).size
    return height, width


def row_envelopes(manifest: dict, names: list[str], device):
    """(row, entry, envelope) of each row whose artefact recorded an envelope and runs here: a
    static artefact's row says it is unavailable instead (BackendContext.entry), a row that cannot
    run on this device runs nothing."""
    for name in names:
        entry = row_entry(manifest, name)
        if entry is None or entry.get("size_rule", {}).get("static") or (name in CUDA_ROWS and device.type != "cuda"):
            continue
        env = envelope.of_entry(entry)
        if env is not None:
            yield name, entry, env


def check_envelopes(manifest: dict, names: list[str], shape: tuple[int, int, int, int], device) -> None:
    """Before anything is built or timed: a --batch/--height/--width outside the envelope an
    artefact a row runs was proven on (parity.envelope) is refused in one line naming the row, the
    artefact and its envelope (exit 2)."""
    n, _, height, width = shape
    for name, entry, env in row_envelopes(manifest, names, device):
        env.check(n, height, width, what=f"--batch/--height/--width: {name} runs {entry['path']}, whose input")


def padded_up(manifest: dict, names: list[str], device, sizes, height: int, width: int) -> tuple[int, int]:
    """The bench size raised to the smallest side every row's artefact was proven at (its
    envelope), when the images are smaller: predict pads such an image up to it, so that is the
    shape the artefact runs in use; bench_batch mirror-pads the images there, never rescales."""
    for _, _, env in row_envelopes(manifest, names, device):
        low_h, low_w = env.smallest()
        height, width = max(height, low_h), max(width, low_w)
    return sizes.at_least(height), sizes.at_least(width)


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise UserError(f"--mode {mode!r}: choose one of {', '.join(MODES)}")


def backend_names(backends: list[str] | None) -> list[str]:
    names = list(backends or BACKENDS)
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise UserError(f"unknown backend(s) {', '.join(unknown)}; choose from: {', '.join(BACKENDS)}")
    return ["eager"] + [n for n in names if n != "eager"]  # the baseline always runs, first
