"""Measure the FP32 parity rule against an exact answer: every artefact's error against a float64
run of the eager model, next to eager fp32's own error against it (the noise floor).

    python benchmarks/parity_rule.py                      # everything (hours on 2 shared cores)
    python benchmarks/parity_rule.py --subjects milesial-w16,deeplab-bn --runtimes onnxruntime
    python benchmarks/parity_rule.py --rejudge A.json B.json   # merge runs, judge by the current rule

For each subject (a model with given weights) and each parity input (the export size with batch
1, and batch 2 at 250x375 fitted to the model's size rule, as `unet-export` checks), it records:

- ``floor``: max |eager fp32 - float64|, eager fp32's own arithmetic error on this input;
- ``err``: max |artefact - float64| for every runtime (ONNX Runtime, TorchScript, AOTInductor,
  OpenVINO fp32, eager channels-last) and for deliberately damaged artefacts;
- ``ratio`` = err / floor, ``rel`` = err / max(1, max |float64 logit|), the old rule's
  ``old_err`` = max |artefact - eager fp32| and its verdict, and the new rule's verdict with the
  tolerances in unet_export.parity.gate.FP32.

Writes benchmarks/results/<date>-parity-rule.json and .md (the table the README quotes).
"""

import argparse
import copy
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import onnx
import torch
import torch.nn as nn
from onnx import numpy_helper

from unet_export.bench.run import device_info
from unet_export.flows.demo import DEMO_WEIGHTS, random_milesial
from unet_export.workdir.manifest import tool_versions
from unet_export.checkpoint import build_model, load_checkpoint
from unet_export.runtimes.formats import FORMATS
from unet_export.models import create_model, get_spec
from unet_export.runtimes import AotiRunner, EagerRunner, OnnxRuntimeRunner, TorchCompileRunner, TorchScriptRunner
from unet_export.runtimes.openvino.runner import OpenVinoRunner
from unet_export.parity.gate import FP32, compare, seeded_inputs

HERE = Path(__file__).resolve().parent
RUNTIMES = ("onnxruntime", "torchscript", "aoti", "openvino", "eager-channels-last", "torch.compile")


# --- subjects: (model, export size) --------------------------------------------------------------


def deeplab_realistic_bn(n_classes: int = 21) -> nn.Module:
    """torchvision DeepLabV3 with BatchNorm statistics as real training leaves them: reset, momentum
    None (cumulative average), three train-mode passes on noise, eval. 54 channels end with
    running_var < 1e-3, the regime pretrained weights sit in."""
    torch.manual_seed(0)
    net = create_model("deeplabv3", n_classes=n_classes, aux_loss=True)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(2, 3, 96, 96))
    return net.eval()


def registry_model(name: str, **config) -> nn.Module:
    torch.manual_seed(0)  # as tests/runtimes/test_registry.py builds them
    return create_model(name, **config)


SUBJECTS = {
    # name: (builder, architecture, config, export size)
    "milesial-w8-v1": (lambda: random_milesial(0, width=8, n_classes=1, bilinear=True, conv_bias=True), "milesial", 256),
    "milesial-w8-v4": (lambda: random_milesial(0, width=8, n_classes=3), "milesial", 256),
    "milesial-w16": (lambda: random_milesial(0, width=16), "milesial", 256),
    "milesial-w32": (lambda: random_milesial(0, width=32), "milesial", 256),
    "milesial-w64": (lambda: random_milesial(0, width=64), "milesial", 256),
    "demo-trained": (lambda: build_model(load_checkpoint(DEMO_WEIGHTS)), "milesial", 128),
    "plain": (lambda: registry_model("plain", width=8), "plain", 64),
    "reflect": (lambda: registry_model("reflect", width=8), "reflect", 64),
    "reflect-sigmoid": (lambda: registry_model("reflect-sigmoid", width=8), "reflect-sigmoid", 64),
    "valid": (lambda: registry_model("valid", width=8), "valid", 188),
    "valid-pad": (lambda: registry_model("valid-pad", width=8), "valid-pad", 200),
    "valid-same": (lambda: registry_model("valid-same", width=8), "valid-same", 192),
    "resnet50": (lambda: registry_model("resnet50"), "resnet50", 64),
    "deeplabv3": (lambda: registry_model("deeplabv3", n_classes=3), "deeplabv3", 64),
    "deeplab-bn": (deeplab_realistic_bn, "deeplabv3", 256),
}


def parity_inputs(architecture: str, model: nn.Module, size: int, seed: int = 0) -> list[torch.Tensor]:
    """The shapes `unet-export` checks: 1xCxSxS and 2xCx250x375 fitted to the size rule."""
    rule = get_spec(architecture).sizes(getattr(model, "config", {}) or _config(architecture))
    channels = getattr(model, "n_channels", 3)
    return seeded_inputs([(1, channels, size, size), (2, channels, rule.fit(250), rule.fit(375))], seed)


