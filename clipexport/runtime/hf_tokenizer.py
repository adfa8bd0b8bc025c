"""Hugging Face tokenizers (XLM-R, RoBERTa, ...) from the `tokenizer.json` a build copied, without torch.

Same ids as open_clip's HFTokenizer: its default whitespace cleaning, then the fast tokenizer
with truncation to the context length and right padding with the pad id.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from clipexport.errors import ArtifactError, InputError
from clipexport.runtime.tokenizer import MAX_TEXT_CHARS, TextTruncatedWarning, _clean_whitespace, as_text_list


class HFRuntimeTokenizer:
    kind = "hf"

    def __init__(self, tokenizer_json: Path, context_length: int, pad_token_id: int) -> None:
        from tokenizers import Tokenizer

        if not tokenizer_json.is_file():
            raise ArtifactError(f"{tokenizer_json} is missing: the artifact's Hugging Face tokenizer needs it")
        self._tokenizer = Tokenizer.from_file(str(tokenizer_json))
        self._tokenizer.enable_truncation(max_length=context_length)
        pad_token = self._tokenizer.id_to_token(pad_token_id) or "<pad>"
        self._tokenizer.enable_padding(length=context_length, pad_id=pad_token_id, pad_token=pad_token)
        self.context_length = context_length
        self.pad_token_id = pad_token_id
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_manifest(cls, directory: Path, section: Mapping[str, Any]) -> "HFRuntimeTokenizer":
        return cls(Path(directory) / section.get("directory", "tokenizer") / "tokenizer.json",
                   int(section.get("context_length", 77)), int(section["pad_token_id"]))

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """Texts -> int64 [N, context_length]."""
        items = as_text_list(texts)
        for text in items:
            # The fast tokenizer is linear (~1.4 s per MB here) but reads all of a text before
            # truncating: the same bound as the BPE tokenizer keeps a service's work per text finite.
            if len(text) > MAX_TEXT_CHARS:
                raise InputError(f"text of {len(text):,} characters is over the tokenizer's limit of "
                                 f"{MAX_TEXT_CHARS:,}; only the first {self.context_length} tokens are used anyway")
        cleaned = [_clean_whitespace(t) for t in items]
        encodings = self._tokenizer.encode_batch(cleaned)
        cut = sum(bool(e.overflowing) for e in encodings)
        if cut:
            warnings.warn(f"{cut} text(s) longer than the context of {self.context_length} tokens were truncated",
                          TextTruncatedWarning, stacklevel=2)
        return np.asarray([e.ids for e in encodings], dtype=np.int64).reshape(len(cleaned), self.context_length)
