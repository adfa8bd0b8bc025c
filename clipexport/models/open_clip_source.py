"""Build the open_clip PyTorch reference from a model name and `--pretrained`, offline where possible.

Model names: open_clip's built-in names (`ViT-B-32`; `ViT-B/32` as OpenAI writes it), or
`local-dir:PATH`, a directory holding `open_clip_config.json` (and optionally weights).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from clipexport.errors import UnknownModelError, WeightsError
from clipexport.models import hf_clip, registry
from clipexport.models.architecture import (
    HF_CLIP_VISION,
    HF_TEXT,
    TEXT_TRANSFORMER_HF_TOKENIZER,
    Families,
    families_of,
)
from clipexport.models.hf_text import load_builtin_tokenizer, load_tokenizer, offline_text_cfg, scratch_dir
from clipexport.models.weights import FILE, RANDOM, TAG, WeightsSpec, checkpoint_read_error, parse_pretrained

LOCAL_DIR = "local-dir:"
OFFLINE_HINT = (
    "Offline, build with `--pretrained none` (seeded random weights) or "
    "`--pretrained PATH` (a local .pt/.bin/.safetensors checkpoint)."
)


def canonical_name(name: str) -> str:
    """Resolve a user's model name to open_clip's, or raise with the closest matches."""
    if hf_clip.is_hf_name(name):
        return hf_clip.resolve(name)
    if name.startswith(LOCAL_DIR):
        directory = Path(name[len(LOCAL_DIR):]).expanduser()
        if not (directory / "open_clip_config.json").is_file():
            raise UnknownModelError(f"{name}: no open_clip_config.json in {directory}")
        return LOCAL_DIR + str(directory.resolve())
    if name.startswith("hf-hub:"):
        raise WeightsError(
            f"{name}: hf-hub models are read from the Hugging Face hub. Download the repository "
            "(open_clip_config.json and weights) and build it with `local-dir:PATH` instead."
        )
    known = registry.list_models()
    # OpenAI writes ViT-B/32 and ViT-L/14@336px where open_clip writes ViT-B-32 and ViT-L-14-336.
    candidates = [name, name.replace("/", "-").replace("@336px", "-336")]
    for candidate in candidates:
        if candidate in known:
            return candidate
    lowered = {m.lower(): m for m in known}
    for candidate in candidates:
        if candidate.lower() in lowered:
            return lowered[candidate.lower()]
    close = difflib.get_close_matches(name.replace("/", "-"), known, n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownModelError(f"unknown model {name!r}.{hint} Run `clipexport list` to see every model.")


def model_config(name: str) -> dict[str, Any]:
    """open_clip's config dict of a canonical model name."""
    if hf_clip.is_hf_name(name):
        return hf_clip.model_config(name)
    if name.startswith(LOCAL_DIR):
        path = Path(name[len(LOCAL_DIR):]) / "open_clip_config.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UnknownModelError(f"{path}: cannot read open_clip config: {exc}") from None
        cfg = data.get("model_cfg", data)
        if not isinstance(cfg, dict) or "vision_cfg" not in cfg or "text_cfg" not in cfg:
            raise UnknownModelError(f"{path}: not an open_clip config (needs vision_cfg and text_cfg)")
        return cfg
    cfg = registry.get_model_config(name)
    if cfg is None:
        raise UnknownModelError(f"unknown model {name!r}")
    return cfg


def known_tags(name: str) -> list[str]:
    if name.startswith(LOCAL_DIR) or hf_clip.is_hf_name(name):
        return []
    return registry.list_pretrained_tags_by_model(name)


def default_pretrained(name: str) -> str:
    """What a build uses when `--pretrained` is not given: the model's first published tag."""
    tags = known_tags(name)
    if hf_clip.is_hf_name(name):
        weights = hf_clip.weights_file(name)
        if weights is None:
            raise WeightsError(f"{name} holds no weights ({', '.join(hf_clip.WEIGHT_FILES)}): pass --pretrained none")
        return str(weights)
    if name.startswith(LOCAL_DIR):
        return "none"
    if not tags:
        raise WeightsError(f"{name} has no published weights: pass --pretrained none or --pretrained PATH")
    return tags[0]


