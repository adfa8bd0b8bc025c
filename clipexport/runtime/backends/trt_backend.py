"""TensorRT: the engines a build stored in the artifact, run with clipexport.trt's runner.

A build on a GPU with TensorRT writes, per tower, `manifest["towers"][tower]["engine"]` =
{"file": "<tower>.<digest>.plan", "key": {... tensorrt_version, gpu_name, compute_capability ...}, ...};
the plan file is in `manifest["files"]`, so load() has checked its sha256 already.

A plan only runs on the TensorRT version and GPU model it was built for, and deserializing a
foreign plan can crash the process; so the stored key is compared with this machine first,
and a mismatch is a BackendUnavailableError ("auto" then moves on to ONNX Runtime).

Each tower has one TensorRT execution context and one CUDA stream, so runs of one tower are
serialized with a lock (the image and text towers still run concurrently).

Another engine runner can replace this one: `register_backend` a factory under a new name,
or have `clipexport.trt.runner` provide `open_backend(directory, manifest, device) -> Backend`,
which this module prefers when present.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from clipexport.errors import BackendUnavailableError, ClipExportError
from clipexport.runtime.backends import Backend, parse_device


def open_tensorrt(directory: Path, manifest: Mapping[str, Any], device: str | None) -> Backend:
    wanted = parse_device(device)
    if wanted is not None and wanted[0] == "cpu":
        raise BackendUnavailableError("TensorRT runs on a CUDA GPU only, not on device 'cpu'")
    try:
        import tensorrt
    except Exception as exc:  # noqa: BLE001 - a broken install raises OSError/ImportError from its .so files
        raise BackendUnavailableError(f"TensorRT is not installed or does not load (import tensorrt: {exc})") from None
    # `tensorrt-stubs` (type stubs for mypy) makes `import tensorrt` succeed as an empty namespace package.
    if not isinstance(getattr(tensorrt, "__version__", None), str) or not hasattr(tensorrt, "Runtime"):
        raise BackendUnavailableError("TensorRT is not installed (`import tensorrt` found only type stubs "
                                      "or an empty package)")
    try:
        from clipexport.trt import runner
    except ImportError as exc:
        raise BackendUnavailableError(f"this clipexport has no TensorRT engine runner ({exc})") from None
    custom = getattr(runner, "open_backend", None)
    if callable(custom):
        backend: Backend = custom(Path(directory), manifest, device)
        return backend
    return TensorRTBackend(Path(directory), manifest, wanted[1] if wanted else 0)


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, directory: Path, manifest: Mapping[str, Any], device_index: int = 0) -> None:
        from clipexport.trt.cache import EngineKey
        from clipexport.trt.env import cuda_gpu, tensorrt_version
        from clipexport.trt.runner import TensorRTCandidate

        entries = {tower: info.get("engine") for tower, info in manifest["towers"].items()}
        missing = [tower for tower, entry in entries.items() if not entry]
        if missing:
            raise BackendUnavailableError(
                f"the artifact has no TensorRT engine for the {', '.join(missing)} tower; build it with "
                "`clipexport build --backend tensorrt` on this kind of GPU"
            )
        gpu = cuda_gpu(device_index)  # BackendUnavailableError without a GPU
        version = tensorrt_version()
        for tower, entry in entries.items():
            try:
                key = EngineKey.from_json(entry["key"])
            except (ClipExportError, KeyError, TypeError) as exc:
                raise BackendUnavailableError(f"the {tower} engine's key in the manifest is unreadable ({exc})") \
                    from None
            here = (version, gpu.name, gpu.sm)
            built = (key.tensorrt_version, key.gpu_name, key.compute_capability)
            if built != here:
                raise BackendUnavailableError(
                    f"the {tower} engine was built with TensorRT {built[0]} for {built[1]} (sm {built[2]}); "
                    f"this machine has TensorRT {here[0]} and {here[1]} (sm {here[2]}): rebuild the artifact here"
                )
        self.device = f"cuda:{device_index}"
        self._candidates: dict[str, Any] = {}
        self._locks: dict[str, threading.Lock] = {}
        for tower, entry in entries.items():
            spec = manifest["towers"][tower]
            output = spec["outputs"][0]["name"] if spec.get("outputs") else None
            self._candidates[tower] = TensorRTCandidate(Path(directory) / entry["file"], spec["inputs"][0]["name"],
                                                        output, device_index)
            self._locks[tower] = threading.Lock()
        self._version = version
        self._gpu = gpu.name

    @property
    def towers(self) -> tuple[str, ...]:
        return tuple(self._candidates)

    def run(self, tower: str, batch: np.ndarray) -> np.ndarray:
        with self._locks[tower]:  # one execution context per tower
            return np.asarray(self._candidates[tower](batch))

    def details(self) -> dict[str, Any]:
        return {"tensorrt": self._version, "gpu": self._gpu}

    def close(self) -> None:
        self._candidates.clear()
