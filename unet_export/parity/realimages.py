"""Real images: what reduced precision (FP16, BF16, INT8) is judged on, and the only thing.

A trained model's logits on seeded noise sit near ties, so on noise a correct INT8 or BF16
artefact "changes" the class of a few percent of pixels (the demo's INT8: 3.9%) and a damaged one
can pass. FP32 is judged on seeded inputs and real images alike; reduced precision on real images
only, and where there are none it is *not judged here*: its recorded verdict stands, and it never
turns a command's exit code to 1.

The images a workdir is judged on are recorded in its manifest by absolute path and sha256: the
held-out images of the training sidecar (``model.heldout``) and the images an artefact's own gate
ran on (``entry.real_images``). A recorded file that is gone or changed is not used (a workdir
copied to another host takes ``--data`` instead); it is only read, and only as a regular file.
"""

from pathlib import Path

import torch
import torch.nn.functional as F

from unet_export.data.dataset import IMAGE_EXTS, image_to_tensor, Preprocess
from unet_export.data.images import load_image
from unet_export.errors import UserError
from unet_export.fileio import sha256_file
from unet_export.models.sizes import SizeRule
from unet_export.parity import envelope
from unet_export.parity.gate import GATE_IMAGES
from unet_export.runtimes.tensorrt.plan import entry_profiles
from unet_export.text import counted

REDUCED = frozenset({"fp16", "bf16", "int8"})
HOW = "pass --data DIR with images like the model's (a folder of images, or a dataset with imgs/ or JPEGImages/)"
MAX_RECORDED = 32  # held-out images recorded per model: more than any gate batch, cheap to hash
IMAGES = 8  # real images a gate takes from --data or the held-out set (verify --images)
IMAGES_PER_BATCH = 8  # the INT8 gate's batch too: verify re-judges its images in its batches


def judged_on_images_only(precision: str) -> bool:
    return precision in REDUCED


def not_judged(precision: str, why: str = "no real images are recorded or given") -> str:
    """The one line a reduced-precision artefact or row gets where there are no real images."""
    return f"not judged here: {precision} is judged on real images only and {why}; {HOW}"


def image_paths(data: str | Path) -> list[Path]:
    """The images of a dataset folder (either layout) or of a plain folder of images, sorted."""
    data = Path(data)
    folder = next((data / d for d in ("imgs", "JPEGImages") if (data / d).is_dir()), data)
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file()) if folder.is_dir() else []
    if not paths:
        raise UserError(f"--data {data}: no images found (a folder of images, or a dataset with imgs/ or JPEGImages/)")
    return paths


def image_record(paths: list[Path], limit: int = MAX_RECORDED) -> dict:
    """How a manifest records images: each by absolute path and sha256, the first ``limit``."""
    return {"images": [{"path": str(Path(p).resolve()), "sha256": sha256_file(p)} for p in list(paths)[:limit]]}


def folder_record(folder: str | Path | None) -> dict | None:
    """The record of a held-out folder's images, or None where there is no such folder."""
    if folder is None or not Path(folder).is_dir():
        return None
    try:
        return image_record(image_paths(folder))
    except UserError:  # a folder without images holds nothing to judge on
        return None


def recorded_images(record, where: str) -> tuple[list[Path], str]:
    """(the recorded images present here unchanged, why none are) of a manifest record; a record
    that is not what unet-export writes is bad input, named by ``where``."""
    if record is None:
        return [], "none are recorded"
    items = record.get("images") if isinstance(record, dict) else None
    if not isinstance(items, list) or not all(
        isinstance(i, dict) and isinstance(i.get("path"), str) and isinstance(i.get("sha256"), str) for i in items
    ):  # fmt: skip
        raise UserError(f"{where} is not a list of {{path, sha256}} image records; delete it and export again")
    found = []
    for item in items:
        path = Path(item["path"])
        # A regular file only (never a device or a FIFO a hostile manifest names), and the very
        # bytes that were recorded.
        if path.is_absolute() and path.is_file() and sha256_file(path) == item["sha256"]:
            found.append(path)
    if not found:
        return [], f"the {len(items)} recorded images are not on this host (or changed)"
    return found, ""


