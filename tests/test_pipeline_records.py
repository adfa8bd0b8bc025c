"""A failing simplifier keeps the unsimplified graph and the manifest says so."""

from __future__ import annotations

import json

import onnx
import pytest
from onnx import TensorProto, helper

from clipexport.build import BuildOptions, build
from clipexport.errors import UsageError
from clipexport.passes import PassConfig, count_nodes
from clipexport.passes.simplify import simplify


def _foldable_graph() -> onnx.ModelProto:
    """y = x + (2 * 3): the constant product folds away, leaving one Add."""
    two = helper.make_tensor("two", TensorProto.FLOAT, [1], [2.0])
    three = helper.make_tensor("three", TensorProto.FLOAT, [1], [3.0])
    graph = helper.make_graph(
        [helper.make_node("Mul", ["two", "three"], ["six"]), helper.make_node("Add", ["x", "six"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[two, three],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_simplify_folds_constants_and_keeps_the_interface():
    model = _foldable_graph()
    slim = simplify(model, PassConfig(tower="image", precision="fp32"))
    assert count_nodes(model) == 2 and count_nodes(slim) == 1
    assert [n.op_type for n in slim.graph.node] == ["Add"]
    assert slim.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_failing_simplifier_is_recorded_and_build_still_passes(twin, tmp_path, monkeypatch):
    import onnxslim

    def broken(*args, **kwargs):
        raise RuntimeError("simulated onnxslim failure")

    monkeypatch.setattr(onnxslim, "slim", broken)
    out = tmp_path / "art"
    build(BuildOptions(model=twin("vit"), pretrained="none", towers=["image"], out=out))
    manifest = json.loads((out / "manifest.json").read_text())
    record = next(r for r in manifest["towers"]["image"]["passes"] if r["name"] == "simplify")
    assert record["status"] == "failed"
    assert "simulated onnxslim failure" in record["detail"] and "unchanged" in record["detail"]
    assert record["nodes_before"] == record["nodes_after"]
    assert manifest["towers"]["image"]["parity"]["passed"] is True


def test_disabling_a_pass_is_recorded(twin, tmp_path):
    out = tmp_path / "art"
    build(BuildOptions(model=twin("vit"), pretrained="none", towers=["text"], out=out, disabled_passes=["simplify"]))
    record = next(r for r in json.loads((out / "manifest.json").read_text())["towers"]["text"]["passes"]
                  if r["name"] == "simplify")
    assert record["status"] == "disabled" and record["nodes_before"] == record["nodes_after"]


def test_unknown_pass_name_is_refused(twin, tmp_path):
    with pytest.raises(UsageError, match="unknown pass 'simplfy'"):
        build(BuildOptions(model=twin("vit"), pretrained="none", out=tmp_path / "x", disabled_passes=["simplfy"]))
    assert not (tmp_path / "x").exists()
