"""Running a TensorRT engine from Python: Polygraphy's TrtRunner, fed PyTorch CUDA tensors.

    EngineFromBytes(plan) -> TrtRunner (its context, stream and output allocation)
    feeds (CUDA tensors)  -> our profile and dtype checks -> TrtRunner.infer(copy_outputs_to_host=False)
                          -> outputs as CUDA tensors (Polygraphy returns torch when fed torch)

Inputs may have any batch (and, for a trimmed text tower, token count) inside the engine's
optimization profile; outside it is a UsageError, not a TensorRT crash.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipexport.errors import EngineError, UsageError
from clipexport.trt.env import load_tensorrt
from clipexport.trt.profiles import InputProfile

if TYPE_CHECKING:
    import tensorrt as trt
    import torch


def _torch_dtypes() -> dict[str, torch.dtype]:
    import torch

    # Keyed by TensorRT DataType *name*, not value (values were renumbered in 11).
    return {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
            "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}


def _dims(dims: trt.Dims) -> tuple[int, ...]:
    # trt.Dims is indexable but (per the stubs) not iterable.
    return tuple(int(dims[i]) for i in range(len(dims)))


class TensorRTRunner:
    """One deserialized engine, activated in a Polygraphy TrtRunner on one CUDA device."""

    def __init__(self, plan: bytes | Path, device: int = 0) -> None:
        load_tensorrt()
        import tensorrt as trt
        import torch
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        from clipexport.trt.builder import polygraphy_session

        self.device = torch.device("cuda", device)
        data = plan.read_bytes() if isinstance(plan, Path) else plan
        with torch.cuda.device(self.device), polygraphy_session(
                "TensorRT could not load the engine (built for another TensorRT or GPU?)"):
            self.polygraphy = TrtRunner(EngineFromBytes(data))
            self.polygraphy.activate()
        engine: trt.ICudaEngine = self.polygraphy.engine
        self.engine = engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        dtypes = _torch_dtypes()
        self.dtypes: dict[str, torch.dtype] = {}
        for name in names:
            kind = engine.get_tensor_dtype(name).name
            if kind not in dtypes:
                raise EngineError(f"engine tensor {name!r} has dtype {kind}, which the runner cannot hold")
            self.dtypes[name] = dtypes[kind]
        self.profiles = {n: self._profile(n) for n in self.inputs}

    def close(self) -> None:
        """Free the execution context, stream and buffers (Polygraphy's deactivate); idempotent."""
        runner = getattr(self, "polygraphy", None)
        if runner is not None and runner.is_active:
            runner.deactivate()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - at interpreter exit CUDA may already be gone
            pass

    def _profile(self, name: str) -> InputProfile:
        lo, opt, hi = self.engine.get_tensor_profile_shape(name, 0)
        return InputProfile(name, _dims(lo), _dims(opt), _dims(hi))

    def infer(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run once; feeds and results are CUDA tensors on this runner's device."""
        import torch

        from clipexport.trt.builder import polygraphy_session

        if set(feeds) != set(self.inputs):
            raise UsageError(f"engine inputs are {self.inputs}; got {sorted(feeds)}")
        ready: dict[str, torch.Tensor] = {}
        for name in self.inputs:
            tensor = feeds[name]
            shape = tuple(int(s) for s in tensor.shape)
            if not self.profiles[name].contains(shape):
                p = self.profiles[name]
                raise UsageError(f"input {name!r} has shape {shape}, outside the engine's profile "
                                 f"min {p.min} .. max {p.max}")
            want = self.dtypes[name]
            if tensor.dtype != want:
                if tensor.dtype.is_floating_point != want.is_floating_point:
                    raise UsageError(f"input {name!r} is {tensor.dtype}; the engine takes {want}")
                tensor = tensor.to(want)
            ready[name] = tensor.to(self.device).contiguous()
        # Inputs were produced on torch's current stream; Polygraphy's stream must not overtake it.
        torch.cuda.current_stream(self.device).synchronize()
        with torch.cuda.device(self.device), polygraphy_session("TensorRT execution failed"):
            out = self.polygraphy.infer(ready, copy_outputs_to_host=False)
        # Polygraphy's output allocator reuses its buffers on the next call: hand out copies.
        return {name: out[name].clone() for name in self.outputs}


class TensorRTCandidate:
    """A tower engine as a verify.Candidate: numpy batch in, numpy embeddings out."""

    backend = "tensorrt"

    def __init__(self, plan: bytes | Path, input_name: str, output_name: str | None = None, device: int = 0) -> None:
        self.runner = TensorRTRunner(plan, device)
        if input_name not in self.runner.inputs:
            raise EngineError(f"engine has no input {input_name!r}; it has {self.runner.inputs}")
        self.input_name = input_name
        self.output_name = output_name or self.runner.outputs[0]
        if self.output_name not in self.runner.outputs:
            raise EngineError(f"engine has no output {self.output_name!r}; it has {self.runner.outputs}")

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import torch

        out = self.runner.infer({self.input_name: torch.from_numpy(np.ascontiguousarray(batch))})
        result: Any = out[self.output_name].float().cpu().numpy()
        return np.asarray(result)
