"""Parity: run the PyTorch reference and a candidate (ONNX Runtime, later TensorRT) on the
same inputs and compare embeddings.

Per embedding (row), we measure
  cosine     = <ref, cand> / (|ref| |cand|)
  abs error  = max_i |ref_i - cand_i|
  rel error  = abs error / max_i |ref_i|   (relative to the embedding's own scale; an
               element-wise ratio would explode on entries near zero)
and report the worst row over all batch sizes.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from clipexport.errors import ParityError
from clipexport.recipes import Tolerance

Candidate = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class BatchParity:
    batch_size: int
    cosine_min: float
    max_abs_err: float
    max_rel_err: float
    finite: bool


@dataclass
class TowerParity:
    tower: str
    backend: str
    precision: str
    tolerance: Tolerance
    batches: list[BatchParity] = field(default_factory=list)
    # Share of zero-shot top-1 choices equal to the reference's (None: not measured).
    top1_agreement: float | None = None
    # False with random weights: their zero-shot scores are near ties, so top-1 flips on any
    # rounding; the agreement is then reported, not gated (cosine still is).
    top1_gated: bool = True
    # Text: the sequence length each batch was trimmed to before the candidate ran (empty: full length).
    trimmed_lengths: list[int] = field(default_factory=list)
    note: str = ""  # how the candidate ran, when that is not plain (e.g. bf16 emulated)

    @property
    def cosine_min(self) -> float:
        return min(b.cosine_min for b in self.batches)

    @property
    def max_abs_err(self) -> float:
        return max(b.max_abs_err for b in self.batches)

    @property
    def max_rel_err(self) -> float:
        return max(b.max_rel_err for b in self.batches)

    @property
    def passed(self) -> bool:
        return self._within_tolerance()

    def _within_tolerance(self) -> bool:
        # A plain method behind the property: mutmut leaves decorated functions alone, and this is
        # the gate benchmarks/mutation.sh must reach.
        top1_ok = (
            self.tolerance.top1_agreement_min is None
            or not self.top1_gated
            or (self.top1_agreement is not None and self.top1_agreement >= self.tolerance.top1_agreement_min)
        )
        return (
            all(b.finite for b in self.batches)
            and self.cosine_min >= self.tolerance.cosine_min
            and self.max_rel_err <= self.tolerance.max_rel_err
            and top1_ok
        )

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        top1 = ""
        if self.top1_agreement is not None:
            need = self.tolerance.top1_agreement_min
            gate = (f" (need >= {need:g}), " if self.top1_gated else " (not gated: random weights), ") if need else ", "
            top1 = f"top1_agreement {self.top1_agreement:.3f}{gate}"
        trimmed = f"trimmed to {self.trimmed_lengths} tokens, " if self.trimmed_lengths else ""
        return (
            f"{self.tower} tower on {self.backend} ({self.precision}): cosine_min {self.cosine_min:.7f} "
            f"(need >= {self.tolerance.cosine_min}), max_abs_err {self.max_abs_err:.3g}, "
            f"max_rel_err {self.max_rel_err:.3g} (need <= {self.tolerance.max_rel_err:g}), {top1}{trimmed}"
            f"batches {[b.batch_size for b in self.batches]}: {verdict}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "precision": self.precision,
            "cosine_min": self.cosine_min,
            "max_abs_err": self.max_abs_err,
            "max_rel_err": self.max_rel_err,
            "passed": self.passed,
            "tolerance": asdict(self.tolerance),
            "top1_agreement": self.top1_agreement,
            "top1_gated": self.top1_gated,
            "trimmed_lengths": self.trimmed_lengths,
            "note": self.note,
            "batches": [asdict(b) for b in self.batches],
        }


def compare(reference: np.ndarray, candidate: np.ndarray, batch_size: int) -> BatchParity:
    """Worst-row parity of two [N, D] embedding matrices."""
    if reference.shape != candidate.shape:
        raise ParityError(f"candidate output shape {candidate.shape} differs from the reference's {reference.shape}")
    ref = reference.astype(np.float64)
    cand = candidate.astype(np.float64)
    finite = bool(np.isfinite(cand).all())
    if not finite:
        return BatchParity(batch_size, float("nan"), float("inf"), float("inf"), False)
    abs_err = np.abs(ref - cand).max(axis=1)
    scale = np.maximum(np.abs(ref).max(axis=1), np.finfo(np.float64).tiny)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    cosine = (ref * cand).sum(axis=1) / np.maximum(norms, np.finfo(np.float64).tiny)
    return BatchParity(
        batch_size=batch_size,
        cosine_min=float(cosine.min()),
        max_abs_err=float(abs_err.max()),
        max_rel_err=float((abs_err / scale).max()),
        finite=True,
    )


def image_inputs(batch_sizes: Sequence[int], image_size: int, seed: int) -> list[Any]:
    """Random pixels, standard normal like normalized images, one tensor per batch size."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, image_size, image_size, generator=generator) for b in batch_sizes]


