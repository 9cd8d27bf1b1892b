"""Measure the envelope (unet_export.parity.envelope) against the two-shape gate it replaced.

    python benchmarks/envelope.py                          # cost on the demo + the damage set
    python benchmarks/envelope.py --part cost --reps 5
    python benchmarks/envelope.py --part damage --subjects demo-trained,milesial-w8-v4,plain

1. Cost: the FP32 gate of the demo model's ONNX model (ONNX Runtime, CPU) at its export size
   (128x128), as `unet-export onnx` runs it (run_parity: session, eager fp32, eager float64, the
   artefact), on the old two shapes (1x3x128x128, 2x3x250x375) and on the envelope's probes
   (batch 1-8, sides 64-192). Repetitions alternate; the table gives the median and the ratio.
2. Damage: for each subject (benchmarks/parity_rule.py's), the correct ONNX model and every
   damaged one of parity_rule.damaged_files, plus the shape-dependent damages of
   benchmarks/damage.py (wrong only above a height inside the envelope, only for batch > 1, only
   for batch > 2), each judged by the envelope gate and by the old two-shape gate. Expected: the
   correct model passes, every damage fails (parity_rule's "deepest" edit, below any arithmetic
   noise, may go either way). A false pass or a false failure is counted.

Writes benchmarks/results/<date>-envelope-<cpu>.json and .md.
"""

import argparse
import itertools
import re
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.damage import damage_when  # noqa: E402
from benchmarks.parity_rule import SUBJECTS, _config, damaged_files, export  # noqa: E402
from unet_export.bench.run import device_info  # noqa: E402
from unet_export.models import get_spec  # noqa: E402
from unet_export.parity import envelope  # noqa: E402
from unet_export.parity.gate import FP32, check_parity, seeded_inputs  # noqa: E402
from unet_export.runtimes import EagerRunner, OnnxRuntimeRunner  # noqa: E402
from unet_export.workdir.manifest import tool_versions  # noqa: E402

OLD = (2, 250, 375)  # the second shape of the two-shape gate, fitted to the size rule


def gates(architecture: str, model, size: int) -> tuple[dict[str, tuple[list, list[str]]], envelope.Envelope]:
    """name -> (inputs, probe labels) of the old two-shape gate and of the envelope."""
    rule = get_spec(architecture).sizes(getattr(model, "config", {}) or _config(architecture))
    channels = getattr(model, "n_channels", 3)
    old = [(1, channels, size, size), (OLD[0], channels, rule.fit(OLD[1]), rule.fit(OLD[2]))]
    env = envelope.declared(rule, channels, (size, size))
    probes = env.probes((size, size))
    return {"two shapes": (seeded_inputs(old), ["", ""]),
            "envelope": (seeded_inputs([p.shape for p in probes]), [p.label for p in probes])}, env  # fmt: skip


def judge(path: Path, model, inputs: list, labels: list[str]):
    with OnnxRuntimeRunner(path, "cpu") as runner, EagerRunner(model, "cpu") as eager:
        return check_parity(runner, eager, inputs, FP32, probes=labels)


