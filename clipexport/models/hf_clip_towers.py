"""The towers of a transformers CLIPModel: its own get_image_features / get_text_features."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class HFImageTower(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.eval().requires_grad_(False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=pixel_values))


class HFTextTower(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.eval().requires_grad_(False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_text_features(input_ids=input_ids))


def _features(out: Any) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding; 4.x a tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output
