"""CLIP's byte-level BPE tokenizer, giving the same ids as `open_clip.get_tokenizer(model)`, without torch.

Text -> ids in four steps:

1. clean:   ftfy.fix_text, HTML-unescape twice, strip; then by mode (manifest tokenizer.kwargs.clean):
            lower (default)  collapse whitespace, lowercase
            whitespace       collapse whitespace
            canonicalize     '_' -> ' ', drop ASCII punctuation, lowercase, collapse whitespace
2. split:   special tokens, English contractions ('s 't 're 've 'm 'll 'd), runs of letters,
            single digits, runs of anything else; whitespace is dropped. Case-insensitive, as
            open_clip compiles it (this matters for marks that case-fold to letters).
3. bytes:   each piece's UTF-8 bytes become printable characters (one per byte), so any text
            has a spelling in the base alphabet; the last character of a piece carries '</w>'.
4. merge:   repeatedly merge the adjacent pair that comes first in the vocabulary's merge list,
            all its non-overlapping occurrences left to right, until no listed pair remains.

Work is bounded for untrusted text: merging (step 4) is O(n log n) per word and stops once
the context is full; a text over MAX_TEXT_CHARS characters, or a kept word over MAX_WORD_BYTES
UTF-8 bytes, is refused with an InputError (ids are otherwise exactly open_clip's).

Then [SOT] + ids + [EOT], zero-padded to the context length. A text longer than the context
is cut to `context_length` tokens and its last token replaced by EOT (as open_clip does),
with a TextTruncatedWarning.
"""

from __future__ import annotations

import functools
import gzip
import heapq
import html
import string
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipexport.errors import ArtifactError, InputError, UnsupportedModelError

END_OF_WORD = "</w>"
SOT = "<start_of_text>"
EOT = "<end_of_text>"
# Token-id cache per tokenizer: bounded so memory stays flat however many distinct words a service sees.
WORD_CACHE_SIZE = 1 << 16
# Work bounds (a service tokenizes untrusted text). BPE stops once the kept tokens are known,
# so only the words that reach the context are merged, each in O(n log n); what remains is
# linear: cleaning and splitting read the whole text, and one word's BPE reads the whole word.
# Longest text accepted, in characters (1 MB of text tokenizes in well under a second):
MAX_TEXT_CHARS = 2_000_000
# Longest single word (a run of letters, or of other non-space marks) merged, in UTF-8 bytes:
# ~1-2 s of BPE here. open_clip's own loop needs ~46 s for 100 KB and grows quadratically.
MAX_WORD_BYTES = 256 * 1024


class TextTruncatedWarning(UserWarning):
    """A text was longer than the context and was cut (its last token became EOT)."""


def byte_alphabet() -> list[tuple[int, str]]:
    """(byte, character) for all 256 bytes, in vocabulary order.

    Bytes that are visible Latin-1 characters stand for themselves; the other 68 (controls,
    space, NBSP, soft hyphen...) get the characters from U+0100 upwards, in byte order. The
    vocabulary lists the visible ones first, then the others.
    """
    visible = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    hidden = sorted(set(range(256)) - set(visible))
    return [(b, chr(b)) for b in visible] + [(b, chr(0x100 + k)) for k, b in enumerate(hidden)]


def _basic_clean(text: str) -> str:
    import ftfy

    text = ftfy.fix_text(text)
    # Twice: captions scraped from the web are often escaped twice (&amp;amp;).
    text = html.unescape(html.unescape(text))
    return text.strip()


def _collapse_whitespace(text: str) -> str:
    return " ".join(text.split())


_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _clean_lower(text: str) -> str:
    return _collapse_whitespace(_basic_clean(text)).lower()


def _clean_whitespace(text: str) -> str:
    return _collapse_whitespace(_basic_clean(text))


def _clean_canonicalize(text: str) -> str:
    text = _basic_clean(text).replace("_", " ").translate(_PUNCTUATION).lower()
    return _collapse_whitespace(text)


CLEAN_MODES: dict[str, Callable[[str], str]] = {
    "lower": _clean_lower,
    "whitespace": _clean_whitespace,
    "canonicalize": _clean_canonicalize,
}


