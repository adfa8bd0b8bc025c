"""Triton Python-backend model written by `clipexport triton --encoder python`: a tower's ONNX graph
run by ONNX Runtime inside the Python backend (for servers without the onnxruntime backend, such as
the one nvidia-pytriton bundles, and for CPU-only deployments).

`clipexport triton` copies this file, unchanged, to <repo>/<prefix>_<tower>_encoder/1/model.py,
next to model.onnx (and its external weights) and clipexport.json:

    {"input": "pixel_values", "dtype": "float32", "dims": [3, 224, 224],
     "outputs": ["image_embeds"], "threads": 0}

Each request of a batch is checked on its own (tensor present, dtype, shape); the good ones run
as one ONNX Runtime batch and the bad ones get an error each, so one bad request never fails the
requests Triton batched with it. Needs numpy and onnxruntime in Triton's Python (not clipexport).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

CONFIG_FILE = "clipexport.json"


def _pb_utils() -> Any:
    # Only Triton's Python-backend stub process provides this module.
    import triton_python_backend_utils

    return triton_python_backend_utils


class RequestError(Exception):
    """What is wrong with one request (its text goes back to that client)."""


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        import onnxruntime as ort

        here = Path(__file__).resolve().parent
        cfg = json.loads((here / CONFIG_FILE).read_text(encoding="utf-8"))
        self.input_name: str = cfg["input"]
        self.dtype = np.dtype(cfg["dtype"])
        self.dims: tuple[int, ...] = tuple(int(d) for d in cfg["dims"])  # without the batch axis; -1 any
        self.outputs: list[str] = list(cfg["outputs"])
        options = ort.SessionOptions()
        if int(cfg.get("threads", 0)) > 0:
            options.intra_op_num_threads = int(cfg["threads"])
        self.session = ort.InferenceSession(str(here / "model.onnx"), options, providers=["CPUExecutionProvider"])

    def execute(self, requests: Sequence[Any]) -> list[Any]:
        pb = _pb_utils()
        arrays: list[np.ndarray | None] = []
        errors: list[str | None] = []
        for request in requests:
            try:
                arrays.append(self._input(pb, request))
                errors.append(None)
            except RequestError as exc:
                arrays.append(None)
                errors.append(str(exc))
        results = self._run_grouped(arrays, errors)
        responses = []
        for outputs, error in zip(results, errors):
            if error is not None or outputs is None:
                # INVALID_ARG: HTTP 400, the request's fault (older stubs lack the codes: plain 500)
                code = getattr(getattr(pb, "TritonError", None), "INVALID_ARG", None)
                message = error or "no output"
                err = pb.TritonError(message) if code is None else pb.TritonError(message, code)
                responses.append(pb.InferenceResponse(output_tensors=[], error=err))
            else:
                responses.append(pb.InferenceResponse(output_tensors=[pb.Tensor(n, a) for n, a in outputs.items()]))
        return responses

    def finalize(self) -> None:
        self.session = None

    # -- internals ---------------------------------------------------------------------------

    def _input(self, pb: Any, request: Any) -> np.ndarray:
        tensor = pb.get_input_tensor_by_name(request, self.input_name)
        if tensor is None:
            raise RequestError(f"the request has no input {self.input_name!r}")
        array = tensor.as_numpy()
        if array.dtype != self.dtype:
            raise RequestError(f"input {self.input_name!r}: expected {self.dtype}, got {array.dtype}")
        shape = array.shape[1:]
        if len(shape) != len(self.dims) or any(d not in (-1, s) for d, s in zip(self.dims, shape)):
            want = ["N", *("?" if d < 0 else d for d in self.dims)]
            raise RequestError(f"input {self.input_name!r}: expected shape {want}, got {list(array.shape)}")
        return np.ascontiguousarray(array)

    def _run_grouped(self, arrays: list[np.ndarray | None],
                     errors: list[str | None]) -> list[dict[str, np.ndarray] | None]:
        """Run the good requests, those of one shape together; a request ORT refuses fails alone."""
        results: list[dict[str, np.ndarray] | None] = [None] * len(arrays)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, array in enumerate(arrays):
            if array is not None:
                groups.setdefault(array.shape[1:], []).append(i)
        pending = list(groups.values())
        while pending:
            members = pending.pop()
            batch = np.concatenate([arrays[i] for i in members]) if len(members) > 1 else arrays[members[0]]
            try:
                outs = self.session.run(self.outputs, {self.input_name: batch})
            except Exception as exc:  # noqa: BLE001 (ORT's own types) e.g. ids out of range: find the request
                if len(members) > 1:
                    pending.extend([i] for i in members)  # each alone, so only the bad one fails
                else:
                    errors[members[0]] = f"the encoder refused this request: {exc}"
                continue
            start = 0
            for i in members:
                n = len(arrays[i])  # type: ignore[arg-type]
                results[i] = {name: np.ascontiguousarray(out[start:start + n]) for name, out in zip(self.outputs, outs)}
                start += n
        return results
