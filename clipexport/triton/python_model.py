"""Triton Python-backend model written by `clipexport triton`: raw inputs -> a tower's graph input.

`clipexport triton` copies this file, unchanged, to <repo>/<prefix>_<tower>_preprocess/1/model.py.
It reads `clipexport.json` beside it (written from the artifact's manifest) and does:

    image tower   "image" TYPE_STRING [1]  bytes of an image file (PNG, JPEG, ...)
                    -> e.g. "pixel_values" float32 [3, H, W]    open_clip's preprocess_val
    text tower    "text"  TYPE_STRING [1]  UTF-8 text
                    -> e.g. "input_ids" int64 [context_length]  the model's tokenizer

with clipexport.runtime's own preprocessing and tokenizer, so the numbers are those of
`clipexport.load(dir).preprocess(...)` / `.tokenize(...)`. A request whose input cannot be used
(not an image, not UTF-8) gets an error response; the other requests of the batch still run.

Triton's Python must have clipexport with its runtime extra (numpy, Pillow, ftfy, regex,
tokenizers): `pip install 'clipexport[runtime]'` in the server's environment.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

CONFIG_FILE = "clipexport.json"


def _pb_utils() -> Any:
    # Only Triton's Python-backend stub process provides this module; imported when first needed
    # so this file can be imported (and tested) without a server.
    import triton_python_backend_utils

    return triton_python_backend_utils


class TritonPythonModel:
    """Triton's Python-backend entry points: initialize(args), execute(requests), finalize()."""

    def initialize(self, args: dict[str, str]) -> None:
        # Assets live beside this file (the version directory), wherever the repository is mounted.
        here = Path(__file__).resolve().parent
        cfg = json.loads((here / CONFIG_FILE).read_text(encoding="utf-8"))
        try:
            from clipexport.errors import ClipExportError
        except ImportError as exc:
            raise RuntimeError(f"{here / 'model.py'} needs clipexport in Triton's Python environment "
                               f"({exc}): pip install 'clipexport[runtime]'") from None
        self.tower: str = cfg["tower"]
        self.input_name: str = cfg["input"]
        self.output_name: str = cfg["output"]
        self.dtype = np.dtype(cfg["dtype"])
        # Errors a request can cause: answered per request, never fatal to the model.
        self._request_errors: tuple[type[BaseException], ...] = (ClipExportError, UnicodeDecodeError)
        if self.tower == "image":
            self._convert = _image_converter(cfg)
        elif self.tower == "text":
            self._convert = _text_converter(here, cfg)
        else:
            raise RuntimeError(f"{here / CONFIG_FILE}: unknown tower {self.tower!r}")

    def execute(self, requests: Sequence[Any]) -> list[Any]:
        """One response per request, in order: the converted batch, or an error for that request only."""
        pb = _pb_utils()
        responses = []
        for request in requests:
            try:
                array = self._convert(_byte_strings(pb, request, self.input_name))
            except self._request_errors as exc:
                responses.append(pb.InferenceResponse(output_tensors=[], error=pb.TritonError(str(exc))))
                continue
            # e.g. float16 pixels for an fp16 graph: the same cast Runtime applies before it runs a tower.
            tensor = pb.Tensor(self.output_name, np.ascontiguousarray(array, dtype=self.dtype))
            responses.append(pb.InferenceResponse(output_tensors=[tensor]))
        return responses

    def finalize(self) -> None:
        pass


def _byte_strings(pb: Any, request: Any, name: str) -> list[bytes]:
    """The request's TYPE_STRING input [N, 1] -> N byte strings."""
    from clipexport.errors import InputError

    tensor = pb.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise InputError(f"the request has no input {name!r}")
    values = np.asarray(tensor.as_numpy(), dtype=object)
    if values.ndim == 0 or values.size != values.shape[0]:
        raise InputError(f"input {name!r}: expected shape [N, 1] (one item per batch row), got {list(values.shape)}")
    out = []
    for i, value in enumerate(values.reshape(-1)):
        if isinstance(value, str):  # some clients hand over str for TYPE_STRING
            value = value.encode("utf-8")
        if not isinstance(value, (bytes, bytearray, np.bytes_)):
            raise InputError(f"input {name!r} item {i}: expected bytes, got {type(value).__name__}")
        out.append(bytes(value))
    return out


def _image_converter(cfg: dict[str, Any]) -> Callable[[list[bytes]], np.ndarray]:
    from clipexport.runtime.preprocess import ImagePreprocessor, PreprocessConfig

    preprocessor = ImagePreprocessor(PreprocessConfig.from_manifest(cfg["preprocess"]))
    return lambda items: preprocessor(list(items))  # float32 [N, 3, H, W]


def _text_converter(directory: Path, cfg: dict[str, Any]) -> Callable[[list[bytes]], np.ndarray]:
    from clipexport.errors import InputError
    from clipexport.runtime.hf_tokenizer import HFRuntimeTokenizer
    from clipexport.runtime.tokenizer import ClipTokenizer

    section = cfg["tokenizer"]
    # The same choice as clipexport.Runtime: the paths in `section` are relative to `directory`.
    tokenizer: Callable[[list[str]], np.ndarray]
    if section.get("kind") == "hf":
        tokenizer = HFRuntimeTokenizer.from_manifest(directory, section)
    else:
        tokenizer = ClipTokenizer.from_manifest(directory, section)

    def convert(items: list[bytes]) -> np.ndarray:
        texts = []
        for i, raw in enumerate(items):
            try:
                texts.append(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise InputError(f"text {i}: not UTF-8 ({exc})") from None
        return tokenizer(texts)  # int64 [N, context_length]

    return convert
