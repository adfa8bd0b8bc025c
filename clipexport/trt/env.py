"""Is TensorRT here, which version, and which CUDA GPU: checked lazily, answered with reasons.

`import tensorrt` alone proves nothing: installing `tensorrt-stubs` (for mypy) leaves a
`tensorrt/` directory holding only `.pyi` files, which Python imports as an empty
namespace package. We therefore check for the real bindings (`Builder`, `__version__`).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from types import ModuleType

from clipexport.errors import BackendUnavailableError

HOW_TO_GET_TENSORRT = (
    "install TensorRT 10.8+ where NVIDIA's package index is reachable "
    "(`pip install 'clipexport[tensorrt]'`) on a machine with a CUDA GPU, then build with --backend tensorrt"
)


@dataclass(frozen=True)
class GpuInfo:
    """The CUDA device an engine is built for; engines only run on the same kind of GPU."""

    name: str
    compute_capability: tuple[int, int]

    @property
    def sm(self) -> str:
        """Compute capability as `major.minor`, e.g. `9.0` for an H100."""
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"


@dataclass(frozen=True)
class Availability:
    tensorrt_version: str | None
    gpu: GpuInfo | None
    reason: str  # empty when both are present

    @property
    def ok(self) -> bool:
        return self.tensorrt_version is not None and self.gpu is not None


def load_tensorrt() -> ModuleType:
    """The real `tensorrt` module, or BackendUnavailableError saying why and how to get it."""
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as exc:  # the bindings wheel without its libs fails here (libnvonnxparser missing)
        raise BackendUnavailableError(f"TensorRT cannot be imported ({exc}); {HOW_TO_GET_TENSORRT}") from None
    except OSError as exc:
        raise BackendUnavailableError(f"TensorRT's libraries fail to load ({exc}); {HOW_TO_GET_TENSORRT}") from None
    if not hasattr(trt, "Builder") or not isinstance(getattr(trt, "__version__", None), str):
        raise BackendUnavailableError(
            "TensorRT is not installed (only type stubs or an empty `tensorrt` package were found); "
            + HOW_TO_GET_TENSORRT
        )
    return trt


def version_tuple(text: str) -> tuple[int, ...]:
    """`10.14.1.48` -> (10, 14, 1, 48); pre-release tails such as `rc1` are dropped."""
    parts = []
    for piece in text.split("."):
        match = re.match(r"\d+", piece)
        if not match:
            break
        parts.append(int(match.group()))
    return tuple(parts)


def tensorrt_version() -> str:
    return str(load_tensorrt().__version__)


def cuda_gpu(device: int = 0) -> GpuInfo:
    """Name and compute capability of a CUDA device, through torch (which the build has anyway)."""
    try:
        import torch
    except ImportError:
        raise BackendUnavailableError("PyTorch is needed to drive TensorRT engines; install clipexport[export]") from None
    if not torch.cuda.is_available():
        raise BackendUnavailableError("no CUDA GPU is visible (torch.cuda.is_available() is False); "
                                      "TensorRT engines are built on the GPU they will run on")
    if device >= torch.cuda.device_count():
        raise BackendUnavailableError(f"CUDA device {device} does not exist ({torch.cuda.device_count()} visible)")
    major, minor = torch.cuda.get_device_capability(device)
    return GpuInfo(name=str(torch.cuda.get_device_name(device)), compute_capability=(int(major), int(minor)))


def probe(device: int = 0) -> Availability:
    """Both TensorRT and a GPU, or the first reason one is missing; never raises."""
    version: str | None = None
    gpu: GpuInfo | None = None
    reasons = []
    try:
        version = tensorrt_version()
    except BackendUnavailableError as exc:
        reasons.append(str(exc))
    try:
        gpu = cuda_gpu(device)
    except BackendUnavailableError as exc:
        reasons.append(str(exc))
    return Availability(tensorrt_version=version, gpu=gpu, reason="; ".join(reasons))


def has_native_attention(trt: ModuleType) -> bool:
    """TensorRT 10.14+ has an attention layer (`INetworkDefinition.add_attention`); the ONNX
    parser imports ONNX `Attention` into it. Not in the 10.13 stubs, hence a feature check."""
    network_cls = getattr(trt, "INetworkDefinition", None)
    return network_cls is not None and hasattr(network_cls, "add_attention")


def has_aot_python_plugins(trt: ModuleType) -> bool:
    """`tensorrt.plugin` with `aot_impl` (TensorRT 10.9+): plugins compiled into the engine."""
    try:
        trtp = importlib.import_module("tensorrt.plugin")
    except ImportError:
        return False
    return hasattr(trtp, "aot_impl") and hasattr(trtp, "KernelLaunchParams")
