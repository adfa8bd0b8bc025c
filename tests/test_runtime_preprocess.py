"""Runtime preprocessing vs open_clip's own inference transform, on the same PIL images.

Parity target: max abs difference <= 1e-6 (in practice the pixels are identical).
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipexport.errors import ArtifactError, InputError
from clipexport.runtime.preprocess import ImagePreprocessor, PreprocessConfig

open_clip = pytest.importorskip("open_clip")

OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
TOLERANCE = 1e-6
MODES = ["RGB", "L", "LA", "P", "PA", "RGBA", "CMYK", "YCbCr", "HSV", "I;16", "I", "F", "1"]
SIZES = [(1, 1), (2, 5), (5, 2), (31, 33), (224, 224), (225, 224), (224, 300), (500, 375), (375, 500), (1000, 9)]


def _texture(width: int, height: int, seed: int) -> Image.Image:
    """Noise plus gradients in RGBA: noise stresses the resampling filter, gradients the crop offsets."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    ramp = (np.add.outer(np.arange(height), np.arange(width)) * 255 // max(1, height + width - 2)).astype(np.uint8)
    noise[..., 0] = (noise[..., 0] // 2 + ramp // 2).astype(np.uint8)
    return Image.fromarray(noise)  # RGBA


def _cfg(size=(224, 224), resize_mode="shortest", interpolation="bicubic", fill_color=0,
         mean=OPENAI_MEAN, std=OPENAI_STD) -> dict:
    return {"size": list(size), "mode": "RGB", "mean": list(mean), "std": list(std),
            "interpolation": interpolation, "resize_mode": resize_mode, "fill_color": fill_color}


def _pair(cfg: dict):
    ours = ImagePreprocessor(PreprocessConfig.from_manifest(cfg))
    ref = open_clip.image_transform(cfg["size"], is_train=False, mean=cfg["mean"], std=cfg["std"],
                                    resize_mode=cfg["resize_mode"], interpolation=cfg["interpolation"],
                                    fill_color=cfg["fill_color"])
    return ours, ref


def _max_diff(ours: ImagePreprocessor, ref, image: Image.Image) -> float:
    expected = ref(image).numpy()
    got = ours([image])
    assert got.shape == (1, *expected.shape) and got.dtype == np.float32
    return float(np.abs(got[0] - expected).max())


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_and_size_matches_open_clip(mode: str) -> None:
    ours, ref = _pair(_cfg())
    worst = 0.0
    for i, (w, h) in enumerate(SIZES):
        image = _texture(w, h, seed=i).convert(mode)
        assert image.mode == mode
        worst = max(worst, _max_diff(ours, ref, image))
    assert worst <= TOLERANCE, f"{mode}: max abs diff {worst}"


@pytest.mark.parametrize(
    "size,resize_mode,interpolation,fill",
    [
        ((224, 224), "longest", "bicubic", 0),
        ((224, 224), "longest", "bicubic", 128),
        ((224, 224), "squash", "bicubic", 0),
        ((224, 224), "shortest", "bilinear", 0),
        ((64, 48), "shortest", "bicubic", 0),  # non-square: open_clip's ResizeKeepRatio path
        ((48, 64), "shortest", "bilinear", 0),  # ...which is bicubic whatever the config says
        ((48, 64), "longest", "bilinear", 255),
        ((64, 48), "squash", "bilinear", 0),
        ((256, 256), "shortest", "random", 0),
    ],
)
def test_resize_modes_match_open_clip(size, resize_mode, interpolation, fill) -> None:
    ours, ref = _pair(_cfg(size, resize_mode, interpolation, fill, mean=[0.5] * 3, std=[0.5] * 3))
    worst = 0.0
    for (i, (w, h)), mode in itertools.product(enumerate(SIZES), ["RGB", "P", "RGBA", "L"]):
        worst = max(worst, _max_diff(ours, ref, _texture(w, h, seed=100 + i).convert(mode)))
    assert worst <= TOLERANCE


def test_model_transform_from_create_model_and_transforms(twin) -> None:
    """The twin's preprocess_val (the function users call) against the runtime's, from the model's own cfg."""
    from open_clip.model import get_model_preprocess_cfg

    model, _, preprocess_val = open_clip.create_model_and_transforms(twin("vit"), pretrained=None)
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in get_model_preprocess_cfg(model).items()}
    ours = ImagePreprocessor(PreprocessConfig.from_manifest(cfg))
    for i, (w, h) in enumerate(SIZES):
        image = _texture(w, h, seed=200 + i).convert("RGB")
        assert np.abs(ours([image])[0] - preprocess_val(image).numpy()).max() <= TOLERANCE


@pytest.mark.parametrize("fmt,mode,save_kwargs", [
    ("JPEG", "RGB", {"quality": 85}),
    ("JPEG", "L", {}),
    ("JPEG", "CMYK", {}),
    ("PNG", "I;16", {}),  # 16-bit grayscale
    ("PNG", "RGBA", {}),
    ("PNG", "P", {}),
    ("GIF", "P", {}),
    ("TIFF", "CMYK", {}),
    ("WEBP", "RGB", {"lossless": True}),
    ("BMP", "1", {}),
])
def test_files_paths_and_bytes_match_open_clip(tmp_path: Path, fmt: str, mode: str, save_kwargs: dict) -> None:
    image = _texture(317, 203, seed=7).convert(mode)
    if mode == "I;16":
        image = Image.fromarray(np.asarray(_texture(317, 203, 7).convert("L"), dtype=np.uint16) * 257)
    path = tmp_path / f"img.{fmt.lower()}"
    image.save(path, format=fmt, **save_kwargs)
    ours, ref = _pair(_cfg())
    with Image.open(path) as opened:
        expected = ref(opened).numpy()
    from_path = ours([path])[0]
    from_str = ours(str(path))[0]
    from_bytes = ours([path.read_bytes()])[0]
    for got in (from_path, from_str, from_bytes):
        assert np.abs(got - expected).max() <= TOLERANCE


