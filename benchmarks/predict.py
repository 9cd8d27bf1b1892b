"""Measure the batch-prediction targets (issue: batch prediction at scale) in one run, on this machine.

    python benchmarks/predict.py                 # 1,000 images at 960x640, batch 8, + Ray on them
    python benchmarks/predict.py --n 200 --no-ray
    python benchmarks/predict.py --throughput    # issue 29: predict's throughput mode (below)
    python benchmarks/predict.py --throughput --n 16 --min-time 2   # the same in a few minutes

Model: the shipped demo model's ONNX artefact (dynamic sizes), run by ONNX Runtime everywhere.
1. unet-bench's timing harness on the onnxruntime row, at the images' size and --batch, on them.
2. `unet-export predict` (streaming, its own process) over all N images: images/s from its report
   (the run, not process start-up) and wall time, peak RSS, and RSS sampled each second
   (at 25, 50, 75, 95% of the run: flat if memory is bounded).
3. Before: predict as it was before streaming (decode, infer, torch.argmax, encode, one image at
   a time), on the first --baseline-n images.
4. Ray: the same predict on a two-node loopback cluster (pipeline.ray_local, stopped afterwards)
   over the first --ray-n images, and the local pipeline over the same images.
Targets: predict >= 90% of the bench row, >= 1.8x before. Ratios come from one run; run it alone.
Results: benchmarks/results/<date>-predict-<cpu>.json and .md.

--throughput (issue 29): the demo model exported at 128x128 and proven up to the largest --sizes
(ONNX, OpenVINO IR, OpenVINO INT8 calibrated on the demo's calibration images), then at each size
and for each of --runtimes (OpenVINO INT8, ONNX Runtime FP32): unet-bench's throughput-mode row
at that size and --batch (on the images), `predict --mode throughput` and `predict --mode latency`
over the same N images, and whether the two wrote the same masks. Targets: predict throughput
>= 0.9 of the bench's throughput row; >= 1.3x predict latency for OpenVINO INT8.
Results: benchmarks/results/<date>-predict-throughput-<cpu>.json and .md.
"""

import argparse
import contextlib
import datetime
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from unet_export.api import manifest_checkpoint
from unet_export.bench.run import BenchConfig, bench_batch, device_info, image_paths, run_benchmark
from unet_export.checkpoint import build_model
from unet_export.data.dataset import image_to_tensor
from unet_export.data.images import load_image
from unet_export.flows.demo import DEMO_VAL, DEMO_WEIGHTS, demo_calibration
from unet_export.fileio import atomic_path
from unet_export.workdir.manifest import load_manifest
from unet_export.metrics import logits_to_mask
from unet_export.predict import fit_and_run, load_predictor, mask_to_image_array
from unet_export.bench.backends import BackendContext, BACKENDS
from unet_export.runtimes import OnnxRuntimeRunner

HERE = Path(__file__).resolve().parent
CLI = [sys.executable, "-m", "unet_export"]


def run(*args, env=None) -> list[tuple[float, float]]:
    """Run unet-export (exit with its error if it fails), reading the process's resident memory
    (VmRSS) each second: [(seconds, MB)], to show whether memory grows over a long predict run
    (its report has only the peak)."""
    samples, began = [], time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.DEVNULL, stderr=err, text=True, env=env)
        while proc.poll() is None:
            with contextlib.suppress(OSError, ValueError, IndexError):  # gone, or a zombie without VmRSS
                status = Path(f"/proc/{proc.pid}/status").read_text()
                samples.append((time.perf_counter() - began, int(status.split("VmRSS:")[1].split()[0]) / 1024))
            time.sleep(1)
        if proc.returncode != 0:
            err.seek(0)
            sys.exit(f"unet-export {' '.join(map(str, args[:2]))} exited {proc.returncode}: {err.read().strip()[-400:]}")
    return samples


