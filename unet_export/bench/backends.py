"""Which rows the benchmark has: ``BACKENDS``, every runtime it knows, each a function of the
context that returns a runner or raises Unavailable with the reason (shown in its row). Runner
modules import their runtime lazily, so importing this costs nothing."""

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from unet_export.runtimes import (
    AotiRunner,
    EagerRunner,
    OnnxRuntimeRunner,
    OpenVinoRunner,
    Runner,
    TensorRTRunner,
    TorchCompileRunner,
    TorchScriptRunner,
)
from unet_export.runtimes.openvino.runner import openvino_cpu_bf16
from unet_export.workdir.ir import ir_weights
from unet_export.workdir.manifest import checked_path


class Unavailable(Exception):
    """This runtime cannot run here; the benchmark shows the reason in its row."""


@dataclass
class BackendContext:
    model: nn.Module  # the eager fp32 model, on the CPU
    workdir: Path
    manifest: dict
    device: torch.device
    shape: tuple[int, int, int, int]
    compile_mode: str = "default"
    emulated: bool = True  # time rows this CPU only emulates (benchmark(): when --backends names them)

    def entry(self, fmt: str, precision: str = "fp32") -> dict:
        """The manifest entry of an artefact that can run at the benchmark shape."""
        for entry in self.manifest["artifacts"]:
            if entry["format"] == fmt and entry["precision"] == precision:
                static = entry.get("size_rule", {}).get("static")
                if static and entry["inputs"][0]["shape"] != list(self.shape):
                    raise Unavailable(f"static {fmt} artefact takes {entry['inputs'][0]['shape']}, not {list(self.shape)}")
                return entry
        command = "unet-export trt" if fmt == "tensorrt" else f"unet-export {fmt}"
        hint = f"{command} --{precision}" if precision != "fp32" or fmt == "tensorrt" else command
        raise Unavailable(f"no {precision} {fmt} artefact in {self.workdir}/manifest.json (run {hint})")

    def artifact(self, fmt: str, precision: str = "fp32") -> Path:
        return checked_path(self.workdir, self.entry(fmt, precision))

    def needs_cuda(self, what: str) -> None:
        if self.device.type != "cuda":
            raise Unavailable(f"{what} needs a CUDA GPU (benchmark device is {self.device})")


def _eager_half(ctx: BackendContext) -> Runner:
    ctx.needs_cuda("eager fp16")
    return EagerRunner(ctx.model, ctx.device, "fp16", channels_last=True)


def _eager_bf16(ctx: BackendContext) -> Runner:
    # Without native bf16 (no AVX-512 or avx512_bf16/AMX) torch emulates it in software: the demo's
    # row ran at 0.02x eager fp32 on a 2-core AVX2 EPYC, minutes a row that can only say "don't".
    if ctx.device.type == "cpu" and not ctx.emulated and not torch_cpu_bf16():
        raise Unavailable("this CPU has no native bf16 (torch would emulate it, far slower than fp32); "
                          "--backends eager-bf16 times it anyway")  # fmt: skip
    return EagerRunner(ctx.model, ctx.device, "bf16", channels_last=ctx.device.type == "cuda")


def torch_cpu_bf16() -> bool:
    """Whether torch's CPU kernels (oneDNN) run bf16 natively here, as torch's own tests ask."""
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(supported()) if supported is not None else True


def _ort_provider(provider: str, precision: str = "fp32"):
    def make(ctx: BackendContext) -> Runner:
        ctx.needs_cuda(f"ONNX Runtime's {provider} provider")
        return OnnxRuntimeRunner(ctx.artifact("onnx", precision), ctx.device, precision, provider=provider)

    return make


def _aoti(ctx: BackendContext) -> Runner:
    entry = ctx.entry("aoti")
    if entry.get("device", "cpu") != ctx.device.type:
        raise Unavailable(f"{entry['path']} is compiled for {entry.get('device')}, the benchmark runs on {ctx.device.type}")
    return AotiRunner(checked_path(ctx.workdir, entry), ctx.device)


def _openvino(precision: str):
    """OpenVINO at ``precision`` (its inference precision hint), reading the FP32 IR when the workdir has one,
    else the ONNX model."""

    def make(ctx: BackendContext) -> Runner:
        if precision == "bf16" and not openvino_cpu_bf16():
            # measured on an AVX2 EPYC: the bf16 hint compiled f32 (same speed, same error as the
            # openvino row) while the row said bf16
            raise Unavailable("OpenVINO has no bf16 on this CPU (no BF16 in its OPTIMIZATION_CAPABILITIES): "
                              "the bf16 hint runs f32, which the openvino row times")  # fmt: skip
        try:
            entry = ctx.entry("openvino")
        except Unavailable:
            return OpenVinoRunner(ctx.artifact("onnx"), "cpu", precision)
        path = checked_path(ctx.workdir, entry)
        return OpenVinoRunner(path, "cpu", precision, weights=ir_weights(path, entry))

    return make