def test_numpy_arrays_are_hwc_uint8() -> None:
    ours, ref = _pair(_cfg())
    rgba = np.asarray(_texture(90, 61, seed=3))
    cases = {
        "rgb": (rgba[..., :3], "RGB"),
        "rgba": (rgba, "RGBA"),
        "gray": (rgba[..., 0], "L"),
        "gray1": (rgba[..., :1], "L"),
    }
    for name, (array, mode) in cases.items():
        expected = ref(Image.fromarray(np.ascontiguousarray(array.squeeze(-1) if array.ndim == 3 and
                                                            array.shape[2] == 1 else array))).numpy()
        got = ours([array])[0]
        assert np.abs(got - expected).max() <= TOLERANCE, name
    # a non-contiguous view (every other column) is fine too
    view = rgba[:, ::2, :3]
    assert np.abs(ours(view)[0] - ref(Image.fromarray(np.ascontiguousarray(view))).numpy()).max() <= TOLERANCE


def test_one_image_is_a_batch_of_one_and_empty_is_empty() -> None:
    ours, _ = _pair(_cfg(size=(32, 32)))
    image = _texture(40, 30, 0).convert("RGB")
    assert ours(image).shape == (1, 3, 32, 32)
    assert ours([image, image]).shape == (2, 3, 32, 32)
    empty = ours([])
    assert empty.shape == (0, 3, 32, 32) and empty.dtype == np.float32


def test_huge_image_matches_and_extreme_strip_is_refused() -> None:
    ours, ref = _pair(_cfg())
    big = Image.fromarray(np.random.default_rng(1).integers(0, 256, (3000, 4500, 3), dtype=np.uint8))
    assert _max_diff(ours, ref, big) <= TOLERANCE
    # 1 x 20000: scaling the short side to 224 would make a 4.48-gigapixel image (open_clip tries).
    strip = Image.new("RGB", (20000, 1), (10, 20, 30))
    with pytest.raises(InputError, match="MAX_IMAGE_PIXELS"):
        ours([strip])


def test_bad_images_raise_input_errors(tmp_path: Path) -> None:
    ours, _ = _pair(_cfg())
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    with pytest.raises(InputError, match="not an image"):
        ours([text_file])
    with pytest.raises(InputError, match="no such file"):
        ours([tmp_path / "missing.jpg"])
    jpeg = io.BytesIO()
    _texture(400, 300, 0).convert("RGB").save(jpeg, format="JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    with pytest.raises(InputError, match="truncated"):
        ours([truncated])
    with pytest.raises(InputError, match="truncated"):
        ours([truncated.read_bytes()])
    with pytest.raises(InputError, match="not an image"):
        ours([b""])
    with pytest.raises(InputError, match="image 1 .*uint8"):
        ours([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(InputError, match="shape"):
        ours([np.zeros((8, 8, 2), np.uint8)])
    with pytest.raises(InputError, match="shape"):
        ours([np.zeros((2, 8, 8, 3), np.uint8)])
    with pytest.raises(InputError, match="empty"):
        ours([np.zeros((0, 8, 3), np.uint8)])
    with pytest.raises(InputError, match="empty"):
        ours([Image.new("RGB", (0, 5))])
    with pytest.raises(InputError, match="unsupported type int"):
        ours([42])
    with pytest.raises(InputError, match="expected an image or a list"):
        ours({"a": 1})  # type: ignore[arg-type]


def test_decompression_bomb_is_refused_clearly(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 10000)).save(bomb)  # 2e8 pixels in ~24 kB: over PIL's 2x limit
    assert bomb.stat().st_size < 100_000
    ours, _ = _pair(_cfg())
    with pytest.raises(InputError, match="decompression bomb"):
        ours([bomb])
    with pytest.raises(InputError, match="decompression bomb"):
        ours([bomb.read_bytes()])


def test_one_by_one_pixel_matches_open_clip() -> None:
    ours, ref = _pair(_cfg())
    for mode in ("RGB", "L", "P", "RGBA"):
        assert _max_diff(ours, ref, Image.new(mode, (1, 1), 200 if mode in ("L", "P") else None)) <= TOLERANCE


def test_malformed_preprocess_sections_are_artifact_errors() -> None:
    for bad in ({"size": [224, 224], "resize_mode": "stretch"}, {"size": [224, 224], "interpolation": "lanczos"},
                {"mean": [0.5] * 3}, {"size": [224, 224], "std": [0.5, 0.0, 0.5]},
                {"size": [224, 224], "mean": [0.5, 0.5]}, {"size": [224, 224], "mode": "L"}):
        with pytest.raises(ArtifactError):
            PreprocessConfig.from_manifest(bad)
