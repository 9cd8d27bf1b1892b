"""Parity and Dice of a runner against the eager model, judged by the exact answer: data in,
results out.

The reference is the eager model run in float64 (on the CPU) on the same inputs. Eager fp32's
own error against it is the arithmetic noise floor of this model on this input; an FP32 artefact
passes when its error against float64 is within a small multiple of that floor plus a tiny
absolute allowance, and no pixel changes class except where the float64 decision itself lies
within that allowance (a tie). Both numbers were chosen by measurement
(benchmarks/parity_rule.py, benchmarks/results/*-parity-rule.md): correct artefacts of every
registered model (ONNX Runtime, OpenVINO, TorchScript, AOTInductor, torch.compile, channels-last)
measured at most 1.75 x the floor, damaged ones 11 x and more.

Reduced precision (fp16, bf16, int8) keeps its class-change and Dice gates, counted against the
float64 decision, with the same float64 ties excluded. Comparisons are data (after Polygraphy's
comparator): every statistic is kept, every failing check is collected, and a failure says the
loosest tolerance that would have passed.
"""

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Callable

import torch

from unet_export.errors import UserError
from unet_export.metrics import decision_margin, dice_score, logits_to_mask
from unet_export.runtimes.base import Runner
from unet_export.runtimes.torch.eager import EagerRunner


@dataclass(frozen=True)
class Tolerance:
    """One gate. ``rtol`` and ``rel_atol`` bound the error against float64 (``--rtol``,
    ``--atol``); ``max_disagreement`` and ``min_dice`` bound decisions (``--max-class-change``,
    ``--min-dice``). None switches a check off."""

    name: str
    rel_atol: float | None  # --atol: allowance in units of max(1, max |float64 logit|)
    max_disagreement: float  # largest allowed fraction of pixels whose class differs (ties excluded)
    min_dice: float | None  # smallest allowed Dice(artefact mask, eager mask)
    rtol: float | None = None  # --rtol: allowance as a multiple of eager fp32's own error vs float64

    @property
    def bounds_error(self) -> bool:
        return self.rtol is not None or self.rel_atol is not None

    def allowed(self, floor: float, scale: float) -> float:
        """The largest error against float64 this gate accepts, given the noise floor and
        max(1, max |float64 logit|)."""
        return (self.rtol or 0.0) * floor + (self.rel_atol or 0.0) * scale

    def to_dict(self) -> dict:
        """As the manifest records it, in the options' names."""
        return {"name": self.name, "rtol": self.rtol, "atol": self.rel_atol,
                "max_class_change": self.max_disagreement, "min_dice": self.min_dice}  # fmt: skip


# Measured on CPU (benchmarks/results/*-parity-rule.md): correct FP32 artefacts at most 1.75 x the
# floor (OpenVINO on DeepLabV3), the closest damage 11.2 x (DeepLab's last conv x 1.001 under
# realistic BatchNorm noise) and 16 x (a ResNet-50 BatchNorm eps 1e-5 -> 1e-3). 5 x leaves 2.9 x
# on the correct side (kernels not measured here, e.g. on a GPU, may round differently) and 2.2 x
# on the damaged one. 1e-7 x max(1, |logit|), just under one float32 ulp of a unit logit, keeps a
# floor that happens to be ~0 from failing an output that is merely rounded differently; it is
# small enough not to hide damage in models whose logits are tiny.
FP32 = Tolerance("fp32", rel_atol=1e-7, max_disagreement=0.0, min_dice=None, rtol=5.0)
FP16 = Tolerance("fp16", rel_atol=None, max_disagreement=1e-3, min_dice=0.999)
# One gate for every reduced precision, each under its own name: a rule printed as "fp16
# tolerance" over an INT8 verdict told the user the wrong thing.
TOLERANCES = {"fp32": FP32, "fp16": FP16, "bf16": replace(FP16, name="bf16"), "int8": replace(FP16, name="int8")}
# Only for callers without a float64 reference (compare(out, ref, tol) with no ``exact``): the
# fixed bound against eager fp32 that the float64 rule replaced. The export, verify and bench
# gates always have one.
FALLBACK_REL_ATOL = 1e-4


