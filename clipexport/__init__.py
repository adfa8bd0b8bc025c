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
    ParityError,
    RecipeError,
    UnknownModelError,
    UnsupportedModelError,
    UsageError,
    WeightsError,
)

__all__ = [
    "__version__",
    "ArtifactError",
    "ClipExportError",
    "ExportError",
    "ParityError",
    "RecipeError",
    "UnknownModelError",
    "UnsupportedModelError",
    "UsageError",
    "WeightsError",
]
