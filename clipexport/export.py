"""One tower -> one ONNX graph with a dynamic batch axis. Nothing else."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import Iterator

import onnx
import torch
from torch import nn

from clipexport.errors import ExportError
from clipexport.recipes import BatchRange, TowerSpec


@contextlib.contextmanager
def export_patches() -> Iterator[None]:
    """Patches that hold only while exporting, restored afterwards.

    nn.MultiheadAttention's eval fast path lowers to aten::_native_multi_head_attention,
    a fused op the exporters cannot always translate; the plain path exports cleanly.
    """
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[io.StringIO]:
    """The dynamo exporter prints progress lines and logs optimizer notes; we report stages ourselves."""
    sink = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("onnxscript", "torch.onnx", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sink), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield sink
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_tower(
    tower: nn.Module,
    example: torch.Tensor,
    spec: TowerSpec,
    batch: BatchRange,
    opset: int,
) -> onnx.ModelProto:
    """Trace `tower` on `example` with torch.export and translate it to ONNX.

    The batch axis (axis 0 of the one input and the one output) is dynamic within
    [batch.min, batch.max]; every other axis keeps the example's size. Token ids keep
    the example's integer dtype.
    """
    if example.shape[0] < 2 and batch.max >= 2:
        # torch.export specializes a dimension whose example size is 1.
        example = example.expand(2, *example.shape[1:]).contiguous()
    dynamic = batch.max > 1
    dynamic_shapes = ({0: torch.export.Dim("batch", min=batch.min, max=batch.max)},) if dynamic else None
    tower.eval()
    try:
        with torch.no_grad(), export_patches(), _quiet_exporter():
            program = torch.onnx.export(
                tower,
                (example,),
                dynamo=True,
                input_names=[spec.input_name],
                output_names=[spec.output_name],
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                verbose=False,
            )
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; all mean "cannot export"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"torch.onnx could not export the {spec.input_name} tower: {first[:400]}") from exc
    if program is None:
        raise ExportError("torch.onnx returned no program")
    model = program.model_proto
    _name_batch_axis(model)
    return model


def _name_batch_axis(model: onnx.ModelProto) -> None:
    """Call the dynamic axis 'batch' on the graph's inputs and outputs, whatever the exporter named it."""
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"
