"""Attention -> our TensorRT plugin node, for TensorRT versions without native attention.

Rewrites every attention block into one `clip_attention` node that TensorRT's ONNX parser
maps to the clipexport attention plugin (clipexport.trt.plugin):

  ONNX Attention (opset 23), 4-D q/k/v, no past, no softcap, mask absent or constant-causal:

      q ─┐
      k ─┼─ Attention(scale, is_causal) ─ y    ==>   clip_attention(q, k, v) ─ y
      v ─┘

  or the decomposed chain a plain export leaves:

      q ───────────────────┐
      k ─ Transpose(0132) ─ MatMul ─ [Mul|Div c] ─ [Add causal mask] ─ Softmax(-1) ─ MatMul ─ y
      v ──────────────────────────────────────────────────────────────────────────────┘
                            ==>  clip_attention(q, k, v; scale=c or 1/c, causal) ─ y

A scale folded into q or k before the first MatMul stays where it is (the plugin then uses
scale 1). A block the plugin cannot express is an error naming the node, not a silent
skip: a half-substituted graph would only fail later, inside TensorRT.

The pass is not in the default pipeline; the TensorRT build step runs it when the
installed TensorRT has no native attention layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from clipexport.errors import PassError
from clipexport.trt.plugin import PLUGIN_DOMAIN, PLUGIN_NAME, PLUGIN_NAMESPACE

if TYPE_CHECKING:
    from clipexport.passes import PassConfig

ONNX_DOMAINS = ("", "ai.onnx")
# An additive mask entry at or below this counts as "masked" (exporters use -inf or finfo.min).
MASKED = -1e4


class AttentionPluginError(PassError):
    """An attention block that the plugin cannot express (named in the message)."""


@dataclass(frozen=True)
class _Graph:
    """Lookups over one graph, built once per pass run."""

    producers: dict[str, onnx.NodeProto]
    consumers: dict[str, list[onnx.NodeProto]]
    constants: dict[str, np.ndarray]
    ranks: dict[str, int]
    shapes: dict[str, tuple[int | str, ...]]
    outputs: frozenset[str]
    opset: int


def _index(model: onnx.ModelProto) -> _Graph:
    graph = model.graph
    producers: dict[str, onnx.NodeProto] = {}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    constants: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        for name in node.output:
            producers[name] = node
        for name in node.input:
            if name:
                consumers.setdefault(name, []).append(node)
        if node.op_type == "Constant" and node.domain in ONNX_DOMAINS:
            for attr in node.attribute:
                if attr.name == "value":
                    constants[node.output[0]] = numpy_helper.to_array(attr.t)
    shapes: dict[str, tuple[int | str, ...]] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        values = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    except Exception:  # noqa: BLE001 - shape inference is a help here, not a requirement
        values = list(graph.value_info) + list(graph.input) + list(graph.output)
    for value in values:
        t = value.type.tensor_type
        if t.HasField("shape"):
            shapes[value.name] = tuple(d.dim_param or int(d.dim_value) for d in t.shape.dim)
    opset = next((o.version for o in model.opset_import if o.domain in ONNX_DOMAINS), 0)
    return _Graph(producers, consumers, constants, {k: len(v) for k, v in shapes.items()}, shapes,
                  frozenset(o.name for o in graph.output), opset)


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _label(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type} -> {node.output[0]}"


def is_causal_mask(mask: np.ndarray) -> bool:
    """True for a [..., S, S] mask that hides exactly the keys after each query (and nothing else):
    boolean (True = attend) lower-triangular, or additive 0 on/below the diagonal and <= MASKED above."""
    if mask.ndim < 2 or mask.shape[-1] != mask.shape[-2] or mask.size == 0:
        return False
    square = mask.reshape(-1, mask.shape[-2], mask.shape[-1])
    if not all(np.array_equal(square[0], s) for s in square[1:]):
        return False
    m = square[0]
    lower = np.tril(np.ones(m.shape, dtype=bool))
    if m.dtype == np.bool_:
        return bool(np.array_equal(m, lower))
    m = m.astype(np.float64)
    return bool(np.all(m[lower] == 0) and np.all(m[~lower] <= MASKED))


def _plugin_node_name(block: str) -> str:
    # TensorRT names the plugin layer after this node; the plugin name in it lets the engine's
    # layer information be traced back (clipexport.trt.layer_info).
    return f"{block}/{PLUGIN_NAME}"


def _plugin_node(name: str, q: str, k: str, v: str, y: str, scale: float, causal: bool) -> onnx.NodeProto:
    return helper.make_node(
        PLUGIN_NAME, [q, k, v], [y], name=name, domain=PLUGIN_DOMAIN,
        plugin_namespace=PLUGIN_NAMESPACE, scale=float(scale), causal=int(causal), aot=1,
    )


def _used(g: _Graph, name: str) -> bool:
    return bool(name) and (name in g.outputs or bool(g.consumers.get(name)))


def _rewrite_attention(node: onnx.NodeProto, g: _Graph) -> tuple[onnx.NodeProto | None, str]:
    """The plugin node for an ONNX Attention node, or None and why not."""
    inputs = list(node.input) + [""] * (6 - len(node.input))
    q, k, v, mask, past_k, past_v = inputs[:6]
    if past_k or past_v or any(inputs[6:]):
        return None, "it uses past key/value or padding inputs (a KV cache); CLIP towers have none"
    if any(_used(g, out) for out in node.output[1:]):
        return None, "it exposes present key/value or Q·Kᵀ outputs"
    if float(_attr(node, "softcap", 0.0)) != 0.0:
        return None, "it uses softcap"
    if _attr(node, "q_num_heads", None) is not None or any(g.ranks.get(t) == 3 for t in (q, k, v)):
        return None, "its q/k/v are 3-D [batch, tokens, heads*width]; the plugin takes 4-D [batch, heads, tokens, width]"
    for t in (q, k, v):
        if t in g.ranks and g.ranks[t] != 4:
            return None, f"input {t!r} has rank {g.ranks[t]}, not 4"
    qs, ks = g.shapes.get(q), g.shapes.get(k)
    if qs and ks and isinstance(qs[1], int) and isinstance(ks[1], int) and qs[1] != ks[1]:
        return None, f"it has {qs[1]} query heads but {ks[1]} key/value heads (grouped-query attention)"
    causal = bool(_attr(node, "is_causal", 0))
    if mask:
        verdict = _mask_verdict(mask, g)
        if verdict:
            return None, verdict
        causal = True
    scale = float(_attr(node, "scale", 0.0))  # 0: the plugin uses 1/sqrt(head width), ONNX's default
    return _plugin_node(_plugin_node_name(node.name or node.output[0]), q, k, v, node.output[0], scale, causal), ""


def _mask_verdict(name: str, g: _Graph) -> str:
    """Empty when `name` is a causal mask: a constant one, or a top-left [:L, :L] slice of one
    (a trimmed text tower slices its 77x77 mask to the input length at run time)."""
    for _ in range(8):
        if name in g.constants:
            return "" if is_causal_mask(g.constants[name]) else "its constant attention mask is not causal"
        node = g.producers.get(name)
        if node is None:
            return "its attention mask is a graph input; the plugin only knows causal masks"
        if node.op_type in ("Unsqueeze", "Identity"):
            name = node.input[0]
            continue
        if node.op_type == "Slice":
            starts = g.constants.get(node.input[1])
            steps = g.constants.get(node.input[4]) if len(node.input) > 4 and node.input[4] else None
            if starts is None or np.any(starts != 0) or (steps is not None and np.any(steps != 1)):
                return "its attention mask is a slice of a mask not starting at [0, 0]"
            name = node.input[0]
            continue
        return f"its attention mask is computed at run time ({node.op_type}); the plugin only knows causal masks"
    return "its attention mask is computed through too many steps to recognize"


def _scalar(g: _Graph, name: str) -> float | None:
    value = g.constants.get(name)
    if value is None or value.size != 1:
        return None
    return float(value.reshape(()))


def _rewrite_decomposed(softmax: onnx.NodeProto, g: _Graph) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto], str]:
    """(nodes to remove, nodes to add, why not) for a MatMul-[scale]-[mask]-Softmax-MatMul chain."""
    axis = _attr(softmax, "axis", None)
    if not (axis == -1 or axis == 3 or (axis is None and g.opset >= 13)):
        return [], [], f"its softmax axis is {axis}, not the last one"
    after = g.consumers.get(softmax.output[0], [])
    if len(after) != 1 or after[0].op_type != "MatMul" or after[0].input[0] != softmax.output[0]:
        return [], [], "its softmax does not feed exactly one MatMul as the left operand"
    pv = after[0]
    chain, scale, causal = [softmax, pv], 1.0, False
    x = softmax.input[0]
    for _ in range(4):
        node = g.producers.get(x)
        if node is None or node.op_type == "MatMul":
            break
        if len(g.consumers.get(x, [])) != 1:
            return [], [], f"{x!r} has other consumers"
        if node.op_type not in ("Mul", "Div", "Add"):
            return [], [], f"a {node.op_type} node sits between the matmuls and the softmax"
        a, b = node.input[0], node.input[1]
        const_name, other = (b, a) if b in g.constants else (a, b) if a in g.constants else ("", "")
        if not const_name or (node.op_type == "Div" and const_name != b):
            return [], [], f"{node.op_type} {_label(node)} has no constant operand"
        if node.op_type == "Add":
            if not is_causal_mask(g.constants[const_name]):
                return [], [], "its additive mask is not a constant causal mask"
            causal = True
        else:
            c = _scalar(g, const_name)
            if c is None or c <= 0:
                return [], [], f"{node.op_type} {_label(node)} scales by a non-scalar or non-positive constant"
            scale = scale * c if node.op_type == "Mul" else scale / c
        chain.append(node)
        x = other
    qk = g.producers.get(x)
    if qk is None or qk.op_type != "MatMul":
        return [], [], "no Q·Kᵀ MatMul found before the softmax"
    if len(g.consumers.get(x, [])) != 1:
        return [], [], "the Q·Kᵀ scores are used elsewhere"
    chain.append(qk)
    q, kt = qk.input[0], qk.input[1]
    v = pv.input[1]
    added: list[onnx.NodeProto] = []
    transpose = g.producers.get(kt)
    if transpose is not None and transpose.op_type == "Transpose" and list(_attr(transpose, "perm", [])) == [0, 1, 3, 2]:
        k = transpose.input[0]
        if len(g.consumers.get(kt, [])) == 1 and kt not in g.outputs:
            chain.append(transpose)
    else:
        if g.ranks.get(kt) != 4:
            return [], [], "Kᵀ is not a known 4-D tensor"
        k = f"{kt}__clip_attention_k"
        added.append(helper.make_node("Transpose", [kt], [k], name=f"{qk.name or kt}/untranspose_k", perm=[0, 1, 3, 2]))
    for t in (q, k, v):
        if t in g.ranks and g.ranks[t] != 4:
            return [], [], f"{t!r} has rank {g.ranks[t]}, not 4"
    if not any(g.ranks.get(t) == 4 for t in (q, v)) and transpose is None:
        return [], [], "the ranks of q and v are unknown"
    added.append(_plugin_node(_plugin_node_name(softmax.name or pv.output[0]), q, k, v, pv.output[0], scale, causal))
    return chain, added, ""


def substitute_attention_plugin(model: onnx.ModelProto, cfg: PassConfig | None = None) -> onnx.ModelProto:
    """A copy of `model` with every attention block replaced by the clipexport plugin node.

    Raises AttentionPluginError naming each block the plugin cannot express, or when the
    graph has no attention at all (the pass was asked for, so finding nothing is a bug).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = _index(out)
    remove: set[int] = set()
    replace: dict[int, list[onnx.NodeProto]] = {}  # node position -> nodes to put there
    problems: list[str] = []
    found = 0
    for pos, node in enumerate(out.graph.node):
        if node.op_type == "Attention" and node.domain in ONNX_DOMAINS:
            found += 1
            new, why = _rewrite_attention(node, g)
            if new is None:
                problems.append(f"{_label(node)}: {why}")
            else:
                replace[pos] = [new]
                remove.add(pos)
    positions = {id(n): i for i, n in enumerate(out.graph.node)}
    for node in out.graph.node:
        if node.op_type != "Softmax" or node.domain not in ONNX_DOMAINS:
            continue
        if not any(c.op_type == "MatMul" for c in g.consumers.get(node.output[0], [])):
            continue
        found += 1
        chain, added, why = _rewrite_decomposed(node, g)
        if why:
            problems.append(f"{_label(node)}: {why}")
            continue
        # The new nodes go where the final MatMul was: all their inputs exist by then.
        last = positions[id(chain[1])]
        replace[last] = added
        remove.update(positions[id(n)] for n in chain)
    if problems:
        raise AttentionPluginError(
            f"{len(problems)} of {found} attention blocks cannot become the clipexport attention plugin:\n  "
            + "\n  ".join(problems)
        )
    if found == 0:
        raise AttentionPluginError("the graph has no attention (no ONNX Attention node, no MatMul-Softmax-MatMul)")
    new_nodes: list[onnx.NodeProto] = []
    for pos, node in enumerate(out.graph.node):
        if pos in replace:
            new_nodes.extend(replace[pos])
        if pos not in remove:
            new_nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(new_nodes)
    if not any(o.domain == PLUGIN_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(PLUGIN_DOMAIN, 1))
    _drop_dead_constants(out)
    return out


def _drop_dead_constants(model: onnx.ModelProto) -> None:
    """Masks and scales the plugin absorbed are no longer read: drop them and the nodes that only
    computed them (a 77x77 mask and its run-time slice). ONNX nodes have no side effects."""
    while True:
        used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
        keep = [n for n in model.graph.node if any(out in used for out in n.output if out)]
        if len(keep) == len(model.graph.node):
            break
        del model.graph.node[:]
        model.graph.node.extend(keep)
    used |= {i.name for i in model.graph.input}
    inits = [i for i in model.graph.initializer if i.name in used]
    if len(inits) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(inits)


def count_plugin_nodes(model: onnx.ModelProto) -> int:
    return sum(1 for n in model.graph.node if n.op_type == PLUGIN_NAME and n.domain == PLUGIN_DOMAIN)
