"""Image preprocessing that gives the same pixels as open_clip's `preprocess_val`, without torch.

open_clip's inference transform is torchvision on a PIL image:

    resize (in the image's own mode) -> center crop (or pad) -> convert("RGB") -> to_tensor -> normalize

torchvision's `Resize` on a PIL image only computes the target size and calls PIL's own
`Image.resize` (PIL resampling always antialiases for bicubic/bilinear; torchvision's
`antialias` flag does not apply to PIL input). So the same PIL calls, in the same order,
followed by the same float32 arithmetic in numpy, give identical pixels. The order matters:
open_clip resizes *before* converting to RGB, so a palette ("P") image is resized with
nearest neighbour (PIL forces it for "1" and "P"), and RGBA is resized with premultiplied
alpha and only then flattened to RGB by dropping alpha.

Resize modes (manifest `preprocess.resize_mode`), target (H, W):
  shortest, H == W  shortest side -> H (long side = int(H * long / short)), center crop
  shortest, H != W  scale by the smaller of h/H, w/W (rounded), center crop; always bicubic
                    (open_clip's ResizeKeepRatio ignores `interpolation` here)
  longest           scale by the larger ratio (rounded), center crop-or-pad with fill_color
  squash            resize to exactly (H, W), aspect ratio not kept

EXIF orientation is *not* applied, exactly like `preprocess(Image.open(path))` in open_clip;
rotate with `PIL.ImageOps.exif_transpose` before passing the image if you want it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from clipexport.errors import ArtifactError, InputError

try:  # the runtime extra brings Pillow; the error is raised where images are first needed
    from PIL import Image, ImageOps
except ImportError:  # pragma: no cover - exercised only without the runtime extra
    Image = None  # type: ignore[assignment]
    ImageOps = None  # type: ignore[assignment]

ImageInput = Union["Image.Image", str, os.PathLike, bytes, bytearray, memoryview, np.ndarray]

RESIZE_MODES = ("shortest", "longest", "squash")
INTERPOLATIONS = ("bicubic", "bilinear", "random")  # open_clip treats 'random' as bicubic at inference
_ARRAY_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


@dataclass(frozen=True)
class PreprocessConfig:
    """The manifest's `preprocess` section, validated. size is (height, width)."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0

    @classmethod
    def from_manifest(cls, section: Mapping[str, Any]) -> PreprocessConfig:
        try:
            size = section["size"]
            size_hw = (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[-1]))
            mean = _three(section.get("mean", (0.48145466, 0.4578275, 0.40821073)))
            std = _three(section.get("std", (0.26862954, 0.26130258, 0.27577711)))
            cfg = cls(
                size=size_hw,
                mean=mean,
                std=std,
                interpolation=str(section.get("interpolation") or "bicubic"),
                resize_mode=str(section.get("resize_mode") or "shortest"),
                fill_color=int(section.get("fill_color") or 0),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ArtifactError(f"manifest preprocess section {dict(section)!r} is malformed: {exc}") from None
        if cfg.interpolation not in INTERPOLATIONS:
            raise ArtifactError(f"manifest preprocess.interpolation {cfg.interpolation!r}: expected one of "
                                f"{', '.join(INTERPOLATIONS)}")
        if cfg.resize_mode not in RESIZE_MODES:
            raise ArtifactError(f"manifest preprocess.resize_mode {cfg.resize_mode!r}: expected one of "
                                f"{', '.join(RESIZE_MODES)}")
        if min(cfg.size) < 1 or any(s == 0 for s in cfg.std):
            raise ArtifactError(f"manifest preprocess section has size {cfg.size} and std {cfg.std}")
        mode = section.get("mode", "RGB")
        if mode != "RGB":
            raise ArtifactError(f"manifest preprocess.mode {mode!r}: only RGB is supported")
        return cfg


def _three(value: Any) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"expected 3 channel values, got {len(values)}")
    return values[0], values[1], values[2]


def _require_pil() -> None:
    if Image is None:
        raise InputError("Pillow is not installed: `pip install clipexport[runtime]` to preprocess images")


