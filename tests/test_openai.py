"""OpenAI names and OpenAI's TorchScript checkpoints (QuickGELU is required and applied, and said)."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import open_clip
import pytest
import torch

from clipexport.build import BuildOptions, build
from clipexport.models import canonical_name, load_reference


@pytest.mark.parametrize(
    "given, canonical",
    [("ViT-B/32", "ViT-B-32"), ("ViT-L/14@336px", "ViT-L-14-336"), ("ViT-L/14", "ViT-L-14"), ("rn50x4", "RN50x4"),
     ("RN50x64", "RN50x64"), ("ViT-B/16", "ViT-B-16")],
)
def test_openai_model_names(given, canonical):
    assert canonical_name(given) == canonical


def test_torchscript_checkpoint_builds_with_quick_gelu(twin, tmp_path):
    model_name = twin("vit")  # its config uses plain GELU, as open_clip's non-quickgelu configs do
    ref = load_reference(model_name, "none", seed=1).model
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=generator))
    pixels = torch.randn(2, 3, 32, 32, generator=generator)
    ids = open_clip.get_tokenizer(model_name)(["a dog", "a cat"])
    # OpenAI shipped its weights as TorchScript archives of the whole model
    archive = tmp_path / "ViT-tiny.pt"
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(ref, (pixels, ids), check_trace=False), str(archive))

    out = tmp_path / "art"
    result = build(BuildOptions(model=model_name, pretrained=str(archive), out=out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model_config"]["quick_gelu"] is True
    assert any("QuickGELU" in note for note in manifest["notes"])
    assert all(p.passed for p in result.parity.values())

    # the same weights in a QuickGELU model are what the artifact computes; plain GELU is not
    quick = open_clip.create_model(model_name, pretrained=None, force_quick_gelu=True).eval()
    quick.load_state_dict(ref.state_dict())
    got = ort.InferenceSession(str(out / "image.onnx")).run(None, {"pixel_values": pixels.numpy()})[0]
    with torch.no_grad():
        want = quick.encode_image(pixels).numpy()
        gelu = ref.encode_image(pixels).numpy()
    scale = np.abs(want).max()
    assert np.abs(got - want).max() < 1e-4 * scale
    assert np.abs(gelu - want).max() > 1e-3 * scale