@dataclass
class ReferenceModel:
    """The PyTorch reference of one build: the open_clip model and what it was built from."""

    name: str
    model: Any  # open_clip CLIP / CustomTextCLIP, in eval mode
    model_cfg: dict[str, Any]
    families: Families
    weights: WeightsSpec
    notes: list[str] = field(default_factory=list)
    # set for Hugging Face text towers and built-in ones fed by a Hugging Face tokenizer: the
    # real tokenizer, or synthetic ids when it is not here
    text_tokenizer: Any = None
    # set when the model is a meta-device skeleton whose towers are made real one at a time
    tower_source: Any = None  # models.per_tower.TowerSource

    @property
    def per_tower(self) -> bool:
        return self.tower_source is not None

    def materialize(self, tower: str) -> None:
        """Make `tower` real (per-tower models only; a whole model already is)."""
        if self.tower_source is not None:
            from clipexport.models import per_tower

            per_tower.materialize(self.model, tower, self.tower_source)

    def release(self, tower: str) -> None:
        """Free `tower`'s weights (per-tower models only)."""
        if self.tower_source is not None:
            from clipexport.models import per_tower

            per_tower.release(self.model, tower, self.tower_source.cfg)

    @property
    def image_size(self) -> int:
        if self.families.image == HF_CLIP_VISION:
            return int(self.model_cfg["vision_cfg"]["image_size"])
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def context_length(self) -> int:
        return int(self.model_cfg["text_cfg"].get("context_length", 77))

    def preprocess_config(self) -> dict[str, Any]:
        """What the runtime needs to preprocess images exactly as open_clip does for these weights."""
        if self.families.image == HF_CLIP_VISION:
            return hf_clip.preprocess_config(self.name, self.image_size)
        from open_clip.model import get_model_preprocess_cfg

        cfg = dict(get_model_preprocess_cfg(self.model))
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}

    def tower(self, name: str) -> Any:
        """The image or text tower as an nn.Module of one tensor (see models/towers.py)."""
        if self.families.image == HF_CLIP_VISION:
            return hf_clip.tower(self.model, name)
        from clipexport.models.towers import image_tower, text_tower

        return image_tower(self.model) if name == "image" else text_tower(self.model)

    def tokenizer(self) -> Any:
        import open_clip

        if self.text_tokenizer is not None:
            return self.text_tokenizer
        return open_clip.get_tokenizer(self.name)


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """open_clip logs 'initialized randomly' through the root logger; we already say what we load."""
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(previous)


def load_reference(name: str, pretrained: str | None = None, seed: int = 0, per_tower: bool = False) -> ReferenceModel:
    """Build the open_clip reference in eval mode on the CPU, in fp32.

    pretrained: `none` (seeded random weights), an open_clip tag (downloads, or the local
    hub cache), or a checkpoint file; None picks the model's default. per_tower: return a
    meta-device skeleton whose towers the caller makes real one at a time
    (`ref.materialize(tower)`, `ref.release(tower)`; see models/per_tower.py).
    """
    import open_clip
    import torch

    name = canonical_name(name)
    cfg = model_config(name)
    families = families_of(cfg)
    weights = parse_pretrained(pretrained or default_pretrained(name), seed, known_tags(name), name)
    if hf_clip.is_hf_name(name):
        return _load_hf_clip(name, cfg, families, weights, seed)
    notes: list[str] = []
    kwargs: dict[str, Any] = {}
    wants_quick_gelu = (
        weights.kind == TAG and open_clip.get_pretrained_cfg(name, weights.value).get("quick_gelu", False)
    ) or (weights.kind == FILE and is_torchscript_archive(Path(weights.value)))
    if wants_quick_gelu and not cfg.get("quick_gelu", False):
        # open_clip only warns when QuickGELU weights meet a GELU config; the numbers would be wrong.
        kwargs["force_quick_gelu"] = True
        source = "OpenAI's TorchScript checkpoint" if weights.kind == FILE else f"the {weights.value} weights"
        notes.append(f"{source} need QuickGELU: building {name} with QuickGELU (as {name}-quickgelu)")
        cfg = {**cfg, "quick_gelu": True}

    if per_tower:
        ref = _load_per_tower(name, cfg, families, weights, seed, notes)
        ref.text_tokenizer = _builtin_hf_tokenizer(name, cfg, families, ref.notes)
        return ref
    scratch = None
    if families.text == HF_TEXT:
        # open_clip would ask the hub for the text model's config.json: give it a local one.
        scratch = scratch_dir()
        text_cfg, source = offline_text_cfg(cfg["text_cfg"], scratch)
        kwargs.update(text_cfg=text_cfg, pretrained_text=False)
        notes.append(source)
    try:
        model = _create(open_clip, torch, name, weights, seed, kwargs)
        text_tokenizer = None
        if scratch is not None:
            text_tokenizer, source = load_tokenizer(kwargs["text_cfg"], int(cfg["text_cfg"].get("context_length", 77)))
            notes.append(source)
        else:
            text_tokenizer = _builtin_hf_tokenizer(name, cfg, families, notes)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if weights.kind == FILE:
        _load_checkpoint(model, weights, name)
    model.eval().requires_grad_(False)
    if weights.kind == RANDOM:
        notes.append(f"random weights (seed {seed}): embeddings carry no meaning, parity still does")
    return ReferenceModel(name=name, model=model, model_cfg=cfg, families=families, weights=weights, notes=notes,
                          text_tokenizer=text_tokenizer)