class ImagePreprocessor:
    """Callable: images -> float32 [N, 3, H, W], the pixels open_clip's preprocess_val gives.

    Thread-safe: it holds only the (frozen) configuration.
    """

    def __init__(self, cfg: PreprocessConfig) -> None:
        self.cfg = cfg
        self._mean = np.asarray(cfg.mean, dtype=np.float32).reshape(3, 1, 1)
        self._std = np.asarray(cfg.std, dtype=np.float32).reshape(3, 1, 1)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the output."""
        return self.cfg.size

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        items = as_image_list(images)
        height, width = self.cfg.size
        out = np.empty((len(items), 3, height, width), dtype=np.float32)
        for i, item in enumerate(items):
            out[i] = self.pixels(item, index=i)
        return out

    def pixels(self, image: ImageInput, index: int = 0) -> np.ndarray:
        """One image -> float32 [3, H, W]."""
        rgb = self.geometry(image, index)
        chw = np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)
        # Same float32 operations, in the same order, as to_tensor (x / 255) and Normalize.
        scaled = chw.astype(np.float32) / np.float32(255.0)
        return (scaled - self._mean) / self._std

    def geometry(self, image: ImageInput, index: int = 0) -> Image.Image:
        """Resize, crop and RGB-convert one image: the PIL part of the transform."""
        _require_pil()
        img, owned = open_image(image, index)
        try:
            try:
                img = self._resize_and_crop(img, index)
                return img if img.mode == "RGB" else img.convert("RGB")
            except InputError:
                raise
            except (OSError, ValueError, MemoryError) as exc:
                raise InputError(f"image {index}: cannot convert a {img.mode} image of size {img.size}: {exc}") from None
        finally:
            if owned is not None:
                owned.close()

    def _resize_and_crop(self, img: Image.Image, index: int) -> Image.Image:
        cfg = self.cfg
        target_h, target_w = cfg.size
        bicubic = Image.Resampling.BICUBIC
        resample = Image.Resampling.BILINEAR if cfg.interpolation == "bilinear" else bicubic
        if cfg.resize_mode == "squash":
            return _resize(img, (target_h, target_w), resample, index)
        if cfg.resize_mode == "longest":
            img = _resize(img, _keep_ratio_size(img, cfg.size, longest=1.0), resample, index)
            return _center_crop_or_pad(img, cfg.size, cfg.fill_color)
        # shortest
        if target_h == target_w:
            img = _resize(img, _shortest_side_size(img, target_h), resample, index)
        else:
            img = _resize(img, _keep_ratio_size(img, cfg.size, longest=0.0), bicubic, index)
        return _center_crop_or_pad(img, cfg.size, 0)


def as_image_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """One image or a sequence of them -> a list (a single image is a batch of one)."""
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, np.ndarray)):
        return [images]
    if Image is not None and isinstance(images, Image.Image):
        return [images]
    if isinstance(images, (list, tuple)):
        return list(images)
    raise InputError(
        f"images: expected an image or a list of images (PIL.Image, file path, bytes, or uint8 HWC array), "
        f"got {type(images).__name__}"
    )


def open_image(image: ImageInput, index: int = 0) -> tuple[Image.Image, Image.Image | None]:
    """Any accepted input -> a fully loaded PIL image, and the image to close afterwards (or None).

    Decoding happens here, so a truncated file or a decompression bomb is reported now, as an
    InputError that names the input, instead of later inside a resize.
    """
    _require_pil()
    if isinstance(image, Image.Image):
        _load(image, f"image {index}")
        _check_size(image, f"image {index}")
        return image, None
    if isinstance(image, np.ndarray):
        img = _from_array(image, index)
        return img, img
    if isinstance(image, (str, os.PathLike)):
        label = f"image {index} ({os.fspath(image)})"
        path = Path(image)
        if not path.is_file():
            raise InputError(f"{label}: {'a directory, not a file' if path.is_dir() else 'no such file'}")
        source: Any = path
    elif isinstance(image, (bytes, bytearray, memoryview)):
        label = f"image {index} ({len(image)} bytes)"
        source = io.BytesIO(bytes(image))
    else:
        raise InputError(
            f"image {index}: unsupported type {type(image).__name__}; give a PIL.Image, a file path, "
            "bytes, or a uint8 numpy array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)"
        )
    try:
        img = Image.open(source)
    except Image.DecompressionBombError as exc:
        raise InputError(f"{label}: refused as a possible decompression bomb ({exc}). Raise "
                         "PIL.Image.MAX_IMAGE_PIXELS if you trust this image.") from None
    except Image.UnidentifiedImageError:
        raise InputError(f"{label}: not an image file Pillow can read") from None
    except OSError as exc:
        raise InputError(f"{label}: cannot read: {exc}") from None
    try:
        _load(img, label)
        _check_size(img, label)
    except BaseException:
        img.close()
        raise
    return img, img


def _load(img: Image.Image, label: str) -> None:
    try:
        img.load()
    except Image.DecompressionBombError as exc:
        raise InputError(f"{label}: refused as a possible decompression bomb ({exc})") from None
    except MemoryError:
        raise InputError(f"{label}: too large to decode in memory ({img.size[0]}x{img.size[1]})") from None
    except Exception as exc:  # noqa: BLE001 - decoders raise OSError, SyntaxError, struct.error...: all about the file
        raise InputError(f"{label}: cannot decode ({type(exc).__name__}: {exc}); is the file truncated or corrupt?") \
            from None


def _check_size(img: Image.Image, label: str) -> None:
    if img.width < 1 or img.height < 1:
        raise InputError(f"{label}: empty image ({img.width}x{img.height})")


def _from_array(array: np.ndarray, index: int) -> Image.Image:
    label = f"image {index} (numpy array {array.dtype}{list(array.shape)})"
    if array.dtype != np.uint8:
        raise InputError(f"{label}: expected dtype uint8 (0..255 pixels, HWC); convert it first, or pass "
                         "already preprocessed float32 [N, 3, H, W] pixels to encode_pixels()")
    if array.ndim == 3 and array.shape[2] in _ARRAY_MODES:
        mode = _ARRAY_MODES[array.shape[2]]
        array = array[:, :, 0] if array.shape[2] == 1 else array
    elif array.ndim == 2:
        mode = "L"
    else:
        raise InputError(f"{label}: expected shape (H, W), (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise InputError(f"{label}: empty image")
    img = Image.fromarray(np.ascontiguousarray(array))  # uint8 2-D -> L, HxWx3 -> RGB, HxWx4 -> RGBA
    if img.mode != mode:  # pragma: no cover - Pillow's inference changed
        raise InputError(f"{label}: Pillow read it as mode {img.mode}, expected {mode}")
    return img


def _shortest_side_size(img: Image.Image, side: int) -> tuple[int, int]:
    """(h, w) with the shorter side == `side`; the longer side truncated, as torchvision's Resize(int)."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(side * long / short)
    return (new_long, side) if w <= h else (side, new_long)


