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
# The built-in text transformer fed by a Hugging Face tokenizer (CLIPA, worldwide, SigLIP):
# the tokenizer's files come from the hub, and pooling is not always argmax-on-EOT.
TEXT_TRANSFORMER_HF_TOKENIZER = "text-transformer-hf-tokenizer"
HF_TEXT = "hf-text"
# transformers' CLIPModel (vision_model + visual_projection, text_model + text_projection)
HF_CLIP_VISION = "hf-clip-vision"
HF_CLIP_TEXT = "hf-clip-text"


@dataclass(frozen=True)
class Families:
    """The image and text tower families of one model config."""

    image: str
    text: str
    multimodal: bool  # CoCa: a text decoder on top of both towers
    hf_tokenizer: str | None = None  # the Hugging Face tokenizer the text tower needs, if any

    def describe(self) -> str:
        base = f"image={self.image}, text={self.text}"
        return base + (", multimodal decoder (CoCa)" if self.multimodal else "")


def families_of(model_cfg: Mapping[str, Any]) -> Families:
    """Classify an open_clip model config dict (or the summary models/hf_clip.py makes of a CLIPConfig)."""
    if model_cfg.get("source") == "transformers":
        return Families(image=HF_CLIP_VISION, text=HF_CLIP_TEXT, multimodal=False)
    vision = model_cfg.get("vision_cfg", {})
    text = model_cfg.get("text_cfg", {})
    if "timm_model_name" in vision and vision.get("timm_model_name"):
        image = TIMM_IMAGE
    elif isinstance(vision.get("layers"), (list, tuple)):
        # ModifiedResNet configs give one layer count per stage: [3, 4, 6, 3] for RN50.
        image = MODIFIED_RESNET
    else:
        image = VISION_TRANSFORMER
    if text.get("hf_model_name"):
        text_family = HF_TEXT
    elif text.get("hf_tokenizer_name"):
        text_family = TEXT_TRANSFORMER_HF_TOKENIZER
    else:
        text_family = TEXT_TRANSFORMER
    return Families(
        image=image,
        text=text_family,
        multimodal="multimodal_cfg" in model_cfg,
        hf_tokenizer=text.get("hf_tokenizer_name") or None,
    )