class ClipTokenizer:
    """texts -> int64 [N, context_length], the ids open_clip's SimpleTokenizer gives.

    Thread-safe: the vocabulary is read-only after construction and the word cache is an
    lru_cache (which locks internally).
    """

    def __init__(
        self,
        vocab_path: Path | str,
        context_length: int = 77,
        clean: str = "lower",
        additional_special_tokens: Sequence[str] = (),
        sot_token_id: int | None = None,
        eot_token_id: int | None = None,
    ) -> None:
        import regex

        if clean not in CLEAN_MODES:
            raise UnsupportedModelError(f"tokenizer clean mode {clean!r}: expected one of {', '.join(CLEAN_MODES)}")
        if context_length < 2:
            raise ArtifactError(f"tokenizer context_length {context_length}: needs room for SOT and EOT")
        self.context_length = int(context_length)
        self.clean_mode = clean
        self._clean = CLEAN_MODES[clean]

        alphabet = byte_alphabet()
        self._byte_chars = [""] * 256
        for byte, char in alphabet:
            self._byte_chars[byte] = char
        symbols = [char for _, char in alphabet]
        tokens = symbols + [s + END_OF_WORD for s in symbols]
        # CLIP uses the first (SOT id - 512) merges of the file: ids are bytes (256), bytes at the
        # end of a word (256), one per merge, then the special tokens.
        n_merges = (sot_token_id if sot_token_id is not None else 49406) - len(tokens)
        merges = _read_merges(Path(vocab_path), n_merges)
        self._ranks: dict[tuple[str, str], int] = {pair: rank for rank, pair in enumerate(merges)}
        tokens += [a + b for a, b in merges]
        self.special_tokens = [SOT, EOT, *additional_special_tokens]
        tokens += self.special_tokens
        self._ids = {tok: i for i, tok in enumerate(tokens)}
        self._tokens = tokens
        self.sot_token_id = self._ids[SOT]
        self.eot_token_id = self._ids[EOT]
        for name, expected, actual in (("sot", sot_token_id, self.sot_token_id),
                                       ("eot", eot_token_id, self.eot_token_id)):
            if expected is not None and expected != actual:
                raise ArtifactError(f"tokenizer {name}_token_id is {expected} in the manifest but {actual} in "
                                    f"the vocabulary {vocab_path}")
        self.vocab_size = len(tokens)
        specials = "|".join(regex.escape(t) for t in self.special_tokens)
        self._pattern = regex.compile(
            specials + r"|'(?:s|t|re|ve|m|ll|d)|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+",
            regex.IGNORECASE,
        )
        self._special_ids = {t: self._ids[t] for t in self.special_tokens}
        self._word_ids = functools.lru_cache(maxsize=WORD_CACHE_SIZE)(self._merge_word)

    @classmethod
    def from_manifest(cls, directory: Path, section: Mapping[str, Any]) -> ClipTokenizer:
        """Build from the manifest's `tokenizer` section and the vocabulary the build copied."""
        kind = section.get("kind")
        if kind != "clip-bpe":
            raise UnsupportedModelError(f"tokenizer kind {kind!r}: this runtime reads 'clip-bpe' only")
        if "vocab" not in section:
            raise ArtifactError("manifest tokenizer section lacks 'vocab'")
        kwargs = dict(section.get("kwargs") or {})
        clean = kwargs.pop("clean", "lower")
        extra = kwargs.pop("additional_special_tokens", None) or ()
        context_length = int(section.get("context_length", 77))
        if kwargs.pop("reduction_mask", ""):
            # open_clip's reduction masks drop tokens at random: a training-time augmentation.
            raise UnsupportedModelError("tokenizer reduction_mask is random (training only); not supported")
        if kwargs:
            raise UnsupportedModelError(f"tokenizer kwargs {sorted(kwargs)} are not supported by this runtime")
        return cls(
            Path(directory) / section["vocab"],
            context_length=context_length,
            clean=clean,
            additional_special_tokens=list(extra),
            sot_token_id=section.get("sot_token_id"),
            eot_token_id=section.get("eot_token_id"),
        )

    # -- text -> ids -------------------------------------------------------------------------

    def encode(self, text: str, limit: int | None = None) -> list[int]:
        """One text -> its BPE ids, without SOT/EOT.

        With `limit`, words are tokenized only until `limit` ids are known: the ids returned are
        then the first `limit` (or more) of the full result, and the rest of the text costs no BPE
        work (truncation keeps only the first ids, so a huge text costs what its kept part costs).
        """
        if len(text) > MAX_TEXT_CHARS:
            raise InputError(f"text of {len(text):,} characters is over the tokenizer's limit of "
                             f"{MAX_TEXT_CHARS:,}; only the first {self.context_length} tokens are used anyway")
        ids: list[int] = []
        for match in self._pattern.finditer(self._clean(text)):
            if limit is not None and len(ids) >= limit:
                break
            piece = match.group()
            special = self._special_ids.get(piece)
            if special is not None:
                ids.append(special)
                continue
            data = piece.encode("utf-8")
            if len(data) > MAX_WORD_BYTES:
                raise InputError(f"text has a word of {len(data):,} bytes without spaces, over the tokenizer's "
                                 f"limit of {MAX_WORD_BYTES:,} bytes per word")
            word = "".join(self._byte_chars[b] for b in data)
            ids.extend(self._word_ids(word))
        return ids

    def _merge_word(self, word: str) -> tuple[int, ...]:
        """BPE of one word (its byte characters): the ids of its parts once no listed pair remains.

        The classic loop (find the lowest-ranked adjacent pair, merge all its non-overlapping
        occurrences left to right, repeat) is quadratic: a 100,000-character word took 46 s.
        This does the same rounds with a heap of (rank, position) over adjacent pairs in a linked
        list, O(n log n): each round takes every queued pair of the lowest rank, merges them in
        position order (skipping any whose left or right part was already consumed this round,
        exactly the classic left-to-right scan), and only then queues the pairs the merges created.
        """
        parts = list(word[:-1]) + [word[-1] + END_OF_WORD]  # "" marks a part merged into its left
        n = len(parts)
        ranks = self._ranks
        nxt = list(range(1, n + 1))  # n = end
        prv = list(range(-1, n - 1))
        heap: list[tuple[int, int, str, str]] = []
        for i in range(n - 1):
            a, b = parts[i], parts[i + 1]
            rank = ranks.get((a, b))
            if rank is not None:
                heap.append((rank, i, a, b))
        heapq.heapify(heap)
        while heap:
            rank = heap[0][0]
            round_: list[tuple[int, int, str, str]] = []
            while heap and heap[0][0] == rank:
                round_.append(heapq.heappop(heap))
            created: list[int] = []
            for _, i, a, b in round_:  # popped in position order: (rank, position) is the heap key
                j = nxt[i]
                if parts[i] != a or j >= n or parts[j] != b:
                    continue  # stale: a part of this pair was merged into something else
                parts[i] = a + b
                parts[j] = ""
                nxt[i] = nxt[j]
                if nxt[j] < n:
                    prv[nxt[j]] = i
                created.append(i)
            for i in created:
                if not parts[i]:
                    continue
                for left in (prv[i], i):
                    if left < 0:
                        continue
                    right = nxt[left]
                    if right >= n or not parts[left]:
                        continue
                    pair = (parts[left], parts[right])
                    new_rank = ranks.get(pair)
                    if new_rank is not None:
                        heapq.heappush(heap, (new_rank, left, pair[0], pair[1]))
        return tuple(self._ids[p] for p in parts if p)

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        """texts (one string or a sequence) -> int64 [N, context_length], zero-padded."""
        items = as_text_list(texts)
        length = int(context_length or self.context_length)
        if length < 2:
            raise InputError(f"context_length {length}: needs room for SOT and EOT")
        out = np.zeros((len(items), length), dtype=np.int64)
        truncated = 0
        for row, text in enumerate(items):
            # length - 1 ids are enough to know the text is cut and what is kept of it.
            ids = [self.sot_token_id, *self.encode(text, limit=length - 1), self.eot_token_id]
            if len(ids) > length:
                truncated += 1
                ids = ids[:length]
                ids[-1] = self.eot_token_id
            out[row, : len(ids)] = ids
        if truncated:
            warnings.warn(
                f"{truncated} of {len(items)} texts are longer than the context of {length} tokens; "
                "they were cut and end with EOT, as open_clip does",
                TextTruncatedWarning,
                stacklevel=2,
            )
        return out

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """ids -> text (special tokens kept, '</w>' as a space, padding zeros dropped after EOT)."""
        decoder = {char: byte for byte, char in byte_alphabet()}
        pieces = []
        for i in np.asarray(ids, dtype=np.int64).ravel().tolist():
            if not 0 <= i < self.vocab_size:
                raise InputError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
            pieces.append(self._tokens[i])
            if i == self.eot_token_id:
                break
        out = bytearray()
        text = []
        for piece in pieces:
            if piece in self._special_ids:
                text.append(out.decode("utf-8", errors="replace") + piece)
                out = bytearray()
                continue
            body = piece.removesuffix(END_OF_WORD)
            out.extend(decoder[c] for c in body)
            if piece.endswith(END_OF_WORD):
                out.extend(b" ")
        text.append(out.decode("utf-8", errors="replace"))
        return "".join(text)


