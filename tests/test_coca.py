"""CoCa: the two contrastive towers export and embed exactly as CoCa.encode_image / encode_text;
the multimodal caption decoder is not exported.

Two twins: open_clip's own text transformer with a CLS token after the text (recipe coca, fixed
context of 76), and a Hugging Face text tower (coca_roberta-ViT-B-32's shape; recipe hf_text,
trimmed after the longest unpadded row).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from twins import write_twin

import clipexport
from clipexport.build import BuildOptions, build
from clipexport.models import load_reference

TEXTS = ["a photo of a dog.", "a diagram", "", "une photo d'un café à paris, très tard dans la nuit " * 3]


def _coca_hf_text_twin(directory) -> str:
    """The hf_text twin (ViT + tiny XLM-R) with CoCa's output tokens and a caption decoder on top."""
    name = write_twin("hf_text", directory)
    path = directory / "open_clip_config.json"
    cfg = json.loads(path.read_text())["model_cfg"]
    cfg["vision_cfg"]["output_tokens"] = True
    cfg["text_cfg"]["output_tokens"] = True
    cfg["multimodal_cfg"] = {"context_length": 76, "width": 32, "heads": 2, "layers": 1}
    cfg["custom_text"] = True
    path.write_text(json.dumps({"model_cfg": cfg}))
    return name


@pytest.fixture(scope="module", params=["coca", "coca_hf_text"])
def coca_build(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    name = write_twin("coca", directory) if request.param == "coca" else _coca_hf_text_twin(directory)
    out = directory / "artifact"
    result = build(BuildOptions(model=name, pretrained="none", out=out, seed=5))
    return request.param, name, out, result


def test_coca_builds_with_the_expected_recipe_and_passes_parity(coca_build):
    kind, _, out, result = coca_build
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"] == ("coca" if kind == "coca" else "hf_text")
    for tower in ("image", "text"):
        parity = result.parity[tower]
        assert parity.cosine_min >= 0.99999 and parity.max_rel_err < 1e-4
    text = manifest["towers"]["text"]
    if kind == "coca":  # the CLS token reads the full context: no trimming, 76 columns
        assert text["sequence"]["axis"] is None and text["sequence"]["length"] == 76
        assert text["inputs"][0]["shape"][1] == 76
    else:
        assert text["sequence"]["axis"] == "sequence" and result.parity["text"].trimmed_lengths


def test_caption_decoder_is_not_in_the_graphs(coca_build):
    _, name, out, _ = coca_build
    model = load_reference(name, "none", seed=5).model
    decoder = sum(p.numel() for p in model.text_decoder.parameters())
    exported = 0
    for tower in ("image", "text"):
        graph = onnx.load(str(out / f"{tower}.onnx")).graph
        exported += sum(int(np.prod(t.dims)) for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    towers = sum(p.numel() for p in model.parameters()) - decoder
    assert decoder > 10_000 and exported <= towers * 1.01  # the decoder's weights would not fit in


def test_runtime_embeddings_equal_coca_encode_image_and_encode_text(coca_build):
    _, name, out, _ = coca_build
    ref = load_reference(name, "none", seed=5)
    runtime = clipexport.load(out, backend="onnxruntime")
    ids = ref.tokenizer()(TEXTS)
    np.testing.assert_array_equal(runtime.tokenize(TEXTS)[:, : ids.shape[1]], ids.numpy())
    with torch.no_grad():
        want_text = ref.model.encode_text(ids, normalize=True).numpy()
        pixels = torch.randn(3, 3, ref.image_size, ref.image_size, generator=torch.Generator().manual_seed(0))
        want_image = ref.model.encode_image(pixels, normalize=True).numpy()
    np.testing.assert_allclose(runtime.encode_text(TEXTS), want_text, atol=2e-5)
    np.testing.assert_allclose(runtime.encode_pixels(pixels.numpy()), want_image, atol=2e-5)
    # and the embedding is the pooled one, not the token embeddings CoCa's towers also return
    assert runtime.encode_text(TEXTS).shape == (len(TEXTS), ref.model_cfg["embed_dim"])
