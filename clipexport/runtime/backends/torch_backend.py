"""PyTorch: the open_clip reference rebuilt from the manifest (model, weights, seed).

Needs the export extra (torch, open_clip). It runs the same towers the build exported, so
its numbers are the reference the ONNX graphs were verified against.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from clipexport.errors import BackendUnavailableError, WeightsError
from clipexport.runtime.backends import Backend, parse_device


class TorchBackend(Backend):
    name = "pytorch"
    # The reference text tower adds the full positional embedding: it needs all context_length columns.
    dynamic_text_length = False

    def __init__(self, directory: Path, manifest: Mapping[str, Any], device: str | None = None) -> None:
        try:
            import torch

            from clipexport.models import load_reference
            from clipexport.models.weights import FILE
        except ImportError as exc:
            raise BackendUnavailableError(
                f"the PyTorch backend needs torch and open_clip ({exc}); `pip install clipexport[export]`"
            ) from None
        from clipexport.hashing import file_sha256

        wanted = parse_device(device)
        if wanted is None:
            wanted = ("cuda", 0) if torch.cuda.is_available() else ("cpu", 0)
        if wanted[0] == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError(f"device {device!r}: torch {torch.__version__} sees no CUDA GPU")
        self._torch = torch
        self._device = torch.device(f"cuda:{wanted[1]}" if wanted[0] == "cuda" else "cpu")
        self.device = str(self._device)

        weights = manifest["weights"]
        if weights["kind"] == FILE:
            path = Path(weights["value"])
            if not path.is_file():
                raise WeightsError(f"the PyTorch backend needs the checkpoint this artifact was built from: {path}")
            if file_sha256(path) != weights.get("sha256"):
                raise WeightsError(f"the checkpoint {path} changed since the build (sha256 differs)")
        ref = load_reference(manifest["model"], weights["value"], int(weights["seed"]))
        self._modules: dict[str, Any] = {}
        for tower in manifest["towers"]:
            module = ref.tower(tower)
            self._modules[tower] = module.to(self._device).eval()

    @property
    def towers(self) -> tuple[str, ...]:
        return tuple(self._modules)

    def run(self, tower: str, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():  # thread-local; the modules are read-only in eval mode
            out = self._modules[tower](torch.from_numpy(np.ascontiguousarray(batch)).to(self._device))
        return out.float().cpu().numpy()

    def details(self) -> dict[str, Any]:
        return {"torch": self._torch.__version__}

    def close(self) -> None:
        self._modules.clear()
