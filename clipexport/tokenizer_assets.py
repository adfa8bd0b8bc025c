"""Copy what a tokenizer needs into the artifact, so a runtime never needs open_clip or the hub."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from clipexport.errors import UnsupportedModelError

TOKENIZER_DIR = "tokenizer"
CLIP_BPE_VOCAB = "bpe_simple_vocab_16e6.txt.gz"


def write_tokenizer_assets(ref: Any, directory: Path) -> tuple[dict[str, Any], list[str]]:
    """Write the tokenizer files of `ref` (a ReferenceModel) under `directory/tokenizer/`.

    Returns the manifest's `tokenizer` section and the written paths (relative to `directory`).
    """
    text_cfg = ref.model_cfg["text_cfg"]
    context_length = int(text_cfg.get("context_length", 77))
    import open_clip.tokenizer as oc_tokenizer

    if ref.text_tokenizer is not None and not isinstance(ref.text_tokenizer, oc_tokenizer.SimpleTokenizer):
        return _hf_tokenizer_assets(ref.text_tokenizer, context_length, directory, _runtime_gap(text_cfg))
    if text_cfg.get("hf_tokenizer_name"):
        raise UnsupportedModelError(
            f"Hugging Face tokenizer {text_cfg['hf_tokenizer_name']!r}: the build chose no tokenizer for it"
        )

    source = Path(oc_tokenizer.__file__).with_name(CLIP_BPE_VOCAB)
    target_dir = directory / TOKENIZER_DIR
    target_dir.mkdir(exist_ok=True)
    shutil.copyfile(source, target_dir / CLIP_BPE_VOCAB)
    vocab = f"{TOKENIZER_DIR}/{CLIP_BPE_VOCAB}"
    section = {
        "kind": "clip-bpe",
        "context_length": context_length,
        "vocab": vocab,
        # e.g. {"clean": "canonicalize"} for some configs: the runtime must clean text the same way
        "kwargs": dict(text_cfg.get("tokenizer_kwargs", {})),
        "sot_token_id": 49406,
        "eot_token_id": 49407,
    }
    return section, [vocab]


def _runtime_gap(text_cfg: dict[str, Any]) -> str:
    """What open_clip's HFTokenizer does for this model that the runtime's tokenizer (whitespace
    cleaning, truncation, right padding) would not; "" when nothing."""
    kwargs = dict(text_cfg.get("tokenizer_kwargs") or {})
    gaps = []
    if kwargs.pop("clean", "whitespace") != "whitespace":
        gaps.append(f"text cleaning {text_cfg['tokenizer_kwargs']['clean']!r}")
    if kwargs.pop("strip_sep_token", False):
        gaps.append("replacing the separator token with 0")
    if text_cfg.get("tokenizer_mode"):
        gaps.append(f"tokenizer_mode {text_cfg['tokenizer_mode']!r}")
    gaps += [f"tokenizer option {key!r}" for key in sorted(kwargs)]
    return ", ".join(gaps)


def _hf_tokenizer_assets(
    tokenizer: Any, context_length: int, directory: Path, runtime_gap: str = ""
) -> tuple[dict[str, Any], list[str]]:
    """A Hugging Face tokenizer's own files, or a record that the artifact has none: synthetic ids,
    or a tokenizer whose open_clip options the runtime cannot reproduce (ids would differ silently)."""
    synthetic = getattr(tokenizer, "kind", "") == "synthetic"
    if synthetic or runtime_gap:
        reason = ("the tokenizer files were not available at build time" if synthetic else
                  f"the runtime tokenizer cannot reproduce open_clip's {runtime_gap}")
        return {
            "kind": "none",
            "context_length": context_length,
            "reason": f"{reason}; tokenize with the model's open_clip tokenizer (open_clip.get_tokenizer, "
                      "padded to context_length) and feed input_ids",
            "pad_token_id": tokenizer.pad_id if hasattr(tokenizer, "pad_id") else tokenizer.tokenizer.pad_token_id,
        }, []
    target_dir = directory / TOKENIZER_DIR
    written = tokenizer.tokenizer.save_pretrained(str(target_dir))
    files = sorted(
        f"{TOKENIZER_DIR}/{Path(p).name}" for p in written if Path(p).is_file() and Path(p).parent == target_dir
    )
    return {
        "kind": "hf",
        "context_length": context_length,
        "directory": TOKENIZER_DIR,
        "files": files,
        "pad_token_id": tokenizer.tokenizer.pad_token_id,
    }, files
