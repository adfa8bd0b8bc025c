"""The towers of a transformers CLIPModel: its own get_image_features / get_text_features.

Each tower registers only its own submodules (the vision or text model and its projection), so
its parameters, its attention blocks and its exported weights are that tower's alone; the
CLIPModel is kept unregistered, to call its own feature method.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class _HFTower(nn.Module):
    _PARTS: tuple[str, ...] = ()

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        for name in self._PARTS:
            setattr(self, name, getattr(model, name))
        object.__setattr__(self, "_clip", model)  # not a submodule: the other tower stays out
        self.eval().requires_grad_(False)


class HFImageTower(_HFTower):
    _PARTS = ("vision_model", "visual_projection")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _features(self._clip.get_image_features(pixel_values=pixel_values))


class HFTextTower(_HFTower):
    """ids int64 [B, L] with 2 <= L <= max_position_embeddings: the text model slices its position
    ids to L and builds its causal mask from the input's shape."""

    _PARTS = ("text_model", "text_projection")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return _features(self._clip.get_text_features(input_ids=input_ids))


def _features(out: Any) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding; 4.x a tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output
