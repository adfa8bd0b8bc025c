"""The TensorRT-compatibility gate (clipexport.trt.compat): verdicts on real builds and on hand-made graphs.

Runs without TensorRT: the gate reads the graph and support_matrix.toml only. The one test of the
engine step's refusal mocks TensorRT's presence (it cannot be installed here) and says so in its name.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from clipexport.cli import cli
from clipexport.errors import EngineError
from clipexport.trt import compat


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """The same tiny ViT twin built with fused attention (ONNX Attention) and with --no-fuse-attention."""
    from twins import write_twin

    model = write_twin("vit", tmp_path_factory.mktemp("twin"))
    out = {}
    for name, extra in (("fused", []), ("unfused", ["--no-fuse-attention"])):
        target = tmp_path_factory.mktemp(name) / name
        result = CliRunner().invoke(cli, ["build", model, "--pretrained", "none", "--out", str(target), *extra],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        out[name] = (target, json.loads((target / "manifest.json").read_text()), result.output)
    return out


def test_fused_attention_needs_10_14_or_the_plugin(builds):
    _, manifest, output = builds["fused"]
    for tower in ("image", "text"):
        entry = manifest["towers"][tower]["tensorrt"]
        blocks = manifest["towers"][tower]["attention"]["blocks"]
        assert entry["graph"] == f"{tower}.onnx" and entry["opset"] == 23
        assert entry["min_release"] == "10.14"
        assert entry["min_release_with_plugin"] == "10.9"
        [blocker] = entry["blockers"]
        assert blocker["op"] == "Attention" and blocker["parses_from"] == "10.14"
        assert blocker["count"] == blocks == 2
    assert "TensorRT >= 10.14 (>= 10.9 with the attention plugin); blocking: Attention x2 (before 10.14)" in output


def test_unfused_graph_parses_from_the_oldest_target(builds):
    _, manifest, _ = builds["unfused"]
    for tower in ("image", "text"):
        entry = manifest["towers"][tower]["tensorrt"]
        assert entry["min_release"] == entry["targets"][0] == "10.8"
        assert entry["blockers"] == []
        # opset 23 lies above what 10.1's matrix documents: a note, not a block
        assert any("opset 23" in n for n in entry["notes"])
    text = manifest["towers"]["text"]["tensorrt"]["profile"][0]
    batch = manifest["batch"]
    # the token axis: 1..context length, tuned for 16 tokens (trimmed prompts are short)
    assert text == {"name": "input_ids", "min": [batch["min"], 1], "opt": [batch["opt"], 16], "max": [batch["max"], 77]}


def test_info_prints_the_verdict_and_the_polygraphy_command(builds):
    out, manifest, _ = builds["fused"]
    result = CliRunner().invoke(cli, ["info", str(out)])
    assert result.exit_code == 0
    assert result.output.count("TensorRT >= 10.14 (>= 10.9 with the attention plugin)") == 2
    assert f"compare on a GPU: {manifest['towers']['image']['tensorrt']['polygraphy']}" in result.output


def test_polygraphy_command_is_accepted_by_polygraphy(builds):
    """The manifest's command, minus --trt (no TensorRT here), runs ONNX Runtime through Polygraphy with our
    profile's shapes: every flag we write is one Polygraphy parses."""
    out, manifest, _ = builds["fused"]
    command = manifest["towers"]["text"]["tensorrt"]["polygraphy"]
    args = shlex.split(command)
    assert args[:3] == ["polygraphy", "run", "text.onnx"] and "--trt" in args and "--fp16" not in args
    args.remove("--trt")
    exe = Path(sys.executable).with_name("polygraphy")
    result = subprocess.run([str(exe), *args[1:]], cwd=out, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    log = result.stdout + result.stderr
    assert "input_ids [dtype=int64, shape=(8, 16)]" in log and "text_embeds [dtype=float32, shape=(8, 24)]" in log


# ---- hand-made graphs -------------------------------------------------------------------------


def _model(nodes, inputs, outputs, initializers=(), opset=21):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _dq_graph(zero_point: int, dtype=np.int8):
    x = numpy_helper.from_array(np.arange(6, dtype=dtype).reshape(2, 3), "xq")
    scale = numpy_helper.from_array(np.array(0.1, dtype=np.float32), "scale")
    zp = numpy_helper.from_array(np.array(zero_point, dtype=dtype), "zp")
    dq = helper.make_node("DequantizeLinear", ["xq", "scale", "zp"], ["w"], name="dq_weight")
    mm = helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul")
    return _model([dq, mm], [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], [x, scale, zp])


def _verdict(model, tmp_path, name="g.onnx"):
    from clipexport.recipes import BatchRange

    path = tmp_path / name
    onnx.save_model(model, str(path))
    return compat.tower_verdict(path, "image", BatchRange(1, 4, 16), None).to_json()


def test_nonzero_dq_zero_point_blocks_every_release(tmp_path):
    entry = _verdict(_dq_graph(3), tmp_path)
    assert entry["min_release"] is None and entry["min_release_with_plugin"] is None
    [blocker] = entry["blockers"]
    assert blocker["op"] == "DequantizeLinear" and blocker["parses_from"] is None
    assert blocker["nodes"] == ["dq_weight"] and "x_zero_point must be zero" in blocker["reason"]


def test_zero_dq_zero_point_parses(tmp_path):
    entry = _verdict(_dq_graph(0), tmp_path)
    assert entry["blockers"] == [] and entry["min_release"] == "10.8"


def test_uint8_dq_is_blocking(tmp_path):
    entry = _verdict(_dq_graph(0, np.uint8), tmp_path)
    assert entry["min_release"] is None
    assert any(b["op"] == "DequantizeLinear" and "UINT8" in b["reason"] for b in entry["blockers"])


def test_matmulinteger_and_dynamic_quantize_block(tmp_path):
    w = numpy_helper.from_array(np.ones((2, 3), dtype=np.int8), "w")
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"], name="dql"),
        helper.make_node("MatMulInteger", ["xq", "w"], ["acc"], name="mmi"),
        helper.make_node("Cast", ["acc"], ["y"], to=TensorProto.FLOAT, name="cast"),
    ]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], [w])
    entry = _verdict(model, tmp_path)
    ops = {b["op"]: b for b in entry["blockers"]}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= set(ops)
    assert ops["MatMulInteger"]["nodes"] == ["mmi"] and ops["MatMulInteger"]["parses_from"] is None
    # the UINT8 tensor DynamicQuantizeLinear makes is internal: TensorRT takes UINT8 only at the graph's edge
    assert "dtype UINT8" in ops
    assert entry["min_release"] is None


