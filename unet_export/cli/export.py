"""`unet-export openvino|int8`: CPU deployment artefacts, thin commands over
unet_export.flows.openvino and unet_export.flows.int8."""

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from unet_export.api import ExportResult
from unet_export.cli.common import DeviceOpt, ModelOpt, Weights, Workdir, cli_errors, console, working
from unet_export.cli.jsonout import JsonOpt, json_result
from unet_export.cli.render import export_report
from unet_export.cli.tolerances import Atol, MaxClassChange, MinDice, RealData, Rtol, one_gate
from unet_export.flows.openvino import export_openvino
from unet_export.flows.int8 import quantize_int8
from unet_export.text import counted


class Engine(str, Enum):
    openvino = "openvino"
    onnxruntime = "onnxruntime"
    all = "all"


Height = Annotated[int, typer.Option(help="Export size of the ONNX model when it has to be exported first: height.")]
Width = Annotated[int, typer.Option(help="Export size of the ONNX model when it has to be exported first: width.")]


@cli_errors
def openvino_cmd(
    weights: Weights,
    workdir: Workdir = Path("exports"),
    fp16: Annotated[bool, typer.Option("--fp16", help="Compress the weights to FP16 (DIR/<stem>.fp16.xml).")] = False,
    height: Height = 256,
    width: Width = 256,
    device: DeviceOpt = "auto",
    model: ModelOpt = None,
    rtol: Rtol = None,
    atol: Atol = None,
    max_class_change: MaxClassChange = None,
    min_dice: MinDice = None,
    data: RealData = None,
    json_path: JsonOpt = None,
) -> None:
    """Checkpoint -> DIR/<stem>.xml + .bin (OpenVINO IR, from the verified ONNX model), checked against eager on
    the CPU. The gate options judge the IR; an ONNX model exported first is judged as `onnx` judges it."""
    one_gate(fp16, rtol=rtol, atol=atol, max_class_change=max_class_change, min_dice=min_dice, to_fp32="drop --fp16")
    with json_result(json_path, "export", "unet-export openvino", workdir) as out:

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


def shower(workdir: Path):
    """What `int8` (and `demo`) print as each artefact lands: the export report, an IR's .bin,
    and for INT8 the calibration, the attempts, the layers left in FP32 and Dice vs ground truth."""

    def show(result: ExportResult) -> None:
        export_report(result, workdir)
        weights_line(result)
        if result.entry["precision"] == "int8":
            int8_report(result)

    return show


def weights_line(result: ExportResult) -> None:
    """An IR is two files: export_report shows the .xml, this the .bin the manifest records with it."""
    weights = result.entry.get("weights")
    if weights:
        console.print(f"weights {result.path.with_name(weights['path'])} ({weights['bytes'] / 1e6:.1f} MB, sha256 "
                      f"{weights['sha256'][:12]}), OpenVINO {result.entry['openvino_version']}")  # fmt: skip


@cli_errors
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
        bool,
        typer.Option(
            "--fallback/--no-fallback",
            help="When the default quantisation fails the "
            "gate, try the mixed preset, FP32 ends and bias correction in turn.",
        ),
    ] = True,
    workdir: Workdir = Path("exports"),
    mask_suffix: Annotated[str, typer.Option(help="--val in milesial's layout: masks/<stem><suffix>.<ext>.")] = "_mask",
    height: Height = 256,
    width: Width = 256,
    device: DeviceOpt = "auto",
    model: ModelOpt = None,
    json_path: JsonOpt = None,
) -> None:
    """Checkpoint -> INT8 OpenVINO IR (NNCF) and/or INT8 ONNX (ONNX Runtime QDQ), calibrated on --calib and
    gated on real images (exit 1 if the gate fails)."""
    with json_result(json_path, "export", "unet-export int8", workdir) as out:
        show = shower(workdir)

        def on_result(result: ExportResult) -> None:  # each artefact as it lands, the FP32 ONNX source too
            out.add_export(result)
            show(result)

        with working("int8", "calibrating and quantizing to INT8"):
            results = quantize_int8(weights, calib, workdir, val=val, engine=engine.value, subset=subset,
                                    max_dice_drop=max_dice_drop, max_class_change=max_class_change, min_dice=min_dice,
                                    fallback=fallback, mask_suffix=mask_suffix, model=model, device=device.value,
                                    height=height, width=width, on_result=on_result)  # fmt: skip
        raise typer.Exit(0 if all(r.passed for r in results) else 1)


def int8_report(result: ExportResult) -> None:
    """What was calibrated on, what was tried, which layers stayed FP32, Dice vs ground truth."""
    q, accuracy = result.entry["quantization"], result.entry.get("accuracy")
    calib = q["calibration"]
    console.print(f"calibration: {counted(calib['count'], 'image')} of {calib['path']} "
                  f"({calib['first']} .. {calib['last']}, "
                  f"sha256 {calib['sha256'][:12]}); gate on {q['gate_images']}")  # fmt: skip
    for attempt in q["attempts"]:
        verdict = "[green]passed[/]" if attempt["passed"] else f"[red]failed[/] ({'; '.join(attempt['failures'][:2])})"
        console.print(
            f"  attempt {attempt['name']}: preset {attempt['preset']}, {attempt['fp32_nodes']} layers in FP32 -> {verdict}"
        )
    worked = f"[green]{q['worked']}[/]" if q["worked"] else "[red]none passed[/] (the last one is recorded as failed)"
    control = ", with NNCF accuracy control on Dice" if q["accuracy_control"] else ""
    console.print(
        f"INT8: {q['int8_layers']} of {q['layers']} convolutions, preset {q['preset']}{control}; worked: {worked}"
    )
    fp32 = result.entry["fp32_nodes"]
    console.print(f"stayed FP32: {', '.join(fp32) if fp32 else 'none'}")
    if accuracy:
        console.print(f"Dice vs ground truth on {accuracy['images']} held-out images: eager {accuracy['eager_dice']:.4f}, "
                      f"int8 {accuracy['dice']:.4f} ({-accuracy['drop']:+.4f}; allowed drop {accuracy['max_drop']})")  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command("openvino")(openvino_cmd)
    app.command("int8")(int8_cmd)