def tolerance_for(precision: str, *, rtol: float | None = None, atol: float | None = None,
                  max_class_change: float | None = None, min_dice: float | None = None,
                  base: Tolerance | None = None) -> Tolerance:  # fmt: skip
    """The gate of ``precision`` (or ``base``) with the user's options applied: ``rtol``/``atol``
    set the FP32 error bound, ``max_class_change``/``min_dice`` the reduced-precision gates."""
    tol = base or TOLERANCES[precision]
    for name, value in (("rtol", rtol), ("atol", atol), ("max_class_change", max_class_change), ("min_dice", min_dice)):
        if value is not None and (not math.isfinite(value) or value < 0 or (name == "min_dice" and value > 1)):
            upper = " and <= 1" if name == "min_dice" else ""
            raise UserError(f"--{name.replace('_', '-')} must be a finite number >= 0{upper}, got {value}")
    if precision == "fp32":
        return replace(tol, rtol=tol.rtol if rtol is None else rtol, rel_atol=tol.rel_atol if atol is None else atol)
    return replace(tol, max_disagreement=tol.max_disagreement if max_class_change is None else max_class_change,
                   min_dice=tol.min_dice if min_dice is None else min_dice)  # fmt: skip


def tolerance_from_record(record: dict | None, precision: str) -> Tolerance:
    """The gate a manifest entry was judged by (its ``parity.limits``), or the default one."""
    base = TOLERANCES.get(precision, replace(FP16, name=precision))
    if not record:
        return base
    return Tolerance(base.name, record.get("atol"), record.get("max_class_change", base.max_disagreement),
                     record.get("min_dice"), record.get("rtol"))  # fmt: skip


# The checks one input is put to, in the order they run (CaseResult.checks).
OUTPUT = "output"  # the artefact's output has eager's shape and is finite
ERROR = "error vs float64"  # within the error bound (FP32; "vs eager fp32" where no float64 ran)
CLASS_CHANGE = "class change"  # share of pixels changing class, ties excluded
DICE = "Dice"  # Dice against float64's mask (reduced precision)
ALONE = "batch vs alone"  # a batch's output matches each of its images run alone
CHECKS = (OUTPUT, ERROR, CLASS_CHANGE, DICE, ALONE)


@dataclass
class CaseResult:
    """One input batch: the statistics, and the checks that failed (empty when it passed)."""

    shape: list[int]  # the output's shape from compare(); check_parity sets the input's
    max_abs_err: float = float("nan")  # against eager fp32
    mean_abs_err: float = float("nan")
    max_abs_ref: float = float("nan")  # max |logit| of the reference judged against (float64 when there is one)
    atol: float | None = None  # the error bound in force: rtol x noise_floor + rel_atol x max(1, max_abs_ref)
    differing_pixels: int = 0  # against the reference's decision (float64 when there is one)
    tie_pixels: int = 0  # differing pixels whose float64 margin is within 2 x the allowed error: undecidable
    argmax_disagreement: float = 0.0  # fraction of pixels that differ, ties excluded
    dice_vs_eager: float = float("nan")
    reference: str = "eager fp32"  # what the error bound and decisions were judged against: "float64" or this
    max_err_fp64: float | None = None  # max |artefact - eager float64|
    mean_err_fp64: float | None = None
    noise_floor: float | None = None  # max |eager fp32 - eager float64|: this model's arithmetic noise here
    label: str = ""  # where the input came from, when a report mixes kinds ("seeded", "images")
    probe: str = ""  # which point of the envelope this input checks ("largest", "largest batch", ...)
    # batch > 1: the artefact's output for the batch against its output for each image alone
    alone: dict | None = None
    failures: list[str] = field(default_factory=list)
    # each check this input was put to (CHECKS) -> passed; the failed ones' messages are
    # ``failures``, in the same order (JUnit reports one test case per check)
    checks: dict[str, bool] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failures

    def check(self, name: str, failure: str = "") -> None:
        """Record that the check ``name`` ran, and its failure message if it failed."""
        self.checks[name] = not failure
        if failure:
            self.failures.append(failure)

    def failed_checks(self) -> dict[str, str]:
        """check -> its failure message, for the checks that failed (a record made before checks
        were kept: every message under "parity")."""
        failed = [name for name, ok in self.checks.items() if not ok]
        if len(failed) != len(self.failures):
            return {"parity": "; ".join(self.failures)} if self.failures else {}
        return dict(zip(failed, self.failures))

    @property
    def judged_err(self) -> float:
        return self.max_err_fp64 if self.max_err_fp64 is not None else self.max_abs_err

    @property
    def floor_ratio(self) -> float | None:
        """Error against float64 in units of the noise floor."""
        if self.max_err_fp64 is None or not self.noise_floor:
            return None
        return self.max_err_fp64 / self.noise_floor


