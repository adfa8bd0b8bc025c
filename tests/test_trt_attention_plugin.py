"""The pass that puts our TensorRT attention plugin into the graph, on tiny graphs.

Beyond "which nodes are there", each rewrite is checked for meaning: the original graph
runs on ONNX Runtime, and the plugin's documented semantics, evaluated in numpy with the
attributes the pass wrote, must give the same numbers.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from clipexport.passes.attention_plugin import (
    AttentionPluginError,
    count_plugin_nodes,
    is_causal_mask,
    substitute_attention_plugin,
)
from clipexport.trt.plugin import PLUGIN_DOMAIN, PLUGIN_NAME, PLUGIN_NAMESPACE

B, H, S, D = 2, 3, 5, 8
SHAPE = [B, H, S, D]


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _plugin_semantics(q, k, v, scale: float, causal: int) -> np.ndarray:
    """What clip_attention computes (clipexport.trt.plugin docstring)."""
    s = scale if scale > 0 else 1.0 / np.sqrt(q.shape[-1])
    scores = (q.astype(np.float64) @ np.swapaxes(k, -1, -2)) * s
    if causal:
        scores = np.where(np.tril(np.ones(scores.shape[-2:], bool)), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def _qkv(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(SHAPE).astype(np.float32) for n in "qkv"}


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]


def _model(nodes, inputs, initializers=(), opset: int = 23) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "attn", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, SHAPE)], list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def _causal_additive(n: int) -> np.ndarray:
    return np.triu(np.full((n, n), -np.inf, np.float32), k=1)


def _check_plugin_matches(original: onnx.ModelProto, rewritten: onnx.ModelProto, feeds) -> dict[str, object]:
    (node,) = [n for n in rewritten.graph.node if n.op_type == PLUGIN_NAME]
    attrs = _attrs(node)
    assert node.domain == PLUGIN_DOMAIN and attrs["plugin_namespace"] == PLUGIN_NAMESPACE.encode()
    assert attrs["aot"] == 1 and node.name.endswith(f"/{PLUGIN_NAME}")
    want = _run(original, feeds)
    q, k, v = (_value(rewritten, feeds, n) for n in node.input[:3])
    got = _plugin_semantics(q, k, v, float(attrs["scale"]), int(attrs["causal"]))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    return attrs


def _value(model: onnx.ModelProto, feeds, name: str) -> np.ndarray:
    if name in feeds:
        return feeds[name]
    # A Transpose the pass inserted in front of the plugin (K given as Kᵀ).
    (producer,) = [n for n in model.graph.node if name in n.output]
    assert producer.op_type == "Transpose"
    return np.swapaxes(feeds[producer.input[0]], -1, -2)


@pytest.mark.parametrize("causal", [0, 1])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_onnx_attention_becomes_one_plugin_node(causal, scale):
    extra = {"scale": scale} if scale is not None else {}
    node = helper.make_node("Attention", ["q", "k", "v"], ["y"], name="blk0/attn/Attention",
                            is_causal=causal, **extra)
    model = _model([node], [(n, SHAPE) for n in "qkv"])
    out = substitute_attention_plugin(model)
    onnx.checker.check_model(out)
    assert [n.op_type for n in out.graph.node] == [PLUGIN_NAME]
    assert any(o.domain == PLUGIN_DOMAIN and o.version == 1 for o in out.opset_import)
    attrs = _check_plugin_matches(model, out, _qkv())
    assert attrs["causal"] == causal and np.isclose(attrs["scale"], scale or 0.0)
    assert count_plugin_nodes(model) == 0 and count_plugin_nodes(out) == 1  # input left untouched


def test_attention_with_a_constant_causal_mask_becomes_causal():
    mask = numpy_helper.from_array(_causal_additive(S), "mask")
    node = helper.make_node("Attention", ["q", "k", "v", "mask"], ["y"], name="text/Attention")
    model = _model([node], [(n, SHAPE) for n in "qkv"], [mask])
    out = substitute_attention_plugin(model)
    assert _check_plugin_matches(model, out, _qkv(1))["causal"] == 1
    assert not out.graph.initializer  # the absorbed mask is dropped


def test_a_run_time_slice_of_the_causal_mask_is_causal():
    # Trimmed text towers slice their 77x77 mask to the input length: mask[:L, :L].
    full = 7
    init = [numpy_helper.from_array(_causal_additive(full), "full_mask"),
            numpy_helper.from_array(np.array([0, 0], np.int64), "starts"),
            numpy_helper.from_array(np.array([0, 1], np.int64), "axes")]
    nodes = [
        helper.make_node("Shape", ["q"], ["qshape"], start=2, end=3),
        helper.make_node("Concat", ["qshape", "qshape"], ["ends"], axis=0),
        helper.make_node("Slice", ["full_mask", "starts", "ends", "axes"], ["mask"], name="slice_mask"),
        helper.make_node("Attention", ["q", "k", "v", "mask"], ["y"], name="text/Attention"),
    ]
    model = _model(nodes, [(n, SHAPE) for n in "qkv"], init)
    out = substitute_attention_plugin(model)
    assert [n.op_type for n in out.graph.node] == [PLUGIN_NAME]  # the slice and its inputs are gone
    assert not out.graph.initializer
    assert _check_plugin_matches(model, out, _qkv(4))["causal"] == 1


def _decomposed(k_transposed_input: bool, scale_op: str, with_mask: bool):
    """q @ kᵀ -> scale -> (+ causal mask) -> softmax -> @ v, as a plain export writes it."""
    init = [numpy_helper.from_array(np.array(np.sqrt(D) if scale_op == "Div" else 0.25, np.float32), "c")]
    nodes = []
    if k_transposed_input:
        kt = "kt"
    else:
        nodes.append(helper.make_node("Transpose", ["k"], ["kt"], name="t", perm=[0, 1, 3, 2]))
        kt = "kt"
    nodes.append(helper.make_node("MatMul", ["q", kt], ["s0"], name="qk"))
    nodes.append(helper.make_node(scale_op, ["s0", "c"], ["s1"], name="scale"))
    last = "s1"
    if with_mask:
        init.append(numpy_helper.from_array(_causal_additive(S), "mask"))
        nodes.append(helper.make_node("Add", ["s1", "mask"], ["s2"], name="mask_add"))
        last = "s2"
    nodes.append(helper.make_node("Softmax", [last], ["p"], name="blk/Softmax", axis=-1))
    nodes.append(helper.make_node("MatMul", ["p", "v"], ["y"], name="pv"))
    k_shape = [B, H, D, S] if k_transposed_input else SHAPE
    inputs = [("q", SHAPE), ("kt" if k_transposed_input else "k", k_shape), ("v", SHAPE)]
    return _model(nodes, inputs, init, opset=18)


@pytest.mark.parametrize("scale_op", ["Mul", "Div"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_decomposed_attention_becomes_one_plugin_node(scale_op, with_mask):
    model = _decomposed(False, scale_op, with_mask)
    out = substitute_attention_plugin(model)
    onnx.checker.check_model(out)
    assert [n.op_type for n in out.graph.node] == [PLUGIN_NAME]  # transpose, matmuls, scale, mask gone
    attrs = _check_plugin_matches(model, out, _qkv(2))
    expected = 1 / np.sqrt(D) if scale_op == "Div" else 0.25
    assert np.isclose(attrs["scale"], expected) and attrs["causal"] == int(with_mask)
    assert not out.graph.initializer


def test_decomposed_attention_with_k_given_transposed_gets_a_transpose():
    model = _decomposed(True, "Mul", True)
    out = substitute_attention_plugin(model)
    assert [n.op_type for n in out.graph.node] == ["Transpose", PLUGIN_NAME]
    feeds = _qkv(3)
    feeds["kt"] = np.swapaxes(feeds.pop("k"), -1, -2).copy()
    _check_plugin_matches(model, out, feeds)


@pytest.mark.parametrize("make, message", [
    (lambda: _model([helper.make_node("Attention", ["q", "k", "v", "", "pk", "pv"], ["y"], name="kv/Attention")],
                    [("q", SHAPE), ("k", SHAPE), ("v", SHAPE), ("pk", SHAPE), ("pv", SHAPE)]),
     "kv/Attention: it uses past key/value"),
    (lambda: _model([helper.make_node("Attention", ["q", "k", "v", "m"], ["y"], name="pad/Attention")],
                    [(n, SHAPE) for n in "qkv"] + [("m", [S, S])]),
     "pad/Attention: its attention mask is a graph input"),
    (lambda: _model([helper.make_node("Attention", ["q", "k", "v", "m"], ["y"], name="anti/Attention")],
                    [(n, SHAPE) for n in "qkv"], [numpy_helper.from_array(_causal_additive(S).T.copy(), "m")]),
     "anti/Attention: its constant attention mask is not causal"),
    (lambda: _model([helper.make_node("Attention", ["q", "k", "v"], ["y"], name="soft/Attention", softcap=30.0)],
                    [(n, SHAPE) for n in "qkv"]),
     "soft/Attention: it uses softcap"),
])
def test_blocks_the_plugin_cannot_express_are_named(make, message):
    with pytest.raises(AttentionPluginError) as err:
        substitute_attention_plugin(make())
    assert message in str(err.value) and "1 of 1 attention blocks" in str(err.value)


def test_three_d_attention_is_refused():
    node = helper.make_node("Attention", ["q", "k", "v"], ["y"], name="flat/Attention", q_num_heads=H, kv_num_heads=H)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [B, S, H * D]) for n in "qkv"],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, S, H * D])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    with pytest.raises(AttentionPluginError, match="3-D"):
        substitute_attention_plugin(model)


def test_a_graph_without_attention_is_an_error():
    node = helper.make_node("Relu", ["q"], ["y"])
    with pytest.raises(AttentionPluginError, match="no attention"):
        substitute_attention_plugin(_model([node], [("q", SHAPE)]))


def test_causal_mask_recognition():
    lower = np.tril(np.ones((4, 4), bool))
    assert is_causal_mask(lower) and is_causal_mask(_causal_additive(4)[None, None])
    assert is_causal_mask(np.triu(np.full((4, 4), np.finfo(np.float32).min, np.float32), 1))
    assert not is_causal_mask(np.zeros((4, 4), np.float32))  # hides nothing
    assert not is_causal_mask(~lower)
    assert not is_causal_mask(np.zeros((4, 5), np.float32))


def _plugin_as_onnx_attention(model: onnx.ModelProto) -> onnx.ModelProto:
    """Back from plugin nodes to ONNX Attention with the plugin's attributes, for ONNX Runtime."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        if node.op_type == PLUGIN_NAME:
            attrs = _attrs(node)
            extra = {"scale": float(attrs["scale"])} if float(attrs["scale"]) > 0 else {}
            new = helper.make_node("Attention", list(node.input), list(node.output), name=node.name,
                                   is_causal=int(attrs["causal"]), **extra)
            node.CopyFrom(new)
    return out


