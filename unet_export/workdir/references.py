"""A workdir's recorded references (runtimes/recorded.py): for a model configured from outside
its keys (smp, a factory), whose eager form a deployment host may be unable to rebuild, the eager
fp32 and float64 outputs on exactly the inputs each published artefact's gate ran on, so verify
there judges the artefacts against them instead of skipping them.

One file per model, named by its content (``references.<sha256[:16]>.npz``), written whole under
the manifest's lock: a new artefact's inputs are merged into the model's file, the manifest's
model record names the new file (``references``: path, sha256, inputs), and the file it replaced
is deleted once the manifest no longer names it. A crash leaves the old file named (and an
orphan the next publish deletes), never a manifest naming a file that is not there."""

import hashlib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from unet_export.errors import IntegrityError, UserError
from unet_export.fileio import atomic_path
from unet_export.models import MODELS
from unet_export.runtimes.recorded import References, sample_key
from unet_export.workdir.manifest import workdir_file

MAX_IMAGES = 8  # real-image samples recorded per artefact: enough to re-judge it, a few MB at most
_NAME = re.compile(r"^references\.[0-9a-f]{16}\.npz$")


@dataclass
class Recording:
    """What one gate ran: (input batch, eager fp32 output, eager float64 output) per batch, and
    where the inputs came from: {"source": "seeded", "seed": N} or {"source": "images", "names": [...]}."""

    batches: list[tuple] = field(default_factory=list)
    source: dict = field(default_factory=dict)


def seeded(seed: int) -> Recording:
    return Recording(source={"source": "seeded", "seed": seed})


def images(real_images: dict | None) -> Recording:
    """A recording of real-image batches, named by the entry's record of them (path, sha256)."""
    items = (real_images or {}).get("images") or []
    return Recording(source={"source": "images", "names": [Path(item["path"]).name for item in items]})


def records_references(model: dict | None) -> bool:
    """Whether a model's artefacts carry references: a family configured from outside its keys."""
    spec = MODELS.get((model or {}).get("architecture"))
    return spec is not None and spec.configure is not None


def record_references(workdir: Path, manifest: dict, recording: Recording | None) -> None:
    """Inside a manifest transaction: merge ``recording``'s outputs into the model's references
    file (written whole under a new name) and name it in the model record."""
    model = manifest.get("model")
    if recording is None or not recording.batches or not records_references(model):
        return
    arrays, inputs = _previous(workdir, model)
    known = {tuple(record["samples"]) for record in inputs}
    budget = MAX_IMAGES if recording.source.get("source") == "images" else None
    names = list(recording.source.get("names", []))
    for x, ref, ref64 in recording.batches:
        if budget is not None:
            if budget <= 0:
                break
            x, ref, ref64 = x[:budget], ref[:budget], ref64[:budget]
            budget -= len(x)
        keys = [sample_key(sample) for sample in x]
        for i, key in enumerate(keys):
            arrays[f"fp32_{key}"] = ref[i].detach().to("cpu", torch.float32).numpy()
            arrays[f"fp64_{key}"] = ref64[i].detach().to("cpu", torch.float64).numpy()
        if tuple(keys) not in known:
            known.add(tuple(keys))
            inputs.append(_input_record(recording.source, list(x.shape), keys, names))
        names = names[len(keys):]
    arrays["checkpoint"] = np.array(model["checkpoint"]["sha256"])
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    data = buffer.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    name = f"references.{sha[:16]}.npz"
    with atomic_path(workdir_file(workdir, name)) as tmp:
        tmp.write_bytes(data)
    model["references"] = {"path": name, "sha256": sha, "inputs": inputs}


def _input_record(source: dict, shape: list, keys: list[str], names: list[str]) -> dict:
    record = {"source": source.get("source"), "shape": shape, "samples": keys}
    if source.get("source") == "seeded":
        record["seed"] = source.get("seed")
    elif names:
        record["names"] = names[: len(keys)]
    return record


def _previous(workdir: Path, model: dict) -> tuple[dict, list]:
    """The arrays and input records of the model's references file, to merge into; none when
    there is none or it is damaged (the new file then holds this artefact's inputs only)."""
    record = model.get("references")
    if not isinstance(record, dict):
        return {}, []
    try:
        data = workdir_file(workdir, record["path"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != record["sha256"]:
            return {}, []
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, EOFError, KeyError, UserError):
        return {}, []
    if str(arrays.get("checkpoint")) != model["checkpoint"]["sha256"]:
        return {}, []
    return arrays, [dict(item) for item in record["inputs"]]


def sweep_references(workdir: Path, manifest: dict) -> None:
    """Inside a manifest transaction, once it is saved: delete references files it does not name."""
    named = ((manifest.get("model") or {}).get("references") or {}).get("path")
    for path in Path(workdir).iterdir():
        if _NAME.match(path.name) and path.name != named and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)


def recorded_references(workdir: Path, manifest: dict, why: str) -> References:
    """The model's recorded references, for judging its artefacts where the eager model cannot be
    rebuilt (``why``): none recorded, a file that is gone, changed or of another checkpoint is
    exit 2; none of these is a pass or a skip."""
    model = manifest["model"]
    record = model.get("references")
    if record is None:
        raise UserError(f"the eager model cannot be rebuilt here ({why}) and {Path(workdir) / 'manifest.json'} "
                        "records no float64 reference outputs for its artefacts: verify them where the model can "
                        "be rebuilt, or export them again with this version to record references")  # fmt: skip
    path = workdir_file(workdir, record["path"])
    if not path.is_file():
        raise IntegrityError(f"{path} (the recorded references) is in manifest.json but missing on disk; export again")
    references = References.load(path, record["sha256"])
    if references.checkpoint != model["checkpoint"]["sha256"]:
        raise IntegrityError(f"{path} holds another checkpoint's references, not those of the manifest's model; "
                             "export again")  # fmt: skip
    return references