def text_inputs(batch_sizes: Sequence[int], tokenizer: Callable[[list[str]], Any]) -> list[Any]:
    """Real prompts, tokenized as open_clip does, cycled to fill each batch size."""
    from clipexport.prompts import PARITY_PROMPTS

    out = []
    offset = 0
    for b in batch_sizes:
        texts = [PARITY_PROMPTS[(offset + i) % len(PARITY_PROMPTS)] for i in range(b)]
        offset += b
        out.append(tokenizer(texts))
    return out


def trim_to_eot(ids: np.ndarray, pad_id: int = 0) -> np.ndarray:
    """Token ids [B, L] cut after the batch's last non-padding column.

    CLIP BPE ids (pad 0): that is max EOT position + 1, exact for a causal text tower with
    argmax pooling (no row's EOT sees a later column). Hugging Face ids (right-padded with
    pad_id): the longest unpadded row, exact because the padding mask hides the rest.
    At least 2 columns (SOT + EOT), the shortest input a trimmable graph accepts.
    """
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ParityError(f"token ids must be [batch, sequence], got shape {ids.shape}")
    from clipexport.runtime.tokenizer import unpadded_lengths

    length = max(2, int(unpadded_lengths(ids, pad_id).max()))
    return np.ascontiguousarray(ids[:, : min(length, ids.shape[1])])


def top1_agreement(reference: np.ndarray, candidate: np.ndarray, anchors: np.ndarray, rows_are_queries: bool) -> float:
    """Share of zero-shot choices the candidate makes exactly as the reference does.

    rows_are_queries: each embedding row picks its best anchor (images among class texts);
    otherwise each anchor picks its best row (images choosing among the texts).
    """
    def unit(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.finfo(np.float64).tiny)

    ref_scores, cand_scores = unit(reference) @ unit(anchors).T, unit(candidate) @ unit(anchors).T
    axis = 1 if rows_are_queries else 0
    return float((ref_scores.argmax(axis=axis) == cand_scores.argmax(axis=axis)).mean())


def check_tower(
    tower: str,
    reference: Callable[[Any], Any],
    candidate: Candidate,
    inputs: Sequence[Any],
    tolerance: Tolerance,
    backend: str,
    precision: str = "fp32",
    anchors: np.ndarray | None = None,
    trim: bool = False,
    pad_id: int = 0,
) -> TowerParity:
    """Run reference (a torch module) and candidate on every input batch and compare.

    trim: feed the candidate only max EOT + 1 columns of each batch (the reference always
    gets the full context). anchors: embeddings of the other tower for zero-shot top-1
    agreement (class-prompt texts for an image tower, images for a text tower).
    """
    import torch

    result = TowerParity(tower=tower, backend=backend, precision=precision, tolerance=tolerance)
    refs, cands = [], []
    for batch in inputs:
        with torch.no_grad():
            ref = reference(batch).float().numpy()
        ids = batch.numpy()
        if trim:
            ids = trim_to_eot(ids, pad_id)
            result.trimmed_lengths.append(int(ids.shape[1]))
        cand = np.asarray(candidate(ids))
        result.batches.append(compare(ref, cand, int(batch.shape[0])))
        refs.append(ref)
        cands.append(cand)
    if anchors is not None and all(b.finite for b in result.batches):
        result.top1_agreement = top1_agreement(np.concatenate(refs), np.concatenate(cands), anchors,
                                               rows_are_queries=tower == "image")
    return result


