"""Models too large to hold whole: the open_clip CLIP as a skeleton on the meta device, with
one tower made real at a time.

ViT-bigG-14 is 2.54 B parameters (10.2 GB in fp32): its image tower alone is 7.4 GB. A
build that keeps both towers in memory while it exports, runs ONNX Runtime and hashes
files would need several times that. Here the model exists first without storage (meta
tensors: shapes only, no memory), and `materialize(ref, tower)` builds one tower for real
with open_clip's own tower builder (`_build_vision_tower` / `_build_text_tower`, the code
CLIP.__init__ runs) under the build's seed, then copies a checkpoint's tensors into it one
by one. `release(ref, tower)` turns it back into meta tensors, which frees its memory.

Random weights: each tower is initialised by open_clip's builder under the seed, on its
own. That is deterministic (verify rebuilds the same tensors) but not the same values as
`open_clip.create_model(name, pretrained=None)` under that seed, which draws the text
weights after the image weights from one stream; with random weights only parity matters.

Only the built-in CLIP class (ViT or ModifiedResNet image tower, open_clip's own text
transformer, fed by its tokenizer or by a Hugging Face one) loads this way; other classes load whole.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from clipexport.errors import WeightsError
from clipexport.models.architecture import (
    MODIFIED_RESNET,
    TEXT_TRANSFORMER,
    TEXT_TRANSFORMER_HF_TOKENIZER,
    VISION_TRANSFORMER,
    families_of,
)
from clipexport.models.weights import checkpoint_read_error, is_pickled_objects_refusal

# Built-in CLIP's text tower: these attributes of the CLIP object (the `attn_mask` buffer is set apart).
TEXT_ATTRIBUTES = ("transformer", "token_embedding", "positional_embedding", "ln_final", "text_projection")
# Weights bigger than this (fp32 bytes, whole model) are loaded one tower at a time.
PER_TOWER_MODEL_BYTES = 6 * 2**30


def supports_per_tower(cfg: dict[str, Any]) -> bool:
    """Whether this open_clip config is the built-in CLIP class with towers we can build apart."""
    families = families_of(cfg)
    return (
        not cfg.get("custom_text", False)
        and not families.multimodal
        and families.image in (VISION_TRANSFORMER, MODIFIED_RESNET)
        # CLIPA and worldwide: the same text tower, fed by a Hugging Face tokenizer
        and families.text in (TEXT_TRANSFORMER, TEXT_TRANSFORMER_HF_TOKENIZER)
    )


@dataclass(frozen=True)
class TowerSource:
    """How to make a skeleton's towers real: the config they are built from, and the weights."""

    cfg: dict[str, Any]
    seed: int
    checkpoint: Path | None  # None: random weights under `seed`


