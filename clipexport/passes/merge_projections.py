"""Sibling projections become one: MatMuls that read the same activation with constant weights
(the separate q, k and v projections of transformers' and timm's attention) are merged into
one MatMul on the concatenated weights, then split.

    x ─┬─ MatMul(Wq) ─ [Add(bq)] ─► q          x ─ MatMul([Wq|Wk|Wv]) ─ [Add([bq|bk|bv])] ─ Split ─► q, k, v
       ├─ MatMul(Wk) ─ [Add(bk)] ─► k    ==>
       └─ MatMul(Wv) ─ [Add(bv)] ─► v

Why: one activation feeding several Q/DQ MatMuls is a pattern ONNX Runtime's QDQ fusion does
not turn into integer kernels (measured on transformers' CLIP: the q/k/v MatMuls stayed float
MatMuls fed by a DequantizeLinear of their int8 weights on every run), while the one-MatMul form
(open_clip's packed in_proj) fuses. The numbers are the same: the weights and biases are
concatenated along the output channels, and per-output-channel quantization gives each column
the scale it had. One larger GEMM also beats three small ones in fp32.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

if TYPE_CHECKING:
    from clipexport.passes import PassConfig


def _float_initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in graph.initializer
            if i.data_type == TensorProto.FLOAT and not i.HasField("data_location")}


def merge_projections(model: onnx.ModelProto, cfg: PassConfig) -> onnx.ModelProto:
    """Merge every group of >= 2 MatMuls sharing input 0 and holding constant 2-D fp32 weights
    with the same input size. A bias Add (a constant 1-D fp32 vector) that follows every member
    of a group, as its only consumer, is merged too."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = _float_initializers(graph)
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    outputs = {o.name for o in graph.output}
    groups: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        if (node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and node.input[1] in inits
                and node.input[0] not in inits and len(inits[node.input[1]].dims) == 2
                and node.output[0] not in outputs):
            groups[node.input[0]].append(node)

    replaced: dict[int, list[onnx.NodeProto]] = {}  # id of a group's first node -> its new nodes
    removed: set[int] = set()
    merged = 0
    for x, members in groups.items():
        if len(members) < 2 or len({inits[m.input[1]].dims[0] for m in members}) != 1:
            continue
        weights = [numpy_helper.to_array(inits[m.input[1]]) for m in members]
        biases = [_bias_add(m, consumers, inits, outputs) for m in members]
        with_bias = all(b is not None for b in biases)
        sizes = [w.shape[1] for w in weights]
        stem = f"{members[0].name}/merged"
        w_name = f"{stem}/weight"
        graph.initializer.append(numpy_helper.from_array(np.concatenate(weights, axis=1), w_name))
        nodes = [helper.make_node("MatMul", [x, w_name], [f"{stem}/matmul"], name=f"{stem}/MatMul")]
        joined = f"{stem}/matmul"
        results = [m.output[0] for m in members]
        if with_bias:
            adds = [b for b in biases if b is not None]
            b_name = f"{stem}/bias"
            vectors = [numpy_helper.to_array(inits[_const_input(a, inits)]) for a in adds]
            graph.initializer.append(numpy_helper.from_array(np.concatenate(vectors), b_name))
            nodes.append(helper.make_node("Add", [joined, b_name], [f"{stem}/add"], name=f"{stem}/Add"))
            joined = f"{stem}/add"
            results = [a.output[0] for a in adds]
            removed.update(id(a) for a in adds)
        s_name = f"{stem}/split_sizes"
        graph.initializer.append(numpy_helper.from_array(np.array(sizes, np.int64), s_name))
        nodes.append(helper.make_node("Split", [joined, s_name], results, name=f"{stem}/Split", axis=-1))
        replaced[id(members[0])] = nodes
        removed.update(id(m) for m in members[1:])
        merged += 1
    if not merged:
        return model
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if id(node) in replaced:
            new_nodes.extend(replaced[id(node)])
        elif id(node) not in removed:
            new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    count = sum(len(g) for g in groups.values() if len(g) >= 2)
    cfg.notes.append(f"{merged} groups of sibling projections merged ({count} MatMuls -> {merged})")
    cfg.details["merge_projections"] = {"groups": merged, "matmuls_before": count}
    return out


def _const_input(add: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> str:
    return add.input[1] if add.input[1] in inits else add.input[0]


def _bias_add(matmul: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]],
              inits: dict[str, onnx.TensorProto], outputs: set[str]) -> onnx.NodeProto | None:
    """The Add of a constant 1-D bias that is the MatMul's only consumer, else None."""
    users = consumers.get(matmul.output[0], [])
    if len(users) != 1 or matmul.output[0] in outputs:
        return None
    add = users[0]
    if add.op_type != "Add" or len(add.input) != 2:
        return None
    other = [n for n in add.input if n != matmul.output[0]]
    width = inits[matmul.input[1]].dims[1]
    if len(other) != 1 or other[0] not in inits or list(inits[other[0]].dims) != [width]:
        return None
    return add
