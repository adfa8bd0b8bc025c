"""Real-size open_clip models (seeded random weights): both towers export and pass fp32 parity.

One model per architecture family runs in CI; the rest are `slow` (run `pytest -m slow`).
"""

from __future__ import annotations

import pytest

from clipexport.build import BuildOptions, build

CASES = [
    # model, image size, embedding width
    pytest.param("ViT-B-32", 224, 512, id="ViT-B-32"),
    pytest.param("RN50", 224, 1024, id="RN50"),
    pytest.param("convnext_base", 224, 512, id="convnext_base"),
    pytest.param("xlm-roberta-base-ViT-B-32", 224, 512, id="xlm-roberta-base-ViT-B-32"),
    pytest.param("roberta-ViT-B-32", 224, 512, id="roberta-ViT-B-32", marks=pytest.mark.slow),
    pytest.param("EVA02-B-16", 224, 512, id="EVA02-B-16", marks=pytest.mark.slow),
    pytest.param("MobileCLIP-S1", 256, 512, id="MobileCLIP-S1", marks=pytest.mark.slow),
    pytest.param("ViTamin-S", 224, 384, id="ViTamin-S", marks=pytest.mark.slow),
    pytest.param("ViT-B-16", 224, 512, id="ViT-B-16", marks=pytest.mark.slow),
    pytest.param("ViT-B-32-quickgelu", 224, 512, id="ViT-B-32-quickgelu", marks=pytest.mark.slow),
    pytest.param("ViT-L-14", 224, 768, id="ViT-L-14", marks=pytest.mark.slow),
    pytest.param("ViT-L-14-quickgelu", 224, 768, id="ViT-L-14-quickgelu", marks=pytest.mark.slow),
    pytest.param("ViT-L-14-336", 336, 768, id="ViT-L-14-336", marks=pytest.mark.slow),
    pytest.param("RN101", 224, 512, id="RN101", marks=pytest.mark.slow),
    pytest.param("RN50x4", 288, 640, id="RN50x4", marks=pytest.mark.slow),
    pytest.param("RN50x64", 448, 1024, id="RN50x64", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("model, image_size, width", CASES)
def test_real_model_builds_with_fp32_parity(model, image_size, width, tmp_path):
    out = tmp_path / model
    result = build(BuildOptions(model=model, pretrained="none", out=out))
    towers = result.manifest["towers"]
    assert towers["image"]["inputs"][0]["shape"] == ["batch", 3, image_size, image_size]
    assert towers["image"]["outputs"][0]["shape"] == ["batch", width]
    assert towers["text"]["outputs"][0]["shape"] == ["batch", width]
    for name, parity in result.parity.items():
        assert parity.passed, parity.summary()
        assert parity.cosine_min >= 0.99999 and parity.max_rel_err <= 1e-4
        assert [b.batch_size for b in parity.batches] == [1, 3, 8, 64]  # 64: the range's max
        print(parity.summary())
