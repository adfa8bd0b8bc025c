"""`clipexport.load(dir)`: an artifact, checked against its manifest, ready to embed images and texts."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipexport.errors import ArtifactError, InputError, UsageError
from clipexport.manifest import Manifest, TowerEntry, open_artifact
from clipexport.runtime.backends import Backend, open_backend
from clipexport.runtime.preprocess import ImageInput, ImagePreprocessor, PreprocessConfig, as_image_list
from clipexport.runtime.hf_tokenizer import HFRuntimeTokenizer
from clipexport.runtime.tokenizer import ClipTokenizer, as_text_list, unpadded_lengths

#: Zero-shot template when classify() gets none.
DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)
#: The exp'd logit scale classify() uses unless the manifest has `logit_scale` (trained CLIP models
#: learn ~100; the exported towers do not carry it, and softmax needs some temperature).
DEFAULT_LOGIT_SCALE = 100.0
#: Batch size of encode_* when not given (capped at the artifact's verified maximum).
DEFAULT_BATCH_SIZE = 32
_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


@dataclass(frozen=True)
class _TowerIO:
    input_name: str
    dtype: Any  # numpy dtype the graph takes
    shape: tuple[int | str, ...]  # symbolic axes by name
    embed_dim: int | None

    @classmethod
    def from_manifest(cls, entry: TowerEntry) -> _TowerIO:
        dtype = _NUMPY_DTYPES.get(entry.input.dtype)
        if dtype is None:
            raise ArtifactError(f"manifest towers.{entry.name}: input dtype {entry.input.dtype} is not supported "
                                "by this runtime")
        return cls(entry.input.name, dtype, entry.input.shape, entry.embed_dim)


class Runtime:
    """One loaded artifact: preprocess, tokenize, encode_image, encode_text, classify.

    Thread-safe: after loading nothing in it changes, and every backend's run() may be
    called from many threads at once. Share one Runtime across a service's threads.

    Attributes:
        backend:  the backend that runs the towers: "tensorrt", "onnxruntime" or "pytorch"
        device:   where it runs: "cpu", "cuda:0", ...
        skipped_backends: {backend: why "auto" did not pick it}
        towers:   the towers loaded, e.g. ("image", "text")
    """

    def __init__(self, directory: Path, manifest: Manifest, backend: Backend,
                 skipped_backends: Mapping[str, str] | None = None) -> None:
        self.directory = Path(directory)
        self.manifest = manifest
        self.model: str = manifest.model
        self.precision: str = manifest.precision
        self._backend = backend
        self.backend: str = backend.name
        self.device: str = backend.device
        self.skipped_backends = dict(skipped_backends or {})
        self.towers: tuple[str, ...] = tuple(t for t in ("image", "text") if t in backend.towers)
        self._io = {t: _TowerIO.from_manifest(manifest.towers[t]) for t in self.towers}
        self.batch_min = manifest.batch.min
        self.batch_max = manifest.batch.max

        self._preprocessor: ImagePreprocessor | None = None
        if "image" in self.towers:
            assert manifest.preprocess is not None  # Manifest.from_json requires it with an image tower
            self._preprocessor = ImagePreprocessor(PreprocessConfig.from_manifest(manifest.preprocess))
            expected = (3, *self._preprocessor.size)
            static = self._io["image"].shape[1:]
            if all(isinstance(s, int) for s in static) and tuple(static) != expected:
                raise ArtifactError(f"{directory}: image tower takes {list(static)} but preprocess gives {list(expected)}")

        self._tokenizer: ClipTokenizer | HFRuntimeTokenizer | None = None
        self._no_tokenizer_reason = ""
        self._context_length = 0
        self.trims_text = False
        self._pad_id = 0
        if "text" in self.towers:
            section = manifest.tokenizer
            assert section is not None  # Manifest.from_json requires it with a text tower
            self._context_length = int(section.get("context_length", 77))
            if section.get("kind") == "hf":
                self._tokenizer = HFRuntimeTokenizer.from_manifest(self.directory, section)
            elif section.get("kind") == "none":
                # built without the tokenizer's files: encode_tokens(ids) still works
                self._no_tokenizer_reason = str(section.get("reason", "the build had no tokenizer files"))
            else:
                self._tokenizer = ClipTokenizer.from_manifest(self.directory, section)
            shape = self._io["text"].shape
            if len(shape) != 2:
                raise ArtifactError(f"{directory}: text tower input has shape {list(shape)}, expected [batch, length]")
            if isinstance(shape[1], int) and shape[1] != self._context_length:
                raise ArtifactError(f"{directory}: text tower takes {shape[1]} tokens but the tokenizer makes "
                                    f"{self._context_length}")
            # A symbolic sequence axis means the graph was exported for exact trimming: after EOT for
            # CLIP BPE ids (0 pads after EOT), after the longest unpadded row for Hugging Face ids.
            sequence = manifest.towers["text"].sequence
            assert sequence is not None
            self._pad_id = sequence.pad_id
            self.trims_text = isinstance(shape[1], str) and backend.dynamic_text_length and sequence.dynamic

    # -- properties ------------------------------------------------------------------------

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the image tower's input."""
        return self._require_preprocessor().size

    @property
    def context_length(self) -> int:
        self._require_tower("text")
        return self._context_length

    @property
    def embed_dim(self) -> int | None:
        dims = [io.embed_dim for io in self._io.values() if io.embed_dim]
        return dims[0] if dims else None

    @property
    def tokenizer(self) -> ClipTokenizer | HFRuntimeTokenizer:
        return self._require_tokenizer()

    def details(self) -> dict[str, Any]:
        """What runs, for logs: backend, device, backend facts (e.g. ORT providers), skipped backends."""
        return {"backend": self.backend, "device": self.device, **self._backend.details(),
                "skipped_backends": self.skipped_backends, "trims_text": self.trims_text}

    def __repr__(self) -> str:
        return (f"Runtime({str(self.directory)!r}, model={self.model!r}, backend={self.backend!r}, "
                f"device={self.device!r}, towers={self.towers}, precision={self.precision!r})")

    # -- inputs ------------------------------------------------------------------------------

    def preprocess(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        """Images -> float32 [N, 3, H, W], exactly open_clip's preprocess_val for this model.

        An image is a PIL.Image, a file path, the bytes of a file, or a uint8 array (H, W),
        (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA. One image gives N == 1; [] gives N == 0.
        """
        return self._require_preprocessor()(images)

    def tokenize(self, texts: str | Sequence[str]) -> np.ndarray:
        """Texts -> int64 [N, context_length], the ids open_clip.get_tokenizer(model) gives.

        Longer texts are cut (ending with EOT) with a TextTruncatedWarning, as open_clip cuts them.
        """
        return self._require_tokenizer()(texts)

    # -- embeddings --------------------------------------------------------------------------

    def encode_image(self, images: ImageInput | Sequence[ImageInput], batch_size: int | None = None,
                     normalize: bool = True) -> np.ndarray:
        """Images -> float32 [N, D] (unit length when normalize), in the order given.

        Images are decoded and preprocessed one batch at a time, so a long list of paths
        never holds more than one batch of pixels.
        """
        self._require_tower("image")
        preprocessor = self._require_preprocessor()
        items = as_image_list(images)
        size = self._batch_size(batch_size)
        chunks = [self._run("image", preprocessor(items[i:i + size])) for i in range(0, len(items), size)]
        return self._finish(chunks, "image", normalize)

    def encode_text(self, texts: str | Sequence[str], batch_size: int | None = None,
                    normalize: bool = True) -> np.ndarray:
        """Texts -> float32 [N, D] (unit length when normalize), in the order given."""
        return self.encode_tokens(self.tokenize(texts), batch_size=batch_size, normalize=normalize)

    def encode_pixels(self, pixels: np.ndarray, batch_size: int | None = None, normalize: bool = True) -> np.ndarray:
        """Already preprocessed float32 [N, 3, H, W] -> float32 [N, D]."""
        self._require_tower("image")
        h, w = self.image_size
        if not isinstance(pixels, np.ndarray) or pixels.dtype != np.float32:
            raise InputError(f"pixels: expected a float32 numpy array [N, 3, {h}, {w}], got "
                             f"{_describe(pixels)}; use encode_image() for images, or .astype(np.float32)")
        if pixels.ndim != 4 or pixels.shape[1:] != (3, h, w):
            raise InputError(f"pixels: expected shape [N, 3, {h}, {w}], got {list(pixels.shape)}")
        finite = np.isfinite(pixels).all(axis=(1, 2, 3))
        if not finite.all():
            rows = np.flatnonzero(~finite)
            raise InputError(f"pixels: rows {rows[:10].tolist()}{' ...' if len(rows) > 10 else ''} hold NaN or "
                             "infinite values (a broken preprocessing step?); their embeddings would be NaN")
        size = self._batch_size(batch_size)
        chunks = [self._run("image", pixels[i:i + size]) for i in range(0, len(pixels), size)]
        return self._finish(chunks, "image", normalize)

    def encode_tokens(self, ids: np.ndarray, batch_size: int | None = None, normalize: bool = True) -> np.ndarray:
        """Token ids int [N, context_length] (from tokenize()) -> float32 [N, D].

        When the text graph has a dynamic sequence axis, each batch is cut to its longest
        row (SOT ... EOT) before it runs; rows are grouped by length so batches stay short.
        The causal text transformer never lets EOT see the padding, so the numbers are those
        of the full context.
        """
        self._require_tower("text")
        length = self.context_length
        if not isinstance(ids, np.ndarray) or ids.dtype.kind not in "iu":
            raise InputError(f"ids: expected an integer numpy array [N, {length}], got {_describe(ids)}")
        if ids.ndim != 2 or ids.shape[1] != length:
            raise InputError(f"ids: expected shape [N, {length}], got {list(ids.shape)}")
        vocab_size = self._tokenizer.vocab_size if self._tokenizer is not None else None
        if ids.size and (ids.min() < 0 or (vocab_size is not None and ids.max() >= vocab_size)):
            raise InputError(f"ids: values must lie in 0..{(vocab_size or 0) - 1}, got {ids.min()}..{ids.max()}")
        size = self._batch_size(batch_size)
        if not self.trims_text:
            chunks = [self._run("text", ids[i:i + size]) for i in range(0, len(ids), size)]
            return self._finish(chunks, "text", normalize)
        # Columns up to each row's last non-pad id (its EOT); at least SOT + EOT.
        lengths = unpadded_lengths(ids, self._pad_id)
        order = np.argsort(lengths, kind="stable")
        chunks = []
        for i in range(0, len(ids), size):
            rows = order[i:i + size]
            keep = int(min(length, max(2, lengths[rows].max())))
            chunks.append(self._run("text", ids[rows, :keep]))
        sorted_out = self._finish(chunks, "text", normalize)
        out = np.empty_like(sorted_out)
        out[order] = sorted_out
        return out

    def classify(
        self,
        images: ImageInput | Sequence[ImageInput],
        labels: Sequence[str],
        templates: Sequence[str | Callable[[str], str]] | None = None,
        batch_size: int | None = None,
        logit_scale: float | None = None,
    ) -> np.ndarray:
        """Zero-shot probabilities float32 [N_images, N_labels], rows summing to 1.

        Each label's text embedding is the mean of its normalized template embeddings,
        normalized again (open_clip's build_zero_shot_classifier); probabilities are
        softmax(logit_scale * image @ label^T). templates: format strings with '{}' or
        callables; default ("a photo of a {}.",). logit_scale: default the manifest's
        `logit_scale` if present, else 100 (what trained CLIP models learn).
        """
        labels = as_text_list(labels)
        if not labels:
            raise InputError("labels: give at least one label")
        templates = list(templates) if templates is not None else list(DEFAULT_TEMPLATES)
        if not templates:
            raise InputError("templates: give at least one template (or None for the default)")
        texts = []
        for label in labels:
            for template in templates:
                texts.append(_apply_template(template, label))
        text = self.encode_text(texts, batch_size=batch_size, normalize=True)
        text = text.reshape(len(labels), len(templates), -1).mean(axis=1)
        text = _unit(text)
        image = self.encode_image(images, batch_size=batch_size, normalize=True)
        default = self.manifest.logit_scale if self.manifest.logit_scale is not None else DEFAULT_LOGIT_SCALE
        scale = float(logit_scale if logit_scale is not None else default)
        logits = scale * (image @ text.T)
        if self.manifest.logit_bias is not None:
            logits = logits + self.manifest.logit_bias
        logits = logits - logits.max(axis=1, keepdims=True) if len(logits) else logits
        probs = np.exp(logits)
        return (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)

    def close(self) -> None:
        """Release the backend's sessions; do not call while other threads still use this Runtime."""
        self._backend.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------

    def _batch_size(self, batch_size: int | None) -> int:
        if batch_size is None:
            return max(1, min(DEFAULT_BATCH_SIZE, self.batch_max))
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise UsageError(f"batch_size {batch_size!r}: expected a positive integer")
        if batch_size > self.batch_max:
            raise UsageError(f"batch_size {batch_size}: this artifact was built and verified for batches up to "
                             f"{self.batch_max} (rebuild with --batch MIN:OPT:MAX to go higher)")
        return int(batch_size)

    def _run(self, tower: str, batch: np.ndarray) -> np.ndarray:
        io = self._io[tower]
        n = len(batch)
        if n == 0:
            return np.zeros((0, io.embed_dim or 0), dtype=np.float32)
        batch = np.ascontiguousarray(batch, dtype=io.dtype)
        if n < self.batch_min:  # the graph/engine was built for at least batch_min rows: pad, then drop
            batch = np.concatenate([batch, np.repeat(batch[:1], self.batch_min - n, axis=0)])
        out = self._backend.run(tower, batch)
        if out.ndim != 2 or out.shape[0] != len(batch):
            raise ArtifactError(f"the {tower} tower returned shape {list(out.shape)} for a batch of {len(batch)}")
        return np.asarray(out[:n], dtype=np.float32)

    def _finish(self, chunks: list[np.ndarray], tower: str, normalize: bool) -> np.ndarray:
        if not chunks:
            return np.zeros((0, self._io[tower].embed_dim or 0), dtype=np.float32)
        out = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
        return _unit(out) if normalize else out

    def _require_tower(self, tower: str) -> None:
        if tower not in self.towers:
            raise UsageError(f"{self.directory} has no {tower} tower (it has: {', '.join(self.towers)}); "
                             f"rebuild with --towers image,text")

    def _require_preprocessor(self) -> ImagePreprocessor:
        if self._preprocessor is None:
            self._require_tower("image")
            raise ArtifactError(f"{self.directory}: no preprocess section")  # pragma: no cover
        return self._preprocessor

    def _require_tokenizer(self) -> ClipTokenizer | HFRuntimeTokenizer:
        if self._tokenizer is None:
            self._require_tower("text")
            if self._no_tokenizer_reason:
                raise InputError(f"{self.directory} has no tokenizer ({self._no_tokenizer_reason}); "
                                 "tokenize the texts yourself and call encode_tokens(ids)")
            raise ArtifactError(f"{self.directory}: no tokenizer section")  # pragma: no cover
        return self._tokenizer


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, like torch.nn.functional.normalize (norm floored at 1e-12)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, np.float32(1e-12))).astype(np.float32)


