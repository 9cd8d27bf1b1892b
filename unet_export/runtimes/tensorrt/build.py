"""TensorRT engine builder: the only module that drives TensorRT's builder (written against the
10.x and 11.x Python API; what to build is decided in tensorrt_plan.py)."""

import warnings
from pathlib import Path

from unet_export.errors import ArtifactError, UserError, require
from unet_export.fileio import atomic_path
from unet_export.runtimes.onnx.layers import select_nodes
from unet_export.runtimes.tensorrt.plan import BuildPlan, Profile, parser_error_message


def import_tensorrt():
    try:
        return require("tensorrt", extra="trt")
    except UserError:
        raise UserError('TensorRT is not installed: on a machine with an NVIDIA GPU, pip install "unet-export[trt]"') from None


def make_logger(trt):
    """A logger that keeps TensorRT's errors, so a failed build can say what went wrong."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(msg)

    return Logger()


def build_engine(plan: BuildPlan, onnx_path: Path, profiles: list[Profile], dest: Path, *, workspace_gib: float = 4.0,
                 timing_cache: Path | None = None, fp32_layers: list[str] | None = None) -> dict:  # fmt: skip
    """Parse ``onnx_path``, build with ``plan`` and every optimisation profile of ``profiles`` (the
    engine numbers them in this order), write the plan to ``dest``."""
    trt = import_tensorrt()
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    # Strong typing is opt-in on 10.x; 11.x is always strongly typed and ignores the (deprecated) flag.
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.strongly_typed_flag else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise ArtifactError(parser_error_message(onnx_path.name, _parser_errors(parser)))
    config = _config(trt, builder, plan, workspace_gib)
    pinned = _pin_fp32_layers(trt, network, config, onnx_path, fp32_layers) if plan.pin_fp32_layers else 0
    input_name = network.get_input(0).name
    for profile in profiles:
        _add_profile(builder, config, input_name, profile)
    cache = _attach_timing_cache(config, timing_cache)  # held: TensorRT needs it alive until the build ends
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        detail = logger.errors[-1] if logger.errors else "no error was logged"
        raise ArtifactError(f"TensorRT could not build an engine from {onnx_path.name}: {detail}")
    with atomic_path(dest) as tmp:
        tmp.write_bytes(bytes(serialized))
    if timing_cache is not None and cache is not None:
        _save_timing_cache(config, timing_cache)
    return {"tensorrt_version": trt.__version__, "layers": network.num_layers, "fp32_layers_pinned": pinned}


def _parser_errors(parser) -> list[dict]:
    errors = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        name = getattr(err, "node_name", lambda: "")()  # node_name/node_operator: TensorRT >= 10.x
        operator = getattr(err, "node_operator", lambda: "")()
        errors.append({"node": err.node(), "node_name": name, "operator": operator, "desc": err.desc()})
    return errors


def _config(trt, builder, plan: BuildPlan, workspace_gib: float):
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if plan.fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)  # TensorRT <= 10 only; plan_build never asks on 11
    if plan.precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # FP32 engines are held to 1e-4: TF32 would not pass
    return config


def _pin_fp32_layers(trt, network, config, onnx_path: Path, patterns: list[str]) -> int:
    """TensorRT <= 10: keep the layers parsed from the matching ONNX nodes in FP32."""
    onnx = require("onnx")
    nodes = select_nodes(onnx.load(str(onnx_path), load_external_data=False).graph, patterns)
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if any(layer.name == n or layer.name.startswith(f"{n}_") or layer.name.startswith(f"{n}/") for n in nodes):
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned += 1
    if not pinned:
        raise UserError(f"--fp32-layers {' '.join(patterns)} matches no TensorRT layer")
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    return pinned


def _add_profile(builder, config, input_name: str, profile: Profile) -> None:
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(input_name, profile.min, profile.opt, profile.max)
    if config.add_optimization_profile(opt_profile) < 0:  # TensorRT's answer to a profile it finds invalid
        raise UserError(f"TensorRT refused the optimisation profile {profile.describe()}")


def _attach_timing_cache(config, path: Path | None):
    """Reuse kernel timings across builds. A cache file TensorRT cannot read (corrupt, truncated: it returns
    None) or made on another GPU or TensorRT version (set_timing_cache returns False) only costs build time:
    warn and start a fresh cache, which replaces the file after the build. Returns the cache attached."""
    blob, problem = b"", None
    if path is not None and path.is_file():
        try:
            blob = path.read_bytes()
        except OSError as exc:
            problem = f"cannot be read ({exc.strerror})"
    cache = config.create_timing_cache(blob) if blob else None
    if cache is not None and config.set_timing_cache(cache, False):  # False: never time with another GPU's data
        return cache
    if blob:
        problem = "is from another GPU or TensorRT version" if cache else "is not a timing cache TensorRT can read"
    if problem:
        warnings.warn(f"timing cache {path} {problem}: building with a fresh one, which will replace it", stacklevel=3)
    fresh = config.create_timing_cache(b"")
    if fresh is not None and config.set_timing_cache(fresh, False):
        return fresh
    warnings.warn("TensorRT could not create a timing cache: building without one", stacklevel=3)
    return None


def _save_timing_cache(config, path: Path) -> None:
    cache = config.get_timing_cache()  # None when no cache is attached
    if cache is not None:
        with atomic_path(path) as tmp:
            tmp.write_bytes(bytes(cache.serialize()))
