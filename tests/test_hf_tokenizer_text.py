"""The built-in text transformer fed by a Hugging Face tokenizer (SigLIP, CLIPA, worldwide) built offline.

Only the tokenizer reads hub files: without them, parity runs on synthetic ids laid out like the real
tokenizer's, and the artifact records that it has no tokenizer (encode_tokens works, encode_text refuses).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import clipexport
from clipexport.build import BuildOptions, BuildResult, build
from clipexport.errors import InputError
from clipexport.models import load_reference
from clipexport.models.hf_text import SyntheticTokenizer, builtin_token_layout
from twins import HF_TOKENIZER_TEXT_TWINS, write_hf_tokenizer_text_twin


def _check_parity(result: BuildResult) -> None:
    assert set(result.parity) == {"image", "text"}
    for parity in result.parity.values():
        assert parity.passed and parity.cosine_min >= 0.99999 and parity.max_rel_err <= 1e-4


@pytest.fixture(scope="module")
def siglip_artifact(tmp_path_factory: Any) -> tuple[str, BuildResult]:
    model = write_hf_tokenizer_text_twin("siglip", tmp_path_factory.mktemp("siglip-twin"))
    return model, build(BuildOptions(model=model, pretrained="none", out=tmp_path_factory.mktemp("art") / "siglip"))


def test_siglip_twin_builds_with_parity_on_synthetic_ids(siglip_artifact):
    _, result = siglip_artifact
    manifest = result.manifest
    assert manifest["recipe"] == "hf_tokenizer_text"
    assert manifest["families"]["text"] == "text-transformer-hf-tokenizer"
    _check_parity(result)
    # 'last' pooling without a causal mask: the full context, never trimmed
    assert manifest["towers"]["text"]["inputs"] == [{"name": "input_ids", "dtype": "int64", "shape": ["batch", 64]}]
    tokenizer = manifest["tokenizer"]
    assert tokenizer["kind"] == "none" and tokenizer["pad_token_id"] == 1 and tokenizer["context_length"] == 64
    assert "not available at build time" in tokenizer["reason"]
    assert not any(f.startswith("tokenizer/") for f in manifest["files"])
    assert any("synthetic token ids" in note for note in manifest["notes"])


def test_runtime_encode_tokens_equals_onnx_runtime(siglip_artifact):
    import onnxruntime as ort

    model, result = siglip_artifact
    ref = load_reference(model, "none")
    ids = ref.tokenizer()(["a photo of a dog", "", "two people on the sea at night"]).numpy()
    rt = clipexport.load(result.out_dir)
    got = rt.encode_tokens(ids)
    session = ort.InferenceSession(str(Path(result.out_dir) / "text.onnx"), providers=["CPUExecutionProvider"])
    raw = session.run(None, {"input_ids": ids})[0]
    want = raw / np.linalg.norm(raw, axis=-1, keepdims=True)
    assert np.abs(got - want).max() < 1e-6
    with torch.no_grad():
        torch_ref = torch.nn.functional.normalize(ref.model.encode_text(torch.from_numpy(ids)), dim=-1).numpy()
    assert np.abs(got - torch_ref).max() < 1e-5


def test_encode_text_refuses_clearly(siglip_artifact):
    _, result = siglip_artifact
    rt = clipexport.load(result.out_dir)
    with pytest.raises(InputError, match="has no tokenizer .*encode_tokens"):
        rt.encode_text(["a photo of a dog"])


def test_worldwide_twin_vit_image_and_eos_pooling(tmp_path):
    """The ViT image branch of the recipe, with 'eos' pooling: every synthetic row holds one EOS."""
    model = write_hf_tokenizer_text_twin("worldwide", tmp_path / "twin")
    result = build(BuildOptions(model=model, pretrained="none", out=tmp_path / "art"))
    assert result.manifest["recipe"] == "hf_tokenizer_text" and result.manifest["tokenizer"]["kind"] == "none"
    _check_parity(result)
    ids = load_reference(model, "none").tokenizer()(["a", "a photo of a dog", "x " * 200])
    assert ((ids == 2).sum(dim=1) == 1).all() and (ids[:, 0] == 0).all()  # XLM-V: <s> ... </s> <pad>=1


@pytest.mark.parametrize(
    "model, pad, eos, first",
    [("ViT-B-16-SigLIP", 1, 1, None), ("ViT-B-16-SigLIP2", 0, 1, None), ("ViT-L-14-CLIPA", 0, 0, 101),
     ("ViT-H-14-worldwide", 1, 2, 0), ("ViT-L-14-worldwide", 0, 1, None)],
)
def test_layouts_of_the_real_tokenizers(model, pad, eos, first):
    import open_clip

    text_cfg = open_clip.get_model_config(model)["text_cfg"]
    layout = builtin_token_layout(text_cfg)
    assert (layout.pad_id, layout.eos_id, layout.first_id) == (pad, eos, first)
    ids = SyntheticTokenizer(int(text_cfg["vocab_size"]), int(text_cfg["context_length"]), layout)(["a b c", ""])
    assert ids.shape == (2, text_cfg["context_length"]) and int(ids.max()) < layout.piece_end


def test_twins_match_the_recipe():
    from clipexport.models.architecture import families_of
    from clipexport.recipes import recipe_for

    for cfg in HF_TOKENIZER_TEXT_TWINS.values():
        assert recipe_for(families_of(cfg), "twin").name == "hf_tokenizer_text"


@pytest.mark.slow
def test_real_vit_b_16_siglip_builds_offline(tmp_path):
    start = time.monotonic()
    result = build(BuildOptions(model="ViT-B-16-SigLIP", pretrained="none", out=tmp_path / "siglip"))
    _check_parity(result)
    assert result.manifest["recipe"] == "hf_tokenizer_text"
    # without the hub cache: synthetic ids, no tokenizer files; with it, open_clip's tokenizer
    notes = " ".join(result.manifest["notes"])
    if "synthetic token ids" in notes:
        assert result.manifest["tokenizer"]["kind"] == "none"
    assert time.monotonic() - start < 1800
