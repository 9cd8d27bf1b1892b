"""`unet-export`: thin commands that parse options, call unet_export.api, and render."""

import functools
import json
from pathlib import Path
from typing import Annotated

import typer

from unet_export.api import build_trt, export_artifact, export_fp16_onnx, require_real_images, resolve_device
from unet_export.bench.run import benchmark, exit_code
from unet_export.cli.data import app as data_app
from unet_export.cli.train import register as register_training
from unet_export.cli.predict import register as register_predict
from unet_export.cli.serve import register as register_serving
from unet_export.cli.export import register as register_deploy, shower
from unet_export.cli.system import register as register_inspect
from unet_export.cli.common import (Device, DeviceOpt, ModelOpt, VersionOpt, Weights, Workdir, cli_errors, console,
                                     fail, run_app, working)
from unet_export.cli.jsonout import JsonOpt, json_result
from unet_export.cli.render import (
    bench_table, cpp_table, dice_table, doctor_table, export_report, row_line, verify_report,
)
from unet_export.cli.tolerances import Atol, MaxClassChange, MinDice, RealData, Rtol, one_gate
from unet_export.flows.cpp_check import cpp_check
from unet_export.flows.demo import DEMO_INT8_BACKENDS, DEMO_SIZE, DEMO_VAL, DEMO_WEIGHTS, demo_int8
from unet_export.flows.doctor import run_checks
from unet_export.flows.evaluate import evaluate
from unet_export.runtimes.formats import FORMATS
from unet_export.errors import UserError
from unet_export.runtimes.onnx.fp16 import check_fp32_layers
from unet_export.runtimes.onnx.export import DEFAULT_OPSET
from unet_export.flows.verify import verify_workdir

