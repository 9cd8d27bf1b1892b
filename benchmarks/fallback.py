"""Measure issue 28's --fallback auto targets on this CPU: on the outlier model (the demo U-Net with
a few extreme outliers in the input of its last decoder layer, flows.demo.write_outlier_checkpoint),
`unet-export int8 --fallback auto` must find a passing FP32 set within 3 minutes and keep at most
3 layers in FP32, for each engine (onnxruntime QDQ, openvino NNCF).

    python benchmarks/fallback.py

Per engine, each in its own process on a copy of one workdir holding the verified FP32 ONNX
model (and IR): the default command (--fallback presets: the preset ladder; NNCF with its accuracy
control on Dice, since --val is given) for context, then --fallback auto. Calibration: the demo's
last 12 validation images; gate: the other 12 (held out). Reported: exit codes, the search's own
time (ranking + every step) and the whole command's, the set found (both names), the gate numbers
and the CPU speed cost per kept layer. The machine's load average is recorded before and after.
Results: benchmarks/results/<date>-fallback-<cpu>.json and .md; a missed target is reported as
missed.
"""

import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_S, TARGET_LAYERS = 180.0, 3
ENGINES = {"onnxruntime": "onnx", "openvino": "openvino"}


def cpu_name() -> str:
    match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    return match.group(1).strip() if match else "unknown CPU"


def cli(*args: str) -> tuple[int, float, str]:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "unet_export", *args], env=env, capture_output=True, text=True)
    return done.returncode, time.perf_counter() - started, done.stdout + done.stderr


def run(engine: str, mode: str, base: Path, weights: Path, calib: Path, val: Path, size) -> dict:
    from unet_export.workdir.manifest import load_manifest

    out = base.parent / f"{engine}-{mode}"
    shutil.copytree(base, out)
    rc, seconds, text = cli("int8", str(weights), "--calib", str(calib), "--val", str(val), "-w", str(out), "--engine",
                            engine, "--height", str(size[0]), "--width", str(size[1]), "--device", "cpu",
                            "--fallback", mode)  # fmt: skip
    entry = next(a for a in load_manifest(out)["artifacts"] if a["format"] == ENGINES[engine] and a["precision"] == "int8")
    q = entry["quantization"]
    row = {"engine": engine, "fallback": mode, "exit": rc, "command_s": round(seconds, 1), "status": entry["status"],
           "fp32_layers": len(entry["fp32_nodes"]), "worked": q["worked"], "accuracy_control": q["accuracy_control"],
           "dice": (entry.get("accuracy") or {}).get("dice")}  # fmt: skip
    if q.get("search"):
        search = q["search"]
        row["search"] = search
        row["met"] = {"time": search["found"] is not None and search["seconds"] <= TARGET_S,
                      "layers": search["found"] is not None and len(search["found"]) <= TARGET_LAYERS}  # fmt: skip
    if rc not in (0, 1):
        row["output"] = text[-2000:]
    return row


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    sys.path.insert(0, str(ROOT))
    from unet_export.flows.demo import DEMO_SIZE, DEMO_VAL, demo_calibration, write_outlier_checkpoint

    data = {"cpu": cpu_name(), "cores": os.cpu_count(), "date": datetime.date.today().isoformat(),
            "load_before": os.getloadavg(), "targets": {"search_s": TARGET_S, "fp32_layers": TARGET_LAYERS}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        weights = write_outlier_checkpoint(root / "outlier_unet.pth")
        calib = root / "calib"
        calib.mkdir()
        for path in demo_calibration():
            shutil.copy(path, calib / path.name)
        base = root / "base"
        size = [str(s) for s in DEMO_SIZE]
        for cmd in (["onnx", str(weights)], ["openvino", str(weights)]):
            rc, _, text = cli(*cmd, "-w", str(base), "--height", size[0], "--width", size[1], "--device", "cpu")
            assert rc == 0, text
        data["rows"] = [run(engine, mode, base, weights, calib, DEMO_VAL, size)
                        for engine in ENGINES for mode in ("presets", "auto")]  # fmt: skip
    data["load_after"] = os.getloadavg()
    stem = ROOT / "benchmarks" / "results" / f"{data['date']}-fallback-{slug(data['cpu'])}"
    stem.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(data))
    print(markdown(data))


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("processor", "")).strip("-")


def markdown(data: dict) -> str:
    lines = [f"# --fallback auto on the outlier model: {data['cpu']} ({data['cores']} cores), {data['date']}", "",
             "The demo U-Net with a few extreme outliers (up to 1e4) in one channel of the input of `up4.up`, "
             "calibrated on 12 demo images, gated on 12 held-out ones (class change <= 0.1%, Dice vs eager >= 0.999, "
             "Dice vs ground truth within 0.005 of eager). `benchmarks/fallback.py`; load average "
             f"{data['load_before'][0]:.2f} before, {data['load_after'][0]:.2f} after.", "",
             f"Targets: a passing set within {data['targets']['search_s']:.0f} s, at most "
             f"{data['targets']['fp32_layers']} layers in FP32.", "",
             "| engine | --fallback | exit | layers in FP32 | search s | command s | targets |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in data["rows"]:
        search = row.get("search")
        met = row.get("met")
        verdict = "-" if not met else ("met" if all(met.values()) else
                                      "missed: " + ", ".join(k for k, v in met.items() if not v))  # fmt: skip
        lines.append(f"| {row['engine']} | {row['fallback']}{' (NNCF accuracy control)' if row['accuracy_control'] else ''} "
                     f"| {row['exit']} | {row['fp32_layers']} | {search['seconds'] if search else '-'} "
                     f"| {row['command_s']} | {verdict} |")  # fmt: skip
    for row in data["rows"]:
        search = row.get("search")
        if not search:
            continue
        lines += ["", f"## {row['engine']}: the search", "",
                  f"Ranked first: {', '.join(r['layer'] for r in search['ranked'][:3])}. "
                  f"Found: {', '.join(search['found'] or ['none'])}; re-apply with `{search['flag']}`.", "",
                  "| step | FP32 set | class change | Dice vs eager | Dice vs truth | ms/batch (CPU, best of 5) | passed |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        base = search["base"]
        steps = [("default", base), *[(str(i), s) for i, s in enumerate(search["steps"], 1)]]
        for name, step in steps:
            lines.append(f"| {name} | {', '.join(step['layers']) or 'none'} | {step['class_change']:.4%} "
                         f"| {step['dice_vs_eager']:.5f} | {step['dice']:.4f} | {step['latency_ms']:.1f} | {step['passed']} |")  # fmt: skip
        costs = "; ".join(f"{k}: {'not timed' if v is None else f'{v:+.1f} ms'}" for k, v in search["cost_ms"].items())
        lines += ["", f"Speed cost per kept layer (latency with it in FP32 minus without, batch of 8 at 128x128; "
                      f"noisy on a shared machine): {costs or 'none'}."]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
