"""`--with-pipeline`: an ensemble that takes a uint8 (H, W, C) image and returns the class mask,
preprocess -> model -> postprocess, the two Python steps running triton_model.py with the
training preprocessing, size rule and mask_values of the workdir's manifest."""

from unet_export.checkpoint import class_mask_values
from unet_export.data.dataset import Preprocess
from unet_export.errors import UserError
from unet_export.models import mask_threshold
from unet_export.parity.envelope import Envelope
from unet_export.serving import configs
from unet_export.serving.configs import ENSEMBLE, PYTHON, VERSION
from unet_export.serving.plan import MODEL_SOURCE, ModelPlan


def pipeline_plans(plans: list[ModelPlan], manifest: dict, name: str, instances: int) -> list[ModelPlan]:
    """preprocess -> model -> postprocess as one ensemble: uint8 (H, W, C) image in, mask out.
    The model step is the Python-backend model when there is one (it runs in every build)."""
    model = next((p for p in plans if p.kind == "python"), plans[0])
    if model.config.max_batch_size == 0:
        raise UserError(f"--with-pipeline needs a model with a free batch and size; {model.name} is static")
    record = manifest["model"]
    n_channels, n_classes = record["config"].get("n_channels", 3), record["config"].get("n_classes", 2)
    rule = {k: v for k, v in model.record["artifact"]["size_rule"].items() if k != "static"}
    values = class_mask_values(record.get("mask_values"), n_classes)
    rgb = isinstance(values[0], list)
    mask_type = "UINT8" if max(map(max, values) if rgb else values) <= 255 else "UINT16"
    batch = model.config.max_batch_size
    shared = {"preprocess": _preprocess(record, n_channels), "size_rule": rule} | _smallest(model.record["artifact"])
    image = {"name": "IMAGE", "dtype": "UINT8", "dims": [-1, -1, n_channels]}
    size = {"name": "SIZE", "dtype": "INT32", "dims": [4]}
    mask = {"name": "MASK", "dtype": mask_type, "dims": [-1, -1, 3] if rgb else [-1, -1]}
    model_in, model_out = configs.io_specs(model.config.input)[0], configs.io_specs(model.config.output)[0]
    pre = _python_step(f"{name}_preprocess", batch, instances, [image], [model_in | {"name": "INPUT"}, size],
                       shared | {"role": "preprocess"})  # fmt: skip
    post = _python_step(f"{name}_postprocess", batch, instances, [model_out | {"name": "LOGITS"}, size], [mask],
                        shared | {"role": "postprocess", "mask_values": values,
                                  "threshold": mask_threshold(record["config"])})  # fmt: skip
    ensemble = configs.new_config(f"{name}_pipeline", ENSEMBLE, batch, [image], [mask])
    configs.add_step(ensemble, pre.name, {"IMAGE": "IMAGE"}, {"INPUT": "input", "SIZE": "size"})
    configs.add_step(ensemble, model.name, {model_in["name"]: "input"}, {model_out["name"]: "logits"})
    configs.add_step(ensemble, post.name, {"LOGITS": "logits", "SIZE": "size"}, {"MASK": "MASK"})
    steps = f"{pre.name} -> {model.name} -> {post.name}"
    return [pre, post, ModelPlan(ensemble.name, "ensemble", ensemble, {f"{VERSION}/.keep": ""}, {"kind": "ensemble"},
                                 [f"uint8 image -> {mask_type.lower()} mask: {steps}"])]  # fmt: skip


def _smallest(artifact: dict) -> dict:
    """{"smallest": [height, width]}: the smallest sides the model's envelope was proven from, which
    the pre/postprocessing pad a smaller image up to and crop back from, as predict does
    (inference.predictor.padded_size); {} where no envelope was recorded (the size rule alone)."""
    record = artifact.get("envelope")
    return {"smallest": list(Envelope.from_dict(record).smallest())} if record else {}


def _preprocess(record: dict, n_channels: int) -> dict:
    """The model's preprocessing, checked now (a bad record fails the build, not every request) and
    written as Preprocess.to_dict (an old record keeps its two keys; "source" is not the server's)."""
    pp = Preprocess.from_dict(record.get("preprocess"))
    if pp.mean is not None and len(pp.mean) != n_channels:
        raise UserError(f"the manifest's preprocess mean/std have {len(pp.mean)} values but the model takes "
                        f"{n_channels} channel(s)")  # fmt: skip
    return pp.to_dict()


def _python_step(name: str, batch: int, instances: int, inputs, outputs, settings: dict) -> ModelPlan:
    config = configs.new_config(name, PYTHON, batch, inputs, outputs)
    configs.add_serving(config, PYTHON, instances, batching=False)  # per-image work: nothing to gain
    configs.set_parameter(config, "unet_export", settings)
    return ModelPlan(name, settings["role"], config, {f"{VERSION}/model.py": MODEL_SOURCE.read_text()},
                     {"kind": settings["role"]})  # fmt: skip