def prepare(work: Path, n: int, height: int, width: int) -> tuple[Path, Path]:
    largest = f"{max(height, 128)}x{max(width, 128)}"  # predict keeps to the proven envelope (issue 28)
    images, exports = synth_images(work, n, height, width), work / f"exports_{largest}"
    if not (exports / "manifest.json").is_file():
        run("onnx", DEMO_WEIGHTS, "-w", exports, "--height", 128, "--width", 128, "--largest", largest, "--device", "cpu")
    return images, exports / f"{DEMO_WEIGHTS.stem}.onnx"


def synth_images(work: Path, n: int, height: int, width: int) -> Path:
    images = work / f"synth_{n}_{height}x{width}"
    if not (images / "imgs").is_dir():
        run("data", "synth", images, "--n", n, "--size", f"{height}x{width}", "--classes", 3, "--seed", 7)
    return images / "imgs"


def predict_run(model: Path, images: Path, out: Path, batch: int, workers: int, env=None, ray_address=None,
                flags: tuple = ()) -> dict:  # fmt: skip
    report = out.with_suffix(".json")
    extra = (["--ray-address", ray_address] if ray_address else []) + list(flags)
    began = time.perf_counter()
    rss = run("predict", model, images, "--out", out, "--batch-size", batch, "--workers", workers,
              "--report", report, "--device", "cpu", *extra, env=env)  # fmt: skip
    data = json.loads(report.read_text())
    quarters = [rss[int((len(rss) - 1) * f)][1] for f in (0.25, 0.5, 0.75, 0.95)] if rss else []
    return {"images": data["written"], "mode": data["mode"], "setting": data["setting"],
            "img_per_s": data["images_per_s"], "run_s": data["seconds"],
            "wall_s": time.perf_counter() - began, "peak_rss_mb": data["peak_rss_mb"], "rss_quarters_mb": quarters,
            "sha256": {m["mask"]: m["sha256"] for m in data["masks"]}} | ({"ray": data["ray"]} if "ray" in data else {})  # fmt: skip


def before(model: Path, images: list[Path], out: Path) -> dict:
    """predict as it was before streaming (commit 013bbec): one image at a time, decode -> infer
    -> torch.argmax -> encode, each mask written temp + fsync + rename."""
    predictor = load_predictor(model, torch.device("cpu"))
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    with predictor.runner:
        for path in images:
            img = load_image(path, predictor.n_channels)
            x = image_to_tensor(img, predictor.preprocess, predictor.n_channels)[None]
            logits = fit_and_run(predictor.runner, x, predictor.sizes, predictor.halo).float().cpu()
            classes = logits_to_mask(logits)[0].numpy()  # its argmax: torch's, over the class axis
            with atomic_path(out / f"{path.stem}_mask.png") as tmp:
                Image.fromarray(mask_to_image_array(classes, predictor.mask_values)).save(tmp, format="PNG")
    seconds = time.perf_counter() - began
    return {"images": len(images), "img_per_s": len(images) / seconds, "run_s": seconds}


