"""The build's TensorRT step: after a tower's ONNX passed parity, make (or reuse) its engine,
check attention fusion, and check the engine's parity against PyTorch like ONNX Runtime's.

    resolve_backend()        before any work: is TensorRT + a GPU here, and was it asked for?
    build_tower_engine()     per tower, after ONNX parity:
        attention mode ─ native layer (TensorRT 10.14+) or our plugin (graph rewritten to <tower>.trt.onnx)
        profiles ─ cache key ─ reuse the stored engine, or build (timing cache) ─ <tower>.<key>.plan
        layer information ─ attention fused? (loud warning if not) ─ parity on the engine
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipexport.errors import BackendUnavailableError, EngineError, UsageError
from clipexport.hashing import file_sha256
from clipexport.recipes import BatchRange, TowerSpec
from clipexport.trt.builder import EngineBuildOptions, build_engine
from clipexport.trt.cache import decide, make_key
from clipexport.trt.compat import choose_attention
from clipexport.trt.env import (
    HOW_TO_GET_TENSORRT,
    GpuInfo,
    cuda_gpu,
    has_native_attention,
    load_tensorrt,
    probe,
    tensorrt_version,
)
from clipexport.trt.layer_info import (
    AttentionReport,
    attention_nodes_of,
    check_attention_fusion,
    parse_layer_information,
    warn_unfused,
)
from clipexport.trt.plugin import PLUGIN_NAME
from clipexport.trt.profiles import DEFAULT_SEQUENCE_OPT, graph_input_shapes, tower_profiles

BACKENDS = ("auto", "onnxruntime", "tensorrt")


@dataclass(frozen=True)
class BackendChoice:
    """Whether this build makes TensorRT engines, and what to tell the user if not."""

    engines: bool
    note: str = ""
    tensorrt_version: str | None = None
    gpu: GpuInfo | None = None


def resolve_backend(backend: str) -> BackendChoice:
    """Decide before any work. `tensorrt` without TensorRT or a GPU is a BackendUnavailableError;
    `auto` quietly stops after ONNX and says how to get engines."""
    if backend not in BACKENDS:
        raise UsageError(f"--backend {backend!r}: choose from {', '.join(BACKENDS)}")
    if backend == "onnxruntime":
        return BackendChoice(engines=False)
    if backend == "tensorrt":
        version = tensorrt_version()  # raises BackendUnavailableError with the how-to
        _check_floor(version)
        try:
            gpu = cuda_gpu()
        except BackendUnavailableError as exc:
            raise BackendUnavailableError(f"--backend tensorrt: {exc}") from None
        return BackendChoice(engines=True, tensorrt_version=version, gpu=gpu)
    found = probe()
    if not found.ok:
        how = "" if HOW_TO_GET_TENSORRT in found.reason else f" To get engines, {HOW_TO_GET_TENSORRT}."
        return BackendChoice(engines=False, note=(
            f"TensorRT engines were not built, the ONNX files are complete: {found.reason}.{how}"
        ))
    try:
        _check_floor(str(found.tensorrt_version))
    except BackendUnavailableError as exc:
        return BackendChoice(engines=False, note=f"TensorRT engines were not built, the ONNX files are complete: {exc}")
    return BackendChoice(engines=True, tensorrt_version=found.tensorrt_version, gpu=found.gpu)


def _check_floor(version: str) -> None:
    """TensorRT older than the oldest release the support matrix targets: refused before any work."""
    from clipexport.trt.compat import load_matrix, release_tuple

    floor = load_matrix().targets[0]
    if release_tuple(version) < release_tuple(floor):
        raise BackendUnavailableError(f"TensorRT {version} is older than {floor}, the oldest release clipexport "
                                      f"builds engines with; {HOW_TO_GET_TENSORRT}")


@dataclass(frozen=True)
class EngineStepOptions:
    build: EngineBuildOptions = field(default_factory=EngineBuildOptions)
    no_rebuild: bool = False
    sequence_opt: int = DEFAULT_SEQUENCE_OPT
    previous_dir: Path | None = None  # an earlier artifact whose engines may be reused
    previous_manifest: dict[str, Any] | None = None
    compat: dict[str, Any] | None = None  # the tower's TensorRT-compatibility verdict (trt.compat), if any


@dataclass
class EngineResult:
    entry: dict[str, Any]  # goes to manifest["towers"][tower]["engine"]
    files: dict[str, str]  # name -> sha256, for manifest["files"]
    attention: AttentionReport
    parity: Any  # verify.TowerParity


def _plugin_graph(onnx_path: Path, staging: Path, tower: str) -> Path:
    """Write <tower>.trt.onnx: the verified graph with attention blocks as plugin nodes."""
    import onnx

    from clipexport.artifacts import save_onnx
    from clipexport.passes.attention_plugin import substitute_attention_plugin

    model = onnx.load_model(str(onnx_path))  # loads <name>.data too
    rewritten = substitute_attention_plugin(model)
    del model
    path = staging / f"{tower}.trt.onnx"
    save_onnx(rewritten, path)
    onnx.checker.check_model(str(path))  # from the path: works past 2 GB too
    return path


def _use_plugin(onnx_path: Path, staging: Path, tower: str, requested: str, files: dict[str, str],
                log: Callable[[str], None]) -> Path | None:
    """The plugin graph's path (its files recorded), or None when the plugin does not fit and
    attention was not explicitly requested as `plugin` (then the engine is built without it)."""
    try:
        path = _plugin_graph(onnx_path, staging, tower)
    except EngineError:
        raise
    except Exception as exc:  # a graph the plugin cannot express (AttentionPluginError, checker errors)
        if requested == "plugin":
            raise
        log(f"    attention plugin not applied to the {tower} tower: {exc}")
        return None
    for name in (path.name, f"{path.name}.data"):
        if (staging / name).is_file():
            files[name] = file_sha256(staging / name)
    return path


def build_tower_engine(
    tower: str,
    onnx_path: Path,
    staging: Path,
    spec: TowerSpec,
    batch: BatchRange,
    context_length: int | None,
    precision: str,
    choice: BackendChoice,
    options: EngineStepOptions,
    check_parity: Callable[[Any, str], Any],
    log: Callable[[str], None] = lambda _msg: None,
) -> EngineResult:
    """Make the tower's engine in `staging` (reusing a fitting stored one), then verify it.

    check_parity(candidate, backend) -> TowerParity runs the same parity as for ONNX Runtime.
    """
    import onnx

    from clipexport.trt.runner import TensorRTCandidate

    if not choice.engines or choice.gpu is None or choice.tensorrt_version is None:
        raise EngineError("build_tower_engine called without TensorRT and a GPU")
    # Refuse up front (before any file or build) when this TensorRT parses the graph neither as is
    # nor after the attention-plugin pass; the verdict also picks the plugin pass when only it helps.
    attention = choose_attention(options.compat, choice.tensorrt_version, options.build.attention,
                                 has_native_attention(load_tensorrt()))
    files: dict[str, str] = {}
    engine_onnx = onnx_path
    if attention == "plugin":
        plugin_onnx = _use_plugin(onnx_path, staging, tower, options.build.attention, files, log)
        engine_onnx, attention = (plugin_onnx, "plugin") if plugin_onnx else (onnx_path, "none")
        if attention == "none":  # the plugin did not apply: the graph as is must parse here
            choose_attention(options.compat, choice.tensorrt_version, "none", False)

    profiles = tower_profiles(graph_input_shapes(engine_onnx), batch, tower, context_length, options.sequence_opt)
    settings = {**options.build.cache_settings(), "attention": attention}
    key = make_key(engine_onnx, choice.tensorrt_version, choice.gpu.name, choice.gpu.compute_capability,
                   profiles, precision, settings)
    previous = None
    if options.previous_manifest is not None:
        previous = options.previous_manifest.get("towers", {}).get(tower, {}).get("engine")
    decision = decide(options.previous_dir, previous, key, options.no_rebuild, tower)
    plan_name = key.file_name(tower)
    layers_name = plan_name.removesuffix(".plan") + ".layers.json"
    if decision.action == "reuse" and decision.path is not None and options.previous_dir is not None:
        log(f"    reusing {decision.path.name} (same graph, TensorRT, GPU, profile and settings)")
        shutil.copyfile(decision.path, staging / plan_name)
        stored_layers = options.previous_dir / layers_name
        layer_json = stored_layers.read_text(encoding="utf-8") if stored_layers.is_file() else ""
        built_with = choice.tensorrt_version
    else:
        log(f"    building engine ({'; '.join(decision.reasons)})")
        try:
            built = build_engine(engine_onnx, profiles, options.build, attention, log)
        except EngineError as exc:
            # TensorRT's native attention is not decomposable: with no fused kernel for a block's
            # shape/dtype the build fails. In auto mode, fall back to our plugin.
            plugin_onnx = None
            if attention == "native" and options.build.attention == "auto":
                log(f"    native attention build failed ({exc}); retrying with the clipexport attention plugin")
                plugin_onnx = _use_plugin(onnx_path, staging, tower, "auto", files, log)
            if plugin_onnx is None:
                raise
            engine_onnx, attention = plugin_onnx, "plugin"
            profiles = tower_profiles(graph_input_shapes(engine_onnx), batch, tower, context_length,
                                      options.sequence_opt)
            key = make_key(engine_onnx, choice.tensorrt_version, choice.gpu.name, choice.gpu.compute_capability,
                           profiles, precision, {**settings, "attention": attention})
            plan_name = key.file_name(tower)
            layers_name = plan_name.removesuffix(".plan") + ".layers.json"
            built = build_engine(engine_onnx, profiles, options.build, attention, log)
        (staging / plan_name).write_bytes(built.plan)
        layer_json = built.layer_information
        built_with = built.tensorrt_version
    if layer_json:
        (staging / layers_name).write_text(layer_json, encoding="utf-8")
        files[layers_name] = file_sha256(staging / layers_name)
    files[plan_name] = file_sha256(staging / plan_name)

    graph = onnx.load_model(str(engine_onnx), load_external_data=False)
    blocks = attention_nodes_of(graph, PLUGIN_NAME)
    info = parse_layer_information(layer_json or json.dumps({"Layers": []}))
    report = check_attention_fusion(info, blocks, [PLUGIN_NAME])
    log(f"    {report.summary()}")
    warn_unfused(report, tower, log)

    candidate = TensorRTCandidate(staging / plan_name, spec.input_name, spec.output_name)
    parity = check_parity(candidate, candidate.backend)
    log(f"    {parity.summary()}")
    entry = {
        "file": plan_name,
        "sha256": files[plan_name],
        "layers": layers_name if layer_json else None,
        "onnx": engine_onnx.name,
        "key": key.to_json(),
        "digest": key.digest(),
        "tensorrt_version": built_with,
        "strongly_typed": True,
        "attention_mode": attention,
        "attention": report.to_json(),
        "reused": decision.action == "reuse",
        "parity": parity.to_json(),
    }
    return EngineResult(entry=entry, files=files, attention=report, parity=parity)