def _builtin_hf_tokenizer(name: str, cfg: dict[str, Any], families: Families, notes: list[str]) -> Any:
    """The tokenizer of a built-in text transformer that reads a Hugging Face tokenizer; None otherwise.

    The model builds offline; only its tokenizer reads hub files: open_clip's when it loads
    offline, else synthetic ids (open_clip.get_tokenizer would raise). The note says which.
    """
    if families.text != TEXT_TRANSFORMER_HF_TOKENIZER:
        return None
    local_dir = Path(name[len(LOCAL_DIR):]) if name.startswith(LOCAL_DIR) else None
    tokenizer, source = load_builtin_tokenizer(name, cfg["text_cfg"], local_dir)
    notes.append(source)
    return tokenizer


def _load_per_tower(name: str, cfg: dict[str, Any], families: Families, weights: WeightsSpec, seed: int,
                    notes: list[str]) -> ReferenceModel:
    """The skeleton of a model too large to hold whole; its checkpoint is read tower by tower."""
    from clipexport.models import per_tower

    if not per_tower.supports_per_tower(cfg):
        raise WeightsError(f"{name}: only the built-in CLIP class loads tower by tower")
    checkpoint = None
    if weights.kind == TAG:
        checkpoint = _download(name, weights.value)
    elif weights.kind == FILE:
        checkpoint = Path(weights.value)
        if is_torchscript_archive(checkpoint):
            raise WeightsError(f"{checkpoint}: TorchScript archives load whole; towers this large need a "
                               "state-dict .pt/.bin or .safetensors checkpoint")
    model = per_tower.skeleton(name, quick_gelu=bool(cfg.get("quick_gelu", False)))
    source = per_tower.TowerSource(cfg=cfg, seed=seed, checkpoint=checkpoint)
    per_tower.materialize_scalars(model, source)
    sizes = per_tower.tower_parameters(model)
    notes.append(f"loaded tower by tower (image {sizes['image'] / 1e9:.2f} B, text {sizes['text'] / 1e9:.2f} B "
                 "parameters): one tower's weights in memory at a time")
    if weights.kind == RANDOM:
        notes.append(f"random weights (seed {seed}), each tower drawn on its own by open_clip's tower builder: "
                     "embeddings carry no meaning, parity still does")
    return ReferenceModel(name=name, model=model, model_cfg=cfg, families=families, weights=weights, notes=notes,
                          tower_source=source)


def _download(name: str, tag: str) -> Path:
    """The local file of an open_clip tag (downloaded, or from the hub cache)."""
    import open_clip

    try:
        with _quiet_open_clip():
            path = open_clip.download_pretrained(open_clip.get_pretrained_cfg(name, tag))
    except Exception as exc:  # noqa: BLE001 - network and hub errors of many kinds
        raise WeightsError(f"{name} --pretrained {tag}: the weights must be downloaded and could not be "
                           f"({_first_line(exc)}). {OFFLINE_HINT}") from None
    if not path:
        raise WeightsError(f"{name} --pretrained {tag}: open_clip knows no download for this tag. {OFFLINE_HINT}")
    return Path(path)


