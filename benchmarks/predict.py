"""Measure the batch-prediction targets (issue: batch prediction at scale) in one run, on this machine.

    python benchmarks/predict.py                 # 1,000 images at 960x640, batch 8, + Ray on them
    python benchmarks/predict.py --n 200 --no-ray

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
"""

import argparse
import contextlib
import datetime
import functools
import json
import os
import re
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
from unet_export.flows.demo import DEMO_WEIGHTS
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
    images, exports = work / f"synth_{n}_{height}x{width}", work / "exports"
    if not (images / "imgs").is_dir():
        run("data", "synth", images, "--n", n, "--size", f"{height}x{width}", "--classes", 3, "--seed", 7)
    if not (exports / "manifest.json").is_file():
        run("onnx", DEMO_WEIGHTS, "-w", exports, "--height", 128, "--width", 128, "--device", "cpu")
    return images / "imgs", exports / f"{DEMO_WEIGHTS.stem}.onnx"


def predict_run(model: Path, images: Path, out: Path, batch: int, workers: int, env=None, ray_address=None) -> dict:
    report = out.with_suffix(".json")
    extra = ["--ray-address", ray_address] if ray_address else []
    began = time.perf_counter()
    rss = run("predict", model, images, "--out", out, "--batch-size", batch, "--workers", workers,
              "--report", report, "--device", "cpu", *extra, env=env)  # fmt: skip
    data = json.loads(report.read_text())
    quarters = [rss[int((len(rss) - 1) * f)][1] for f in (0.25, 0.5, 0.75, 0.95)] if rss else []
    return {"images": data["written"], "img_per_s": data["images_per_s"], "run_s": data["seconds"],
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


def bench_row(model: Path, images: Path, batch: int, height: int, width: int, min_time: float) -> dict:
    """unet-bench's timing harness (run_benchmark) on the onnxruntime row, on these images. No
    eager row: its float64 twin at 640x960, batch 8, costs minutes and is not what is compared;
    the artefact's parity was judged at export."""
    workdir = model.parent
    manifest = load_manifest(workdir)
    ckpt = manifest_checkpoint(manifest)
    ctx = BackendContext(build_model(ckpt), workdir, manifest, torch.device("cpu"), (batch, 3, height, width))
    cfg = BenchConfig(batch=batch, height=height, width=width, min_time=min_time)
    (row,) = run_benchmark({"onnxruntime": functools.partial(BACKENDS["onnxruntime"], ctx)}, OnnxRuntimeRunner(model, "cpu"),
                           cfg, bench_batch(cfg, 3, image_paths(images)))  # fmt: skip
    return {"status": row.status, "img_per_s": row.img_per_s, "device": device_info(torch.device("cpu"))}


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
    args = parser.parse_args()
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
             f"| predict (streaming) | {result['predict']['img_per_s']:.2f} | {result['predict']['images']} images, "
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


if __name__ == "__main__":
    main()
