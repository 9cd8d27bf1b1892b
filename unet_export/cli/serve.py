"""`unet-export triton|serve`: thin commands over unet_export.serving."""

from pathlib import Path
from typing import Annotated

import typer

from unet_export.api import write_repository
from unet_export.cli.common import cli_errors, console, stop_on_signals
from unet_export.cli.options import RebuildFactoryOpt, Workdir, model_choice
from unet_export.cli.render_serve import triton_check_report, triton_repository_report

Repo = Annotated[Path | None, typer.Option("--repo", help="Repository folder (default DIR/triton); replaces only one "
                                           "unet-export wrote.")]  # fmt: skip
TritonServerOpt = Annotated[Path | None, typer.Option(
    "--tritonserver", help="A tritonserver binary (env UNET_EXPORT_TRITONSERVER); default: the one the nvidia-pytriton "
    "wheel bundles, fetched and sha256-checked on first use.")]  # fmt: skip
Port = Annotated[int | None, typer.Option(min=1, max=65535, help="Port on 127.0.0.1 (default: a free one).")]


@cli_errors
def triton_cmd(
    workdir: Workdir = Path("exports"),
    repo: Repo = None,
    name: Annotated[str | None, typer.Option(help="Model name prefix (default: the checkpoint's stem).")] = None,
    max_batch: Annotated[int | None, typer.Option(help="max_batch_size (default 8, or the largest batch an artefact "
                                                  "was proven at if smaller; more is refused; TensorRT: at most the "
                                                  "engine profile's).")] = None,  # fmt: skip
    instances: Annotated[int, typer.Option(help="Instances of each model (instance_group count).")] = 1,
    formats: Annotated[str | None, typer.Option(help="Comma list of FORMAT or FORMAT:PRECISION (onnx, tensorrt, "
                                                "torchscript, openvino, python); default: every verified one.")] = None,  # fmt: skip
    with_pipeline: Annotated[bool, typer.Option("--with-pipeline", help="Add an ensemble: uint8 HxWx3 image in, "
                                                "uint8 class mask out.")] = False,  # fmt: skip
    python_runtime: Annotated[str, typer.Option(help="The Python-backend model's runtime: auto (the fastest, "
                                                "measured), onnxruntime or openvino.")] = "auto",  # fmt: skip
    check: Annotated[bool, typer.Option("--check", help="Then serve it with a real Triton server on 127.0.0.1 and "
                                        "judge the responses against eager, plus a load test (exit 1 on a mismatch).")] = False,  # fmt: skip
    tritonserver: TritonServerOpt = None,
    data: Annotated[Path | None, typer.Option(help="--check: real images (a dataset or image folder; default: the "
                                              "shipped validation images for the demo model).")] = None,  # fmt: skip
    weights: Annotated[Path | None, typer.Option(help="--check: the checkpoint, if the manifest's has moved.")] = None,
    model_factory: RebuildFactoryOpt = None,
    clients: Annotated[int, typer.Option(min=1, max=64, help="--check: concurrent load-test clients.")] = 8,
    requests: Annotated[int, typer.Option(min=1, max=10_000, help="--check: requests per client.")] = 50,
) -> None:
    """The workdir's verified artefacts -> a Triton model repository (every config checked); with
    --check, proven on a running server."""
    model = model_choice(None, model_factory=model_factory)

    def startable(staged: Path) -> None:  # bad --check input (exit 2) must leave any --repo as it was
        from unet_export.serving.check import check_inputs

        check_inputs(staged, tritonserver=tritonserver, data=data, weights=weights, model=model)

    result = write_repository(workdir, repo, name=name, max_batch=max_batch, instances=instances, formats=formats,
                              with_pipeline=with_pipeline, python_runtime=python_runtime,
                              before_publish=startable if check else None)  # fmt: skip
    triton_repository_report(result)
    if check:
        from unet_export.serving.check import check_served

        report = check_served(result.repo, tritonserver=tritonserver, data=data, weights=weights, model=model,
                              clients=clients, requests=requests,
                              on_step=lambda line: console.print(line, markup=False))  # fmt: skip
        triton_check_report(report)
        raise typer.Exit(0 if report.passed else 1)


@cli_errors
def serve_cmd(
    repo: Annotated[Path, typer.Option("--repo", help="A repository written by `unet-export triton`.")],
    http_port: Port = None,
    grpc_port: Port = None,
    tritonserver: TritonServerOpt = None,
) -> None:
    """Serve a repository with a Triton server on 127.0.0.1 until Ctrl-C (the models this server
    build can load; the others are named). A server that exits on its own is restarted."""
    from unet_export.serving.server import keep_serving, repository_server

    server, _, missing = repository_server(repo, tritonserver, http_port, grpc_port)
    for model, reason in missing.items():
        console.print(f"[yellow]not loaded[/] {model}: {reason}")
    with stop_on_signals(), server:  # SIGTERM too (docker stop, kill PID): the server is never orphaned
        try:  # from the first line on: a Ctrl-C right after "ready" still stops it cleanly
            console.print(f"tritonserver ({server.install.origin}, pid {server.proc.pid}) ready in "
                          f"{server.started_in:.1f} s, serving {', '.join(server.models)}")  # fmt: skip
            console.print(f"HTTP  http://{server.http_url}/v2/models/<model>/infer")
            console.print(f"gRPC  {server.grpc_url}")
            console.print(f"log   {server.log_path}", markup=False, highlight=False)
            console.print("Ctrl-C stops it")
            keep_serving(server, lambda line: console.print(line, markup=False, highlight=False))
        except KeyboardInterrupt:
            console.print("stopping tritonserver")


COMMANDS = {"triton": triton_cmd, "serve": serve_cmd}
