"""Measure the INT8 targets (issue: CPU deployment artefacts) in one script, on this machine.

    python benchmarks/int8.py                  # both parts
    python benchmarks/int8.py --part demo      # the trained demo model only (a few minutes)
    python benchmarks/int8.py --part full --sizes 256x256   # the full-size U-Net at one size
    python benchmarks/int8.py --part smp       # a segmentation_models_pytorch Unet/resnet34, 256x256

full: the full-size milesial U-Net (31.0M parameters, the demo's seeded random weights) exported
  to ONNX, OpenVINO IR and INT8 (both engines) with 100 `data synth` calibration images, each
  command timed in its own process (export cost: IR + INT8 < 3 minutes); then `unet-bench` rows
  eager, openvino, openvino-bf16, openvino-int8, onnxruntime, onnxruntime-int8 at each size,
  batch 8, on other synth images. Random weights: the INT8 verdicts are reported, not claimed.
demo: the shipped trained model at its training size (128x128), calibrated on the last 12 images
  of its validation set, gated and benchmarked on the first 12 (held out); here the verdicts count.
smp: smp.Unet('resnet34', encoder_weights=None, classes=2) trained here for a few minutes on
  `data synth` images (128x128, ImageNet mean/std, as the tool records for it), saved with
  save_pretrained; then what a user of smp runs, with no model flags (onnx DIR, openvino DIR,
  int8 DIR --calib at 256x256), and `unet-bench` batch 8 at 256x256 on held-out synth images.

Speed targets are ratios within one run (robust-ish to a busy machine): best INT8 row / the
OpenVINO bf16 row (>= 1.6x full size, >= 1.3x demo with a passing INT8 row). The machine's load
average is recorded before and after. Results: benchmarks/results/<date>-int8-<cpu>.json and .md.
"""

import argparse
import datetime
import functools
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from unet_export.api import manifest_checkpoint
from unet_export.bench.run import BenchConfig, BenchReport, bench_batch, benchmark, device_info, image_paths, run_benchmark
from unet_export.checkpoint import build_model
from unet_export.cli.render_bench import bench_markdown
from unet_export.flows.demo import DEMO_VAL, DEMO_WEIGHTS, demo_calibration, write_random_checkpoint
from unet_export.workdir.manifest import load_manifest, tool_versions
from unet_export.bench.backends import BackendContext, BACKENDS

HERE = Path(__file__).resolve().parent
CLI = [sys.executable, "-m", "unet_export"]
ROWS = ["eager", "openvino", "openvino-bf16", "openvino-int8", "onnxruntime", "onnxruntime-int8"]
INT8_ROWS = ("openvino-int8", "onnxruntime-int8")


