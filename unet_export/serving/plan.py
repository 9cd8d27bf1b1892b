"""What a Triton repository is made of, before anything is written: one ModelPlan per model, the
file that records where every file came from (RECORD_NAME) and the Python backend's source.
repository.py writes plans, pipeline.py adds the ensemble's, validate.py reads the record back."""

from dataclasses import dataclass, field
from pathlib import Path

RECORD_NAME = "unet_export.json"
MODEL_SOURCE = Path(__file__).with_name("triton_model.py")


@dataclass
class ModelPlan:
    name: str
    kind: str  # a NATIVE format, python, preprocess, postprocess or ensemble
    config: object  # model_config_pb2.ModelConfig
    files: dict[str, Path | str]  # path in the model folder -> artefact to copy, or text to write
    record: dict  # what validate checks the written model against
    notes: list[str] = field(default_factory=list)