class RecordedReference:
    """A reference tower's outputs, computed up front for a list of input batches.

    It answers check_tower's calls for batches equal to those (matched by content), so the
    tower itself can be freed before the candidate loads: the two copies of a large tower
    never sit in memory together.
    """

    def __init__(self, module: Callable[[Any], Any], inputs: Sequence[Any]) -> None:
        import torch

        with torch.no_grad():
            self._outputs = {_content_key(batch): module(batch).float().detach().clone() for batch in inputs}

    def __call__(self, batch: Any) -> Any:
        try:
            return self._outputs[_content_key(batch)]
        except KeyError:
            raise ParityError("the recorded reference has no output for this input batch") from None


def _content_key(batch: Any) -> tuple[Any, ...]:
    import hashlib

    array = batch.detach().cpu().numpy()
    return (array.shape, str(array.dtype), hashlib.sha256(array.tobytes()).hexdigest())


def _serve(path: str, input_name: str, conn: Any) -> None:
    """Child process: load the graph, then answer batches until told to stop."""
    try:
        candidate = OnnxRuntimeCandidate(Path(path), input_name)
        conn.send(("ready", None))
    except Exception as exc:  # noqa: BLE001 - reported to the parent as text
        conn.send(("error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"))
        return
    while True:
        batch = conn.recv()
        if batch is None:
            return
        try:
            conn.send(("ok", candidate(batch)))
        except Exception as exc:  # noqa: BLE001
            conn.send(("error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"))


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored while a child is started: an ignored signal stays ignored across exec, and
    Python then installs no KeyboardInterrupt handler in the child. A Ctrl-C (which the terminal
    sends to the whole process group) would otherwise print the child's traceback too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class IsolatedOnnxRuntimeCandidate:
    """An ONNX file run on ONNX Runtime (CPU) in a child process.

    A new graph can crash onnxruntime outright (a segfault at session creation was seen
    with fp16 graphs written by other converters); in a child that becomes a ParityError
    naming the file, instead of killing the build.
    """

    backend = "onnxruntime-cpu"

    def __init__(self, path: Path, input_name: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.path = path
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(str(path), input_name, child), daemon=True)
        with _sigint_ignored():  # the child starts with Ctrl-C ignored: the parent owns the interruption
            self._proc.start()
        child.close()
        self._expect("load")

    def _expect(self, what: str) -> Any:
        try:
            status, payload = self._conn.recv()
        except EOFError:
            self._proc.join(timeout=5)
            raise ParityError(
                f"onnxruntime crashed ({what}) on {self.path.name} (child exit code {self._proc.exitcode})"
            ) from None
        if status == "error":
            self.close()
            raise ParityError(f"onnxruntime cannot {what} {self.path.name}: {payload}")
        return payload

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self._conn.send(batch)
        return np.asarray(self._expect("run"))

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(timeout=10)
            if self._proc.is_alive():
                self._proc.terminate()
        self._conn.close()

    def __enter__(self) -> "IsolatedOnnxRuntimeCandidate":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class OnnxRuntimeCandidate:
    """An ONNX file run on ONNX Runtime's CPU execution provider."""

    backend = "onnxruntime-cpu"

    def __init__(self, path: Path, input_name: str) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: ORT warns about unused initializers otherwise
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = input_name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        (out,) = self.session.run(None, {self.input_name: batch})
        return np.asarray(out)
