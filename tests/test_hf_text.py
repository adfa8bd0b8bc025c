"""Hugging Face text towers (XLM-R style) built offline: parity, padding mask, tokenizer or its absence."""

from __future__ import annotations

import json
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
from twins import write_twin

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
    assert manifest["towers"]["text"]["inputs"] == [{"name": "input_ids", "dtype": "int64", "shape": ["batch", 77]}]
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


def test_builtin_names_without_an_offline_config_say_why(tmp_path):
    result = CliRunner().invoke(cli, ["build", "mt5-base-ViT-B-32", "--pretrained", "none", "--out", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert "ships no offline config" in result.output and "local-dir:" in result.output
    assert not (tmp_path / "x").exists()


def test_bundled_configs_are_the_hub_architectures():
    from clipexport.models.hf_text import bundled_configs_dir

    xlmr = json.loads((bundled_configs_dir() / "xlm-roberta-base.json").read_text())
    assert (xlmr["vocab_size"], xlmr["hidden_size"], xlmr["num_hidden_layers"], xlmr["num_attention_heads"],
            xlmr["intermediate_size"], xlmr["max_position_embeddings"], xlmr["pad_token_id"]) == (
        250002, 768, 12, 12, 3072, 514, 1)
