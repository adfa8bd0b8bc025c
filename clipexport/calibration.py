"""Calibration inputs for the fp16 range guard and int8/fp8 activation scales.

The user's own data is best: a folder of images (preprocessed exactly as open_clip does
for these weights) and a text file of prompts, one per line. Without them we fall back to
a built-in set and say so in the manifest: synthetic images (smooth random colour fields
with edges, not photographs) and templated ImageNet-style prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipexport.errors import UsageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# A few everyday classes for the fallback prompts; with the templates below they read like
# the zero-shot prompts a CLIP service embeds.
FALLBACK_CLASSES = (
    "dog", "cat", "car", "bicycle", "airplane", "bird", "horse", "ship", "truck", "frog", "pizza", "guitar",
    "mountain", "beach", "street sign", "laptop", "coffee mug", "sunflower", "lighthouse", "tennis ball",
)
TEMPLATES = ("a photo of a {}.", "a blurry photo of the {}.", "a drawing of a {}.", "itap of my {}.")
CLASS_PROMPT = "a photo of a {}."


@dataclass
class CalibrationSet:
    """Batches fed to one tower's graph, and where they came from (for the manifest)."""

    batches: list[np.ndarray]
    source: str  # "user" or "synthetic"
    description: str

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "description": self.description,
                "items": int(sum(b.shape[0] for b in self.batches))}


def _chunks(array: np.ndarray, size: int) -> list[np.ndarray]:
    return [array[i:i + size] for i in range(0, array.shape[0], size)]


def synthetic_images(count: int, image_size: int, mean: Sequence[float], std: Sequence[float], seed: int) -> np.ndarray:
    """Normalized [count, 3, S, S] float32 images: smooth colour fields plus a few hard edges.

    Not photographs: they only give activations image-like statistics (local correlation,
    edges, a spread of colours) rather than white noise's.
    """
    rng = np.random.default_rng(seed)
    out = np.empty((count, 3, image_size, image_size), np.float32)
    axis = np.linspace(0.0, 1.0, image_size, dtype=np.float32)
    for k in range(count):
        coarse = rng.random((3, 4, 4), dtype=np.float32)
        # bilinear upsampling of a 4x4 grid: smooth gradients across the image
        idx = axis * 3
        lo = np.floor(idx).astype(int).clip(0, 2)
        frac = idx - lo
        rows = coarse[:, lo, :] * (1 - frac)[None, :, None] + coarse[:, lo + 1, :] * frac[None, :, None]
        img = rows[:, :, lo] * (1 - frac)[None, None, :] + rows[:, :, lo + 1] * frac[None, None, :]
        for _ in range(3):  # rectangles: hard edges and flat regions
            y0, x0 = rng.integers(0, image_size, 2)
            h, w = rng.integers(image_size // 8, image_size // 2, 2)
            img[:, y0:y0 + h, x0:x0 + w] = rng.random((3, 1, 1), dtype=np.float32)
        img += rng.normal(0, 0.02, img.shape).astype(np.float32)
        out[k] = (img.clip(0, 1) - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]
    return out


def user_images(directory: Path, count: int, preprocess: Any) -> np.ndarray:
    """Up to `count` images of a folder, preprocessed by open_clip's own transform."""
    from PIL import Image

    if not directory.is_dir():
        raise UsageError(f"--calibration-images {directory}: not a directory")
    paths = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:count]
    if not paths:
        raise UsageError(f"--calibration-images {directory}: no {', '.join(IMAGE_SUFFIXES)} files")
    arrays = []
    for path in paths:
        try:
            with Image.open(path) as img:
                arrays.append(preprocess(img.convert("RGB")).numpy())
        except OSError as exc:
            raise UsageError(f"--calibration-images: cannot read {path}: {exc}") from None
    return np.stack(arrays).astype(np.float32)


def fallback_prompts(count: int) -> list[str]:
    from clipexport.prompts import PARITY_PROMPTS

    templated = [t.format(c) for c in FALLBACK_CLASSES for t in TEMPLATES]
    return (list(PARITY_PROMPTS) + templated)[:max(count, 1)]


def user_prompts(path: Path, count: int) -> list[str]:
    if not path.is_file():
        raise UsageError(f"--calibration-prompts {path}: not a file")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise UsageError(f"--calibration-prompts {path}: no prompts (one per line)")
    return lines[:count]


def image_calibration(ref: Any, count: int, seed: int, directory: Path | None = None,
                      batch_size: int = 4) -> CalibrationSet:
    """Calibration batches for an image tower."""
    cfg = ref.preprocess_config()
    if directory is not None:
        import open_clip

        preprocess = open_clip.image_transform(
            ref.image_size, is_train=False, mean=cfg.get("mean"), std=cfg.get("std"),
            resize_mode=cfg.get("resize_mode"), interpolation=cfg.get("interpolation"))
        images = user_images(Path(directory), count, preprocess)
        return CalibrationSet(_chunks(images, batch_size), "user",
                              f"{images.shape[0]} images from {directory}, preprocessed as open_clip does")
    images = synthetic_images(count, ref.image_size, cfg["mean"], cfg["std"], seed)
    return CalibrationSet(_chunks(images, batch_size), "synthetic",
                          f"{count} synthetic images (smooth random colour fields with rectangles; no user "
                          "images given: pass --calibration-images DIR for scales fitted to real data)")


def text_calibration(ref: Any, count: int, path: Path | None = None, batch_size: int = 8) -> CalibrationSet:
    """Calibration batches for a text tower: full-length ids (the padding after EOT included)."""
    prompts = user_prompts(Path(path), count) if path is not None else fallback_prompts(count)
    ids = ref.tokenizer()(prompts).numpy()
    if path is not None:
        return CalibrationSet(_chunks(ids, batch_size), "user", f"{len(prompts)} prompts from {path}")
    return CalibrationSet(_chunks(ids, batch_size), "synthetic",
                          f"{len(prompts)} built-in prompts (parity prompts and 'a photo of a {{class}}.' "
                          "templates; pass --calibration-prompts FILE for your own)")


def class_prompts() -> list[str]:
    """Zero-shot class prompts used for top-1 agreement in parity."""
    return [CLASS_PROMPT.format(c) for c in FALLBACK_CLASSES]