def real_images_for(manifest: dict, entry: dict | None, data: str | Path | None, limit: int) -> tuple[list[Path], str, str]:
    """(images, where they come from, why there are none) for judging ``entry`` (or the whole
    workdir): ``data`` first, then the images the entry's own gate ran on, then the model's
    held-out images."""
    if data is not None:
        paths = image_paths(data)[:limit]
        return paths, f"{counted(len(paths), 'image')} from --data {data}", ""
    whys = []
    records = [("real_images", (entry or {}).get("real_images")), ("heldout", (manifest.get("model") or {}).get("heldout"))]
    for name, record in records:
        if record is None:
            continue
        where = f"manifest.json: {'artifacts' if name == 'real_images' else 'model'}.{name}"
        found, why = recorded_images(record, where)
        if found:
            # An artefact's own gate images are all used (the same batches its export judged);
            # the model's held-out set up to ``limit``.
            found = found if name == "real_images" else found[:limit]
            what = "images its own gate ran on" if name == "real_images" else "held-out images"
            return found, f"{len(found)} {what} (recorded)", ""
        whys.append(why)
    return [], "", (whys[0] if whys else "none are recorded or given")


def image_batches(paths: list[Path], channels: int, pp: Preprocess) -> list[torch.Tensor]:
    """The images preprocessed as the model was trained (scale or pad-to-square, /255, mean/std), in
    batches of IMAGES_PER_BATCH at the first image's size."""
    tensors = []
    for path in paths:
        img = load_image(path)  # RGB, or L/F grey
        found = 3 if img.mode == "RGB" else 1
        if found != channels and not (found == 1 and channels == 3):  # grey goes to a colour model replicated
            raise UserError(f"{path} has {found} channel(s); the model takes {channels}")
        tensors.append(image_to_tensor(img, pp, channels))  # replicated before mean/std, as training reads it
    if not tensors:
        return []
    size = tensors[0].shape[-2:]
    tensors = [t if t.shape[-2:] == size else F.interpolate(t[None], size, mode="bilinear")[0] for t in tensors]
    return list(torch.stack(tensors).split(IMAGES_PER_BATCH))


def fitted(batches: list[torch.Tensor], entry: dict) -> list[torch.Tensor]:
    """Real-image batches at their own size when the artefact takes it, else at its export size
    (a TensorRT engine none of whose profiles holds that: its first profile's opt size), split to
    the batch sizes it accepts."""
    height, width = entry["export_size"]
    profiles = entry_profiles(entry)  # a TensorRT engine: inside one of its optimisation profiles
    if profiles and not _held(profiles, height, width):
        height, width = profiles[0].opt[2:]
    out = []
    for batch in batches:
        if batch.shape[-2:] != (height, width) and not takes_size(entry, *batch.shape[-2:]):
            batch = F.interpolate(batch, (height, width), mode="bilinear", align_corners=False)
        out += list(batch.split(_most(entry, profiles, *batch.shape[-2:])))
    return out


def _most(entry: dict, profiles: list, height: int, width: int) -> int:
    """The largest batch an artefact takes at this size, at most IMAGES_PER_BATCH."""
    if entry.get("size_rule", {}).get("static"):
        return 1  # a static artefact takes exactly its 1xCxHxW export shape
    if profiles:
        return min(IMAGES_PER_BATCH, max((p.max[0] for p in _held(profiles, height, width)), default=1))
    return IMAGES_PER_BATCH


def _held(profiles: list, height: int, width: int) -> list:
    """The profiles whose height and width ranges hold this size."""
    return [p for p in profiles if p.min[2] <= height <= p.max[2] and p.min[3] <= width <= p.max[3]]


