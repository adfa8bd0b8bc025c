"""TensorRT step, everything that runs without TensorRT: backend choice and its errors,
optimization profiles from recipes, engine cache keys and decisions, timing-cache paths."""

from __future__ import annotations

import hashlib
import importlib
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from clipexport.errors import BackendUnavailableError, ClipExportError, EngineError, UsageError
from clipexport.recipes import BatchRange, load_recipes
from clipexport.trt import env
from clipexport.trt.cache import EngineKey, decide, key_differences, make_key
from clipexport.trt.profiles import InputProfile, SequenceRange, graph_input_shapes, tower_profiles
from clipexport.trt.timing_cache import default_timing_cache_path

VIT = load_recipes()["vit"]


# ---------------------------------------------------------------- finding TensorRT


def _real_tensorrt_here() -> bool:
    try:
        env.load_tensorrt()
        return True
    except BackendUnavailableError:
        return False


@pytest.mark.skipif(_real_tensorrt_here(), reason="TensorRT is installed here; this checks its absence")
def test_missing_tensorrt_is_a_clear_error_not_an_empty_namespace_package():
    # With tensorrt-stubs installed, `import tensorrt` succeeds and yields an empty package.
    with pytest.raises(BackendUnavailableError) as err:
        env.load_tensorrt()
    assert "TensorRT" in str(err.value) and "--backend tensorrt" in str(err.value)


def test_load_tensorrt_import_failure_and_success(monkeypatch):
    real_import = importlib.import_module

    def broken(name: str, *a, **k):
        if name == "tensorrt":
            raise ImportError("libnvonnxparser.so.11: cannot open shared object file")
        return real_import(name, *a, **k)

    monkeypatch.setattr(env.importlib, "import_module", broken)
    with pytest.raises(BackendUnavailableError, match="libnvonnxparser"):
        env.load_tensorrt()

    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.14.1.48"  # type: ignore[attr-defined]
    fake.Builder = object  # type: ignore[attr-defined]
    monkeypatch.setattr(env.importlib, "import_module", lambda name, *a, **k: fake if name == "tensorrt"
                        else real_import(name, *a, **k))
    assert env.load_tensorrt() is fake
    assert env.tensorrt_version() == "10.14.1.48"


def test_native_attention_is_a_feature_check():
    old, new = types.ModuleType("tensorrt"), types.ModuleType("tensorrt")
    old.INetworkDefinition = type("INetworkDefinition", (), {"add_input": None})  # type: ignore[attr-defined]
    new.INetworkDefinition = type("INetworkDefinition", (), {"add_attention": None})  # type: ignore[attr-defined]
    assert not env.has_native_attention(old)
    assert env.has_native_attention(new)


@pytest.mark.parametrize("text, expected", [("10.14.1.48", (10, 14, 1, 48)), ("11.0.0", (11, 0, 0)),
                                            ("10.16.0rc1", (10, 16, 0)), ("", ())])
def test_version_tuple(text, expected):
    assert env.version_tuple(text) == expected


# ---------------------------------------------------------------- --backend


def test_backend_onnxruntime_never_builds_engines():
    from clipexport.trt.pipeline import resolve_backend

    assert resolve_backend("onnxruntime").engines is False


def test_backend_auto_without_tensorrt_says_how_to_get_engines(monkeypatch):
    from clipexport.trt import pipeline

    monkeypatch.setattr(pipeline, "probe", lambda: env.Availability(None, None, "TensorRT is not installed"))
    choice = pipeline.resolve_backend("auto")
    assert choice.engines is False
    assert "TensorRT is not installed" in choice.note and "--backend tensorrt" in choice.note


def test_backend_auto_with_tensorrt_and_gpu_builds_engines(monkeypatch):
    from clipexport.trt import pipeline

    gpu = env.GpuInfo("NVIDIA H100 80GB HBM3", (9, 0))
    monkeypatch.setattr(pipeline, "probe", lambda: env.Availability("10.14.1.48", gpu, ""))
    choice = pipeline.resolve_backend("auto")
    assert choice.engines and choice.gpu == gpu and choice.tensorrt_version == "10.14.1.48"


def test_backend_tensorrt_without_gpu_is_an_error(monkeypatch):
    from clipexport.trt import pipeline

    monkeypatch.setattr(pipeline, "tensorrt_version", lambda: "10.14.1.48")

    def no_gpu(device: int = 0) -> env.GpuInfo:
        raise BackendUnavailableError("no CUDA GPU is visible")

    monkeypatch.setattr(pipeline, "cuda_gpu", no_gpu)
    with pytest.raises(BackendUnavailableError, match="--backend tensorrt: no CUDA GPU"):
        pipeline.resolve_backend("tensorrt")


def test_unknown_backend_is_a_usage_error():
    from clipexport.trt.pipeline import resolve_backend

    with pytest.raises(UsageError, match="--backend 'tvm'"):
        resolve_backend("tvm")


