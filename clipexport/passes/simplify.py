"""Simplification: constant folding, dead-node and redundant-op removal, with onnxslim."""

from __future__ import annotations

import contextlib
import io
from typing import TYPE_CHECKING

import onnx

if TYPE_CHECKING:
    from clipexport.passes import PassConfig


def simplify(model: onnx.ModelProto, cfg: "PassConfig") -> onnx.ModelProto:
    """Return onnxslim's simplified copy of `model`; inputs, outputs and the dynamic axis are kept."""
    import onnxslim

    # onnxslim prints a summary table; the pipeline records node counts itself.
    with contextlib.redirect_stdout(io.StringIO()):
        slimmed = onnxslim.slim(model)
    if not isinstance(slimmed, onnx.ModelProto):
        raise RuntimeError("onnxslim returned no model")
    _check_same_interface(model, slimmed)
    return slimmed


def _check_same_interface(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    def interface(m: onnx.ModelProto) -> list[tuple[str, int, list[str]]]:
        out = []
        for v in list(m.graph.input) + list(m.graph.output):
            t = v.type.tensor_type
            dims = [d.dim_param or str(d.dim_value) for d in t.shape.dim]
            out.append((v.name, t.elem_type, dims))
        return out

    if interface(before) != interface(after):
        raise RuntimeError(f"simplifier changed the graph interface: {interface(before)} -> {interface(after)}")
