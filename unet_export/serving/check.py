"""`unet-export triton --check`: the repository served by a real Triton server on 127.0.0.1,
every response judged against the eager model.

1. Every model this server build can load is started (the others are named, with the reason).
2. Each served model that returns logits: seeded batches and a real-image batch, over HTTP and
   gRPC, through ``TritonRunner`` and ``check_parity`` -- the gate every artefact passed.
3. Each served pipeline: uint8 images over HTTP and gRPC, masks compared with `predict`'s.
4. A batch over max_batch_size: Triton's error on both protocols, and the server still answers.
5. A load test (``loadtest``), every response checked.
The server is always stopped and every client closed, also when a step fails.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from unet_export.checkpoint import build_model, class_mask_values
from unet_export.data.dataset import image_to_tensor, mask_to_classes, Preprocess
from unet_export.data.images import load_image, open_image
from unet_export.errors import UnetExportError, UserError
from unet_export.inference.predictor import padded_size
from unet_export.metrics import decision_margin, dice_score
from unet_export.models import mask_threshold
from unet_export.models.sizes import SizeRule
from unet_export.parity.envelope import Envelope
from unet_export.parity.gate import FP32, ParityReport, check_parity, compare, seeded_inputs, tolerance_from_record
from unet_export.parity.realimages import HOW, judged_on_images_only, not_judged, real_images_for
from unet_export.runtimes import EagerRunner, Runner
from unet_export.serving.client import PROTOCOLS, TritonRunner, infer, make_client
from unet_export.serving.install import TritonInstall
from unet_export.serving.loadtest import LoadReport, load_test
from unet_export.serving.masks import expected_mask
from unet_export.serving.server import TritonServer, repository_server
from unet_export.serving.validate import read_record
from unet_export.text import counted
from unet_export.workdir.lookup import manifest_checkpoint

MAX_IMAGES = 8  # real images sent per check: enough for a batch and a few pipeline calls


@dataclass
class MaskCase:
    model: str
    protocol: str
    image: str
    pixels: int
    differing: int = 0
    ties: int = 0  # differing pixels where eager's own top-two logits are within 2 x atol
    dice: float = float("nan")
    error: str | None = None
    passed: bool = False


@dataclass
class ServeCheck:
    repo: Path
    install: TritonInstall
    served: list[str]
    not_served: dict[str, str]
    server: dict = field(default_factory=dict)
    parity: list[tuple[str, str, ParityReport]] = field(default_factory=list)
    masks: list[MaskCase] = field(default_factory=list)
    overload: dict = field(default_factory=dict)
    load: LoadReport | None = None
    notes: list[str] = field(default_factory=list)
    not_checked: dict[str, str] = field(default_factory=dict)  # served, but nothing here to judge it on

    @property
    def passed(self) -> bool:
        return (all(r.passed for _, _, r in self.parity) and all(m.passed for m in self.masks)
                and self.overload.get("passed", False) and self.load is not None and self.load.passed)  # fmt: skip


@dataclass
class CheckInputs:
    server: TritonServer  # not started
    found: dict  # every model's parsed config
    missing: dict[str, str]  # {model: why this build cannot load it}
    record: dict
    checkpoint: object  # the eager reference's checkpoint
    images: list[Path]
    why: str  # why there are no real images


def check_inputs(repo: str | Path, *, tritonserver: str | Path | None = None, data: str | Path | None = None,
                 weights: str | Path | None = None, model=None) -> CheckInputs:  # fmt: skip
    """Everything --check refuses (exit 2) before a server starts. `triton --check` runs it on the
    staged repository too, so that bad input publishes nothing. ``model`` rebuilds a factory's
    eager model (--model-factory)."""
    server, found, missing = repository_server(Path(repo), tritonserver)
    record = read_record(Path(repo))
    checkpoint = manifest_checkpoint({"model": record["model"]}, weights, model)
    images, why = real_images(record, data)
    return CheckInputs(server, found, missing, record, checkpoint, images, why)


def check_served(repo: str | Path, *, tritonserver: str | Path | None = None, data: str | Path | None = None,
                 weights: str | Path | None = None, model=None, clients: int = 8, requests: int = 50,
                 deadline_s: float = 180.0, seed: int = 0, on_step=lambda message: None) -> ServeCheck:  # fmt: skip
    repo = Path(repo)
    inputs = check_inputs(repo, tritonserver=tritonserver, data=data, weights=weights, model=model)
    server, found, record, images, why = inputs.server, inputs.found, inputs.record, inputs.images, inputs.why
    served, install = server.models, server.install
    report = ServeCheck(repo, install, served, inputs.missing)
    net = build_model(inputs.checkpoint)  # the eager reference
    if not images:
        report.notes.append(f"no real images ({why}): FP32 models are checked on seeded inputs only; {HOW}")
    on_step(f"starting tritonserver ({install.origin}) with {len(served)} of {counted(len(found), 'model')}")
    with server:
        report.server = {"pid": server.proc.pid, "http": server.http_url, "grpc": server.grpc_url,
                         "started_s": server.started_in}  # fmt: skip
        on_step(f"ready in {server.started_in:.1f} s: HTTP {server.http_url}, gRPC {server.grpc_url}")
        logits_models = [n for n in served if "artifact" in record["models"][n]]
        for name in logits_models:
            precision = record["models"][name]["artifact"]["precision"]
            if judged_on_images_only(precision) and not images:
                report.not_checked[name] = not_judged(precision, why)
                continue
            report.parity += served_parity(server, name, found[name], record, net, images, seed)
        for name in [n for n in served if found[n].platform == "ensemble"]:
            if not images:  # a pipeline takes images: its masks are compared on real ones
                report.not_checked[name] = f"not judged here: a pipeline is checked on real images and {why}; {HOW}"
                continue
            report.masks += pipeline_masks(server, name, found, record, net, images)
        primary = next((n for n in logits_models if record["models"][n]["kind"] == "python"), logits_models[0])
        report.overload = over_max_batch(server, primary, found[primary], record)
        real = load_images(record["models"][primary]["artifact"], record["model"], images)
        if real is None:  # reduced precision and no real images: timed, its answers not judged
            reason = why if not images else "none of the real images has a size it was proven at"
            report.not_checked.setdefault(primary, not_judged(record["models"][primary]["artifact"]["precision"], reason))
            report.notes.append(f"load test on {primary}: seeded requests, answers not judged (reduced precision)")
        on_step(f"load test: {clients} clients x {requests} requests on {primary}")
        report.load = load_test(server, primary, found[primary], record["models"][primary], net, clients=clients,
                                requests=requests, deadline_s=deadline_s, seed=seed, real=real or None,
                                judge=real is not None, threshold=mask_threshold(record["model"]["config"]))  # fmt: skip
    report.server["stopped_s"] = server.stopped_in
    return report


def real_images(record: dict, data: str | Path | None) -> tuple[list[Path], str]:
    """(up to MAX_IMAGES real images, why there are none): ``data`` (a dataset folder or a folder
    of images), else the held-out images the repository's model record holds by path and sha256."""
    if data is not None and not Path(data).is_dir():
        raise UserError(f"--data {data}: not a folder")
    images, _, why = real_images_for({"model": record["model"]}, None, data, MAX_IMAGES)
    return images, why


