"""End to end with TensorRT on a CUDA GPU: ViT-B-32 engines (fp16, dynamic batch) built,
checked for parity, reused from the cache; the attention plugin in a real engine.

Skipped (with the reason) where TensorRT or a GPU is missing. Note `pytest.importorskip
("tensorrt")` would not skip here: tensorrt-stubs makes `import tensorrt` succeed as an
empty namespace package, so availability is probed with clipexport.trt.env instead.
"""

from __future__ import annotations

import numpy as np
import pytest

from clipexport.recipes import BatchRange
from clipexport.trt.compat import release_tuple
from clipexport.trt.env import probe

_AVAILABLE = probe()

pytestmark = [
    pytest.mark.requires_tensorrt,
    pytest.mark.requires_cuda,
    pytest.mark.skipif(not _AVAILABLE.ok, reason=f"needs TensorRT and a CUDA GPU: {_AVAILABLE.reason}"),
]

BATCH = BatchRange(1, 4, 16)


@pytest.fixture(scope="module")
def vit_b32_fp16(tmp_path_factory):
    from clipexport.build import BuildOptions, build

    out = tmp_path_factory.mktemp("trt") / "ViT-B-32-fp16"
    options = BuildOptions(model="ViT-B-32", pretrained="none", precision="fp16", batch=BATCH, out=out,
                           backend="tensorrt", timing_cache=out.parent / "timing.cache")
    return options, build(options)


def test_vit_b32_fp16_engines_are_built_verified_and_keyed(vit_b32_fp16):
    _, result = vit_b32_fp16
    for tower in ("image", "text"):
        engine = result.manifest["towers"][tower]["engine"]
        path = result.out_dir / engine["file"]
        assert path.is_file() and engine["sha256"] == result.manifest["files"][engine["file"]]
        assert engine["parity"]["passed"] and engine["parity"]["backend"] == "tensorrt"
        key = engine["key"]
        assert key["precision"] == "fp16" and key["tensorrt_version"] == _AVAILABLE.tensorrt_version
        assert key["profiles"][0]["min"][0] == BATCH.min and key["profiles"][0]["max"][0] == BATCH.max
        assert engine["attention"]["expected"] >= 12  # ViT-B-32: 12 blocks per tower
        assert (result.out_dir / engine["layers"]).is_file()
        # the compatibility gate let this TensorRT through and picked the attention mode from it
        verdict = result.manifest["towers"][tower]["tensorrt"]
        native = release_tuple(str(_AVAILABLE.tensorrt_version)) >= release_tuple(verdict["min_release"])
        assert engine["attention_mode"] == ("native" if native else "plugin")
    # Polygraphy's EngineBytesFromNetwork saved (merged) the timing cache
    options, _ = vit_b32_fp16
    assert options.timing_cache.is_file() and options.timing_cache.stat().st_size > 0


@pytest.mark.parametrize("tower", ["image", "text"])
def test_engine_runs_every_batch_in_its_profile(vit_b32_fp16, tower):
    import torch

    from clipexport.errors import UsageError
    from clipexport.trt.runner import TensorRTRunner

    _, result = vit_b32_fp16
    runner = TensorRTRunner(result.out_dir / result.manifest["towers"][tower]["engine"]["file"])
    from polygraphy.backend.trt import TrtRunner

    assert isinstance(runner.polygraphy, TrtRunner) and runner.polygraphy.is_active
    (name,) = runner.inputs
    for batch in (1, 3, BATCH.max):
        if tower == "image":
            feed = torch.randn(batch, 3, 224, 224, device="cuda")
        else:
            feed = torch.randint(1, 49000, (batch, 77), device="cuda")
            feed[:, 0], feed[:, 10] = 49406, 49407
        (out,) = runner.infer({name: feed}).values()
        assert tuple(out.shape) == (batch, 512) and bool(torch.isfinite(out).all())
        (again,) = runner.infer({name: feed[:1]}).values()  # Polygraphy reuses its buffers: ours are copies
        assert bool(torch.equal(out[:1], again)) and tuple(out.shape) == (batch, 512)
    with pytest.raises(UsageError, match="outside the engine's profile"):
        runner.infer({name: feed.repeat(2, *([1] * (feed.dim() - 1)))[: BATCH.max + 1]})
    runner.close()
    assert not runner.polygraphy.is_active


def test_second_build_reuses_fitting_engines_with_no_rebuild(vit_b32_fp16):
    from dataclasses import replace

    from clipexport.build import build

    options, first = vit_b32_fp16
    again = build(replace(options, force=True, no_rebuild=True))
    for tower in ("image", "text"):
        engine = again.manifest["towers"][tower]["engine"]
        assert engine["reused"] and engine["digest"] == first.manifest["towers"][tower]["engine"]["digest"]


def test_attention_plugin_runs_inside_an_engine(tmp_path):
    import onnx
    import torch
    from onnx import TensorProto, helper

    from clipexport.passes.attention_plugin import substitute_attention_plugin
    from clipexport.trt.builder import EngineBuildOptions, build_engine
    from clipexport.trt.env import has_aot_python_plugins, load_tensorrt
    from clipexport.trt.profiles import InputProfile
    from clipexport.trt.runner import TensorRTRunner

    if not has_aot_python_plugins(load_tensorrt()):
        pytest.skip("this TensorRT has no ahead-of-time Python plugins (10.9+)")
    shape = ["batch", 12, 77, 64]
    graph = helper.make_graph(
        [helper.make_node("Attention", ["q", "k", "v"], ["y"], name="blk/Attention", is_causal=1)], "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT16, shape) for n in "qkv"],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, shape)])
    model = substitute_attention_plugin(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]))
    path = tmp_path / "attn.onnx"
    onnx.save_model(model, str(path))
    profiles = [InputProfile(n, (1, 12, 77, 64), (4, 12, 77, 64), (8, 12, 77, 64)) for n in "qkv"]
    built = build_engine(path, profiles, EngineBuildOptions(attention="plugin"), "plugin")
    runner = TensorRTRunner(built.plan)
    q, k, v = (torch.randn(3, 12, 77, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    got = runner.infer({"q": q, "k": k, "v": v})["y"]
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert float((got.float() - want).abs().max()) < 2e-3 * max(1.0, float(want.abs().max()))
    assert "clip_attention" in built.layer_information
    assert np.isfinite(got.float().cpu().numpy()).all()


def test_parser_rejection_is_an_engine_error_with_the_parsers_words(tmp_path):
    """Through Polygraphy's NetworkFromOnnxPath: its PolygraphyException becomes our EngineError, and
    the parser's messages (logged by Polygraphy before it raises) are in it."""
    import onnx
    from onnx import TensorProto, helper

    from clipexport.errors import EngineError
    from clipexport.trt.builder import EngineBuildOptions, build_engine
    from clipexport.trt.profiles import InputProfile

    w = helper.make_tensor("w", TensorProto.INT8, [4, 4], [1] * 16)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["x", "w"], ["y"], name="mmi")], "g",
        [helper.make_tensor_value_info("x", TensorProto.INT8, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, ["batch", 4])], [w])
    path = tmp_path / "mmi.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    seen: list[str] = []
    with pytest.raises(EngineError, match="MatMulInteger") as err:
        build_engine(path, [InputProfile("x", (1, 4), (2, 4), (4, 4))], EngineBuildOptions(), "none", seen.append)
    assert str(err.value).startswith("TensorRT could not build an engine from mmi.onnx")
    assert any("TensorRT error" in line for line in seen)
