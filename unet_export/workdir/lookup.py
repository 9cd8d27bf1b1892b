"""What a workdir's manifest points at: the checkpoint its artefacts were exported from, and its
verified FP32 ONNX model (where the FP16, TensorRT and OpenVINO steps start)."""

from pathlib import Path

import torch.nn as nn

from unet_export.checkpoint import Checkpoint, load_checkpoint, rebuilding
from unet_export.errors import UserError
from unet_export.models import ModelChoice, external, get_spec
from unet_export.runtimes.onnx.export import check_external_data
from unet_export.workdir.manifest import checked_path


def manifest_checkpoint(manifest: dict, weights: str | Path | None = None,
                        model: "str | ModelChoice | nn.Module | None" = None) -> Checkpoint:  # fmt: skip
    """The checkpoint the workdir's artefacts were exported from (``weights`` if it has moved).
    ``model`` is the user's (--model-factory, or an nn.Module from Python): a factory's model or an
    in-memory module is rebuilt only from it, never from what the untrusted manifest names."""
    record = manifest.get("model")
    if record is None:
        raise UserError("the workdir has no manifest with a model: run `unet-export onnx WEIGHTS` first")
    choice, family = ModelChoice.of(model), record["architecture"]
    external.check_rebuild(family, record["config"], choice.options)  # EagerUnavailable before any file is read
    if choice.in_memory:
        ckpt = load_checkpoint(None, choice)
    else:
        path = Path(weights or record["checkpoint"]["path"])
        if not path.exists():
            raise UserError(f"the manifest's checkpoint {path} is gone; pass it with --weights PATH")
        # A family configured from outside its keys (smp, a factory) is rebuilt from the config
        # recorded for it; a factory is the user's, checked against the recorded one.
        options = {"recorded": record["config"]} if get_spec(family).configure is not None else {}
        if family == external.FACTORY:
            options["factory"] = choice.options["factory"]
        with rebuilding(family):  # smp missing here: EagerUnavailable (recorded references judge)
            ckpt = load_checkpoint(path, ModelChoice(family, options))
    if ckpt.sha256 != record["checkpoint"]["sha256"]:
        what = "the module" if choice.in_memory else str(ckpt.path)
        raise UserError(f"{what} is not the checkpoint the artefacts were exported from (sha256 differs); export again")
    return ckpt


def onnx_entry(manifest: dict, workdir: Path, path: str | Path | None = None) -> dict:
    """The FP32 ONNX entry of the manifest (or the one at ``path``), which must have verified."""
    for entry in manifest["artifacts"]:
        if entry["format"] == "onnx" and entry["precision"] == "fp32":
            if path is None or Path(path).resolve() == (workdir / entry["path"]).resolve():
                if entry["status"] != "verified":
                    raise UserError(f"{entry['path']} failed its parity check; fix and re-export it first")
                check_external_data(checked_path(workdir, entry))  # the converters read what it names
                return entry
    where = f"{path} is not an ONNX model exported into {workdir}" if path else f"no FP32 ONNX model in {workdir}"
    raise UserError(f"{where}: run `unet-export onnx WEIGHTS --workdir {workdir}` first")
