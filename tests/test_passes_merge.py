"""merge_projections: sibling MatMuls of one activation (q/k/v) become one MatMul + Split, same numbers."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from clipexport.passes import PassConfig
from clipexport.passes.merge_projections import merge_projections


def _graph(biases: tuple[bool, ...]) -> onnx.ModelProto:
    """x [B, S, 8] -> three projections (4, 4, 6 columns), each with or without a bias Add; y -> one more."""
    rng = np.random.default_rng(0)
    nodes, inits, outputs = [], [], []
    for i, (width, bias) in enumerate(zip((4, 4, 6), biases)):
        inits.append(numpy_helper.from_array(rng.standard_normal((8, width)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"m{i}"], name=f"mm{i}"))
        out = f"m{i}"
        if bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), f"b{i}"))
            nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"add{i}"))
            out = f"a{i}"
        nodes.append(helper.make_node("Relu", [out], [f"out{i}"]))
        outputs.append(helper.make_tensor_value_info(f"out{i}", TensorProto.FLOAT, ["batch", 5, width]))
    inits.append(numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np.float32), "w_other"))
    nodes.append(helper.make_node("MatMul", ["y", "w_other"], ["out_other"], name="mm_other"))
    outputs.append(helper.make_tensor_value_info("out_other", TensorProto.FLOAT, ["batch", 5, 3]))
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 5, 8]) for n in ("x", "y")]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def _ops(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def test_siblings_with_biases_become_one_matmul_one_add_one_split():
    model = _graph((True, True, True))
    cfg = PassConfig(tower="image", precision="int8")
    merged = merge_projections(model, cfg)
    onnx.checker.check_model(merged)
    assert _ops(model)["MatMul"] == 4 and _ops(model)["Add"] == 3
    assert _ops(merged)["MatMul"] == 2 and _ops(merged)["Add"] == 1 and _ops(merged)["Split"] == 1
    (weight,) = [i for i in merged.graph.initializer if i.name.endswith("/merged/weight")]
    assert list(weight.dims) == [8, 14]
    assert cfg.details["merge_projections"] == {"groups": 1, "matmuls_before": 3}
    feed = {n: np.random.default_rng(1).standard_normal((3, 5, 8)).astype(np.float32) for n in ("x", "y")}
    for want, got in zip(_run(model, feed), _run(merged, feed)):
        assert want.shape == got.shape and np.abs(want - got).max() < 1e-5


def test_a_sibling_without_bias_keeps_the_adds_unmerged():
    model = _graph((True, False, True))
    merged = merge_projections(model, PassConfig(tower="image", precision="fp32"))
    assert _ops(merged)["MatMul"] == 2 and _ops(merged)["Add"] == 2 and _ops(merged)["Split"] == 1
    feed = {n: np.random.default_rng(2).standard_normal((2, 5, 8)).astype(np.float32) for n in ("x", "y")}
    for want, got in zip(_run(model, feed), _run(merged, feed)):
        assert np.abs(want - got).max() < 1e-5


def test_nothing_to_merge_returns_the_graph_unchanged():
    model = _graph((True, True, True))
    del model.graph.node[2:]  # one projection of x left: no group
    cfg = PassConfig(tower="image", precision="fp32")
    assert merge_projections(model, cfg) is model and "merge_projections" not in cfg.details
