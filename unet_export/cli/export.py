"""`unet-export onnx|torchscript|aoti|trt|openvino|int8`: the export commands, thin over
unet_export.api (flows/export.py, openvino.py, int8.py); what they print is cli/render_export.py."""

import functools
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from unet_export.api import (
    build_trt,
    export_artifact,
    export_fp16_onnx,
    export_openvino,
    ExportResult,
    quantize_int8,
    require_real_images,
)
from unet_export.cli.common import cli_errors, working
from unet_export.cli.jsonout import JsonOpt, JunitOpt, ReportOpt, json_result
from unet_export.cli.options import (
    DeviceOpt, ModelOpt, RebuildFactoryOpt, Weights, Workdir, model_choice, with_model_flags,
)  # fmt: skip
from unet_export.cli.render_export import export_report, search_report, shower, weights_line
from unet_export.cli.tolerances import Atol, MaxClassChange, MinDice, RealData, Rtol, one_gate
from unet_export.errors import UserError
from unet_export.device import resolve_device
from unet_export.flows.fallback import DEFAULT_BUDGET_S, search_fp16
from unet_export.parity.envelope import parse_size
from unet_export.runtimes.onnx.export import DEFAULT_OPSET
from unet_export.runtimes.onnx.fp16 import check_fp32_layers

Height = Annotated[int, typer.Option(help="Export and first parity size: height.")]
Width = Annotated[int, typer.Option(help="Export and first parity size: width.")]

# openvino and int8 convert an ONNX model; they export it first when DIR has none.
SourceHeight = Annotated[int, typer.Option(help="Export size of the ONNX model when it has to be exported first: height.")]
SourceWidth = Annotated[int, typer.Option(help="Export size of the ONNX model when it has to be exported first: width.")]

MaxBatch = Annotated[
    int | None, typer.Option("--max-batch", help="Largest batch the artefact declares and is proven at (default 8).")
]
Smallest = Annotated[
    str | None,
    typer.Option("--smallest", metavar="HxW", help="Smallest height x width it declares and is proven at (default the "
                 "export size; predict pads smaller images up to it)."),
]  # fmt: skip
Largest = Annotated[
    str | None,
    typer.Option("--largest", metavar="HxW", help="Largest height x width it declares and is proven at (default 1.5 x "
                 "the export size). The gate checks the envelope at its corners and edges."),
]  # fmt: skip

FP32Layers = Annotated[
    list[str] | None,
    typer.Option("--fp32-layers", metavar="<pattern>", help="Keep matching layers in FP32 (glob on the PyTorch module path, the ONNX node "
                 "name or the op type, e.g. up4.up, node_convolution_3, 'outc*' or Resize); repeatable."),
]  # fmt: skip


FallbackBudget = Annotated[
    float, typer.Option(help="Seconds --fallback auto may spend building and judging candidate FP32 sets.")
]


class FP16Fallback(str, Enum):
    none = "none"
    auto = "auto"


FP16FallbackOpt = Annotated[
    FP16Fallback,
    typer.Option("--fallback", help="auto: when the FP16 artefact fails its real-image gate, search for the fewest "
                 "convolutions to keep in FP32 (judged by the gate; on a CPU only FP16 storage is proven)."),
]  # fmt: skip


class Fallback(str, Enum):
    presets = "presets"
    auto = "auto"
    none = "none"


class Engine(str, Enum):
    openvino = "openvino"
    onnxruntime = "onnxruntime"
    all = "all"


def envelope_options(max_batch: int | None, smallest: str | None, largest: str | None) -> dict:
    """--max-batch/--smallest/--largest as export_artifact takes them ('512x768' -> (512, 768))."""
    return {"max_batch": max_batch, "min_size": parse_size(smallest, "--smallest") if smallest else None,
            "max_size": parse_size(largest, "--largest") if largest else None}  # fmt: skip


STEP = {"onnx": "exporting ONNX", "torchscript": "scripting TorchScript", "aoti": "compiling the AOTInductor package"}


