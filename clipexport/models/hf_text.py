"""Hugging Face text towers (XLM-R, RoBERTa, the mT5 and NLLB encoders) built offline.

open_clip builds these with `AutoConfig.from_pretrained(hf_model_name)`, a hub request. We
point `hf_model_name` at a local directory instead: the user's own directory of hub files,
or a temporary one holding the config.json that clipexport ships in recipes/hf_text/.

Their tokenizers (SentencePiece / BPE files) cannot ship the same way. When neither a local
directory nor the hub cache has them, parity runs on synthetic token ids laid out like the real
tokenizer's (see `token_layout`: BOS or a language code or nothing, ids, EOS, then padding), which
exercises the padding mask and the pooling (mean, or the first token); the artifact then records
that it has no tokenizer. The same stand-in serves open_clip's built-in text transformer when
the Hugging Face tokenizer it reads (SigLIP, CLIPA, worldwide) is not in the hub cache
(`load_builtin_tokenizer`, `builtin_token_layout`).
"""

from __future__ import annotations

import json
import tempfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
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


# T5 tokenizers add no BOS, only </s> at the end (pad 0, eos 1).
T5_MODEL_TYPES = ("t5", "mt5", "umt5")
# mT5's embedding has 250112 rows (a multiple of 128) but its SentencePiece model only 250100 pieces.
MT5_VOCAB_SIZE, MT5_PIECES = 250112, 250100
# NLLB-200 (NllbTokenizer, vocabulary 256206): ids from 256001 are the 202 language codes and <mask>.
# open_clip's HFTokenizer keeps the tokenizer's default source language, eng_Latn (id 256047), and
# NllbTokenizer (legacy_behaviour=False, the default) writes it first: [eng_Latn] pieces </s> <pad>...
NLLB_VOCAB_SIZE, NLLB_FIRST_LANGUAGE_CODE, NLLB_ENG_LATN = 256206, 256001, 256047


@dataclass(frozen=True)
class TokenLayout:
    """Where a Hugging Face tokenizer puts its special ids in a padded row.

    [first_id] piece ids... eos_id pad_id pad_id ... (first_id None: the row starts with a piece).
    """

    pad_id: int
    eos_id: int
    first_id: int | None  # BOS (XLM-R, RoBERTa), NLLB's source-language code, or None (T5)
    piece_end: int  # ordinary pieces lie below this id (language codes and unused rows above)


def token_layout(config: Mapping[str, Any]) -> TokenLayout:
    """The id layout of the tokenizer that goes with a Hugging Face text model's config.json."""
    vocab = int(config["vocab_size"])
    pad, eos = int(config.get("pad_token_id", 1)), int(config.get("eos_token_id", 2))
    bos = config.get("bos_token_id")
    model_type = str(config.get("model_type", ""))
    if model_type in T5_MODEL_TYPES:
        return TokenLayout(pad, eos, None, MT5_PIECES if vocab == MT5_VOCAB_SIZE else vocab)
    if model_type == "m2m_100" and vocab == NLLB_VOCAB_SIZE:
        return TokenLayout(pad, eos, NLLB_ENG_LATN, NLLB_FIRST_LANGUAGE_CODE)
    # XLM-R, RoBERTa, and M2M100 configs of another vocabulary (a test twin): BOS first.
    return TokenLayout(pad, eos, int(bos) if bos is not None else 0, vocab)