def bench_row(model: Path, images: Path, batch: int, height: int, width: int, min_time: float,
              backend: str = "onnxruntime", mode: str = "latency") -> dict:  # fmt: skip
    """unet-bench's timing harness (run_benchmark) on one row (``backend``, in ``mode``), on these
    images, gated against the ONNX model ``model`` runs. No eager row: its float64 twin at 640x960,
    batch 8, costs minutes and is not what is compared; the artefact's parity was judged at export."""
    workdir = model.parent
    manifest = load_manifest(workdir)
    ckpt = manifest_checkpoint(manifest)
    ctx = BackendContext(build_model(ckpt), workdir, manifest, torch.device("cpu"), (batch, 3, height, width))
    cfg = BenchConfig(batch=batch, height=height, width=width, min_time=min_time)
    (row,) = run_benchmark({backend: functools.partial(BACKENDS[backend], ctx)}, OnnxRuntimeRunner(model, "cpu"),
                           cfg, bench_batch(cfg, 3, image_paths(images)), mode=mode)  # fmt: skip
    timed = row.throughput if mode == "throughput" else row  # None: the row failed before it was timed
    result = {"status": row.status, "img_per_s": timed.img_per_s if timed else None, "device": device_info(torch.device("cpu"))}
    if mode == "throughput" and timed:
        result["setting"] = timed.setting
    if row.reason:  # why the gate failed (or did not judge) the row, on these images
        result["reason"] = row.reason
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--baseline-n", type=int, default=100)
    parser.add_argument("--size", default="640x960", help="HxW of the synthetic images")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=20.0)
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--ray-n", type=int, default=1000, help="images for the Ray run (and a local run on the same)")
    parser.add_argument("--throughput", action="store_true", help="issue 29's measurement instead: predict's throughput "
                        "mode against unet-bench's throughput row and predict's latency mode")  # fmt: skip
    parser.add_argument("--sizes", default="128x128,640x960", help="--throughput: HxW of the images, comma-separated")
    parser.add_argument("--runtimes", default=",".join(THROUGHPUT_RUNTIMES), help="--throughput: predict --runtime labels")
    args = parser.parse_args()
    if args.throughput:
        return throughput_part(args)
    height, width = map(int, args.size.split("x"))
    work = HERE / "work" / "predict"
    images, model = prepare(work, args.n, height, width)
    load = [os.getloadavg()[0]]

    print(f"unet-bench onnxruntime row, {height}x{width}, batch {args.batch}", flush=True)
    row = bench_row(model, images, args.batch, height, width, args.min_time)
    result = {"bench": {"onnxruntime": {"status": row["status"], "img_per_s": row["img_per_s"]}}}
    print(f"  {row['img_per_s']:.2f} img/s ({row['status']})", flush=True)

    with tempfile.TemporaryDirectory(dir=work) as tmp:
        tmp = Path(tmp)
        print(f"predict (streaming) over {args.n} images", flush=True)
        local = predict_run(model, images, tmp / "local", args.batch, args.workers)
        print(f"  {local['img_per_s']:.2f} img/s, {local['wall_s']:.1f} s wall, peak RSS {local['peak_rss_mb']} MB, "
              f"RSS at 25/50/75/95% {local['rss_quarters_mb']}", flush=True)
        subset = sorted(images.iterdir())[: args.baseline_n]
        print(f"before: the sequential loop over {len(subset)} images", flush=True)
        result["before"] = before(model, subset, tmp / "before")
        print(f"  {result['before']['img_per_s']:.2f} img/s", flush=True)
        if not args.no_ray:
            from unet_export.predict.ray_local import loopback_cluster

            few = tmp / "ray_inputs.txt"
            few.write_text("".join(f"{p}\n" for p in sorted(images.iterdir())[: args.ray_n]))
            print(f"Ray: two nodes on 127.0.0.1, {args.ray_n} images, against the local pipeline on them", flush=True)
            # Over all the images, the streaming run above is the local run on the same images.
            local_few = local if args.ray_n >= args.n else predict_run(model, few, tmp / "local_few", args.batch,
                                                                       args.workers)  # fmt: skip
            with loopback_cluster(tmp / "ray", nodes=2) as (address, env):
                on_ray = predict_run(model, few, tmp / "ray", args.batch, args.workers, env, address)
            on_ray["identical_to_local"] = on_ray.pop("sha256") == local_few["sha256"]
            on_ray["local_img_per_s"] = local_few["img_per_s"]
            on_ray["overhead_vs_local"] = local_few["img_per_s"] / on_ray["img_per_s"] - 1
            result["ray"] = on_ray
            print(f"  {on_ray['img_per_s']:.2f} img/s, masks identical: {on_ray['identical_to_local']}", flush=True)
        local.pop("sha256")
        result["predict"] = local
    load.append(os.getloadavg()[0])
    row = row["img_per_s"]
    result["ratios"] = {"predict / unet-bench onnxruntime": local["img_per_s"] / row if row else None,
                        "predict / before": local["img_per_s"] / result["before"]["img_per_s"]}  # fmt: skip
    result["config"] = {"n": args.n, "size": f"{height}x{width}", "batch": args.batch, "workers": args.workers,
                        "model": str(model.relative_to(HERE.parent)), "device": result["bench"].pop("device", None) or
                        device_info(torch.device("cpu")), "load_avg": load,
                        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                                 cwd=HERE).stdout.strip(),
                        "date": datetime.date.today().isoformat()}  # fmt: skip
    write(result)