def _export(fmt: str, weights: Path, workdir: Path, json_path: Path | None, report_path: Path | None,
            junit_path: Path | None, **options) -> None:
    with json_result(json_path, "export", f"unet-export {fmt}", workdir, report=report_path, junit=junit_path) as out:
        with working(fmt, f"{STEP[fmt]} and checking parity"):
            result = export_artifact(weights, fmt, workdir, **options)
        out.add_export(result)
        export_report(result, workdir)
        raise typer.Exit(0 if result.passed else 1)


@cli_errors
@with_model_flags()
def onnx_cmd(
    weights: Weights,
    workdir: Workdir = Path("exports"),
    opset: Annotated[int, typer.Option(help="ONNX opset (at most 18 keeps ORT's CUDA Resize).")] = DEFAULT_OPSET,
    height: Height = 256,
    width: Width = 256,
    static: Annotated[bool, typer.Option("--static", help="Fix batch and size to the export shape.")] = False,
    max_batch: MaxBatch = None,
    smallest: Smallest = None,
    largest: Largest = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="Also write DIR/<stem>.fp16.onnx (FP32 I/O), verified.")] = False,
    fp32_layers: FP32Layers = None,
    fallback: FP16FallbackOpt = FP16Fallback.none,
    fallback_budget: FallbackBudget = DEFAULT_BUDGET_S,
    device: DeviceOpt = "auto",
    model: ModelOpt = None,
    rtol: Rtol = None,
    atol: Atol = None,
    max_class_change: MaxClassChange = None,
    min_dice: MinDice = None,
    data: RealData = None,
    json_path: JsonOpt = None,
    report_path: ReportOpt = None,
    junit_path: JunitOpt = None,
) -> None:
    """Checkpoint -> DIR/<stem>.onnx, checked against the eager model (exit 1 if parity fails)."""
    with json_result(json_path, "export", "unet-export onnx", workdir, report=report_path, junit=junit_path) as out:
        out.images = data  # the HTML report's pictures use the same images
        _onnx(weights, workdir, out, opset=opset, height=height, width=width, static=static, fp16=fp16,
              max_batch=max_batch, smallest=smallest, largest=largest,
              fp32_layers=fp32_layers, device=device, model=model, rtol=rtol, atol=atol,
              max_class_change=max_class_change, min_dice=min_dice, data=data,
              search=_budget(fallback, fallback_budget, fp16))  # fmt: skip


def _budget(fallback: FP16Fallback, budget: float, fp16: bool) -> float | None:
    """--fallback auto's budget in seconds (None: no search); it searches FP16 layers only."""
    if fallback is FP16Fallback.none:
        return None
    if not fp16:
        raise UserError("--fallback auto searches the FP16 artefact's FP32 layers: add --fp16")
    if not budget > 0 or budget == float("inf"):
        raise UserError(f"--fallback-budget must be a number of seconds > 0, got {budget}")
    return budget


def _onnx(weights, workdir, out, *, opset, height, width, static, fp16, fp32_layers, device, model, rtol, atol,
          max_class_change, min_dice, data, search=None, max_batch=None, smallest=None,
          largest=None) -> None:  # fmt: skip
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
                                 device=device.value, model=model, rtol=rtol, atol=atol, check_staged=check,
                                 **envelope_options(max_batch, smallest, largest))  # fmt: skip
    out.add_export(result)
    export_report(result, workdir)
    passed = result.passed
    if fp16 and passed:
        build = functools.partial(export_fp16_onnx, workdir, device=device.value, data=data, model=model,
                                  max_class_change=max_class_change, min_dice=min_dice)  # fmt: skip
        with working("onnx --fp16", "converting to FP16 and checking parity"):
            half = build(fp32_layers=fp32_layers)
        if not half.passed and search is not None:
            export_report(half, workdir)
            with working("onnx --fp16 --fallback auto", "searching for layers to keep in FP32"):
                half = search_fp16(workdir, lambda nodes: build(fp32_layers=[*(fp32_layers or []), *nodes]), half, search,
                                   data, on_cpu=resolve_device(device.value).type == "cpu", time_it=True)  # fmt: skip
        out.add_export(half)
        export_report(half, workdir)
        if half.entry.get("fallback"):
            search_report(half.entry["fallback"])
        passed = half.passed
    raise typer.Exit(0 if passed else 1)


