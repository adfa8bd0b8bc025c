"""PyTorch references and their towers."""

from clipexport.models.architecture import Families, families_of
from clipexport.models.open_clip_source import ReferenceModel, canonical_name, load_reference, model_config
from clipexport.models.weights import WeightsSpec

__all__ = [
    "Families",
    "ReferenceModel",
    "WeightsSpec",
    "canonical_name",
    "families_of",
    "load_reference",
    "model_config",
]
