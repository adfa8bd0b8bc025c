"""The runtime's CLIP BPE tokenizer vs open_clip's, id for id, on varied texts."""

from __future__ import annotations

import gzip
import random
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from clipexport.errors import ArtifactError, InputError, UnsupportedModelError
from clipexport.prompts import PARITY_PROMPTS
from clipexport.runtime.tokenizer import MAX_TEXT_CHARS, MAX_WORD_BYTES, ClipTokenizer, TextTruncatedWarning
from clipexport.tokenizer_assets import write_tokenizer_assets

open_clip = pytest.importorskip("open_clip")
from open_clip.tokenizer import SimpleTokenizer

# Written for this test: each line aims at one part of the pipeline.
HAND_WRITTEN = [
    "",
    " ",
    "\t\n  \u3000",
    "a",
    "A photo of a Dog.",
    "an IMAGE of TWO cats, sitting on a mat",
    "it's what they'll say; we've been told you'd know I'm here, can't you?",
    "IT'S THEY'LL WE'VE",
    "3.14159 is pi, 1,000,000 is a million, 2026-11-25",
    "call +1 (555) 010-9999 or mail someone@example.org",
    "https://example.com/path?q=a+b&x=1#frag",
    "snake_case and kebab-case and CamelCase and x__y",
    "tom &amp; jerry &lt;3 &quot;quoted&quot; &#39;single&#39; &#x1F600; &nbsp;space &amp;amp; twice",
    "<b>bold</b> &lt;i&gt;escaped tags&lt;/i&gt;",
    "cafÃ© crÃ¨me and naÃ¯ve rÃ©sumÃ©",  # UTF-8 read as Latin-1: ftfy repairs it
    "The Mona Lisa doesnâ€™t have eyebrows.",  # cp1252 mojibake of a curly apostrophe
    "ＦＵＬＬＷＩＤＴＨ ｌｅｔｔｅｒｓ and ligatures ﬁ ﬂ",
    "ǅemal Ǉubljana ß straße İstanbul ı",
    "Ⅻ ⅻ ① ½ ² ٣ ४ 〇",
    "\u0345 ypogegrammeni alone, ᾳ with it, ς final sigma",
    "東京タワーの夜景、とても綺麗でした。",
    "北京烤鸭和上海小笼包",
    "한국어 문장도 토큰화됩니다",
    "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "مرحبا بالعالم، هذه جملة عربية",
    "שלום עולם",
    "नमस्ते दुनिया, यह हिंदी है",
    "สวัสดีชาวโลก",
    "Ελληνικά γράμματα: αβγδε ΑΒΓΔΕ",
    "emoji 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️ 🇫🇷",
    "zero\u200bwidth\u200cjoiners\u200d and soft\u00adhyphen",
    "e\u0301 vs \u00e9, n\u0303 vs \u00f1",
    "control\x00chars\x07here\x1b[0m and DEL\x7f",
    "tabs\tand\nnewlines\r\nand\u2028line separators",
    "<start_of_text> inside text <end_of_text> and <START_OF_TEXT>",
    "!!!???...,,,;;;::: ---- ____ **** ####",
    "a" * 300,
    "word " * 100,
    "🙂" * 90,
    " ".join(f"token{i}" for i in range(80)),
]


def _random_texts(n: int, seed: int) -> list[str]:
    """Texts mixing scripts, emoji, marks, digits, entities, mojibake and English-like words."""
    rng = random.Random(seed)
    blocks = [
        (0x20, 0x7E), (0xA0, 0xFF), (0x100, 0x17F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x5FF),
        (0x600, 0x6FF), (0x900, 0x97F), (0xE00, 0xE7F), (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xAD00),
        (0x1F300, 0x1F64F), (0x1F900, 0x1F9FF), (0x2000, 0x206F), (0x2150, 0x218F), (0x300, 0x36F),
        (0xFF00, 0xFFEF), (0x2600, 0x26FF), (0x1D400, 0x1D4FF),
    ]
    syllables = ["the", "ing", "photo", "cat", "dog", "a", "of", "on", "re", "tion", "blue", "sky", "un", "ly",
                 "house", "tree", "water", "er", "est", "s", "'s", "n't", "'ll", "x", "q", "zz", "th", "ph"]
    entities = ["&amp;", "&lt;", "&gt;", "&quot;", "&#39;", "&#x263A;", "&nbsp;", "&amp;amp;", "&copy;", "&euro;"]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 30)):
            kind = rng.random()
            if kind < 0.45:
                word = "".join(rng.choice(syllables) for _ in range(rng.randint(1, 4)))
                parts.append(word.upper() if rng.random() < 0.1 else word)
            elif kind < 0.8:
                lo, hi = rng.choice(blocks)
                parts.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 6))))
            elif kind < 0.88:
                parts.append(rng.choice(entities))
            elif kind < 0.94:
                word = "".join(chr(rng.randint(0xC0, 0x24F)) for _ in range(rng.randint(1, 4)))
                parts.append(word.encode("utf-8").decode("latin-1"))  # mojibake
            else:
                parts.append(str(rng.randint(0, 10**6)))
        sep = rng.choice([" ", " ", " ", "", "  ", "\t", "\n", ", "])
        out.append(sep.join(parts))
    return out