def cost(reps: int, log) -> dict:
    build, architecture, _ = SUBJECTS["demo-trained"]
    from unet_export.flows.demo import DEMO_SIZE

    size = DEMO_SIZE[0]
    model = build()
    chosen, env = gates(architecture, model, size)
    times = {name: [] for name in chosen}
    with tempfile.TemporaryDirectory() as tmp:
        path = export(model, "onnx", Path(tmp) / "demo.onnx", architecture, size)
        judge(path, model, *chosen["two shapes"])  # warm the caches both share
        for rep in range(reps):
            for name, (inputs, labels) in chosen.items():
                started = time.perf_counter()
                report = judge(path, model, inputs, labels)
                times[name].append(time.perf_counter() - started)
                assert report.passed, report.failures()
            log(f"  rep {rep + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))
    pixels = {name: sum(x.numel() // x.shape[1] for x in inputs) for name, (inputs, _) in chosen.items()}
    median = {name: statistics.median(v) for name, v in times.items()}
    return {"model": f"demo-trained at {size}x{size}", "envelope": env.describe(), "seconds": times,
            "median_s": median, "pixels": pixels, "ratio": median["envelope"] / median["two shapes"],
            "shapes": {name: [list(x.shape) for x in inputs] for name, (inputs, _) in chosen.items()}}  # fmt: skip


def shape_damages(path: Path, size: int, env, work: Path):
    """The damages that depend on the shape, each inside the declared envelope."""
    box = env.boxes[0]
    above = (size + box.height[1]) // 2  # between the export size and the largest height
    yield f"wrong only when H > {above}", damage_when(path, work / "tall.onnx", axis=2, above=above)
    yield "wrong only for batch > 1", damage_when(path, work / "b1.onnx", axis=0, above=1)
    yield "wrong only for batch > 2", damage_when(path, work / "b2.onnx", axis=0, above=2)


def damage(subjects: list[str], log) -> list[dict]:
    rows = []
    for name in subjects:
        build, architecture, size = SUBJECTS[name]
        model = build()
        chosen, env = gates(architecture, model, size)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            path = export(model, "onnx", work / f"{name}.onnx", architecture, size)
            # lazily: damaged_files writes each scaled weight to one file name, judged before the next
            cases = itertools.chain([("correct", path)], damaged_files(name, model, path, architecture, size, work),
                                    shape_damages(path, size, env, work))  # fmt: skip
            for label, file in cases:
                expect = "pass" if label == "correct" else ("either" if "deepest" in label else "fail")
                verdicts = {}
                for gate, (inputs, labels) in chosen.items():
                    report = judge(file, model, inputs, labels)
                    verdicts[gate] = {"passed": report.passed, "failures": report.failures()[:3]}
                rows.append({"subject": name, "artefact": label, "expect": expect,
                             "envelope_pass": verdicts["envelope"]["passed"],
                             "two_shapes_pass": verdicts["two shapes"]["passed"],
                             "envelope_failures": verdicts["envelope"]["failures"],
                             "envelope": env.describe()})  # fmt: skip
                log(f"  {name:16} {label:42} envelope {'pass' if rows[-1]['envelope_pass'] else 'FAIL'}, "
                    f"two shapes {'pass' if rows[-1]['two_shapes_pass'] else 'FAIL'} (expected {expect})")
    return rows


def tally(rows: list[dict], key: str) -> dict:
    false_pass = [r for r in rows if r["expect"] == "fail" and r[key]]
    false_fail = [r for r in rows if r["expect"] == "pass" and not r[key]]
    return {"false_passes": len(false_pass), "false_failures": len(false_fail),
            "false_pass_cases": [f"{r['subject']}: {r['artefact']}" for r in false_pass],
            "false_failure_cases": [f"{r['subject']}: {r['artefact']}" for r in false_fail]}  # fmt: skip


def markdown(doc: dict) -> str:
    meta = doc["meta"]
    lines = [f"# The envelope against the two-shape gate ({meta['date']})", "",
             f"Machine: {meta['cpu']}, {meta['cores']} cores; torch {meta['versions'].get('torch')}, "
             f"onnxruntime {meta['versions'].get('onnxruntime')}. Command: `{meta['command']}`.", ""]  # fmt: skip
    if "cost" in doc:
        c = doc["cost"]
        lines += ["## Cost: the FP32 gate of the demo model's ONNX model", "",
                  f"{c['model']}, envelope {c['envelope']}; run_parity (session, eager fp32 and float64, ONNX "
                  f"Runtime), {len(c['seconds']['envelope'])} alternating repetitions.", "",
                  "| gate | shapes | pixels | median s | runs (s) |", "| --- | --- | ---: | ---: | --- |"]  # fmt: skip
        for name in c["seconds"]:
            shapes = ", ".join("x".join(map(str, s)) for s in c["shapes"][name])
            runs = ", ".join(f"{t:.2f}" for t in c["seconds"][name])
            lines.append(f"| {name} | {shapes} | {c['pixels'][name]} | {c['median_s'][name]:.2f} | {runs} |")
        verdict = "met" if c["ratio"] <= 2 else "MISSED"
        how = f" Command: `{c['meta']['command']}`." if "meta" in c else ""
        lines += ["", f"Envelope / two shapes: **{c['ratio']:.2f}x** (target at most 2x: {verdict}).{how}", ""]
    if "damage" in doc:
        rows = doc["damage"]
        lines += ["## Damage set: verdicts of the envelope and of the two-shape gate", "",
                  "| subject | artefact | expected | envelope | two shapes |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
        for r in rows:
            lines.append(f"| {r['subject']} | {r['artefact']} | {r['expect']} | "
                         f"{'pass' if r['envelope_pass'] else 'FAIL'} | {'pass' if r['two_shapes_pass'] else 'FAIL'} |")
        env, old = doc["tally"]["envelope"], doc["tally"]["two shapes"]
        lines += ["", f"Envelope: **{env['false_passes']} false passes, {env['false_failures']} false failures** "
                  f"(target 0 and 0). Two-shape gate: {old['false_passes']} false passes "
                  f"({'; '.join(old['false_pass_cases']) or 'none'}), {old['false_failures']} false failures.", ""]  # fmt: skip
        if "meta" in doc["tally"]:
            lines += [f"Command: `{doc['tally']['meta']['command']}`.", ""]
    return "\n".join(lines)


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("all", "cost", "damage"), default="all")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--subjects", default="demo-trained,milesial-w8-v4,milesial-w16,plain,reflect-sigmoid,resnet50")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    torch.manual_seed(0)
    info = device_info(torch.device("cpu"))
    meta = {"date": datetime.date.today().isoformat(), "cpu": info["name"], "cores": torch.get_num_threads(),
            "python": platform.python_version(), "versions": tool_versions("torch", "onnxruntime", "onnx"),
            "command": "python benchmarks/envelope.py " + " ".join(sys.argv[1:])}  # fmt: skip
    stem = args.out / f"{meta['date']}-envelope-{slug(info['name'])}"
    # A run of one part keeps the other part of an earlier run of the same day (each is measured
    # alone, on the same machine); the meta of each part is kept with it.
    doc = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").exists() else {}
    doc["meta"] = meta

    def log(text: str) -> None:
        print(text, flush=True)

    if args.part in ("all", "cost"):
        log("cost:")
        doc["cost"] = cost(args.reps, log) | {"meta": meta}
    if args.part in ("all", "damage"):
        log("damage:")
        doc["damage"] = damage(args.subjects.split(","), log)
        doc["tally"] = {"envelope": tally(doc["damage"], "envelope_pass"),
                        "two shapes": tally(doc["damage"], "two_shapes_pass"), "meta": meta}  # fmt: skip
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(doc) + "\n")
    log(f"wrote {stem}.md and .json")


if __name__ == "__main__":
    main()