def test_unknown_dynamic_axis_blocks_through_the_profile(tmp_path):
    node = helper.make_node("Relu", ["x"], ["y"], name="relu")
    model = _model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "width"])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "width"])])
    entry = _verdict(model, tmp_path)
    [blocker] = entry["blockers"]
    assert blocker["op"] == "profile" and "axis 1 is dynamic" in blocker["reason"]


def test_attention_with_past_key_blocks_even_on_new_releases(tmp_path):
    shape = ["batch", 2, 4, 8]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("q", "k", "v", "pk", "pv")]
    node = helper.make_node("Attention", ["q", "k", "v", "", "pk", "pv"], ["y"], name="attn")
    model = _model([node], inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], opset=23)
    entry = _verdict(model, tmp_path)
    reasons = {b["reason"] for b in entry["blockers"]}
    assert any("past_key" in r for r in reasons)
    assert entry["min_release"] is None


# ---- using the verdict -------------------------------------------------------------------------

FUSED = {"graph": "image.onnx", "min_release": "10.14", "min_release_with_plugin": "10.9",
         "blockers": [{"op": "Attention", "count": 2, "nodes": ["a0", "a1"], "parses_from": "10.14",
                       "reason": "Attention is parsed from TensorRT 10.14 on", "source": "changelog"}]}
UNFUSED = {"graph": "image.onnx", "min_release": "10.8", "min_release_with_plugin": "10.8", "blockers": []}


@pytest.mark.parametrize(("entry", "installed", "native", "expected"), [
    (FUSED, "10.16.0.1", True, "native"),
    (FUSED, "10.14.1.48", True, "native"),
    (FUSED, "10.12.0.36", False, "plugin"),  # only the plugin pass makes it parse
    (UNFUSED, "10.12.0.36", False, "plugin"),  # the plugin fuses the decomposed chain where it can
    (UNFUSED, "10.15.0", True, "native"),
])
def test_attention_mode_is_chosen_from_the_verdict(entry, installed, native, expected):
    assert compat.choose_attention(entry, installed, "auto", native) == expected