class SyntheticTokenizer:
    """Deterministic stand-in ids for parity when the real tokenizer's files are not here.

    Each text gives the layout's first id (if any), a run of piece ids drawn from its own hash
    (length grows with the text, capped by the context), EOS, then padding: the shape of real
    input, not its meaning.
    """

    kind = "synthetic"

    def __init__(self, vocab_size: int, context_length: int, layout: TokenLayout) -> None:
        self.vocab_size, self.context_length, self.layout = vocab_size, context_length, layout
        self.pad_id, self.eos_id = layout.pad_id, layout.eos_id  # pad_id: read by tokenizer_assets

    def __call__(self, texts: list[str]) -> Any:
        """Texts -> int64 [N, context_length]."""
        import torch

        layout = self.layout
        start = 0 if layout.first_id is None else 1
        specials = [layout.pad_id, layout.eos_id] + ([] if layout.first_id is None else [layout.first_id])
        # pieces never collide with a special id: the padding mask and pooling see exactly the layout
        low = max((i for i in specials if i < layout.piece_end), default=-1) + 1
        ids = torch.full((len(texts), self.context_length), layout.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            length = min(self.context_length - 1 - start, 1 + 2 * len(text.split()))
            generator = torch.Generator().manual_seed(zlib.crc32(text.encode("utf-8")))
            body = torch.randint(low, layout.piece_end, (length,), generator=generator)
            if layout.first_id is not None:
                ids[row, 0] = layout.first_id
            ids[row, start : start + length] = body
            ids[row, start + length] = layout.eos_id
        return ids


def text_model_config(text_cfg: dict[str, Any]) -> dict[str, Any]:
    return json.loads((Path(text_cfg["hf_model_name"]) / "config.json").read_text(encoding="utf-8"))


def _real_tokenizer(name: str, context_length: int, kwargs: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """(open_clip's HFTokenizer, "") when `name` loads offline (a local directory, or the hub cache);
    else (None, why not)."""
    local = Path(name).expanduser()
    if local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
        # transformers builds an empty tokenizer (every word <unk>) from a directory without these
        return None, f"{local} has none of {', '.join(TOKENIZER_FILES)}"
    try:
        from open_clip.tokenizer import HFTokenizer

        tokenizer = HFTokenizer(name, context_length=context_length, **dict(kwargs or {}))
        if len(tokenizer.tokenizer) < MIN_REAL_VOCAB:
            raise ValueError(f"it has only {len(tokenizer.tokenizer)} tokens")
        return tokenizer, ""
    except Exception as exc:  # noqa: BLE001 - offline hub errors come in many types
        return None, (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]


def _synthetic_note(name: str, cause: str) -> str:
    return (
        f"tokenizer {name} is not available here ({cause}); parity uses synthetic token ids and the "
        "artifact has no tokenizer (give a local directory of the tokenizer files to include one)"
    )


def load_tokenizer(text_cfg: dict[str, Any], context_length: int) -> tuple[Any, str]:
    """The real tokenizer when its files are local (a directory, or the hub cache); else synthetic ids."""
    name = str(text_cfg.get("hf_tokenizer_name") or text_cfg["hf_model_name"])
    tokenizer, cause = _real_tokenizer(name, context_length)
    if tokenizer is not None:
        return tokenizer, f"tokenizer {name}"
    config = text_model_config(text_cfg)
    synthetic = SyntheticTokenizer(int(config["vocab_size"]), context_length, token_layout(config))
    return synthetic, _synthetic_note(name, cause)


# -- open_clip's built-in TextTransformer fed by a Hugging Face tokenizer (SigLIP, CLIPA, worldwide) --
# No config.json describes these tokenizers offline: their layouts, by tokenizer, as open_clip's
# HFTokenizer (padding='max_length') writes them. BERT (CLIPA, strip_sep_token): [CLS]=101 pieces,
# [SEP] replaced by 0, pad 0; WordPiece pieces end at 30522 though the embedding has 32000 rows.
BERT_CLS, BERT_VOCAB = 101, 30522
# XLM-V (worldwide ViT-H/bigG): XLM-R's special ids, <s>=0 <pad>=1 </s>=2.
XLMR_BOS, XLMR_PAD = 0, 1
# SigLIP's English SentencePiece (HF's SiglipTokenizer): pieces then </s>=1, padded with </s>.
SIGLIP_PAD_EOS = 1
# SigLIP 2's Gemma tokenizer: pieces then <eos>=1, <pad>=0 (no BOS, as big_vision trains it).
GEMMA_PAD, GEMMA_EOS = 0, 1


def builtin_token_layout(text_cfg: Mapping[str, Any]) -> TokenLayout:
    """The id layout of the Hugging Face tokenizer that feeds a built-in text transformer.

    Synthetic ids only need the right shape: special ids where the pooling ('last', 'eos' with
    text_cfg.eos_id, 'argmax') reads them, ordinary pieces elsewhere.
    """
    vocab = int(text_cfg.get("vocab_size", 49408))
    name = str(text_cfg.get("hf_tokenizer_name", "")).lower()
    kwargs = text_cfg.get("tokenizer_kwargs") or {}
    if kwargs.get("strip_sep_token") or "bert" in name:
        return TokenLayout(pad_id=0, eos_id=0, first_id=BERT_CLS, piece_end=min(vocab, BERT_VOCAB))
    if text_cfg.get("pool_type") == "eos":
        eos = int(text_cfg.get("eos_id", 2))
        if "t5" in name:  # mT5's SentencePiece (worldwide ViT-L): <pad>=0 </s>=1, no BOS
            return TokenLayout(0, eos, None, MT5_PIECES if vocab == MT5_VOCAB_SIZE else vocab)
        return TokenLayout(XLMR_PAD, eos, XLMR_BOS, vocab)
    if "siglip2" in name:
        return TokenLayout(GEMMA_PAD, GEMMA_EOS, None, vocab)
    if "siglip" in name:
        return TokenLayout(SIGLIP_PAD_EOS, SIGLIP_PAD_EOS, None, vocab)
    # an unknown tokenizer (a local-dir model): the ids its text_cfg names, EOS then padding
    return TokenLayout(int(text_cfg.get("pad_id", 0)), int(text_cfg.get("eos_id", 2)), None, vocab)


def load_builtin_tokenizer(name: str, text_cfg: Mapping[str, Any], local_dir: Path | None) -> tuple[Any, str]:
    """open_clip's own tokenizer for a built-in text transformer when it loads offline; else synthetic ids.

    As open_clip.get_tokenizer does: a `local-dir:` model's tokenizer files sit in its directory,
    a built-in model's come from text_cfg.hf_tokenizer_name (the hub cache, offline).
    """
    source = str(local_dir) if local_dir is not None else str(text_cfg["hf_tokenizer_name"])
    context_length = int(text_cfg.get("context_length", 77))
    kwargs = {k: v for k, v in (text_cfg.get("tokenizer_kwargs") or {}).items()}
    if text_cfg.get("tokenizer_mode"):
        kwargs["tokenizer_mode"] = text_cfg["tokenizer_mode"]
    if local_dir is None:
        # the hub cache only: a machine without network would otherwise wait out the hub's retries
        kwargs["local_files_only"] = True
    tokenizer, cause = _real_tokenizer(source, context_length, kwargs)
    if tokenizer is not None:
        return tokenizer, f"tokenizer {source} (open_clip's HFTokenizer, found offline)"
    layout = builtin_token_layout(text_cfg)
    synthetic = SyntheticTokenizer(int(text_cfg.get("vocab_size", 49408)), context_length, layout)
    return synthetic, (
        f"tokenizer {source} is not available offline ({cause}); parity uses synthetic token ids and the "
        f"artifact has no tokenizer (to use it, put it in the Hugging Face cache, or build {name} as a "
        "local-dir: model whose directory holds the tokenizer files)"
    )
