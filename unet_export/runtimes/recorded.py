"""Recorded references: the eager model's fp32 and float64 outputs, stored when an artefact was
published, for a model whose eager form may not be rebuildable where its artefacts are verified
(an smp model on a host without smp, a factory that is not importable there). RecordedRunner
stands in for the eager model on exactly the inputs that were recorded, found by the sha256 of
each sample's bytes, and refuses any other input: it never guesses an answer.

The file is a compressed .npz (no pickles: read with ``allow_pickle=False``): ``fp32_<sha256>``
and ``fp64_<sha256>`` per sample (C, H, W), and ``checkpoint``, the sha256 of the checkpoint the
outputs came from."""

import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np
import torch

from unet_export.errors import IntegrityError, UserError
from unet_export.runtimes.base import Runner

PRECISIONS = {"fp32": torch.float32, "fp64": torch.float64}


def sample_key(sample: torch.Tensor) -> str:
    """sha256 of one input sample (C, H, W): its shape and float32 bytes."""
    sample = sample.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(repr(tuple(sample.shape)).encode())
    digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


class References:
    """A references file's outputs, by precision and sample key."""

    def __init__(self, arrays: dict[str, np.ndarray], where: str = "references"):
        self.where = where
        self.outputs = {p: {} for p in PRECISIONS}
        self.checkpoint = str(arrays["checkpoint"]) if "checkpoint" in arrays else None
        for name, array in arrays.items():
            precision, _, key = name.partition("_")
            if precision in PRECISIONS and key:
                self.outputs[precision][key] = array

    @classmethod
    def load(cls, path: str | Path, sha256: str | None = None) -> "References":
        """Read ``path`` once (its bytes hashed and parsed from the same read); a file whose sha256
        is not ``sha256`` is not the one recorded, and a damaged one is refused."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise IntegrityError(f"cannot read the recorded references {path}: {exc.strerror or exc}") from None
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise IntegrityError(f"{path} changed since it was recorded (its sha256 is not the one in manifest.json): "
                                 "its references cannot judge anything; export again")  # fmt: skip
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
            raise UserError(f"{path} is not a readable references file ({exc}); export again") from None
        return cls(arrays, path.name)

    def knows(self, x: torch.Tensor) -> bool:
        """Whether every sample of the batch ``x`` has both recorded outputs."""
        keys = [sample_key(sample) for sample in x]
        return all(key in self.outputs[p] for key in keys for p in PRECISIONS)

    def output(self, x: torch.Tensor, precision: str) -> torch.Tensor:
        keys = [sample_key(sample) for sample in x]
        missing = [key for key in keys if key not in self.outputs[precision]]
        if missing:
            raise UserError(f"{self.where} has no recorded eager {precision} output for this input "
                            f"({tuple(x.shape)}, sample sha256 {missing[0][:16]}...): recorded references answer "
                            "only the inputs the export gate ran on")  # fmt: skip
        return torch.from_numpy(np.stack([self.outputs[precision][key] for key in keys])).to(PRECISIONS[precision])


class RecordedRunner(Runner):
    """The eager model's recorded output (``precision`` fp32, or fp64: float64 logits, the exact
    answer) for a recorded input; any other input is a UserError. ``source``: a references file
    (read on activate, checked against ``sha256`` when given) or References already read."""

    name = "recorded"

    def __init__(self, source: "str | Path | References", precision: str = "fp32", sha256: str | None = None,
                 device="cpu"):  # fmt: skip
        if precision not in PRECISIONS:
            raise UserError(f"recorded references hold fp32 and fp64 outputs, not {precision}")
        super().__init__(device, precision)
        self.source, self.sha256 = source, sha256
        self.references: References | None = None

    def _activate_impl(self) -> None:
        source = self.source
        self.references = source if isinstance(source, References) else References.load(source, self.sha256)

    def _infer_impl(self, x: torch.Tensor) -> torch.Tensor:
        return self.references.output(x, self.precision).to(self.device)

    def _deactivate_impl(self) -> None:
        self.references = None

    def describe(self) -> str:
        where = self.source.where if isinstance(self.source, References) else Path(self.source).name
        return f"eager {self.precision} recorded in {where}"