def _config(architecture: str) -> dict:
    return {"concat": {"valid": 0, "valid-pad": 1, "valid-same": 2}.get(architecture, 0)}


# --- damage: what a broken exporter or a wrong file does -----------------------------------------


def scale_initializer(src: Path, dest: Path, name: str, factor: float) -> Path:
    """Copy of the ONNX model at ``src`` with initializer ``name`` multiplied by ``factor``."""
    proto = onnx.load(str(src))
    for init in proto.graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * factor, name))
            onnx.save(proto, str(dest))
            return dest
    raise KeyError(f"no initializer {name!r} in {src}")


def conv_initializers(path: Path) -> tuple[str, str]:
    """The weight names of the first and the last Conv/ConvTranspose node."""
    proto = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in proto.graph.initializer}
    weights = [n.input[1] for n in proto.graph.node if n.op_type in ("Conv", "ConvTranspose") and n.input[1] in inits]
    return weights[0], weights[-1]


class Normalised(nn.Module):
    """An ImageNet normalisation slipped in front of the model (the classic preprocessing bug)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x):
        return self.model((x - self.mean[:, : x.shape[1]]) / self.std[:, : x.shape[1]])


def with_bn_eps(model: nn.Module, eps: float, which: str = "first") -> nn.Module:
    """A copy with one BatchNorm's epsilon (the first, or all of them) changed."""
    model = copy.deepcopy(model)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns[:1] if which == "first" else bns:
        bn.eps = eps
    return model


# --- measurement ---------------------------------------------------------------------------------


def export(model: nn.Module, fmt: str, dest: Path, architecture: str, size: int) -> Path:
    rule = get_spec(architecture).sizes(_config(architecture))
    sample = torch.rand(1, getattr(model, "n_channels", 3), size, size)
    FORMATS[fmt].write(model, dest, sample, {}, dynamic=True, sizes=rule, device=torch.device("cpu"))
    return dest


def runner_for(runtime: str, files: dict, model: nn.Module):
    if runtime == "onnxruntime":
        return OnnxRuntimeRunner(files["onnx"], "cpu")
    if runtime == "openvino":
        return OpenVinoRunner(files["onnx"], "cpu", "fp32")
    if runtime == "torchscript":
        return TorchScriptRunner(files["torchscript"], "cpu")
    if runtime == "aoti":
        return AotiRunner(files["aoti"], "cpu")
    if runtime == "eager-channels-last":
        return EagerRunner(model, "cpu", channels_last=True)
    if runtime == "torch.compile":
        return TorchCompileRunner(model, "cpu")
    raise KeyError(runtime)


def row(subject: str, runtime: str, x: torch.Tensor, out: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor,
        expect: str) -> dict:  # fmt: skip
    new = compare(out, eager, FP32, exact=exact)
    old = compare(out, eager, FP32)  # no float64: the fixed rule the issue replaced, kept as a fallback
    floor = (eager.double() - exact).abs().max().item()
    err = (out.double() - exact).abs().max().item()
    scale = max(1.0, exact.abs().max().item())
    return {
        "subject": subject, "runtime": runtime, "shape": list(x.shape), "expect": expect,
        "max_abs_exact": exact.abs().max().item(), "floor": floor, "err": err,
        "ratio": err / floor if floor else float("inf"), "rel": err / scale,
        "old_err": (out - eager).abs().max().item(), "old_pass": old.passed,
        "allowed": new.atol, "new_pass": new.passed, "failures": new.failures,
        "class_flips": new.differing_pixels - new.tie_pixels, "ties": new.tie_pixels,
    }  # fmt: skip


def measure_subject(name: str, runtimes: list[str], damage: bool, work: Path, log) -> list[dict]:
    build, architecture, size = SUBJECTS[name]
    model = build()
    inputs = parity_inputs(architecture, model, size)
    with EagerRunner(model, "cpu") as eager, EagerRunner(model, "cpu", "fp64") as exact:
        refs = [(x, eager.infer(x), exact.infer(x)) for x in inputs]
    files: dict[str, Path] = {}
    for fmt in ("onnx", "torchscript", "aoti"):
        wanted = {"onnx": ("onnxruntime", "openvino"), "torchscript": ("torchscript",), "aoti": ("aoti",)}[fmt]
        if set(wanted) & set(runtimes) or (fmt == "onnx" and damage):
            started = time.perf_counter()
            files[fmt] = export(model, fmt, work / f"{name}{FORMATS[fmt].suffix}", architecture, size)
            log(f"  exported {fmt} in {time.perf_counter() - started:.0f} s")
    rows = []
    for runtime in runtimes:
        with runner_for(runtime, files, model) as runner:
            for x, ref, ref64 in refs:
                rows.append(row(name, runtime, x, runner.infer(x), ref, ref64, "pass"))
                log(_line(rows[-1]))
    if damage:
        for label, path in damaged_files(name, model, files["onnx"], architecture, size, work):
            with OnnxRuntimeRunner(path, "cpu") as runner:
                for x, ref, ref64 in refs:
                    expect = "either" if "deepest" in label else "fail"  # below any arithmetic noise: undetectable
                    rows.append(row(name, f"onnxruntime, {label}", x, runner.infer(x), ref, ref64, expect))
                    log(_line(rows[-1]))
    return rows