def summary(report: ServeCheck) -> str:
    """The last line: what was really checked, of how many models, and what was not, never more."""
    checked = list(dict.fromkeys([m for m, _, _ in report.parity] + [c.model for c in report.masks]))
    skipped = [f"{m} (not served)" for m in report.not_served] + [f"{m} (no real images)" for m in report.not_checked]
    total = len(checked) + len(skipped)
    line = f"checked {len(checked)} of {counted(total, 'model')}" + (f" ({', '.join(checked)})" if checked else "")
    return line + (f"; not checked here: {', '.join(skipped)}" if skipped else "")


def _model_io(config) -> tuple[str, str]:
    return config.input[0].name, config.output[0].name


def served_parity(server: TritonServer, name: str, config, record: dict, net, images: list[Path], seed: int):
    """The served model against eager, with the artefact's own tolerance, over both protocols."""
    model_record = record["models"][name]
    artifact = model_record["artifact"]
    tol = tolerance_from_record(artifact.get("limits"), artifact["precision"])  # the gate it passed
    limit = config.max_batch_size or 1
    shapes = [(min(s[0], limit), *s[1:]) for s in artifact["parity_shapes"]]
    shapes = [s for s in shapes if inside(artifact, s[0], *s[2:])]  # what was proven, and no more
    # Reduced precision is judged on real images only, as its export gate was: on noise a trained
    # model's logits sit near ties and INT8 "fails" where it is fine.
    seeded = seeded_inputs(shapes, seed) if artifact["precision"] == "fp32" else []
    inputs = seeded + _real_batch(images, record["model"], artifact, limit)
    threshold = mask_threshold(record["model"]["config"])
    results = []
    with _Memo(EagerRunner(net, "cpu")) as reference, _Memo(EagerRunner(net, "cpu", "fp64")) as exact:
        for protocol in PROTOCOLS:
            url = server.http_url if protocol == "http" else server.grpc_url
            runner = TritonRunner(url, name, *_model_io(config), protocol=protocol, precision=artifact["precision"])
            results.append((name, protocol, _parity(runner, reference, exact, inputs, tol, threshold)))
    return results


