"""Our attention plugin for TensorRT: a Python plugin (`tensorrt.plugin`, TensorRT 10.9+)
whose implementation is the Triton kernel of clipexport.trt.attention_kernel, compiled
ahead of time (`@trtp.aot_impl`) so its PTX is stored inside the engine and the engine
runs without Python - in trtexec, C++, or our runner alike.

For TensorRT versions without the native attention layer (< 10.14): the pass
clipexport.passes.attention_plugin rewrites each attention block into one ONNX node

    clip_attention(q, k, v) -> y        domain "clipexport.trt", attributes:
        plugin_namespace = "clipexport"  (the ONNX parser finds the plugin by op type + namespace)
        scale  (float, 0 = 1/sqrt(head width))
        causal (int 0/1)
        aot    (int 1: use the ahead-of-time implementation)

q, k, v, y: [batch, heads, tokens, head width], one dtype (fp32, fp16 or bf16).

`tensorrt.plugin` is not in the type stubs, so it is imported dynamically and typed Any.
"""

# No `from __future__ import annotations` here: tensorrt.plugin inspects the annotations of
# the functions it registers, and needs the real classes rather than strings.

import importlib
import threading
from typing import Any

from clipexport.errors import BackendUnavailableError, EngineError

PLUGIN_NAMESPACE = "clipexport"
PLUGIN_NAME = "clip_attention"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
PLUGIN_DOMAIN = "clipexport.trt"  # ONNX domain of the plugin node (any custom domain passes onnx.checker)
PLUGIN_VERSION = "1"

_lock = threading.Lock()
_registered = False


def _dtype_name(trt: Any, dtype: Any) -> str:
    names = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}
    for attr, name in names.items():
        if getattr(trt, attr, None) is not None and dtype == getattr(trt, attr):
            return name
    raise EngineError(f"the attention plugin supports fp32, fp16 and bf16 tensors, not {dtype}")


def _constant(expr: Any, what: str) -> int:
    if not getattr(expr, "is_constant", False):
        raise EngineError(f"the attention plugin needs a fixed {what}; the graph has a dynamic one")
    return int(expr.constant_value)


def register_attention_plugin() -> None:
    """Register `clipexport::clip_attention` with TensorRT's plugin registry (once per process).

    Must run before an ONNX graph with plugin nodes is parsed. Raises
    BackendUnavailableError when this TensorRT has no ahead-of-time Python plugins.
    """
    global _registered
    with _lock:
        if _registered:
            return
        from clipexport.trt.env import has_aot_python_plugins, load_tensorrt

        trt = load_tensorrt()
        if not has_aot_python_plugins(trt):
            raise BackendUnavailableError(
                f"TensorRT {trt.__version__} has no ahead-of-time Python plugins (tensorrt.plugin.aot_impl, "
                "TensorRT 10.9+); the clipexport attention plugin needs them. Use TensorRT 10.14+ for "
                "native attention, or 10.9+ for the plugin."
            )
        trtp = importlib.import_module("tensorrt.plugin")
        _register(trt, trtp)
        _registered = True


def _register(trt: Any, trtp: Any) -> None:
    from clipexport.trt.attention_kernel import KernelConfig, compile_attention, default_scale
    from clipexport.trt.env import cuda_gpu

    def describe(q, k, v, scale, causal):  # type: ignore[no-untyped-def]
        # Output: same shape and dtype as q.
        return q.like()

    describe.__annotations__ = {
        "q": trtp.TensorDesc, "k": trtp.TensorDesc, "v": trtp.TensorDesc,
        "scale": float, "causal": int, "return": trtp.TensorDesc,
    }
    trtp.register(PLUGIN_ID)(describe)

    def autotune(q, k, v, outputs):  # type: ignore[no-untyped-def]
        # One type for all four tensors (positions zip, they do not multiply); plain row-major.
        return [trtp.AutoTuneCombination("FP32|FP16|BF16, FP32|FP16|BF16, FP32|FP16|BF16, FP32|FP16|BF16",
                                         "LINEAR")]

    # autotune and aot_impl need no annotations (tensorrt.plugin only validates those given);
    # register's annotations are what tell tensors (TensorDesc) from attributes (float, int).
    trtp.autotune(PLUGIN_ID)(autotune)

    def aot(q, k, v, scale, causal, outputs):  # type: ignore[no-untyped-def]
        shape = q.shape_expr  # [B, H, S, D]; B and S may be dynamic, D is fixed by the graph
        head_dim = _constant(shape[3], "head width")
        config = KernelConfig(
            dtype=_dtype_name(trt, q.dtype),
            head_dim=head_dim,
            scale=float(scale) if scale > 0 else default_scale(head_dim),
            causal=bool(causal),
        )
        # PTX for the GPU the engine is being built on (engines are per-GPU anyway).
        compiled = compile_attention(config, cuda_gpu().compute_capability)
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(shape[2], compiled.block_m)
        launch.grid_y = shape[0] * shape[1]
        launch.block_x = compiled.num_warps * 32
        launch.shared_mem = compiled.shared_mem
        # The kernel's one int32 scalar, the token count: symbolic, resolved per launch.
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(shape[2])])
        return compiled.name.encode(), compiled.ptx.encode(), launch, extra

    trtp.aot_impl(PLUGIN_ID)(aot)