def write(result: dict) -> None:
    cpu = re.sub(r"[^a-z0-9]+", "-", result["config"]["device"]["name"].lower()).strip("-")
    stem = HERE / "results" / f"{result['config']['date']}-predict-{cpu}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    c, r = result["config"], result["ratios"]
    lines = [f"# predict at scale: {c['n']} images {c['size']}, batch {c['batch']}, {c['workers']} workers",
             f"{c['device']['name']}, {c['device']['cores']} cores, commit {c['commit']}, load average {c['load_avg']}", "",
             "| run | img/s | note |", "| --- | ---: | --- |",
             f"| unet-bench onnxruntime | {result['bench']['onnxruntime']['img_per_s']:.2f} | the runtime alone, batch {c['batch']} |",
             f"| predict (streaming, {result['predict']['mode']} mode) | {result['predict']['img_per_s']:.2f} | {result['predict']['images']} images, "
             f"peak RSS {result['predict']['peak_rss_mb']} MB; RSS at 25, 50, 75, 95% of the run: "
             f"{', '.join(f'{mb:.0f}' for mb in result['predict']['rss_quarters_mb'])} MB |",
             f"| before (sequential loop) | {result['before']['img_per_s']:.2f} | first {result['before']['images']} images |"]  # fmt: skip
    if "ray" in result:
        ray = result["ray"]
        lines.append(f"| predict --ray, 2 nodes | {ray['img_per_s']:.2f} | {ray['images']} images; local on them "
                     f"{ray['local_img_per_s']:.2f} img/s; {ray['overhead_vs_local']:+.0%} time vs local; masks "
                     f"identical: {ray['identical_to_local']} |")  # fmt: skip
    lines += ["", f"predict / unet-bench: {r['predict / unet-bench onnxruntime']:.2f} (target >= 0.90); "
              f"predict / before: {r['predict / before']:.2f} (target >= 1.8)"]  # fmt: skip
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


THROUGHPUT_RUNTIMES = ("openvino-int8", "onnxruntime")  # the issue's: OpenVINO INT8 and ONNX Runtime FP32


def throughput_exports(work: Path, largest: str) -> Path:
    """The demo model's ONNX model (exported at 128x128, proven up to ``largest``), OpenVINO IR and
    OpenVINO INT8 IR (calibrated on the demo's calibration images, gated on its validation set)."""
    exports = work / f"exports_{largest}"
    if not any(e["precision"] == "int8" for e in _artifacts(exports)):
        shutil.rmtree(exports, ignore_errors=True)
        calib = work / "calib"
        calib.mkdir(parents=True, exist_ok=True)
        for path in demo_calibration():
            shutil.copy(path, calib / path.name)
        run("onnx", DEMO_WEIGHTS, "-w", exports, "--height", 128, "--width", 128, "--largest", largest, "--device", "cpu")
        run("openvino", DEMO_WEIGHTS, "-w", exports, "--device", "cpu")
        run("int8", DEMO_WEIGHTS, "-w", exports, "--calib", calib, "--val", DEMO_VAL, "--engine", "openvino", "--device", "cpu")
    return exports


def _artifacts(exports: Path) -> list[dict]:
    return load_manifest(exports)["artifacts"] if (exports / "manifest.json").is_file() else []


