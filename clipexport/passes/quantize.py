"""Quantization pass: post-training int8 or fp8 (E4M3) written as explicit Q/DQ pairs.

Weights: per output channel, symmetric, stored quantized (int8 or float8e4m3fn) with a
DequantizeLinear in front of their op. Activations: per tensor, symmetric, scale from a
calibration run of the fp32 graph. What is quantized is what carries a weight (MatMul,
Gemm, Conv, and the token-embedding Gather); LayerNormalization, Softmax and the attention
matmuls (inside the fused Attention node, or activation x activation MatMuls when unfused)
are excluded by default, and so are the final projection to the embedding and grouped
(depthwise) convolutions.

    x ─► QuantizeLinear ─► DequantizeLinear ─┐
                                             MatMul ─► ...
    W(int8) ───────────► DequantizeLinear ───┘   (axis = output channel)

Symmetric scales with zero points of 0 are what TensorRT's explicit quantization takes;
ONNX Runtime folds the same DQ -> MatMul pairs into integer kernels where it has them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from clipexport.errors import PassError

if TYPE_CHECKING:
    from clipexport.passes import PassConfig

FLOAT = TensorProto.FLOAT
# Largest magnitude of each quantized type (fp8 E4M3FN: 448; int8: 127, symmetric).
QMAX = {"int8": 127.0, "fp8": 448.0}
QTYPE = {"int8": TensorProto.INT8, "fp8": TensorProto.FLOAT8E4M3FN}


@dataclass(frozen=True)
class QuantPolicy:
    """Which ops are quantized (from the recipe); the choice is recorded in the manifest."""

    op_types: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
    quantize_embedding: bool = True  # the text tower's token-embedding table (a Gather)
    keep_final_projection: bool = True
    excluded: tuple[str, ...] = ("LayerNormalization", "Softmax", "Attention")  # stated, never quantized
    activation_quantile: float = 0.9999  # int8 activation scale: this |x| quantile (clips rare outliers)


@dataclass
class QuantReport:
    precision: str = ""
    quantized_ops: dict[str, int] = field(default_factory=dict)
    skipped_ops: dict[str, int] = field(default_factory=dict)
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    activation_tensors: int = 0

    def describe(self) -> str:
        ops = ", ".join(f"{k} {v}" for k, v in sorted(self.quantized_ops.items()))
        ratio = self.weight_bytes_before / max(self.weight_bytes_after, 1)
        return (f"{self.precision} Q/DQ on {ops or 'nothing'}; {self.activation_tensors} activation scales; "
                f"weights {self.weight_bytes_before / 2**20:.1f} -> {self.weight_bytes_after / 2**20:.1f} MiB "
                f"({ratio:.2f}x smaller)")


def _quantize_array(values: np.ndarray, scale: np.ndarray, precision: str) -> np.ndarray:
    scaled = values / scale
    if precision == "int8":
        return np.clip(np.rint(scaled), -127, 127).astype(np.int8)
    import ml_dtypes

    return np.clip(scaled, -448.0, 448.0).astype(ml_dtypes.float8_e4m3fn)


def _weight_axis(node: onnx.NodeProto, position: int) -> int:
    """The output-channel axis of a node's weight input."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return 1  # MatMul B: [K, N]


def _grouped_conv(node: onnx.NodeProto) -> bool:
    """A grouped (depthwise) Conv stays float: ONNX Runtime has no integer kernel for a Conv whose
    output is not quantized, so Q/DQ there meant a float Conv behind a dequantize of its weights and a
    quantize-dequantize of its input on every run (measured on convnext_base: the int8 image tower
    1.55x faster at batch 1 with its 36 depthwise convs left float). Its weights are tiny anyway."""
    return node.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in node.attribute)


def _initializer_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for init in model.graph.initializer:
        total += numpy_helper.to_array(init).nbytes if not init.HasField("data_location") else 0
    return total