@cli_errors
@with_model_flags()
def torchscript_cmd(
    weights: Weights,
    workdir: Workdir = Path("exports"),
    height: Height = 256,
    width: Width = 256,
    max_batch: MaxBatch = None,
    smallest: Smallest = None,
    largest: Largest = None,
    device: DeviceOpt = "auto",
    model: ModelOpt = None,
    rtol: Rtol = None,
    atol: Atol = None,
    json_path: JsonOpt = None,
    report_path: ReportOpt = None,
    junit_path: JunitOpt = None,
) -> None:
    """Checkpoint -> DIR/<stem>.ts (torch.jit.load / libtorch), checked against the eager model."""
    _export("torchscript", weights, workdir, json_path, report_path, junit_path, height=height, width=width, device=device.value, model=model,
            rtol=rtol, atol=atol, **envelope_options(max_batch, smallest, largest))  # fmt: skip


@cli_errors
@with_model_flags()
def aoti_cmd(
    weights: Weights,
    workdir: Workdir = Path("exports"),
    height: Height = 256,
    width: Width = 256,
    static: Annotated[bool, typer.Option("--static", help="Fix batch and size to the export shape.")] = False,
    max_batch: MaxBatch = None,
    smallest: Smallest = None,
    largest: Largest = None,
    device: DeviceOpt = "auto",
    model: ModelOpt = None,
    rtol: Rtol = None,
    atol: Atol = None,
    json_path: JsonOpt = None,
    report_path: ReportOpt = None,
    junit_path: JunitOpt = None,
) -> None:
    """Checkpoint -> DIR/<stem>.pt2 (AOTInductor, for torch::inductor::AOTIModelPackageLoader), verified."""
    _export("aoti", weights, workdir, json_path, report_path, junit_path, height=height, width=width, static=static, device=device.value, model=model,
            rtol=rtol, atol=atol, **envelope_options(max_batch, smallest, largest))  # fmt: skip


@cli_errors
def trt_cmd(
    fp16: Annotated[bool, typer.Option("--fp16/--fp32", help="Engine precision.")] = True,
    workdir: Workdir = Path("exports"),
    onnx: Annotated[Path | None, typer.Option(help="ONNX model (default: the FP32 ONNX in DIR/manifest.json).")] = None,
    min_shape: Annotated[str | None, typer.Option(help="Profile minimum NxCxHxW (default batch 1, export size).")] = None,
    opt_shape: Annotated[str | None, typer.Option(help="Profile optimum NxCxHxW (default batch 8, export size).")] = None,
    max_shape: Annotated[str | None, typer.Option(help="Profile maximum NxCxHxW (default batch 16, export size).")] = None,
    profile: Annotated[
        list[str] | None,
        typer.Option("--profile", metavar="MIN:OPT:MAX", help="An optimisation profile, each shape NxCxHxW (repeat "
                     "for several, e.g. 1x3x256x256:1x3x256x256:1x3x512x512 and 8x3x640x960:8x3x640x960:8x3x640x960); "
                     "instead of --min/--opt/--max-shape. Each is proven at its corners and edges."),
    ] = None,
    workspace: Annotated[float, typer.Option(help="Builder workspace in GiB.")] = 4.0,
    timing_cache: Annotated[Path | None, typer.Option(help="Timing cache reused across builds (default DIR/timing.cache).")] = None,
    fp32_layers: FP32Layers = None,
    fallback: FP16FallbackOpt = FP16Fallback.none,
    fallback_budget: FallbackBudget = DEFAULT_BUDGET_S,
    rtol: Rtol = None,
    atol: Atol = None,
    max_class_change: MaxClassChange = None,
    min_dice: MinDice = None,
    data: RealData = None,
    model_factory: RebuildFactoryOpt = None,
    json_path: JsonOpt = None,
    report_path: ReportOpt = None,
    junit_path: JunitOpt = None,
) -> None:
    """The ONNX model in DIR -> DIR/<stem>.<precision>.engine, checked against eager CUDA."""
    with json_result(json_path, "export", "unet-export trt", workdir, report=report_path, junit=junit_path) as out:
        out.images = data  # the HTML report's pictures use the same images
        _trt(workdir, out, fp16=fp16, onnx=onnx, min_shape=min_shape, opt_shape=opt_shape, max_shape=max_shape,
             profiles=profile, workspace=workspace, timing_cache=timing_cache, fp32_layers=fp32_layers, rtol=rtol,
             atol=atol,
             max_class_change=max_class_change, min_dice=min_dice, data=data,
             model=model_choice(None, model_factory=model_factory), search=_budget(fallback, fallback_budget, fp16))  # fmt: skip


