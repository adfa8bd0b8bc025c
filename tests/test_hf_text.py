"""Hugging Face text towers (XLM-R, mT5, NLLB) built offline: parity, padding mask, tokenizer or its absence."""

from __future__ import annotations

import json
import os
import time
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import clipexport
from clipexport.build import BuildOptions, build
from clipexport.cli import cli
from clipexport.errors import InputError
from clipexport.models import load_reference
from twins import HF_TEXT_TWINS, write_hf_text_twin, write_twin

TEXTS = ["a photo of a dog", "  Une   photo d'un café à Paris ", "", "a " * 100, "zebra and other unknown words",
         "two people on the sea at night"]


@pytest.fixture(scope="module")
def hf_artifact(tmp_path_factory):
    model = write_twin("hf_text", tmp_path_factory.mktemp("hf-twin"))
    result = build(BuildOptions(model=model, pretrained="none", out=tmp_path_factory.mktemp("art") / "hf"))
    return model, result


def test_build_passes_with_the_local_tokenizer(hf_artifact):
    model, result = hf_artifact
    manifest = result.manifest
    assert manifest["recipe"] == "hf_text" and manifest["families"]["text"] == "hf-text"
    assert manifest["tokenizer"]["kind"] == "hf" and "tokenizer/tokenizer.json" in manifest["files"]
    # a dynamic sequence axis: the runtime cuts batches after their longest unpadded row
    assert manifest["towers"]["text"]["inputs"] == [{"name": "input_ids", "dtype": "int64",
                                                     "shape": ["batch", "sequence"]}]
    assert manifest["towers"]["text"]["sequence"]["pad_id"] == 1
    for parity in result.parity.values():
        assert parity.passed and parity.cosine_min >= 0.99999 and parity.max_rel_err <= 1e-4


