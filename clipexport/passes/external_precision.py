"""The precision pass for a tower whose weights live in an ONNX external data file.

A tower over protobuf's 2 GB (ViT-bigG-14's image tower: 7.4 GB of fp32 weights) cannot be
held as one ModelProto, and loading it whole next to its PyTorch copy is what the large-tower
path avoids. The conversion itself needs no more than one weight at a time:

  1. calibrate (fp16): ONNX Runtime runs the fp32 graph straight from its data file, one item
     at a time, to find the tensors that would overflow fp16;
  2. convert: each weight is read from the data file, cast, and kept in memory at the low
     precision (half the fp32 size); the few kept fp32 (norms, the final projection) are read
     back as they are;
  3. write: the graph and one new data file replace the fp32 pair, and the graph is checked
     from its path (the checker cannot take a ModelProto over 2 GB).

Peak memory: the low-precision weights plus one fp32 weight, or ONNX Runtime's fp32 session
during calibration, whichever is larger: under 2x the tower's fp32 weights either way.
"""

from __future__ import annotations

import stat
import time
from pathlib import Path

import onnx
from onnx.external_data_helper import load_external_data_for_model

from clipexport.errors import PassError
from clipexport.passes import PassConfig, PassRecord, count_nodes
from clipexport.passes.precision import LOW_TYPES, PrecisionReport, convert_precision

EXTERNAL_PRECISIONS = tuple(LOW_TYPES)


def data_files(model: onnx.ModelProto) -> list[str]:
    """The external data files the initializers of `model` point to (relative names)."""
    return sorted({
        entry.value for tensor in model.graph.initializer if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data if entry.key == "location"
    })


def lower_external_precision(model: onnx.ModelProto, onnx_path: Path, cfg: PassConfig) -> tuple[onnx.ModelProto, PassRecord]:
    """Convert `model` (its graph in memory, its weights in data files beside `onnx_path`) to
    cfg.precision; write `onnx_path` and `<onnx_path>.data` in place of the fp32 pair.

    Returns the written graph (weights external again) and the precision pass's record.
    """
    if cfg.precision not in EXTERNAL_PRECISIONS:
        raise PassError(f"precision over external data: {cfg.precision!r} is not fp16 or bf16")
    start = time.perf_counter()
    folder = onnx_path.parent
    before = count_nodes(model)
    ranges = None
    if cfg.precision == "fp16":
        if not cfg.calibration:
            raise PassError("the fp16 pass needs calibration inputs to find tensors that overflow fp16")
        from clipexport.passes.calibrate import collect_stats

        ranges = collect_stats(model, cfg.calibration, weights_dir=folder).max_abs
    report = PrecisionReport()
    converted = convert_precision(model, cfg.precision, cfg.precision_policy, ranges, report=report,
                                  weights_dir=folder)
    old_files = data_files(model)
    # What stays fp32 is read back into memory, so nothing points at the old files any more.
    load_external_data_for_model(converted, str(folder))
    for name in old_files:
        (folder / name).unlink()
    onnx_path.unlink(missing_ok=True)
    # Writing clears each tensor's in-memory bytes: what is returned is the graph alone.
    onnx.save_model(converted, str(onnx_path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{onnx_path.name}.data", size_threshold=1024)
    # onnx creates data files readable by their owner only; the artifact's files share one mode.
    (folder / f"{onnx_path.name}.data").chmod(stat.S_IMODE(onnx_path.stat().st_mode))
    onnx.checker.check_model(str(onnx_path))
    onnx.shape_inference.infer_shapes_path(str(onnx_path), str(folder / f".inferred-{onnx_path.name}"),
                                           strict_mode=True)
    (folder / f".inferred-{onnx_path.name}").unlink()
    detail = (f"precision {cfg.precision}: {report.describe()}; converted weight by weight over the external "
              "data file")
    cfg.notes.append(detail)
    record = PassRecord("precision", "applied", before, count_nodes(converted), time.perf_counter() - start, detail)
    return converted, record