def damaged_files(name: str, model: nn.Module, onnx_path: Path, architecture: str, size: int, work: Path):
    first, last = conv_initializers(onnx_path)
    edits = [(f"first conv ({first}) x 1.001", first), (f"last conv ({last}) x 1.001", last)]
    if name.startswith("milesial") and "up4.up.weight" in {i.name for i in onnx.load(str(onnx_path)).graph.initializer}:
        edits += [("up4.up.weight x 1.001", "up4.up.weight"), ("up1.up.weight x 1.001 (deepest)", "up1.up.weight")]
    for label, init in edits:
        yield label, scale_initializer(onnx_path, work / f"{name}.damaged.onnx", init, 1.001)
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        yield "first BatchNorm eps 1e-5 -> 1e-3", export(with_bn_eps(model, 1e-3), "onnx", work / f"{name}.eps.onnx",
                                                          architecture, size)  # fmt: skip
    if name.startswith("milesial"):
        config = {k: getattr(model, k) for k in ("n_channels", "n_classes", "bilinear")}
        first_conv = model.inc.double_conv[0]
        other = random_milesial(1, **config, width=first_conv.out_channels, conv_bias=first_conv.bias is not None)
        yield "weights of seed 1", export(other, "onnx", work / f"{name}.seed1.onnx", architecture, size)
    if getattr(model, "n_channels", 3) == 3:
        yield "ImageNet normalisation in the graph", export(Normalised(model), "onnx", work / f"{name}.norm.onnx",
                                                             architecture, size)  # fmt: skip


def _as_expected(r: dict) -> bool:
    return r["expect"] == "either" or r["new_pass"] == (r["expect"] == "pass")


def _line(r: dict) -> str:
    shape = "x".join(map(str, r["shape"]))
    verdict = ("pass" if r["new_pass"] else "FAIL") + ("" if _as_expected(r) else " (!)")
    return (f"  {r['subject']:<16} {r['runtime']:<46} {shape:<12} floor {r['floor']:.2e} err {r['err']:.2e} "
            f"ratio {r['ratio']:8.2f} rel {r['rel']:.2e} | old {'pass' if r['old_pass'] else 'FAIL'} new {verdict}")  # fmt: skip


def rejudge(rows: list[dict]) -> list[dict]:
    """The verdicts of measured rows under the current FP32 rule. Exact, not an estimate: with
    max_class_change 0 a class can only change where the float64 margin is below 2 x the error,
    so a row passes if and only if err <= rtol x floor + atol x max(1, max |float64 logit|)."""
    for r in rows:
        r["allowed"] = FP32.allowed(r["floor"], max(1.0, r["max_abs_exact"]))
        r["new_pass"] = r["err"] <= r["allowed"]
        r.pop("failures", None), r.pop("class_flips", None), r.pop("ties", None)  # were at the bound measured with
    return rows


def summary(rows: list[dict]) -> list[str]:
    """The margins the rule leaves on both sides."""
    correct = [r for r in rows if r["expect"] == "pass"]
    damaged = [r for r in rows if r["expect"] == "fail"]
    worst = max(correct, key=lambda r: r["err"] / r["allowed"])
    closest = min(damaged, key=lambda r: r["err"] / r["allowed"])
    top = max(correct, key=lambda r: r["ratio"])
    low = min(damaged, key=lambda r: r["ratio"])
    return [
        f"- correct artefacts ({len(correct)} rows): err / floor at most {top['ratio']:.2f} ({top['subject']}, "
        f"{top['runtime']}, {'x'.join(map(str, top['shape']))}); closest to the bound: {worst['err'] / worst['allowed']:.2f} "
        f"x allowed ({worst['subject']}, {worst['runtime']}): a margin of {worst['allowed'] / worst['err']:.1f} x",
        f"- damaged artefacts ({len(damaged)} rows): err / floor at least {low['ratio']:.2f} ({low['subject']}, "
        f"{low['runtime']}, {'x'.join(map(str, low['shape']))}); closest to the bound: "
        f"{closest['err'] / closest['allowed']:.2f} x allowed ({closest['subject']}, {closest['runtime']})",
        f"- old rule (1e-4 x max(1, max|logit|) against eager fp32): {sum(not r['old_pass'] for r in correct)} correct "
        f"rows failed, {sum(r['old_pass'] for r in damaged)} damaged rows passed; new rule: "
        f"{sum(not r['new_pass'] for r in correct)} and {sum(r['new_pass'] for r in damaged)}",
        "- err / floor of correct artefacts, by runtime (min - max): " + "; ".join(
            f"{name} {min(v):.2f} - {max(v):.2f}" for name, v in _grouped(correct, lambda r: r["runtime"]).items()),
        "- err / floor of damaged artefacts, by damage (smallest): " + "; ".join(
            f"{name} {min(v):.3g}" for name, v in _grouped(damaged, _damage).items()),
    ]  # fmt: skip