app = typer.Typer(
    help="Export U-Net checkpoints to verified deployment artefacts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _options(version: VersionOpt = False) -> None:
    """Export U-Net checkpoints to verified deployment artefacts."""

# torch.compile's CPU build alone takes a minute on 2 cores: the demo leaves it to unet-bench.
DEMO_CPU_BACKENDS = ["eager", "eager-channels-last", "eager-bf16", "torchscript", "aoti", "onnxruntime", "openvino",
                     "openvino-bf16"]  # fmt: skip
Height = Annotated[int, typer.Option(help="Export and first parity size: height.")]
Width = Annotated[int, typer.Option(help="Export and first parity size: width.")]


FP32Layers = Annotated[
    list[str] | None,
    typer.Option("--fp32-layers", metavar="<pattern>", help="Keep matching layers in FP32 (glob on ONNX node name, op type or module "
                 "path, e.g. 'outc*' or Resize); repeatable."),
]  # fmt: skip


STEP = {"onnx": "exporting ONNX", "torchscript": "scripting TorchScript", "aoti": "compiling the AOTInductor package"}


def _export(fmt: str, weights: Path, workdir: Path, json_path: Path | None, **options) -> None:
    with json_result(json_path, "export", f"unet-export {fmt}", workdir) as out:
        with working(fmt, f"{STEP[fmt]} and checking parity"):
            result = export_artifact(weights, fmt, workdir, **options)
        out.add_export(result)
        export_report(result, workdir)
        raise typer.Exit(0 if result.passed else 1)


@app.command("onnx")
@cli_errors
def onnx_cmd(
    weights: Weights,
    workdir: Workdir = Path("exports"),
    opset: Annotated[int, typer.Option(help="ONNX opset (at most 18 keeps ORT's CUDA Resize).")] = DEFAULT_OPSET,
    height: Height = 256,
    width: Width = 256,
    static: Annotated[bool, typer.Option("--static", help="Fix batch and size to the export shape.")] = False,
    fp16: Annotated[bool, typer.Option("--fp16", help="Also write DIR/<stem>.fp16.onnx (FP32 I/O), verified.")] = False,
    fp32_layers: FP32Layers = None,
    device: DeviceOpt = "auto",
    model: ModelOpt = None,
    rtol: Rtol = None,
    atol: Atol = None,
    max_class_change: MaxClassChange = None,
    min_dice: MinDice = None,
    data: RealData = None,
    json_path: JsonOpt = None,
) -> None:
    """Checkpoint -> DIR/<stem>.onnx, checked against the eager model (exit 1 if parity fails)."""
    with json_result(json_path, "export", "unet-export onnx", workdir) as out:
        _onnx(weights, workdir, out, opset=opset, height=height, width=width, static=static, fp16=fp16,
              fp32_layers=fp32_layers, device=device, model=model, rtol=rtol, atol=atol,
              max_class_change=max_class_change, min_dice=min_dice, data=data)  # fmt: skip


def _onnx(weights, workdir, out, *, opset, height, width, static, fp16, fp32_layers, device, model, rtol, atol,
          max_class_change, min_dice, data) -> None:  # fmt: skip
    if fp16:  # the FP16 model is judged on real images: refused before the FP32 one is written
        require_real_images("fp16", weights, model, data)
    if fp32_layers and not fp16:
        raise UserError("--fp32-layers applies to the FP16 model: add --fp16")
    one_gate(fp16, max_class_change=max_class_change, min_dice=min_dice)  # --rtol/--atol: the FP32 model's gate
    # Patterns that match no node are refused before the FP32 model is published, not after.
    check = functools.partial(check_fp32_layers, fp32_layers=fp32_layers, name=f"{Path(weights).stem}.onnx") \
        if fp32_layers else None
    with working("onnx", f"{STEP['onnx']} and checking parity"):
        result = export_artifact(weights, "onnx", workdir, opset=opset, height=height, width=width, static=static,
                                 device=device.value, model=model, rtol=rtol, atol=atol, check_staged=check)  # fmt: skip
    out.add_export(result)
    export_report(result, workdir)
    passed = result.passed
    if fp16 and passed:
        with working("onnx --fp16", "converting to FP16 and checking parity"):
            half = export_fp16_onnx(workdir, fp32_layers=fp32_layers, device=device.value, data=data,
                                    max_class_change=max_class_change, min_dice=min_dice)  # fmt: skip
        out.add_export(half)
        export_report(half, workdir)
        passed = half.passed
    raise typer.Exit(0 if passed else 1)


@app.command("torchscript")
@cli_errors
def torchscript_cmd(
    weights: Weights,
    workdir: Workdir = Path("exports"),
    height: Height = 256,
    width: Width = 256,
    device: DeviceOpt = "auto",
    model: ModelOpt = None,
    rtol: Rtol = None,
    atol: Atol = None,
    json_path: JsonOpt = None,
) -> None:
    """Checkpoint -> DIR/<stem>.ts (torch.jit.load / libtorch), checked against the eager model."""
    _export("torchscript", weights, workdir, json_path, height=height, width=width, device=device.value, model=model,
            rtol=rtol, atol=atol)  # fmt: skip


@app.command("aoti")
@cli_errors
def aoti_cmd(
    weights: Weights,
    workdir: Workdir = Path("exports"),
    height: Height = 256,
    width: Width = 256,
    static: Annotated[bool, typer.Option("--static", help="Fix batch and size to the export shape.")] = False,
    device: DeviceOpt = "auto",
    model: ModelOpt = None,
    rtol: Rtol = None,
    atol: Atol = None,
    json_path: JsonOpt = None,
) -> None:
    """Checkpoint -> DIR/<stem>.pt2 (AOTInductor, for torch::inductor::AOTIModelPackageLoader), verified."""
    _export("aoti", weights, workdir, json_path, height=height, width=width, static=static, device=device.value, model=model,
            rtol=rtol, atol=atol)  # fmt: skip


@app.command("cpp-check")
@cli_errors
def cpp_check_cmd(
    workdir: Workdir = Path("exports"),
    build_dir: Annotated[Path, typer.Option(help="CMake build folder for examples/cpp.")] = Path("build/cpp"),
    device: Annotated[Device, typer.Option(help="Where the C++ and Python models run (CUDA needs a CUDA libtorch).")] = Device.cpu,
) -> None:
    """Build examples/cpp against the installed libtorch, run DIR's TorchScript and .pt2 artefacts
    from C++, and compare with Python (exit 1 on a mismatch)."""
    with working("cpp-check", "building examples/cpp and running the artefacts from C++"):
        rows = cpp_check(workdir, build_dir, device.value)
    console.print(cpp_table(rows))
    raise typer.Exit(1 if any(r["status"] == "parity_failed" for r in rows) else 0)


@app.command("doctor")
@cli_errors
def doctor_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print the checks as JSON on stdout, not a table; "
                                          "--json PATH writes the unet-export.doctor document to PATH.")] = False,
    json_path: Annotated[Path | None, typer.Argument(hidden=True, metavar="PATH")] = None,
) -> None:
    """What this machine can run and why not: torch/CUDA/GPUs, TensorRT, ONNX Runtime, OpenVINO,
    the C++ toolchain, versions against the lock. Always exits 0."""
    # `--json` alone prints the bare list of checks, as it always has; `--json PATH` (PATH read
    # as doctor's one argument: Typer has no option with an optional value) writes the document.
    if json_path is not None and not as_json:
        raise UserError(f"doctor takes no argument: to write the checks to {json_path}, use --json {json_path}")
    with json_result(json_path, "doctor", "unet-export doctor") as out:
        rows = run_checks()
        out["checks"] = [row.to_dict() for row in rows]
        if json_path is not None:
            console.print(f"wrote {json_path}")
        elif as_json:
            print(json.dumps([row.to_dict() for row in rows], indent=2))
        else:
            console.print(doctor_table(rows))


