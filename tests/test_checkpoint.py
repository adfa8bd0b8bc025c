"""Checkpoint round trip: weights from a file the test writes reach the exported graph."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import open_clip
import pytest
import torch

from clipexport.build import BuildOptions, build
from clipexport.hashing import file_sha256
from clipexport.models import load_reference


def _save(state: dict, path):
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_build_from_checkpoint_matches_model_loaded_from_same_file(twin, tmp_path, suffix):
    model = twin("vit")
    random = load_reference(model, "none", seed=0).model
    generator = torch.Generator().manual_seed(42)
    perturbed = {
        k: v + 0.05 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
        for k, v in random.state_dict().items()
    }
    checkpoint = tmp_path / f"perturbed{suffix}"
    _save(perturbed, checkpoint)

    out = tmp_path / "art"
    result = build(BuildOptions(model=model, pretrained=str(checkpoint), out=out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["weights"]["kind"] == "file"
    assert manifest["weights"]["sha256"] == file_sha256(checkpoint)
    assert all(p.passed for p in result.parity.values())

    # An independent reference: open_clip's own loader on the same file.
    reference = open_clip.create_model(model, pretrained=None, load_weights=False)
    open_clip.load_checkpoint(reference, str(checkpoint))
    reference.eval()
    pixels = torch.randn(4, 3, 32, 32, generator=generator)
    ids = open_clip.get_tokenizer(model)(["a photo of a dog.", "a red car", "", "東京"])
    image = ort.InferenceSession(str(out / "image.onnx")).run(None, {"pixel_values": pixels.numpy()})[0]
    text = ort.InferenceSession(str(out / "text.onnx")).run(None, {"input_ids": ids.numpy()})[0]
    with torch.no_grad():
        want_image = reference.encode_image(pixels).numpy()
        want_text = reference.encode_text(ids).numpy()
        random_image = random.encode_image(pixels).numpy()
    assert np.abs(image - want_image).max() < 1e-4 * np.abs(want_image).max()
    assert np.abs(text - want_text).max() < 1e-4 * np.abs(want_text).max()
    # and the file's weights really were used: far from the random init the perturbation started from
    assert np.abs(image - random_image).max() > 1e-2 * np.abs(random_image).max()
