"""Tiny twins: one small open_clip config per recipe, same architecture family, seconds to export.

Every recipe must have a twin here (test_every_recipe_has_a_twin fails otherwise).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The text towers keep the real vocabulary and context length so the real CLIP tokenizer applies.
_TINY_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}

TWINS: dict[str, dict[str, Any]] = {
    "vit": {
        "embed_dim": 24,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "head_width": 24, "patch_size": 8},
        "text_cfg": _TINY_TEXT,
    },
    "timm": {
        "embed_dim": 24,
        # timm's smallest ViT (5.7 M parameters, 12 blocks of width 192); timm builds it for 224x224
        "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False,
                       "timm_pool": "token", "timm_proj": "linear", "image_size": 224},
        "text_cfg": _TINY_TEXT,
    },
    "modified_resnet": {
        "embed_dim": 24,
        # width 8 -> stage widths 8..256, attention pool over a 2x2 grid with 4 heads
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
        "text_cfg": _TINY_TEXT,
    },
}


def write_twin(recipe: str, directory: Path) -> str:
    """Write an open_clip `local-dir:` model directory for a recipe's twin; return the model name."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": TWINS[recipe]}))
    return f"local-dir:{directory}"
