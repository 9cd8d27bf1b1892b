"""One artefact's parity: its runner (from its manifest entry) against the eager model, judged by
the gate (verify.check_parity); a runtime that crashes is a failed check, not a crash."""

from pathlib import Path

from unet_export.errors import UnetExportError
from unet_export.parity.gate import ParityReport, Tolerance, check_parity
from unet_export.runtimes import EagerRunner
from unet_export.runtimes.recorded import RecordedRunner, References
from unet_export.workdir.runners import artifact_runner


def run_parity(entry: dict, workdir: Path, net, device, inputs, tol: Tolerance, path: Path | None = None, *,
               threshold: float = 0.0, capture: list | None = None,
               recorded: References | None = None, probes: list[str] | None = None) -> ParityReport:  # fmt: skip
    """Parity of one manifest entry (its file at ``path`` if given, e.g. before it is published)
    against the eager model, judged by the eager model in float64 (check_parity runs it on the
    CPU); a runtime crash is a failed check. ``threshold``: models.mask_threshold of the model's
    config, where its one-class output turns into class 1. ``capture``: see check_parity.
    ``recorded``: the eager model's recorded fp32 and float64 outputs stand in for ``net`` (which
    could not be rebuilt here); an input they do not hold is a UserError. ``probes``: the envelope
    point each input checks (check_parity)."""
    runner = artifact_runner(entry, workdir, device, path=path)
    if recorded is not None:
        reference, exact = RecordedRunner(recorded, "fp32"), RecordedRunner(recorded, "fp64")
    else:
        reference, exact = EagerRunner(net, device), None
    try:
        with reference, runner:
            return check_parity(runner, reference, inputs, tol, exact=exact, threshold=threshold, capture=capture,
                                probes=probes)  # fmt: skip
    except UnetExportError:
        raise
    except Exception as exc:  # the artefact itself would not run: that is a verification failure
        message = " ".join(str(exc).split())[:300]
        error = f"{type(exc).__name__}: {message}"
        return ParityReport(runner.name, tol.name, cases=[], error=error, limits=tol.to_dict())
