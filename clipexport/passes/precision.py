"""Precision pass: write fp16 or bf16 into the graph (TensorRT 11 builds strongly typed networks).

Every node gets a compute type:
  low   weights and activations in fp16/bf16: MatMul, Gemm, Conv, Attention, Add, Gelu ...
  fp32  the policy's safe ops (LayerNormalization statistics, Softmax, reductions), the final
        projection(s) feeding each output, and, for fp16, every node whose fp32 calibration
        run saw a value beyond the fp16 headroom (what overflows to inf in a naive conversion)
  follow  layout ops (Reshape, Transpose, Gather, Slice ...) keep their data input's type
  fp32  too: batch-broadcast constants, tensors that depend on the input's shape but not on its
        values (a class token or CoCa's learned queries expanded to the batch); ONNX Runtime 1.32's
        CPU optimizer crashes on CoCa's pooler when that branch is fp16, and it is tiny anyway
Casts are inserted only where a tensor crosses between the two. Graph inputs and outputs
keep their fp32 type (token ids stay integers: no integer tensor is ever touched).

    x(fp32) ─Cast─► MatMul(fp16) ─► Gelu(fp16) ─► MatMul(fp16) ─Cast─► Add(fp32, residual) ─► LN(fp32)

ONNX Runtime's CPU provider has no bf16 kernels (fp16 it runs). `emulate_on_fp32` turns a
bf16 graph into one that computes every node in fp32 and rounds every result back to bf16:
the artifact's own decisions, bf16 storage, fp32 arithmetic (as GPU tensor cores accumulate).
That is how bf16 parity is measured here, and the parity record says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from clipexport.errors import PassError

if TYPE_CHECKING:
    from clipexport.passes import PassConfig

FLOAT = TensorProto.FLOAT
LOW_TYPES = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
FP16_MAX = 65504.0
# Ops whose output has the type of their data input and that do no arithmetic.
FOLLOW_OPS = frozenset({
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Gather", "GatherND",
    "GatherElements", "Expand", "Identity", "Split", "Concat", "Tile", "Where", "Pad",
})
# Ops that read a float input only for its shape, or return integers: never cast their inputs.
AGNOSTIC_OPS = frozenset({"Shape", "Size"})
# Float inputs that must stay fp32 whatever the node computes in (op -> input positions).
FIXED_FLOAT_INPUTS: Mapping[str, tuple[int, ...]] = {"Resize": (1, 2)}
PRODUCERS_OF_OUTPUT = frozenset({"MatMul", "Gemm"})


@dataclass(frozen=True)
class PrecisionPolicy:
    """What stays fp32 in a low-precision graph (from the recipe)."""

    keep_fp32_ops: tuple[str, ...] = ("LayerNormalization", "Softmax", "ReduceMean", "ReduceSum")
    keep_final_projection: bool = True
    # fp16: keep a node fp32 when calibration saw |x| above FP16_MAX / headroom.
    fp16_headroom: float = 4.0


@dataclass
class PrecisionReport:
    low_nodes: int = 0
    fp32_nodes: int = 0
    casts: int = 0
    kept_for_range: list[str] = field(default_factory=list)

    def describe(self) -> str:
        kept = f", {len(self.kept_for_range)} kept fp32 for fp16 range" if self.kept_for_range else ""
        return f"{self.low_nodes} nodes low precision, {self.fp32_nodes} fp32, {self.casts} casts{kept}"


def _cast_array(array: np.ndarray, low: int) -> np.ndarray:
    if low == TensorProto.FLOAT16:
        return array.astype(np.float16)
    import ml_dtypes

    return array.astype(ml_dtypes.bfloat16)


def _types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output)}
    for init in model.graph.initializer:
        types[init.name] = init.data_type
    return types


def _constants_to_initializers(model: onnx.ModelProto) -> None:
    """Float Constant nodes become initializers, so one code path converts all float data."""
    kept = []
    for node in model.graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value" \
                and node.attribute[0].t.data_type == FLOAT:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            model.graph.initializer.append(tensor)
        else:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)


def batch_broadcast(model: onnx.ModelProto) -> set[str]:
    """Tensors computed from constants and the graph inputs' shapes only, never their values:
    `Expand(learned_query, [batch, ...])` and what is computed from it alone."""
    dependent = {value.name for value in model.graph.input}  # depends on input values
    shaped: set[str] = set()
    for node in model.graph.node:
        inputs = [name for name in node.input if name]
        if node.op_type in AGNOSTIC_OPS:
            shaped.update(node.output)
        elif any(name in dependent for name in inputs):
            dependent.update(node.output)
        elif any(name in shaped for name in inputs):
            shaped.update(node.output)
    return shaped


def _final_projections(model: onnx.ModelProto, types: Mapping[str, int]) -> set[int]:
    """Indices of the MatMul/Gemm nodes that feed a graph output through layout ops only."""
    producer = {out: i for i, n in enumerate(model.graph.node) for out in n.output}
    found: set[int] = set()
    for output in model.graph.output:
        name = output.name
        while name in producer:
            node = model.graph.node[producer[name]]
            if node.op_type in PRODUCERS_OF_OUTPUT:
                found.add(producer[name])
                break
            if node.op_type not in FOLLOW_OPS and node.op_type not in ("Add", "Mul", "Cast"):
                break
            floats = [i for i in node.input if i and types.get(i) == FLOAT and i in producer]
            if not floats:
                break
            name = floats[0]
    return found


def convert_precision(
    model: onnx.ModelProto,
    precision: str,
    policy: PrecisionPolicy = PrecisionPolicy(),
    ranges: Mapping[str, float] | None = None,
    report: PrecisionReport | None = None,
    weights_dir: Path | None = None,
) -> onnx.ModelProto:
    """Return a copy of `model` computing in `precision` ("fp16" or "bf16") under `policy`.

    ranges: max |x| per float tensor of the fp32 graph (from calibration); used for fp16
    only. None converts without a range guard (what a naive conversion does).
    weights_dir: where the data file of a graph with external weights is: each weight is read
    from it when converted, one at a time; the converted ones are held in memory, those kept
    fp32 stay external.
    """
    if precision not in LOW_TYPES:
        raise PassError(f"precision pass: unknown precision {precision!r} (fp16 or bf16)")
    low = LOW_TYPES[precision]
    report = report if report is not None else PrecisionReport()
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _constants_to_initializers(out)
    graph = out.graph
    types = _types(out)
    inits = {i.name: i for i in graph.initializer}
    keep_ops = set(policy.keep_fp32_ops)
    final = _final_projections(out, types) if policy.keep_final_projection else set()
    broadcast = batch_broadcast(out)
    limit = FP16_MAX / policy.fp16_headroom
    base_dir = str(weights_dir) if weights_dir is not None else ""
    weight_peaks: dict[str, float] = {}  # an external weight is read from disk once for its range

    def over_range(name: str) -> bool:
        if low != TensorProto.FLOAT16:
            return False
        if name in inits and types.get(name) == FLOAT:
            if name not in weight_peaks:
                values = np.abs(numpy_helper.to_array(inits[name], base_dir))
                weight_peaks[name] = float(values[np.isfinite(values)].max(initial=0.0))  # inf (masks) fits every type
            return weight_peaks[name] > limit
        return ranges is not None and ranges.get(name, 0.0) > limit

    current: dict[str, int] = {}  # tensor -> its type in the new graph
    for value in graph.input:
        current[value.name] = value.type.tensor_type.elem_type
    converted_inits: dict[str, str] = {}
    cast_cache: dict[tuple[str, int], str] = {}
    new_nodes: list[onnx.NodeProto] = []
    used_names = {n for node in graph.node for n in list(node.input) + list(node.output)} | set(inits)

    def fresh(base: str) -> str:
        name, k = base, 0
        while name in used_names:
            k += 1
            name = f"{base}_{k}"
        used_names.add(name)
        return name

    def type_of(name: str) -> int:
        if name in current:
            return current[name]
        return types.get(name, 0)

    def as_type(name: str, want: int) -> str:
        """`name` as a tensor of type `want`: a converted initializer or a (cached) Cast."""
        have = type_of(name)
        if have == want:
            return name
        if name in inits and name not in current:
            key = f"{name}/{'low' if want == low else 'fp32'}"
            if key not in converted_inits:
                array = numpy_helper.to_array(inits[name], base_dir).astype(np.float32)
                tensor = numpy_helper.from_array(_cast_array(array, low) if want == low else array, fresh(key))
                graph.initializer.append(tensor)
                converted_inits[key] = tensor.name
                current[tensor.name] = want
            return converted_inits[key]
        if (name, want) not in cast_cache:
            target = fresh(f"{name}/to_{'low' if want == low else 'fp32'}")
            new_nodes.append(onnx.helper.make_node("Cast", [name], [target], to=want, name=fresh(f"Cast_{target}")))
            report.casts += 1
            cast_cache[(name, want)] = target
            current[target] = want
        return cast_cache[(name, want)]

    for index, node in enumerate(graph.node):
        float_in = [i for i, name in enumerate(node.input) if name and types.get(name) == FLOAT]
        float_out = [i for i, name in enumerate(node.output) if name and types.get(name) == FLOAT]
        casts_to_float = node.op_type == "Cast" and any(a.name == "to" and a.i == FLOAT for a in node.attribute)
        fills_float = node.op_type == "ConstantOfShape" and any(
            a.name == "value" and a.t.data_type == FLOAT for a in node.attribute)
        if not float_in and not float_out:
            new_nodes.append(node)
            continue
        if node.op_type in AGNOSTIC_OPS:
            new_nodes.append(node)
            continue
        want: int
        if any(node.output[i] in broadcast for i in float_out):
            want = FLOAT
        elif node.op_type in FOLLOW_OPS:
            # follow the data that depends on the input (a Concat of an fp32 class token and low patches: low)
            data = [node.input[i] for i in float_in if node.input[i] not in broadcast]
            want = type_of(data[0]) if data and not (data[0] in inits and data[0] not in current) else low
            if any(over_range(n) for n in list(node.input) + list(node.output) if n):
                want = FLOAT
        else:
            keep = node.op_type in keep_ops or index in final
            if not keep and any(over_range(n) for n in list(node.input) + list(node.output) if n):
                keep = True
                report.kept_for_range.append(node.name or node.op_type)
            want = FLOAT if keep else low
        fixed = FIXED_FLOAT_INPUTS.get(node.op_type, ())
        for i in float_in:
            if i not in fixed and node.op_type != "Cast":  # Cast takes any input type
                node.input[i] = as_type(node.input[i], want)
        if casts_to_float and want == low:
            for a in node.attribute:
                if a.name == "to":
                    a.i = low
        if fills_float and want == low:
            for a in node.attribute:
                if a.name == "value":
                    a.t.CopyFrom(numpy_helper.from_array(_cast_array(numpy_helper.to_array(a.t), low), a.t.name))
        if want == low:
            report.low_nodes += 1
        else:
            report.fp32_nodes += 1
        produced = want if (float_in or casts_to_float or fills_float) else FLOAT
        new_nodes.append(node)
        for i in float_out:
            current[node.output[i]] = produced

    # Outputs keep fp32: cast back where the producer computes in low precision.
    for value in graph.output:
        if value.type.tensor_type.elem_type == FLOAT and type_of(value.name) == low:
            inner = fresh(f"{value.name}/low")
            for node in new_nodes:
                node.output[:] = [inner if o == value.name else o for o in node.output]
                node.input[:] = [inner if i == value.name else i for i in node.input]
            new_nodes.append(onnx.helper.make_node("Cast", [inner], [value.name], to=FLOAT, name=fresh("Cast_output")))
            report.casts += 1

    del graph.node[:]
    graph.node.extend(new_nodes)
    referenced = {n for node in graph.node for n in node.input}
    referenced |= {o.name for o in graph.output}
    remaining = [i for i in graph.initializer if i.name in referenced]
    del graph.initializer[:]
    graph.initializer.extend(remaining)
    del graph.value_info[:]
    return out


def emulate_on_fp32(model: onnx.ModelProto, low: int = TensorProto.BFLOAT16) -> onnx.ModelProto:
    """Same graph, every node that touches a `low` tensor computed in fp32 between Casts.

        a(bf16) ─Cast fp32─► Op(fp32) ─Cast bf16─► b(bf16)

    Cast nodes run as they are (ONNX Runtime's CPU provider has bf16 Casts, not bf16 math).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    types = _types(out)
    new_nodes: list[onnx.NodeProto] = []
    counter = 0

    def name(base: str) -> str:
        nonlocal counter
        counter += 1
        return f"{base}/emu{counter}"

    for node in graph.node:
        if node.op_type == "Cast" or not any(types.get(t) == low for t in list(node.input) + list(node.output) if t):
            new_nodes.append(node)
            continue
        for i, tensor in enumerate(node.input):
            if tensor and types.get(tensor) == low:
                up = name(tensor)
                new_nodes.append(onnx.helper.make_node("Cast", [tensor], [up], to=FLOAT, name=name("Cast")))
                node.input[i] = up
        if node.op_type == "ConstantOfShape":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type == low:
                    a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32), a.t.name))
        downs = []
        for i, tensor in enumerate(node.output):
            if tensor and types.get(tensor) == low:
                exact = name(tensor)
                downs.append(onnx.helper.make_node("Cast", [exact], [tensor], to=low, name=name("Cast")))
                node.output[i] = exact
        new_nodes.append(node)
        new_nodes.extend(downs)
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.value_info[:]
    return out


def apply_precision(model: onnx.ModelProto, cfg: PassConfig) -> onnx.ModelProto:
    """The pipeline's precision pass: fp16/bf16 per the recipe's policy; fp32/int8/fp8 pass through."""
    if cfg.precision not in LOW_TYPES:
        return model
    ranges = None
    if cfg.precision == "fp16":
        if not cfg.calibration:
            raise PassError("the fp16 pass needs calibration inputs to find tensors that overflow fp16")
        from clipexport.passes.calibrate import collect_stats

        ranges = collect_stats(model, cfg.calibration).max_abs
    report = PrecisionReport()
    converted = convert_precision(model, cfg.precision, cfg.precision_policy, ranges, report=report)
    onnx.checker.check_model(converted)
    onnx.shape_inference.infer_shapes(converted, strict_mode=True)
    cfg.notes.append(f"precision {cfg.precision}: {report.describe()}")
    return converted