def _load_hf_clip(name: str, cfg: dict[str, Any], families: Families, weights: WeightsSpec, seed: int) -> ReferenceModel:
    """A transformers CLIPModel: its directory's own weights file, or random weights under `seed`."""
    import open_clip
    import torch

    if weights.kind == FILE and Path(weights.value).parent != hf_clip.directory_of(name):
        raise WeightsError(f"{name}: --pretrained must be none or the directory's own weights file")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = hf_clip.create(name, load_weights=weights.kind == FILE)
    notes = [f"transformers CLIPModel from {hf_clip.directory_of(name)}"]
    tokenizer = None
    if cfg["text_cfg"]["vocab_size"] == hf_clip.CLIP_BPE_VOCAB_SIZE:
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
        notes.append("text vocabulary of 49408: the CLIP BPE tokenizer (open_clip's ids)")
    if weights.kind == RANDOM:
        notes.append(f"random weights (seed {seed}): embeddings carry no meaning, parity still does")
    return ReferenceModel(name=name, model=model, model_cfg=cfg, families=families, weights=weights, notes=notes,
                          text_tokenizer=tokenizer)


def _create(open_clip: Any, torch: Any, name: str, weights: WeightsSpec, seed: int, kwargs: dict[str, Any]) -> Any:
    """open_clip.create_model under a fixed seed, with download failures turned into WeightsError."""
    # fork_rng: seeding for the init must not change the caller's random stream.
    with torch.random.fork_rng(devices=[]), _quiet_open_clip(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.manual_seed(seed)
        try:
            if weights.kind == TAG:
                model = open_clip.create_model(name, pretrained=weights.value, **kwargs)
            else:
                model = open_clip.create_model(name, pretrained=None, load_weights=False, **kwargs)
        except RuntimeError as exc:
            if weights.kind == TAG and "download" in str(exc).lower():
                raise WeightsError(
                    f"{name} --pretrained {weights.value}: the weights must be downloaded and could not be "
                    f"({_first_line(exc)}). {OFFLINE_HINT}"
                ) from None
            raise
    return model


def _load_checkpoint(model: Any, weights: WeightsSpec, name: str) -> None:
    """Load a local checkpoint strictly and safely (weights_only: no pickled code runs)."""
    import open_clip

    path = weights.value
    try:
        if is_torchscript_archive(Path(path)):
            _load_torchscript_weights(model, Path(path))
        else:
            with _quiet_open_clip():
                open_clip.load_checkpoint(model, path, strict=True, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every failure here is about the user's file
        text = str(exc)
        if "Error(s) in loading state_dict" in text:
            missing = len(_keys_after(text, "Missing key(s) in state_dict:"))
            unexpected = len(_keys_after(text, "Unexpected key(s) in state_dict:"))
            mismatched = text.count("size mismatch for")
            raise WeightsError(
                f"checkpoint {path} does not fit {name}: {missing} missing keys, {unexpected} unexpected keys, "
                f"{mismatched} shape mismatches. Is it a checkpoint of another architecture?"
            ) from None
        raise checkpoint_read_error(path, exc) from None


def is_torchscript_archive(path: Path) -> bool:
    """OpenAI's released .pt files are TorchScript archives (a zip holding code/ and constants.pkl)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in archive.namelist())


def _load_torchscript_weights(model: Any, path: Path) -> None:
    """Take only the tensors out of a TorchScript archive (TorchScript, not pickled Python, is read)."""
    import torch

    scripted = torch.jit.load(str(path), map_location="cpu")
    state = {k: v.float() if v.is_floating_point() else v for k, v in scripted.state_dict().items()}
    for key in ("input_resolution", "context_length", "vocab_size"):  # metadata, not weights
        state.pop(key, None)
    # TorchScript also saves non-persistent buffers (the causal attention mask): not weights either
    expected = model.state_dict().keys()
    for key in [k for k, _ in model.named_buffers() if k not in expected]:
        state.pop(key, None)
    model.load_state_dict(state, strict=True)


def _keys_after(text: str, marker: str) -> list[str]:
    if marker not in text:
        return []
    segment = text.split(marker, 1)[1].split(".\n", 1)[0].split(". ", 1)[0]
    return [k for k in segment.split(",") if k.strip()]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
