"""Triton Python-backend model of `clipexport serve`: raw images or texts -> embeddings, one tower.

`clipexport serve` copies this file to <repo>/clip_image/1/model.py (and clip_text/1/) with a
clipexport.json beside it:

    {"artifact": "/abs/engines/ViT-B-32-none-fp32", "tower": "image", "input": "image",
     "backend": "auto", "device": null, "normalize": false, "max_request_bytes": 16777216}

    clip_image   "image" TYPE_STRING [1]  (one encoded image file per batch row)
                   -> "embedding" FP32 [D]
    clip_text    "text"  TYPE_STRING [1]  (UTF-8, not empty)  -> "embedding" FP32 [D]

the same names and tensors as the ensembles of `clipexport triton`, so one client serves both.
Each request of the batch Triton forms is decoded and checked on its own; a bad one gets an error
that names the problem (status 400, INVALID_ARG), and the good ones still run together as one
batch of the runtime.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

CONFIG_FILE = "clipexport.json"
OUTPUT = "embedding"


def _pb_utils() -> Any:
    # Only Triton's Python-backend stub process provides this module.
    import triton_python_backend_utils

    return triton_python_backend_utils


def _error(pb: Any, message: str, code: str) -> Any:
    """A TritonError with a status code: INVALID_ARG (HTTP 400) for a bad request, INTERNAL (500)."""
    codes = getattr(pb, "TritonError", None)
    value = getattr(codes, code, None)
    return pb.TritonError(message) if value is None else pb.TritonError(message, value)


class RequestError(Exception):
    """What is wrong with one request; its text goes back to that client only."""


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        from clipexport.runtime import TextTruncatedWarning, load

        here = Path(__file__).resolve().parent
        cfg = json.loads((here / CONFIG_FILE).read_text(encoding="utf-8"))
        self.tower: str = cfg["tower"]
        self.input_name: str = cfg["input"]
        self.normalize = bool(cfg["normalize"])
        self.max_request_bytes = int(cfg["max_request_bytes"])
        # Checked against the manifest again here: this process may start long after the command did.
        self.rt = load(cfg["artifact"], backend=cfg["backend"], device=cfg.get("device"))
        # A long text is cut as open_clip cuts it; say so once in the log, not once per request.
        warnings.simplefilter("once", TextTruncatedWarning)

    def execute(self, requests: Sequence[Any]) -> list[Any]:
        from clipexport.errors import ClipExportError

        pb = _pb_utils()
        prepared: list[np.ndarray | None] = []
        errors: list[str | None] = []
        for request in requests:
            try:
                prepared.append(self._prepare(self._items(pb, request)))
                errors.append(None)
            except (RequestError, ClipExportError) as exc:
                prepared.append(None)
                errors.append(str(exc))
        good = [i for i, p in enumerate(prepared) if p is not None]
        embeddings: dict[int, np.ndarray] = {}
        tower_failed: set[int] = set()
        if good:
            try:
                rows = self._encode(np.concatenate([prepared[i] for i in good]))
            except ClipExportError as exc:
                for i in good:
                    errors[i] = f"the {self.tower} tower failed on this batch: {exc}"
                tower_failed.update(good)
            else:
                start = 0
                for i in good:
                    n = len(prepared[i])  # type: ignore[arg-type]
                    embeddings[i] = np.ascontiguousarray(rows[start:start + n], dtype=np.float32)
                    start += n
        responses = []
        for i in range(len(requests)):
            if i in embeddings:
                responses.append(pb.InferenceResponse(output_tensors=[pb.Tensor(OUTPUT, embeddings[i])]))
            else:
                code = "INTERNAL" if i in tower_failed else "INVALID_ARG"
                responses.append(pb.InferenceResponse(output_tensors=[], error=_error(pb, errors[i] or "failed", code)))
        return responses

    def finalize(self) -> None:
        self.rt.close()

    # -- internals ---------------------------------------------------------------------------

    def _items(self, pb: Any, request: Any) -> list[bytes]:
        """The request's TYPE_STRING input [N, 1] -> N byte strings, within the size limit."""
        tensor = pb.get_input_tensor_by_name(request, self.input_name)
        if tensor is None:  # Triton checks names first; kept for a request that slips through
            raise RequestError(f"the request has no input {self.input_name!r}")
        values = np.asarray(tensor.as_numpy(), dtype=object)
        if values.ndim == 0 or values.size != values.shape[0] or values.size == 0:
            raise RequestError(f"input {self.input_name!r}: expected shape [N, 1] with N >= 1, got {list(values.shape)}")
        items = []
        total = 0
        for i, value in enumerate(values.reshape(-1)):
            if isinstance(value, str):
                value = value.encode("utf-8")
            if not isinstance(value, (bytes, bytearray, np.bytes_)):
                raise RequestError(f"input {self.input_name!r} item {i}: expected bytes, got {type(value).__name__}")
            total += len(value)
            items.append(bytes(value))
        if total > self.max_request_bytes:
            raise RequestError(f"input {self.input_name!r}: {total} bytes, over this server's limit of "
                               f"{self.max_request_bytes} (--max-request-bytes)")
        return items

    def _prepare(self, items: list[bytes]) -> np.ndarray:
        """Decode and check one request: pixels float32 [N, 3, H, W] or token ids int64 [N, L]."""
        if self.tower == "image":
            for i, item in enumerate(items):
                if not item:
                    raise RequestError(f"image {i}: empty (0 bytes)")
            return self.rt.preprocess(items)
        texts = []
        for i, item in enumerate(items):
            try:
                text = item.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RequestError(f"text {i}: not UTF-8 ({exc})") from None
            if not text.strip():
                raise RequestError(f"text {i}: empty")
            texts.append(text)
        return self.rt.tokenize(texts)

    def _encode(self, batch: np.ndarray) -> np.ndarray:
        size = max(1, min(len(batch), self.rt.batch_max))
        if self.tower == "image":
            return self.rt.encode_pixels(batch, batch_size=size, normalize=self.normalize)
        return self.rt.encode_tokens(batch, batch_size=size, normalize=self.normalize)