@pytest.mark.skipif(_real_tensorrt_here(), reason="TensorRT is installed here")
def test_build_with_backend_tensorrt_fails_before_any_work(tmp_path, monkeypatch):
    import clipexport.build as build_mod

    def must_not_load(*args, **kwargs):
        raise AssertionError("the reference model was loaded before the backend was checked")

    monkeypatch.setattr(build_mod, "load_reference", must_not_load)
    out = tmp_path / "out"
    options = build_mod.BuildOptions(model="ViT-B-32", pretrained="none", out=out, backend="tensorrt")
    with pytest.raises(BackendUnavailableError) as err:
        build_mod.build(options)
    assert isinstance(err.value, ClipExportError) and "TensorRT" in str(err.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.skipif(_real_tensorrt_here(), reason="TensorRT is installed here")
def test_cli_backend_tensorrt_without_tensorrt_exits_1_without_traceback(tmp_path):
    from clipexport.cli import cli

    result = CliRunner().invoke(cli, ["build", "ViT-B-32", "--pretrained", "none", "--backend", "tensorrt",
                                      "--out", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert "error:" in result.output and "TensorRT" in result.output and "Traceback" not in result.output


def test_builder_options_are_checked_up_front():
    from clipexport.trt.builder import EngineBuildOptions

    with pytest.raises(EngineError, match="optimization level 7"):
        EngineBuildOptions(optimization_level=7)
    with pytest.raises(EngineError, match="memory limit"):
        EngineBuildOptions(memory_limit=0)
    with pytest.raises(EngineError, match="attention mode"):
        EngineBuildOptions(attention="magic")
    assert EngineBuildOptions(memory_limit=2**30, optimization_level=5).cache_settings() == {
        "memory_limit": 2**30, "optimization_level": 5, "attention": "auto"}


# ---------------------------------------------------------------- optimization profiles


def test_image_profile_follows_the_recipe_batch_range():
    (p,) = tower_profiles([("pixel_values", ["batch", 3, 224, 224])], VIT.batch, "image")
    b = VIT.batch
    assert p == InputProfile("pixel_values", (b.min, 3, 224, 224), (b.opt, 3, 224, 224), (b.max, 3, 224, 224))
    assert p.contains((3, 3, 224, 224)) and not p.contains((b.max + 1, 3, 224, 224))
    assert not p.contains((1, 3, 224))


def test_trimmed_text_profile_has_a_sequence_range():
    (p,) = tower_profiles([("input_ids", ["batch", "sequence"])], BatchRange(1, 8, 64), "text", context_length=77)
    assert (p.min, p.opt, p.max) == ((1, 1), (8, 16), (64, 77))


def test_fixed_context_text_profile_and_short_context_clamps_opt():
    (fixed,) = tower_profiles([("input_ids", ["batch", 77])], BatchRange(2, 4, 16), "text", context_length=77)
    assert (fixed.min, fixed.opt, fixed.max) == ((2, 77), (4, 77), (16, 77))
    assert SequenceRange.for_context(8) == SequenceRange(1, 8, 8)


@pytest.mark.parametrize("inputs, tower, message", [
    ([("pixel_values", ["batch", 3, "height", 224])], "image", "axis 2 is dynamic"),
    ([("input_ids", ["batch", "sequence"])], "text", "no context_length"),
    ([("pixel_values", [128, 3, 224, 224])], "image", "fixed batch of 128"),
    ([("x", [])], "image", "scalar"),
    ([], "image", "no inputs"),
])
def test_profile_errors_name_input_and_axis(inputs, tower, message):
    with pytest.raises(EngineError, match=message):
        tower_profiles(inputs, BatchRange(1, 8, 64), tower)


def test_graph_input_shapes_reads_symbols_without_weights(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((77, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["w", "input_ids"], ["y"])], "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", 4])], [w])
    path = tmp_path / "text.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    shapes = graph_input_shapes(path)
    assert shapes == [("input_ids", ["batch", "sequence"])]
    (p,) = tower_profiles(shapes, VIT.batch, "text", context_length=77)
    assert p.max == (VIT.batch.max, 77)


# ---------------------------------------------------------------- engine cache keys


def _key(**changes: object) -> EngineKey:
    base: dict[str, object] = {
        "onnx_sha256": "a" * 64, "tensorrt_version": "10.14.1.48", "gpu_name": "NVIDIA H100 80GB HBM3",
        "compute_capability": "9.0",
        "profiles": (InputProfile("pixel_values", (1, 3, 224, 224), (8, 3, 224, 224), (64, 3, 224, 224)),),
        "precision": "fp16", "settings": (("attention", "native"), ("optimization_level", "default")),
    }
    base.update(changes)
    return EngineKey(**base)  # type: ignore[arg-type]


