"""Backends: what runs a tower's graph. One small interface, three implementations.

    Backend.run(tower, array) -> array        thread-safe; tower is "image" or "text"
      image: float32 [B, 3, H, W] -> float32 [B, D]
      text:  int64   [B, L]       -> float32 [B, D]   (L < context_length only if
                                                        `dynamic_text_length` and the manifest allows it)

`open_backend(name, directory, manifest, device)` picks one. With name "auto" it tries, in
order, TensorRT, ONNX Runtime, PyTorch, and records why each one it skipped was skipped.
A backend that cannot run here raises BackendUnavailableError from its factory; nothing
falls back silently: the chosen backend says which device it runs on, and a GPU request
that ends up on the CPU is an error (explicit device) or a RuntimeWarning (auto).

A new backend (e.g. clipexport.trt's engine runner) plugs in with `register_backend`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from clipexport.errors import BackendUnavailableError, UsageError
from clipexport.manifest import Manifest


class Backend(abc.ABC):
    """Runs the towers of one artifact on one device."""

    #: "tensorrt", "onnxruntime" or "pytorch"
    name: str = ""
    #: "cpu", "cuda:0", ...: where the towers actually run (not where they were asked to)
    device: str = "cpu"
    #: False when the backend needs text ids at the full context length even if the graph is dynamic
    dynamic_text_length: bool = True

    @property
    @abc.abstractmethod
    def towers(self) -> tuple[str, ...]:
        """The towers this backend has loaded."""

    @abc.abstractmethod
    def run(self, tower: str, batch: np.ndarray) -> np.ndarray:
        """Run one tower on one batch; must be safe to call from many threads at once."""

    def details(self) -> dict[str, Any]:
        """Backend-specific facts for logs and repr (e.g. ONNX Runtime's providers)."""
        return {}

    def close(self) -> None:
        """Release sessions and device memory; the backend is unusable afterwards."""


#: factory(directory, manifest, device) -> Backend; raises BackendUnavailableError when it cannot run here.
BackendFactory = Callable[[Path, Manifest, "str | None"], Backend]

_FACTORIES: dict[str, BackendFactory] = {}
#: The order "auto" tries.
AUTO_ORDER: list[str] = []


def register_backend(name: str, factory: BackendFactory, auto_position: int | None = None) -> None:
    """Add a backend. auto_position: where "auto" tries it (None: last). A duplicate name is an error."""
    if name in _FACTORIES or name == "auto":
        raise ValueError(f"backend {name!r} is already registered")
    _FACTORIES[name] = factory
    AUTO_ORDER.insert(len(AUTO_ORDER) if auto_position is None else auto_position, name)


def backend_names() -> list[str]:
    return list(AUTO_ORDER)


def parse_device(device: str | None) -> tuple[str, int] | None:
    """None -> None (the backend's best); "cpu" -> ("cpu", 0); "cuda" / "cuda:N" -> ("cuda", N)."""
    if device is None:
        return None
    text = str(device).strip().lower()
    if text == "cpu":
        return ("cpu", 0)
    if text == "cuda" or text == "gpu":
        return ("cuda", 0)
    if text.startswith("cuda:") and text[5:].isdigit():
        return ("cuda", int(text[5:]))
    raise UsageError(f"device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'")


def open_backend(
    name: str, directory: Path, manifest: Manifest, device: str | None = None
) -> tuple[Backend, dict[str, str]]:
    """Open the named backend ("auto": the first that works); return it and {skipped name: reason}."""
    parse_device(device)  # a malformed device is a usage error before anything loads
    if name != "auto" and name not in _FACTORIES:
        raise UsageError(f"backend {name!r}: choose one of auto, {', '.join(AUTO_ORDER)}")
    if name != "auto":
        return _FACTORIES[name](directory, manifest, device), {}
    skipped: dict[str, str] = {}
    for candidate in AUTO_ORDER:
        try:
            return _FACTORIES[candidate](directory, manifest, device), skipped
        except BackendUnavailableError as exc:
            skipped[candidate] = str(exc)
    reasons = "; ".join(f"{k}: {v}" for k, v in skipped.items())
    raise BackendUnavailableError(f"no backend can run {directory} here ({reasons})")


def _onnxruntime(directory: Path, manifest: Manifest, device: str | None) -> Backend:
    from clipexport.runtime.backends.ort_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend(directory, manifest, device)


def _pytorch(directory: Path, manifest: Manifest, device: str | None) -> Backend:
    from clipexport.runtime.backends.torch_backend import TorchBackend

    return TorchBackend(directory, manifest, device)


def _tensorrt(directory: Path, manifest: Manifest, device: str | None) -> Backend:
    from clipexport.runtime.backends.trt_backend import open_tensorrt

    return open_tensorrt(directory, manifest, device)


register_backend("tensorrt", _tensorrt)
register_backend("onnxruntime", _onnxruntime)
register_backend("pytorch", _pytorch)

__all__ = [
    "AUTO_ORDER",
    "Backend",
    "BackendFactory",
    "backend_names",
    "open_backend",
    "parse_device",
    "register_backend",
]