def test_real_exported_text_tower_keeps_its_numbers(twin, tmp_path):
    """The twin's text tower as the build exports it (Attention + a run-time slice of the causal
    mask, trimmed token axis): every block becomes a causal plugin node, and the plugin's
    semantics give the same embeddings as the original graph."""
    from clipexport.build import BuildOptions, build

    result = build(BuildOptions(model=twin("vit"), pretrained="none", towers=["text"], out=tmp_path / "a",
                                backend="onnxruntime"))
    original = onnx.load(str(result.out_dir / "text.onnx"))
    rewritten = substitute_attention_plugin(original)
    plugins = [n for n in rewritten.graph.node if n.op_type == PLUGIN_NAME]
    assert len(plugins) == sum(n.op_type == "Attention" for n in original.graph.node) == 2
    assert all(_attrs(n)["causal"] == 1 for n in plugins)
    assert not any(n.op_type == "Attention" for n in rewritten.graph.node)
    ids = np.zeros((3, 9), np.int64)
    ids[:, 0], ids[:, 1:8], ids[:, 8] = 49406, np.arange(300, 321).reshape(3, 7), 49407
    name = original.graph.input[0].name
    want = _run(original, {name: ids})
    got = _run(_plugin_as_onnx_attention(rewritten), {name: ids})
    assert got.shape == (3, 24)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