def _apply_template(template: str | Callable[[str], str], label: str) -> str:
    try:
        text = template.format(label) if isinstance(template, str) else template(label)
    except (IndexError, KeyError, ValueError) as exc:
        raise InputError(f"template {template!r}: cannot fill it with a label ({exc!r}); use one '{{}}'") from None
    if not isinstance(text, str):
        raise InputError(f"template {template!r} returned {type(text).__name__}, not a string")
    return text


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {list(value.shape)}"
    return type(value).__name__


def load(path: str | Path, backend: str = "auto", device: str | None = None) -> Runtime:
    """Open an artifact directory written by `clipexport build`.

    Every file is checked against its sha256 in manifest.json before anything runs; a
    changed, truncated or missing file raises ArtifactError.

    backend: "auto" (TensorRT if it is installed and the artifact has engines, else ONNX
             Runtime, else PyTorch), or one of "tensorrt", "onnxruntime", "pytorch".
    device:  None (the backend's best: CUDA when it has it, else CPU), "cpu", "cuda", "cuda:N".
             An explicit device that the backend cannot use raises BackendUnavailableError.
    The Runtime's `backend` and `device` say what actually runs.
    """
    directory = Path(path)
    manifest = open_artifact(directory)
    if manifest.get("parity_accepted_by_user"):
        # Built with --accept-parity-failure: usable, but its numbers were outside the recipe's tolerance.
        warnings.warn(f"{directory} failed its parity check and was kept with --accept-parity-failure; "
                      "its embeddings may differ from open_clip's (see `clipexport info`)", RuntimeWarning,
                      stacklevel=2)
    chosen, skipped = open_backend(backend, directory, manifest, device)
    try:
        return Runtime(directory, manifest, chosen, skipped)
    except BaseException:
        chosen.close()
        raise


__all__ = ["DEFAULT_LOGIT_SCALE", "DEFAULT_TEMPLATES", "Runtime", "load"]