def _damage(r: dict) -> str:
    label = r["runtime"].split(", ", 1)[1]
    return label.split(" (")[0] if label.startswith(("first conv", "last conv")) else label


def _grouped(rows: list[dict], key) -> dict[str, list[float]]:
    groups: dict[str, list[float]] = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r["ratio"])
    return groups


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# FP32 parity rule: error against float64",
        "",
        f"{meta['machine']}; torch {meta['versions']['torch']}, onnxruntime {meta['versions']['onnxruntime']}, "
        f"openvino {meta['versions']['openvino']}. Measured by: " + "; ".join(f"`{c}`" for c in meta["commands"]) + ".",
        "",
        f"Rule: err <= {FP32.rtol:g} x floor + {FP32.rel_atol:g} x max(1, max |float64 logit|) (and no class change "
        "outside float64 ties, implied by it). floor = max |eager fp32 - float64|, err = max |artefact - float64|; "
        "`vs eager fp32` is max |artefact - eager fp32|, what the old rule (<= 1e-4 x max(1, max |logit|)) judged. "
        "expected `either`: a damage below float32's own noise, undetectable by any rule.",
        "",
        *summary(rows),
        "",
        "| subject | artefact | input | max abs logit | floor (eager fp32 vs f64) | err (artefact vs f64) | err / floor | "
        "err / max(1, max abs logit) | vs eager fp32 | old rule | new rule | expected |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['subject']} | {r['runtime']} | {'x'.join(map(str, r['shape']))} | {r['max_abs_exact']:.3g} | "
            f"{r['floor']:.2e} | {r['err']:.2e} | {r['ratio']:.2f} | {r['rel']:.2e} | {r['old_err']:.2e} | "
            f"{'pass' if r['old_pass'] else 'FAIL'} | {'pass' if r['new_pass'] else 'FAIL'} | {r['expect']} |"
        )  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", default=",".join(SUBJECTS), help=f"comma-separated: {', '.join(SUBJECTS)}")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help=f"comma-separated: {', '.join(RUNTIMES)}")
    parser.add_argument("--no-damage", action="store_true", help="skip the damaged artefacts")
    parser.add_argument("--rejudge", nargs="+", metavar="JSON", help="no measuring: merge these results and judge "
                        "them by the current rule (exact, see rejudge())")  # fmt: skip
    parser.add_argument("--out", default=str(HERE / "results" / f"{datetime.date.today()}-parity-rule"))
    args = parser.parse_args()
    command = "python benchmarks/parity_rule.py " + " ".join(sys.argv[1:])
    if args.rejudge:
        runs = [json.loads(Path(p).read_text()) for p in args.rejudge]
        rows = rejudge([r for run in runs for r in run["rows"]])
        commands = [c for run in runs for c in run["meta"].get("commands", [run["meta"].get("command")])]
        meta = runs[0]["meta"] | {"commands": commands + [command], "seconds": sum(run["meta"]["seconds"] for run in runs)}
        meta.pop("command", None)
        meta["machine"] = f"{device_info(torch.device('cpu'))['name']}, {torch.get_num_threads()} threads"  # measured here
    else:
        rows, started = [], time.perf_counter()
        with tempfile.TemporaryDirectory() as work:
            for name in args.subjects.split(","):
                print(f"{name}:", flush=True)
                rows += measure_subject(name, args.runtimes.split(","), not args.no_damage, Path(work),
                                        lambda line: print(line, flush=True))  # fmt: skip
        meta = {"commands": [command], "machine": f"{device_info(torch.device('cpu'))['name']}, {torch.get_num_threads()} threads",
                "versions": tool_versions("torch", "onnxruntime", "openvino"), "seconds": time.perf_counter() - started}  # fmt: skip
    meta["rule"] = {"rtol": FP32.rtol, "atol": FP32.rel_atol}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(rejudge(rows), meta))
    wrong = [r for r in rows if not _as_expected(r)]
    print(f"wrote {out}.json/.md ({meta['seconds']:.0f} s of measuring); {len(wrong)} verdicts differ from the expectation")
    print("\n".join(summary(rows)))
    for r in wrong:
        print("unexpected:", _line(r))


if __name__ == "__main__":
    main()