def test_without_a_verdict_the_mode_follows_tensorrt_features():
    assert compat.choose_attention(None, "10.16", "auto", True) == "native"
    assert compat.choose_attention(None, "10.12", "auto", False) == "plugin"
    with pytest.raises(EngineError, match="no native attention layer"):
        compat.choose_attention(None, "10.12", "native", False)


def test_tensorrt_below_the_graphs_minimum_is_refused_naming_the_nodes():
    with pytest.raises(EngineError, match=r"TensorRT 10\.8\.0 cannot parse image\.onnx: it needs TensorRT >= 10\.9 "
                                          r"with the attention plugin or >= 10\.14.*Attention x2 \(e\.g\. a0, a1\)"):
        compat.choose_attention(FUSED, "10.8.0", "auto", False)
    with pytest.raises(EngineError, match="--attention native: TensorRT 10.12 is below 10.14"):
        compat.choose_attention(FUSED, "10.12", "native", False)
    blocked = {"graph": "g.onnx", "min_release": None, "min_release_with_plugin": None,
               "blockers": [{"op": "MatMulInteger", "count": 1, "nodes": ["mmi"], "parses_from": None,
                             "reason": "MatMulInteger is not supported", "source": "ops-10_1"}]}
    with pytest.raises(EngineError, match=r"TensorRT 11\.0\.0 cannot parse g\.onnx.*MatMulInteger x1 \(e\.g\. mmi\)"):
        compat.choose_attention(blocked, "11.0.0", "auto", True)


def test_engine_step_refuses_before_any_file_with_tensorrt_mocked(tmp_path, monkeypatch):
    """TensorRT cannot be installed here: its presence is mocked; the refusal happens before it is used."""
    from clipexport.recipes import BatchRange
    from clipexport.trt import pipeline
    from clipexport.trt.env import GpuInfo

    monkeypatch.setattr(pipeline, "load_tensorrt", lambda: object())
    monkeypatch.setattr(pipeline, "has_native_attention", lambda _trt: False)
    choice = pipeline.BackendChoice(engines=True, tensorrt_version="10.12.0.36", gpu=GpuInfo("H200", (9, 0)))
    staging = tmp_path / "staging"
    staging.mkdir()
    options = pipeline.EngineStepOptions(compat={**FUSED, "min_release_with_plugin": "10.13"})
    with pytest.raises(EngineError, match="cannot parse image.onnx"):
        pipeline.build_tower_engine("image", tmp_path / "image.onnx", staging, None, BatchRange(1, 2, 4),  # type: ignore[arg-type]
                                    None, "fp32", choice, options, lambda *_: None)
    assert list(staging.iterdir()) == []


def test_tensorrt_older_than_the_matrix_floor_is_refused():
    from clipexport.errors import BackendUnavailableError
    from clipexport.trt.pipeline import _check_floor

    _check_floor("10.8.0.43")
    with pytest.raises(BackendUnavailableError, match="TensorRT 10.7.0 is older than 10.8"):
        _check_floor("10.7.0")


def test_matrix_rules_name_known_sources(tmp_path):
    matrix = compat.load_matrix()
    assert matrix.targets[0] == "10.8" and matrix.since["Attention"][0] == "10.14"
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= matrix.unsupported
    broken = tmp_path / "m.toml"
    broken.write_text(compat.MATRIX_PATH.read_text().replace('source = "ops-10_15"', 'source = "nowhere"', 1))
    with pytest.raises(EngineError, match="unknown source 'nowhere'"):
        compat.load_matrix(broken)


def test_readme_polygraphy_command_is_what_a_vit_b_32_build_writes():
    """The README shows the command the manifest holds for ViT-B-32's image tower (its flags are run through
    Polygraphy above; the --trt half needs TensorRT, which cannot exist here)."""
    import re

    from clipexport.recipes import load_recipes
    from clipexport.trt.profiles import tower_profiles

    recipe = load_recipes()["vit"]
    tolerance = recipe.tolerance("fp32")
    profiles = tower_profiles([("pixel_values", ["batch", 3, 224, 224])], recipe.batch, "image")
    expected = compat.polygraphy_command("image.onnx", profiles, tolerance.max_rel_err, tolerance.max_rel_err)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    shown = re.findall(r"^\s*(polygraphy run .*)$", readme, flags=re.MULTILINE)
    assert shown == [expected]