def timed(*args) -> dict:
    """Run one CLI command in its own process: exit code, wall seconds, and the CPU seconds it
    used (user + sys), which a busy machine inflates less than wall time."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    tail = proc.stdout.strip().splitlines()[-12:] + proc.stderr.strip().splitlines()[-3:]
    print(f"  {' '.join(map(str, args[:2]))}: exit {proc.returncode}, {wall:.1f} s wall, {cpu:.1f} s CPU")
    return {"command": "unet-export " + " ".join(map(str, args)), "exit": proc.returncode, "wall_s": wall, "cpu_s": cpu,
            "tail": tail}  # fmt: skip


def int8_verdicts(workdir: Path) -> list[dict]:
    found = []
    for entry in load_manifest(workdir)["artifacts"]:
        if entry["precision"] == "int8":
            q = entry["quantization"]
            cases = entry["parity"]["cases"]
            found.append({"format": entry["format"], "status": entry["status"], "worked": q["worked"],
                          "attempts": [(a["name"], a["passed"]) for a in q["attempts"]], "fp32_nodes": entry["fp32_nodes"],
                          "int8_layers": f"{q['int8_layers']}/{q['layers']}", "accuracy": entry.get("accuracy"),
                          "max_class_change": max((c["argmax_disagreement"] for c in cases), default=None),
                          "min_dice_vs_eager": min((c["dice_vs_eager"] for c in cases), default=None)})  # fmt: skip
    return found


def on_row(row) -> None:
    print(f"  {row.status:>13} {row.backend:<18} {row.img_per_s or 0:8.2f} img/s  {row.reason[:100]}", flush=True)


def bench(workdir: Path, height: int, width: int, data: Path, args) -> dict:
    timing = {"iters": args.iters, "warmup": args.warmup} if args.iters else {"min_time": args.min_time}
    if args.reference == "openvino":
        report = bench_vs_openvino(workdir, height, width, data, args, timing)
    else:
        report = benchmark(workdir, batch=args.batch, height=height, width=width, backends=args.backends.split(","),
                           device="cpu", data=data, on_row=on_row, **timing)  # fmt: skip
    rows = {r.backend: r for r in report.rows}
    ratios = {}
    bf16 = rows.get("openvino-bf16")
    for name in INT8_ROWS:
        row = rows.get(name)
        if row and row.img_per_s and bf16 and bf16.img_per_s:
            ratios[f"{name} / openvino-bf16"] = row.img_per_s / bf16.img_per_s
        if row and row.img_per_s and rows.get("openvino") and rows["openvino"].img_per_s:
            ratios[f"{name} / openvino"] = row.img_per_s / rows["openvino"].img_per_s
    passing = [rows[n] for n in INT8_ROWS if n in rows and rows[n].status == "ok" and rows[n].img_per_s]
    best = max(passing, key=lambda r: r.img_per_s, default=None)
    timed_rows = [rows[n] for n in INT8_ROWS if n in rows and rows[n].img_per_s]
    fastest = max(timed_rows, key=lambda r: r.img_per_s, default=None)
    return {"size": f"{height}x{width}", "report": report.to_dict(), "markdown": bench_markdown(report), "ratios": ratios,
            "best_int8": fastest.backend if fastest else None,
            "best_int8_vs_bf16": fastest.img_per_s / bf16.img_per_s if fastest and bf16 and bf16.img_per_s else None,
            "best_passing_int8": best.backend if best else None,
            "best_passing_int8_vs_bf16": best.img_per_s / bf16.img_per_s if best and bf16 and bf16.img_per_s else None}  # fmt: skip


def bench_vs_openvino(workdir: Path, height: int, width: int, data: Path, args, timing: dict) -> BenchReport:
    """unet-bench's rows without eager: parity against OpenVINO fp32 (the IR), no float64 run.
    For sizes where eager fp32 and its float64 twin take many minutes per batch and, in float64,
    more memory than this machine can spare (640x960, batch 8: ~12 GB); a speed comparison only."""
    manifest = load_manifest(workdir)
    ckpt = manifest_checkpoint(manifest)
    net, shape = build_model(ckpt), (args.batch, 3, height, width)
    ctx = BackendContext(net, workdir, manifest, torch.device("cpu"), shape)
    names = [n for n in args.backends.split(",") if n != "eager"]
    cfg = BenchConfig(batch=args.batch, height=height, width=width, **timing)
    reference = BACKENDS["openvino"](ctx)
    rows = run_benchmark({n: functools.partial(BACKENDS[n], ctx) for n in names}, reference, cfg,
                         bench_batch(cfg, 3, image_paths(data), manifest["model"].get("preprocess")), on_row)  # fmt: skip
    config = {"batch": args.batch, "height": height, "width": width, "inputs": str(data),
              "reference": "openvino fp32 (IR); no eager row, no float64"} | timing  # fmt: skip
    return BenchReport(
        device_info(torch.device("cpu")), tool_versions("torch", "onnxruntime", "openvino", "nncf"), config, rows
    )


def full_part(args) -> dict:
    work = HERE / "work" / "int8-full"
    if not args.reuse_exports:
        shutil.rmtree(work / "exports", ignore_errors=True)
    weights = write_random_checkpoint(work / "unet_full.pth", seed=0)
    calib, out = work / "synth_calib", work / "exports"
    for folder, n, size, seed in (
        (calib, args.calib_images, "256x256", 0),
        *((work / f"synth_{s}", 8, s, 1) for s in args.sizes),
    ):
        if not (folder / "imgs").is_dir():
            subprocess.run([*CLI, "data", "synth", folder, "--n", str(n), "--size", size, "--classes", "2", "--seed", str(seed)],
                           check=True, capture_output=True)  # fmt: skip
    result = {"exports": {}, "int8": [], "bench": []}
    if not args.reuse_exports:
        print("full-size U-Net: exports")
        steps = {"onnx": timed("onnx", weights, "-w", out, "--device", "cpu"),
                 "openvino": timed("openvino", weights, "-w", out),
                 "int8 openvino": timed("int8", weights, "-w", out, "--calib", calib, "--engine", "openvino"),
                 "int8 onnxruntime": timed("int8", weights, "-w", out, "--calib", calib, "--engine", "onnxruntime")}  # fmt: skip
        result["exports"] = steps
        result["export_cost"] = {"ir_plus_int8_openvino_wall_s": steps["openvino"]["wall_s"] + steps["int8 openvino"]["wall_s"],
                                 "ir_plus_int8_openvino_cpu_s": steps["openvino"]["cpu_s"] + steps["int8 openvino"]["cpu_s"]}  # fmt: skip
    result["int8"] = int8_verdicts(out)
    for size in args.sizes:
        height, width = map(int, size.split("x"))
        print(f"full-size U-Net: unet-bench {size}, batch {args.batch}")
        result["bench"].append(bench(out, height, width, work / f"synth_{size}", args))
    return result


def demo_part(args) -> dict:
    work = HERE / "work" / "int8-demo"
    shutil.rmtree(work, ignore_errors=True)
    calib, out = work / "calib", work / "exports"
    calib.mkdir(parents=True)
    for path in demo_calibration():  # the last 12 of demo_val; the first 12 stay held out
        shutil.copy(path, calib / path.name)
    print("demo model: exports")
    steps = {"onnx": timed("onnx", DEMO_WEIGHTS, "-w", out, "--height", 128, "--width", 128, "--device", "cpu"),
             "openvino": timed("openvino", DEMO_WEIGHTS, "-w", out),
             "int8": timed("int8", DEMO_WEIGHTS, "-w", out, "--calib", calib, "--val", DEMO_VAL)}  # fmt: skip
    held_out = work / "held_out"  # unet-bench --data: only images calibration never saw
    held_out.mkdir()
    used = {p.name for p in calib.iterdir()}
    for path in sorted((DEMO_VAL / "imgs").iterdir()):
        if path.name not in used:
            shutil.copy(path, held_out / path.name)
    print(f"demo model: unet-bench 128x128, batch {args.batch}, {len(list(held_out.iterdir()))} held-out images")
    return {"exports": steps, "int8": int8_verdicts(out), "bench": [bench(out, 128, 128, held_out, args)]}


SMP_STEPS, SMP_BATCH = 100, 8


def train_smp(data: Path, dest: Path, steps: int, seed: int = 0) -> dict:
    """A few minutes of Adam on synth images, preprocessed as unet-export records an smp model's
    (x/255, ImageNet mean/std): a trained model, so the INT8 and FP16 verdicts mean something."""
    import segmentation_models_pytorch as smp

    from unet_export.data.dataset import Preprocess, SegmentationDataset, find_samples, unique_mask_values
    from unet_export.models.smp import IMAGENET

    torch.manual_seed(seed)
    _, samples = find_samples(data)
    loader = torch.utils.data.DataLoader(
        SegmentationDataset(samples, unique_mask_values(samples), Preprocess(**IMAGENET), 3),
        batch_size=SMP_BATCH, shuffle=True, drop_last=True)  # fmt: skip
    net = smp.Unet("resnet34", encoder_weights=None, classes=2)
    optimizer, started, step, losses = torch.optim.Adam(net.parameters(), lr=1e-3), time.perf_counter(), 0, []
    net.train()
    while step < steps:
        for batch in loader:
            loss = torch.nn.functional.cross_entropy(net(batch["image"]), batch["mask"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
            if step == steps:
                break
    net.eval().save_pretrained(dest)
    print(f"  trained smp Unet/resnet34: {steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
          f"{time.perf_counter() - started:.0f} s")  # fmt: skip
    return {"steps": steps, "batch": SMP_BATCH, "first_loss": losses[0], "last_loss": losses[-1],
            "seconds": time.perf_counter() - started}  # fmt: skip


def smp_part(args) -> dict:
    work = HERE / "work" / "int8-smp"
    shutil.rmtree(work, ignore_errors=True)
    train, calib, held, model, out = (work / n for n in ("train", "calib", "held_out", "unet_resnet34", "exports"))
    # Trained at 128x128 (minutes on a 2-core CPU), exported, calibrated and timed at 256x256: Unet takes any size.
    for folder, n, size, seed in ((train, 96, "128x128", 0), (calib, 32, "256x256", 1), (held, 16, "256x256", 2)):
        subprocess.run([*CLI, "data", "synth", folder, "--n", str(n), "--size", size, "--classes", "2", "--seed",
                        str(seed)], check=True, capture_output=True)  # fmt: skip
    print("smp Unet/resnet34: training")
    training = train_smp(train, model, args.smp_steps)
    print("smp Unet/resnet34: the three commands, no model flags")
    steps = {"onnx": timed("onnx", model, "-w", out, "--device", "cpu"),
             "openvino": timed("openvino", model, "-w", out),
             "int8": timed("int8", model, "-w", out, "--calib", calib / "imgs")}  # fmt: skip
    print(f"smp Unet/resnet34: unet-bench 256x256, batch {args.batch}, held-out images")
    return {"training": training, "exports": steps, "int8": int8_verdicts(out),
            "bench": [bench(out, 256, 256, held / "imgs", args)]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", default="all", choices=["all", "full", "demo", "smp"])
    parser.add_argument("--sizes", type=lambda s: s.split(","), default=["256x256", "640x960"])
    parser.add_argument("--calib-images", type=int, default=100)
    parser.add_argument("--smp-steps", type=int, default=SMP_STEPS, help="smp: training steps (batch 8)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--backends", default=",".join(ROWS))
    parser.add_argument("--min-time", type=float, default=5.0)
    parser.add_argument("--iters", type=int, default=None, help="exact timed iterations (else --min-time)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reuse-exports", action="store_true", help="full: bench the artefacts of an earlier run")
    parser.add_argument(
        "--reference",
        default="eager",
        choices=["eager", "openvino"],
        help="openvino: no eager row and no float64 run (for 640x960, batch 8: a speed comparison)",
    )
    args = parser.parse_args()
    data = {"device": device_info(torch.device("cpu")), "load_before": os.getloadavg(),
            "cpu_flags": sorted(set(re.findall(r"\b(avx512_bf16|avx512_vnni|amx_\w+|avx_vnni)\b", Path("/proc/cpuinfo").read_text())))}  # fmt: skip
    if args.part in ("all", "demo"):
        data["demo"] = demo_part(args)
    if args.part in ("all", "full"):
        data["full"] = full_part(args)
    if args.part == "smp":
        data["smp"] = smp_part(args)
    data["load_after"] = os.getloadavg()
    data["command"] = "python benchmarks/int8.py " + " ".join(sys.argv[1:])
    name = re.sub(r"[^A-Za-z0-9]+", "-", data["device"]["name"]).strip("-").lower()
    sizes = "" if args.part in ("demo", "smp") else "-" + "-".join(args.sizes)
    stem = HERE / "results" / f"{datetime.date.today()}-int8-{args.part}{sizes}-{name}"
    stem.with_suffix(".json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(summary(data))
    print(summary(data))


def summary(data: dict) -> str:
    lines = [f"# INT8 targets: {data['device']['name']}, flags {', '.join(data['cpu_flags']) or '-'}",
             f"load average before {data['load_before'][0]:.1f}, after {data['load_after'][0]:.1f}; `{data['command']}`", ""]  # fmt: skip
    for part in ("demo", "full", "smp"):
        if part not in data:
            continue
        result = data[part]
        lines.append(f"## {part}")
        if "training" in result:
            t = result["training"]
            lines.append(f"- trained here: {t['steps']} steps of batch {t['batch']}, loss {t['first_loss']:.3f} -> "
                         f"{t['last_loss']:.3f}, {t['seconds']:.0f} s")  # fmt: skip
        for step in result["exports"].values():
            lines.append(
                f"- `{step['command']}`: exit {step['exit']}, {step['wall_s']:.1f} s wall, {step['cpu_s']:.1f} s CPU"
            )
        if "export_cost" in result:
            cost = result["export_cost"]
            lines.append(f"- IR + INT8 (OpenVINO): {cost['ir_plus_int8_openvino_wall_s']:.1f} s wall, "
                         f"{cost['ir_plus_int8_openvino_cpu_s']:.1f} s CPU (target < 180 s)")  # fmt: skip
        for v in result["int8"]:
            acc = v["accuracy"]
            dice = f", Dice vs GT drop {acc['drop']:+.4f} on {acc['images']} held-out images" if acc else ""
            lines.append(f"- {v['format']} int8: {v['status']}, worked: {v['worked']}, attempts {v['attempts']}, INT8 layers "
                         f"{v['int8_layers']}, FP32 {v['fp32_nodes']}, max class change {v['max_class_change']:.4%}, "
                         f"min Dice vs eager {v['min_dice_vs_eager']:.5f}{dice}")  # fmt: skip
        for b in result["bench"]:
            ratios = ", ".join(f"{k} {v:.2f}x" for k, v in b["ratios"].items())
            best = (f"Best INT8 row: {b['best_int8']} ({_x(b['best_int8_vs_bf16'])} openvino-bf16); best passing: "
                    f"{b['best_passing_int8']} ({_x(b['best_passing_int8_vs_bf16'])})")  # fmt: skip
            lines += [
                "",
                f"### unet-bench {b['size']}",
                "",
                b["markdown"],
                "",
                f"Ratios in this run: {ratios}",
                best,
                "",
            ]
    return "\n".join(lines) + "\n"


def _x(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


if __name__ == "__main__":
    main()
