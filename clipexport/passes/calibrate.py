"""Calibration: run an fp32 graph on sample inputs and record what its tensors hold.

Used by the precision pass (which tensors would overflow fp16) and by the quantization
pass (activation scales). Statistics are reduced per run, so memory stays at one run's
intermediates.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from clipexport.errors import PassError

_FLOAT = onnx.TensorProto.FLOAT


@dataclass
class TensorStats:
    """Per tensor: largest |x| seen, and the |x| quantile used for activation scales; runs = items seen."""

    max_abs: dict[str, float] = field(default_factory=dict)
    quantile_abs: dict[str, float] = field(default_factory=dict)
    runs: int = 0


def float_tensors(model: onnx.ModelProto) -> list[str]:
    """Names of the float32 tensors that nodes produce (after shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)}
    names = []
    for node in model.graph.node:
        for out in node.output:
            if out and types.get(out) == _FLOAT:
                names.append(out)
    return names


def collect_stats(
    model: onnx.ModelProto,
    samples: Sequence[np.ndarray],
    tensors: Sequence[str] | None = None,
    quantile: float | None = None,
    weights_dir: Path | None = None,
) -> TensorStats:
    """Run `model` (fp32) on each sample on ONNX Runtime CPU and reduce every named tensor.

    samples: one array per run, fed to the graph's single input.
    tensors: which intermediate tensors to watch (default: every float tensor).
    quantile: also record this quantile of |x| (slow on big tensors; quantization wants it).
    weights_dir: the folder of the data file a graph with external weights points to; the probe
    graph is written there for the session (ONNX Runtime reads external data only beside the
    graph file), and removed after.
    """
    import onnxruntime as ort

    if not samples:
        raise PassError("calibration needs at least one sample input")
    watched = list(dict.fromkeys(tensors if tensors is not None else float_tensors(model)))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in watched:
        if name not in existing:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # No graph rewrites: the watched names must survive as they are in our graph.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        if weights_dir is None:
            session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        else:
            with tempfile.NamedTemporaryFile(dir=weights_dir, prefix=".calibrate-", suffix=".onnx") as graph_file:
                onnx.save_model(probe, graph_file.name)  # the graph only: its weights stay in the data file
                session = ort.InferenceSession(graph_file.name, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise PassError(f"calibration: onnxruntime cannot load the graph: {str(exc).splitlines()[0][:300]}") from exc
    names = [o.name for o in session.get_outputs()]
    input_name = session.get_inputs()[0].name
    stats = TensorStats()
    watched_set = set(watched)
    # One item per run: with every intermediate exposed as an output, memory grows with the
    # batch (a ViT-L/14 image at batch 4 holds ~2.5 GB of activations).
    items = [sample[i:i + 1] for sample in samples for i in range(sample.shape[0])]
    for item in items:
        values = session.run(names, {input_name: item})
        for name, value in zip(names, values):
            if name not in watched_set:
                continue
            flat = np.abs(np.asarray(value, dtype=np.float32)).ravel()
            if flat.size == 0:
                continue
            peak = float(flat.max())
            if not np.isfinite(peak):
                # -inf mask entries are representable in every float type; they are not a range.
                finite = flat[np.isfinite(flat)]
                peak = float(finite.max()) if finite.size else 0.0
                flat = finite if quantile is not None else flat
            stats.max_abs[name] = max(stats.max_abs.get(name, 0.0), peak)
            if quantile is not None:
                q = float(np.quantile(flat, quantile)) if flat.size > 1 else peak
                # Across runs keep the largest quantile: a scale must cover every sample's bulk.
                stats.quantile_abs[name] = max(stats.quantile_abs.get(name, 0.0), q)
        del values
        stats.runs += 1
    return stats
