"""The engine build composed of Polygraphy's loaders, up to the point where Polygraphy imports TensorRT:
profiles, the builder configuration's arguments, timing-cache paths, logger routing and error mapping.

Polygraphy is real here. TensorRT cannot be installed on these machines: where a TensorRT module or
network object is needed, a stand-in is used and the test's name says `fake_tensorrt`.
"""

from __future__ import annotations

import logging
import types
from pathlib import Path

import pytest

from clipexport.errors import BackendUnavailableError, EngineError
from clipexport.trt import builder
from clipexport.trt.builder import EngineBuildOptions
from clipexport.trt.profiles import InputProfile

PROFILES = [InputProfile("input_ids", (1, 1), (8, 16), (64, 77))]


def _fake_tensorrt(version: str = "10.14.1.48", strongly_typed: bool = True) -> types.SimpleNamespace:
    flags = types.SimpleNamespace(**({"STRONGLY_TYPED": 1} if strongly_typed else {}))
    return types.SimpleNamespace(
        __version__=version, NetworkDefinitionCreationFlag=flags,
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"),
        ProfilingVerbosity=types.SimpleNamespace(DETAILED="DETAILED"),
    )


def test_profile_becomes_one_polygraphy_profile():
    profile = builder.polygraphy_profile(PROFILES + [InputProfile("mask", (1, 1), (8, 16), (64, 77))])
    assert list(profile.keys()) == ["input_ids", "mask"]
    shapes = profile["input_ids"]
    assert (tuple(shapes.min), tuple(shapes.opt), tuple(shapes.max)) == ((1, 1), (8, 16), (64, 77))


def test_config_carries_our_settings_and_never_a_precision_flag_fake_tensorrt(tmp_path):
    cache = tmp_path / "trt-10.14-H200-sm90.cache"
    options = EngineBuildOptions(memory_limit=2**30, optimization_level=5, timing_cache=cache)
    config = builder.config_loader(_fake_tensorrt(), PROFILES, options)
    assert config.memory_pool_limits == {"WORKSPACE": 2**30}
    assert config.builder_optimization_level == 5
    assert config.profiling_verbosity == "DETAILED"
    # precision is in the graph: Polygraphy's switches stay off (fp16 sets a flag TensorRT 11 removed)
    assert (config.tf32, config.fp16, config.bf16, config.int8, config.fp8) == (False,) * 5
    [profile] = config.profiles
    shapes = profile["input_ids"]
    assert list(profile) == ["input_ids"]
    assert (tuple(shapes.min), tuple(shapes.opt), tuple(shapes.max)) == ((1, 1), (8, 16), (64, 77))
    assert config.timing_cache_path is None  # not written yet: Polygraphy starts an empty one
    cache.write_bytes(b"timings")
    assert builder.config_loader(_fake_tensorrt(), PROFILES, options).timing_cache_path == str(cache)
    defaults = builder.config_loader(_fake_tensorrt(), PROFILES, EngineBuildOptions())
    assert defaults.memory_pool_limits is None and defaults.builder_optimization_level is None


@pytest.mark.parametrize(("version", "flag", "expected"), [
    ("10.8.0.43", True, True),   # 10.x: ask for a strongly typed network
    ("11.0.0.1", False, False),  # 11.x: always strongly typed, the flag gone (Polygraphy would fail on it)
    ("11.1.0", True, True),
])
def test_strongly_typed_argument_per_release_fake_tensorrt(version, flag, expected):
    assert builder.strongly_typed_flag(_fake_tensorrt(version, flag)) is expected


def test_tensorrt_10_without_strong_typing_is_refused_fake_tensorrt():
    with pytest.raises(EngineError, match="cannot build strongly typed networks"):
        builder.strongly_typed_flag(_fake_tensorrt("10.0.1", strongly_typed=False))


def test_profile_must_name_exactly_the_network_inputs_fake_tensorrt():
    network = types.SimpleNamespace(num_inputs=2, get_input=lambda i: types.SimpleNamespace(name=["ids", "mask"][i]))
    builder.check_profile_names(network, [InputProfile("ids", (1,), (1,), (1,)), InputProfile("mask", (1,), (1,), (1,))])
    with pytest.raises(EngineError, match=r"missing \['mask'\], unknown \['input_ids'\]"):
        builder.check_profile_names(network, [InputProfile("ids", (1,), (1,), (1,)), *PROFILES])


def test_parser_errors_logged_by_polygraphy_become_one_engine_error():
    """What Polygraphy does when TensorRT's parser fails (backend/trt/util.check_onnx_parser_errors):
    each parser error logged as an error, then a critical that raises PolygraphyException."""
    from polygraphy.logger import G_LOGGER

    shown: list[str] = []
    before = G_LOGGER.use_python_logging_system
    with pytest.raises(EngineError) as err, \
            builder.polygraphy_session("TensorRT could not build an engine from image.onnx", shown.append):
        G_LOGGER.error("In node 7 with name: attn and operator: Attention (parseNode): UNSUPPORTED_NODE")
        G_LOGGER.critical("Could not parse ONNX correctly")
    message = str(err.value)
    assert message.startswith("TensorRT could not build an engine from image.onnx: Could not parse ONNX correctly")
    assert "In node 7 with name: attn and operator: Attention" in message
    assert shown == ["    TensorRT error: In node 7 with name: attn and operator: Attention (parseNode): UNSUPPORTED_NODE"]
    # the logger is left as it was found
    assert G_LOGGER.use_python_logging_system == before
    assert not any(isinstance(h, builder._Forward) for h in logging.getLogger("Polygraphy").handlers)


def test_polygraphy_progress_goes_to_our_output_and_warnings_are_kept():
    from polygraphy.logger import G_LOGGER

    shown: list[str] = []
    with builder.polygraphy_session("x", shown.append) as session:
        G_LOGGER.start("Building engine with configuration:\nFlags | []")
        G_LOGGER.warning("Detected layernorm nodes in FP16")
        G_LOGGER.verbose("noise")
        G_LOGGER.finish("Finished engine building in 12.345 seconds")
    assert shown == ["    Building engine with configuration:", "    Finished engine building in 12.345 seconds"]
    assert session.warnings == ["Detected layernorm nodes in FP16"]


def test_other_exceptions_pass_through_untouched():
    with pytest.raises(ValueError, match="a bug"), builder.polygraphy_session("x"):
        raise ValueError("a bug")


def test_build_engine_without_tensorrt_stops_before_polygraphy_touches_it(tmp_path):
    """Here (tensorrt-stubs only) Polygraphy's lazy `import tensorrt` would find an empty namespace
    package and fail on `__version__`; we stop first, with the how-to."""
    from clipexport.trt.env import probe

    if probe().tensorrt_version is not None:
        pytest.skip("TensorRT is installed here")
    with pytest.raises(BackendUnavailableError, match="TensorRT"):
        builder.build_engine(tmp_path / "image.onnx", PROFILES, EngineBuildOptions(), "native")
    assert not (tmp_path / "image.onnx").exists() and list(tmp_path.iterdir()) == []


def test_network_loader_reads_from_the_path(tmp_path):
    """NetworkFromOnnxPath keeps the path (the parser resolves external weights next to it)."""
    from polygraphy.backend.trt import NetworkFromOnnxPath

    path = tmp_path / "image.onnx"
    loader = NetworkFromOnnxPath(str(path), strongly_typed=True)
    assert (loader.path, loader.strongly_typed) == (str(path), True)
    assert Path(loader.path).parent == tmp_path
