"""End to end at real size: build ViT-B-32 and RN50 (random weights), load them, and compare
`load(dir).encode_image / encode_text` with open_clip's own encode + normalize on the same images.

Each model is built once (module-scoped, one at a time: ~40 s and ~3 GB each).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipexport.runtime import TextTruncatedWarning, load

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

pytestmark = pytest.mark.slow

TEXTS = [
    "a photo of a dog.",
    "a blurry photo of a tabby cat sleeping on a red sofa.",
    "東京の夜景の写真",
    "tom &amp; jerry 🍕",
    "",
    "a caption that goes on and on " * 20,
]


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(42)
    out = []
    for (w, h), mode in zip([(640, 480), (224, 224), (300, 900), (97, 131), (1, 1), (1024, 256)],
                            ["RGB", "L", "RGBA", "P", "RGB", "CMYK"]):
        smooth = np.kron(rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3)), np.ones((8, 8, 1)))[:h, :w]
        noise = rng.integers(-20, 21, (h, w, 3))
        out.append(Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8)).convert(mode))
    return out


@pytest.fixture(scope="module", params=["ViT-B-32", "RN50"])
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from clipexport.build import BuildOptions, build
    from clipexport.models import load_reference

    name = request.param
    out = tmp_path_factory.mktemp(name) / "artifact"
    directory = build(BuildOptions(model=name, pretrained="none", out=out)).out_dir
    ref = load_reference(name, "none", 0)
    preprocess_val = image_transform_v2(PreprocessCfg(**ref.model.visual.preprocess_cfg), is_train=False)
    yield name, directory, ref.model, preprocess_val, open_clip.get_tokenizer(name)
    del ref


def _parity(got: np.ndarray, expected: np.ndarray, tolerance: dict) -> dict:
    cosine = (got * expected).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    abs_err = np.abs(got - expected).max(1)
    rel = abs_err / np.abs(expected).max(1)
    result = {"cosine_min": float(cosine.min()), "max_abs_err": float(abs_err.max()), "max_rel_err": float(rel.max())}
    assert result["cosine_min"] >= tolerance["cosine_min"], result
    assert result["max_rel_err"] <= tolerance["max_rel_err"], result
    return result


def test_embeddings_equal_open_clip(built) -> None:
    name, directory, model, preprocess_val, tokenizer = built
    manifest = json.loads((Path(directory) / "manifest.json").read_text())
    rt = load(directory)
    assert rt.backend == "onnxruntime"
    images = _images()

    pixels = rt.preprocess(images)
    expected_pixels = np.stack([preprocess_val(im).numpy() for im in images])
    pixel_diff = float(np.abs(pixels - expected_pixels).max())
    assert pixel_diff <= 1e-6

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TextTruncatedWarning)
        ids = rt.tokenize(TEXTS)
        assert np.array_equal(ids, tokenizer(TEXTS).numpy())
        got_text = rt.encode_text(TEXTS)
    with torch.no_grad():
        ref_image = model.encode_image(torch.from_numpy(expected_pixels), normalize=True).numpy()
        ref_text = model.encode_text(tokenizer(TEXTS), normalize=True).numpy()
    image = _parity(rt.encode_image(images), ref_image, manifest["towers"]["image"]["parity"]["tolerance"])
    text = _parity(got_text, ref_text, manifest["towers"]["text"]["parity"]["tolerance"])
    print(f"\n{name}: preprocess max abs diff {pixel_diff:.2g}; image {image}; text {text}; "
          f"trims_text {rt.trims_text}")