@app.command("trt")
@cli_errors
def trt_cmd(
    fp16: Annotated[bool, typer.Option("--fp16/--fp32", help="Engine precision.")] = True,
    workdir: Workdir = Path("exports"),
    onnx: Annotated[Path | None, typer.Option(help="ONNX model (default: the FP32 ONNX in DIR/manifest.json).")] = None,
    min_shape: Annotated[str | None, typer.Option(help="Profile minimum NxCxHxW (default batch 1, export size).")] = None,
    opt_shape: Annotated[str | None, typer.Option(help="Profile optimum NxCxHxW (default batch 8, export size).")] = None,
    max_shape: Annotated[str | None, typer.Option(help="Profile maximum NxCxHxW (default batch 16, export size).")] = None,
    workspace: Annotated[float, typer.Option(help="Builder workspace in GiB.")] = 4.0,
    timing_cache: Annotated[Path | None, typer.Option(help="Timing cache reused across builds (default DIR/timing.cache).")] = None,
    fp32_layers: FP32Layers = None,
    rtol: Rtol = None,
    atol: Atol = None,
    max_class_change: MaxClassChange = None,
    min_dice: MinDice = None,
    data: RealData = None,
    json_path: JsonOpt = None,
) -> None:
    """The ONNX model in DIR -> DIR/<stem>.<precision>.engine, checked against eager CUDA."""
    with json_result(json_path, "export", "unet-export trt", workdir) as out:
        _trt(workdir, out, fp16=fp16, onnx=onnx, min_shape=min_shape, opt_shape=opt_shape, max_shape=max_shape,
             workspace=workspace, timing_cache=timing_cache, fp32_layers=fp32_layers, rtol=rtol, atol=atol,
             max_class_change=max_class_change, min_dice=min_dice, data=data)  # fmt: skip


