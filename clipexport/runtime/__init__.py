"""The runtime: load an artifact and embed images and texts exactly as open_clip does, without torch.

    import clipexport
    rt = clipexport.load("engines/ViT-B-32-laion2b_s34b_b79k-fp32")
    rt                                    # Runtime(..., backend='onnxruntime', device='cpu', ...)
    img = rt.encode_image(["cat.jpg", pil_image, png_bytes])      # float32 [3, D], unit rows
    txt = rt.encode_text(["a photo of a cat", "a photo of a dog"])  # float32 [2, D]
    probs = rt.classify(["cat.jpg"], ["cat", "dog"])               # float32 [1, 2]

Needs only `pip install clipexport[runtime]` (numpy, Pillow, onnxruntime, ftfy, regex) for the
ONNX Runtime backend; torch is imported only by the PyTorch backend.
"""

from __future__ import annotations

from clipexport.runtime.backends import Backend, register_backend
from clipexport.runtime.preprocess import ImagePreprocessor, PreprocessConfig
from clipexport.runtime.runtime import DEFAULT_LOGIT_SCALE, DEFAULT_TEMPLATES, Runtime, load
from clipexport.runtime.tokenizer import ClipTokenizer, TextTruncatedWarning

__all__ = [
    "DEFAULT_LOGIT_SCALE",
    "DEFAULT_TEMPLATES",
    "Backend",
    "ClipTokenizer",
    "ImagePreprocessor",
    "PreprocessConfig",
    "Runtime",
    "TextTruncatedWarning",
    "load",
    "register_backend",
]