def skeleton(name: str, quick_gelu: bool, **overrides: Any) -> Any:
    """open_clip's model for `name` on the meta device: every module, no tensor storage.

    create_model still runs (preprocessing config, QuickGELU choice); nothing is allocated.
    `overrides` go to create_model (e.g. an offline text_cfg).
    """
    import open_clip
    import torch

    from clipexport.models.open_clip_source import _quiet_open_clip

    with torch.device("meta"), _quiet_open_clip(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = open_clip.create_model(name, pretrained=None, load_weights=False, device="meta",
                                       force_quick_gelu=quick_gelu, **overrides)
    return model


def count_parameters(name: str, cfg: dict[str, Any]) -> dict[str, int]:
    """Parameters of any open_clip model's towers, counted on the meta device (nothing allocated):
    image = the visual module, text = the rest (the logit scale/bias scalars included)."""
    import shutil

    from clipexport.models.architecture import HF_TEXT
    from clipexport.models.hf_text import offline_text_cfg, scratch_dir

    quick_gelu = bool(cfg.get("quick_gelu", False))
    overrides: dict[str, Any] = {}
    scratch = scratch_dir()
    try:
        if families_of(cfg).text == HF_TEXT:  # open_clip would ask the hub for the text model's config
            overrides.update(text_cfg=offline_text_cfg(cfg["text_cfg"], scratch)[0], pretrained_text=False)
        model = skeleton(name, quick_gelu, **overrides)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    image = sum(p.numel() for p in model.visual.parameters())
    return {"image": image, "text": sum(p.numel() for p in model.parameters()) - image}


def tower_parameters(model: Any) -> dict[str, int]:
    """Parameter counts of a (skeleton) CLIP's towers; meta tensors count like real ones."""
    text = sum(_numel(getattr(model, a)) for a in TEXT_ATTRIBUTES)
    return {"image": sum(p.numel() for p in model.visual.parameters()), "text": text}


def materialize_scalars(model: Any, source: TowerSource) -> None:
    """logit_scale / logit_bias: real values from the checkpoint, or open_clip's initial ones."""
    import numpy as np
    import torch
    from torch import nn

    stored = _checkpoint_tensors(source.checkpoint, lambda k: k in ("logit_scale", "logit_bias")) \
        if source.checkpoint else {}
    for name, default in (("logit_scale", source.cfg.get("init_logit_scale", float(np.log(1 / 0.07)))),
                          ("logit_bias", source.cfg.get("init_logit_bias"))):
        current = getattr(model, name, None)
        if current is None:
            continue
        value = stored.get(name)
        tensor = value.float().reshape(current.shape) if value is not None else torch.full(
            tuple(current.shape), float(default if default is not None else 0.0))
        setattr(model, name, nn.Parameter(tensor, requires_grad=False))


def materialize(model: Any, tower: str, source: TowerSource) -> None:
    """Build `tower` of the skeleton for real (open_clip's builder under the seed), then copy the
    checkpoint's tensors of that tower in, one tensor at a time."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(source.seed)
        _install(model, tower, source.cfg)
    if source.checkpoint is not None:
        _copy_checkpoint(model, tower, source.checkpoint)
    for module in _tower_modules(model, tower):
        module.eval()
    for tensor in _all_tensors(model, tower):  # modules' tensors and the CLIP-level text parameters
        tensor.requires_grad_(False)


def release(model: Any, tower: str, cfg: dict[str, Any]) -> None:
    """Free `tower`'s memory: its modules go back to the meta device, and every tensor that
    other objects may still hold (wrappers such as ImageTower share the parameter objects)
    is emptied in place first, so no leftover reference keeps the old storage alive."""
    import torch

    for tensor in _all_tensors(model, tower):
        tensor.data = tensor.data.new_empty(0)  # same device and dtype: allowed in place
    with torch.device("meta"):
        _install(model, tower, cfg)
    _return_freed_memory()


def _all_tensors(model: Any, tower: str) -> list[Any]:
    tensors: list[Any] = []
    for module in _tower_modules(model, tower):
        tensors += list(module.parameters()) + list(module.buffers())
    if tower == "text":
        from torch import nn

        tensors += [v for a in TEXT_ATTRIBUTES if not isinstance(v := getattr(model, a), nn.Module) and v is not None]
        if model.attn_mask is not None:  # CLIPA and SigLIP text towers attend without a causal mask
            tensors.append(model.attn_mask)
    return tensors


def _return_freed_memory() -> None:
    """Ask glibc to give freed heap pages back to the system (tensors under its mmap threshold
    live on the heap, and a freed heap is otherwise kept for reuse)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _install(model: Any, tower: str, cfg: dict[str, Any]) -> None:
    """Build one tower with open_clip's builder (under whatever device context is active) and
    put it where CLIP.__init__ puts it."""
    from open_clip.model import _build_text_tower, _build_vision_tower

    quick_gelu = bool(cfg.get("quick_gelu", False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if tower == "image":
            preprocess_cfg = getattr(model.visual, "preprocess_cfg", None)
            model.visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu, None)
            if preprocess_cfg is not None:
                model.visual.preprocess_cfg = preprocess_cfg
            return
        text = _build_text_tower(cfg["embed_dim"], cfg["text_cfg"], quick_gelu, None)
    for attribute in TEXT_ATTRIBUTES:
        setattr(model, attribute, getattr(text, attribute))
    model.register_buffer("attn_mask", text.attn_mask, persistent=False)


def _tower_modules(model: Any, tower: str) -> list[Any]:
    from torch import nn

    if tower == "image":
        return [model.visual]
    return [m for a in TEXT_ATTRIBUTES if isinstance(m := getattr(model, a), nn.Module)]


def _tower_tensors(model: Any, tower: str) -> dict[str, Any]:
    """The tower's entries of the CLIP state dict (persistent tensors), by state-dict key."""
    prefix = "visual." if tower == "image" else ""
    state = model.visual.state_dict(prefix=prefix, keep_vars=True) if tower == "image" else {
        k: v for k, v in model.state_dict(keep_vars=True).items()
        if k.split(".", 1)[0] in TEXT_ATTRIBUTES
    }
    return dict(state)


def _copy_checkpoint(model: Any, tower: str, path: Path) -> None:
    """Strict per-tower load with flat memory: each stored tensor is copied into the real one."""
    targets = _tower_tensors(model, tower)
    stored = _checkpoint_tensors(path, lambda k: k in targets)
    missing = sorted(set(targets) - set(stored))
    if missing:
        raise WeightsError(
            f"checkpoint {path} lacks {len(missing)} tensors of the {tower} tower (e.g. {missing[0]}): "
            "is it a checkpoint of another architecture?")
    for key, value in stored.items():
        target = targets[key]
        if tuple(value.shape) != tuple(target.shape):
            raise WeightsError(f"checkpoint {path}: {key} has shape {tuple(value.shape)}, the model "
                               f"{tuple(target.shape)}: is it a checkpoint of another architecture?")
        target.data.copy_(value)
    del stored


def _checkpoint_tensors(path: Path | None, wanted: Callable[[str], bool]) -> dict[str, Any]:
    """The checkpoint's tensors whose (normalized) keys `wanted` accepts, without reading the others.

    .safetensors are read tensor by tensor; .pt/.bin are memory-mapped (torch.load mmap,
    weights_only: no pickled code runs). open_clip's own wrappers ("state_dict", "module.")
    are taken off the keys.
    """
    import torch

    if path is None:
        return {}
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            out = {}
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if wanted(_normal_key(key)):
                        out[_normal_key(key)] = f.get_tensor(key)
            return out
        state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here is about the user's file
        if is_pickled_objects_refusal(exc):
            raise checkpoint_read_error(path, exc) from None
        error = checkpoint_read_error(path, exc, hint=" tower by tower")
        raise WeightsError(f"{error}. Large models read state-dict .pt/.bin files (zip format) and "
                           ".safetensors.") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"checkpoint {path} is not a state dict")
    return {_normal_key(k): v for k, v in state.items() if wanted(_normal_key(k))}


def _normal_key(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key


def _numel(value: Any) -> int:
    if value is None:
        return 0
    if hasattr(value, "parameters"):
        return sum(p.numel() for p in value.parameters())
    return int(value.numel())
