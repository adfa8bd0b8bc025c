"""ONNX Runtime: CUDA when the installed onnxruntime has it (onnxruntime-gpu), else CPU."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from clipexport.errors import ArtifactError, BackendUnavailableError
from clipexport.manifest import Manifest, TensorInfo, check_tower_io
from clipexport.runtime.backends import Backend, parse_device

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class OnnxRuntimeBackend(Backend):
    """One InferenceSession per tower. `InferenceSession.run` is thread-safe, so is this."""

    name = "onnxruntime"

    def __init__(self, directory: Path, manifest: Manifest, device: str | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailableError(
                f"onnxruntime is not installed ({exc}); `pip install clipexport[runtime]`"
            ) from None
        self._ort = ort
        available = ort.get_available_providers()
        wanted = parse_device(device)
        if wanted is None:
            wanted = ("cuda", 0) if CUDA in available else ("cpu", 0)
            explicit = False
        else:
            explicit = True
        if wanted[0] == "cuda" and CUDA not in available:
            raise BackendUnavailableError(
                f"device {device!r}: this onnxruntime has no CUDA provider (available: {', '.join(available)}); "
                "install onnxruntime-gpu, or use device='cpu'"
            )
        providers: list[Any] = [(CUDA, {"device_id": wanted[1]}), CPU] if wanted[0] == "cuda" else [CPU]
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: unused-initializer warnings are noise to a user
        self._sessions: dict[str, Any] = {}
        self._input_names: dict[str, str] = {}
        self.device = f"cuda:{wanted[1]}" if wanted[0] == "cuda" else "cpu"
        for tower, entry in manifest.towers.items():
            path = Path(directory) / entry.onnx
            try:
                session = ort.InferenceSession(str(path), options, providers=providers)
            except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types for bad graphs
                raise ArtifactError(f"onnxruntime cannot load {path}: {exc}") from None
            if wanted[0] == "cuda" and CUDA not in session.get_providers():
                # ORT quietly drops a provider whose libraries fail to load (CUDA/cuDNN mismatch).
                message = (f"onnxruntime's CUDA provider failed to load for {path.name} "
                           f"(providers in use: {session.get_providers()})")
                if explicit:
                    raise BackendUnavailableError(message + "; check the CUDA and cuDNN libraries")
                warnings.warn(message + "; running on the CPU", RuntimeWarning, stacklevel=3)
                self.device = "cpu"
            # The graph must be this tower's (an image tower pointed at text.onnx is refused here).
            check_tower_io(directory, entry, _infos(session.get_inputs()), _infos(session.get_outputs()))
            self._sessions[tower] = session
            self._input_names[tower] = session.get_inputs()[0].name

    @property
    def towers(self) -> tuple[str, ...]:
        return tuple(self._sessions)

    def run(self, tower: str, batch: np.ndarray) -> np.ndarray:
        (out,) = self._sessions[tower].run(None, {self._input_names[tower]: batch})
        return np.asarray(out)

    def details(self) -> dict[str, Any]:
        providers = {t: list(s.get_providers()) for t, s in self._sessions.items()}
        return {"onnxruntime": self._ort.__version__, "providers": providers}

    def close(self) -> None:
        self._sessions.clear()


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
              "tensor(int64)": "int64", "tensor(int32)": "int32"}


def _infos(args: Any) -> list[TensorInfo]:
    """ONNX Runtime's NodeArgs as manifest TensorInfos (None axes never occur in our graphs)."""
    return [TensorInfo(a.name, _ORT_TYPES.get(a.type, a.type), tuple(a.shape)) for a in args]
