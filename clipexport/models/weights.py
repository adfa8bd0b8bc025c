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



# torch's weights_only unpickler refuses anything beyond tensors and plain containers with an
# UnpicklingError whose wording varies by what the file holds and by torch release (2.14:
# "Unsupported global: GLOBAL x.Y ...", "Trying to load unsupported GLOBAL os.system whose module os
# is blocked", "Trying to call reduce for unrecognized function ...", "Can only create new object
# ..."), and torch wraps every such message in advice to pass weights_only=False: advice we never relay.
_PICKLED_OBJECT_MARKERS = (
    "unsupported global",
    "whose module",
    "call reduce for unrecognized",
    "can only create new object",
    "can only build",
    "must be imported to load",
)
_TORCH_WRAPPER = "weights only load failed"


def is_pickled_objects_refusal(exc: BaseException) -> bool:
    """Whether `exc` is torch's weights_only unpickler refusing an object beyond tensors."""
    text = str(exc).lower()
    return any(m in text for m in _PICKLED_OBJECT_MARKERS)


def checkpoint_read_error(path: str | Path, exc: BaseException, hint: str = "") -> WeightsError:
    """One line for a checkpoint torch could not read: ours for pickled objects, else torch's cause
    without its weights_only=False advice (running a stranger's pickle is never the fix)."""
    if is_pickled_objects_refusal(exc):
        return WeightsError(
            f"checkpoint {path} holds pickled objects beyond tensors; clipexport loads weights only "
            "(no pickled code). Re-save it as a plain state dict or as .safetensors."
        )
    text = str(exc)
    if _TORCH_WRAPPER in text.lower():
        # torch 2.14: "Weights only load failed. <advice>\n...WeightsUnpickler error: \n\n<cause><docs>"
        cause = text.split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler error:" in text \
            else text.split("\n\n", 1)[-1]
        lines = [ln.strip() for ln in cause.splitlines()
                 if ln.strip() and "weights_only" not in ln and "Weights only load failed" not in ln]
        first = lines[0] if lines else "not a weights-only checkpoint"
    else:
        first = (text.strip().splitlines() or [type(exc).__name__])[0]
    return WeightsError(f"cannot read checkpoint {path}{hint}: {first[:300]}")
