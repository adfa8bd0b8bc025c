"""Building a TensorRT engine from an optimized ONNX file, as a composition of Polygraphy's loaders:

    NetworkFromOnnxPath(path, strongly_typed)      parse from the path (external weights resolve)
      └─ our strict profile check                  profile names == network inputs, nothing guessed
    CreateConfig(profiles=[Profile], memory pool, optimization level, DETAILED verbosity, timing cache)
    EngineBytesFromNetwork(..., save_timing_cache)  build, merge and save the timing cache (file-locked)
    EngineFromBytes -> layer information (JSON)     the attention-fusion check (layer_info.py)

What Polygraphy has no answer for stays ours: the engine cache key (cache.py), the attention
plugin (plugin.py), the fusion check (layer_info.py), the profile rules (profiles.py).

TensorRT 10.x and 11.x. Precision is what our passes wrote into the graph (casts, Q/DQ), so we
never pass Polygraphy's fp16/bf16/int8/fp8 switches: they set builder flags that TensorRT 11
removed (and on 10.x would let TensorRT pick precisions the graph does not say). TF32 stays off
(Polygraphy's default): fp32 graphs must compute in fp32 to meet fp32 parity. Enums are looked
up by name, never by value: TensorRT 11 renumbered them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipexport.errors import EngineError
from clipexport.trt.env import load_tensorrt, version_tuple
from clipexport.trt.profiles import InputProfile

if TYPE_CHECKING:
    import tensorrt as trt

ATTENTION_MODES = ("auto", "native", "plugin", "none")
OPTIMIZATION_LEVELS = range(6)  # TensorRT's builder_optimization_level: 0..5, default 3
POLYGRAPHY_LOGGER = "Polygraphy"  # the Python logger G_LOGGER writes to once use_python_logging_system is set


@dataclass(frozen=True)
class EngineBuildOptions:
    """What the user may tune; everything here is part of the engine cache key."""

    memory_limit: int | None = None  # bytes of the WORKSPACE pool; None: TensorRT's default (device memory)
    optimization_level: int | None = None  # None: TensorRT's default (3)
    timing_cache: Path | None = None  # None: no persistent timing cache
    attention: str = "auto"  # auto: chosen from the graph's TensorRT verdict (trt.compat.choose_attention)

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


class _Forward(logging.Handler):
    """Polygraphy's (and, through its TensorRT logger, TensorRT's) messages -> our progress output.
    Errors are kept: a PolygraphyException only says "Could not parse ONNX correctly"; the
    parser's own messages were logged as errors just before."""

    def __init__(self, log: Callable[[str], None]) -> None:
        super().__init__(logging.INFO)
        self.log = log
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage().strip()
        if text.startswith("[") and "] " in text[:4]:  # Polygraphy's severity letter, e.g. "[E] "
            text = text.split("] ", 1)[1]
        if record.levelno >= logging.CRITICAL:
            return  # the exception carries it
        if record.levelno >= logging.ERROR:
            self.errors.append(text)
            self.log(f"    TensorRT error: {text}")
        elif record.levelno >= logging.WARNING:
            self.warnings.append(text)
        elif record.levelno in (22, 28):  # Polygraphy's START / FINISH: "Building engine...", "Finished ... in 12 s"
            self.log(f"    {text.splitlines()[0]}")


@contextmanager
def polygraphy_session(what: str, log: Callable[[str], None] = lambda _msg: None) -> Iterator[_Forward]:
    """Route Polygraphy's logger into `log` for the duration, and turn its PolygraphyException into
    our EngineError carrying the errors logged before it (the ONNX parser's messages)."""
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    handler = _Forward(log)
    target = logging.getLogger(POLYGRAPHY_LOGGER)
    saved = (G_LOGGER.use_python_logging_system, target.propagate, target.level)
    G_LOGGER.use_python_logging_system = True
    target.addHandler(handler)
    target.propagate, target.level = False, logging.INFO
    try:
        yield handler
    except PolygraphyException as exc:
        detail = [e for e in handler.errors if e != str(exc)] or [str(exc)]
        raise EngineError(f"{what}: {exc}\n  " + "\n  ".join(detail)) from None
    finally:
        target.removeHandler(handler)
        G_LOGGER.use_python_logging_system, target.propagate, target.level = saved[0], saved[1], saved[2]


