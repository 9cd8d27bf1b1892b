"""The pictures of an HTML report: each artefact run on a few real images beside the eager model,
and the images where it disagrees most with the exact (float64) answer drawn for a person.

Every number shown beside a picture is the gate's own (parity.gate.compare on that one image,
by the tolerance the artefact was judged by), and the pixels marked as changing class are the
ones the gate counts (parity.gate.class_changes): red where the class differs from float64's
decision, yellow where it differs but float64 itself sits on a tie (not held against the
artefact). So a picture can never tell another story than the verdict beside it.
"""

import base64
import io
import math
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from unet_export.data.dataset import Preprocess
from unet_export.errors import UnetExportError, require
from unet_export.metrics import logits_to_mask
from unet_export.models import mask_threshold
from unet_export.parity.gate import FP32, class_changes, compare, tolerance_from_record
from unet_export.parity.realimages import IMAGES_PER_BATCH, fitted, image_batches, real_images_for
from unet_export.runtimes.torch.eager import EagerRunner
from unet_export.workdir.runners import artifact_runner

CANDIDATES = 8  # real images each artefact runs on; the worst SHOWN of them are drawn
SHOWN = 3
MAX_SIDE = 256  # a panel's longest side on the page, in pixels
RING = 7  # the ring drawn around each class change, in pixels
CHANGED, TIE = (230, 25, 75), (255, 215, 0)  # red: a class change the gate counts; yellow: a float64 tie
# Class colours of the masks: background black, then distinct hues (matplotlib's tab10 order).
PALETTE = [(0, 0, 0), (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]  # fmt: skip


@dataclass
class Panel:
    """One real image through one artefact: the gate's numbers for it, and its pictures (PNG data URIs)."""

    image: str  # the file name
    case: dict  # parity.gate.CaseResult of this image alone, as the manifest records cases
    pngs: dict[str, str]  # input, eager, artefact, changed, error
    error_scale: str  # the heatmap's scale in words: what black and full colour are


@dataclass
class Pictures:
    """An artefact's panels, how they were chosen, or why there are none; ``recheck``: the gate
    applied here to all the images it ran on, in the gate's batches (``images``, ``passed``,
    ``failures``), which `unet-export report` holds against the recorded verdict."""

    panels: list[Panel] = field(default_factory=list)
    chosen: str = ""
    note: str = ""
    recheck: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def workdir_pictures(workdir: Path, manifest: dict, entries: list[dict], net: torch.nn.Module | None,
                     data: str | Path | None = None, *, why_no_model: str = "", candidates: int = CANDIDATES,
                     shown: int = SHOWN) -> dict[str, Pictures]:  # fmt: skip
    """Pictures per artefact path, for ``entries`` of ``workdir``'s manifest: each run on the CPU
    on up to ``candidates`` real images (``data``, else the images its own gate ran on, else the
    model's held-out ones), the ``shown`` with the most class changes drawn. ``net``: the eager
    model (None: no pictures, for ``why_no_model``)."""
    if net is None:
        return {e["path"]: Pictures(note=f"no pictures: the eager model cannot be rebuilt here ({why_no_model})")
                for e in entries}  # fmt: skip
    out = {}
    # --data or the held-out images, found (every recorded file hashed) once for the workdir, as
    # verify finds them; only an artefact with gate images of its own looks again.
    shared = real_images_for(manifest, None, data, candidates)
    with _EagerCache(net) as eager:
        for entry in entries:
            own = data is None and entry.get("real_images") is not None
            paths, _, why = real_images_for(manifest, entry, data, candidates) if own else shared
            if not paths:
                out[entry["path"]] = Pictures(note=f"no pictures: no real images ({why}); pass --data DIR")
                continue
            out[entry["path"]] = artefact_pictures(workdir, manifest, entry, paths[:candidates], eager, shown)
    return out


def artefact_pictures(workdir: Path, manifest: dict, entry: dict, paths: list[Path], eager: "_EagerCache",
                      shown: int = SHOWN) -> Pictures:  # fmt: skip
    """One artefact on ``paths``, each image run alone: the gate's numbers per image, the worst
    drawn, and the gate's verdict on them all (judged in its batches of IMAGES_PER_BATCH, as
    verify judges real images: a reduced-precision gate bounds the share of a batch's pixels,
    which one image alone may exceed while its batch passes)."""
    if entry["format"] == "tensorrt":
        return Pictures(note="no pictures: a TensorRT engine runs on CUDA only and this report ran on the CPU")
    if entry["format"] == "aoti" and entry.get("device", "cpu") != "cpu":
        return Pictures(note=f"no pictures: compiled for {entry.get('device')}, and this report ran on the CPU")
    model = manifest["model"]
    pp = Preprocess.from_dict(model.get("preprocess"))
    images = torch.cat(fitted(image_batches(paths, int(model["config"].get("n_channels", 3)), pp), entry))
    tol = tolerance_from_record((entry.get("parity") or {}).get("limits"), entry["precision"])
    threshold = mask_threshold(model["config"])
    try:
        with artifact_runner(entry, workdir, "cpu") as runner:
            outs = [runner.infer(images[i : i + 1]) for i in range(len(images))]
    except UnetExportError as exc:  # no runtime for it here, or the file changed (IntegrityError)
        return Pictures(note=f"no pictures: {exc}")
    except Exception as exc:  # the artefact would not run: its verdict says so, the pictures say why there are none
        return Pictures(note=f"no pictures: the artefact did not run ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})")
    judged, refs = [], []
    for i, (path, out) in enumerate(zip(paths, outs)):
        x = images[i : i + 1]
        ref, ref64 = eager.outputs(path, x)
        case = compare(out, ref, tol, exact=ref64, threshold=threshold)
        case.shape = list(x.shape)
        judged.append((path, x, out, ref64, case))
        refs.append(ref)
    recheck = _recheck(outs, refs, [j[3] for j in judged], tol, threshold)
    # Worst first: the most pixels changing class (ties excluded), then the largest error vs float64.
    judged.sort(key=lambda j: (-(j[4].differing_pixels - j[4].tie_pixels), -_finite(j[4].judged_err)))
    worst = judged[:shown]
    scale = _error_scale(tol, [j[4] for j in worst])
    panels = [_panel(path.name, x, out, ref64, case, pp, threshold, scale) for path, x, out, ref64, case in worst]
    chosen = (f"the {len(worst)} of {len(judged)} real images with the most pixels changing class (ties excluded), "
              "then the largest error against float64")  # fmt: skip
    return Pictures(panels=panels, chosen=chosen, recheck=recheck)


def _recheck(outs: list, refs: list, refs64: list, tol, threshold: float) -> dict:
    """The gate on every image run here, in groups of IMAGES_PER_BATCH."""
    failures = []
    for start in range(0, len(outs), IMAGES_PER_BATCH):
        group = slice(start, start + IMAGES_PER_BATCH)
        case = compare(torch.cat(outs[group]), torch.cat(refs[group]), tol, exact=torch.cat(refs64[group]),
                       threshold=threshold)  # fmt: skip
        failures += [f"images {start + 1}-{start + len(outs[group])}: {f}" for f in case.failures]
    return {"images": len(outs), "passed": not failures, "failures": failures}


class _EagerCache:
    """The eager model's fp32 and float64 outputs per input, computed once for every artefact; its
    two runners are activated once (the float64 one copies the whole model) for all of them."""

    def __init__(self, net):
        self.fp32, self.fp64, self.done = EagerRunner(net, "cpu"), EagerRunner(net, "cpu", "fp64"), {}

    def __enter__(self) -> "_EagerCache":
        self.stack = ExitStack()
        self.stack.enter_context(self.fp32)
        self.stack.enter_context(self.fp64)
        return self

    def __exit__(self, *exc) -> None:
        self.stack.close()

    def outputs(self, path: Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(fp32, float64) logits of image ``path`` as ``x``: the same file at the same size is the
        same input for every artefact (one preprocessing)."""
        key = (str(path), tuple(x.shape))
        if key not in self.done:
            self.done[key] = (self.fp32.infer(x), self.fp64.infer(x))
        return self.done[key]


def _finite(value: float) -> float:
    return value if isinstance(value, float) and math.isfinite(value) else math.inf


@dataclass(frozen=True)
class Scale:
    """How |artefact - float64| becomes a colour: black at ``low``, full colour at ``top``."""

    low: float
    top: float
    log: bool
    words: str


def _error_scale(tol, cases) -> Scale:
    """FP32: linear from 0 to the gate's bound (full colour: at or beyond it). Reduced precision,
    which has no error bound and whose error is large at a few pixels: logarithmic from the noise
    floor to the largest error shown, so where it departs from arithmetic noise stays visible."""
    bounds = [c.atol for c in cases if c.atol is not None]
    if tol.bounds_error and bounds:
        top = min(bounds)
        return Scale(0.0, top, False, f"linear, black 0 to full colour {top:.2e}, the gate's error bound (full "
                                      "colour is at or beyond it)")  # fmt: skip
    errs = [c.judged_err for c in cases if math.isfinite(c.judged_err)]
    floors = [c.noise_floor for c in cases if c.noise_floor]
    top = max(errs) if errs and max(errs) > 0 else 1.0
    # three decades below the largest error, or down to the noise floor where that is closer
    low = max(min(floors) if floors else 0.0, top / 1000)
    return Scale(low, top, True, f"logarithmic, black at {low:.2e} or less to full colour at {top:.2e} (the largest "
                                 "error among the images shown)")  # fmt: skip


def _panel(name: str, x, out, ref64, case, pp: Preprocess, threshold: float, scale: Scale) -> Panel:
    record = asdict(case) | {"passed": case.passed}
    if not case.max_abs_err == case.max_abs_err:  # not compared (wrong shape or NaN): the input alone
        return Panel(name, record, {"input": _png(_input_rgb(x, pp))}, scale.words)
    out = out.detach().double().cpu()
    out_mask, exact_mask = logits_to_mask(out, threshold)[0], logits_to_mask(ref64, threshold)[0]
    tie_bound = case.atol if case.atol is not None else FP32.allowed(case.noise_floor or 0.0, max(1.0, case.max_abs_ref))
    differ, ties = class_changes(out_mask[None], exact_mask[None], ref64, threshold, tie_bound)
    counted, ties = (differ & ~ties)[0], ties[0]
    err = (out - ref64.double()).abs().amax(dim=1)[0]
    rgb = _input_rgb(x, pp)
    step = max(1, math.ceil(max(rgb.shape[:2]) / MAX_SIDE))
    pngs = {
        "input": _png(rgb[::step, ::step]),
        "eager": _png(_colour(exact_mask)[::step, ::step]),
        "artefact": _png(_colour(out_mask)[::step, ::step]),
        "changed": _png(_overlay(rgb, counted, ties, step)),
        "error": _png(_heat(_pool(err, step), scale)),
    }
    return Panel(name, record, pngs, scale.words)


def _input_rgb(x: torch.Tensor, pp: Preprocess) -> np.ndarray:
    """The image as the model saw it (after resizing), back on a 0..255 RGB scale."""
    img = x[0].double()
    if pp.std is not None:
        img = img * torch.tensor(pp.std, dtype=img.dtype)[:, None, None] + torch.tensor(pp.mean, dtype=img.dtype)[:, None, None]
    if pp.bgr:
        img = img.flip(0)
    img = img if img.shape[0] == 3 else img[:1].expand(3, -1, -1)
    return (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def _colour(mask: torch.Tensor) -> np.ndarray:
    palette = np.array(PALETTE * (1 + int(mask.max()) // len(PALETTE)), dtype=np.uint8)
    return palette[mask.numpy()]


def _pool(values: torch.Tensor, step: int) -> torch.Tensor:
    """Shrunk by ``step`` keeping each block's largest value: one changed pixel stays visible."""
    values = values.double()
    return values if step == 1 else F.max_pool2d(values[None, None], step, ceil_mode=True)[0, 0]


def _overlay(rgb: np.ndarray, counted: torch.Tensor, ties: torch.Tensor, step: int) -> np.ndarray:
    """The input dimmed to grey, class changes the gate counts in red with a light red ring around
    them (one pixel of 128 is easy to miss), float64 ties in yellow."""
    grey = (rgb[::step, ::step].mean(axis=2, keepdims=True) * 0.45 + 40).astype(np.uint8).repeat(3, axis=2)
    counted_px = _pool(counted, step)
    ring = F.max_pool2d(counted_px[None, None], RING, stride=1, padding=RING // 2)[0, 0].bool().numpy()
    ties, counted_px = _pool(ties, step).bool().numpy(), counted_px.bool().numpy()
    grey[ring] = (grey[ring] * 0.4 + np.array(CHANGED) * 0.6).astype(np.uint8)
    grey[ties] = TIE
    grey[counted_px] = CHANGED
    return grey


def _heat(err: torch.Tensor, scale: Scale) -> np.ndarray:
    # the report extra, imported here: an export without --report never loads matplotlib
    colormaps = require("matplotlib", extra="report").colormaps
    if scale.log:
        err = err.clamp(min=scale.low)
        scaled = (err / scale.low).log() / math.log(scale.top / scale.low)
    else:
        scaled = err / scale.top
    return (colormaps["magma"](scaled.clamp(0, 1).numpy())[..., :3] * 255).round().astype(np.uint8)


def _png(rgb: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb), "RGB").save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
