"""The build: model -> towers -> ONNX -> passes -> parity -> artifact directory.

Everything the CLI's `build` and `verify` do lives here, so the Python API has it too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from clipexport import __version__, memory
from clipexport.artifacts import (
    FORMAT_VERSION,
    StagingDir,
    check_out_dir,
    default_out_dir,
    library_versions,
    save_onnx,
    tensor_infos,
    write_manifest,
)
from clipexport.manifest import MIN_SEQUENCE, check_files, check_graphs, read_manifest
from clipexport.errors import ClipExportError, ParityError, UnsupportedModelError, UsageError, WeightsError
from clipexport.hashing import file_sha256
from clipexport.models.architecture import HF_CLIP_TEXT, HF_TEXT, families_of
from clipexport.models.hf_text import missing_config_reason
from clipexport.models.open_clip_source import (
    ReferenceModel,
    canonical_name,
    default_pretrained,
    known_tags,
    load_reference,
    model_config,
)
from clipexport.models.weights import FILE, RANDOM, parse_pretrained
from clipexport.progress import Progress
from clipexport.tokenizer_assets import write_tokenizer_assets
from clipexport.recipes import TOWERS, BatchRange, Recipe, Tolerance, TowerSpec, recipe_for
from clipexport.verify import (
    IsolatedOnnxRuntimeCandidate,
    RecordedReference,
    TowerParity,
    check_tower,
    image_inputs,
    text_inputs,
)

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
# Towers whose fp32 weights pass this many bytes are exported straight to ONNX external data
# (protobuf stops at 2 GB), their passes read only the graph, and a built-in CLIP with such a
# tower is loaded one tower at a time (models/per_tower.py).
LARGE_TOWER_BYTES = 1_500_000_000
# Precisions whose graphs need calibration inputs (fp16: range guard; int8/fp8: activation scales).
CALIBRATED = ("fp16", "int8", "fp8")
QUANTIZED = ("int8", "fp8")


@dataclass
class BuildOptions:
    model: str
    pretrained: str | None = None  # None: the model's default tag
    towers: Sequence[str] = TOWERS
    precision: str = "fp32"
    batch: BatchRange | None = None  # None: the recipe's range
    out: Path | None = None  # None: engines/<MODEL>-<pretrained>-<precision>
    force: bool = False
    seed: int = 0
    disabled_passes: Sequence[str] = ()  # pass names; "fuse_attention" also exports attention unfused
    accept_parity_failure: bool = False
    calibration_images: Path | None = None  # folder of images for int8/fp8/fp16 calibration
    calibration_prompts: Path | None = None  # text file, one prompt per line
    # TensorRT engines (clipexport.trt): "auto" builds them when TensorRT and a GPU are here.
    backend: str = "auto"  # auto | onnxruntime | tensorrt
    no_rebuild: bool = False  # reuse the engines in --out (with --force) or fail; never build
    builder_memory_limit: int | None = None  # bytes of TensorRT's workspace pool
    builder_optimization_level: int | None = None  # TensorRT builder optimization level 0..5
    timing_cache: Path | None = None  # None: the per-TensorRT/GPU cache under ~/.cache/clipexport
    large_tower_bytes: int = LARGE_TOWER_BYTES  # 0: every tower takes the large-tower path (--external-data)
    memory_check: bool = True  # refuse up front a build that cannot fit in the available memory


@dataclass
class BuildResult:
    out_dir: Path
    manifest: dict[str, Any]
    parity: dict[str, TowerParity] = field(default_factory=dict)


@dataclass(frozen=True)
class _Plan:
    """Everything decided before any weights are loaded or any file is written."""

    name: str
    recipe: Recipe
    towers: tuple[str, ...]
    batch: BatchRange
    out: Path
    engines: Any = None  # clipexport.trt.pipeline.BackendChoice
    per_tower: bool = False  # load the reference one tower at a time (a built-in CLIP with a large tower)


def plan_build(options: BuildOptions) -> _Plan:
    """Validate the request up front: bad input fails here, before any work or any file.

    Everything up to the model's parameter count is read without importing torch, so a typo
    (model, tag, --out, --backend) is refused in a fraction of a second.
    """
    from clipexport.trt.builder import EngineBuildOptions
    from clipexport.trt.pipeline import resolve_backend

    if options.precision not in PRECISIONS:
        raise UsageError(f"--precision {options.precision!r}: this version builds {', '.join(PRECISIONS)}")
    if options.out is not None:
        check_out_dir(options.out, options.force)
    # --backend tensorrt without TensorRT (or a GPU) fails here, before anything is loaded.
    engines = resolve_backend(options.backend) if options.backend != "auto" else None
    EngineBuildOptions(options.builder_memory_limit, options.builder_optimization_level)  # range checks
    name = canonical_name(options.model)
    cfg = model_config(name)
    recipe = recipe_for(families_of(cfg), name)
    if families_of(cfg).text == HF_TEXT and (reason := missing_config_reason(cfg["text_cfg"])):
        raise UnsupportedModelError(f"{name}: unsupported: {reason}")
    recipe.tolerance(options.precision)
    towers = tuple(dict.fromkeys(options.towers))
    bad = [t for t in towers if t not in recipe.towers]
    if bad or not towers:
        raise UsageError(f"--towers: unknown tower {bad[0] if bad else '(none)'}; choose from {', '.join(recipe.towers)}")
    unknown_passes: list[str] = []
    if options.disabled_passes:  # the pass registry imports onnx: only when there is something to check
        from clipexport.passes import pass_names

        unknown_passes = sorted(set(options.disabled_passes) - set(pass_names()))
    if unknown_passes:
        raise UsageError(f"unknown pass {unknown_passes[0]!r}; passes are: {', '.join(pass_names())}")
    batch = options.batch or recipe.batch
    if batch.min == batch.max and options.precision in CALIBRATED:
        raise UsageError(f"--batch {batch}: a fixed batch builds fp32 and bf16 graphs; {options.precision} "
                         f"calibrates one item at a time, which a graph fixed at {batch.min} rows cannot run. "
                         f"Use a range such as 1:{batch.max}:{batch.max}")
    weights = parse_pretrained(options.pretrained or default_pretrained(name), options.seed, known_tags(name), name)
    out = options.out or default_out_dir(name, weights.label, options.precision)
    if options.out is None:  # a given --out was checked first thing, above
        check_out_dir(out, options.force)
    if engines is None:  # auto: looking for a GPU imports torch, so only now
        engines = resolve_backend(options.backend)
    parameters = _parameters(name, cfg)
    per_tower = _large_towers(name, cfg, towers, options, parameters)
    if parameters is not None and options.memory_check:
        need = memory.least_memory(parameters, towers, options.large_tower_bytes, per_tower)
        memory.check_fits(name, need, memory.available_bytes())
    return _Plan(name=name, recipe=recipe, towers=towers, batch=batch, out=out, engines=engines,
                 per_tower=per_tower)


def _parameters(name: str, cfg: dict[str, Any]) -> dict[str, int] | None:
    """Parameters per tower of an open_clip model, counted on the meta device (nothing allocated);
    None for a transformers CLIPModel, which is not counted ahead."""
    from clipexport.models import per_tower

    if cfg.get("source") == "transformers":
        return None
    if per_tower.supports_per_tower(cfg):  # the count decides how it loads: it must succeed
        return per_tower.count_parameters(name, cfg)
    try:
        return per_tower.count_parameters(name, cfg)
    except Exception:  # noqa: BLE001 - only the memory check reads it; the build reports its own errors
        return None


def _large_towers(name: str, cfg: dict[str, Any], towers: Sequence[str], options: BuildOptions,
                  sizes: dict[str, int] | None) -> bool:
    """Whether a built-in CLIP has a tower over the large-tower size (it then loads one tower at a
    time). A tower over that size goes to external data whatever the model class, where fp32,
    fp16 and bf16 build but int8/fp8 do not: refused here, before any work."""
    from clipexport.models import per_tower
    from clipexport.passes import EXTERNAL_UNSUPPORTED

    if sizes is None:
        return False
    large = [t for t in towers if 4 * sizes[t] > options.large_tower_bytes]
    if large and options.precision in QUANTIZED:
        raise UsageError(
            f"{name}: the {', '.join(large)} tower{'s' if len(large) > 1 else ''} "
            f"({', '.join(f'{sizes[t] / 1e9:.2f} B parameters' for t in large)}): {EXTERNAL_UNSUPPORTED}.")
    return bool(large) and per_tower.supports_per_tower(cfg)


def parity_batch_sizes(recipe: Recipe, batch: BatchRange) -> list[int]:
    """The recipe's parity batch sizes that fit the build's range, plus its smallest and largest
    batch: a range is only claimed as far as it was verified (BatchRange bounds MAX)."""
    sizes = {b for b in recipe.parity_batch_sizes if batch.min <= b <= batch.max}
    sizes.update((batch.min, batch.max))
    return sorted(sizes)


def _example_input(ref: ReferenceModel, tower: str) -> Any:
    import torch

    if tower == "image":
        return torch.randn(2, 3, ref.image_size, ref.image_size, generator=torch.Generator().manual_seed(1))
    return ref.tokenizer()(["a photo of a dog.", "a diagram"])


def _tower_module(ref: ReferenceModel, tower: str) -> Any:
    return ref.tower(tower)


def _trimmable(ref: ReferenceModel, tower: str, spec: TowerSpec) -> tuple[bool, str]:
    """Whether this text tower is exported with a dynamic 'sequence' axis, and if not, why.

    The built-in causal tower trims exactly after EOT (models/towers.py); a bidirectional
    Hugging Face tower trims to its longest unpadded row: its padding mask hides the rest.
    """
    from clipexport.models.towers import untrimmable_reason

    if tower != "text":
        return False, ""
    if not spec.dynamic_sequence:
        return False, "the recipe exports a fixed context length"
    if ref.families.text == HF_TEXT:
        return True, ""
    if ref.families.text == HF_CLIP_TEXT:
        from clipexport.models import hf_clip

        reason = hf_clip.untrimmable_reason(ref.model)
        return not reason, reason
    reason = untrimmable_reason(ref.model)
    return not reason, reason


def _export_module(ref: ReferenceModel, module: Any, trim: bool) -> Any:
    """The module to export: the trimmable variant of open_clip's built-in text tower, else the
    tower itself (a transformers CLIP text model already takes any length up to its context:
    it slices its position ids and builds its causal mask from the input's shape)."""
    from clipexport.models.towers import text_tower

    return text_tower(ref.model, trimmable=True) if trim and ref.families.text != HF_CLIP_TEXT else module


def _pad_id(ref: ReferenceModel) -> int:
    """The id that right-pads token rows: 0 for CLIP BPE, the text model's own for Hugging Face towers."""
    if ref.families.text == HF_TEXT:
        return int(ref.model.text.config.pad_token_id)
    return 0


def _anchors(ref: ReferenceModel, tower: str, seed: int) -> Any:
    """Zero-shot anchors for top-1 agreement: class-prompt text embeddings for the image tower,
    image embeddings for the text tower, both from the fp32 PyTorch reference."""
    import torch

    from clipexport.calibration import class_prompts

    with torch.no_grad():
        if tower == "image":
            return ref.tower("text")(ref.tokenizer()(class_prompts())).float().numpy()
        pixels = image_inputs([16], ref.image_size, seed + 1)[0]
        return ref.tower("image")(pixels).float().numpy()


def _calibration(ref: ReferenceModel, tower: str, options: BuildOptions, recipe: Recipe) -> Any:
    from clipexport.calibration import image_calibration, text_calibration

    size = recipe.quantize.calibration_size
    if tower == "image":
        return image_calibration(ref, size, options.seed, options.calibration_images)
    return text_calibration(ref, size, options.calibration_prompts)


def parity_inputs(ref: ReferenceModel, tower: str, batch_sizes: Sequence[int], seed: int) -> list[Any]:
    """The parity batches: seeded random pixels, or real prompts tokenized as the model does."""
    if tower == "image":
        return image_inputs(batch_sizes, ref.image_size, seed)
    return text_inputs(batch_sizes, ref.tokenizer())


def tower_parity(
    ref: ReferenceModel,
    tower: str,
    module: Any,
    onnx_path: Path,
    spec: TowerSpec,
    tolerance: Tolerance,
    batch_sizes: Sequence[int],
    seed: int,
    precision: str,
    trim: bool = False,
    anchors: Any = None,
    release: Callable[[], None] | None = None,
    pad_id: int = 0,
) -> TowerParity:
    """Reference tower vs its ONNX file on ONNX Runtime, on random pixels or real prompts.

    The candidate runs in a child process (a crashing graph becomes a ParityError). A
    trimmable text graph gets each batch cut to max EOT + 1 columns, the reference the full
    context. bf16 graphs run emulated (ONNX Runtime's CPU provider has no bf16 kernels).
    release: the reference's outputs are computed first, then `release()` frees the tower,
    then ONNX Runtime loads the graph: the two copies of a large tower never meet in memory.
    """
    import tempfile

    inputs = parity_inputs(ref, tower, batch_sizes, seed)
    reference: Callable[[Any], Any] = module
    if release is not None:
        reference = RecordedReference(module, inputs)
        release()
    note = ""
    with tempfile.TemporaryDirectory(prefix="clipexport-parity-") as tmp:
        path = onnx_path
        if precision in ("fp16", "bf16"):
            from clipexport.passes.precision import LOW_TYPES

            path = _emulated_graph(onnx_path, LOW_TYPES[precision], Path(tmp))
            note = (f"{precision} emulated: every node of the {precision} graph ran in fp32 between Casts from and to "
                    f"{precision} ({precision} storage, fp32 arithmetic). onnxruntime's CPU provider has no bf16 "
                    "kernels, and for fp16 it runs only Attention and layout ops natively (MatMul, Gemm, Conv, "
                    "LayerNorm, Gelu get Casts to fp32 inserted), which would hide fp16 rounding and overflow")
        elif precision == "fp8":
            note = ("fp8 Q/DQ ran on onnxruntime CPU as quantize-dequantize (fp8 E4M3 rounding of weights and "
                    "activations, fp32 arithmetic): the numbers of fp8, not its speed")
        try:
            with IsolatedOnnxRuntimeCandidate(path, spec.input_name) as candidate:
                parity = check_tower(tower, reference, candidate, inputs, tolerance, candidate.backend, precision,
                                     anchors=anchors, trim=trim, pad_id=pad_id)
        finally:
            if path.name.startswith(".emulated-"):
                path.unlink(missing_ok=True)
    parity.note = note
    parity.top1_gated = ref.weights.kind != RANDOM
    return parity


def _emulated_graph(onnx_path: Path, low: int, folder: Path) -> Path:
    """The fp32-arithmetic twin of a fp16/bf16 graph, written into `folder`.

    A graph with external weights gets its data files hard-linked beside the twin (ONNX Runtime
    reads external data only from the graph's own folder, and refuses symbolic links out of it):
    the weights are neither copied nor loaded here.
    """
    import os

    import onnx

    from clipexport.passes.external_precision import data_files
    from clipexport.passes.precision import emulate_on_fp32

    graph = onnx.load(str(onnx_path), load_external_data=False)
    external = data_files(graph)
    path = folder / onnx_path.name
    if not external:
        save_onnx(emulate_on_fp32(graph, low), path)
        return path
    for name in external:
        try:
            os.link(onnx_path.parent / name, folder / name)
        except OSError:  # another file system: the twin lives beside the data (the caller removes it)
            path = onnx_path.parent / f".emulated-{onnx_path.name}"
            break
    onnx.save_model(emulate_on_fp32(graph, low), str(path))  # the graph only; its weights stay external
    return path


def tower_engine(
    plan: _Plan,
    options: BuildOptions,
    tower: str,
    onnx_path: Path,
    staging: Path,
    ref: ReferenceModel,
    module: Any,
    tolerance: Tolerance,
    sizes: Sequence[int],
    trim: bool,
    progress: Progress,
    compat: dict[str, Any] | None = None,
) -> Any:
    """The TensorRT step of one tower, run after its ONNX passed parity (clipexport.trt.pipeline).

    The engine's parity uses the same inputs, anchors and trimming as ONNX Runtime's.
    """
    from clipexport.trt.builder import EngineBuildOptions
    from clipexport.trt.pipeline import EngineStepOptions, build_tower_engine
    from clipexport.trt.timing_cache import default_timing_cache_path

    choice = plan.engines
    timing = options.timing_cache or default_timing_cache_path(
        choice.tensorrt_version, choice.gpu.name, choice.gpu.compute_capability)
    previous_dir, previous = None, None
    if plan.out.is_dir():  # --force over an earlier build: its engines may still fit
        try:
            previous, previous_dir = read_manifest(plan.out).to_json(), plan.out
        except ClipExportError:
            pass
    inputs = image_inputs(sizes, ref.image_size, options.seed) if tower == "image" else text_inputs(
        sizes, ref.tokenizer())
    anchors = _anchors(ref, tower, options.seed)

    def check(candidate: Any, backend: str) -> TowerParity:
        return check_tower(tower, module, candidate, inputs, tolerance, backend, options.precision,
                           anchors=anchors, trim=trim, pad_id=_pad_id(ref))

    step = EngineStepOptions(
        build=EngineBuildOptions(options.builder_memory_limit, options.builder_optimization_level, timing),
        no_rebuild=options.no_rebuild, previous_dir=previous_dir, previous_manifest=previous, compat=compat,
    )
    return build_tower_engine(tower, onnx_path, staging, plan.recipe.towers[tower], plan.batch,
                              ref.context_length if tower == "text" else None, options.precision, choice, step,
                              check, log=progress.say)


def build(options: BuildOptions, progress: Progress | None = None) -> BuildResult:
    """Build, verify and write an artifact directory; on any failure nothing is left at the target."""
    progress = progress or Progress(quiet=True)
    plan = plan_build(options)  # before torch loads: bad input is refused in a fraction of a second

    import onnx

    from clipexport.export import export_tower, export_tower_to_file, external_files, optimize_external
    from clipexport.models.towers import attention_blocks
    from clipexport.passes import PassConfig, PassRecord, run_passes
    from clipexport.passes.external_precision import EXTERNAL_PRECISIONS, lower_external_precision
    from clipexport.passes.fuse_attention import check_unfused

    started = time.perf_counter()
    progress.say(f"clipexport build {plan.name} (recipe {plan.recipe.name}, towers {', '.join(plan.towers)}, "
                 f"batch {plan.batch}, {options.precision}) -> {plan.out}")
    with progress.stage("load reference model"):
        ref = load_reference(plan.name, options.pretrained, options.seed, per_tower=plan.per_tower)
    for note in ref.notes:
        progress.say(f"  note: {note}")
    tolerance = plan.recipe.tolerance(options.precision)
    sizes = parity_batch_sizes(plan.recipe, plan.batch)
    towers_json: dict[str, Any] = {}
    files: dict[str, str] = {}
    parities: dict[str, TowerParity] = {}
    engine_parities: list[TowerParity] = []
    if plan.engines is not None and plan.engines.note:
        progress.say(f"  note: {plan.engines.note}")

    with StagingDir(plan.out, options.force) as staging:
        assert staging.path is not None
        for tower in plan.towers:
            spec = plan.recipe.towers[tower]
            tower_start = time.perf_counter()
            if ref.per_tower:
                with progress.stage(f"materialize {tower} tower"):
                    ref.materialize(tower)
            module = _tower_module(ref, tower)
            parameters = sum(p.numel() for p in module.parameters())
            large = 4 * parameters > options.large_tower_bytes
            trim, trim_reason = _trimmable(ref, tower, spec)
            exported = _export_module(ref, module, trim)
            fuse = plan.recipe.attention == "onnx" and "fuse_attention" not in options.disabled_passes
            disabled = list(options.disabled_passes) + ([] if fuse else ["fuse_attention"])
            calibration = _calibration(ref, tower, options, plan.recipe) if options.precision in CALIBRATED else None
            pass_cfg = PassConfig(
                tower=tower, precision=options.precision, attention_blocks=attention_blocks(exported),
                trim_text=trim, precision_policy=_precision_policy(plan.recipe),
                quant_policy=_quant_policy(plan.recipe), calibration=calibration.batches if calibration else (),
                external_weights=large,
            )
            onnx_path = staging.path / f"{tower}.onnx"
            max_sequence = ref.context_length if trim else None
            reference: Any = module
            anchors = None if ref.per_tower else _anchors(ref, tower, options.seed)
            if large:
                # export -> reference outputs -> free the tower -> simplify over the data file:
                # the torch weights and a second copy of them are never resident together.
                raw = staging.path / f".raw-{tower}.onnx"
                with progress.stage(f"export {tower} tower (weights to external data)"):
                    export_tower_to_file(exported, _example_input(ref, tower), spec, plan.batch, plan.recipe.opset,
                                         raw, max_sequence, fuse)
                with progress.stage(f"reference outputs of the {tower} tower"):
                    reference = RecordedReference(module, parity_inputs(ref, tower, sizes, options.seed))
                del exported
                if ref.per_tower:
                    module = None
                    ref.release(tower)
                with progress.stage(f"simplify {tower} tower (onnxscript, external data memory-mapped)"):
                    simplify_start = time.perf_counter()
                    counts = optimize_external(raw, onnx_path, sequence=trim)
                    simplify_record = PassRecord(
                        "simplify", "applied", counts[0], counts[1], time.perf_counter() - simplify_start,
                        "onnxscript's optimizer over the memory-mapped external data (onnxslim would need the "
                        "whole graph in memory)")
                written = external_files(onnx_path)
                graph = onnx.load(str(onnx_path), load_external_data=False)  # the graph, not the weights
            else:
                with progress.stage(f"export {tower} tower"):
                    graph = export_tower(exported, _example_input(ref, tower), spec, plan.batch, plan.recipe.opset,
                                         max_sequence=max_sequence, fuse_attention=fuse)
            with progress.stage(f"optimize {tower} tower"):
                graph, records = run_passes(
                    graph, pass_cfg, disabled,
                    log=lambda msg: progress.say(f"    {msg}"),
                )
            if large:
                records = [simplify_record if r.name == "simplify" else r for r in records]
                if options.precision in EXTERNAL_PRECISIONS:
                    with progress.stage(f"{options.precision} {tower} tower (weight by weight over its data file)"):
                        graph, precision_record = lower_external_precision(graph, onnx_path, pass_cfg)
                    records = [precision_record if r.name == "precision" else r for r in records]
                    progress.say(f"    precision: {precision_record.detail}")
                    written = external_files(onnx_path)
            if not fuse:
                softmaxes = check_unfused(graph, pass_cfg)
                pass_cfg.details["attention"] = {"lowering": "none", "fused_nodes": 0, "softmax_nodes": softmaxes,
                                                 "blocks": pass_cfg.attention_blocks}
            if large:
                onnx.save_model(graph, str(onnx_path))  # the graph only; its weights stay in the data file
                onnx.checker.check_model(str(onnx_path))  # from the path: the data file's references too
            else:
                written = save_onnx(graph, onnx_path)
            inputs, outputs = tensor_infos(graph.graph.input), tensor_infos(graph.graph.output)
            del graph
            # A tower loaded on its own was freed once its reference outputs were taken; zero-shot
            # anchors would need the other tower, so none then.
            with progress.stage(f"verify {tower} tower (batches {sizes})"):
                parity = tower_parity(ref, tower, reference, onnx_path, spec, tolerance, sizes, options.seed,
                                      options.precision, trim=trim, anchors=anchors, pad_id=_pad_id(ref))
            del reference
            progress.say(f"    {parity.summary()}")
            parities[tower] = parity
            for name in written:
                files[name] = file_sha256(staging.path / name)
            with progress.stage(f"TensorRT compatibility of the {tower} tower"):
                from clipexport.trt.compat import tower_verdict

                verdict = tower_verdict(onnx_path, tower, plan.batch, ref.context_length if tower == "text" else None,
                                        rtol=tolerance.max_rel_err, atol=tolerance.max_rel_err)
            progress.say(f"    {verdict.summary()}")
            towers_json[tower] = {
                "onnx": onnx_path.name,
                "parameters": parameters,
                "files": written,
                **({"external_data": [n for n in written if n != onnx_path.name]} if large else {}),
                "sha256": files[onnx_path.name],
                "inputs": inputs,
                "outputs": outputs,
                "passes": [r.to_json() for r in records],
                "attention": pass_cfg.details.get("attention"),
                **({"sequence": _sequence_json(trim, trim_reason, ref.context_length, _pad_id(ref))} if tower == "text" else {}),
                **({"quantization": pass_cfg.details["quantize"]} if "quantize" in pass_cfg.details else {}),
                **({"calibration": calibration.to_json()} if calibration else {}),
                "parity": parity.to_json(),
                "tensorrt": verdict.to_json(),
                "seconds": round(time.perf_counter() - tower_start, 2),
            }
            if plan.engines is not None and plan.engines.engines:
                with progress.stage(f"TensorRT engine for the {tower} tower"):
                    if ref.per_tower:  # released for ONNX Runtime's parity: the engine's needs it again
                        ref.materialize(tower)
                        module = _tower_module(ref, tower)
                    engine = tower_engine(plan, options, tower, onnx_path, staging.path, ref, module, tolerance,
                                          sizes, trim, progress, compat=towers_json[tower]["tensorrt"])
                    ref.release(tower)
                towers_json[tower]["engine"] = engine.entry
                files.update(engine.files)
                engine_parities.append(engine.parity)
        if "text" in plan.towers:
            tokenizer, written = write_tokenizer_assets(ref, staging.path)
            files.update({name: file_sha256(staging.path / name) for name in written})
        else:
            tokenizer = {"context_length": ref.context_length}
        failed = [p for p in [*parities.values(), *engine_parities] if not p.passed]
        if failed and not options.accept_parity_failure:
            raise ParityError(
                "parity outside the recipe's tolerance; nothing was written:\n  "
                + "\n  ".join(p.summary() for p in failed)
            )
        manifest = _manifest(ref, plan, options, towers_json, files, tokenizer, sizes,
                             time.perf_counter() - started, failed)
        write_manifest(staging.path, manifest)
        staging.commit()
    from clipexport.info import build_summary
    from clipexport.manifest import Manifest

    progress.say(build_summary(plan.out, Manifest.from_json(manifest), progress.timings,
                               time.perf_counter() - started))
    progress.say(f"wrote {plan.out} in {time.perf_counter() - started:.1f}s")
    return BuildResult(out_dir=plan.out, manifest=manifest, parity=parities)


def _releaser(ref: ReferenceModel, tower: str) -> Callable[[], None] | None:
    """For a per-tower reference: a callable freeing `tower` (tower_parity calls it before ONNX Runtime loads)."""
    if not ref.per_tower:
        return None
    return lambda: ref.release(tower)


def _sequence_json(trim: bool, reason: str, context_length: int, pad_id: int = 0) -> dict[str, Any]:
    """How the runtime may cut token ids: the contract behind the input shape [batch, sequence]."""
    if trim:
        return {"axis": "sequence", "min": MIN_SEQUENCE, "max": context_length, "pad_id": pad_id,
                "trim": "the batch's last column holding a non-pad id, + 1 (for CLIP ids: max EOT position + 1)"}
    return {"axis": None, "length": context_length, "trim": None, "reason": reason}


def _precision_policy(recipe: Recipe) -> Any:
    from clipexport.passes.precision import PrecisionPolicy

    p = recipe.precision
    return PrecisionPolicy(keep_fp32_ops=p.keep_fp32_ops, keep_final_projection=p.keep_final_projection,
                           fp16_headroom=p.fp16_headroom)


def _quant_policy(recipe: Recipe) -> Any:
    from clipexport.passes.quantize import QuantPolicy

    q = recipe.quantize
    return QuantPolicy(op_types=q.op_types, quantize_embedding=q.quantize_embedding,
                       keep_final_projection=q.keep_final_projection, activation_quantile=q.activation_quantile)


def _manifest(
    ref: ReferenceModel,
    plan: _Plan,
    options: BuildOptions,
    towers: dict[str, Any],
    files: dict[str, str],
    tokenizer: dict[str, Any],
    parity_batches: list[int],
    seconds: float,
    failed: list[TowerParity],
) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "clipexport_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": ref.name,
        "pretrained": ref.weights.value,
        "weights": ref.weights.to_json(),
        "precision": options.precision,
        "recipe": plan.recipe.name,
        "families": {"image": ref.families.image, "text": ref.families.text},
        "model_config": ref.model_cfg,
        "opset": plan.recipe.opset,
        "batch": {"min": plan.batch.min, "opt": plan.batch.opt, "max": plan.batch.max},
        "preprocess": ref.preprocess_config(),
        # zero-shot scoring: logits = logit_scale * cos + logit_bias, with the trained values
        "logit_scale": float(ref.model.logit_scale.exp().item()),
        "logit_bias": None if getattr(ref.model, "logit_bias", None) is None else float(ref.model.logit_bias.item()),
        "tokenizer": tokenizer,
        "versions": library_versions(),
        "parity_batch_sizes": parity_batches,
        # "per-tower": a model too large to hold whole, loaded (and verified) one tower at a time
        "loading": "per-tower" if ref.per_tower else "whole",
        "parity_accepted_by_user": bool(failed),
        "notes": ref.notes,
        "seconds": round(seconds, 2),
        "towers": towers,
        "files": files,
    }