def _trt(workdir, out, *, fp16, onnx, min_shape, opt_shape, max_shape, workspace, timing_cache, fp32_layers, rtol,
         atol, max_class_change, min_dice, data) -> None:  # fmt: skip
    one_gate(fp16, rtol=rtol, atol=atol, max_class_change=max_class_change, min_dice=min_dice, to_fp32="add --fp32",
             to_reduced="drop --fp32")  # fmt: skip
    with working("trt", "building the TensorRT engine and checking parity"):
        result = build_trt(workdir, precision="fp16" if fp16 else "fp32", onnx=onnx, min_shape=min_shape,
                           opt_shape=opt_shape, max_shape=max_shape, workspace_gib=workspace,
                           timing_cache=timing_cache, fp32_layers=fp32_layers, rtol=rtol, atol=atol,
                           max_class_change=max_class_change, min_dice=min_dice, data=data)  # fmt: skip
    out.add_export(result)
    export_report(result, workdir)
    raise typer.Exit(0 if result.passed else 1)


@app.command("verify")
@cli_errors
def verify_cmd(
    workdir: Workdir = Path("exports"),
    data: RealData = None,
    images: Annotated[int, typer.Option(help="At most this many images from --data or the held-out set.")] = 8,
    device: DeviceOpt = "auto",
    weights: Annotated[Path | None, typer.Option(help="Checkpoint, if the manifest's has moved.")] = None,
    rtol: Rtol = None,
    atol: Atol = None,
    max_class_change: MaxClassChange = None,
    min_dice: MinDice = None,
    json_path: JsonOpt = None,
) -> None:
    """Re-run the parity gate of every artefact in DIR's manifest on this machine and record the
    verdicts (exit 1 if one fails, 2 if a file changed since it was verified)."""
    with json_result(json_path, "verify", "unet-export verify", workdir) as out:
        with working("verify", f"re-running the parity gate of every artefact in {workdir}"):
            report = verify_workdir(workdir, data=data, images=images, device=device.value, weights=weights,
                                    rtol=rtol, atol=atol, max_class_change=max_class_change, min_dice=min_dice)  # fmt: skip
        out.add_verify(report)
        verify_report(report)
        changed = [v for v in report.verdicts if v.status in ("changed", "missing")]
        if changed:
            reason = "; ".join(v.reason for v in changed)
            out["error"] = reason
            fail(reason, 2)
        raise typer.Exit(report.exit_code)


@app.command("demo")
@cli_errors
def demo_cmd(workdir: Workdir = Path("exports/demo"), device: DeviceOpt = "auto") -> None:
    """The whole job on the shipped default model, offline: export, verify, Dice, benchmark."""
    sidecar = json.loads(DEMO_WEIGHTS.with_suffix(".json").read_text())
    console.print(f"[bold]demo[/]: milesial U-Net (width {sidecar['config']['width']}, {sidecar['config']['n_classes']} "
                  f"classes) trained for {sidecar['epoch']} epochs on synthetic shapes (scripts/train_demo_model.sh)")  # fmt: skip
    height, width = DEMO_SIZE
    passed = True
    for fmt in FORMATS:
        result = export_artifact(DEMO_WEIGHTS, fmt, workdir, device=device.value, height=height, width=width)
        export_report(result, workdir)
        passed &= result.passed
    # INT8 (OpenVINO IR via NNCF, ONNX via ONNX Runtime): calibrated on half of the validation set,
    # gated (and benchmarked) on the other half, which calibration never saw.
    passed &= all(r.passed for r in demo_int8(workdir, device=device.value, on_result=shower(workdir)))
    console.print(dice_table(evaluate(DEMO_WEIGHTS, DEMO_VAL, workdir, device=device.value), "the shipped validation set"))
    cpu_rows = DEMO_CPU_BACKENDS + DEMO_INT8_BACKENDS
    report = benchmark(workdir, batch=8, backends=None if resolve_device(device.value).type == "cuda" else cpu_rows,
                       device=device.value, data=DEMO_VAL, warmup=2, min_time=2.0,
                       on_row=lambda row: console.print(row_line(row)))  # fmt: skip
    console.print(bench_table(report))
    raise typer.Exit(0 if passed and exit_code(report.rows) == 0 else 1)


app.add_typer(data_app, name="data")
register_training(app)
register_predict(app)
register_serving(app)
register_deploy(app)
register_inspect(app)


def main() -> None:
    run_app(app)