def _trt(workdir, out, *, fp16, onnx, min_shape, opt_shape, max_shape, workspace, timing_cache, fp32_layers, rtol,
         atol, max_class_change, min_dice, data, model, search=None, profiles=None) -> None:  # fmt: skip
    one_gate(fp16, rtol=rtol, atol=atol, max_class_change=max_class_change, min_dice=min_dice, to_fp32="add --fp32",
             to_reduced="drop --fp32")  # fmt: skip
    build = functools.partial(build_trt, workdir, precision="fp16" if fp16 else "fp32", onnx=onnx, min_shape=min_shape,
                              opt_shape=opt_shape, max_shape=max_shape, workspace_gib=workspace,
                              profiles=profiles, timing_cache=timing_cache, rtol=rtol, atol=atol,
                              max_class_change=max_class_change, min_dice=min_dice, data=data, model=model)  # fmt: skip
    with working("trt", "building the TensorRT engine and checking parity"):
        result = build(fp32_layers=fp32_layers)
    if not result.passed and search is not None:  # judged on the GPU by the engine itself: no CPU caveat
        export_report(result, workdir)
        with working("trt --fallback auto", "searching for layers to keep in FP32"):
            result = search_fp16(workdir, lambda nodes: build(fp32_layers=[*(fp32_layers or []), *nodes]), result,
                                 search, data, on_cpu=False, time_it=False)  # fmt: skip
    out.add_export(result)
    export_report(result, workdir)
    if result.entry.get("fallback"):
        search_report(result.entry["fallback"])
    raise typer.Exit(0 if result.passed else 1)


@cli_errors
@with_model_flags()
def openvino_cmd(
    weights: Weights,
    workdir: Workdir = Path("exports"),
    fp16: Annotated[bool, typer.Option("--fp16", help="Compress the weights to FP16 (DIR/<stem>.fp16.xml).")] = False,
    height: SourceHeight = 256,
    width: SourceWidth = 256,
    device: DeviceOpt = "auto",
    model: ModelOpt = None,
    rtol: Rtol = None,
    atol: Atol = None,
    max_class_change: MaxClassChange = None,
    min_dice: MinDice = None,
    data: RealData = None,
    json_path: JsonOpt = None,
    report_path: ReportOpt = None,
    junit_path: JunitOpt = None,
) -> None:
    """Checkpoint -> DIR/<stem>.xml + .bin (OpenVINO IR, from the verified ONNX model), checked against eager on
    the CPU. The gate options judge the IR; an ONNX model exported first is judged as `onnx` judges it."""
    one_gate(fp16, rtol=rtol, atol=atol, max_class_change=max_class_change, min_dice=min_dice, to_fp32="drop --fp16")
    with json_result(json_path, "export", "unet-export openvino", workdir, report=report_path, junit=junit_path) as out:
        out.images = data  # the HTML report's pictures use the same images

        def onnx_first(result: ExportResult) -> None:  # the ONNX model it converts, exported when missing
            out.add_export(result)
            export_report(result, workdir)

        with working("openvino", "converting to OpenVINO IR and checking parity"):
            result = export_openvino(weights, workdir, fp16=fp16, model=model, device=device.value, height=height,
                                     width=width, on_result=onnx_first, data=data, rtol=rtol,
                                     atol=atol, max_class_change=max_class_change, min_dice=min_dice)  # fmt: skip
        out.add_export(result)
        export_report(result, workdir)
        weights_line(result)
        raise typer.Exit(0 if result.passed else 1)


