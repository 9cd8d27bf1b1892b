"""Reproduce the README's benchmark tables with `unet-bench`'s own library call, in one run.

    python benchmarks/run.py                                   # CPU table: 256x256, batch 8
    python benchmarks/run.py --device cuda --height 640 --width 960 --batch 8   # GPU recipe

Model: the full-size milesial U-Net (ConvTranspose, 3 -> 2 classes, 31.0M parameters) with the
demo's seeded random weights (reduced-precision rows are reported, not claimed, until the model
is trained). Exports every artefact the device can run (ONNX, TorchScript, AOTInductor; OpenVINO
IR on the CPU; a TensorRT engine where TensorRT and a GPU are) into benchmarks/work/, then writes
benchmarks/results/<date>-<device>.json and .md with the device and the git commit.
"""

import argparse
import datetime
import json
import re
import subprocess
import sys
from pathlib import Path

from unet_export.api import resolve_device
from unet_export.bench.run import benchmark
from unet_export.cli.common import one_line
from unet_export.cli.render_bench import bench_markdown
from unet_export.flows.demo import write_random_checkpoint
from unet_export.errors import UserError

HERE = Path(__file__).resolve().parent


def git_commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE, capture_output=True, text=True)
    return proc.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--backends", default=None, help="comma-separated; default: all")
    parser.add_argument("--min-time", type=float, default=5.0)
    parser.add_argument("--compile-mode", default="default")
    args = parser.parse_args()
    resolve_device(args.device)  # no GPU for --device cuda: refuse before writing or exporting anything

    work = HERE / "work" / args.device
    weights = write_random_checkpoint(work / "unet_full.pth", seed=0)
    size = ["--height", str(args.height), "--width", str(args.width), "--device", args.device]
    exports = {"onnx": [str(weights), *size], "torchscript": [str(weights), *size], "aoti": [str(weights), *size]}
    if args.device == "cpu":
        exports["openvino"] = [str(weights), *size]
    else:
        exports["trt"] = ["--fp16"]
    for fmt, options in exports.items():
        # Exports run in their own process: what the exporter leaves behind in this one
        # (measured: eager 16% slower after an in-process ONNX export) must not touch the timings.
        code = subprocess.run([sys.executable, "-m", "unet_export", fmt, *options, "-w", str(work)]).returncode
        if code == 0 or (fmt == "trt" and code == 2):  # without TensorRT its row says unavailable
            continue
        if code != 2:  # exit 2 is bad input the child has said in its one line: a second would break the contract
            print(f"error: unet-export {fmt} exited {code}", file=sys.stderr)
        sys.exit(code)
    report = benchmark(
        work, batch=args.batch, height=args.height, width=args.width, device=args.device,
        backends=args.backends.split(",") if args.backends else None, compile_mode=args.compile_mode,
        min_time=args.min_time, on_row=lambda row: print(f"{row.status:>13} {row.backend:<20} {row.img_per_s or ''}"),
    )  # fmt: skip
    data = report.to_dict()
    data["commit"] = git_commit()
    data["command"] = "python benchmarks/run.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None)
    name = re.sub(r"[^A-Za-z0-9]+", "-", report.device["name"]).strip("-").lower()
    stem = HERE / "results" / f"{datetime.date.today()}-{args.device}-{name}"
    stem.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    markdown = bench_markdown(report) + f"\n\nCommit {data['commit']}; command: `{data['command']}`\n"
    stem.with_suffix(".md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:  # bad input or environment: one line and exit 2, the CLI's contract
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        sys.exit(exc.exit_code)