def test_key_digest_is_stable_and_names_the_engine_file():
    a, b = _key(), _key()
    assert a.digest() == b.digest() and len(a.digest()) == 64
    name = a.file_name("image")
    assert name.startswith("image.") and name.endswith(".plan") and len(name.split(".")[1]) == 16
    assert EngineKey.from_json(a.to_json()) == a


@pytest.mark.parametrize("field, value, reason", [
    ("onnx_sha256", "b" * 64, "the ONNX graph changed"),
    ("tensorrt_version", "11.0.0.1", "TensorRT version"),
    ("gpu_name", "NVIDIA A100-SXM4-80GB", "GPU: engine has"),
    ("compute_capability", "8.0", "GPU compute capability"),
    ("profiles", (InputProfile("pixel_values", (1, 3, 224, 224), (16, 3, 224, 224), (64, 3, 224, 224)),),
     "optimization profile"),
    ("precision", "fp32", "precision"),
    ("settings", (("attention", "plugin"), ("optimization_level", "default")), "builder settings"),
])
def test_every_key_field_changes_the_digest_and_is_reported(field, value, reason):
    stored, current = _key(), _key(**{field: value})
    assert stored.digest() != current.digest()
    diffs = key_differences(stored, current)
    assert len(diffs) == 1 and diffs[0].startswith(reason)


def test_settings_order_does_not_change_the_key(tmp_path):
    onnx_file = tmp_path / "image.onnx"
    onnx_file.write_bytes(b"graph")
    profiles = [InputProfile("x", (1, 3), (2, 3), (4, 3))]
    k1 = make_key(onnx_file, "10.14", "GPU", (9, 0), profiles, "fp16", {"a": 1, "b": "x"})
    k2 = make_key(onnx_file, "10.14", "GPU", (9, 0), profiles, "fp16", {"b": "x", "a": 1})
    assert k1.digest() == k2.digest() and k1.compute_capability == "9.0"
    assert k1.onnx_sha256 == hashlib.sha256(b"graph").hexdigest()


def _stored(directory: Path, key: EngineKey, tower: str = "image", data: bytes = b"PLAN") -> dict[str, object]:
    from clipexport.hashing import file_sha256

    path = directory / key.file_name(tower)
    path.write_bytes(data)
    return {"file": path.name, "sha256": file_sha256(path), "key": key.to_json()}


def test_decide_reuses_a_fitting_engine(tmp_path):
    entry = _stored(tmp_path, _key())
    decision = decide(tmp_path, entry, _key(), no_rebuild=True, tower="image")
    assert decision.action == "reuse" and decision.path == tmp_path / _key().file_name("image")


def test_decide_rebuilds_on_another_gpu_and_says_why(tmp_path):
    entry = _stored(tmp_path, _key())
    decision = decide(tmp_path, entry, _key(gpu_name="NVIDIA L4", compute_capability="8.9"), False, "image")
    assert decision.action == "build"
    assert any("GPU" in r for r in decision.reasons) and any("8.9" in r for r in decision.reasons)


def test_no_rebuild_mismatch_is_a_clear_error(tmp_path):
    entry = _stored(tmp_path, _key())
    with pytest.raises(EngineError) as err:
        decide(tmp_path, entry, _key(tensorrt_version="11.0.0.1"), no_rebuild=True, tower="image")
    assert "TensorRT version" in str(err.value) and "--no-rebuild" in str(err.value)


def test_tampered_or_missing_engine_is_not_reused(tmp_path):
    entry = _stored(tmp_path, _key())
    (tmp_path / str(entry["file"])).write_bytes(b"PLAN-truncated")
    assert "sha256" in decide(tmp_path, entry, _key(), False, "image").reasons[0]
    (tmp_path / str(entry["file"])).unlink()
    assert "missing" in decide(tmp_path, entry, _key(), False, "image").reasons[0]
    with pytest.raises(EngineError, match="missing"):
        decide(tmp_path, entry, _key(), True, "image")


def test_no_previous_or_malformed_entry_means_build(tmp_path):
    assert decide(None, None, _key(), False, "text").reasons == ("no engine was built before",)
    bad = {"file": "x.plan", "sha256": "0", "key": {"key_version": 99}}
    assert "unreadable" in decide(tmp_path, bad, _key(), False, "text").reasons[0]
    with pytest.raises(EngineError, match="no engine was built before"):
        decide(None, None, _key(), True, "text")


# ---------------------------------------------------------------- timing cache


def test_timing_cache_path_is_per_tensorrt_and_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPEXPORT_CACHE", str(tmp_path))
    path = default_timing_cache_path("10.14.1.48", "NVIDIA H100 80GB HBM3", (9, 0))
    assert path == tmp_path / "timing" / "trt-10.14.1.48-NVIDIA_H100_80GB_HBM3-sm90.cache"
    assert path != default_timing_cache_path("10.14.1.48", "NVIDIA A100", (8, 0))