class _Memo(Runner):
    """A runner whose output for each input tensor is computed once: both protocols are judged
    against one eager (and one float64) run, which costs more than the served requests."""

    def __init__(self, runner: Runner):
        super().__init__(runner.device, runner.precision)
        self.runner, self.name, self.cache = runner, runner.name, {}

    def _activate_impl(self) -> None:
        self.runner.activate()

    def _infer_impl(self, x: torch.Tensor) -> torch.Tensor:
        if id(x) not in self.cache:
            self.cache[id(x)] = (x, self.runner.infer(x))  # x kept: its id stays unique while cached
        return self.cache[id(x)][1]

    def _deactivate_impl(self) -> None:
        self.runner.deactivate()
        self.cache = {}


def _parity(runner: TritonRunner, reference: Runner, exact: Runner, inputs, tol, threshold: float) -> ParityReport:
    """check_parity, where a request Triton refuses is a failed check, not a crash."""
    try:
        with runner:
            return check_parity(runner, reference, inputs, tol, exact=exact, threshold=threshold)
    except UnetExportError:
        raise
    except Exception as exc:
        message = " ".join(str(exc).split())[:300]
        error = f"{type(exc).__name__}: {message}"
        return ParityReport(f"{runner.name} ({runner.describe()})", tol.name, cases=[], error=error)


def _real_batch(images: list[Path], model: dict, artifact: dict, limit: int) -> list[torch.Tensor]:
    """One batch of real images of one size (the model's own preprocessing), if the model takes it."""
    if not images:
        return []
    n_channels = model["config"].get("n_channels", 3)
    pp = Preprocess.from_dict(model.get("preprocess"))
    tensors = [image_to_tensor(load_image(p, n_channels), pp, n_channels) for p in images]
    same = [t for t in tensors if t.shape == tensors[0].shape][: min(4, limit)]
    rule = SizeRule.from_record(artifact["size_rule"])
    height, width = same[0].shape[-2:]
    while len(same) > 1 and not inside(artifact, len(same), height, width):  # at most the proven batch
        same.pop()
    fits = rule.accepts(height) and rule.accepts(width) and inside(artifact, len(same), height, width)
    return [torch.stack(same)] if fits else []


def load_images(artifact: dict, model: dict, images: list[Path]) -> list[torch.Tensor] | None:
    """The load test's requests for a reduced-precision model: the batch of real images its
    served parity is judged on (a reduced-precision gate judges a batch: Dice and class changes
    over its pixels; on one small image alone it says less), in each rotation of its order, so
    the requests differ; [] for FP32 (seeded requests); None where it has no real image it takes."""
    if not judged_on_images_only(artifact["precision"]):
        return []
    batch = _real_batch(images, model, artifact, limit=4)
    return [torch.roll(batch[0], k, dims=0) for k in range(len(batch[0]))] if batch else None


def envelope_of(artifact: dict) -> Envelope | None:
    """The envelope the served artefact was proven on (None: recorded before envelopes)."""
    return Envelope.from_dict(artifact["envelope"]) if artifact.get("envelope") else None


def inside(artifact: dict, n: int, height: int, width: int) -> bool:
    """Whether the check may send this shape: only what the artefact was proven at is sent."""
    env = envelope_of(artifact)
    return env is None or env.accepts(n, height, width)


def smallest_side(artifact: dict) -> int:
    """The smallest side the model takes and (where recorded) was proven at, for a small request."""
    rule = SizeRule.from_record(artifact["size_rule"])
    env = envelope_of(artifact)
    if env is None:
        return rule.first()
    # each box's smallest square (a TensorRT engine has a box per profile): the least one it holds
    sides = [rule.at_least(max(rule.first(), b.height[0], b.width[0])) for b in env.boxes]
    return min([s for s in sides if env.accepts(1, s, s)] or sides)


def _inside_images(images: list[Path], model: dict, artifact: dict) -> list[Path]:
    """The images whose input to the model (preprocessed, padded to the size rule and up to the
    smallest proven side, as predict and the pipeline pad it) the envelope holds."""
    env = envelope_of(artifact)
    if env is None:
        return images
    pp, rule = Preprocess.from_dict(model.get("preprocess")), SizeRule.from_record(artifact["size_rule"])
    kept = []
    for path in images:
        with open_image(path) as img:  # the header: its size
            width, height = pp.size(*img.size)
        if env.accepts(1, *padded_size(rule, height, width, env)):
            kept.append(path)
    return kept


