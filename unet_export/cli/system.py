"""`unet-export doctor|demo|inspect`: the machine, the whole job on the shipped model, one
artefact described; thin over unet_export.flows (doctor, demo, inspect). `--version` is the app's
own option (cli/common.py)."""

import json
from pathlib import Path
from typing import Annotated

import typer

from unet_export.api import benchmark, evaluate, export_artifact, inspect_artifact, resolve_device, run_checks
from unet_export.bench.run import exit_code
from unet_export.cli.common import cli_errors, console
from unet_export.cli.jsonout import json_result
from unet_export.cli.options import DeviceOpt, Workdir
from unet_export.cli.render_bench import bench_table, row_line
from unet_export.cli.render_export import export_report, shower
from unet_export.cli.render_system import doctor_table, report_lines
from unet_export.cli.render_verify import dice_table
from unet_export.errors import UserError
from unet_export.flows.demo import DEMO_INT8_BACKENDS, DEMO_SIZE, DEMO_VAL, DEMO_WEIGHTS, demo_int8
from unet_export.flows.inspect import FORMATS as INSPECTABLE
from unet_export.runtimes.formats import FORMATS

# torch.compile's CPU build alone takes a minute on 2 cores: the demo leaves it to unet-bench.
DEMO_CPU_BACKENDS = ["eager", "eager-channels-last", "eager-bf16", "torchscript", "aoti", "onnxruntime", "openvino",
                     "openvino-bf16"]  # fmt: skip


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
                       device=device.value, data=DEMO_VAL, warmup=2, min_time=2.0, emulated=False,
                       on_row=lambda row: console.print(row_line(row)))  # fmt: skip
    console.print(bench_table(report))
    raise typer.Exit(0 if passed and exit_code(report.rows) == 0 else 1)


@cli_errors
def inspect_cmd(
    artefact: Annotated[Path, typer.Argument(metavar="ARTEFACT", help=(
        f"An exported model ({', '.join(INSPECTABLE)}), or a workdir: then NAME says which of its artefacts."))],
    name: Annotated[str | None, typer.Argument(metavar="NAME", help=(
        "The artefact's file name inside the workdir ARTEFACT, e.g. demo_unet.onnx."))] = None,
) -> None:  # fmt: skip
    """What an exported model is: inputs and outputs with their dynamic axes, opset, node count,
    precision, size rule, file size and sha256, and the verdict its workdir's manifest records.
    Runs nothing (a TensorRT engine is described from the manifest). Exit 0 when it is described,
    whatever the verdict; 2 when it cannot be read."""
    for line in report_lines(inspect_artifact(artefact, name)):
        console.print(line, markup=False)


COMMANDS = {"doctor": doctor_cmd, "demo": demo_cmd, "inspect": inspect_cmd}
