"""`transformers` CLIPModel as a source: `hf:DIR`, a directory written by `save_pretrained`
(config.json, and weights unless you build with `--pretrained none`), or `hf:ORG/NAME` on the hub.

The towers are CLIPModel's own `get_image_features` / `get_text_features` (the projected,
unnormalized embeddings). A text vocabulary of 49408 is the CLIP BPE: the artifact carries
that tokenizer, whose ids give the same embeddings (EOT pooling under a causal mask never
reads the padding, whichever id pads).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clipexport.errors import UnknownModelError, WeightsError

PREFIX = "hf:"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_BPE_VOCAB_SIZE = 49408
# PIL resample codes in preprocessor_config.json
_RESAMPLE = {2: "bilinear", 3: "bicubic"}


def is_hf_name(name: str) -> bool:
    return name.startswith(PREFIX)


def resolve(name: str) -> str:
    """`hf:DIR` -> `hf:/abs/DIR`; a hub id is downloaded (config, weights, tokenizer) or fails clearly."""
    target = name[len(PREFIX):]
    directory = Path(target).expanduser()
    if not directory.is_dir():
        if target.count("/") != 1:
            raise UnknownModelError(f"{name}: no such directory (give hf:DIR saved by CLIPModel.save_pretrained)")
        directory = _download(target)
    config = directory / "config.json"
    if not config.is_file():
        raise UnknownModelError(f"{name}: {directory} has no config.json (save it with CLIPModel.save_pretrained)")
    model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    if model_type != "clip":
        raise UnknownModelError(f"{name}: config.json says model_type {model_type!r}; this source reads 'clip'")
    return PREFIX + str(directory.resolve())


def _download(repo: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo, allow_patterns=["*.json", "*.txt", "model.safetensors"])
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise WeightsError(
            f"hf:{repo}: the model must be downloaded from the Hugging Face hub and could not be ({first}). "
            "Offline, save it elsewhere with CLIPModel.save_pretrained(DIR) and build hf:DIR."
        ) from None
    return Path(path)


def directory_of(name: str) -> Path:
    return Path(name[len(PREFIX):])


def model_config(name: str) -> dict[str, Any]:
    """An open_clip-shaped summary (embed_dim, vision_cfg, text_cfg) around the CLIPConfig."""
    from transformers import CLIPConfig

    config = CLIPConfig.from_pretrained(str(directory_of(name))).to_dict()
    vision, text = config["vision_config"], config["text_config"]
    return {
        "source": "transformers",
        "embed_dim": config["projection_dim"],
        "vision_cfg": {"image_size": vision["image_size"], "patch_size": vision["patch_size"]},
        "text_cfg": {"context_length": text["max_position_embeddings"], "vocab_size": text["vocab_size"]},
        "clip_config": config,
    }


def weights_file(name: str) -> Path | None:
    directory = directory_of(name)
    return next((directory / f for f in WEIGHT_FILES if (directory / f).is_file()), None)


def create(name: str, load_weights: bool) -> Any:
    """CLIPModel from the directory's weights, or randomly initialized from its config (caller seeds).

    Attention goes through SDPA whatever the config saved: the exporter lowers each such call to
    one ONNX Attention node (the build counts them against the CLIPAttention modules)."""
    from transformers import CLIPConfig, CLIPModel

    directory = directory_of(name)
    if load_weights:
        try:
            model = CLIPModel.from_pretrained(str(directory), use_safetensors=None, attn_implementation="sdpa")
        except Exception as exc:  # noqa: BLE001 - a corrupt or mismatched weight file
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise WeightsError(f"cannot load CLIPModel weights from {directory}: {first}") from None
    else:
        model = CLIPModel._from_config(CLIPConfig.from_pretrained(str(directory)), attn_implementation="sdpa")
    return model.float().eval().requires_grad_(False)


def preprocess_config(name: str, image_size: int) -> dict[str, Any]:
    """open_clip-style preprocessing from preprocessor_config.json (CLIPImageProcessor), else CLIP's defaults."""
    cfg: dict[str, Any] = {"size": [image_size, image_size], "mode": "RGB", "mean": list(OPENAI_MEAN),
                           "std": list(OPENAI_STD), "interpolation": "bicubic", "resize_mode": "shortest",
                           "fill_color": 0}
    path = directory_of(name) / "preprocessor_config.json"
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        cfg["mean"] = list(data.get("image_mean", cfg["mean"]))
        cfg["std"] = list(data.get("image_std", cfg["std"]))
        cfg["interpolation"] = _RESAMPLE.get(int(data.get("resample", 3)), "bicubic")
    return cfg


# transformers' CLIPTextTransformer pools by argmax of the ids when eos_token_id is the legacy 2,
# else at the first position holding eos_token_id.
_LEGACY_EOS_ID = 2
CLIP_BPE_EOT_ID = 49407


def untrimmable_reason(model: Any) -> str:
    """Why cutting CLIP BPE ids after the batch's last EOT would change this CLIPModel's text
    embeddings; "" when it would not.

    The text model is causal (every layer gets transformers' causal mask) and slices its position
    ids to the input length, so a row's EOT never sees a later column; it pools at EOT when the
    ids are CLIP BPE (EOT 49407 is the largest id: the legacy argmax finds it) or when
    eos_token_id is 49407 (the first EOT)."""
    text = model.config.text_config
    if text.vocab_size != CLIP_BPE_VOCAB_SIZE:
        return f"text vocabulary of {text.vocab_size}, not CLIP BPE's {CLIP_BPE_VOCAB_SIZE}: the EOT id is unknown"
    eos = model.text_model.eos_token_id
    if eos not in (_LEGACY_EOS_ID, CLIP_BPE_EOT_ID):
        return f"eos_token_id {eos}: the text model pools at that id, not at CLIP BPE's EOT"
    return ""


def tower(model: Any, name: str) -> Any:
    from clipexport.models.hf_clip_towers import HFImageTower, HFTextTower

    return HFImageTower(model) if name == "image" else HFTextTower(model)
