"""TensorRT engines for clipexport towers.

    env.py              is TensorRT (the real bindings) here, which version, which GPU
    profiles.py         min/opt/max shapes per input from the recipe's batch range (+ token axis)
    cache.py            engine cache keys (ONNX sha256, TensorRT, GPU, profile, precision, settings)
    timing_cache.py     where the persistent timing cache lives
    builder.py          ONNX file -> strongly typed engine, composed of Polygraphy's loaders (10.x, 11.x)
    compat.py           the TensorRT-compatibility gate: support_matrix.toml -> per-tower verdict
    layer_info.py       engine layer information (JSON) -> was each attention block fused?
    attention_kernel.py our Triton attention kernel (imports without a GPU)
    plugin.py           that kernel as an ahead-of-time TensorRT Python plugin
    runner.py           run an engine (Polygraphy's TrtRunner) on torch CUDA tensors; a verify.Candidate
    pipeline.py         the build's engine step

Nothing here imports `tensorrt` at module import time: `import clipexport.trt` works
without TensorRT, and every TensorRT call goes through env.load_tensorrt(), which
raises BackendUnavailableError with instructions when it is missing.
"""

from __future__ import annotations

from clipexport.trt.env import Availability, GpuInfo, load_tensorrt, probe

__all__ = ["Availability", "GpuInfo", "load_tensorrt", "probe"]
