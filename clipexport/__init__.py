"""clipexport: export CLIP towers to verified ONNX (and TensorRT) artifacts.

Heavy libraries (torch, open_clip, onnxruntime) are imported lazily by the modules
that need them, so `import clipexport` and `clipexport --help` stay fast.
"""

from __future__ import annotations

__version__ = "0.1.0"

from clipexport.errors import (  # noqa: E402
    ArtifactError,
    ClipExportError,
    ExportError,
    InputError,
    ParityError,
    RecipeError,
    UnknownModelError,
    UnsupportedModelError,
    UsageError,
    WeightsError,
)

# The runtime (numpy, Pillow, onnxruntime) loads on first use of these names, not on `import clipexport`.
_LAZY = {"load": "clipexport.runtime", "Runtime": "clipexport.runtime"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'clipexport' has no attribute {name!r}")


__all__ = [
    "__version__",
    "load",
    "Runtime",
    "ArtifactError",
    "ClipExportError",
    "ExportError",
    "InputError",
    "ParityError",
    "RecipeError",
    "UnknownModelError",
    "UnsupportedModelError",
    "UsageError",
    "WeightsError",
]
