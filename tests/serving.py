"""Helpers for the tests that talk to a real Triton server: inputs, clients, the bundled server."""

from __future__ import annotations

import io

import numpy as np
import pytest

TEXTS = ["a photo of a dog.", "東京の夜景 🍕", "tom &amp; jerry", "a very long caption " * 30]


def require_bundled_triton() -> None:
    """Skip (one line) where nvidia-pytriton's tritonserver is not installed."""
    from clipexport.errors import UsageError
    from clipexport.triton.server import bundled_triton

    try:
        bundled_triton()
    except UsageError as exc:
        pytest.skip(f"no bundled tritonserver: {exc}")
    pytest.importorskip("tritonclient.http")
    pytest.importorskip("tritonclient.grpc")


def encoded_images(count: int = 4, seed: int = 0) -> list[bytes]:
    """PNG/JPEG files of several sizes and modes (RGB, RGBA, L), as bytes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    kinds = [((40, 30), "PNG", "RGB"), ((17, 64), "JPEG", "RGB"), ((32, 32), "PNG", "RGBA"), ((100, 7), "JPEG", "L")]
    out = []
    for i in range(count):
        (w, h), fmt, mode = kinds[i % len(kinds)]
        channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        image = Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels, mode)
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        out.append(buffer.getvalue())
    return out


def strings(values: list[bytes]) -> np.ndarray:
    """TYPE_STRING [N, 1]: one item per batch row, as the models take it."""
    return np.array(values, dtype=object).reshape(-1, 1)


def infer_http(url: str, model: str, name: str, values: list[bytes], timeout_s: float = 60.0) -> np.ndarray:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
    try:
        tensor = httpclient.InferInput(name, [len(values), 1], "BYTES")
        tensor.set_data_from_numpy(strings(values))
        return client.infer(model, [tensor]).as_numpy("embedding")
    finally:
        client.close()


def infer_grpc(url: str, model: str, name: str, values: list[bytes], timeout_s: float = 60.0) -> np.ndarray:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        tensor = grpcclient.InferInput(name, [len(values), 1], "BYTES")
        tensor.set_data_from_numpy(strings(values))
        return client.infer(model, [tensor], client_timeout=timeout_s).as_numpy("embedding")
    finally:
        client.close()
