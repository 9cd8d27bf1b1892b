"""Masks for images from a checkpoint or any artefact: ``predict`` runs the batch pipeline
(unet_export.predict.batch) and returns the masks it wrote; one image through a predictor, tiling and
mask helpers live in unet_export.inference.predictor and stay importable from here.

    from unet_export.predict import predict
    masks = predict("exports/model.onnx", [Path("images/")], Path("masks"))
"""

from pathlib import Path

from unet_export.errors import UserError
from unet_export.inference.predictor import (  # noqa: F401  the names predict.py has always offered
    ARTEFACT_READERS,
    OVERLAY_COLOURS,
    RUNTIME_OF,
    TILE,
    TILE_HALO,
    Predictor,
    entry_predictor,
    fit_and_run,
    load_predictor,
    make_predictor,
    mask_to_image_array,
    overlay,
    predict_classes,
    run_tiled,
    runtime_label,
    to_classes,
)
from unet_export.predict.batch import PredictOptions, run_predict


def predict(model_path, images: list[Path], out_dir: Path, overlay_images: bool = False, device="cpu",
            model: str | None = None, max_pixels: int | None = None, **options) -> list[Path]:  # fmt: skip
    """The masks written for ``images`` (files or folders, see unet_export.predict.batch), in input
    order; an image that could not be read raises after every other mask is written."""
    report = run_predict(model_path, images, out_dir, PredictOptions(overlay=overlay_images, max_pixels=max_pixels, **options),
                         device=device, architecture=model)  # fmt: skip
    if report.failed:
        raise UserError("; ".join(o.reason for o in report.failed))
    return [o.mask for o in sorted(report.written, key=report.order)]
