"""`unet-export verify|evaluate|cpp-check`: is what DIR holds still right? verify re-runs each
artefact's parity gate here, evaluate scores Dice against ground truth, cpp-check runs the artefacts
from C++; thin over unet_export.flows, printed by cli/render_verify.py."""

from pathlib import Path
from typing import Annotated

import typer

from unet_export.api import (
    artefact_pictures, cpp_check, evaluate, hold_against_recheck, verify_workdir, workdir_artifacts, workdir_exit_code,
)  # fmt: skip
from unet_export.cli.common import cli_errors, console, fail, working
from unet_export.cli.jsonout import JsonOpt, JunitOpt, ReportOpt, json_result
from unet_export.cli.options import (
    Device,
    DeviceOpt,
    MaskSuffix,
    MaxPixels,
    ModelOpt,
    RebuildFactoryOpt,
    RunDeviceOpt,
    Workdir,
    model_choice,
    parse_mask_values,
    with_model_flags,
)
from unet_export.cli.render_verify import cpp_table, dice_table, verify_report
from unet_export.cli.tolerances import Atol, MaxClassChange, MinDice, RealData, Rtol
from unet_export.data.images import DEFAULT_MAX_PIXELS
from unet_export.flows.evaluate import gate


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
    model_factory: RebuildFactoryOpt = None,
    json_path: JsonOpt = None,
    report_path: ReportOpt = None,
    junit_path: JunitOpt = None,
) -> None:
    """Re-run the parity gate of every artefact in DIR's manifest on this machine and record the
    verdicts (exit 1 if one fails, 2 if a file changed since it was verified)."""
    with json_result(json_path, "verify", "unet-export verify", workdir, report=report_path, junit=junit_path) as out:
        out.images = data  # the HTML report's pictures use the same images
        with working("verify", f"re-running the parity gate of every artefact in {workdir}"):
            report = verify_workdir(workdir, data=data, images=images, device=device.value, weights=weights,
                                    rtol=rtol, atol=atol, max_class_change=max_class_change, min_dice=min_dice,
                                    model=model_choice(None, model_factory=model_factory))  # fmt: skip
        out.add_verify(report)
        verify_report(report)
        changed = [v for v in report.verdicts if v.status in ("changed", "missing", "unreferenced")]
        if changed:
            reason = "; ".join(v.reason for v in changed)
            out["error"] = reason
            fail(reason, 2)
        raise typer.Exit(report.exit_code)


@cli_errors
@with_model_flags()
def evaluate_cmd(
    weights: Annotated[Path, typer.Argument(help="Checkpoint (its .json sidecar gives the preprocessing).")],
    data: Annotated[Path, typer.Argument(help="Labelled dataset (either layout).")],
    workdir: Workdir = Path("exports"),
    min_dice: Annotated[float | None, typer.Option(help="Gate: exit 1 if any Dice is below this.")] = None,
    max_delta: Annotated[float | None, typer.Option(help="Gate: exit 1 if an artefact is this far below eager.")] = None,
    mask_suffix: MaskSuffix = "_mask",
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS,
    mask_values: Annotated[str | None, typer.Option(help="The classes' mask values, background first "
                           "(0,255; r:g:b for RGB masks), for a checkpoint that records none. "
                           "Default: the checkpoint's; else class indices 0,1,...")] = None,  # fmt: skip
    model: ModelOpt = None,
    device: RunDeviceOpt = "auto",
    json_path: JsonOpt = None,
    report_path: ReportOpt = None,
    junit_path: JunitOpt = None,
) -> None:
    """Mean Dice against ground truth for the eager model and every artefact in DIR, side by side."""
    with json_result(json_path, "evaluate", "unet-export evaluate", report=report_path, junit=junit_path) as out:
        out.images = data  # the HTML report's pictures use the same images
        out["workdir"], out["data"] = str(workdir), str(data)
        report = evaluate(weights, data, workdir if workdir.is_dir() else None, device=device.value,
                          mask_suffix=mask_suffix, model=model, max_pixels=max_pixels,
                          mask_values=parse_mask_values(mask_values))  # fmt: skip
        console.print(dice_table(report, data))
        out.add_evaluate(report, workdir)
        failures = gate(report, min_dice, max_delta)
        out["gate"] = {"min_dice": min_dice, "max_delta": max_delta, "failures": failures}
        for failure in failures:
            console.print(f"[red]gate failed[/] {failure}")
        raise typer.Exit(1 if failures else 0)


