"""Engine layer information (IEngineInspector JSON) -> was each attention block fused?

The JSON files in tests/data are hand-written in TensorRT's documented layout (see the
README there), not dumped from a real engine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from clipexport.errors import EngineError
from clipexport.trt.layer_info import (
    EngineLayer,
    attention_nodes_of,
    check_attention_fusion,
    parse_layer_information,
    warn_unfused,
)
from clipexport.trt.plugin import PLUGIN_NAME

DATA = Path(__file__).parent / "data"
BLOCKS = ["/transformer/resblocks.0/attn/Attention", "/transformer/resblocks.1/attn/Attention"]
PLUGIN_BLOCKS = [f"{b}/{PLUGIN_NAME}" for b in BLOCKS]


def _load(name: str):
    return parse_layer_information((DATA / name).read_text())


def test_detailed_information_parses_layers_bindings_and_onnx_nodes():
    info = _load("trt_layers_native_fused.json")
    assert info.detailed and len(info.layers) == 9
    assert info.bindings == ("pixel_values", "image_embeds")
    proj = info.layers[-1]
    assert proj.layer_type == "CaskGemmMatrixMultiply"
    assert proj.onnx_nodes == ("/ln_post/LayerNormalization", "/Gather", "/proj/MatMul")  # \x1f-separated
    assert [layer.name for layer in info.layers_of(BLOCKS[1])] == [BLOCKS[1]]


def test_fused_native_attention_passes():
    report = check_attention_fusion(_load("trt_layers_native_fused.json"), BLOCKS)
    assert report.ok and report.fused == BLOCKS and report.fused_layers == 2
    assert report.summary() == "attention: 2/2 blocks fused"
    lines: list[str] = []
    warn_unfused(report, "image", lines.append)
    assert lines == []


def test_a_decomposed_block_is_reported_loudly():
    report = check_attention_fusion(_load("trt_layers_one_unfused.json"), BLOCKS)
    assert not report.ok
    assert report.fused == BLOCKS[:1] and report.unfused == BLOCKS[1:]
    lines: list[str] = []
    warn_unfused(report, "image", lines.append)
    text = "\n".join(lines)
    assert "WARNING: image tower" in text and "NOT fused" in text and BLOCKS[1] in text
    assert report.to_json()["unfused"] == BLOCKS[1:] and report.to_json()["ok"] is False


def test_plugin_layers_count_as_fused():
    info = _load("trt_layers_plugin.json")
    report = check_attention_fusion(info, PLUGIN_BLOCKS, [PLUGIN_NAME])
    assert report.ok and report.fused == PLUGIN_BLOCKS
    assert info.layers[2].layer_type == "PluginV3"


def test_names_only_information_cannot_verify_fusion():
    info = _load("trt_layers_names_only.json")
    assert not info.detailed and len(info.layers) == 9
    report = check_attention_fusion(info, BLOCKS)
    assert not report.ok and report.unknown == BLOCKS
    lines: list[str] = []
    warn_unfused(report, "text", lines.append)
    assert any("DETAILED" in line for line in lines)


def test_blocks_missing_from_the_engine_are_unknown_not_fused():
    report = check_attention_fusion(_load("trt_layers_native_fused.json"), BLOCKS + ["/transformer/resblocks.2/attn/Attention"])
    assert report.unknown == ["/transformer/resblocks.2/attn/Attention"] and not report.ok


@pytest.mark.parametrize("text, message", [
    ("{not json", "not JSON"),
    ('{"Bindings": []}', "no 'Layers' list"),
    ('{"Layers": [3]}', "neither a name nor an object"),
])
def test_malformed_information_is_an_engine_error(text, message):
    with pytest.raises(EngineError, match=message):
        parse_layer_information(text)


@pytest.mark.parametrize("layer, fused", [
    (EngineLayer("/a/Attention", "Attention", "fmha_v2_flash_attention_fp16_64_64_S_64_sm90"), True),
    (EngineLayer("__myl_Fmha_0", "kgen", ""), True),
    (EngineLayer("/a/Attention_qk", "CaskGemmMatrixMultiply", "sm90_xmma_gemm_f16f16"), False),
    (EngineLayer("/a/Attention", "SoftMax", ""), False),
    # A layer named after an ONNX Attention node proves nothing by its name alone.
    (EngineLayer("/a/attn/Attention", "", ""), False),
])
def test_fused_attention_recognition(layer, fused):
    assert layer.looks_fused_attention() is fused


def test_attention_nodes_of_finds_attention_plugin_and_decomposed_blocks():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 8])
    nodes = [
        helper.make_node("Attention", ["x", "x", "x"], ["a"], name="blk0/Attention"),
        helper.make_node(PLUGIN_NAME, ["a", "a", "a"], ["b"], name="blk1/clip", domain="clipexport.trt"),
        helper.make_node("Transpose", ["b"], ["bt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["b", "bt"], ["s"]),
        helper.make_node("Softmax", ["s"], ["p"], name="blk2/Softmax", axis=-1),
        helper.make_node("MatMul", ["p", "b"], ["y"]),
        helper.make_node("Softmax", ["x"], ["unused"], name="not_attention"),
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]))
    assert attention_nodes_of(model, PLUGIN_NAME) == ["blk0/Attention", "blk1/clip", "blk2/Softmax"]
    assert np.array_equal(np.array(attention_nodes_of(model)), np.array(["blk0/Attention", "blk2/Softmax"]))
