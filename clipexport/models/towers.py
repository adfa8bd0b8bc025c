"""Split an open_clip model into its two towers, each an `nn.Module` of one tensor.

ImageTower: pixels float32 [B, 3, H, W] -> embeddings float32 [B, D]  (== encode_image)
TextTower:  token ids int64 [B, L]      -> embeddings float32 [B, D]  (== encode_text)
Both are unnormalized, exactly as open_clip returns them with normalize=False.
"""

from __future__ import annotations

import torch
from open_clip.model import CLIP
from torch import nn


class ImageTower(nn.Module):
    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.visual = clip.visual
        self.eval().requires_grad_(False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual(pixel_values)


# Attributes CLIP.encode_text reads. The built-in text tower is not one submodule: its
# parts sit on the CLIP object next to the image tower.
_TEXT_MODULES = ("transformer", "token_embedding", "ln_final")


class BuiltinTextTower(nn.Module):
    """The built-in causal text transformer, holding only the text weights.

    forward() runs open_clip's own CLIP.encode_text on this object, so the computation is
    open_clip's, not a copy of it.
    """

    def __init__(self, clip: CLIP) -> None:
        super().__init__()
        for name in _TEXT_MODULES:
            setattr(self, name, getattr(clip, name))
        self.positional_embedding = clip.positional_embedding
        self.text_projection = clip.text_projection  # a Parameter, an nn.Linear, or None
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)
        self.text_pool_type = clip.text_pool_type
        if hasattr(clip, "text_eos_id"):
            self.text_eos_id = clip.text_eos_id
        self.eval().requires_grad_(False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return CLIP.encode_text(self, input_ids)  # type: ignore[arg-type]


class CustomTextTower(nn.Module):
    """A text tower that is already one submodule (`CustomTextCLIP.text`)."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.text = clip.text
        self.eval().requires_grad_(False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text(input_ids)


def image_tower(clip: nn.Module) -> nn.Module:
    return ImageTower(clip)


def text_tower(clip: nn.Module) -> nn.Module:
    if isinstance(clip, CLIP):
        return BuiltinTextTower(clip)
    if hasattr(clip, "text"):
        return CustomTextTower(clip)
    raise TypeError(f"cannot find the text tower of {type(clip).__name__}")
