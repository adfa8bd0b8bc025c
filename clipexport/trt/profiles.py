"""Optimization profiles: min/opt/max shapes of every engine input, from the recipe and the graph.

The batch axis takes the build's BatchRange. A text tower whose sequence axis was left
symbolic by the trimming pass (input shape ["batch", "sequence"]) gets a sequence range
1..context_length with a small `opt` (prompts are short once trimmed at EOT). Any other
symbolic axis has no range we could choose, so it is an error rather than a guess.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipexport.errors import EngineError
from clipexport.recipes import BatchRange

BATCH_AXIS_NAMES = ("batch",)
SEQUENCE_AXIS_NAMES = ("sequence", "seq", "sequence_length")
DEFAULT_SEQUENCE_OPT = 16


@dataclass(frozen=True)
class SequenceRange:
    """Token-axis range of a trimmed text tower: 1..context_length, tuned for `opt` tokens."""

    min: int
    opt: int
    max: int

    @classmethod
    def for_context(cls, context_length: int, opt: int = DEFAULT_SEQUENCE_OPT) -> SequenceRange:
        if context_length < 1:
            raise EngineError(f"context_length {context_length} must be at least 1")
        return cls(1, max(1, min(opt, context_length)), context_length)


@dataclass(frozen=True)
class InputProfile:
    """One engine input's shapes for TensorRT's IOptimizationProfile.set_shape."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InputProfile:
        return cls(str(data["name"]), tuple(data["min"]), tuple(data["opt"]), tuple(data["max"]))

    def contains(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.min) and all(
            lo <= s <= hi for s, lo, hi in zip(shape, self.min, self.max)
        )


def graph_input_shapes(onnx_path: Path) -> list[tuple[str, list[int | str]]]:
    """Names and shapes (ints, or the symbol of a dynamic axis) of an ONNX file's inputs.

    Reads only the graph structure: external weight files are not loaded.
    """
    import onnx

    model = onnx.load_model(str(onnx_path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    out: list[tuple[str, list[int | str]]] = []
    for value in model.graph.input:
        if value.name in initializers:  # old exporters list weights as inputs too
            continue
        dims: list[int | str] = []
        for d in value.type.tensor_type.shape.dim:
            dims.append(d.dim_param if d.dim_param else int(d.dim_value))
        out.append((value.name, dims))
    return out


def tower_profiles(
    inputs: Sequence[tuple[str, Sequence[int | str]]],
    batch: BatchRange,
    tower: str,
    context_length: int | None = None,
    sequence_opt: int = DEFAULT_SEQUENCE_OPT,
) -> list[InputProfile]:
    """min/opt/max for each graph input of one tower.

    inputs: (name, shape) per graph input; a shape entry is a fixed size or an axis symbol.
    Axis 0 is the batch axis (whatever its symbol); on the text tower a symbolic axis 1
    is the token axis; any other symbolic or unknown (0) size is an EngineError.
    """
    if not inputs:
        raise EngineError(f"the {tower} tower's graph has no inputs")
    profiles = []
    for name, shape in inputs:
        if not shape:
            raise EngineError(f"{tower} input {name!r} is a scalar; expected a batch axis first")
        axes: list[tuple[int, int, int]] = []  # (min, opt, max) per axis
        for axis, dim in enumerate(shape):
            fixed = isinstance(dim, int) and dim > 0
            if axis == 0:
                if fixed and not batch.min <= int(dim) <= batch.max:
                    raise EngineError(f"{tower} input {name!r} has a fixed batch of {dim}, outside --batch {batch}")
                size = int(dim) if fixed else 0
                axes.append((size, size, size) if fixed else (batch.min, batch.opt, batch.max))
            elif fixed:
                axes.append((int(dim), int(dim), int(dim)))
            elif tower == "text" and axis == 1:
                if context_length is None:
                    raise EngineError(f"text input {name!r} has a dynamic token axis {dim!r} but no context_length "
                                      "was given to bound it")
                seq = SequenceRange.for_context(context_length, sequence_opt)
                axes.append((seq.min, seq.opt, seq.max))
            else:
                raise EngineError(
                    f"{tower} input {name!r} axis {axis} is dynamic ({dim!r}) and no profile range is known for it; "
                    "only the batch axis (and the text tower's token axis) may be dynamic"
                )
        lo, opt, hi = (tuple(a[i] for a in axes) for i in range(3))
        profiles.append(InputProfile(name, lo, opt, hi))
    return profiles
