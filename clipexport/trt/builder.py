"""Building a TensorRT engine from an optimized ONNX file: strongly typed, one optimization
profile, builder memory limit and optimization level, persistent timing cache, detailed
layer information for the attention check.

Supports TensorRT 10.x and 11.x. TensorRT 11 is always strongly typed and has no FP16/INT8
builder flags; on 10.x we ask for a strongly typed network too. Either way the precision
is what our passes wrote into the graph (casts, Q/DQ), so the same ONNX means the same
numbers on ONNX Runtime and TensorRT. Enums are always looked up by name, never by value:
TensorRT 11 renumbered them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from clipexport.errors import EngineError
from clipexport.trt.env import has_native_attention, load_tensorrt
from clipexport.trt.profiles import InputProfile
from clipexport.trt.timing_cache import read_timing_cache, write_timing_cache

if TYPE_CHECKING:
    import tensorrt as trt

ATTENTION_MODES = ("auto", "native", "plugin", "none")
OPTIMIZATION_LEVELS = range(6)  # TensorRT's builder_optimization_level: 0..5, default 3


@dataclass(frozen=True)
class EngineBuildOptions:
    """What the user may tune; everything here is part of the engine cache key."""

    memory_limit: int | None = None  # bytes of the WORKSPACE pool; None: TensorRT's default (device memory)
    optimization_level: int | None = None  # None: TensorRT's default (3)
    timing_cache: Path | None = None  # None: no persistent timing cache
    attention: str = "auto"  # auto: native layer when available, else our plugin

    def __post_init__(self) -> None:
        if self.memory_limit is not None and self.memory_limit <= 0:
            raise EngineError(f"builder memory limit {self.memory_limit} must be a positive number of bytes")
        if self.optimization_level is not None and self.optimization_level not in OPTIMIZATION_LEVELS:
            raise EngineError(f"builder optimization level {self.optimization_level} is outside 0..5")
        if self.attention not in ATTENTION_MODES:
            raise EngineError(f"attention mode {self.attention!r}: choose from {', '.join(ATTENTION_MODES)}")

    def cache_settings(self) -> dict[str, object]:
        return {
            "memory_limit": self.memory_limit if self.memory_limit is not None else "default",
            "optimization_level": self.optimization_level if self.optimization_level is not None else "default",
            "attention": self.attention,
        }


@dataclass
class BuiltEngine:
    plan: bytes
    layer_information: str  # IEngineInspector JSON (ProfilingVerbosity.DETAILED)
    tensorrt_version: str
    strongly_typed: bool
    warnings: list[str] = field(default_factory=list)


def resolve_attention_mode(requested: str) -> str:
    """`native` when TensorRT has the attention layer (10.14+), else `plugin`; explicit modes are checked."""
    trt_module = load_tensorrt()
    native = has_native_attention(trt_module)
    if requested == "auto":
        return "native" if native else "plugin"
    if requested == "native" and not native:
        raise EngineError(f"TensorRT {trt_module.__version__} has no native attention layer (needs 10.14+); "
                          "use the attention plugin instead")
    return requested


def _make_logger(warnings: list[str], log: Callable[[str], None]) -> trt.ILogger:
    import tensorrt as trt

    class _Logger(trt.ILogger):
        """Forward TensorRT's warnings and errors to our progress output, and keep them."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                warnings.append(f"error: {msg}")
                log(f"    TensorRT error: {msg}")
            elif severity == trt.ILogger.Severity.WARNING:
                warnings.append(msg)

    return _Logger()


def network_flags() -> tuple[int, bool]:
    """(flags for Builder.create_network, strongly typed?).

    10.x: STRONGLY_TYPED must be asked for. 11.x: networks are always strongly typed and the
    flag may be gone; looking it up by name keeps us clear of renumbered enums.
    """
    import tensorrt as trt

    from clipexport.trt.env import version_tuple

    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:
        if version_tuple(trt.__version__) < (11,):
            raise EngineError(f"TensorRT {trt.__version__} cannot build strongly typed networks (needs 10.x with "
                              "NetworkDefinitionCreationFlag.STRONGLY_TYPED, or 11+)")
        return 0, True
    return 1 << int(flag), True


def _parse_onnx(network: trt.INetworkDefinition, logger: trt.ILogger, onnx_path: Path) -> None:
    import tensorrt as trt

    parser = trt.OnnxParser(network, logger)
    # From the path, not from bytes: weights in <name>.onnx.data next to it resolve this way.
    if not parser.parse_from_file(str(onnx_path)):
        errors = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            errors.append(str(err.desc()) if hasattr(err, "desc") else str(err))
        raise EngineError(f"TensorRT's ONNX parser rejected {onnx_path.name}:\n  " + "\n  ".join(errors or ["(no detail)"]))