@cli_errors
@with_model_flags()
def int8_cmd(
    weights: Weights,
    calib: Annotated[
        Path, typer.Option(help="Calibration images: a folder of images or a dataset (imgs/, JPEGImages/).")
    ],
    val: Annotated[
        Path | None,
        typer.Option(
            help="Labelled held-out images (either layout): gate and accuracy control "
            "on Dice vs ground truth. Calibration images are left out of it."
        ),
    ] = None,
    engine: Annotated[Engine, typer.Option(help="Which INT8 artefacts to write.")] = Engine.all,
    subset: Annotated[
        int | None, typer.Option(help="Calibrate on the first N images of --calib (at most 300).")
    ] = None,
    max_dice_drop: Annotated[
        float, typer.Option(help="Largest allowed drop of Dice vs ground truth below eager.")
    ] = 0.005,
    max_class_change: MaxClassChange = None,
    min_dice: MinDice = None,
    fallback: Annotated[
        Fallback,
        typer.Option(
            help="When the default quantisation fails the gate: presets = try the mixed preset, FP32 ends and bias "
            "correction in turn; auto = the recipes that keep no layer in FP32 (OpenVINO: mixed preset, full bias "
            "correction), then search for the fewest convolutions to keep in FP32, judged by the gate; "
            "none = the default only.",
        ),
    ] = Fallback.presets,
    no_fallback: Annotated[bool, typer.Option("--no-fallback", help="Same as --fallback none.", hidden=True)] = False,
    fallback_budget: FallbackBudget = DEFAULT_BUDGET_S,
    fp32_layers: FP32Layers = None,
    workdir: Workdir = Path("exports"),
    mask_suffix: Annotated[str, typer.Option(help="--val in milesial's layout: masks/<stem><suffix>.<ext>.")] = "_mask",
    height: SourceHeight = 256,
    width: SourceWidth = 256,
    device: DeviceOpt = "auto",
    model: ModelOpt = None,
    json_path: JsonOpt = None,
    report_path: ReportOpt = None,
    junit_path: JunitOpt = None,
) -> None:
    """Checkpoint -> INT8 OpenVINO IR (NNCF) and/or INT8 ONNX (ONNX Runtime QDQ), calibrated on --calib and
    gated on real images (exit 1 if the gate fails)."""
    with json_result(json_path, "export", "unet-export int8", workdir, report=report_path, junit=junit_path) as out:
        out.images = val  # the HTML report's pictures use the same images
        show = shower(workdir)

        def on_result(result: ExportResult) -> None:  # each artefact as it lands, the FP32 ONNX source too
            out.add_export(result)
            show(result)

        with working("int8", "calibrating and quantizing to INT8"):
            results = quantize_int8(weights, calib, workdir, val=val, engine=engine.value, subset=subset,
                                    max_dice_drop=max_dice_drop, max_class_change=max_class_change, min_dice=min_dice,
                                    fallback="none" if no_fallback else fallback.value, fp32_layers=fp32_layers,
                                    fallback_budget=fallback_budget, mask_suffix=mask_suffix, model=model, device=device.value,
                                    height=height, width=width, on_result=on_result)  # fmt: skip
        raise typer.Exit(0 if all(r.passed for r in results) else 1)


COMMANDS = {"onnx": onnx_cmd, "torchscript": torchscript_cmd, "aoti": aoti_cmd, "trt": trt_cmd,
            "openvino": openvino_cmd, "int8": int8_cmd}
