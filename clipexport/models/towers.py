"""Split an open_clip model into its two towers, each an `nn.Module` of one tensor.

ImageTower: pixels float32 [B, 3, H, W] -> embeddings float32 [B, D]  (== encode_image)
TextTower:  token ids int64 [B, L]      -> embeddings float32 [B, D]  (== encode_text)
Both are unnormalized, exactly as open_clip returns them with normalize=False.

TrimmableTextTower takes ids of any length 2 <= L <= context_length: it slices the
positional embedding and the causal mask to L. With causal attention and argmax (EOT)
pooling, feeding only the first `max EOT position + 1` columns gives the same embedding
as the full context (every column after a row's EOT is invisible to that row's EOT).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from open_clip.model import CLIP
from open_clip.transformer import text_global_pool
from torch import nn

from clipexport.errors import UnsupportedModelError


class ImageTower(nn.Module):
    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.visual = clip.visual
        self.eval().requires_grad_(False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _pooled(self.visual(pixel_values))


def _pooled(output: Any) -> torch.Tensor:
    """The embedding of a tower's output: CoCa's towers (output_tokens) also return their token
    embeddings, for the caption decoder, which CoCa.encode_image/encode_text drop as well."""
    return output[0] if isinstance(output, tuple) else output


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
        return CLIP.encode_text(self, input_ids)


class TrimmableTextTower(BuiltinTextTower):
    """BuiltinTextTower that accepts a shorter sequence: ids int64 [B, L], 2 <= L <= context_length.

    Same weights and the same operations as open_clip's encode_text; only the positional
    embedding and the causal mask are sliced to the input length L.
    """

    def __init__(self, clip: CLIP) -> None:
        super().__init__(clip)
        reason = untrimmable_reason(clip)
        if reason:
            raise UnsupportedModelError(f"the text tower cannot be trimmed: {reason}")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        cast_dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(input_ids).to(cast_dtype)
        x = x + self.positional_embedding[:length].to(cast_dtype)
        x = self.transformer(x, attn_mask=self.attn_mask[:length, :length])
        x = self.ln_final(x)
        x = text_global_pool(x, input_ids, self.text_pool_type)
        if self.text_projection is not None:
            if isinstance(self.text_projection, nn.Linear):
                x = self.text_projection(x)
            else:
                x = x @ self.text_projection
        return x


def untrimmable_reason(clip: nn.Module) -> str:
    """Why exact EOT trimming would change this model's text embeddings; "" when it would not."""
    if not isinstance(clip, CLIP):
        return f"{type(clip).__name__} has no built-in causal text tower"
    if getattr(clip, "text_pool_type", None) != "argmax":
        # 'last' reads the final column, 'eos' a tokenizer-specific id: both depend on more than argmax.
        return f"text pooling is {getattr(clip, 'text_pool_type', None)!r}, not 'argmax' (EOT)"
    mask = getattr(clip, "attn_mask", None)
    if mask is None:
        return "the text transformer has no causal mask, so every token sees the tokens after EOT"
    n = mask.shape[-1]
    causal = torch.full((n, n), float("-inf")).triu_(1)
    if mask.shape != (n, n) or not torch.equal(mask.float(), causal):
        return "the text attention mask is not the plain causal mask"
    return ""


def attention_blocks(tower: nn.Module) -> int:
    """How many attention blocks a tower has: each must become one fused attention node.

    nn.MultiheadAttention covers ViT and text blocks; AttentionPool2d is ModifiedResNet's
    attention pooling, which calls F.multi_head_attention_forward directly; Hugging Face
    text towers (XLM-R, RoBERTa, T5, M2M100) and timm towers count their attention modules
    that dispatch to scaled_dot_product_attention (the exporter lowers each such call to one
    Attention node).
    """
    from open_clip.modified_resnet import AttentionPool2d

    return sum(isinstance(m, (nn.MultiheadAttention, AttentionPool2d)) or _hf_sdpa_attention(m)
               or _timm_sdpa_attention(m) for m in tower.modules())


def _hf_sdpa_attention(module: nn.Module) -> bool:
    """A transformers attention module whose forward goes through the attention interface
    (ALL_ATTENTION_FUNCTIONS) with the SDPA implementation selected."""
    cls: Any = type(module)
    if not cls.__module__.startswith("transformers.models."):
        return False
    config = getattr(module, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    return _forward_mentions(cls, "ALL_ATTENTION_FUNCTIONS")


def _timm_sdpa_attention(module: nn.Module) -> bool:
    """A timm attention module (ViT blocks, attention-pool heads) on its fused SDPA path."""
    cls: Any = type(module)
    return (cls.__module__.startswith("timm.") and bool(getattr(module, "fused_attn", False))
            and _forward_mentions(cls, "scaled_dot_product_attention"))


@functools.lru_cache(maxsize=None)
def _forward_mentions(cls: Any, name: str) -> bool:
    import inspect

    try:
        return name in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


class CustomTextTower(nn.Module):
    """A text tower that is already one submodule (`CustomTextCLIP.text`)."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.text = clip.text
        self.eval().requires_grad_(False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return _pooled(self.text(input_ids))


def image_tower(clip: nn.Module) -> nn.Module:
    return ImageTower(clip)


def text_tower(clip: nn.Module, trimmable: bool = False) -> nn.Module:
    """The text tower; `trimmable` asks for the variant with a dynamic sequence length.

    A Hugging Face text tower (CustomTextCLIP.text) already takes any length: it derives its
    padding mask and position ids from the ids, so the plain tower serves both."""
    if trimmable and isinstance(clip, CLIP):
        return TrimmableTextTower(clip)
    if isinstance(clip, CLIP):
        return BuiltinTextTower(clip)
    if hasattr(clip, "text"):
        return CustomTextTower(clip)
    raise TypeError(f"cannot find the text tower of {type(clip).__name__}")
