"""int8 Q/DQ leaves grouped (depthwise) convolutions float: ONNX Runtime has no integer kernel for them
without a quantized output, so their Q/DQ only cost time (see passes/quantize.py _grouped_conv)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from clipexport.passes.quantize import QuantPolicy, QuantReport, activation_inputs, quantize_graph


def _convs() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 1, 3, 3)).astype(np.float32), "w_dw"),
             numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "w_pw")]
    nodes = [helper.make_node("Conv", ["x", "w_dw"], ["dw"], group=8, pads=[1, 1, 1, 1], name="depthwise"),
             helper.make_node("Conv", ["dw", "w_pw"], ["y"], name="pointwise"),
             helper.make_node("Relu", ["y"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 6, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_depthwise_conv_stays_float_and_the_report_says_why():
    model = _convs()
    policy = QuantPolicy(keep_final_projection=False)
    assert activation_inputs(model, policy) == ["dw"]  # only the ungrouped conv's input is calibrated
    report = QuantReport()
    quantized = quantize_graph(model, "int8", {"dw": 2.0}, policy, report)
    onnx.checker.check_model(quantized)
    nodes = {n.name: n for n in quantized.graph.node}
    assert list(nodes["depthwise"].input) == ["x", "w_dw"]
    assert nodes["pointwise"].input[0] == "dw/dq" and nodes["pointwise"].input[1] == "w_pw/dq"
    assert report.quantized_ops == {"Conv": 1} and report.skipped_ops == {"Conv (grouped/depthwise)": 1}