def _add_profile(builder: trt.Builder, config: trt.IBuilderConfig, network: trt.INetworkDefinition,
                 profiles: Sequence[InputProfile]) -> None:
    import tensorrt as trt

    by_name = {p.name: p for p in profiles}
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    missing = [n for n in names if n not in by_name]
    extra = [n for n in by_name if n not in names]
    if missing or extra:
        raise EngineError(f"optimization profile does not match the network inputs {names}: "
                          f"missing {missing}, unknown {extra}")
    profile = builder.create_optimization_profile()
    for name in names:
        p = by_name[name]
        profile.set_shape(name, trt.Dims(list(p.min)), trt.Dims(list(p.opt)), trt.Dims(list(p.max)))
    if config.add_optimization_profile(profile) < 0:
        raise EngineError(f"TensorRT refused the optimization profile {[p.to_json() for p in profiles]}")


def _configure(config: trt.IBuilderConfig, options: EngineBuildOptions) -> None:
    import tensorrt as trt

    if options.memory_limit is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.memory_limit)
    if options.optimization_level is not None:
        config.builder_optimization_level = options.optimization_level
    # DETAILED: layer information names each layer's ONNX nodes and tactic (the attention check).
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    # TF32 is on by default; fp32 graphs must compute in fp32 to meet fp32 parity. Whatever
    # lower precision we want is already in the graph.
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if tf32 is not None:
        config.clear_flag(tf32)


def _load_timing_cache(config: trt.IBuilderConfig, path: Path | None, log: Callable[[str], None]) -> None:
    data = read_timing_cache(path) if path is not None else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, False) and data:
        # Built by another TensorRT or GPU: start fresh rather than mix timings.
        log(f"    timing cache {path} does not fit this TensorRT/GPU; starting a new one")
        config.set_timing_cache(config.create_timing_cache(b""), False)


def _save_timing_cache(config: trt.IBuilderConfig, path: Path | None) -> None:
    if path is None:
        return
    serialized = config.get_timing_cache().serialize()
    write_timing_cache(path, bytes(memoryview(serialized)))


def layer_information(plan: bytes, logger: trt.ILogger | None = None) -> str:
    """The engine's layer information as JSON (needs the GPU the engine was built for)."""
    import tensorrt as trt

    runtime = trt.Runtime(logger or trt.Logger(trt.Logger.Severity.WARNING))
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise EngineError("TensorRT could not deserialize the engine it just built")
    inspector = engine.create_engine_inspector()
    return str(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


def build_engine(
    onnx_path: Path,
    profiles: Sequence[InputProfile],
    options: EngineBuildOptions,
    attention: str,
    log: Callable[[str], None] = lambda _msg: None,
) -> BuiltEngine:
    """Build one engine from `onnx_path` (an optimized tower graph).

    attention: "native", "plugin" or "none" (after resolve_attention_mode); with "plugin",
    the graph must already carry our plugin nodes (passes.attention_plugin) and the plugin
    is registered before parsing.
    """
    load_tensorrt()
    import tensorrt as trt

    if attention == "plugin":
        from clipexport.trt.plugin import register_attention_plugin

        register_attention_plugin()
    warnings: list[str] = []
    logger = _make_logger(warnings, log)
    builder = trt.Builder(logger)
    flags, strongly_typed = network_flags()
    if attention == "plugin":
        # Prefer the ahead-of-time implementation: the engine must run without Python.
        aot = getattr(trt.NetworkDefinitionCreationFlag, "PREFER_AOT_PYTHON_PLUGINS", None)
        if aot is not None:
            flags |= 1 << int(aot)
    network = builder.create_network(flags)
    _parse_onnx(network, logger, onnx_path)
    config = builder.create_builder_config()
    _configure(config, options)
    _add_profile(builder, config, network, profiles)
    _load_timing_cache(config, options.timing_cache, log)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        detail = "; ".join(w for w in warnings if w.startswith("error:")) or "see TensorRT's log above"
        raise EngineError(f"TensorRT could not build an engine from {onnx_path.name}: {detail}")
    plan = bytes(memoryview(serialized))
    _save_timing_cache(config, options.timing_cache)
    return BuiltEngine(plan=plan, layer_information=layer_information(plan, logger),
                       tensorrt_version=str(trt.__version__), strongly_typed=strongly_typed, warnings=warnings)