@dataclass
class ParityReport:
    runner: str
    tolerance: str
    cases: list[CaseResult]
    error: str | None = None  # the runtime failed before any comparison could be made
    limits: dict | None = None  # the gate's tolerances (Tolerance.to_dict), recorded with the verdict

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.cases) and all(case.passed for case in self.cases)

    def __bool__(self) -> bool:
        return self.passed

    def failures(self) -> list[str]:
        found = [f"{tuple(c.shape)}{f' ({c.probe})' if c.probe else ''}: {msg}" for c in self.cases for msg in c.failures]
        return ([self.error] if self.error else []) + found

    def to_dict(self) -> dict:
        cases = [asdict(c) | {"passed": c.passed} for c in self.cases]
        return {"passed": self.passed, "runner": self.runner, "tolerance": self.tolerance, "limits": self.limits,
                "error": self.error, "cases": cases}  # fmt: skip


def compare(out: torch.Tensor, ref: torch.Tensor, tol: Tolerance, *, exact: torch.Tensor | None = None,
            threshold: float = 0.0) -> CaseResult:  # fmt: skip
    """Statistics of ``out`` against the eager fp32 ``ref`` and, when given, the eager float64
    ``exact`` (all (N, C, H, W) logits), judged by ``tol``.

    With ``exact``: the error bound is ``tol.rtol`` x max|ref - exact| (the noise floor) +
    ``tol.rel_atol`` x max(1, max|exact|), applied to max|out - exact|, and decisions are
    compared with exact's. Without it (callers that have no model to run in float64), ``ref``
    is taken as exact and the bound is FALLBACK_REL_ATOL x max(1, max|ref|). ``threshold``: where
    a one-class output turns into class 1 (models.mask_threshold of the model's config)."""
    case = CaseResult(shape=list(ref.shape))
    if out.shape != ref.shape:
        case.check(OUTPUT, f"output shape {tuple(out.shape)} differs from eager {tuple(ref.shape)}")
        return case
    out, ref = out.detach().float().cpu(), ref.detach().float().cpu()
    if not torch.isfinite(out).all():
        case.check(OUTPUT, "output has NaN or Inf values")
        return case
    case.check(OUTPUT)
    err = (out - ref).abs()
    case.max_abs_err, case.mean_abs_err = err.max().item(), err.mean().item()
    if exact is None:
        target, floor = ref, None
        case.max_abs_ref = ref.abs().max().item()
        allowed = FALLBACK_REL_ATOL * max(1.0, case.max_abs_ref) if tol.bounds_error else None
        tie_bound = allowed
    else:
        target = exact.detach().double().cpu()
        err64 = (out.double() - target).abs()
        case.reference = "float64"
        case.max_err_fp64, case.mean_err_fp64 = err64.max().item(), err64.mean().item()
        floor = case.noise_floor = (ref.double() - target).abs().max().item()
        case.max_abs_ref = target.abs().max().item()
        scale = max(1.0, case.max_abs_ref)
        allowed = tol.allowed(floor, scale) if tol.bounds_error else None
        # Reduced precision has no error bound; a tie is still what a correct FP32 artefact may flip.
        tie_bound = allowed if allowed is not None else FP32.allowed(floor, scale)
    case.atol = allowed
    out_mask, ref_mask = logits_to_mask(out, threshold), logits_to_mask(target, threshold)
    differ, ties = class_changes(out_mask, ref_mask, target, threshold, tie_bound)
    case.differing_pixels, case.tie_pixels = int(differ.sum()), int(ties.sum())
    out_mask = torch.where(ties, ref_mask, out_mask)
    case.argmax_disagreement = (case.differing_pixels - case.tie_pixels) / out_mask.numel()
    case.dice_vs_eager = dice_score(out_mask, ref_mask, n_classes=ref.shape[1])
    _judge(case, tol, floor)
    return case