def pipeline_masks(server: TritonServer, name: str, found: dict, record: dict, net, images: list[Path]) -> list:
    """Each image through the ensemble, over both protocols, against `predict`'s mask from eager."""
    model = record["model"]
    step = found[name].ensemble_scheduling.step[1].model_name  # the model in the middle
    artifact = record["models"][step]["artifact"]
    tol = tolerance_from_record(artifact.get("limits"), artifact["precision"])
    images = _inside_images(images, model, artifact)  # the served model refuses the others (a 400)
    expected = {p: expected_mask(net, model, artifact["size_rule"], p, envelope_of(artifact)) for p in images}
    cases = []
    for protocol in PROTOCOLS:
        client = make_client(protocol, server.http_url if protocol == "http" else server.grpc_url)
        try:
            for path, (mask, eager) in expected.items():
                cases.append(_mask_case(client, protocol, name, path, model, mask, eager, tol))
        finally:
            client.close()
    return cases


def _mask_case(client, protocol: str, name: str, path: Path, model: dict, mask: np.ndarray, eager, tol) -> MaskCase:
    """One image: the served mask against predict's, a differing pixel excused only where the
    float64 decision is a tie (``eager``: what expected_mask returned to compute that)."""
    n_channels = model["config"].get("n_channels", 3)
    image = np.asarray(load_image(path, n_channels))
    image = np.repeat(image[..., None], n_channels, -1) if image.ndim == 2 else image
    case = MaskCase(name, protocol, path.name, pixels=mask.shape[0] * mask.shape[1])
    values = class_mask_values(model.get("mask_values"), model["config"].get("n_classes", 2))
    try:
        served = infer(client, protocol, name, {"IMAGE": image.astype(np.uint8)[None]}, ["MASK"])["MASK"][0]
        served_classes = mask_to_classes(served, values, path)
    except Exception as exc:  # Triton's error, or a value that is no mask value: a failed case
        case.error = " ".join(str(exc).split())[:300]
        return case
    if served.shape != mask.shape:
        case.error = f"mask shape {served.shape}, predict's {mask.shape}"
        return case
    differ = served != mask if served.ndim == 2 else (served != mask).any(-1)
    case.differing = int(differ.sum())
    if eager is not None and case.differing:
        ref, x, net = eager
        with EagerRunner(net, "cpu", "fp64") as float64:  # only for an image that differs: it is slow
            exact = float64.infer(x)
        # the error the gate allows here (FP32's for reduced precision), as compare() excuses ties
        bound = compare(ref, ref, tol, exact=exact).atol or compare(ref, ref, FP32, exact=exact).atol
        margin = decision_margin(exact, mask_threshold(model["config"]))[0].numpy()
        case.ties = int((differ & (margin <= 2 * bound)).sum())
    expected_classes = torch.from_numpy(mask_to_classes(mask, values, path))[None]
    n_classes = model["config"].get("n_classes", 2)
    case.dice = dice_score(torch.from_numpy(served_classes)[None], expected_classes, n_classes)
    case.passed = (case.differing - case.ties) / case.pixels <= tol.max_disagreement and (
        tol.min_dice is None or case.dice >= tol.min_dice)  # fmt: skip
    return case


def over_max_batch(server: TritonServer, name: str, config, record: dict) -> dict:
    """A batch one over max_batch_size: Triton must refuse it (an error, on both protocols) and
    then still answer a valid request."""
    model = record["models"][name]
    if config.max_batch_size == 0:  # a static model takes no batch dimension to exceed
        return {"model": name, "batch": None, "answers": {}, "recovered": True, "passed": True}
    n = config.max_batch_size + 1
    side = smallest_side(model["artifact"])
    shape = (n, *[d if d > 0 else side for d in config.input[0].dims])
    result = {"model": name, "batch": n, "answers": {}}
    for protocol in PROTOCOLS:
        client = make_client(protocol, server.http_url if protocol == "http" else server.grpc_url)
        try:
            infer(client, protocol, name, {config.input[0].name: np.zeros(shape, np.float32)}, [config.output[0].name])
            result["answers"][protocol] = "answered (no error)"
        except Exception as exc:
            result["answers"][protocol] = " ".join(str(exc).split())[:200]
        finally:
            client.close()
    refused = all("batch" in a and "must be <=" in a for a in result["answers"].values())
    result["recovered"] = server.is_ready() and _answers(server, name, config, shape[1:])
    result["passed"] = refused and result["recovered"]
    return result


def _answers(server: TritonServer, name: str, config, item_shape: tuple) -> bool:
    client = make_client("http", server.http_url)
    try:
        out = infer(client, "http", name, {config.input[0].name: np.zeros((1, *item_shape), np.float32)},
                    [config.output[0].name])[config.output[0].name]  # fmt: skip
        return out.shape[0] == 1 and bool(np.isfinite(out).all())
    except Exception:
        return False
    finally:
        client.close()
