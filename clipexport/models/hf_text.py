"""Hugging Face text towers (XLM-R, RoBERTa) built offline.

open_clip builds these with `AutoConfig.from_pretrained(hf_model_name)`, a hub request. We
point `hf_model_name` at a local directory instead: the user's own directory of hub files,
or a temporary one holding the config.json that clipexport ships in recipes/hf_text/.

Their tokenizers (SentencePiece / BPE files) cannot ship the same way. When neither a local
directory nor the hub cache has them, parity runs on synthetic token ids shaped like real
ones (BOS, ids, EOS, then padding), which exercises the padding mask and the mean pooling;
the artifact then records that it has no tokenizer.
"""

from __future__ import annotations

import json
import tempfile
import zlib
from pathlib import Path
from typing import Any

from clipexport.errors import UnsupportedModelError


# A directory holding one of these has a real tokenizer (fast, SentencePiece, BPE or WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "sentencepiece.bpe.model", "spiece.model", "vocab.json", "vocab.txt")
# Fewer tokens than this is a tokenizer made of special tokens only: it would map every word to <unk>.
MIN_REAL_VOCAB = 16


def bundled_configs_dir() -> Path:
    from clipexport.recipes import recipes_dir

    return recipes_dir() / "hf_text"


def missing_config_reason(text_cfg: dict[str, Any]) -> str:
    """Why this Hugging Face text tower cannot be built offline; "" when it can."""
    name = str(text_cfg["hf_model_name"])
    if (Path(name).expanduser() / "config.json").is_file():
        return ""
    if (bundled_configs_dir() / f"{name.split('/')[-1]}.json").is_file():
        return ""
    known = ", ".join(sorted(p.stem for p in bundled_configs_dir().glob("*.json")))
    return (
        f"text model {name!r}: clipexport ships no offline config for it (it has: {known}); build from a "
        "local-dir: open_clip directory whose text_cfg.hf_model_name is a local directory of its hub files"
    )


def offline_text_cfg(text_cfg: dict[str, Any], scratch: Path) -> tuple[dict[str, Any], str]:
    """A copy of `text_cfg` whose `hf_model_name` is a local directory; and where its config came from.

    Weights are never taken from the hub here: the CLIP checkpoint (or the seed) gives them.
    """
    name = str(text_cfg["hf_model_name"])
    cfg = {**text_cfg, "hf_model_pretrained": False}
    if (Path(name).expanduser() / "config.json").is_file():
        return cfg, f"text model config from {name}"
    reason = missing_config_reason(text_cfg)
    if reason:
        raise UnsupportedModelError(reason)
    bundled = bundled_configs_dir() / f"{name.split('/')[-1]}.json"
    target = scratch / name.split("/")[-1]
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text(bundled.read_text(encoding="utf-8"), encoding="utf-8")
    cfg["hf_model_name"] = str(target)
    return cfg, f"text model config {name} from clipexport's recipes/hf_text (offline)"


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="clipexport-hf-"))


class SyntheticTokenizer:
    """Deterministic stand-in ids for parity when the real tokenizer's files are not here.

    Each text gives BOS, a run of ids drawn from its own hash (length grows with the text,
    capped by the context), EOS, then padding: the shape of real input, not its meaning.
    """

    kind = "synthetic"

    def __init__(self, vocab_size: int, context_length: int, pad_id: int, bos_id: int, eos_id: int) -> None:
        self.vocab_size, self.context_length = vocab_size, context_length
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id

    def __call__(self, texts: list[str]) -> Any:
        import torch

        ids = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        low = max(self.pad_id, self.bos_id, self.eos_id) + 1
        for row, text in enumerate(texts):
            length = min(self.context_length - 2, 1 + 2 * len(text.split()))
            generator = torch.Generator().manual_seed(zlib.crc32(text.encode("utf-8")))
            body = torch.randint(low, self.vocab_size, (length,), generator=generator)
            ids[row, 0] = self.bos_id
            ids[row, 1 : 1 + length] = body
            ids[row, 1 + length] = self.eos_id
        return ids


def text_model_config(text_cfg: dict[str, Any]) -> dict[str, Any]:
    return json.loads((Path(text_cfg["hf_model_name"]) / "config.json").read_text(encoding="utf-8"))


def load_tokenizer(text_cfg: dict[str, Any], context_length: int) -> tuple[Any, str]:
    """The real tokenizer when its files are local (a directory, or the hub cache); else synthetic ids."""
    name = str(text_cfg.get("hf_tokenizer_name") or text_cfg["hf_model_name"])
    local = Path(name).expanduser()
    if local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
        # transformers builds an empty tokenizer (every word <unk>) from a directory without these
        cause = f"{local} has none of {', '.join(TOKENIZER_FILES)}"
    else:
        try:
            from open_clip.tokenizer import HFTokenizer

            tokenizer = HFTokenizer(name, context_length=context_length)
            if len(tokenizer.tokenizer) < MIN_REAL_VOCAB:
                raise ValueError(f"it has only {len(tokenizer.tokenizer)} tokens")
            return tokenizer, f"tokenizer {name}"
        except Exception as exc:  # noqa: BLE001 - offline hub errors come in many types
            cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    config = text_model_config(text_cfg)
    synthetic = SyntheticTokenizer(
        vocab_size=int(config["vocab_size"]),
        context_length=context_length,
        pad_id=int(config.get("pad_token_id", 1)),
        bos_id=int(config.get("bos_token_id", 0)),
        eos_id=int(config.get("eos_token_id", 2)),
    )
    return synthetic, (
        f"tokenizer {name} is not available here ({cause}); parity uses synthetic token ids and the "
        "artifact has no tokenizer (give a local directory of the tokenizer files to include one)"
    )