def _keep_ratio_size(img: Image.Image, target: tuple[int, int], longest: float) -> tuple[int, int]:
    """(h, w) scaled by one ratio: the larger of h/H, w/W (longest=1) or the smaller (longest=0), rounded.

    The float expression is the one open_clip's ResizeKeepRatio evaluates, so rounding agrees.
    """
    w, h = img.size
    ratio_h = h / target[0]
    ratio_w = w / target[1]
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    return round(h * 1.0 / ratio), round(w * 1.0 / ratio)


def _resize(img: Image.Image, size_hw: tuple[int, int], resample: int, index: int) -> Image.Image:
    new_h, new_w = size_hw
    if (img.height, img.width) == (new_h, new_w):
        return img
    if new_h < 1 or new_w < 1:
        raise InputError(f"image {index}: a {img.width}x{img.height} image is too thin to resize "
                         f"(it would become {new_w}x{new_h})")
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and new_h * new_w > limit:
        # e.g. a 1x20000 strip: its short side scaled to 224 would be 224x4480000 pixels.
        raise InputError(f"image {index}: a {img.width}x{img.height} image would be resized to {new_w}x{new_h}, "
                         f"more than PIL.Image.MAX_IMAGE_PIXELS ({limit}); crop it to a sensible aspect ratio")
    return img.resize((new_w, new_h), resample)


def _center_crop_or_pad(img: Image.Image, size_hw: tuple[int, int], fill: int) -> Image.Image:
    """Center crop to (h, w); pad first with `fill` where the image is smaller, as torchvision does."""
    crop_h, crop_w = size_hw
    if crop_w > img.width or crop_h > img.height:
        left = (crop_w - img.width) // 2 if crop_w > img.width else 0
        top = (crop_h - img.height) // 2 if crop_h > img.height else 0
        right = (crop_w - img.width + 1) // 2 if crop_w > img.width else 0
        bottom = (crop_h - img.height + 1) // 2 if crop_h > img.height else 0
        img = _pad(img, (left, top, right, bottom), fill)
        if (img.height, img.width) == (crop_h, crop_w):
            return img
    # Python's round (half to even), as torchvision uses.
    top = round((img.height - crop_h) / 2.0)
    left = round((img.width - crop_w) / 2.0)
    return img.crop((left, top, left + crop_w, top + crop_h))


def _pad(img: Image.Image, border: tuple[int, int, int, int], fill: int) -> Image.Image:
    bands = len(img.getbands())
    color: Any = tuple([fill] * bands) if bands > 1 else fill
    if img.mode != "F":
        color = tuple(int(c) for c in color) if isinstance(color, tuple) else int(color)
    if img.mode == "P":
        palette = img.getpalette()
        out = ImageOps.expand(img, border=border, fill=color)
        if palette is not None:
            out.putpalette(palette)
        return out
    return ImageOps.expand(img, border=border, fill=color)


__all__ = ["ImageInput", "ImagePreprocessor", "PreprocessConfig", "as_image_list", "open_image"]
