"""Name the architecture family of an open_clip model config (pure data, no torch).

open_clip describes a model as a dict: `vision_cfg` and `text_cfg` (and `multimodal_cfg`
for CoCa). The families below are what recipes match on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

VISION_TRANSFORMER = "vision-transformer"
MODIFIED_RESNET = "modified-resnet"
TIMM_IMAGE = "timm"
TEXT_TRANSFORMER = "text-transformer"
HF_TEXT = "hf-text"


@dataclass(frozen=True)
class Families:
    """The image and text tower families of one model config."""

    image: str
    text: str
    multimodal: bool  # CoCa: a text decoder on top of both towers

    def describe(self) -> str:
        base = f"image={self.image}, text={self.text}"
        return base + (", multimodal decoder (CoCa)" if self.multimodal else "")


def families_of(model_cfg: Mapping[str, Any]) -> Families:
    """Classify an open_clip model config dict."""
    vision = model_cfg.get("vision_cfg", {})
    text = model_cfg.get("text_cfg", {})
    if "timm_model_name" in vision and vision.get("timm_model_name"):
        image = TIMM_IMAGE
    elif isinstance(vision.get("layers"), (list, tuple)):
        # ModifiedResNet configs give one layer count per stage: [3, 4, 6, 3] for RN50.
        image = MODIFIED_RESNET
    else:
        image = VISION_TRANSFORMER
    text_family = HF_TEXT if text.get("hf_model_name") else TEXT_TRANSFORMER
    return Families(image=image, text=text_family, multimodal="multimodal_cfg" in model_cfg)