def _reference_with(text_cfg: dict) -> SimpleNamespace:
    """What write_tokenizer_assets reads of a ReferenceModel: the text config, and no HF tokenizer."""
    return SimpleNamespace(model_cfg={"text_cfg": text_cfg}, text_tokenizer=None)


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The tokenizer files and manifest section exactly as a build writes them."""
    directory = tmp_path_factory.mktemp("tok")
    section, _ = write_tokenizer_assets(_reference_with({"context_length": 77}), directory)
    return directory, section


@pytest.fixture(scope="module")
def ours(vocab_dir) -> ClipTokenizer:
    return ClipTokenizer.from_manifest(*vocab_dir)


def _compare(ours_tok, ref_tok, texts: list[str]) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TextTruncatedWarning)
        got = ours_tok(texts)
    expected = ref_tok(texts).numpy()
    assert got.dtype == np.int64 and got.shape == expected.shape
    mismatched_rows = int((got != expected).any(axis=1).sum())
    return mismatched_rows


def test_hand_written_texts_match_open_clip(ours: ClipTokenizer) -> None:
    texts = HAND_WRITTEN + list(PARITY_PROMPTS)
    assert _compare(ours, open_clip.get_tokenizer("ViT-B-32"), texts) == 0


def test_random_texts_match_open_clip(ours: ClipTokenizer) -> None:
    texts = _random_texts(3000, seed=1234)
    assert _compare(ours, SimpleTokenizer(), texts) == 0


@pytest.mark.parametrize("clean", ["canonicalize", "whitespace", "lower"])
def test_clean_modes_match_open_clip(vocab_dir, clean: str) -> None:
    directory, section = vocab_dir
    tok = ClipTokenizer.from_manifest(directory, {**section, "kwargs": {"clean": clean}})
    texts = HAND_WRITTEN + _random_texts(500, seed=99)
    assert _compare(tok, SimpleTokenizer(clean=clean), texts) == 0


@pytest.mark.parametrize("clean", ["canonicalize", "whitespace"])
def test_config_kwargs_reach_the_manifest_and_the_runtime(tmp_path: Path, clean: str) -> None:
    """A model config's tokenizer_kwargs -> build's manifest section -> runtime, vs open_clip.get_tokenizer."""
    import json

    text_cfg = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                "tokenizer_kwargs": {"clean": clean}}
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": {"embed_dim": 8, "vision_cfg": {"image_size": 32, "layers": 1, "width": 16,
                                                      "patch_size": 16}, "text_cfg": text_cfg}}))
    section, _ = write_tokenizer_assets(_reference_with(text_cfg), tmp_path)
    assert section["kwargs"] == {"clean": clean}
    tok = ClipTokenizer.from_manifest(tmp_path, section)
    assert _compare(tok, open_clip.get_tokenizer(f"local-dir:{model_dir}"), HAND_WRITTEN) == 0


@pytest.mark.parametrize("context_length", [2, 5, 16, 32])
def test_other_context_lengths_truncate_like_open_clip(vocab_dir, context_length: int) -> None:
    directory, section = vocab_dir
    tok = ClipTokenizer.from_manifest(directory, {**section, "context_length": context_length})
    assert _compare(tok, SimpleTokenizer(context_length=context_length), HAND_WRITTEN) == 0


def test_additional_special_tokens(vocab_dir) -> None:
    directory, section = vocab_dir
    extra = ["<mask>", "<sep>"]
    tok = ClipTokenizer.from_manifest(directory, {**section, "kwargs": {"additional_special_tokens": extra}})
    texts = ["a <mask> on a <sep> mat", "<MASK>", "no specials"]
    assert _compare(tok, SimpleTokenizer(additional_special_tokens=extra), texts) == 0
    assert tok.vocab_size == 49410


def test_truncation_keeps_eot_and_warns(ours: ClipTokenizer) -> None:
    with pytest.warns(TextTruncatedWarning, match="1 of 2 texts"):
        ids = ours(["word " * 100, "short"])
    assert ids[0, 0] == 49406 and ids[0, -1] == 49407 and (ids[0] != 0).all()
    assert ids[1].tolist()[:3] == [49406, 3005, 49407] and not ids[1, 3:].any()  # "short</w>"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exactly full (75 words + SOT + EOT) does not warn
        ours(["a " * 75])


def test_encode_decode_round_trip(ours: ClipTokenizer) -> None:
    ids = ours(["Hello, World! café 🍕"])[0]
    assert ours.decode(ids) == "<start_of_text>hello , world ! café 🍕 <end_of_text>"


def test_single_string_empty_list_and_bad_types(ours: ClipTokenizer) -> None:
    assert ours("a dog").shape == (1, 77)
    empty = ours([])
    assert empty.shape == (0, 77) and empty.dtype == np.int64
    for bad in (None, 42, b"bytes", {"a"}):
        with pytest.raises(InputError, match="texts: expected a string or a list"):
            ours(bad)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="text 1: expected a string, got int"):
        ours(["fine", 3])  # type: ignore[list-item]
    with pytest.raises(InputError, match="text 0: expected a string, got NoneType"):
        ours([None])  # type: ignore[list-item]


def test_unsupported_settings_and_corrupt_vocab(vocab_dir, tmp_path: Path) -> None:
    directory, section = vocab_dir
    with pytest.raises(UnsupportedModelError, match="reduction_mask"):
        ClipTokenizer.from_manifest(directory, {**section, "kwargs": {"reduction_mask": "random"}})
    with pytest.raises(UnsupportedModelError, match="strip_sep_token"):
        ClipTokenizer.from_manifest(directory, {**section, "kwargs": {"strip_sep_token": True}})
    with pytest.raises(UnsupportedModelError, match="clean mode"):
        ClipTokenizer.from_manifest(directory, {**section, "kwargs": {"clean": "shout"}})
    with pytest.raises(UnsupportedModelError, match="kind"):
        ClipTokenizer.from_manifest(directory, {**section, "kind": "hf"})
    short = tmp_path / "tokenizer" / "bpe.txt.gz"
    short.parent.mkdir()
    with gzip.open(short, "wt", encoding="utf-8") as fh:
        fh.write("#version: 0.2\ni n\nt h\n")
    with pytest.raises(ArtifactError, match="fewer than"):
        ClipTokenizer.from_manifest(tmp_path, {**section, "vocab": "tokenizer/bpe.txt.gz"})
    (tmp_path / "tokenizer" / "broken.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ArtifactError, match="cannot read"):
        ClipTokenizer.from_manifest(tmp_path, {**section, "vocab": "tokenizer/broken.gz"})
    with pytest.raises(ArtifactError, match="eot_token_id"):
        ClipTokenizer.from_manifest(directory, {**section, "eot_token_id": 49408})


# -- bounded work on untrusted text (issue 15) ---------------------------------------------------

def _adversarial_words(seed: int) -> list[str]:
    """Words that stress the order of merges: repeats (odd/even runs), repeated pairs, overlaps, unicode."""
    rng = random.Random(seed)
    units = ["a", "ab", "aab", "abb", "the", "ing", "e", "ee", "l", "ll", "ss", "thethe", "an", "😀", "é", "哈",
             "0", "!", "..", "ŋ", "\u0301"]
    words = [unit * n for n in range(1, 70) for unit in units]
    alphabets = ["ab", "abc", "aeiou", "thing", "abcdefghijklmnopqrstuvwxyz", "éèa", "😀😃a", "漢字かな", "ssst"]
    for _ in range(1500):
        alphabet = rng.choice(alphabets)
        words.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 300))))
    return words


def test_heap_bpe_matches_open_clip_word_for_word(ours: ClipTokenizer) -> None:
    """encode() without a limit: every id of every word, so any difference in merge order shows."""
    ref = SimpleTokenizer()
    words = _adversarial_words(0)
    mismatched = [w for w in words if ours.encode(w) != ref.encode(w)]
    assert mismatched == [], f"{len(mismatched)} of {len(words)} words differ, e.g. {mismatched[0][:40]!r}"


def test_long_texts_truncate_like_open_clip(ours: ClipTokenizer) -> None:
    rng = random.Random(3)
    texts = [" ".join(_random_texts(60, k)) for k in range(20)]
    texts += ["".join(rng.choice("abcdefghij") for _ in range(3000)), "a" * 5001, "ab" * 2000 + " tail words",
              "short start " + "x" * 4000, "😀" * 3000, " ".join(_adversarial_words(1)[:400])]
    assert _compare(ours, open_clip.get_tokenizer("ViT-B-32"), texts) == 0


class _CountingTokenizer(ClipTokenizer):
    """Counts the words that reach BPE (the lru cache calls _merge_word once per distinct word)."""

    merged_words = 0

    def _merge_word(self, word: str) -> tuple[int, ...]:
        self.merged_words += 1
        return super()._merge_word(word)


def test_only_the_words_that_fit_the_context_are_merged(vocab_dir) -> None:
    """A 1 MB text of distinct words costs the BPE of the words the context keeps, not 150,000 words."""
    counting = _CountingTokenizer.from_manifest(*vocab_dir)
    rng = random.Random(5)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 10)))
             for _ in range(160_000)]
    text = " ".join(words)[:1_000_000]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TextTruncatedWarning)
        got = counting([text])
    assert counting.merged_words <= counting.context_length
    # the same ids as open_clip on the part it needs to see (open_clip merges every word of the MB)
    expected = open_clip.get_tokenizer("ViT-B-32")([" ".join(words[:200])]).numpy()
    np.testing.assert_array_equal(got, expected)


def test_huge_word_and_text_tokenize_with_bounded_work(vocab_dir) -> None:
    """A 200,000-letter word (open_clip's quadratic loop: minutes) and 1 MB texts, in a child with a
    generous limit: no timing assertion, the old loop exceeds 60 s by far, the heap takes ~1-2 s."""
    directory, section = vocab_dir
    script = textwrap.dedent(f"""
        import random, warnings
        from pathlib import Path
        from clipexport.runtime.tokenizer import ClipTokenizer
        tok = ClipTokenizer.from_manifest(Path({str(directory)!r}), {section!r})
        rng = random.Random(0)
        warnings.simplefilter("ignore")
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(200_000))
        words = " ".join("".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 12))) for _ in range(170_000))
        for text in (word, "a" * 200_000, words[:1_000_000], "photo " + word[:150_000] + " " + words[:800_000]):
            ids = tok([text])
            assert ids.shape == (1, 77) and ids[0, -1] == tok.eot_token_id
        print("ok", len(tok.encode(word)))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ok ") and int(done.stdout.split()[1]) > 20_000  # the whole word was merged


