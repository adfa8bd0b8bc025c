"""What `--pretrained` means: seeded random weights, an open_clip tag, or a local checkpoint file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clipexport.errors import WeightsError
from clipexport.hashing import file_sha256

RANDOM = "random"
TAG = "tag"
FILE = "file"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


@dataclass(frozen=True)
class WeightsSpec:
    """Where a reference model's weights come from."""

    kind: str  # RANDOM, TAG or FILE
    value: str  # "none", the tag, or the checkpoint's absolute path
    seed: int  # seeds the random init (random weights, and any parameter a checkpoint leaves alone)
    sha256: str | None = None  # of the checkpoint file

    @property
    def label(self) -> str:
        """Short name for directory names: none, the tag, or the checkpoint's file stem."""
        if self.kind == FILE:
            return Path(self.value).stem
        return self.value

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind, "value": self.value, "seed": self.seed, "sha256": self.sha256}


def parse_pretrained(pretrained: str, seed: int, known_tags: list[str], model: str) -> WeightsSpec:
    """Interpret `--pretrained`: `none`, a path to a checkpoint file, or one of the model's tags."""
    if pretrained.lower() == "none":
        return WeightsSpec(RANDOM, "none", seed)
    looks_like_path = (
        pretrained.lower().endswith(CHECKPOINT_SUFFIXES) or "/" in pretrained or pretrained.startswith(".")
    )
    if looks_like_path:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise WeightsError(f"checkpoint not found: {pretrained} (give an existing .pt/.bin/.safetensors file)")
        if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
            raise WeightsError(
                f"checkpoint {pretrained}: unsupported file type {path.suffix!r}; "
                f"expected one of {', '.join(CHECKPOINT_SUFFIXES)}"
            )
        return WeightsSpec(FILE, str(path.resolve()), seed, sha256=file_sha256(path))
    if pretrained in known_tags:
        return WeightsSpec(TAG, pretrained, seed)
    tags = ", ".join(known_tags) if known_tags else "(none: this model has no published weights)"
    raise WeightsError(
        f"{model}: --pretrained {pretrained!r} is neither a known tag nor an existing checkpoint file. "
        f"Known tags: {tags}. Offline, use --pretrained none or a local checkpoint file."
    )