def throughput_part(args) -> None:
    """Issue 29: at each size, for each runtime, the bench's throughput row and predict in both modes."""
    sizes = [tuple(map(int, size.split("x"))) for size in args.sizes.split(",")]
    work = HERE / "work" / "predict-throughput"
    exports = throughput_exports(work, f"{max(h for h, _ in sizes)}x{max(w for _, w in sizes)}")
    load, rows = [os.getloadavg()[0]], []
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        for height, width in sizes:
            images = synth_images(work, args.n, height, width)
            for runtime in args.runtimes.split(","):
                rows.append(throughput_row(exports, images, Path(tmp) / f"{runtime}_{height}x{width}", runtime,
                                           height, width, args))  # fmt: skip
    load.append(os.getloadavg()[0])
    config = {"n": args.n, "batch": args.batch, "workers": args.workers, "min_time": args.min_time,
              "device": device_info(torch.device("cpu")), "load_avg": load, "commit": _commit(),
              "date": datetime.date.today().isoformat()}  # fmt: skip
    write_throughput({"config": config, "rows": rows})


def throughput_row(exports: Path, images: Path, out: Path, runtime: str, height: int, width: int, args) -> dict:
    print(f"{runtime} {height}x{width}, batch {args.batch}: unet-bench --mode throughput", flush=True)
    bench = bench_row(exports / f"{DEMO_WEIGHTS.stem}.onnx", images, args.batch, height, width, args.min_time,
                      runtime, "throughput")  # fmt: skip
    bench.pop("device")
    runs = {}
    for mode in ("throughput", "latency"):
        print(f"  predict --mode {mode} over {args.n} images", flush=True)
        runs[mode] = predict_run(exports, images, out / mode, args.batch, args.workers,
                                 flags=("--runtime", runtime, "--mode", mode))  # fmt: skip
    identical = runs["throughput"].pop("sha256") == runs["latency"].pop("sha256")
    row = {"runtime": runtime, "size": f"{height}x{width}", "bench_throughput": bench, **runs, "masks_identical": identical,
           "predict_throughput / bench_throughput": runs["throughput"]["img_per_s"] / bench["img_per_s"] if bench["img_per_s"] else None,
           "predict_throughput / predict_latency": runs["throughput"]["img_per_s"] / runs["latency"]["img_per_s"]}  # fmt: skip
    print(f"  bench {bench['img_per_s'] or 0:.2f}, predict throughput {runs['throughput']['img_per_s']:.2f}, latency "
          f"{runs['latency']['img_per_s']:.2f} img/s; masks identical: {identical}", flush=True)  # fmt: skip
    return row


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()


def write_throughput(result: dict) -> None:
    c = result["config"]
    cpu = re.sub(r"[^a-z0-9]+", "-", c["device"]["name"].lower()).strip("-")
    stem = HERE / "results" / f"{c['date']}-predict-throughput-{cpu}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# predict's throughput mode: {c['n']} images per run, batch {c['batch']}, {c['workers']} workers",
             f"{c['device']['name']}, {c['device']['cores']} cores, commit {c['commit']}, load average {c['load_avg']}", "",
             "| size | runtime | unet-bench throughput img/s | predict throughput img/s | predict latency img/s | "
             "predict / bench (>= 0.9) | throughput / latency | same masks | setting |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]  # fmt: skip
    for r in result["rows"]:
        bench, ratio = r["bench_throughput"], r["predict_throughput / bench_throughput"]
        lines.append(f"| {r['size']} | {r['runtime']} | {bench['img_per_s'] or 0:.2f} ({bench['status']}) | "
                     f"{r['throughput']['img_per_s']:.2f} | {r['latency']['img_per_s']:.2f} | "
                     f"{ratio if ratio is not None else float('nan'):.2f} | {r['predict_throughput / predict_latency']:.2f} | "
                     f"{r['masks_identical']} | {r['throughput']['setting']} |")  # fmt: skip
    lines += ["", "Target: predict throughput / bench throughput >= 0.9; throughput / latency >= 1.3 for openvino-int8."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
