"""Model loading, per-architecture surgery, layer capture and checkpoint fingerprints."""

from .capture import capture_layers
from .fingerprint import fingerprint_checkpoint
from .loading import ModelLoadError, PickleWeightsError, load_causal_lm
from .surgery import (
    MissingFinalNormError,
    ModelParts,
    SurgeryError,
    UnsupportedArchitectureError,
    model_parts,
)

__all__ = [
    "MissingFinalNormError",
    "ModelLoadError",
    "ModelParts",
    "PickleWeightsError",
    "SurgeryError",
    "UnsupportedArchitectureError",
    "capture_layers",
    "fingerprint_checkpoint",
    "load_causal_lm",
    "model_parts",
]
