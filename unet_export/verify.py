"""Parity and Dice of a runner against the eager reference: data in, results out.

Comparisons are data (after Polygraphy's comparator): every statistic is kept, every failing
check is collected, and a failure says the tolerance that would have passed.
"""

from dataclasses import asdict, dataclass, field

import torch

from unet_export.metrics import decision_margin, dice_score, logits_to_mask
from unet_export.runners.base import Runner


@dataclass(frozen=True)
class Tolerance:
    name: str
    rel_atol: float | None  # max abs error <= rel_atol * max(1, max |eager logit|)
    max_disagreement: float  # largest allowed fraction of pixels whose class differs
    min_dice: float | None  # smallest allowed Dice(artefact mask, eager mask)


FP32 = Tolerance("fp32", rel_atol=1e-4, max_disagreement=0.0, min_dice=None)
FP16 = Tolerance("fp16", rel_atol=None, max_disagreement=1e-3, min_dice=0.999)
TOLERANCES = {"fp32": FP32, "fp16": FP16, "bf16": FP16, "int8": FP16}


@dataclass
class CaseResult:
    """One input batch: the statistics, and the checks that failed (empty when it passed)."""

    shape: list[int]  # the output's shape from compare(); check_parity sets the input's
    max_abs_err: float = float("nan")
    mean_abs_err: float = float("nan")
    max_abs_ref: float = float("nan")
    atol: float | None = None
    differing_pixels: int = 0
    tie_pixels: int = 0  # differing pixels where eager's own margin is within 2*atol: undecidable
    argmax_disagreement: float = 0.0  # fraction of pixels that differ, ties excluded
    dice_vs_eager: float = float("nan")
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class ParityReport:
    runner: str
    tolerance: str
    cases: list[CaseResult]
    error: str | None = None  # the runtime failed before any comparison could be made

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.cases) and all(case.passed for case in self.cases)

    def __bool__(self) -> bool:
        return self.passed

    def failures(self) -> list[str]:
        found = [f"{tuple(c.shape)}: {msg}" for c in self.cases for msg in c.failures]
        return ([self.error] if self.error else []) + found

    def to_dict(self) -> dict:
        cases = [asdict(c) | {"passed": c.passed} for c in self.cases]
        return {"passed": self.passed, "runner": self.runner, "tolerance": self.tolerance,
                "error": self.error, "cases": cases}  # fmt: skip


def compare(out: torch.Tensor, ref: torch.Tensor, tol: Tolerance) -> CaseResult:
    """Statistics of ``out`` against the eager ``ref`` (both (N, C, H, W) logits)."""
    case = CaseResult(shape=list(ref.shape))
    if out.shape != ref.shape:
        case.failures.append(f"output shape {tuple(out.shape)} differs from eager {tuple(ref.shape)}")
        return case
    out, ref = out.detach().float().cpu(), ref.detach().float().cpu()
    if not torch.isfinite(out).all():
        case.failures.append("output has NaN or Inf values")
        return case
    err = (out - ref).abs()
    case.max_abs_err, case.mean_abs_err = err.max().item(), err.mean().item()
    case.max_abs_ref = ref.abs().max().item()
    out_mask, ref_mask = logits_to_mask(out), logits_to_mask(ref)
    differ = out_mask != ref_mask
    case.differing_pixels = int(differ.sum())
    if tol.rel_atol is not None:
        case.atol = tol.rel_atol * max(1.0, case.max_abs_ref)
        # A pixel whose eager logits are within 2*atol of a tie may flip under any error the
        # tolerance allows; it says nothing about the artefact, so it is counted apart.
        case.tie_pixels = int((differ & (decision_margin(ref) <= 2 * case.atol)).sum())
    case.argmax_disagreement = (case.differing_pixels - case.tie_pixels) / out_mask.numel()
    case.dice_vs_eager = dice_score(out_mask, ref_mask, n_classes=ref.shape[1])
    _judge(case, tol)
    return case


def _judge(case: CaseResult, tol: Tolerance) -> None:
    if case.atol is not None and case.max_abs_err > case.atol:
        needed = case.max_abs_err / max(1.0, case.max_abs_ref)
        case.failures.append(
            f"max abs error {case.max_abs_err:.3g} > {case.atol:.3g} (would pass with rel_atol {needed:.2g})"
        )
    if case.argmax_disagreement > tol.max_disagreement:
        case.failures.append(
            f"{case.argmax_disagreement:.4%} of pixels change class (allowed {tol.max_disagreement:.2%})"
        )
    if tol.min_dice is not None and case.dice_vs_eager < tol.min_dice:
        case.failures.append(f"Dice vs eager {case.dice_vs_eager:.5f} < {tol.min_dice}")


def seeded_inputs(shapes: list[tuple[int, ...]], seed: int = 0) -> list[torch.Tensor]:
    """Reproducible images in [0, 1] (milesial's preprocessing divides by 255, no mean/std)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(*shape, generator=gen) for shape in shapes]


def check_parity(runner: Runner, reference: Runner, inputs: list[torch.Tensor], tol: Tolerance = FP32) -> ParityReport:
    """Run both runners on every input and compare; both must already be active."""
    cases = []
    for x in inputs:
        ref = reference.infer(x)
        case = compare(runner.infer(x), ref, tol)
        case.shape = list(x.shape)  # report the input shape, which is what a user chose
        cases.append(case)
    return ParityReport(runner=f"{runner.name} ({runner.describe()})", tolerance=tol.name, cases=cases)