def takes_size(entry: dict, height: int, width: int) -> bool:
    """Whether a dynamic artefact runs images at their own size: judged at the scale the model
    was trained on, not rescaled to the export size (reduced precision on rescaled images is a
    false alarm; see bench.run._bench_size)."""
    record = entry.get("size_rule") or {}
    if record.get("static") or not record:
        return False
    profiles = entry_profiles(entry)
    if profiles and not _held(profiles, height, width):  # a TensorRT engine: inside one of its profiles
        return False
    sizes = SizeRule.from_record(record)
    return sizes.accepts(height) and sizes.accepts(width)


def gate_images(manifest: dict, entry: dict, data: str | Path | None) -> tuple[list[torch.Tensor], dict]:
    """The real-image batches a reduced-precision export is gated on, and their record for the
    entry; none is bad input (exit 2, nothing written): such an artefact cannot be proven."""
    paths, _, why = real_images_for(manifest, None, data, IMAGES)
    if not paths:
        raise UserError(f"the {entry['precision']} artefact is judged on real images only and {why}; {HOW}")
    model = manifest["model"]
    channels = int(model["config"].get("n_channels", 3))
    batches = image_batches(paths, channels, Preprocess.from_dict(model.get("preprocess")))
    return fitted(batches, entry), image_record(paths)


def with_probes(batches: list[torch.Tensor], entry: dict) -> tuple[list[torch.Tensor], list[str] | None, object]:
    """The gate's real-image batches plus the envelope probes of ``entry`` (its own envelope, or
    the one its source declared), their labels (None without an envelope) and the envelope."""
    env = envelope.of_entry(entry)
    if env is None:
        return batches, None, None
    return *gate_and_probes(batches, env, tuple(entry["export_size"])), env


def gate_and_probes(batches: list[torch.Tensor], env, export_size: tuple[int, int]) -> tuple[list[torch.Tensor], list[str]]:
    """The gate's real-image batches, then the same images at the envelope's probes, and the
    label of each (GATE_IMAGES for the gate's own)."""
    extra, labels = probe_images(batches, env, export_size)
    return batches + extra, [GATE_IMAGES] * len(batches) + labels


def probe_images(batches: list[torch.Tensor], env, export_size: tuple[int, int]) -> tuple[list[torch.Tensor], list[str]]:
    """Real images at each envelope probe (parity.envelope) but the export size, which the gate's
    own batches cover, with each probe's label. An image larger than the probe is cropped about
    its centre, a smaller one mirror-padded as predict pads it: reduced precision stays judged on
    real images at the scale the model was trained on, never on rescaled or seeded ones. A
    batch-1 probe takes all the images (up to the envelope's batch), so its share of changed
    pixels counts more than one small image's few hundred."""
    images = torch.cat(batches) if batches else None
    if images is None or env is None:
        return [], []
    inputs, labels = [], []
    for probe in env.probes(export_size)[1:]:
        n, _, h, w = probe.shape
        many = min(len(images), IMAGES_PER_BATCH)
        # up to the export size's area: a big probe runs one image (its float64 reference is the cost)
        if n == 1 and h * w <= export_size[0] * export_size[1] and env.accepts(many, h, w):
            n = many
        picks = images[[i % len(images) for i in range(n)]]
        inputs.append(place(picks, h, w))
        labels.append(probe.label)
    return inputs, labels


def place(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``x`` (N, C, H, W) cropped about its centre and/or mirror-padded to ``height`` x ``width``."""
    top, left = max((x.shape[-2] - height) // 2, 0), max((x.shape[-1] - width) // 2, 0)
    x = x[..., top:top + height, left:left + width]
    # Mirrored again and again: reflect takes a pad smaller than the side, and an edge replicated
    # over hundreds of pixels is a stripe no camera took, on which reduced precision fails falsely.
    while height > x.shape[-2] or width > x.shape[-1]:
        if min(x.shape[-2:]) < 2:  # nothing to mirror
            ph, pw = height - x.shape[-2], width - x.shape[-1]
            return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2], mode="replicate").contiguous()
        ph, pw = min(height - x.shape[-2], x.shape[-2] - 1), min(width - x.shape[-1], x.shape[-1] - 1)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2], mode="reflect")
    return x.contiguous()
