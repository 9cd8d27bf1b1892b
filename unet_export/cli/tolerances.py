"""The parity gate's options, shared by every command that verifies (one definition)."""

from pathlib import Path
from typing import Annotated

import typer

from unet_export.errors import UserError
from unet_export.parity.gate import FP16, FP32

Rtol = Annotated[float | None, typer.Option(
    "--rtol", help=f"FP32 gate: allowed error against the float64 model, as a multiple of eager fp32's own "
                   f"error against it (the noise floor); default {FP32.rtol:g}.")]  # fmt: skip
Atol = Annotated[float | None, typer.Option(
    "--atol", help=f"FP32 gate: plus this x max(1, max |float64 logit|); default {FP32.rel_atol:g}.")]
MaxClassChange = Annotated[float | None, typer.Option(
    "--max-class-change", help=f"FP16/BF16/INT8 gate: largest fraction of pixels whose class differs from the "
                               f"float64 model's, ties excluded; default {FP16.max_disagreement:g}.")]  # fmt: skip
MinDice = Annotated[float | None, typer.Option(
    "--min-dice", help=f"FP16/BF16/INT8 gate: smallest Dice(artefact mask, eager mask); default {FP16.min_dice:g}.")]
RealData = Annotated[Path | None, typer.Option(
    "--data", help="Real images (a folder, or a dataset with imgs/ or JPEGImages/): FP16/BF16/INT8 are judged on "
                   "real images only, FP32 on them and seeded inputs. Default: the held-out images the manifest "
                   "records (the training sidecar's validation set).")]  # fmt: skip


def one_gate(reduced: bool, *, rtol=None, atol=None, max_class_change=None, min_dice=None, to_fp32: str = "",
             to_reduced: str = "add --fp16") -> None:  # fmt: skip
    """An artefact is judged by one gate: FP32 by --rtol/--atol, reduced precision by
    --max-class-change/--min-dice. Options of the gate that will not run are refused, never ignored;
    ``to_fp32``/``to_reduced`` say which flag selects the other gate."""
    if reduced and (rtol is not None or atol is not None):
        raise UserError(f"--rtol and --atol set the FP32 gate: {to_fp32} "
                        "(the FP16 gate takes --max-class-change/--min-dice)")  # fmt: skip
    if not reduced and (max_class_change is not None or min_dice is not None):
        raise UserError(f"--max-class-change and --min-dice set the FP16 gate: {to_reduced} "
                        "(the FP32 gate takes --rtol/--atol)")  # fmt: skip