def quantize_graph(
    model: onnx.ModelProto,
    precision: str,
    activation_scale: dict[str, float],
    policy: QuantPolicy = QuantPolicy(),
    report: QuantReport | None = None,
) -> onnx.ModelProto:
    """Insert Q/DQ for `precision` ("int8" or "fp8"); activation_scale maps an input tensor
    of a quantized op to its calibrated |x| bound (the scale is bound / QMAX)."""
    if precision not in QMAX:
        raise PassError(f"quantize: unknown precision {precision!r} (int8 or fp8)")
    report = report if report is not None else QuantReport()
    report.precision = precision
    qmax = QMAX[precision]
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {i.name: i for i in graph.initializer}
    report.weight_bytes_before = _initializer_bytes(out)
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    from clipexport.passes.precision import _final_projections, _types, batch_broadcast

    final = _final_projections(out, _types(out)) if policy.keep_final_projection else set()
    # computed the same for every input (CoCa's learned queries): quantizing adds error, saves nothing
    broadcast = batch_broadcast(out)
    new_nodes: list[onnx.NodeProto] = []
    act_dq: dict[str, str] = {}
    weight_dq: dict[str, str] = {}
    replaced: set[str] = set()

    def zero_point(shape: tuple[int, ...], name: str) -> str:
        if precision == "int8":
            array = np.zeros(shape, np.int8)
        else:
            import ml_dtypes

            array = np.zeros(shape, ml_dtypes.float8_e4m3fn)
        tensor = numpy_helper.from_array(array, name)
        graph.initializer.append(tensor)
        return name

    def quantize_weight(name: str, axis: int, ndim_out_axis: int | None = None) -> str:
        """Per-channel DQ of an initializer; `ndim_out_axis` overrides the DQ axis (Gather case)."""
        if name in weight_dq:
            return weight_dq[name]
        values = numpy_helper.to_array(inits[name]).astype(np.float32)
        reduce_axes = tuple(a for a in range(values.ndim) if a != axis)
        bound = np.abs(values).max(axis=reduce_axes) if reduce_axes else np.abs(values)
        scale = np.where(bound > 0, bound / qmax, 1.0).astype(np.float32)
        shape = [1] * values.ndim
        shape[axis] = -1
        q = _quantize_array(values, scale.reshape(shape), precision)
        q_name, s_name = f"{name}/q", f"{name}/scale"
        graph.initializer.append(numpy_helper.from_array(q, q_name))
        graph.initializer.append(numpy_helper.from_array(scale, s_name))
        zp = zero_point(scale.shape, f"{name}/zero_point")
        if ndim_out_axis is not None:
            weight_dq[name] = q_name  # the caller dequantizes after gathering
            return q_name
        dq = f"{name}/dq"
        new_nodes.append(onnx.helper.make_node("DequantizeLinear", [q_name, s_name, zp], [dq], axis=axis,
                                               name=f"DQ_{name}"))
        replaced.add(name)
        weight_dq[name] = dq
        return dq

    def quantize_activation(name: str) -> str:
        if name in act_dq:
            return act_dq[name]
        bound = activation_scale.get(name)
        if bound is None:
            raise PassError(f"quantize: no calibration range for activation {name!r}")
        s_name = f"{name}/act_scale"
        graph.initializer.append(numpy_helper.from_array(
            np.array(bound / qmax if bound > 0 else 1.0, np.float32), s_name))
        zp = zero_point((), f"{name}/act_zero_point")
        q, dq = f"{name}/q", f"{name}/dq"
        new_nodes.append(onnx.helper.make_node("QuantizeLinear", [name, s_name, zp], [q], name=f"Q_{name}"))
        new_nodes.append(onnx.helper.make_node("DequantizeLinear", [q, s_name, zp], [dq], name=f"DQ_{name}"))
        report.activation_tensors += 1
        act_dq[name] = dq
        return dq

    for index, node in enumerate(graph.node):
        # fp8: onnxruntime has no fp8 Gather, so the embedding table stays fp32 there.
        if node.op_type == "Gather" and policy.quantize_embedding and precision == "int8" and node.input[0] in inits \
                and inits[node.input[0]].data_type == FLOAT and len(inits[node.input[0]].dims) == 2 \
                and consumers.get(node.input[0]) == 1:
            # Token embedding [V, D]: per-column scales, gathered as int8/fp8, dequantized after.
            table = node.input[0]
            q_name = quantize_weight(table, axis=1, ndim_out_axis=-1)
            gathered = f"{node.output[0]}/q"
            original_out = node.output[0]
            node.input[0] = q_name
            node.output[0] = gathered
            new_nodes.append(node)
            new_nodes.append(onnx.helper.make_node(
                "DequantizeLinear", [gathered, f"{table}/scale", f"{table}/zero_point"], [original_out], axis=-1,
                name=f"DQ_{original_out}"))
            replaced.add(table)
            report.quantized_ops["Gather"] = report.quantized_ops.get("Gather", 0) + 1
            continue
        weight_pos = 1
        is_target = (
            node.op_type in policy.op_types
            and len(node.input) > weight_pos
            and node.input[weight_pos] in inits
            and inits[node.input[weight_pos]].data_type == FLOAT
            and node.input[0] not in inits
        )
        if not is_target or index in final or node.output[0] in broadcast or _grouped_conv(node):
            if node.op_type in policy.op_types:
                why = ("final projection" if index in final else
                       "batch-broadcast constant" if node.output[0] in broadcast else
                       "grouped/depthwise" if _grouped_conv(node) else
                       "no weight (activation x activation)")
                key = f"{node.op_type} ({why})"
                report.skipped_ops[key] = report.skipped_ops.get(key, 0) + 1
            new_nodes.append(node)
            continue
        node.input[0] = quantize_activation(node.input[0])
        node.input[weight_pos] = quantize_weight(node.input[weight_pos], _weight_axis(node, weight_pos))
        report.quantized_ops[node.op_type] = report.quantized_ops.get(node.op_type, 0) + 1
        new_nodes.append(node)

    del graph.node[:]
    graph.node.extend(new_nodes)
    still_used = {n for node in graph.node for n in node.input}
    remaining = [i for i in graph.initializer if i.name not in replaced or i.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(remaining)
    report.weight_bytes_after = _initializer_bytes(out)
    return out


def activation_inputs(model: onnx.ModelProto, policy: QuantPolicy) -> list[str]:
    """The activation tensors the pass will quantize (inputs 0 of weight-bearing target ops)."""
    from clipexport.passes.precision import batch_broadcast

    inits = {i.name for i in model.graph.initializer}
    broadcast = batch_broadcast(model)
    return list(dict.fromkeys(
        n.input[0] for n in model.graph.node
        if n.op_type in policy.op_types and len(n.input) > 1 and n.input[1] in inits and n.input[0] not in inits
        and n.output[0] not in broadcast and not _grouped_conv(n)
    ))


def quantize(model: onnx.ModelProto, cfg: PassConfig) -> onnx.ModelProto:
    """The pipeline's quantization pass (int8/fp8 builds only)."""
    from clipexport.passes.calibrate import collect_stats

    if cfg.precision not in QMAX:
        return model
    if not cfg.calibration:
        raise PassError(f"{cfg.precision} quantization needs calibration inputs")
    watched = activation_inputs(model, cfg.quant_policy)
    quantile = cfg.quant_policy.activation_quantile if cfg.precision == "int8" else None
    stats = collect_stats(model, cfg.calibration, watched, quantile=quantile)
    # int8's 255 levels cannot span rare outliers without crushing the bulk; fp8's exponent can.
    bounds = stats.quantile_abs if cfg.precision == "int8" else stats.max_abs
    report = QuantReport()
    quantized = quantize_graph(model, cfg.precision, bounds, cfg.quant_policy, report)
    onnx.checker.check_model(quantized)
    onnx.shape_inference.infer_shapes(quantized, strict_mode=True)
    cfg.notes.append(report.describe())
    cfg.details["quantize"] = {
        "precision": cfg.precision,
        "policy": asdict(cfg.quant_policy),
        "quantized_ops": report.quantized_ops,
        "not_quantized": report.skipped_ops,
        "activation_scales": report.activation_tensors,
        "calibration_items": stats.runs,
        "weight_bytes": {"before": report.weight_bytes_before, "after": report.weight_bytes_after},
    }
    return quantized


def describe_policy(policy: QuantPolicy) -> dict[str, Any]:
    return asdict(policy)