def _int8(fmt: str):
    """The workdir's INT8 artefact of ``fmt`` (openvino IR or onnx), on the CPU."""

    def make(ctx: BackendContext) -> Runner:
        if not any(a["format"] == fmt and a["precision"] == "int8" for a in ctx.manifest["artifacts"]):
            engine = "openvino" if fmt == "openvino" else "onnxruntime"
            raise Unavailable(f"no int8 {fmt} artefact in {ctx.workdir}/manifest.json "
                              f"(run unet-export int8 WEIGHTS --calib DIR --engine {engine})")  # fmt: skip
        entry = ctx.entry(fmt, "int8")
        path = checked_path(ctx.workdir, entry)
        if fmt == "openvino":
            return OpenVinoRunner(path, "cpu", "int8", weights=ir_weights(path, entry))
        return OnnxRuntimeRunner(path, "cpu", "int8")

    return make


def _tensorrt(precision: str):
    def make(ctx: BackendContext) -> Runner:
        ctx.needs_cuda("TensorRT")
        entry = ctx.entry("tensorrt", precision)
        return TensorRTRunner(checked_path(ctx.workdir, entry), ctx.device, precision, record=entry)

    return make


# backend -> the manifest artefacts (format, precision) its row runs, the first one the manifest
# holds (BackendContext.entry); the eager and torch.compile rows run none.
ARTEFACTS = {
    "torchscript": [("torchscript", "fp32")],
    "aoti": [("aoti", "fp32")],
    "onnxruntime": [("onnx", "fp32")],
    "onnxruntime-cuda": [("onnx", "fp32")],
    "onnxruntime-cuda-fp16": [("onnx", "fp16")],
    "onnxruntime-trt": [("onnx", "fp32")],
    "openvino": [("openvino", "fp32"), ("onnx", "fp32")],  # the IR, else the ONNX model
    "openvino-bf16": [("openvino", "fp32"), ("onnx", "fp32")],
    "openvino-int8": [("openvino", "int8")],
    "onnxruntime-int8": [("onnx", "int8")],
    "tensorrt-fp16": [("tensorrt", "fp16")],
    "tensorrt-fp32": [("tensorrt", "fp32")],
}
CUDA_ROWS = ("eager-fp16", "onnxruntime-cuda", "onnxruntime-cuda-fp16", "onnxruntime-trt", "tensorrt-fp16",
             "tensorrt-fp32")  # unavailable on another device: their artefacts are not run there  # fmt: skip


def row_entry(manifest: dict, name: str) -> dict | None:
    """The manifest entry the row ``name`` runs (as BackendContext.entry finds it), None: none."""
    for fmt, precision in ARTEFACTS.get(name, []):
        for entry in manifest["artifacts"]:
            if entry["format"] == fmt and entry["precision"] == precision:
                return entry
    return None


# Order is the table's order; "eager" is the baseline every speed-up is relative to.
BACKENDS = {
    "eager": lambda ctx: EagerRunner(ctx.model, ctx.device),
    "eager-channels-last": lambda ctx: EagerRunner(ctx.model, ctx.device, channels_last=True),
    "eager-bf16": _eager_bf16,
    "eager-fp16": _eager_half,
    "torch.compile": lambda ctx: TorchCompileRunner(ctx.model, ctx.device, mode=ctx.compile_mode),
    "torchscript": lambda ctx: TorchScriptRunner(ctx.artifact("torchscript"), ctx.device, freeze=True),
    "aoti": lambda ctx: _aoti(ctx),
    "onnxruntime": lambda ctx: OnnxRuntimeRunner(ctx.artifact("onnx"), "cpu"),
    "onnxruntime-cuda": _ort_provider("cuda"),
    "onnxruntime-cuda-fp16": _ort_provider("cuda", "fp16"),
    "onnxruntime-trt": _ort_provider("tensorrt"),
    "openvino": _openvino("fp32"),
    "openvino-bf16": _openvino("bf16"),
    "openvino-int8": _int8("openvino"),
    "onnxruntime-int8": _int8("onnx"),
    "tensorrt-fp16": _tensorrt("fp16"),
    "tensorrt-fp32": _tensorrt("fp32"),
}