@cli_errors
def cpp_check_cmd(
    workdir: Workdir = Path("exports"),
    build_dir: Annotated[Path, typer.Option(help="CMake build folder for examples/cpp.")] = Path("build/cpp"),
    device: Annotated[Device, typer.Option(help="Where the C++ and Python models run (CUDA needs a CUDA libtorch).")] = Device.cpu,
    model_factory: RebuildFactoryOpt = None,
) -> None:
    """Build examples/cpp against the installed libtorch, run DIR's TorchScript and .pt2 artefacts
    from C++, and compare with Python (exit 1 on a mismatch)."""
    with working("cpp-check", "building examples/cpp and running the artefacts from C++"):
        rows = cpp_check(workdir, build_dir, device.value, model=model_choice(None, model_factory=model_factory))
    console.print(cpp_table(rows))
    raise typer.Exit(1 if any(r["status"] == "parity_failed" for r in rows) else 0)


@cli_errors
def report_cmd(
    workdir: Workdir = Path("exports"),
    data: Annotated[Path | None, typer.Option(help="Real images for the pictures (a folder, or a dataset with imgs/); "
                                              "default: the images the manifest records.")] = None,  # fmt: skip
    output: Annotated[Path, typer.Option("--output", "-o", metavar="PATH.html", help="The HTML report.")] = Path("report.html"),
    images: Annotated[int, typer.Option(help="Real images each artefact runs on for the pictures; the 3 where it "
                                        "disagrees most are drawn.")] = 8,  # fmt: skip
    json_path: JsonOpt = None,
    junit_path: JunitOpt = None,
) -> None:
    """An HTML report of every artefact in DIR, for a person to judge the release from: the verdicts and gate
    numbers its manifest records, and each artefact re-run here on a few real images, drawn where its masks
    differ most (exit 1 if an artefact failed, 2 if a file changed since it was verified)."""
    if images < 1:
        raise typer.BadParameter("must be at least 1", param_hint="--images")
    with json_result(json_path, "report", "unet-export report", workdir, report=output, junit=junit_path) as out:
        out.images = data
        out.page = {"note": "Verdicts and gate numbers as manifest.json records them (the latest export or verify "
                        "of each artefact), held against a re-run here, on the CPU, on real images."}  # fmt: skip
        with working("report", f"re-running every artefact of {workdir} on real images for the pictures"):
            artifacts = workdir_artifacts(workdir)
            pictures = artefact_pictures({"workdir": str(workdir), "artifacts": artifacts}, data=data, images=images)
        hold_against_recheck(artifacts, pictures)
        out.page["pictures"] = pictures
        out["artifacts"] = artifacts
        for art in artifacts:
            line = f"{art['path']}: {art['status']} ({art['format']} {art['precision']}, judged {art['judged']})"
            console.print(line + (f"\n  {art['reason']}" if art.get("reason") else ""), soft_wrap=True, markup=False)
        console.print(f"writing {output}")
        code = workdir_exit_code(artifacts)
        if code == 2:
            reason = "; ".join(a["reason"] for a in artifacts if a["status"] in ("changed", "missing"))
            out["error"] = reason
            fail(reason, 2)
        raise typer.Exit(code)


COMMANDS = {"verify": verify_cmd, "evaluate": evaluate_cmd, "cpp-check": cpp_check_cmd, "report": report_cmd}