def strongly_typed_flag(trt_module: Any) -> bool:
    """What to pass as NetworkFromOnnxPath(strongly_typed=...).

    10.x: STRONGLY_TYPED must be asked for. 11.x: networks are always strongly typed and the flag
    may be gone; asking Polygraphy for it then fails ("strongly_typed is not available").
    """
    if hasattr(trt_module.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        return True
    if version_tuple(str(trt_module.__version__)) < (11,):
        raise EngineError(f"TensorRT {trt_module.__version__} cannot build strongly typed networks (needs 10.x with "
                          "NetworkDefinitionCreationFlag.STRONGLY_TYPED, or 11+)")
    return False


def polygraphy_profile(profiles: Sequence[InputProfile]) -> Any:
    """Our profiles as one Polygraphy Profile (no TensorRT needed to make it)."""
    from polygraphy.backend.trt import Profile

    profile = Profile()
    for p in profiles:
        profile.add(p.name, min=list(p.min), opt=list(p.opt), max=list(p.max))
    return profile


def config_loader(trt_module: Any, profiles: Sequence[InputProfile], options: EngineBuildOptions) -> Any:
    """Polygraphy's CreateConfig for our build: strongly typed, no precision switches, TF32 off."""
    from polygraphy.backend.trt import CreateConfig

    timing = options.timing_cache
    pools = {trt_module.MemoryPoolType.WORKSPACE: options.memory_limit} if options.memory_limit is not None else None
    return CreateConfig(
        profiles=[polygraphy_profile(profiles)],
        memory_pool_limits=pools,
        builder_optimization_level=options.optimization_level,
        # DETAILED: layer information names each layer's ONNX nodes and tactic (the attention check).
        profiling_verbosity=trt_module.ProfilingVerbosity.DETAILED,
        # A cache built by another TensorRT or GPU cannot exist under our per-version, per-GPU file name
        # (timing_cache.default_timing_cache_path); a user-named one TensorRT refuses and starts empty.
        load_timing_cache=str(timing) if timing is not None and timing.is_file() else None,
    )


def check_profile_names(network: trt.INetworkDefinition, profiles: Sequence[InputProfile]) -> None:
    """Our profile must name exactly the network's inputs (Polygraphy would fill missing ones with defaults)."""
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    given = [p.name for p in profiles]
    missing, extra = [n for n in names if n not in given], [n for n in given if n not in names]
    if missing or extra:
        raise EngineError(f"optimization profile does not match the network inputs {names}: "
                          f"missing {missing}, unknown {extra}")


def layer_information(plan: bytes) -> str:
    """The engine's layer information as JSON (needs the GPU the engine was built for)."""
    import tensorrt as trt
    from polygraphy.backend.trt import EngineFromBytes

    engine = EngineFromBytes(plan)()
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

    attention: "native", "plugin" or "none" (after compat.choose_attention); with "plugin", the
    graph must already carry our plugin nodes (passes.attention_plugin) and the plugin is
    registered before parsing. The plugin has only an ahead-of-time implementation, so no
    PREFER_AOT_PYTHON_PLUGINS network flag is needed (that flag picks between AOT and JIT).
    """
    trt_module = load_tensorrt()
    from polygraphy.backend.trt import EngineBytesFromNetwork, NetworkFromOnnxPath

    if attention == "plugin":
        from clipexport.trt.plugin import register_attention_plugin

        register_attention_plugin()
    strongly_typed = strongly_typed_flag(trt_module)
    if options.timing_cache is not None:
        options.timing_cache.parent.mkdir(parents=True, exist_ok=True)
    with polygraphy_session(f"TensorRT could not build an engine from {onnx_path.name}", log) as session:
        builder, network, parser = NetworkFromOnnxPath(str(onnx_path), strongly_typed=strongly_typed)()
        check_profile_names(network, profiles)
        plan = EngineBytesFromNetwork(
            (builder, network, parser), config=config_loader(trt_module, profiles, options),
            save_timing_cache=str(options.timing_cache) if options.timing_cache is not None else None,
        )()
        plan_bytes = bytes(memoryview(plan))
        layers = layer_information(plan_bytes)
    return BuiltEngine(plan=plan_bytes, layer_information=layers, tensorrt_version=str(trt_module.__version__),
                       strongly_typed=True, warnings=session.warnings)
