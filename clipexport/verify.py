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

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

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
        return (
            all(b.finite for b in self.batches)
            and self.cosine_min >= self.tolerance.cosine_min
            and self.max_rel_err <= self.tolerance.max_rel_err
        )

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"{self.tower} tower on {self.backend}: cosine_min {self.cosine_min:.7f} "
            f"(need >= {self.tolerance.cosine_min}), max_abs_err {self.max_abs_err:.3g}, "
            f"max_rel_err {self.max_rel_err:.3g} (need <= {self.tolerance.max_rel_err:g}), "
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


def check_tower(
    tower: str,
    reference: Callable[[Any], Any],
    candidate: Candidate,
    inputs: Sequence[Any],
    tolerance: Tolerance,
    backend: str,
    precision: str = "fp32",
) -> TowerParity:
    """Run reference (a torch module) and candidate on every input batch and compare."""
    import torch

    result = TowerParity(tower=tower, backend=backend, precision=precision, tolerance=tolerance)
    for batch in inputs:
        with torch.no_grad():
            ref = reference(batch).float().numpy()
        cand = candidate(batch.numpy())
        result.batches.append(compare(ref, np.asarray(cand), int(batch.shape[0])))
    return result


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