def unpadded_lengths(ids: np.ndarray, pad_id: int = 0) -> np.ndarray:
    """Per row of right-padded ids [N, L]: the index after its last non-pad id (0 for an all-pad row).

    For CLIP BPE ids (pad 0) that is the EOT position + 1. Exact trimming of a batch keeps
    the maximum of these columns (the runtime and parity both cut that way).
    """
    used = ids != pad_id
    return np.where(used.any(axis=1), ids.shape[1] - np.argmax(used[:, ::-1], axis=1), 0)


def as_text_list(texts: str | Sequence[str]) -> list[str]:
    """One string or a list/tuple of strings -> a list; anything else is an InputError."""
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, (list, tuple)):
        raise InputError(f"texts: expected a string or a list of strings, got {type(texts).__name__}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"text {i}: expected a string, got {type(text).__name__} ({text!r:.60})")
    return list(texts)


def _read_merges(path: Path, count: int) -> list[tuple[str, str]]:
    """The first `count` merges of a CLIP BPE file (gzip; line 1 is a version header)."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            fh.readline()
            lines = [fh.readline() for _ in range(count)]
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"cannot read the BPE vocabulary {path}: {exc}") from None
    merges = []
    for number, line in enumerate(lines, start=2):
        parts = line.split()
        if len(parts) != 2:
            raise ArtifactError(f"{path} line {number}: expected a merge 'a b', got {line.strip()!r} "
                                f"(the file has fewer than {count} merges or is corrupt)")
        merges.append((parts[0], parts[1]))
    return merges


__all__ = ["ClipTokenizer", "TextTruncatedWarning", "as_text_list", "byte_alphabet"]