def verify_artifact(directory: Path, progress: Progress | None = None, files_only: bool = False) -> dict[str, Any]:
    """Re-check an artifact: every file against its sha256, then parity against a rebuilt reference.

    Returns {"files": [...], "parity": {tower: TowerParity}}; raises ArtifactError or ParityError.
    """
    progress = progress or Progress(quiet=True)
    directory = Path(directory)
    manifest = read_manifest(directory)  # a malformed manifest is refused before any progress line
    with progress.stage("check files against manifest sha256"):
        check_files(directory, manifest)
        check_graphs(directory, manifest)
    result: dict[str, Any] = {"files": list(manifest.files), "parity": {}}
    if files_only:
        return result
    weights = manifest.weights
    if weights.kind == FILE:
        path = Path(weights.value)
        if not path.is_file():
            raise WeightsError(f"the checkpoint this artifact was built from is gone: {path} (use --files-only)")
        if file_sha256(path) != weights.sha256:
            raise WeightsError(f"the checkpoint {path} changed since the build (sha256 differs)")
    with progress.stage("load reference model"):
        ref = load_reference(manifest.model, weights.value, weights.seed,
                             per_tower=manifest.get("loading") == "per-tower")
    recipe = recipe_for(ref.families, ref.name)
    # The gate is the installed recipe's tolerance for this precision, never the one the manifest
    # carries: a manifest is input, and its numbers can be edited.
    tol = recipe.tolerance(manifest.precision)
    sizes = parity_batch_sizes(recipe, BatchRange(manifest.batch.min, manifest.batch.opt, manifest.batch.max))
    for tower, entry in manifest.towers.items():
        spec = recipe.towers[tower]
        with progress.stage(f"verify {tower} tower"):
            sequence = entry.sequence
            ref.materialize(tower)
            parity = tower_parity(ref, tower, _tower_module(ref, tower), directory / entry.onnx, spec, tol,
                                  sizes, weights.seed, manifest.precision,
                                  trim=bool(sequence and sequence.dynamic),
                                  pad_id=sequence.pad_id if sequence else 0,
                                  anchors=None if ref.per_tower else _anchors(ref, tower, weights.seed),
                                  release=_releaser(ref, tower))
        progress.say(f"    {parity.summary()}")
        result["parity"][tower] = parity
    failed = [p for p in result["parity"].values() if not p.passed]
    if failed:
        raise ParityError("parity outside tolerance:\n  " + "\n  ".join(p.summary() for p in failed))
    return result


__all__ = ["BuildOptions", "BuildResult", "build", "plan_build", "verify_artifact"]