def class_changes(out_mask: torch.Tensor, target_mask: torch.Tensor, target: torch.Tensor, threshold: float,
                  tie_bound: float | None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(pixels whose class differs from ``target``'s decision ``target_mask``, the ones among them
    that are ties), as boolean masks: what the gate counts, and what the HTML report draws over
    the image.

    A pixel whose exact logits are within 2 x ``tie_bound`` (the allowed error) of a tie may flip
    under any error the tolerance allows; it says nothing about the artefact, so it is counted
    apart and held against neither the class-change count nor Dice."""
    differ = out_mask != target_mask
    if tie_bound is None:
        return differ, torch.zeros_like(differ)
    return differ, differ & (decision_margin(target, threshold) <= 2 * tie_bound)


def _judge(case: CaseResult, tol: Tolerance, floor: float | None) -> None:
    if case.atol is not None:
        case.check(ERROR, _error_failure(case, tol, floor) if case.judged_err > case.atol else "")
    if not case.argmax_disagreement > tol.max_disagreement:
        case.check(CLASS_CHANGE)
    else:
        changed = (f"{case.argmax_disagreement:.4%} of pixels change class, ties excluded (allowed "
                   f"{tol.max_disagreement:.4%})")  # fmt: skip
        if case.atol is not None:
            # Outside the ties a class change takes an error beyond the bound, so the error check
            # failed too and its option clears both; a gate with an error bound (FP32) takes no
            # --max-class-change (tolerance_for ignores it, the commands refuse it).
            case.check(CLASS_CHANGE, f"{changed}: each is an error beyond the bound, cleared by the error check's option")
        else:
            needed = loosest(case.argmax_disagreement, lambda v: case.argmax_disagreement <= v)
            case.check(CLASS_CHANGE, f"{changed}: would pass with --max-class-change {needed:g}")
    if tol.min_dice is None:
        return
    if not case.dice_vs_eager < tol.min_dice:  # a NaN Dice (no pixels compared) is no failure, as before
        case.check(DICE)
    else:
        needed = loosest(case.dice_vs_eager, lambda v: case.dice_vs_eager >= v, up=False, digits=4)
        case.check(DICE, f"Dice vs eager {case.dice_vs_eager:.5f} < {tol.min_dice:g}: would pass with --min-dice {needed:g}")


def _error_failure(case: CaseResult, tol: Tolerance, floor: float | None) -> str:
    err, scale = case.judged_err, max(1.0, case.max_abs_ref)
    if floor is None:
        needed = loosest(err / scale, lambda v: err <= v * scale)
        return (f"max abs error {err:.3g} > {case.atol:.3g} against eager fp32 (no float64 reference): "
                f"would pass with a bound of {needed:g} x max(1, max |logit|)")  # fmt: skip
    rtol, atol = tol.rtol or 0.0, tol.rel_atol or 0.0
    how = [f"--atol {loosest((err - rtol * floor) / scale, lambda v: err <= rtol * floor + v * scale):g}"]
    if floor > 0:  # a larger multiple of a zero floor cannot help
        how.insert(0, f"--rtol {loosest((err - atol * scale) / floor, lambda v: err <= v * floor + atol * scale):g}")
    ratio = f" ({err / floor:.3g} x)" if floor > 0 else ""
    return (f"max error vs float64 {err:.3g}{ratio} > {case.atol:.3g} = {rtol:g} x noise floor {floor:.3g} + "
            f"{atol:g} x {scale:.3g}: would pass with {' or '.join(how)}")  # fmt: skip


def loosest(needed: float, passes: Callable[[float], bool], *, up: bool = True, digits: int = 2) -> float:
    """``needed`` rounded away from the failing side at ``digits`` significant digits (up for a
    bound, down for a minimum), checked to pass: never the value that was in force when it failed."""
    if needed <= 0 or not math.isfinite(needed):
        return max(needed, 0.0)
    value = Decimal(repr(needed))
    quantum = Decimal(1).scaleb(value.adjusted() - digits + 1)
    rounded = value.quantize(quantum, rounding=ROUND_CEILING if up else ROUND_FLOOR)
    while not passes(float(rounded)):  # binary floating point may land a hair on the wrong side
        rounded += quantum if up else -quantum
    # Rounding up next to the largest float overflows: the exact need is then the loosest value.
    return float(rounded) if math.isfinite(float(rounded)) else needed


def seeded_inputs(shapes: list[tuple[int, ...]], seed: int = 0) -> list[torch.Tensor]:
    """Reproducible images in [0, 1] (milesial's preprocessing divides by 255, no mean/std)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(*shape, generator=gen) for shape in shapes]


def exact_runner(reference: Runner) -> Runner | None:
    """The float64 twin of an eager fp32 reference (on the CPU), or None for any other runner."""
    if isinstance(reference, EagerRunner) and reference.precision == "fp32" and not reference.channels_last:
        return EagerRunner(reference.model, "cpu", "fp64")
    return None


def probe_tolerance(tol: Tolerance) -> Tolerance:
    """The gate at an envelope probe that is not a whole image (a crop, a mirrored canvas): for
    reduced precision the share of pixels that change class, without Dice, which on a 16-pixel
    strip or a crop holding a few pixels of a class swings with one pixel; Dice is judged on the
    whole real images at their own size. An error-bounded gate (FP32) is the same everywhere."""
    return tol if tol.bounds_error else replace(tol, min_dice=None)


def check_parity(runner: Runner, reference: Runner, inputs: list[torch.Tensor], tol: Tolerance = FP32, *,
                 exact: Runner | None = None, threshold: float = 0.0, capture: list | None = None,
                 probes: list[str] | None = None) -> ParityReport:  # fmt: skip
    """Run the runners on every input and compare; ``runner`` and ``reference`` must already be
    active. ``exact`` (float64) defaults to the eager reference's model run in float64;
    ``threshold``: the model's one-class decision (see compare). ``capture``: a list that gets
    (input, reference output, float64 output) per input, to be recorded as references.
    ``probes``: the envelope point each input checks (parity.envelope), kept with its case; real
    images at a probe other than the gate's own ("gate images") are judged by probe_tolerance.
    Every batch of more than one image is also run image by image (batch invariance)."""
    exact = exact or exact_runner(reference)
    cases = []
    # A float64 runner made here, or handed over inactive, lives for this check only.
    with exact if exact is not None and not exact.is_active else nullcontext():
        for i, x in enumerate(inputs):
            ref = reference.infer(x)
            ref64 = _exact_logits(exact, x) if exact is not None else None
            if capture is not None:
                capture.append((x, ref, ref64))
            case, _ = judge_input(runner, x, ref, ref64, tol, threshold, probes[i] if probes else "")
            cases.append(case)
    return ParityReport(runner=f"{runner.name} ({runner.describe()})", tolerance=tol.name, cases=cases,
                        limits=tol.to_dict())  # fmt: skip


GATE_IMAGES = "gate images"  # the probe label of the real images a reduced-precision gate runs whole


def judge_input(runner: Runner, x: torch.Tensor, ref: torch.Tensor, ref64: torch.Tensor | None, tol: Tolerance,
                threshold: float, probe: str = "") -> tuple[CaseResult, torch.Tensor]:  # fmt: skip
    """One input of a gate (check_parity, the INT8 judge): (its case, the runner's output). The
    output is judged against the reference by ``tol`` or, at an envelope probe other than whole
    images, by probe_tolerance; the case keeps the input's shape and ``probe``; a batch of more
    than one image is also run image by image (judge_alone)."""
    out = runner.infer(x)
    case_tol = tol if probe in ("", GATE_IMAGES) else probe_tolerance(tol)
    case = compare(out, ref, case_tol, exact=ref64, threshold=threshold)
    case.shape, case.probe = list(x.shape), probe  # the input shape, which is what a user chose
    if x.shape[0] > 1 and case.max_abs_err == case.max_abs_err:  # compared (not NaN): outputs line up
        judge_alone(case, out, [runner.infer(x[j : j + 1]) for j in range(x.shape[0])], case_tol, ref64, threshold)
    return case, out


def judge_alone(case: CaseResult, batch: torch.Tensor, alone: list[torch.Tensor], tol: Tolerance,
                exact: torch.Tensor | None, threshold: float) -> None:  # fmt: skip
    """Batch invariance: image i of the batch's output against image i run alone, by the case's
    own rule. An error bound (FP32): their difference within the bound the case was judged by,
    which each of two correct outputs keeps to the float64 answer. Reduced precision: the share of
    pixels whose class differs (float64 ties excluded, as the gate counts them) within the gate's."""
    batch = batch.detach().float().cpu()
    single = torch.cat([a.detach().float().cpu() for a in alone])
    if single.shape != batch.shape or not torch.isfinite(single).all():
        case.alone = {"passed": False}
        case.check(ALONE, f"run image by image the output is {tuple(single.shape)} or not finite, "
                          f"where the batch gave {tuple(batch.shape)}")  # fmt: skip
        return
    diff = (batch - single).abs().max().item()
    differ = logits_to_mask(batch, threshold) != logits_to_mask(single, threshold)
    if exact is not None:
        target = exact.detach().double().cpu()
        scale = max(1.0, target.abs().max().item())
        tie_bound = case.atol if case.atol is not None else FP32.allowed(case.noise_floor or 0.0, scale)
        differ &= decision_margin(target, threshold) > 2 * tie_bound
    share = differ.sum().item() / differ.numel()
    failure = ""
    if case.atol is not None and diff > case.atol:
        failure = f"max |diff| {diff:.3g} > {case.atol:.3g}, the bound this input is judged by"
    elif case.atol is None and share > tol.max_disagreement:
        failure = f"{share:.4%} of pixels change class (allowed {tol.max_disagreement:.4%})"
    case.alone = {"max_abs_diff": diff, "allowed": case.atol, "class_change": share, "passed": not failure}
    case.check(ALONE, f"batch {batch.shape[0]} differs from each image run alone: {failure}" if failure else "")


def _exact_logits(exact: Runner, x: torch.Tensor) -> torch.Tensor:
    """The float64 reference's logits; a model that cannot run in float64 cannot be judged, which
    is not the artefact's failure (exit 2, nothing recorded), so it is never reported as one."""
    try:
        return exact.infer(x)
    except Exception as exc:
        message = " ".join(str(exc).split())[:200]
        raise UserError(f"the eager model does not run in float64 ({type(exc).__name__}: {message}), so no "
                        "artefact of it can be judged against the exact answer") from exc  # fmt: skip