def test_runtime_tokens_and_embeddings_match_open_clip(hf_artifact):
    from open_clip.tokenizer import HFTokenizer

    model, result = hf_artifact
    directory = model.split(":", 1)[1]
    reference_ids = HFTokenizer(f"{directory}/text-model", context_length=77)(TEXTS).numpy()
    rt = clipexport.load(result.out_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = rt.tokenize(TEXTS)
    assert np.array_equal(ids, reference_ids)
    assert any("truncated" in str(w.message) for w in caught)  # "a " * 100 is past the context
    ref = load_reference(model, "none")
    with torch.no_grad():
        want = torch.nn.functional.normalize(ref.model.encode_text(torch.from_numpy(ids)), dim=-1).numpy()
    assert np.abs(rt.encode_text(TEXTS) - want).max() < 1e-5


def test_padding_mask_makes_rows_independent_of_their_batch(hf_artifact):
    """Mean pooling over the padding mask: a short text embeds the same alone or beside a long one."""
    _, result = hf_artifact
    rt = clipexport.load(result.out_dir)
    together = rt.encode_text(TEXTS)
    alone = np.stack([rt.encode_text([t])[0] for t in TEXTS])
    assert np.abs(together - alone).max() < 1e-5
    # most of a short row is padding, so without the mask the batch-mates could not agree
    assert (rt.tokenize(["a photo of a dog"])[0] == 1).sum() > 60


def test_without_tokenizer_files_parity_uses_synthetic_ids(tmp_path):
    model = write_twin("hf_text", tmp_path / "twin", tokenizer=False)
    result = build(BuildOptions(model=model, pretrained="none", out=tmp_path / "art"))
    manifest = result.manifest
    assert manifest["tokenizer"]["kind"] == "none" and manifest["tokenizer"]["pad_token_id"] == 1
    assert any("synthetic token ids" in note for note in manifest["notes"])
    assert all(p.passed for p in result.parity.values())
    rt = clipexport.load(result.out_dir)
    with pytest.raises(InputError, match="has no tokenizer"):
        rt.encode_text(["a dog"])
    ids = np.full((2, 77), 1, dtype=np.int64)
    ids[:, 0], ids[0, 1:4], ids[0, 4], ids[1, 1], ids[1, 2] = 0, [7, 8, 9], 2, 11, 2
    ref = load_reference(model, "none")
    with torch.no_grad():
        want = torch.nn.functional.normalize(ref.model.encode_text(torch.from_numpy(ids)), dim=-1).numpy()
    assert np.abs(rt.encode_tokens(ids) - want).max() < 1e-5


def test_text_models_without_an_offline_config_say_why(tmp_path):
    # every built-in open_clip name has a bundled config now: a local-dir naming another hub model
    model = write_twin("hf_text", tmp_path / "twin")
    config = tmp_path / "twin" / "open_clip_config.json"
    data = json.loads(config.read_text())
    data["model_cfg"]["text_cfg"]["hf_model_name"] = "google/byt5-small"
    config.write_text(json.dumps(data))
    result = CliRunner().invoke(cli, ["build", model, "--pretrained", "none", "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "ships no offline config" in result.output and "local-dir:" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_bundled_configs_are_the_hub_architectures():
    from clipexport.models.hf_text import bundled_configs_dir

    xlmr = json.loads((bundled_configs_dir() / "xlm-roberta-base.json").read_text())
    assert (xlmr["vocab_size"], xlmr["hidden_size"], xlmr["num_hidden_layers"], xlmr["num_attention_heads"],
            xlmr["intermediate_size"], xlmr["max_position_embeddings"], xlmr["pad_token_id"]) == (
        250002, 768, 12, 12, 3072, 514, 1)


# -- mT5 and NLLB text towers ------------------------------------------------------------------

# open_clip's Hugging Face text models and the published architecture of each (config.json on the hub)
HF_MODELS = ["mt5-base-ViT-B-32", "mt5-xl-ViT-H-14", "nllb-clip-base", "nllb-clip-large", "nllb-clip-base-siglip",
             "nllb-clip-large-siglip"]


@pytest.mark.parametrize("name, numbers", [
    # d_model, layers, heads, d_ff, vocab, buckets, pad, eos
    ("mt5-base", (768, 12, 12, 2048, 250112, 32, 0, 1)),
    ("mt5-xl", (2048, 24, 32, 5120, 250112, 32, 0, 1)),
])
def test_bundled_mt5_configs(name, numbers):
    from clipexport.models.hf_text import bundled_configs_dir

    c = json.loads((bundled_configs_dir() / f"{name}.json").read_text())
    assert c["model_type"] == "mt5" and c["feed_forward_proj"] == "gated-gelu" and c["d_kv"] == 64
    assert "bos_token_id" not in c  # T5 has no BOS
    assert (c["d_model"], c["num_layers"], c["num_heads"], c["d_ff"], c["vocab_size"],
            c["relative_attention_num_buckets"], c["pad_token_id"], c["eos_token_id"]) == numbers


@pytest.mark.parametrize("name, numbers", [
    # d_model, encoder layers, heads, ffn, vocab, max positions, (bos, pad, eos)
    ("nllb-200-distilled-600M", (1024, 12, 16, 4096, 256206, 1024, (0, 1, 2))),
    ("nllb-200-distilled-1.3B", (1024, 24, 16, 8192, 256206, 1024, (0, 1, 2))),
])
def test_bundled_nllb_configs(name, numbers):
    from clipexport.models.hf_text import bundled_configs_dir

    c = json.loads((bundled_configs_dir() / f"{name}.json").read_text())
    assert c["model_type"] == "m2m_100" and c["scale_embedding"] is True and c["activation_function"] == "relu"
    assert (c["d_model"], c["encoder_layers"], c["encoder_attention_heads"], c["encoder_ffn_dim"], c["vocab_size"],
            c["max_position_embeddings"], (c["bos_token_id"], c["pad_token_id"], c["eos_token_id"])) == numbers


def test_every_builtin_hf_text_model_is_covered():
    from clipexport.listing import coverage

    covered, unsupported = coverage()
    hf = dict((r.name, m) for r, m in covered)["hf_text"]
    assert set(HF_MODELS) <= set(hf)
    assert not set(HF_MODELS) & {name for name, _ in unsupported}
    result = CliRunner().invoke(cli, ["list", "--all"])
    assert result.exit_code == 0
    listed_unsupported = result.output.split("unsupported:", 1)[1]
    assert not any(name in listed_unsupported for name in HF_MODELS)


def test_token_layouts_follow_the_real_tokenizers():
    from clipexport.models.hf_text import SyntheticTokenizer, bundled_configs_dir, token_layout

    def layout(name):
        return token_layout(json.loads((bundled_configs_dir() / f"{name}.json").read_text()))

    t5, nllb, xlmr = layout("mt5-base"), layout("nllb-200-distilled-600M"), layout("xlm-roberta-base")
    assert (t5.first_id, t5.pad_id, t5.eos_id, t5.piece_end) == (None, 0, 1, 250100)  # "... </s> <pad>"
    assert (nllb.first_id, nllb.pad_id, nllb.eos_id, nllb.piece_end) == (256047, 1, 2, 256001)  # "eng_Latn ... </s>"
    assert (xlmr.first_id, xlmr.pad_id, xlmr.eos_id) == (0, 1, 2)  # "<s> ... </s>"
    texts = ["a dog", "", "a " * 200]
    ids = SyntheticTokenizer(250112, 77, t5)(texts)
    # no BOS: pieces from column 0, then one </s>, then <pad> (0) to the end
    assert ids[0, 5] == 1 and (ids[0, 6:] == 0).all() and (ids[0, :5] >= 2).all()
    assert ids[1, 1] == 1 and ids[2, -1] == 1  # an empty text has one piece, a long one still ends in </s>
    assert ((ids == 1).sum(1) == 1).all() and ids.max() < 250100
    ids = SyntheticTokenizer(256206, 77, nllb)(texts)
    assert (ids[:, 0] == 256047).all() and ((ids == 2).sum(1) == 1).all() and ids[2, -1] == 2
    body = ids[:, 1:][(ids[:, 1:] != 1) & (ids[:, 1:] != 2)]
    assert (body >= 3).all() and (body < 256001).all()


def _reference_embeddings(model, ids):
    ref = load_reference(model, "none")
    with torch.no_grad():
        return torch.nn.functional.normalize(ref.model.encode_text(torch.from_numpy(ids)), dim=-1).numpy()


@pytest.fixture(scope="module", params=sorted(HF_TEXT_TWINS))
def hf_twin_artifact(request, tmp_path_factory):
    model = write_hf_text_twin(request.param, tmp_path_factory.mktemp(f"{request.param}-twin"))
    result = build(BuildOptions(model=model, pretrained="none", out=tmp_path_factory.mktemp("art") / request.param))
    return request.param, model, result


def test_mt5_and_nllb_twins_build_with_parity(hf_twin_artifact):
    kind, model, result = hf_twin_artifact
    manifest = result.manifest
    assert manifest["recipe"] == "hf_text" and manifest["families"]["text"] == "hf-text"
    assert manifest["families"]["image"] == {"mt5": "vision-transformer", "nllb_siglip": "timm"}[kind]
    # offline there are no tokenizer files: parity ran on ids laid out like the real tokenizer's
    assert manifest["tokenizer"]["kind"] == "none"
    assert manifest["tokenizer"]["pad_token_id"] == {"mt5": 0, "nllb_siglip": 1}[kind]
    assert any("synthetic token ids" in note for note in manifest["notes"])
    assert set(result.parity) == {"image", "text"}
    for parity in result.parity.values():
        assert parity.passed and parity.cosine_min >= 0.99999 and parity.max_rel_err <= 1e-4


def test_mt5_and_nllb_twins_pool_over_the_padding_mask(hf_twin_artifact):
    """ONNX equals open_clip on hand-laid rows, and a row embeds the same alone or in a batch."""
    kind, model, result = hf_twin_artifact
    if kind == "mt5":  # T5: pieces </s> <pad>...; mean pooling
        pad, ids = 0, np.zeros((3, 77), dtype=np.int64)
        ids[0, :4], ids[1, :2], ids[2, :76] = [7, 8, 9, 1], [11, 1], 5
        ids[2, 76] = 1
    else:  # NLLB: lang pieces </s> <pad>...; first-token pooling (the tiny vocabulary has no language codes)
        pad, ids = 1, np.ones((3, 77), dtype=np.int64)
        ids[0, :5], ids[1, :3], ids[2, :76] = [0, 7, 8, 9, 2], [0, 11, 2], 5
        ids[2, 0], ids[2, 76] = 0, 2
    rt = clipexport.load(result.out_dir)
    got = rt.encode_tokens(ids)
    assert np.abs(got - _reference_embeddings(model, ids)).max() < 1e-5
    alone = np.stack([rt.encode_tokens(ids[i:i + 1])[0] for i in range(len(ids))])
    assert np.abs(got - alone).max() < 1e-5
    # the mask matters: the same short row with its padding read as tokens embeds differently
    unmasked = ids[1:2].copy()
    unmasked[unmasked == pad] = 5
    assert np.abs(rt.encode_tokens(unmasked)[0] - got[1]).max() > 1e-3


def test_mt5_twin_with_a_t5_tokenizer_matches_open_clip(tmp_path):
    """With tokenizer files (T5 ids: pad 0, </s> 1, no BOS) the artifact tokenizes as open_clip does."""
    from open_clip.tokenizer import HFTokenizer

    model = write_hf_text_twin("mt5", tmp_path / "twin", tokenizer=True)
    result = build(BuildOptions(model=model, pretrained="none", out=tmp_path / "art"))
    assert result.manifest["tokenizer"]["kind"] == "hf" and result.manifest["tokenizer"]["pad_token_id"] == 0
    assert all(p.passed for p in result.parity.values())
    directory = model.split(":", 1)[1]
    want_ids = HFTokenizer(f"{directory}/text-model", context_length=77)(TEXTS).numpy()
    rt = clipexport.load(result.out_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = rt.tokenize(TEXTS)
    assert np.array_equal(ids, want_ids)
    # "a photo of a dog": five pieces from column 0 (no BOS), </s>, then <pad> = 0
    assert (ids[0, :5] >= 2).all() and ids[0, 5] == 1 and (ids[0, 6:] == 0).all()
    assert np.abs(rt.encode_text(TEXTS) - _reference_embeddings(model, want_ids)).max() < 1e-5


def test_hf_text_tower_beside_an_uncovered_image_tower_says_why():
    from clipexport.errors import UnsupportedModelError
    from clipexport.models.architecture import Families
    from clipexport.recipes import recipe_for

    with pytest.raises(UnsupportedModelError, match="Hugging Face transformer"):
        recipe_for(Families("modified-resnet", "hf-text", False), "x")


@pytest.mark.slow
def test_real_size_mt5_base_builds_with_parity(tmp_path):
    """mt5-base-ViT-B-32 at full size (text tower 277 M parameters, 250k vocabulary), offline.

    Peaks near 8 GB resident (the whole reference plus the text graph while it is simplified).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    result = build(BuildOptions(model="mt5-base-ViT-B-32", pretrained="none", out=tmp_path / "art"))
    elapsed = time.monotonic() - start
    manifest = result.manifest
    assert manifest["recipe"] == "hf_text" and manifest["tokenizer"]["kind"] == "none"
    assert manifest["tokenizer"]["pad_token_id"] == 0
    for tower, parity in result.parity.items():
        print(f"{tower}: cosine_min {parity.cosine_min:.8f} max_rel_err {parity.max_rel_err:.2e} ({elapsed:.0f} s)")
        assert parity.passed and parity.cosine_min >= 0.99999 and parity.max_rel_err <= 1e-4