def test_texts_over_the_limits_are_refused_in_one_line(ours: ClipTokenizer) -> None:
    with pytest.raises(InputError, match=f"over the tokenizer's limit of {MAX_TEXT_CHARS:,}"):
        ours(["a " * (MAX_TEXT_CHARS // 2 + 1)])
    with pytest.raises(InputError, match=f"limit of {MAX_WORD_BYTES:,} bytes per word"):
        ours(["photo of " + "é" * (MAX_WORD_BYTES // 2 + 1)])
    # a huge word the context never reaches is not merged, so not refused: open_clip's ids stand
    text = " ".join(["word"] * 100) + " " + "z" * (MAX_WORD_BYTES + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TextTruncatedWarning)
        got = ours([text])
    np.testing.assert_array_equal(got, open_clip.get_tokenizer("ViT-B-32")([" ".join(["word"] * 100)]).numpy())


def test_hf_tokenizer_bounds_text_size(tmp_path: Path) -> None:
    """The Hugging Face path (Rust, linear): a 100,000-letter word and 1 MB pass; over the limit is refused."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from clipexport.runtime.hf_tokenizer import HFRuntimeTokenizer

    rng = random.Random(0)
    corpus = [" ".join("".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(1, 9))) for _ in range(50))
              for _ in range(200)]
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<unk>"]))
    core.save(str(tmp_path / "tokenizer.json"))
    hf = HFRuntimeTokenizer(tmp_path / "tokenizer.json", 77, 0)
    word = "".join(rng.choice("abcdefghijklmnop") for _ in range(100_000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TextTruncatedWarning)
        for text in (word, " ".join(corpus * 100)[:1_000_000]):
            ids = hf([text])
            assert ids.shape == (1, 77) and (ids != 0).all()
    with pytest.raises(InputError, match=f"limit of {MAX_TEXT_CHARS:,}"):
        hf(["a " * (MAX_TEXT_CHARS // 2 + 1)])
